"""Controller-side callbacks: keep the best-by-PCK and best-by-loss checkpoints under export names.

Ray retains the top K by ONE score (val_pck) plus the latest, so the best by loss could be deleted.
The worker decides what is a new best (its tracking state is restored on every resume) and flags it
in the report; this callback copies that checkpoint to its export name and deletes the previous
export only after the new copy is complete (manifest copied last).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from ray.train import Checkpoint, UserCallback

from cape_ray import storage
from cape_ray.checkpoint import best_export_name

log = logging.getLogger("cape_ray")

EXPORT_PREFIX = {"pck": "checkpoint_best_pck_", "loss": "checkpoint_best_loss_"}


class BestCheckpointExporter(UserCallback):
    def __init__(self) -> None:
        self._cleaned_partial = False

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Optional[Checkpoint]) -> None:
        if checkpoint is None or not metrics:
            return
        report = metrics[0]  # rank 0's metrics are the checkpoint's
        fs, path = checkpoint.filesystem, checkpoint.path.rstrip("/")
        run_dir = path.rsplit("/", 1)[0]
        if not self._cleaned_partial:
            self._remove_incomplete_exports(fs, run_dir)
            self._cleaned_partial = True
        for kind, flag in (("pck", "is_best_pck"), ("loss", "is_best_loss")):
            if report.get(flag):
                self.export(fs, run_dir, path, kind, report)

    @staticmethod
    def export(fs: Any, run_dir: str, source: str, kind: str, report: dict[str, Any]) -> str:
        name = best_export_name(kind, int(report["epoch"]), float(report["val_pck"]), float(report["val_loss"]))
        destination = f"{run_dir}/{name}"
        storage.delete_dir(fs, destination)  # a partial copy from an interrupted export
        storage.copy_checkpoint(fs, source, destination)
        for old in storage.list_dirs(fs, run_dir, EXPORT_PREFIX[kind]):
            if old != name:
                storage.delete_dir(fs, f"{run_dir}/{old}")
        log.info("exported best-by-%s checkpoint: %s", kind, name)
        return name

    @staticmethod
    def _remove_incomplete_exports(fs: Any, run_dir: str) -> None:
        """An export interrupted by a driver crash has no verifying manifest: remove it."""
        for prefix in EXPORT_PREFIX.values():
            exports = storage.list_dirs(fs, run_dir, prefix)
            for name in exports:
                if len(exports) > 1 and not storage.is_valid(fs, f"{run_dir}/{name}"):
                    log.warning("removing incomplete best export %s", name)
                    storage.delete_dir(fs, f"{run_dir}/{name}")
