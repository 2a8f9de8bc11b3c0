"""train_loop_per_worker: the whole training loop of one Ray Train worker.

restore -> epochs / steps -> validate -> checkpoint -> report. Everything a resumed run needs to be
bitwise identical to one that never stopped is in the checkpoint: model, optimizer, scheduler,
position (epoch, step, running loss of the epoch), tracking, history and every rank's RNG.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from cape_ray import __version__, checkpoint as ckpt, engine, rng, storage
from cape_ray.config import TrainConfig
from cape_ray.data.episodes import EpisodeSampler, collate, global_episode_indices, shard
from cape_ray.data.loading import load_split
from cape_ray.model.cape import build_model
from cape_ray.tracking import RunTracking

log = logging.getLogger("cape_ray")

# Mid-epoch checkpoints report this as val_pck: below any real PCK, so Ray's top-K-by-PCK
# retention never keeps one in place of a validated checkpoint (it is still kept as the latest).
UNVALIDATED_PCK = -1.0


@dataclass
class Position:
    """Where training stands (the same on every rank); `epoch`/`step` are the next to run (0-based)."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    history: list = field(default_factory=list)  # one metrics dict per validated epoch


@dataclass
class Restored:
    checkpoint: ckpt.LoadedCheckpoint
    name: str
    source: str  # "ray" (restart / driver rerun) or "--resume"
    fell_back_from: Optional[str] = None


# ----------------------------------------------------------------------------- distributed helpers
def _world() -> tuple[int, int]:
    context = ray.train.get_context()
    return context.get_world_rank(), context.get_world_size()


def _all_reduce_sums(values: dict[str, float]) -> dict[str, float]:
    """Sum floats over ranks (float64, fixed key order) so every rank holds the same numbers."""
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            tensor = tensor.cuda()
        dist.all_reduce(tensor)
    return dict(zip(keys, tensor.cpu().tolist()))


def _gather_rank_states(rank: int, world_size: int, loss_sum: float, loss_count: int) -> dict[int, bytes]:
    """Every rank's own state (RNG, running train loss of the epoch), serialized, on rank 0."""
    blob = ckpt.serialize({"rng": rng.capture(), "loss_sum": loss_sum, "loss_count": loss_count})
    if world_size == 1:
        return {0: blob}
    gathered: list[Optional[bytes]] = [None] * world_size
    dist.all_gather_object(gathered, blob)
    return {r: b for r, b in enumerate(gathered)} if rank == 0 else {}


# ----------------------------------------------------------------------------- restore
def _fetch(checkpoint: ray.train.Checkpoint, scratch: str) -> str:
    return storage.download(checkpoint.filesystem, checkpoint.path, scratch)


def find_restore_point(config: TrainConfig, scratch: str) -> Optional[Restored]:
    """Ray's latest checkpoint (worker restart or driver rerun) wins over --resume PATH.

    A latest that does not verify falls back, loudly, to the newest valid checkpoint before it;
    with none, this raises rather than silently starting from scratch.
    """
    latest = ray.train.get_checkpoint()
    if latest is not None:
        name = latest.path.rstrip("/").rsplit("/", 1)[-1]
        local = _fetch(latest, os.path.join(scratch, "latest"))
        problems = ckpt.verify_checkpoint(local)
        if not problems:
            return Restored(ckpt.load_checkpoint(local), name, "ray")
        run_dir = latest.path.rstrip("/").rsplit("/", 1)[0]
        log.error("LATEST CHECKPOINT %s DOES NOT VERIFY: %s", latest.path, "; ".join(problems))
        fallback = storage.newest_valid_before(latest.filesystem, run_dir, name)
        if fallback is None:
            raise ckpt.CheckpointError(
                f"the latest checkpoint {latest.path} does not verify ({'; '.join(problems)}) and no "
                f"earlier valid checkpoint exists in {run_dir}; refusing to start from scratch. "
                f"Start a new run with another --name, or --resume a valid checkpoint.")
        log.error("FALLING BACK to the newest valid checkpoint: %s", fallback)
        local = storage.download(latest.filesystem, f"{run_dir}/{fallback}", os.path.join(scratch, "fallback"))
        return Restored(ckpt.load_checkpoint(local), fallback, "ray", fell_back_from=name)
    if config.resume:
        fs, path = storage.resolve(config.resume)
        local = storage.download(fs, path, os.path.join(scratch, "resume"))
        return Restored(ckpt.load_checkpoint(local), path.rstrip("/").rsplit("/", 1)[-1], "--resume")
    return None


def _banner(restored: Restored, position: Position, tracking: RunTracking, rng_note: str) -> str:
    best_loss, best_pck, stopping = tracking.best_loss, tracking.best_pck, tracking.early_stopping
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    epoch_of = lambda e: "" if e is None else f" (e{e:03d})"  # noqa: E731
    lines = [
        f"RESUMING FROM CHECKPOINT  {restored.name}"
        + ("  [Ray latest: restart or rerun]" if restored.source == "ray" else "  [--resume]"),
        f"  model, optimizer, scheduler restored; resuming at epoch {position.epoch + 1} "
        f"step {position.step} (global step {position.global_step})",
        f"  best val_loss {fmt(best_loss.best)}{epoch_of(best_loss.best_epoch)}  best PCK "
        f"{fmt(best_pck.best)}{epoch_of(best_pck.best_epoch)}  epochs without improvement "
        f"{stopping.epochs_without_improvement}",
        f"  {rng_note}",
    ]
    if restored.fell_back_from:
        lines.insert(1, f"  (latest {restored.fell_back_from} did not verify; fell back to this one)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- orphans
def _run_dir() -> tuple[Any, str]:
    storage_context = ray.train.get_context().get_storage()
    return storage_context.storage_filesystem, storage_context.experiment_fs_path


def clean_orphans(registered: set[str], after: Optional[tuple[int, int]]) -> tuple[list[str], list[str]]:
    """Checkpoint directories written but never registered by Ray (a report lost in a crash).

    Those past the restore point are deleted: training is about to redo them under the same names.
    Others are only reported. Runs on rank 0 at start, when no report is in flight; the best-export
    copies belong to the callback and are left alone. Returns (removed, reported).
    """
    fs, run_dir = _run_dir()
    removed, reported = [], []
    for name in storage.list_dirs(fs, run_dir):
        position = ckpt.position_from_name(name)
        if name in registered or position is None:
            continue
        if after is not None and position > after:
            storage.delete_dir(fs, f"{run_dir}/{name}")
            removed.append(name)
        else:
            reported.append(name)
    return removed, reported


def _registered_names() -> set[str]:
    from ray.train import CheckpointConsistencyMode

    reported = ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
    return {r.checkpoint.path.rstrip("/").rsplit("/", 1)[-1] for r in reported}


# ----------------------------------------------------------------------------- the loop
def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                   sampler: EpisodeSampler, split: Any, config: TrainConfig, epoch: int, step: int,
                   rank: int, world_size: int, device: torch.device) -> list[float]:
    """One optimizer step over this rank's micro-batches of (epoch, step); returns their losses."""
    losses = []
    for micro in range(config.accumulation_steps):
        indices = global_episode_indices(step, micro, rank, world_size, config.batch_size,
                                         config.accumulation_steps)
        batch = collate(split, sampler.train_episodes(epoch, indices), augment=config.augment).to(device)
        # DDP averages gradients only on the last micro-batch of the step.
        last_micro = micro == config.accumulation_steps - 1
        sync = contextlib.nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            loss, _ = engine.compute_loss(model, batch)
            (loss / config.accumulation_steps).backward()
        losses.append(float(loss.detach()))
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return losses


def validation_sums(model: torch.nn.Module, split: Any, episodes: list, batch_size: int,
                    device: torch.device) -> dict[str, float]:
    """Loss and PCK sums over fixed episodes (summed, so ranks can add theirs up)."""
    model.eval()
    sums: dict[str, float] = {}
    with torch.no_grad():
        for start in range(0, len(episodes), batch_size):
            batch = collate(split, episodes[start:start + batch_size], augment=False).to(device)
            for key, value in engine.evaluation_sums(model, batch).items():
                sums[key] = sums.get(key, 0.0) + float(value)
    return sums


def train_loop_per_worker(config_dict: dict[str, Any]) -> None:
    config = TrainConfig.from_dict(config_dict)
    rank, world_size = _world()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(config.num_threads)  # thread count changes float rounding: fix it
    device = ray.train.torch.get_device()

    # Data: episodes are pure functions of (seed, epoch, index); global RNG never touches them.
    train_split = load_split(config, "train", config.num_queries_per_episode)
    val_split = load_split(config, "val", config.val_queries_per_episode)
    sampler = EpisodeSampler(train_split, config.num_shots, config.num_queries_per_episode, seed=config.seed)
    val_sampler = EpisodeSampler(val_split, config.num_shots, config.val_queries_per_episode, seed=config.data_seed)
    val_mine = shard(val_sampler.fixed_episodes(config.val_episodes), rank, world_size)
    steps_per_epoch = config.steps_per_epoch_at(world_size)
    total_steps = steps_per_epoch * config.epochs

    # Same initial weights on every rank; then a per-rank stream for dropout.
    rng.seed_everything(config.seed)
    model = build_model(config).to(device)
    rng.seed_everything(rng.derived_seed(config.seed, rank))

    scratch = tempfile.mkdtemp(prefix="cape_ray_restore_")
    try:
        restored = find_restore_point(config, scratch)
        if restored is not None:
            ckpt.check_compatible(restored.checkpoint.state, config, restored.checkpoint.path)
            model.load_state_dict(restored.checkpoint.model)
        model = ray.train.torch.prepare_model(model)
        raw_model = model.module if hasattr(model, "module") else model
        optimizer = engine.build_optimizer(raw_model, config)
        scheduler = engine.build_scheduler(optimizer, config, total_steps)
        tracking = RunTracking(config.early_stopping_patience, config.early_stopping_min_delta)
        position = Position()
        loss_sum, loss_count = 0.0, 0  # this rank's running train loss of the current epoch

        if restored is not None:
            state = restored.checkpoint.state
            optimizer.load_state_dict(restored.checkpoint.optimizer)
            scheduler.load_state_dict(restored.checkpoint.scheduler)
            tracking.load_state_dict(state["tracking"])
            position = Position(**state["position"])
            if position.step > 0 and state["world_size"] != world_size:
                raise ckpt.CheckpointError(
                    f"{restored.name} is a mid-epoch checkpoint of a {state['world_size']}-worker run; "
                    f"resume it with --num_workers {state['world_size']} or from an epoch-end checkpoint")
            # RNG last: nothing after this point may draw from the global generators before training.
            if state["world_size"] == world_size and rank in restored.checkpoint.rank_states:
                mine = restored.checkpoint.rank_states[rank]
                loss_sum, loss_count = float(mine["loss_sum"]), int(mine["loss_count"])
                names = rng.restore(mine["rng"])
                rng_note = f"RNG restored: {', '.join(names)} ({world_size} rank{'s' * (world_size > 1)})"
                if "cuda" not in names:
                    rng_note += "; CUDA n/a"
            else:
                rng.seed_everything(rng.derived_seed(config.seed, position.global_step, rank))
                rng_note = (f"RNG RE-SEEDED deterministically: checkpoint has {state['world_size']} "
                            f"rank(s), this run has {world_size}")
                log.warning("WARNING: world size changed (%d -> %d); per-rank RNG re-seeded",
                            state["world_size"], world_size)
            if rank == 0:
                print(_banner(restored, position, tracking, rng_note), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    registered: set[str] = set()
    if rank == 0:
        registered = _registered_names()
        restored_at = None if restored is None else ckpt.position_from_name(
            ckpt.checkpoint_name(config, position.epoch + (position.step > 0), position.step or None))
        removed, stray = clean_orphans(registered, restored_at)
        if removed:
            print(f"removed {len(removed)} orphaned checkpoint dir(s) that Ray never registered "
                  f"(a report lost in a crash; redone now): {', '.join(removed)}", flush=True)
        if stray:
            log.warning("WARNING: %d checkpoint dir(s) in the run directory are not registered with Ray "
                        "and are not used: %s", len(stray), ", ".join(stray))

    if tracking.early_stopping.should_stop:
        if rank == 0:
            print(f"early stopping already triggered at epoch {tracking.early_stopping.stopped_epoch}; "
                  f"nothing to train", flush=True)
        return

    seconds = {"train": 0.0, "checkpoint": 0.0}  # this attempt's totals, for the overhead benchmark

    def report(metrics: dict[str, Any], name: str) -> None:
        """Write this position as a checkpoint (rank 0) and report it (all ranks: a barrier)."""
        started = time.perf_counter()
        state = {
            "config": config.to_dict(), "position": asdict(position), "tracking": tracking.state_dict(),
            "world_size": world_size, "metrics": metrics, "num_threads": config.num_threads,
            "versions": {"cape_ray": __version__, "torch": torch.__version__, "ray": ray.__version__,
                         "numpy": np.__version__},
        }
        blobs = _gather_rank_states(rank, world_size, loss_sum, loss_count)
        checkpoint, staging = None, None
        if rank == 0:
            # Names are unique per report: a registered name (only possible after falling back from
            # a corrupt latest) gets a suffix; an unregistered leftover of the same name is cleared
            # so that no stale file survives the merge into it.
            while name in registered:
                name += "_redo"
            fs, run_dir = _run_dir()
            storage.delete_dir(fs, f"{run_dir}/{name}")
            staging = tempfile.mkdtemp(prefix="cape_ray_ckpt_")
            ckpt.write_checkpoint(staging, model=raw_model.state_dict(), optimizer=optimizer.state_dict(),
                                  scheduler=scheduler.state_dict(), state=state, rank_states=blobs)
            checkpoint = ray.train.Checkpoint.from_directory(staging)
        try:
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
        finally:
            if staging:
                shutil.rmtree(staging, ignore_errors=True)
            seconds["checkpoint"] += time.perf_counter() - started

    for epoch in range(position.epoch, config.epochs):
        model.train()
        epoch_start = time.perf_counter()
        for step in range(position.step, steps_per_epoch):
            step_start = time.perf_counter()
            for loss in optimizer_step(model, optimizer, scheduler, sampler, train_split, config,
                                       epoch, step, rank, world_size, device):
                loss_sum += loss
                loss_count += 1
            seconds["train"] += time.perf_counter() - step_start
            position.step, position.global_step = step + 1, position.global_step + 1

            every = config.checkpoint_every_steps
            if every and position.global_step % every == 0 and position.step < steps_per_epoch:
                metrics = {"val_pck": UNVALIDATED_PCK, "validated": 0, "epoch": epoch + 1,
                           "step": position.step, "global_step": position.global_step,
                           "lr": float(scheduler.get_last_lr()[0]),
                           "train_loss": loss_sum / max(1, loss_count)}
                report(metrics, ckpt.checkpoint_name(config, epoch + 1, position.step))

        # ---- end of epoch: train loss over all ranks, validation over all ranks' episodes
        train_sums = _all_reduce_sums({"sum": loss_sum, "count": loss_count})
        sums = validation_sums(raw_model, val_split, val_mine, config.batch_size, device)
        val = engine.summarize(_all_reduce_sums(sums))
        epoch_time = time.perf_counter() - epoch_start
        flags = tracking.update(val["val_loss"], val["val_pck"], epoch + 1)
        metrics = {
            "epoch": epoch + 1, "step": steps_per_epoch, "global_step": position.global_step, "validated": 1,
            "train_loss": train_sums["sum"] / max(1.0, train_sums["count"]),
            **{k: float(v) for k, v in val.items()},
            "lr": float(scheduler.get_last_lr()[0]), "epoch_time_s": epoch_time,
            # totals of this attempt, before this report's own checkpoint
            "train_time_total_s": seconds["train"], "checkpoint_time_total_s": seconds["checkpoint"],
            "is_best_loss": int(flags["is_best_loss"]), "is_best_pck": int(flags["is_best_pck"]),
            "best_val_loss": float(tracking.best_loss.best), "best_val_pck": float(tracking.best_pck.best),
            "epochs_without_improvement": tracking.early_stopping.epochs_without_improvement,
            "early_stopped": int(flags["stop"]),
        }
        # The history records what is deterministic; wall-clock times (*_s) differ across runs.
        position.history.append({k: v for k, v in metrics.items() if not k.endswith("_s")})
        position.epoch, position.step = epoch + 1, 0
        loss_sum, loss_count = 0.0, 0
        name = ckpt.checkpoint_name(config, epoch + 1)
        if rank == 0:
            print(f"epoch {epoch + 1:3d}/{config.epochs}  train_loss {metrics['train_loss']:.4f}  "
                  f"val_loss {metrics['val_loss']:.4f}  val_pck {metrics['val_pck']:.4f}  "
                  f"lr {metrics['lr']:.2e}  {epoch_time:.1f}s  -> {name}"
                  + ("  [best pck]" if flags["is_best_pck"] else "")
                  + ("  [best loss]" if flags["is_best_loss"] else ""), flush=True)
        report(metrics, name)
        if flags["stop"]:
            if rank == 0:
                print(f"early stopping at epoch {epoch + 1}: no val_pck improvement > "
                      f"{config.early_stopping_min_delta} for {config.early_stopping_patience} epochs", flush=True)
            break
