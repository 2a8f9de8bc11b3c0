"""Checkpointer: the one owner of checkpoint state, from saving to restoring.

save     every rank hands in its own state (RNG, running train loss); rank 0 gathers them, stages
         the checkpoint directory (manifest last, see checkpoint.py), stores it, makes the best
         exports it earned, and only then is it reported to Ray.
restore  rank 0 chooses: Ray's latest checkpoint (a worker restart or a driver rerun) or else
         --resume; verified; if it is damaged, a loud fall-back to the newest valid checkpoint before
         it. Every rank then loads that one and verifies it itself (a rank that cannot read it fails
         the attempt, and Ray starts it again): the ranks never diverge. The flags are compared with
         the checkpoint's (identity.py), the layout in force is kept (plan_layout), and model,
         optimizer, LR schedule, TrainState and this rank's RNG (last) are loaded.
tidy     rank 0, at every start: remove orphans (checkpoints written but never registered, past the
         restore point) and bring the best exports in line with the restored tracking.

Ray stays at the edge: the checkpointer is handed the storage filesystem and run directory, the
latest checkpoint's path, the registered checkpoint names, and `report` / `gather` / `all_reduce` /
`broadcast` / `committed` functions, so all of it runs (and is tested) without Ray.

Storage failures. A store that fails (an S3 503, an NFS EIO, a full disk) is retried with doubling
waits (--storage_retries); a failure that outlasts them is agreed by every rank before any report
and raised as StorageError, which Ray's restart budget (--max_failures) then retries from the last
stored checkpoint. Only a failure that persists across the budget ends the run, with one line
(job.py). The free space of a local or NFS storage path is checked before each upload.

Best exports. Ray keeps checkpoints by one score, so the best by each --best_metrics entry is copied
to its export name (checkpoint_best_pck_..., checkpoint_best_loss_...). The copy is complete before
its checkpoint is reported, so retention (which only deletes registered checkpoints) never deletes
a checkpoint whose export is still to be made, and no export ever needs its checkpoint again: an
export is itself a verified checkpoint. The export it replaces is deleted only once Ray has
committed the new checkpoint (`committed`, checked before the next save and at the end): a crash at
any point of that sequence restores a checkpoint whose own exports still exist, and the start-up
tidy deletes the exports its tracking does not name.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import pyarrow.fs as pafs
import torch

from cape_ray import checkpoint as ckpt, identity, rng, storage
from cape_ray.config import TrainConfig
from cape_ray.lease import Fence, Fenced
from cape_ray.state import TrainState
from cape_ray.tracking import BestTracker

log = logging.getLogger("cape_ray")

# Checkpoints written mid-epoch have no fresh validation: this retention score is below any real
# PCK, so Ray's top-K retention never keeps one in place of a validated checkpoint.
UNVALIDATED_SCORE = -1.0
# Every --keep_every-th epoch scores above any PCK, so retention keeps it (see retention_slots).
KEEP_EVERY_SCORE = 1e6
RETENTION_KEY = "retention_score"
# The first wait after a failed store; each retry doubles it (2, 4, 8, 16, 32 s: about a minute).
RETRY_WAIT_ENV, DEFAULT_RETRY_WAIT_S = "CAPE_STORAGE_RETRY_WAIT_S", 2.0

ReportFn = Callable[[dict, Optional[str], str], None]  # (metrics, stored checkpoint path or None, name)
GatherFn = Callable[[bytes], dict]  # this rank's blob -> {rank: blob} on rank 0 ({} elsewhere)
AllReduceFn = Callable[[dict], dict]  # {key: float} -> the sums over ranks
BroadcastFn = Callable[[Any], Any]  # rank 0's (picklable) object -> the same object on every rank
CommittedFn = Callable[[], set]  # names of the checkpoints Ray has registered (waits for pending reports)


def retention_slots(config: TrainConfig) -> Optional[int]:
    """Ray's num_to_keep: None keeps everything (--keep 0); with --keep_every N, the every-N-th
    epochs get slots of their own on top of the top --keep (they score above any PCK). Until they
    all exist, their unused slots keep a few more of the best: disk use never exceeds the final one."""
    if config.keep == 0:
        return None
    return config.keep + (config.epochs // config.keep_every if config.keep_every else 0)


def retention_score(config: TrainConfig, epoch: int, validated: bool, selection_pck: float) -> float:
    if not validated:
        return UNVALIDATED_SCORE
    if config.keep_every and epoch % config.keep_every == 0:
        return KEEP_EVERY_SCORE + epoch
    return float(selection_pck)


@dataclass(frozen=True)
class Layout:
    """How this world size trains the run's episodes per optimizer step (its effective batch)."""

    accumulation_steps: int
    episodes_per_step: int
    note: Optional[str] = None


@dataclass
class Restored:
    checkpoint: ckpt.LoadedCheckpoint
    name: str
    source: str  # "ray" (a restart or a driver rerun) or "--resume"
    layout: Layout
    comparison: identity.Comparison  # the flags against the checkpoint's
    fell_back_from: Optional[str] = None  # a damaged latest that was skipped
    resume_ignored: Optional[str] = None  # a --resume PATH that the run's own latest took precedence over
    source_run: Optional[str] = None  # --resume of another run: its run directory on --resume's filesystem

    @property
    def saved_world_size(self) -> int:
        return int(self.checkpoint.state["world_size"])

    @property
    def layout_note(self) -> Optional[str]:
        return self.layout.note


@dataclass
class Resumed:
    """What `load_into` restored on this rank."""

    loss_sum: float = 0.0  # this rank's running train loss of the epoch
    loss_count: int = 0
    rng: Optional[rng.RestoredRng] = None  # None when re-seeded (another world size)
    reseeded: str = ""
    schedule_note: str = ""  # how the LR schedule continues when --epochs changed


@dataclass
class TidyReport:
    removed_orphans: list[str] = field(default_factory=list)
    stray: list[str] = field(default_factory=list)
    exported: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def plan_layout(config: TrainConfig, world_size: int, saved_state: Optional[dict],
                comparison: Optional[identity.Comparison] = None) -> Layout:
    """Accumulation steps for this world size that keep the run's episodes per optimizer step.

    The layout in force is part of the training state (the checkpoint's episodes_per_step): every
    restart and rerun keeps it, whatever --accumulation_steps and --num_workers say, until a forced
    change of --batch_size or --accumulation_steps (--force) makes the flags the new layout. When
    the episodes per step cannot be kept at this world size, they change and the note says so.
    """
    configured = config.batch_size * config.accumulation_steps * world_size
    forced = comparison is not None and any(d.field in ("batch_size", "accumulation_steps") for d in comparison.math)
    if saved_state is None or forced:
        return Layout(config.accumulation_steps, configured)
    wanted = int(saved_state["position"]["episodes_per_step"])
    per_micro = config.batch_size * world_size
    accumulation = wanted // per_micro if wanted % per_micro == 0 else max(1, round(wanted / per_micro))
    episodes = accumulation * per_micro
    was = f"world size {saved_state['world_size']} -> {world_size}: "
    if episodes != wanted:
        note = (f"{was}the run's {wanted} episodes per step cannot be kept with batch_size {config.batch_size}; now "
                f"{episodes} (accumulation_steps {accumulation}); the LR schedule follows the episode count")
    elif accumulation != config.accumulation_steps:
        note = (f"{was}accumulation_steps {accumulation} (the flag says {config.accumulation_steps}) keeps the "
                f"run's {wanted} episodes per step")
    else:
        note = None
    return Layout(accumulation, episodes, note)


def resolve_resume(uri: str, verify: bool = True) -> tuple[pafs.FileSystem, str]:
    """(filesystem, checkpoint path) of a --resume argument: a checkpoint directory, or a run
    directory, meaning its newest valid regular checkpoint. Raises CheckpointError saying why not.
    `verify=False` leaves verifying a given checkpoint directory to the caller."""
    fs, path = storage.resolve(uri)
    path = path.rstrip("/")
    if not storage.exists(fs, path):
        raise ckpt.CheckpointError(f"--resume {uri}: no such checkpoint or run directory")
    if storage.exists(fs, f"{path}/{ckpt.MANIFEST}") or storage.exists(fs, f"{path}/{ckpt.STATE}"):
        problems = storage.problems(fs, path) if verify else []
        if problems:
            raise ckpt.CheckpointError(f"--resume {uri} does not verify: {'; '.join(problems)}. Pass another "
                                       f"checkpoint, or the run directory to take its newest valid one.")
        return fs, path
    newest = storage.newest_valid_before(fs, path, None)
    if newest is None:
        raise ckpt.CheckpointError(f"--resume {uri}: neither a checkpoint (no {ckpt.MANIFEST}) nor a run directory "
                                   f"with a valid checkpoint_e* inside")
    return fs, f"{path}/{newest}"


@dataclass
class StoreResult:
    """What storing one checkpoint came to (rank 0)."""

    problem: Optional[str] = None  # why it could not be stored
    fenced: Optional[str] = None  # why the driver's lease forbade it
    replaced: list[str] = field(default_factory=list)  # the exports its new bests replace


@dataclass
class PendingReport:
    """A checkpoint handed to the writer and not reported yet (every rank holds one)."""

    name: str
    metrics: dict[str, Any]
    future: Optional[Future]  # rank 0: the writer's StoreResult; None on the other ranks


def snapshot(value: Any, reuse: Any = None, copy_cpu: bool = True) -> Any:
    """A copy of a state (nested dicts, lists, tensors) that training cannot change any more:
    tensors copied to the CPU (from a GPU into pinned memory), containers rebuilt. Checkpoints hold
    CPU tensors whatever the device trained on: they load anywhere, and the writer mode does not
    change what is stored.

    `reuse` is an earlier snapshot of the same state that nothing reads any more: a tensor of the
    same shape, dtype and strides is copied into, not allocated again. At ViT-B size that is the
    difference between a memory copy (about 0.07 s per GB here) and first touching 1 GB of fresh
    pages (about 0.4 s). Without `copy_cpu`, CPU tensors are taken as they are (a synchronous write,
    during which training waits).
    """
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.device.type == "cpu" and not copy_cpu:
            return value
        if (isinstance(reuse, torch.Tensor) and reuse.device.type == "cpu"
                and reuse.layout == value.layout == torch.strided and reuse.dtype == value.dtype
                and reuse.shape == value.shape and reuse.stride() == value.stride()):
            return reuse.copy_(value)
        if value.is_cuda and value.layout == torch.strided:
            pinned = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, pin_memory=True)
            return pinned.copy_(value)
        return value.to("cpu", copy=True)
    if isinstance(value, dict):
        earlier = reuse if isinstance(reuse, dict) else {}
        return {key: snapshot(item, earlier.get(key), copy_cpu) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        earlier = reuse if isinstance(reuse, (list, tuple)) and len(reuse) == len(value) else [None] * len(value)
        return type(value)(snapshot(item, old, copy_cpu) for item, old in zip(value, earlier))
    return copy.deepcopy(value)


class Checkpointer:
    def __init__(self, config: TrainConfig, *, fs: pafs.FileSystem, run_dir: str, latest: Optional[str],
                 registered: Iterable[str], rank: int, world_size: int, report: ReportFn, gather: GatherFn,
                 all_reduce: AllReduceFn, broadcast: Optional[BroadcastFn] = None,
                 committed: Optional[CommittedFn] = None, fence: Optional[Fence] = None):
        self.config = config
        self.fs, self.run_dir = fs, run_dir.rstrip("/")
        self.latest = latest.rstrip("/") if latest else None
        self.registered = set(registered)
        self.rank, self.world_size = rank, world_size
        self._report, self._gather, self._all_reduce = report, gather, all_reduce
        self._broadcast = broadcast or (lambda value: value)
        self._committed = committed or (lambda: set(self.registered))
        # exports replaced by a new best: (export name, the checkpoint that replaced it); deleted
        # once Ray has committed that checkpoint
        self.stale_exports: list[tuple[str, str]] = []
        # rank 0's background writer (one thread: at most one checkpoint in flight) and the
        # checkpoint every rank will report once it is stored
        self.background = not config.sync_checkpoints  # the same on every rank: they report together
        self._writer = (ThreadPoolExecutor(1, thread_name_prefix="cape_ray_checkpoint")
                        if self.background and rank == 0 else None)
        self._pending: Optional[PendingReport] = None
        # the snapshot of the last checkpoint written in the background, copied into by the next
        # one (its write is over by then: one in flight); kept between checkpoints, dropped at the end
        self._spare: Any = None
        self.fence = fence  # the driver's lease claim: checked before every write (lease.py)

    # ------------------------------------------------------------------ restore
    def restore(self) -> Optional[Restored]:
        """The checkpoint to continue from, chosen by rank 0, verified and loaded by every rank;
        None for a fresh start.

        Ray's latest (a restart or a rerun) wins over --resume PATH. A latest that does not verify
        falls back, loudly, to the newest valid checkpoint before it; with none, this raises rather
        than silently starting from scratch.
        """
        with tempfile.TemporaryDirectory(prefix="cape_ray_restore_") as scratch:
            choice, local = self._choose(scratch) if self.rank == 0 else (None, None)
            choice = self._broadcast(choice)
            if choice is None:
                return None
            if local is None:  # ranks other than 0 read the checkpoint rank 0 chose, and check it themselves
                local = storage.download(self._source_fs(choice), choice["path"], f"{scratch}/chosen")
                problems = ckpt.verify_checkpoint(local)
                if problems:
                    raise ckpt.CheckpointError(
                        f"rank {self.rank}: checkpoint {choice['name']}, chosen by rank 0, does not verify here "
                        f"({'; '.join(problems)}); failing this attempt so that Ray starts it again")
            return self._loaded(local, choice)

    def _choose(self, scratch: str) -> tuple[Optional[dict], Optional[str]]:
        """Rank 0: (what to restore, its verified local copy) or (None, None)."""
        if self.latest is not None:
            name = self.latest.rsplit("/", 1)[-1]
            choice = {"source": "ray", "path": self.latest, "name": name, "resume_ignored": self.config.resume}
            local = storage.download(self.fs, self.latest, f"{scratch}/latest")
            problems = ckpt.verify_checkpoint(local)
            if not problems:
                return choice, local
            log.error("LATEST CHECKPOINT %s DOES NOT VERIFY: %s", self.latest, "; ".join(problems))
            fallback = storage.newest_valid_before(self.fs, self.run_dir, name)
            if fallback is None:
                raise ckpt.CheckpointError(
                    f"the latest checkpoint {self.latest} does not verify ({'; '.join(problems)}) and no earlier "
                    f"valid checkpoint exists in {self.run_dir}; refusing to start from scratch. Start a new "
                    f"run with another --name, or --resume a valid checkpoint.")
            log.error("FALLING BACK to the newest valid checkpoint: %s", fallback)
            path = f"{self.run_dir}/{fallback}"
            choice.update(path=path, name=fallback, fell_back_from=name)
            return choice, self._verified_copy(self.fs, path, f"{scratch}/fallback")
        if self.config.resume:
            fs, path = resolve_resume(self.config.resume, verify=False)
            choice = {"source": "--resume", "path": path, "name": path.rsplit("/", 1)[-1],
                      "source_run": path.rsplit("/", 1)[0]}
            return choice, self._verified_copy(fs, path, f"{scratch}/resume")
        return None, None

    def _source_fs(self, choice: dict) -> pafs.FileSystem:
        """The filesystem of a chosen checkpoint: the run's, or --resume's (paths are relative to it)."""
        return self.fs if choice["source"] == "ray" else storage.resolve(self.config.resume)[0]

    @staticmethod
    def _verified_copy(fs: pafs.FileSystem, path: str, local_dir: str) -> str:
        local = storage.download(fs, path, local_dir)
        problems = ckpt.verify_checkpoint(local)
        if problems:
            raise ckpt.CheckpointError(f"checkpoint {storage.display(path, fs)} does not verify: {'; '.join(problems)}")
        return local

    def _loaded(self, local: str, choice: dict) -> Restored:
        loaded = ckpt.load_checkpoint(local, verified=True)  # this rank verified this copy just now
        comparison = identity.compare(loaded.state["config"], loaded.state.get("model"), self.config)
        if comparison.changes_math and not self.config.force:
            raise ckpt.CheckpointError(comparison.refusal("these flags", choice["name"]))
        layout = plan_layout(self.config, self.world_size, loaded.state, comparison)
        source_run = choice.get("source_run")
        if source_run is not None and (source_run.rstrip("/") == self.run_dir
                                       and type(self._source_fs(choice)) is type(self.fs)):
            source_run = None  # --resume of this run's own checkpoint
        return Restored(loaded, choice["name"], choice["source"], layout, comparison,
                        fell_back_from=choice.get("fell_back_from"), resume_ignored=choice.get("resume_ignored"),
                        source_run=source_run)

    def load_into(self, restored: Restored, state: TrainState, model: torch.nn.Module,
                  optimizer: torch.optim.Optimizer, schedule: Any, amp: Any = None) -> Resumed:
        """Model, optimizer, LR schedule, TrainState, precision state and, last, this rank's RNG and
        running loss. Nothing may draw from the global generators between this and the first step."""
        loaded = restored.checkpoint
        ckpt.check_model_shapes(loaded.model, model.state_dict(), loaded.path)
        model.load_state_dict(loaded.model)
        optimizer.load_state_dict(loaded.optimizer)
        schedule.load_state_dict(loaded.scheduler)
        state.load_state_dict(loaded.state)
        if amp is not None:
            amp.load_state_dict(loaded.state.get("grad_scaler"))
        resumed = Resumed(schedule_note=self._continue_schedule(schedule, state))
        comparison = restored.comparison
        if comparison.math or comparison.other:
            state.config_changes.append(comparison.record(loaded.state["position"], forced=bool(comparison.math)))
        ranks = loaded.rank_states
        if restored.saved_world_size == self.world_size and self.rank in ranks:
            mine = ranks[self.rank]
            resumed.rng = rng.restore(mine, cuda_fallback_seed=rng.derived_seed(
                self.config.seed, state.position.global_step, self.rank))
            resumed.loss_sum, resumed.loss_count = float(mine["loss_sum"]), int(mine["loss_count"])
            return resumed
        # Per-rank generators cannot be mapped onto other ranks: re-seed deterministically. The
        # epoch's train-loss mean only needs the totals, which rank 0 carries on.
        rng.seed_everything(rng.derived_seed(self.config.seed, state.position.global_step, self.rank))
        resumed.reseeded = (f"RNG RE-SEEDED deterministically: the checkpoint has {restored.saved_world_size} "
                            f"rank(s), this run has {self.world_size}")
        if self.rank == 0:
            resumed.loss_sum = sum(float(r["loss_sum"]) for r in ranks.values())
            resumed.loss_count = sum(int(r["loss_count"]) for r in ranks.values())
        return resumed

    def _continue_schedule(self, schedule: Any, state: TrainState) -> str:
        """--epochs differs from the epochs the LR schedule was planned for: keep the plan (the new
        epochs train at the floor LR) or re-plan it (--lr_schedule extend); say which."""
        planned, wanted = schedule.epochs, self.config.epochs
        if planned == wanted:
            return ""
        before = schedule.get_last_lr()[0]
        if self.config.lr_schedule == "extend":
            schedule.replan(wanted)
            state.config_changes.append({"at": {"epoch": state.position.epoch, "step": state.position.step,
                                                "global_step": state.position.global_step},
                                         "forced": False, "fields": {"lr_schedule_epochs": [planned, wanted]}})
            return (f"LR schedule re-planned for {wanted} epochs (--lr_schedule extend; it was planned for {planned}): "
                    f"the LR continues on the {wanted}-epoch cosine, now {schedule.get_last_lr()[0]:.2e} "
                    f"(was {before:.2e})")
        if wanted > planned:
            floor = schedule.base_lrs[0] * schedule.min_lr_ratio
            return (f"--epochs {wanted} extends a run whose LR schedule was planned for {planned} epochs; with "
                    f"--lr_schedule keep (the default) epochs {planned + 1}-{wanted} train at the floor LR "
                    f"{floor:.2e}. Pass --lr_schedule extend to re-plan the cosine over {wanted} epochs.")
        return (f"--epochs {wanted} ends the run before its LR schedule (planned for {planned} epochs) reaches its "
                f"floor (--lr_schedule keep); --lr_schedule extend re-plans it for {wanted} epochs")

    # ------------------------------------------------------------------ tidy (rank 0, at start)
    def tidy(self, state: TrainState, restored: Optional[Restored]) -> TidyReport:
        """Remove orphans past the restore point; reconcile the best exports with `state.tracking`
        (for --resume of another run: bring that run's exports of the restored bests here)."""
        self._stop_if_fenced(self.rank == 0 and self._fence_problem(), "nothing tidied")
        report = TidyReport()
        if self.rank != 0:
            return report
        after = None
        if restored is not None:
            position = state.position
            after = ckpt.position_from_name(ckpt.checkpoint_name(
                state.config, position.epoch + position.mid_epoch, position.step or None))
            if restored.source_run is not None:
                report.exported += self._import_exports(restored, state)
        report.removed_orphans, report.stray = self.clean_orphans(after)
        exported, report.problems = sync_exports(self.fs, self.run_dir, wanted_exports(state.tracking.best.values()),
                                                 verify_existing=True)
        report.exported += exported
        return report

    def _import_exports(self, restored: Restored, state: TrainState) -> list[str]:
        """--resume from another run keeps that run's bests; their exports come along (copied from
        the other run directory: the export, or else the checkpoint that holds the best), so that
        the new run holds every best it tracks. A best whose weights are in neither starts afresh,
        loudly."""
        source_fs, source_dir = storage.resolve(self.config.resume)[0], restored.source_run
        copied = []
        for tracker in state.tracking.best.values():
            if not tracker.export:
                continue
            target = f"{self.run_dir}/{tracker.export}"
            if storage.exists(self.fs, target) and not storage.problems(self.fs, target):
                continue
            for name in (tracker.export, tracker.checkpoint):
                source = f"{source_dir}/{name}"
                if name and storage.exists(source_fs, source) and not storage.problems(source_fs, source):
                    storage.delete_dir(self.fs, target)
                    storage.copy_between(source_fs, source, self.fs, target)
                    copied.append(tracker.export)
                    break
            else:
                log.warning("--resume: the best-by-%s checkpoint (%s, exported as %s) is not in %s; this run "
                            "tracks that best afresh", tracker.metric, tracker.checkpoint, tracker.export, source_dir)
                tracker.reset()
        return copied

    def clean_orphans(self, after: Optional[tuple[int, int]]) -> tuple[list[str], list[str]]:
        """Checkpoint directories written but never registered by Ray (a report lost in a crash).

        Those past the restore point are deleted: training is about to redo them under the same
        names. Others are only reported. Returns (removed, reported).
        """
        removed, reported = [], []
        for name in storage.list_dirs(self.fs, self.run_dir):
            position = ckpt.position_from_name(name)
            if name in self.registered or position is None:
                continue
            if after is not None and position > after:
                storage.delete_dir(self.fs, f"{self.run_dir}/{name}")
                removed.append(name)
            else:
                reported.append(name)
        return removed, reported

    # ------------------------------------------------------------------ save
    def unique_name(self, name: str) -> str:
        """A registered name is never reused (it can make Ray delete the newest checkpoint); that
        only happens after falling back from a damaged latest, whose name stays registered."""
        while name in self.registered:
            name += "_redo"
        return name

    def save(self, name: str, state: TrainState, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: Any, running: dict[str, Any], metrics: dict[str, Any], wait: bool = False) -> None:
        """Write this position as checkpoint `name`; it is reported to Ray once it is stored (every
        rank calls this at the same point: it gathers every rank's state).

        Rank 0 writes the checkpoint (manifest last), checks the storage has room for it and the
        exports it earned, uploads it and makes those exports, retrying a failed store; Ray then
        registers it without uploading again. With the background writer (the default) the
        training thread pays only for a copy of the state in memory (into the previous checkpoint's
        copy, kept for that); writing, hashing and storing run in one background thread, at most one
        checkpoint in flight (this call first commits the previous one). The report follows at the
        next `poll` that finds the store done, or at the next save, `flush` or `finish`; `wait` (a
        just-in-time checkpoint before a preemption), or --sync_checkpoints, commits it before
        returning. Whether the store worked is agreed by every
        rank before the report, so that a storage failure stops all of them with StorageError (a
        worker failure Ray retries) instead of leaving the others waiting in the report.
        """
        blobs = self._gather(ckpt.serialize({**rng.capture(), **running}))
        self.flush()  # at most one checkpoint in flight
        future = None
        if self.rank == 0:
            earned = [t for t in state.tracking.best.values() if t.checkpoint == name]
            parts = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                         state=state.state_dict(metrics), rank_states=blobs)
            if self._writer is not None:
                self._spare = snapshot(parts, self._spare)  # the previous write is over: flushed above
                future = self._writer.submit(self._write_and_store, name, self._spare, earned)
            else:
                future = Future()
                future.set_result(self._write_and_store(name, snapshot(parts, copy_cpu=False), earned))
        self._pending = PendingReport(name, metrics, future)
        if not self.background or wait:
            self.flush()

    def poll(self) -> None:
        """Report the checkpoint in flight if its store has finished (every rank, at the same step:
        rank 0's writer decides, through a collective)."""
        if self._pending is None:
            return
        done = self.rank == 0 and self._pending.future.done()
        if self._all_reduce({"stored": float(done)})["stored"]:
            self._commit()

    def flush(self) -> None:
        """Wait for the checkpoint in flight, then report it (every rank)."""
        if self._pending is not None:
            self._commit()

    def _commit(self) -> None:
        pending, self._pending = self._pending, None
        result = pending.future.result() if self.rank == 0 else StoreResult()
        self._stop_if_fenced(result.fenced, f"checkpoint {pending.name} not stored")
        if self._all_reduce({"storage_failed": float(result.problem is not None)})["storage_failed"]:
            raise ckpt.StorageError(result.problem or f"rank 0 could not store checkpoint {pending.name} (see its "
                                                      f"message)")
        if self.rank == 0:
            self.delete_stale_exports(wait=False)  # those whose replacement Ray has committed since
            self.stale_exports += [(old, pending.name) for old in result.replaced]
        self._report(pending.metrics, f"{self.run_dir}/{pending.name}" if self.rank == 0 else None, pending.name)
        self.registered.add(pending.name)

    def _write_and_store(self, name: str, parts: dict[str, Any], earned: list[BestTracker]) -> "StoreResult":
        """Rank 0 (the writer thread, or the training thread with --sync_checkpoints): write the
        checkpoint to a staging directory, then store it and the exports it earned."""
        staging = tempfile.mkdtemp(prefix="cape_ray_ckpt_")
        try:
            # staging is not kept: the upload makes the stored copy durable (fsync), not this one
            ckpt.write_checkpoint(staging, **parts, durable=False)
            problem, fenced = self._store_with_retries(staging, f"{self.run_dir}/{name}", wanted_exports(earned))
            replaced = self._replaced_exports(earned) if problem is None and not fenced else []
            return StoreResult(problem, fenced, replaced)
        except OSError as exc:  # the local staging directory (TMPDIR) is full or unwritable
            return StoreResult(f"cannot stage checkpoint {name} in {tempfile.gettempdir()}: {exc}. Free space there "
                               f"or set TMPDIR to a larger disk; then rerun the same command.")
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def finish(self) -> None:
        """At the end of training: report the checkpoint in flight, and once Ray has committed the
        last report, delete the exports that the run's last bests replaced."""
        self.flush()
        self._spare = None
        if self.rank == 0 and not self._fence_problem():
            self.delete_stale_exports(wait=True)

    def delete_stale_exports(self, wait: bool) -> None:
        """Delete the replaced exports whose replacing checkpoint Ray has committed. `committed`
        waits for the reports still pending; without `wait`, only when some are stale at all."""
        if not self.stale_exports:
            return
        committed = self._committed()
        keep = []
        for export, replaced_by in self.stale_exports:
            if replaced_by in committed:
                storage.delete_dir_quietly(self.fs, f"{self.run_dir}/{export}")
            else:
                keep.append((export, replaced_by))
        self.stale_exports = keep

    def _replaced_exports(self, earned: list[BestTracker]) -> list[str]:
        """The existing exports of the metrics that just got a new best (all but the new one)."""
        existing = storage.list_dirs(self.fs, self.run_dir, "checkpoint_best_")
        return [old for tracker in earned for old in existing
                if old != tracker.export and ckpt.is_export_of(old, tracker.metric)]

    def _store_with_retries(self, staging: str, target: str, exports: list["Export"]
                            ) -> tuple[Optional[str], Optional[str]]:
        """`_store`, retried with doubling waits while it fails, the lease's fence checked before
        every attempt (a write of run state). -> (the last failure's message, the fence's problem)."""
        wait = float(os.environ.get(RETRY_WAIT_ENV, DEFAULT_RETRY_WAIT_S))
        for attempt in range(self.config.storage_retries + 1):
            fenced = self._fence_problem()
            if fenced:
                return None, fenced
            problem = self._store(staging, target, exports)
            if problem is None:
                if attempt:
                    log.warning("checkpoint %s stored on attempt %d", target.rsplit("/", 1)[-1], attempt + 1)
                return None, None
            if attempt < self.config.storage_retries:
                log.warning("storing checkpoint failed (attempt %d of %d), retrying in %.0f s: %s", attempt + 1,
                            self.config.storage_retries + 1, wait, problem)
                time.sleep(wait)
                wait *= 2
        return problem, None

    # ------------------------------------------------------------------ the lease's fence (lease.py)
    def _fence_problem(self) -> Optional[str]:
        return self.fence.problem(self.fs, self.run_dir) if self.fence is not None else None

    def _stop_if_fenced(self, problem: Optional[str], what: str) -> None:
        """Every rank raises Fenced when rank 0 found the driver's claim no longer live (a collective)."""
        if self.fence is not None and self._all_reduce({"fenced": float(bool(problem))})["fenced"]:
            raise Fenced(f"{what}: {problem or 'rank 0 found the driver lease no longer live'}; this run stops here "
                         f"without writing (rerun the same command to resume if no other driver trains it)")

    def _store(self, staging: str, target: str, exports: list["Export"]) -> Optional[str]:
        """Upload `staging` to `target`, then copy it to the exports it earned; the reason it cannot
        be stored, or None."""
        size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(staging) for f in files)
        needed = size * (1 + len(exports)) + ckpt.DISK_MARGIN_BYTES  # the checkpoint and its new best exports
        free = storage.free_bytes(self.fs, self.run_dir)
        if free is not None and free < needed:
            return (f"not enough space to store checkpoint {target}: needs {needed} bytes (the checkpoint"
                    f"{f' and {len(exports)} best export(s)' if exports else ''}), {free} bytes free. Free space "
                    f"there (no checkpoint was deleted) and rerun the same command: it resumes from the last stored "
                    f"checkpoint.")
        try:
            # An unregistered leftover of the same name (a lost report) is cleared first, so that no
            # stale file survives in it.
            storage.delete_dir(self.fs, target)
            storage.upload_checkpoint(staging, self.fs, target)
            _, problems = sync_exports(self.fs, self.run_dir, exports, refresh=True, delete_others=False)
        except OSError as exc:  # permission, quota, a disk that filled up meanwhile, a network error
            storage.delete_dir_quietly(self.fs, target)
            return (f"cannot store checkpoint {storage.display(target, self.fs)} ({needed} bytes with its exports): "
                    f"{str(exc).splitlines()[0]}. Fix the storage (space, permissions, quota) and rerun the same "
                    f"command: it resumes from the last stored checkpoint.")
        return "; ".join(problems) or None


# ---------------------------------------------------------------------------- best exports
@dataclass(frozen=True)
class Export:
    """The best checkpoint by `metric` should be exported as `name`, copied from `checkpoint`."""

    metric: str
    name: str
    checkpoint: Optional[str]


def wanted_exports(trackers: Iterable[BestTracker]) -> list[Export]:
    return [Export(t.metric, t.export, t.checkpoint) for t in trackers if t.export]


def sync_exports(fs: pafs.FileSystem, run_dir: str, exports: Iterable[Export], verify_existing: bool = False,
                 refresh: bool = False, delete_others: bool = True) -> tuple[list[str], list[str]]:
    """Make each export exist (a copy of its checkpoint, manifest last), then (`delete_others`)
    delete that metric's other exports, only once the wanted one is complete. An export already
    there counts when it has its manifest (and, with `verify_existing`, every file it lists at its
    size: the check at every start, which reads only manifest.json, not the export), or is copied
    again regardless (`refresh`: its checkpoint was just written). Returns (exports written,
    problems). An export that cannot be made (its checkpoint is gone) leaves the existing ones."""
    run_dir = run_dir.rstrip("/")
    existing = storage.list_dirs(fs, run_dir, "checkpoint_best_")
    written, problems = [], []
    for export in exports:
        target = f"{run_dir}/{export.name}"
        complete = (export.name in existing and not refresh and storage.exists(fs, f"{target}/{ckpt.MANIFEST}")
                    and not (verify_existing and storage.size_problems(fs, target)))
        if not complete:
            source = f"{run_dir}/{export.checkpoint}"
            # a checkpoint just stored (`refresh`) was verified as it was written: not read again
            if export.checkpoint is None or (not refresh and storage.problems(fs, source)):
                problems.append(f"best-by-{export.metric} export {export.name} cannot be made: its checkpoint "
                                f"{export.checkpoint} is missing or damaged")
                continue
            storage.delete_dir(fs, target)  # a partial copy from an interrupted export
            storage.copy_checkpoint(fs, source, target)
            written.append(export.name)
        if delete_others:
            for old in existing:
                if old != export.name and ckpt.is_export_of(old, export.metric):
                    storage.delete_dir(fs, f"{run_dir}/{old}")
    return written, problems
