"""train_loop_per_worker: the whole training loop of one Ray Train worker.

restore -> epochs / steps -> validate -> checkpoint -> report. Everything a resumed run needs to be
bitwise identical to one that never stopped is in the checkpoint: model, optimizer, scheduler,
position (epoch, step, episode), tracking, history, and each rank's RNG and running loss.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
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
    """Where training stands, the same on every rank. `epoch` is the next epoch to run (0-based);
    `step` / `episode` count the optimizer steps / episodes (all ranks) already done in it."""

    epoch: int = 0
    step: int = 0
    episode: int = 0
    global_step: int = 0
    episodes_per_step: int = 0  # batch_size x accumulation x world size, fixed when the run starts
    history: list = field(default_factory=list)  # one metrics dict per validated epoch


@dataclass
class Restored:
    checkpoint: ckpt.LoadedCheckpoint
    name: str
    source: str  # "ray" (restart / driver rerun) or "--resume"
    fell_back_from: Optional[str] = None


def say(message: str) -> None:
    """One line to the worker's stdout (streamed to the driver and job logs).

    Ray Train patches `print` into its logger and also tees it to a redirected stdout, which shows
    every line twice; writing to the real stdout shows it once.
    """
    sys.__stdout__.write(message + "\n")
    sys.__stdout__.flush()


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
                   sampler: EpisodeSampler, split: Any, config: TrainConfig, epoch: int, first_episode: int,
                   rank: int, world_size: int, device: torch.device) -> list[float]:
    """One optimizer step over this rank's micro-batches of the episodes starting at `first_episode`.

    Returns the micro-batch losses. Which episodes a rank trains on depends only on the position,
    so the global sequence is the same for any world size (see data/episodes.py).
    """
    losses = []
    for micro in range(config.accumulation_steps):
        indices = first_episode + global_episode_indices(0, micro, rank, world_size, config.batch_size,
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


def plan_accumulation(config: TrainConfig, world_size: int, state: Optional[dict]) -> tuple[int, Optional[str]]:
    """Accumulation steps for this attempt, and a note when they differ from the flags.

    A run keeps its episodes per optimizer step (its effective batch) across world-size changes by
    adjusting accumulation; when that is impossible, the batch changes and the note says so.
    """
    if state is None or state["world_size"] == world_size:
        return config.accumulation_steps, None
    wanted = state["position"]["episodes_per_step"]
    per_micro = config.batch_size * world_size
    if wanted % per_micro == 0:
        accumulation = wanted // per_micro
        return accumulation, (f"world size {state['world_size']} -> {world_size}: accumulation_steps "
                              f"{config.accumulation_steps} -> {accumulation} keeps {wanted} episodes per step")
    accumulation = max(1, round(wanted / per_micro))
    return accumulation, (f"world size {state['world_size']} -> {world_size}: {wanted} episodes per step cannot be "
                          f"kept with batch_size {config.batch_size}; now {accumulation * per_micro} "
                          f"(accumulation_steps {accumulation}); the LR schedule is rescaled to the new step count")


class Progress:
    """Rank 0's progress: a live bar on a terminal (drawn by the Ray driver), else a line per epoch."""

    def __init__(self, config: TrainConfig, rank: int, steps_per_epoch: int) -> None:
        self.enabled = rank == 0
        self.use_bar = self.enabled and config.progress == "bar"
        self.config, self.steps_per_epoch = config, steps_per_epoch
        self.bar: Any = None
        self.epoch_times: list[float] = []

    def start_epoch(self, epoch: int, first_step: int) -> None:
        if self.use_bar:
            from ray.experimental import tqdm_ray

            self.bar = tqdm_ray.tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{self.config.epochs}",
                                     unit="step")
            self.bar.update(first_step)

    def step(self, epoch: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.set_description(f"epoch {epoch + 1}/{self.config.epochs} loss {loss:.4f}")
            self.bar.update(1)

    def end_epoch(self, metrics: dict[str, Any], steps: int, train_seconds: float, epoch_seconds: float,
                  name: str, flags: dict[str, bool]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if not self.enabled:
            return
        self.epoch_times.append(epoch_seconds)
        remaining = (self.config.epochs - metrics["epoch"]) * (sum(self.epoch_times) / len(self.epoch_times))
        speed = steps / train_seconds if train_seconds > 0 else float("nan")
        say(f"epoch {metrics['epoch']:3d}/{self.config.epochs}  {steps} steps  "
            f"train_loss {metrics['train_loss']:.4f}  val_loss {metrics['val_loss']:.4f}  "
            f"val_pck {metrics['val_pck']:.4f}  lr {metrics['lr']:.2e}  {speed:.1f} steps/s  "
            f"{epoch_seconds:.1f}s  ETA {_duration(remaining)}  -> {name}"
            + ("  [best pck]" if flags["is_best_pck"] else "")
            + ("  [best loss]" if flags["is_best_loss"] else ""))


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def train_loop_per_worker(config_dict: dict[str, Any]) -> None:
    config = TrainConfig.from_dict(config_dict)
    rank, world_size = _world()
    torch.set_num_threads(config.num_threads)  # thread count changes float rounding: fix it
    device = ray.train.torch.get_device()

    # Data: episodes are pure functions of (seed, epoch, index); global RNG never touches them.
    train_split = load_split(config, "train", config.num_queries_per_episode)
    val_split = load_split(config, "val", config.val_queries_per_episode)
    sampler = EpisodeSampler(train_split, config.num_shots, config.num_queries_per_episode, seed=config.seed)
    val_sampler = EpisodeSampler(val_split, config.num_shots, config.val_queries_per_episode, seed=config.data_seed)
    val_mine = shard(val_sampler.fixed_episodes(config.val_episodes), rank, world_size)

    # Same initial weights on every rank; then a per-rank stream for dropout.
    rng.seed_everything(config.seed)
    model = build_model(config).to(device)
    rng.seed_everything(rng.derived_seed(config.seed, rank))

    scratch = tempfile.mkdtemp(prefix="cape_ray_restore_")
    try:
        restored = find_restore_point(config, scratch)
        state = restored.checkpoint.state if restored else None
        accumulation, layout_note = plan_accumulation(config, world_size, state)
        config = config.replace(accumulation_steps=accumulation)
        episodes_per_step = config.batch_size * accumulation * world_size
        steps_per_epoch = config.steps_per_epoch_at(world_size)
        if restored is not None:
            ckpt.check_compatible(state, config, restored.checkpoint.path)
            ckpt.check_model_shapes(restored.checkpoint.model, model.state_dict(), restored.checkpoint.path)
            model.load_state_dict(restored.checkpoint.model)
        model = ray.train.torch.prepare_model(model)
        raw_model = model.module if hasattr(model, "module") else model
        optimizer = engine.build_optimizer(raw_model, config)
        scheduler = engine.build_scheduler(optimizer, config, steps_per_epoch * config.epochs)
        tracking = RunTracking(config.early_stopping_patience, config.early_stopping_min_delta)
        position = Position(episodes_per_step=episodes_per_step)
        loss_sum, loss_count = 0.0, 0  # this rank's running train loss of the current epoch

        if restored is not None:
            optimizer.load_state_dict(restored.checkpoint.optimizer)
            scheduler.load_state_dict(restored.checkpoint.scheduler)
            tracking.load_state_dict(state["tracking"])
            position = Position(**{**state["position"], "episodes_per_step": episodes_per_step})
            rank_states = restored.checkpoint.rank_states
            # RNG last: nothing after this point may draw from the global generators before training.
            if state["world_size"] == world_size and rank in rank_states:
                loss_sum, loss_count = float(rank_states[rank]["loss_sum"]), int(rank_states[rank]["loss_count"])
                names = rng.restore(rank_states[rank]["rng"])
                rng_note = f"RNG restored: {', '.join(names)} ({world_size} rank{'s' * (world_size > 1)})"
                if "cuda" not in names:
                    rng_note += "; CUDA n/a"
            else:
                if rank == 0:  # the epoch's train-loss mean only needs the totals
                    loss_sum = sum(float(r["loss_sum"]) for r in rank_states.values())
                    loss_count = sum(int(r["loss_count"]) for r in rank_states.values())
                rng.seed_everything(rng.derived_seed(config.seed, position.global_step, rank))
                rng_note = (f"RNG RE-SEEDED deterministically: the checkpoint has {state['world_size']} "
                            f"rank(s), this run has {world_size}")
                log.warning("WARNING: world size changed (%d -> %d); per-rank RNG re-seeded",
                            state["world_size"], world_size)
            if rank == 0:
                say(_banner(restored, position, tracking, rng_note))
        if layout_note and rank == 0:
            log.warning("WARNING: %s", layout_note)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    registered: set[str] = set()
    if rank == 0:
        registered = _registered_names()
        restored_at = None if restored is None else ckpt.position_from_name(
            ckpt.checkpoint_name(config, position.epoch + (position.step > 0), position.step or None))
        removed, stray = clean_orphans(registered, restored_at)
        if removed:
            say(f"removed {len(removed)} orphaned checkpoint dir(s) that Ray never registered "
                f"(a report lost in a crash; redone now): {', '.join(removed)}")
        if stray:
            log.warning("WARNING: %d checkpoint dir(s) in the run directory are not registered with Ray "
                        "and are not used: %s", len(stray), ", ".join(stray))

    if tracking.early_stopping.should_stop:
        if rank == 0:
            say(f"early stopping already triggered at epoch {tracking.early_stopping.stopped_epoch}; "
                f"nothing to train")
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

    def report_mid_epoch(epoch: int, reason: str) -> None:
        metrics = {"val_pck": UNVALIDATED_PCK, "validated": 0, "reason": reason, "epoch": epoch + 1,
                   "step": position.step, "global_step": position.global_step,
                   "lr": float(scheduler.get_last_lr()[0]), "train_loss": loss_sum / max(1, loss_count)}
        report(metrics, ckpt.checkpoint_name(config, epoch + 1, position.step))

    progress = Progress(config, rank, steps_per_epoch)
    preemption_saved = False
    for epoch in range(position.epoch, config.epochs):
        model.train()
        epoch_start, epoch_train_seconds, first_step = time.perf_counter(), 0.0, position.step
        progress.start_epoch(epoch, position.step)
        while position.episode + episodes_per_step <= config.episodes_per_epoch:
            step_start = time.perf_counter()
            losses = optimizer_step(model, optimizer, scheduler, sampler, train_split, config, epoch,
                                    position.episode, rank, world_size, device)
            loss_sum, loss_count = loss_sum + sum(losses), loss_count + len(losses)
            epoch_train_seconds += time.perf_counter() - step_start
            position.step, position.episode = position.step + 1, position.episode + episodes_per_step
            position.global_step += 1
            progress.step(epoch, losses[-1])

            mid_epoch = position.episode + episodes_per_step <= config.episodes_per_epoch
            every = config.checkpoint_every_steps
            if mid_epoch and every and position.global_step % every == 0:
                report_mid_epoch(epoch, "scheduled")
            elif config.preemption_check_steps and position.global_step % config.preemption_check_steps == 0:
                # A collective: every rank asks at the same steps. On a notice, save once right away;
                # the restart after the node goes away counts against max_preemption_failures.
                notice = ray.train.get_preemption_info()
                if notice is not None and not preemption_saved and mid_epoch:
                    if rank == 0:
                        say(f"preemption notice for ranks {notice.preempted_ranks} (deadline "
                            f"{notice.deadline_ms} ms): writing a just-in-time checkpoint")
                    report_mid_epoch(epoch, "preemption")
                preemption_saved = preemption_saved or notice is not None
        seconds["train"] += epoch_train_seconds

        # ---- end of epoch: train loss over all ranks, validation over all ranks' episodes
        train_sums = _all_reduce_sums({"sum": loss_sum, "count": loss_count})
        val = engine.summarize(_all_reduce_sums(validation_sums(raw_model, val_split, val_mine,
                                                                config.batch_size, device)))
        epoch_seconds = time.perf_counter() - epoch_start
        flags = tracking.update(val["val_loss"], val["val_pck"], epoch + 1)
        metrics = {
            "epoch": epoch + 1, "step": position.step, "global_step": position.global_step, "validated": 1,
            "train_loss": train_sums["sum"] / max(1.0, train_sums["count"]),
            **{k: float(v) for k, v in val.items()},
            "lr": float(scheduler.get_last_lr()[0]),
            "is_best_loss": int(flags["is_best_loss"]), "is_best_pck": int(flags["is_best_pck"]),
            "best_val_loss": float(tracking.best_loss.best), "best_val_pck": float(tracking.best_pck.best),
            "epochs_without_improvement": tracking.early_stopping.epochs_without_improvement,
            "early_stopped": int(flags["stop"]),
            # wall-clock figures (*_s): this attempt's totals, before this report's own checkpoint
            "epoch_time_s": epoch_seconds, "train_time_total_s": seconds["train"],
            "checkpoint_time_total_s": seconds["checkpoint"],
        }
        # The history records what is deterministic; wall-clock figures differ across runs.
        position.history.append({k: v for k, v in metrics.items() if not k.endswith("_s")})
        position.epoch, position.step, position.episode = epoch + 1, 0, 0
        loss_sum, loss_count = 0.0, 0
        name = ckpt.checkpoint_name(config, epoch + 1)
        progress.end_epoch(metrics, metrics["step"] - first_step, epoch_train_seconds, epoch_seconds, name, flags)
        report(metrics, name)
        if flags["stop"]:
            if rank == 0:
                say(f"early stopping at epoch {epoch + 1}: no val_pck improvement > "
                    f"{config.early_stopping_min_delta} for {config.early_stopping_patience} epochs")
            break
