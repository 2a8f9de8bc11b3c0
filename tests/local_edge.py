"""The training loop's view of Ray, in one process: for fast tests of the real loop without Ray.

`LocalEdge` is rank 0 of a world of 1 on the CPU. A report registers the checkpoint the Checkpointer
stored (and exported) in the run directory at once.
`crash_after` stops the run with `Crash` right after the N-th report has been registered (or just
before, when `crash_before_report`: the checkpoint and its exports are stored, Ray never heard of
it), the way a killed process would leave it; a new edge made with `LocalEdge.after(edge)` then plays
the restart: the same run directory, the last registered checkpoint as the latest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pyarrow.fs as pafs
import torch



class Crash(Exception):
    """Stands for a process killed at a chosen point."""


class LocalEdge:
    rank, world_size, device = 0, 1, torch.device("cpu")
    progress = None

    def __init__(self, run_dir, *, latest: Optional[str] = None, registered=(), crash_after: Optional[int] = None,
                 crash_before_report: bool = False, quiet: bool = False):
        self.say = (lambda text: None) if quiet else None  # None: the loop's lines go to stdout
        self.fs = pafs.LocalFileSystem()
        self.run_dir = str(run_dir)
        Path(self.run_dir).mkdir(parents=True, exist_ok=True)
        self.latest, self.registered = latest, set(registered)
        self.crash_after, self.crash_before_report = crash_after, crash_before_report
        self.reports: list[tuple[str, dict]] = []

    @classmethod
    def after(cls, previous: "LocalEdge", **changes) -> "LocalEdge":
        """The edge a restarted worker sees: Ray's latest registered checkpoint and every registered name."""
        return cls(previous.run_dir, **{"latest": previous.latest, "registered": previous.registered,
                                        "quiet": previous.say is not None, **changes})

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def report(self, metrics: dict, stored: Optional[str], name: str) -> None:
        crash = self.crash_after is not None and len(self.reports) + 1 >= self.crash_after
        if crash and self.crash_before_report:
            raise Crash(f"after storing {name} and its exports, before Ray registered it")
        self.reports.append((name, dict(metrics)))
        if stored is not None:  # the Checkpointer stored it in the run directory: register it
            self.registered.add(name)
            self.latest = stored
        if crash:
            raise Crash(f"after report {len(self.reports)} ({name})")

    def broadcast(self, value):
        return value

    def committed(self) -> set[str]:
        return set(self.registered)

    def gather(self, blob: bytes) -> dict[int, bytes]:
        return {0: blob}

    def all_reduce(self, values: dict[str, float]) -> dict[str, float]:
        return dict(values)

    def preemption_notice(self):
        return None

    def stop(self, failure: Exception) -> None:
        raise failure
