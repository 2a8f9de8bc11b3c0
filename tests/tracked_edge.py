"""The real training loop in one process with its history: every report the local edge registers is
handed to a RunHistory callback, as the Ray Train controller hands it (rank 0's metrics, the
registered checkpoint), so run directories get the history and trackers a Ray run gets."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Optional

from ray.train import RunConfig

from cape_ray.worker import train_loop_per_worker
from local_edge import Crash, LocalEdge


def run_context(config) -> SimpleNamespace:
    return SimpleNamespace(run_config=RunConfig(name=config.name, storage_path=config.storage_path))


class TrackedEdge(LocalEdge):
    def __init__(self, run_dir, *, callback=None, context=None, **options):
        super().__init__(run_dir, **options)
        self.callback, self.context = callback, context

    @classmethod
    def after(cls, previous: "TrackedEdge", **changes) -> "TrackedEdge":
        return super().after(previous, callback=previous.callback, context=previous.context, **changes)

    def report(self, metrics: dict, stored: Optional[str], name: str) -> None:
        try:
            super().report(metrics, stored, name)
        finally:
            if self.reports and self.reports[-1][0] == name:  # registered (a crash may follow)
                checkpoint = SimpleNamespace(path=stored) if stored else None
                self.callback.after_report(self.context, [dict(metrics)], checkpoint)


def train(config, callback, crash_after: Optional[int] = None, resume: bool = True) -> TrackedEdge:
    """Train `config` in this process, reporting to `callback`; with `crash_after`, the run is killed
    after that many reports, the controller sees the worker die, and (`resume`) a restarted worker
    goes on; without `resume` the run is left as a killed run leaves it."""
    context = run_context(config)
    edge = TrackedEdge(Path(config.storage_path) / config.name, callback=callback, context=context, quiet=True,
                       crash_after=crash_after)
    try:
        train_loop_per_worker(config.to_dict(), edge)
    except Crash as crash:
        callback.after_exception(context, {0: RuntimeError(str(crash))})
        if not resume:
            return edge
        edge = TrackedEdge.after(edge)
        train_loop_per_worker(config.to_dict(), edge)
    return edge
