"""train_loop_per_worker: the whole training loop of one Ray Train worker, top to bottom.

setup -> restore -> epochs (optimizer steps, mid-epoch checkpoints, validation, epoch checkpoint).
Everything a resumed run needs to be bitwise identical to one that never stopped is restored by the
Checkpointer; everything Ray-specific is in `RayEdge` below, so the loop also runs in one process
without Ray (the fast tests hand it a local edge).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import torch

from cape_ray import checkpoint as ckpt, determinism, engine, rng
from cape_ray.checkpointer import (
    RETENTION_KEY,
    UNVALIDATED_SCORE,
    Checkpointer,
    Resumed,
    plan_layout,
    retention_score,
)
from cape_ray.config import TrainConfig
from cape_ray.console import Console, RelayLogHandler, find_relay
from cape_ray.data.episodes import EpisodeSampler, TrainingBatches, shard
from cape_ray.data.loading import load_split
from cape_ray.lease import FENCE_KEY, Fence, Fenced
from cape_ray.model import build_model, describe, model_spec
from cape_ray.model.weights import load_pretrained
from cape_ray.state import TrainState
from cape_ray.timeline import Timeline

log = logging.getLogger("cape_ray")



def train_loop_per_worker(config_dict: dict[str, Any], edge: Optional["RayEdge"] = None) -> None:
    """Ray Train's entry point. A storage failure that outlasts its retries is raised like any
    worker failure: Ray's restart budget retries it (checkpointer.py). A run whose driver no longer
    holds its lease (Fenced, cape_ray/lease.py) ends without writing and without a restart."""
    timeline = Timeline()  # where this start's seconds go (timeline.py)
    config_dict = dict(config_dict)
    fence = Fence.from_dict(config_dict.pop(FENCE_KEY, None))  # the driver's lease claim (job.py)
    config = TrainConfig.from_dict(config_dict)
    edge = edge or RayEdge()
    timeline.mark("ray")
    deterministic = determinism.resolve(config.deterministic, edge.device)
    try:
        # Before the loop's first CUDA work: cuBLAS and cuDNN read these settings when they first run.
        with determinism.algorithms(deterministic):
            train(config, edge, deterministic, fence, timeline)
    except Fenced as failure:
        edge.stop(failure)


def train(config: TrainConfig, edge: "RayEdge", deterministic: bool, fence: Optional[Fence] = None,
          timeline: Optional[Timeline] = None) -> None:
    timeline = timeline or Timeline()
    rank, world_size, device = edge.rank, edge.world_size, edge.device
    torch.set_num_threads(config.num_threads)  # the thread count changes float rounding: fix it

    # ---- setup. Episodes are pure functions of (seed, epoch, index): global RNG never touches data.
    train_split = load_split(config, "train", config.num_queries_per_episode)
    val_split = load_split(config, "val", config.val_queries_per_episode)
    val_episodes = shard(EpisodeSampler(val_split, config.num_shots, config.val_queries_per_episode,
                                        seed=config.data_seed).fixed_episodes(config.val_episodes), rank, world_size)
    timeline.mark("data")
    rng.seed_everything(config.seed)  # the same initial weights on every rank ...
    model = build_model(config)  # the model is whatever model/api.py's spec builds
    timeline.mark("model")
    determinism.prepare_model(model, deterministic and device.type == "cuda")
    rng.seed_everything(rng.derived_seed(config.seed, rank))  # ... then a dropout stream per rank
    checkpointer = Checkpointer(config, fs=edge.fs, run_dir=edge.run_dir, latest=edge.latest,
                                registered=edge.registered, rank=rank, world_size=world_size,
                                report=edge.report, gather=edge.gather, all_reduce=edge.all_reduce,
                                broadcast=edge.broadcast, committed=edge.committed, fence=fence)

    # ---- restore: Ray's latest (a restart or a rerun) or --resume; model, optimizer, state, RNG last
    restored = checkpointer.restore()
    notes = []
    if restored is None and config.pretrained:  # a fresh run starts from the pretrained backbone
        notes.append(load_pretrained(model, config.pretrained, config.backbone or "").line())
    layout = restored.layout if restored else plan_layout(config, world_size, None)
    run = config.replace(accumulation_steps=layout.accumulation_steps)  # the layout this world size trains
    model = edge.prepare_model(model.to(device))
    optimizer = engine.build_optimizer(engine.unwrap(model), config)
    steps_per_epoch = run.steps_per_epoch_at(world_size)
    schedule = engine.LrSchedule.for_config(optimizer, config, steps_per_epoch)
    amp = engine.MixedPrecision(config.precision, device.type)
    state = TrainState.fresh(config, world_size, device=device.type, deterministic=deterministic,
                             episodes_per_step=layout.episodes_per_step)
    state.model = describe(engine.unwrap(model), model_spec(config))
    resumed = (checkpointer.load_into(restored, state, engine.unwrap(model), optimizer, schedule, amp)
               if restored else Resumed())
    position = state.position
    trained_per_epoch = steps_per_epoch * position.episodes_per_step  # episodes an epoch trains
    timeline.mark("restored")

    def set_lr() -> None:  # the LR is a function of the position (engine.LrSchedule)
        schedule.set_position(position.epoch, position.episode, trained_per_epoch)

    set_lr()
    console = Console(run, rank, steps_per_epoch, write=edge.say, progress=edge.progress)
    console.startup(restored, state, resumed, checkpointer.tidy(state, restored), world_size,
                    notes + ([resumed.schedule_note] if resumed.schedule_note else []))
    if state.tracking.early_stopping.should_stop:
        return

    # The training split moves to the device here, once; each epoch's episodes are planned there.
    batches = TrainingBatches(train_split, run, rank, world_size, device)
    loss_sum = torch.tensor(resumed.loss_sum, dtype=torch.float64, device=device)  # this rank's, this epoch
    loss_count = resumed.loss_count
    seconds = {"train": 0.0, "checkpoint": 0.0}  # this attempt's totals (for the overhead benchmark)

    def save(name: str, metrics: dict[str, Any], wait: bool = False) -> None:
        started = time.perf_counter()  # what training waits for: the background writer does the rest
        running = {"loss_sum": float(loss_sum), "loss_count": loss_count}
        state.grad_scaler = amp.state_dict()
        checkpointer.save(name, state, engine.unwrap(model), optimizer, schedule, running, metrics, wait=wait)
        seconds["checkpoint"] += time.perf_counter() - started

    def save_mid_epoch(epoch: int, reason: str) -> None:
        save(checkpointer.unique_name(ckpt.checkpoint_name(run, epoch + 1, position.step)), {
            "epoch": epoch + 1, "step": position.step, "global_step": position.global_step, "validated": 0,
            "reason": reason, "lr": float(schedule.get_last_lr()[0]),
            "train_loss": float(loss_sum) / max(1, loss_count), RETENTION_KEY: UNVALIDATED_SCORE},
             wait=reason == "preemption")  # the node may be gone before a background write ends

    saved_for_notice = False  # a just-in-time checkpoint was written for the preemption notice in force
    for epoch in range(position.epoch, config.epochs):
        # ---- training steps
        model.train()
        epoch_start, epoch_train_seconds, first_step = time.perf_counter(), 0.0, position.step
        console.start_epoch(epoch, position.step)
        while position.episode + position.episodes_per_step <= config.episodes_per_epoch:
            step_start = time.perf_counter()
            losses = engine.train_step(model, optimizer, None, batches.step(epoch, position.episode),
                                       config.grad_clip, amp)
            loss_sum += losses.double().sum()
            loss_count += len(losses)
            timeline.finish(rank, restored.name if restored else None)
            epoch_train_seconds += time.perf_counter() - step_start
            position.step, position.global_step = position.step + 1, position.global_step + 1
            position.episode += position.episodes_per_step
            set_lr()
            console.step(epoch, position.step, losses)

            steps_left = position.episode + position.episodes_per_step <= config.episodes_per_epoch
            every = config.checkpoint_every_steps
            # A checkpoint stored in the background is reported at the first step boundary after its
            # store ends (a collective while one is in flight; nothing otherwise).
            checkpointer.poll()
            if steps_left and every and position.global_step % every == 0:
                save_mid_epoch(epoch, "scheduled")
            elif config.preemption_check_steps and position.global_step % config.preemption_check_steps == 0:
                # A collective: every rank asks at the same steps. On a notice, save once right away;
                # the restart after the node goes away counts against max_preemption_failures. A
                # notice that is withdrawn (the node stays) re-arms the just-in-time save.
                notice = edge.preemption_notice()
                if notice is not None and not saved_for_notice and steps_left:
                    console.say(f"preemption notice for ranks {notice.preempted_ranks} (deadline "
                                f"{notice.deadline_ms} ms): writing a just-in-time checkpoint")
                    save_mid_epoch(epoch, "preemption")
                saved_for_notice = notice is not None  # saved now, before, or the epoch's end is next
        seconds["train"] += epoch_train_seconds

        # ---- validation over every rank's share of the fixed episodes, then tracking
        val_sums = engine.evaluate_episodes(engine.unwrap(model), val_split, val_episodes, config.batch_size,
                                            with_loss=True, amp=amp)
        val = engine.summarize(edge.all_reduce(engine.total_sums(val_sums)))
        train = edge.all_reduce({"sum": float(loss_sum), "count": float(loss_count)})
        metrics = {"epoch": epoch + 1, "step": position.step, "global_step": position.global_step, "validated": 1,
                   "train_loss": train["sum"] / max(1.0, train["count"]), **val,
                   "lr": float(schedule.get_last_lr()[0])}
        name = checkpointer.unique_name(ckpt.checkpoint_name(run, epoch + 1))
        update = state.tracking.update(metrics, epoch + 1, checkpoint=name,
                                       export_name=lambda metric: ckpt.best_export_name(metric, epoch + 1, metrics))
        metrics.update(state.tracking.report_fields(update))
        metrics[RETENTION_KEY] = retention_score(config, epoch + 1, True, update.selection_pck)
        # The history records what is deterministic; wall-clock figures (*_s) differ across runs.
        state.history.append(dict(metrics))
        epoch_seconds = time.perf_counter() - epoch_start
        metrics.update({"epoch_time_s": epoch_seconds, "train_time_total_s": seconds["train"],
                        "checkpoint_time_total_s": seconds["checkpoint"],
                        "step_time_s": epoch_train_seconds / max(1, position.step - first_step)})

        # ---- the epoch's checkpoint
        position.epoch, position.step, position.episode = epoch + 1, 0, 0
        loss_sum.zero_()
        loss_count = 0
        save(name, metrics)
        console.end_epoch(metrics, metrics["step"] - first_step, epoch_train_seconds, epoch_seconds, name, state,
                          update.new_best)
        if update.stop:
            console.say(f"early stopping at epoch {epoch + 1}: no val_pck improvement > "
                        f"{config.early_stopping_min_delta} for {config.early_stopping_patience} epochs")
            break
    checkpointer.finish()  # the exports that the last bests replaced go once Ray committed them


# ----------------------------------------------------------------------------- Ray at the edge
class RayEdge:
    """Everything the loop needs from Ray Train, in one place: rank and device, the run directory
    on its storage filesystem, the latest and the registered checkpoints, reporting, collectives
    and preemption notices."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch
        from ray.train import CheckpointConsistencyMode

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        storage = context.get_storage()
        self.fs, self.run_dir = storage.storage_filesystem, storage.experiment_fs_path
        latest = ray.train.get_checkpoint()
        self.latest = latest.path if latest is not None else None
        # The driver's console relay (console.py): lines and warnings are printed there, once.
        self.relay = relay = find_relay(context.get_experiment_name())
        self.say = (lambda text: relay.write.remote(text)) if relay else None
        self.progress = (lambda bar: relay.progress.remote(bar)) if relay else None
        if relay is not None and not any(isinstance(h, RelayLogHandler) for h in log.handlers):
            log.addHandler(RelayLogHandler(self.say))
        self.registered = self.committed()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        # Gradients live in DDP's all-reduce buckets: no copy into them and back every step (two
        # passes over 360 MB at ViT-B), and no second copy of the gradients in memory.
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"gradient_as_bucket_view": True})

    def report(self, metrics: dict, stored: Optional[str], name: str) -> None:
        """Register the checkpoint the Checkpointer already stored at `stored` (rank 0)."""
        import ray.train
        from ray.train import CheckpointUploadMode

        checkpoint = ray.train.Checkpoint(path=stored, filesystem=self.fs) if stored else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name,
                         checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)

    def stop(self, failure: Exception) -> None:
        """End this worker's training without a failure Ray would retry: the driver's console
        relay carries the message, and the driver exits with it. Without a relay (the train
        function run some other way), the failure is raised as it is."""
        if self.relay is None:
            raise failure
        if self.rank == 0:
            import ray

            ray.get(self.relay.fail.remote(str(failure)))

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` (picklable) on every rank."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.device if dist.get_backend() == "nccl" else None)
        return box[0]

    def committed(self) -> set[str]:
        """Names of the checkpoints Ray has registered, once the controller has processed every
        report this worker made (Ray waits for them)."""
        import ray.train
        from ray.train import CheckpointConsistencyMode

        reported = ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
        return {r.checkpoint.path.rstrip("/").rsplit("/", 1)[-1] for r in reported}

    def gather(self, blob: bytes) -> dict[int, bytes]:
        """Every rank's blob on rank 0 ({} on the others)."""
        if self.world_size == 1:
            return {0: blob}
        import torch.distributed as dist

        gathered: list[Optional[bytes]] = [None] * self.world_size
        dist.all_gather_object(gathered, blob)
        return dict(enumerate(gathered)) if self.rank == 0 else {}

    def all_reduce(self, values: dict[str, float]) -> dict[str, float]:
        """Sum floats over ranks (float64, fixed key order) so every rank holds the same numbers."""
        keys = sorted(values)
        tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        if self.world_size > 1:
            import torch.distributed as dist

            if dist.get_backend() == "nccl":
                tensor = tensor.to(self.device)
            dist.all_reduce(tensor)
        return dict(zip(keys, tensor.cpu().tolist()))

    def preemption_notice(self):
        import ray.train

        return ray.train.get_preemption_info()
