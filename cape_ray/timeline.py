"""Where a worker's start goes: from its process's start to its first optimizer step.

Each start (a fresh run, a restart after a failure, a rerun) marks the moments below; rank 0 logs
them (see with --verbose) and, when CAPE_STARTUP_TIMELINE names a file, appends them there as one
JSON line (bench/ray_overhead.py reads it to put a restart's seconds side by side with a bare Ray
Train job's).

    process        the worker process started (Ray starts one per worker, per attempt)
    train          the training function was entered (Python and cape-ray imported)
    ray            Ray's context read: rank, the latest checkpoint, the registered ones, the console
    data           the training and validation splits are ready
    model          the model is built
    restored       the checkpoint is loaded (or the run starts fresh)
    first_step     the first optimizer step is done
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Optional

log = logging.getLogger("cape_ray")

ENV = "CAPE_STARTUP_TIMELINE"


def process_start() -> float:
    """Wall-clock time this process started (psutil comes with Ray)."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - a timeline without its first mark is still useful
        return time.time()


class Timeline:
    def __init__(self) -> None:
        self.marks: list[tuple[str, float]] = [("process", process_start()), ("train", time.time())]
        self.finished = False

    def mark(self, name: str) -> None:
        if not self.finished:
            self.marks.append((name, time.time()))

    def finish(self, rank: int, restored_from: Optional[str]) -> None:
        """After the first step: log the marks (rank 0) and append them to CAPE_STARTUP_TIMELINE."""
        if self.finished:
            return
        self.mark("first_step")
        self.finished = True
        if rank != 0:
            return
        start = self.marks[0][1]
        log.info("startup: %s", ", ".join(f"{name} +{when - start:.2f}s" for name, when in self.marks))
        path = os.environ.get(ENV)
        if path:
            with open(path, "a") as out:
                out.write(json.dumps({"restored_from": restored_from, "marks": dict(self.marks)}) + "\n")
