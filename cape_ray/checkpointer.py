"""Checkpointer: the one owner of checkpoint state, from saving to restoring.

save     every rank hands in its own state (RNG, running train loss); rank 0 gathers them, stages
         the checkpoint directory (manifest last, see checkpoint.py), stores it, makes the best
         exports it earned, and only then is it reported to Ray.
restore  Ray's latest checkpoint (a worker restart or a driver rerun) or else --resume; verify it;
         if it is damaged, fall back loudly to the newest valid checkpoint before it; load it; plan
         the accumulation for this world size; then load model, optimizer, scheduler, TrainState and
         this rank's RNG (last).
tidy     rank 0, at every start: remove orphans (checkpoints written but never registered, past the
         restore point) and bring the best exports in line with the restored tracking.

Ray stays at the edge: the checkpointer is handed the storage filesystem and run directory, the
latest checkpoint's path, the registered checkpoint names, and `report` / `gather` / `all_reduce`
functions, so all of it runs (and is tested) without Ray.

Storage failures (no space, no permission, a quota) would repeat on every restart, so they stop the
run with one message instead (StorageError, see save): the free space of a local or NFS storage path
is checked before each upload, and the upload is made here, so that its failure is known to every
rank before Ray is told of the checkpoint.

Best exports. Ray keeps checkpoints by one score, so the best by each --best_metrics entry is copied
to its export name (checkpoint_best_pck_..., checkpoint_best_loss_...). The copy is made when the
checkpoint is stored, before Ray is told of it: retention can only delete a registered checkpoint,
so it never deletes one whose export is still to be made, and the storage check covers the exports
too. A crash between the export and Ray's registration leaves an export of a checkpoint Ray never
registered; the next start reconciles the exports with the restored tracking (`tidy`), and training
redoes that checkpoint (bitwise the same, so the same export). An old export is deleted only after
the new one is complete.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import pyarrow.fs as pafs
import torch

from cape_ray import checkpoint as ckpt, rng, storage
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

ReportFn = Callable[[dict, Optional[str], str], None]  # (metrics, stored checkpoint path or None, name)
GatherFn = Callable[[bytes], dict]  # this rank's blob -> {rank: blob} on rank 0 ({} elsewhere)
AllReduceFn = Callable[[dict], dict]  # {key: float} -> the sums over ranks


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


@dataclass
class Restored:
    checkpoint: ckpt.LoadedCheckpoint
    name: str
    source: str  # "ray" (a restart or a driver rerun) or "--resume"
    config: TrainConfig  # this run's config, accumulation planned for this world size
    fell_back_from: Optional[str] = None  # a damaged latest that was skipped
    resume_ignored: Optional[str] = None  # a --resume PATH that the run's own latest took precedence over
    layout_note: Optional[str] = None  # how a world-size change was handled

    @property
    def saved_world_size(self) -> int:
        return int(self.checkpoint.state["world_size"])


@dataclass
class Resumed:
    """What `load_into` restored on this rank."""

    loss_sum: float = 0.0  # this rank's running train loss of the epoch
    loss_count: int = 0
    rng: Optional[rng.RestoredRng] = None  # None when re-seeded (another world size)
    reseeded: str = ""


@dataclass
class TidyReport:
    removed_orphans: list[str] = field(default_factory=list)
    stray: list[str] = field(default_factory=list)
    exported: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def plan_layout(config: TrainConfig, world_size: int, saved_state: Optional[dict]) -> tuple[TrainConfig, Optional[str]]:
    """Accumulation steps for this world size, and a note when they differ from the flags.

    A run keeps its episodes per optimizer step (its effective batch) across world-size changes by
    adjusting accumulation; when that is impossible, the batch changes and the note says so.
    """
    if saved_state is None or saved_state["world_size"] == world_size:
        return config, None
    wanted = saved_state["position"]["episodes_per_step"]
    per_micro = config.batch_size * world_size
    if wanted % per_micro == 0:
        accumulation = wanted // per_micro
        note = (f"world size {saved_state['world_size']} -> {world_size}: accumulation_steps "
                f"{config.accumulation_steps} -> {accumulation} keeps {wanted} episodes per step")
    else:
        accumulation = max(1, round(wanted / per_micro))
        note = (f"world size {saved_state['world_size']} -> {world_size}: {wanted} episodes per step cannot be "
                f"kept with batch_size {config.batch_size}; now {accumulation * per_micro} (accumulation_steps "
                f"{accumulation}); the LR schedule is rescaled to the new step count")
    return config.replace(accumulation_steps=accumulation), note


def resolve_resume(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, checkpoint path) of a --resume argument: a checkpoint directory, or a run
    directory, meaning its newest valid regular checkpoint. Raises CheckpointError saying why not."""
    fs, path = storage.resolve(uri)
    path = path.rstrip("/")
    if not storage.exists(fs, path):
        raise ckpt.CheckpointError(f"--resume {uri}: no such checkpoint or run directory")
    if storage.exists(fs, f"{path}/{ckpt.MANIFEST}") or storage.exists(fs, f"{path}/{ckpt.STATE}"):
        problems = storage.problems(fs, path)
        if problems:
            raise ckpt.CheckpointError(f"--resume {uri} does not verify: {'; '.join(problems)}. Pass another "
                                       f"checkpoint, or the run directory to take its newest valid one.")
        return fs, path
    newest = storage.newest_valid_before(fs, path, None)
    if newest is None:
        raise ckpt.CheckpointError(f"--resume {uri}: neither a checkpoint (no {ckpt.MANIFEST}) nor a run directory "
                                   f"with a valid checkpoint_e* inside")
    return fs, f"{path}/{newest}"


class Checkpointer:
    def __init__(self, config: TrainConfig, *, fs: pafs.FileSystem, run_dir: str, latest: Optional[str],
                 registered: Iterable[str], rank: int, world_size: int, report: ReportFn, gather: GatherFn,
                 all_reduce: AllReduceFn, fence: Optional[Fence] = None):
        self.config = config
        self.fs, self.run_dir = fs, run_dir.rstrip("/")
        self.latest = latest.rstrip("/") if latest else None
        self.registered = set(registered)
        self.rank, self.world_size = rank, world_size
        self._report, self._gather, self._all_reduce = report, gather, all_reduce
        self.fence = fence  # the driver's lease claim: checked before every write (lease.py)

    # ------------------------------------------------------------------ restore
    def restore(self) -> Optional[Restored]:
        """The checkpoint to continue from, verified and loaded; None for a fresh start.

        Ray's latest (a restart or a rerun) wins over --resume PATH. A latest that does not verify
        falls back, loudly, to the newest valid checkpoint before it; with none, this raises rather
        than silently starting from scratch.
        """
        with tempfile.TemporaryDirectory(prefix="cape_ray_restore_") as scratch:
            if self.latest is not None:
                name = self.latest.rsplit("/", 1)[-1]
                ignored = self.config.resume
                local = storage.download(self.fs, self.latest, f"{scratch}/latest")
                problems = ckpt.verify_checkpoint(local)
                if not problems:
                    return self._loaded(local, name, "ray", resume_ignored=ignored)
                log.error("LATEST CHECKPOINT %s DOES NOT VERIFY: %s", self.latest, "; ".join(problems))
                fallback = storage.newest_valid_before(self.fs, self.run_dir, name)
                if fallback is None:
                    raise ckpt.CheckpointError(
                        f"the latest checkpoint {self.latest} does not verify ({'; '.join(problems)}) and no earlier "
                        f"valid checkpoint exists in {self.run_dir}; refusing to start from scratch. Start a new "
                        f"run with another --name, or --resume a valid checkpoint.")
                log.error("FALLING BACK to the newest valid checkpoint: %s", fallback)
                local = storage.download(self.fs, f"{self.run_dir}/{fallback}", f"{scratch}/fallback")
                return self._loaded(local, fallback, "ray", fell_back_from=name, resume_ignored=ignored)
            if self.config.resume:
                fs, path = resolve_resume(self.config.resume)
                local = storage.download(fs, path, f"{scratch}/resume")
                return self._loaded(local, path.rsplit("/", 1)[-1], "--resume")
        return None

    def _loaded(self, local: str, name: str, source: str, **notes: Any) -> Restored:
        loaded = ckpt.load_checkpoint(local)  # verifies again: what is loaded is what was checked
        config, layout_note = plan_layout(self.config, self.world_size, loaded.state)
        return Restored(loaded, name, source, config, layout_note=layout_note, **notes)

    def load_into(self, restored: Restored, state: TrainState, model: torch.nn.Module,
                  optimizer: torch.optim.Optimizer, scheduler: Any) -> Resumed:
        """Model, optimizer, scheduler, TrainState and, last, this rank's RNG and running loss.
        Nothing may draw from the global generators between this and the first training step."""
        loaded = restored.checkpoint
        ckpt.check_compatible(loaded.state, state.config, loaded.path)
        ckpt.check_model_shapes(loaded.model, model.state_dict(), loaded.path)
        model.load_state_dict(loaded.model)
        optimizer.load_state_dict(loaded.optimizer)
        scheduler.load_state_dict(loaded.scheduler)
        state.load_state_dict(loaded.state)
        ranks = loaded.rank_states
        if restored.saved_world_size == self.world_size and self.rank in ranks:
            mine = ranks[self.rank]
            restored_rng = rng.restore(mine, cuda_fallback_seed=rng.derived_seed(
                self.config.seed, state.position.global_step, self.rank))
            return Resumed(float(mine["loss_sum"]), int(mine["loss_count"]), restored_rng)
        # Per-rank generators cannot be mapped onto other ranks: re-seed deterministically. The
        # epoch's train-loss mean only needs the totals, which rank 0 carries on.
        rng.seed_everything(rng.derived_seed(self.config.seed, state.position.global_step, self.rank))
        resumed = Resumed(reseeded=f"RNG RE-SEEDED deterministically: the checkpoint has {restored.saved_world_size} "
                                   f"rank(s), this run has {self.world_size}")
        if self.rank == 0:
            resumed.loss_sum = sum(float(r["loss_sum"]) for r in ranks.values())
            resumed.loss_count = sum(int(r["loss_count"]) for r in ranks.values())
        return resumed

    # ------------------------------------------------------------------ tidy (rank 0, at start)
    def tidy(self, state: TrainState, restored: Optional[Restored]) -> TidyReport:
        """Remove orphans past the restore point; reconcile the best exports with `state.tracking`."""
        self._stop_if_fenced(self.rank == 0 and self._fence_problem(), "nothing tidied")
        report = TidyReport()
        if self.rank != 0:
            return report
        after = None
        if restored is not None:
            position = state.position
            after = ckpt.position_from_name(ckpt.checkpoint_name(
                state.config, position.epoch + position.mid_epoch, position.step or None))
        report.removed_orphans, report.stray = self.clean_orphans(after)
        report.exported, report.problems = sync_exports(self.fs, self.run_dir, wanted_exports(state.tracking.best.values()),
                                                        verify_existing=True)
        return report

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
             scheduler: Any, running: dict[str, Any], metrics: dict[str, Any]) -> None:
        """Write this position as checkpoint `name` and report it (every rank: a barrier).

        Rank 0 stages the checkpoint, checks the storage has room for it and the exports it earned,
        uploads it (manifest last) and makes those exports; Ray then registers it without uploading
        again. Whether that worked is agreed by every rank before reporting, so that a storage
        failure stops all of them with StorageError instead of leaving the others waiting in the
        report.
        """
        blobs = self._gather(ckpt.serialize({**rng.capture(), **running}))
        target, problem, fenced = f"{self.run_dir}/{name}", None, None
        if self.rank == 0:
            staging = tempfile.mkdtemp(prefix="cape_ray_ckpt_")
            try:
                ckpt.write_checkpoint(staging, model=model.state_dict(), optimizer=optimizer.state_dict(),
                                      scheduler=scheduler.state_dict(), state=state.state_dict(metrics),
                                      rank_states=blobs)
                exports = wanted_exports(t for t in state.tracking.best.values() if t.checkpoint == name)
                fenced = self._fence_problem()  # right before the first write to storage
                problem = None if fenced else self._store(staging, target, exports)
            except OSError as exc:  # the local staging directory (TMPDIR) is full or unwritable
                problem = str(exc)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        self._stop_if_fenced(fenced, f"checkpoint {name} not stored")
        if self._all_reduce({"storage_failed": float(problem is not None)})["storage_failed"]:
            raise ckpt.StorageError(problem or f"rank 0 could not store checkpoint {name} (see its message)")
        self._report(metrics, target if self.rank == 0 else None, name)
        self.registered.add(name)

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
            _, problems = sync_exports(self.fs, self.run_dir, exports, refresh=True)
        except OSError as exc:  # permission, quota, a disk that filled up meanwhile
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
                 refresh: bool = False) -> tuple[list[str], list[str]]:
    """Make each export exist (a copy of its checkpoint, manifest last), then delete that metric's
    other exports. An export already there counts when it verifies (`verify_existing`), or is copied
    again regardless (`refresh`: its checkpoint was just written). Returns (exports written,
    problems). An export that cannot be made (its checkpoint is gone) leaves the existing ones."""
    run_dir = run_dir.rstrip("/")
    existing = storage.list_dirs(fs, run_dir, "checkpoint_best_")
    written, problems = [], []
    for export in exports:
        target = f"{run_dir}/{export.name}"
        present = export.name in existing and not refresh and not (verify_existing and storage.problems(fs, target))
        if not present:
            source = f"{run_dir}/{export.checkpoint}"
            # a checkpoint just stored (`refresh`) was verified as it was written: not read again
            if export.checkpoint is None or (not refresh and storage.problems(fs, source)):
                problems.append(f"best-by-{export.metric} export {export.name} cannot be made: its checkpoint "
                                f"{export.checkpoint} is missing or damaged")
                continue
            storage.delete_dir(fs, target)  # a partial copy from an interrupted export
            storage.copy_checkpoint(fs, source, target)
            written.append(export.name)
        for old in existing:
            if old != export.name and ckpt.is_export_of(old, export.metric):
                storage.delete_dir(fs, f"{run_dir}/{old}")
    return written, problems
