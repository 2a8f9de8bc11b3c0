"""Controller-side callback: export a new best checkpoint as soon as Ray has registered it.

The worker flags a report `is_best_<kind>` when its tracking (restored on every resume) saw a new
best by that --best_metrics entry. Right after Ray registers the checkpoint, this callback copies it
to the export name (checkpoint_best_pck_..., checkpoint_best_loss_...) and then deletes the previous
export of that metric. A crash between registration and this callback is repaired at the next
start by the Checkpointer, from the restored tracking (see checkpointer.py).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from ray.train import Checkpoint, UserCallback

from cape_ray.checkpoint import best_export_name
from cape_ray.checkpointer import Export, sync_exports
from cape_ray.tracking import best_flag, parse_best_metrics

log = logging.getLogger("cape_ray")


class BestCheckpointExporter(UserCallback):
    def __init__(self, best_metrics: str) -> None:
        self.metrics = [metric for metric, _ in parse_best_metrics(best_metrics)]

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Optional[Checkpoint]) -> None:
        if checkpoint is None or not metrics:
            return
        report = metrics[0]  # rank 0's metrics are the checkpoint's
        path = checkpoint.path.rstrip("/")
        run_dir, name = path.rsplit("/", 1)
        exports = [Export(metric, best_export_name(metric, int(report["epoch"]), report), name)
                   for metric in self.metrics if report.get(best_flag(metric))]
        if exports:
            written, problems = sync_exports(checkpoint.filesystem, run_dir, exports)
            for problem in problems:
                log.error("%s", problem)
            for export in written:
                log.info("exported best checkpoint %s", export)
