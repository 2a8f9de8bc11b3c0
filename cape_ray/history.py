"""Run history: every report of a run in `{storage}/{name}/metrics.jsonl`, and TensorBoard events.

`RunHistory` is a controller-side `ray.train.UserCallback`. For every report it appends one JSON
line (rank 0's metrics, which are the checkpoint's) and writes the scalars to TensorBoard event
files under `{storage}/{name}/tensorboard/`. The file is only ever appended to:

    {"event": "report", "time": ..., "attempt": 1, "checkpoint": "checkpoint_e001_...", "workers": 2,
     "epoch": 1, "step": 4, "global_step": 4, "validated": 1, "train_loss": ..., "val_loss": ...,
     "val_pck": ..., "pck@0.05": ..., ..., "mpck": ..., "lr": ..., "epoch_time_s": ..., ...}
    {"event": "failure", "time": ..., "attempt": 1, "ranks": [1], "error": "ActorDiedError: ..."}
    {"event": "restart", "time": ..., "attempt": 2, "reason": "worker_failure",
     "resumed_from": "checkpoint_e002_..._s000002", "previous_global_step": 6, "global_step": 8}

A report line is the history's own fields (event, time, attempt, checkpoint, workers) and rank 0's
metrics; a reported key that collides with one of those fields is kept as `metric_<key>`.

Attempts count every start of training in this run directory: 1 for the first, +1 for each
worker-group restart within a `fit()` and for each driver rerun with the same name and storage.
A restart is recognised when
- workers failed (`after_exception`): a "failure" line at once (one per distinct failure between
  reports: the controller may show the same failure to several status polls), the "restart" line
  with the first report of the next attempt (a run that gives up records no restart that never
  happened);
- a new callback object (a driver rerun) finds an existing metrics.jsonl: it continues its attempt
  count;
- the reported global step does not advance, or the number of workers changes (an elastic resize
  restarts the group without an exception).
`resumed_from` is the newest checkpoint recorded before the restart: the one Ray hands to the new
workers (the worker falls back to an earlier one, and says so in its log, if it does not verify).
Several lines may then carry the same epoch; the last one of an epoch is the one that counts.

Storage goes through pyarrow, so `s3://...` works like a local path: a local file is appended to,
an object store file is read and rewritten (fine for a file of one line per report). TensorBoard
files are written locally and copied to an object store after every report. A resumed attempt's
event file starts with a purge at its first step, which hides the previous attempt's events from
that step on (they are redone). Recording never raises into the controller: a failure is logged.
Nothing is written once the driver's lease claim is no longer live (its `Fence`, cape_ray/lease.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import pyarrow.fs as pafs
from ray.train import Checkpoint, UserCallback

from cape_ray import storage
from cape_ray.console import find_relay
from cape_ray.lease import Fence

log = logging.getLogger("cape_ray")

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

# TensorBoard tags of the known report keys; any other number goes under report/<key>
TAGS = {
    "train_loss": "train/loss",
    "lr": "train/lr",
    "val_loss": "val/loss",
    "val_pck": "val/pck_0.20",  # TensorBoard allows no '@' in tags
    "mpck": "val/mpck",
    "epoch": "progress/epoch",
    "epoch_time_s": "time/epoch_s",
}
VALIDATION_KEYS = ("val_loss", "val_pck", "mpck", "best_val_loss", "best_val_pck")
SKIPPED_TAGS = ("step", "global_step", "validated")


# ----------------------------------------------------------------------------- storage helpers
def run_dir_of(run_context: Any) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of `{storage_path}/{name}`, resolved as Ray resolves its storage path."""
    run_config = run_context.get_run_config() if hasattr(run_context, "get_run_config") else run_context.run_config
    if run_config.storage_filesystem is not None:
        fs, base = run_config.storage_filesystem, str(run_config.storage_path)
    else:
        fs, base = storage.resolve(str(run_config.storage_path))
    return fs, Path(base, run_config.name).as_posix()


def _read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    if not storage.exists(fs, path):
        return b""
    with fs.open_input_stream(path) as stream:
        return stream.read()


def _append(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Append to a local file; read + rewrite on a filesystem that cannot append (object stores)."""
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        with fs.open_append_stream(path) as stream:
            stream.write(data)
        return
    existing = _read_bytes(fs, path)
    with fs.open_output_stream(path) as stream:
        stream.write(existing + data)


def parse_lines(data: bytes) -> list[dict]:
    """JSON objects of a metrics.jsonl; a line cut short by a crash is skipped, not fatal."""
    records = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            log.warning("metrics.jsonl: skipping an unreadable line: %.80s", line)
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_history(run_dir: str) -> list[dict]:
    """Every record of `run_dir`/metrics.jsonl (local path or URI), in file order."""
    fs, path = storage.resolve(run_dir)
    target = f"{path.rstrip('/')}/{METRICS_FILE}"
    if not storage.exists(fs, target):
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir}")
    return parse_lines(_read_bytes(fs, target))


def _json_value(value: Any) -> Any:
    """Plain JSON: numbers (non-finite -> null), strings, bools, lists and dicts of those."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if hasattr(value, "item") and getattr(value, "size", 1) == 1:  # numpy / torch scalars
        return _json_value(value.item())
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return str(value)


# ----------------------------------------------------------------------------- TensorBoard
class _TensorBoard:
    """One tensorboardX writer per attempt; mirrored to the run directory if it is not local."""

    def __init__(self, fs: pafs.FileSystem, run_dir: str, attempt: int, purge_step: Optional[int]):
        from tensorboardX import SummaryWriter

        self.fs = fs
        self.remote_dir = f"{run_dir}/{TENSORBOARD_DIR}"
        if isinstance(fs, pafs.LocalFileSystem):
            self.staging = None
            logdir = self.remote_dir
        else:
            self.staging = tempfile.mkdtemp(prefix="cape_ray_tensorboard_")
            logdir = self.staging
        os.makedirs(logdir, exist_ok=True)
        # The suffix keeps two attempts started within one second in separate, ordered files.
        self.writer = SummaryWriter(logdir=logdir, purge_step=purge_step, flush_secs=30,
                                    filename_suffix=f".attempt{attempt:03d}")

    def add(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()
        if self.staging is not None:
            self.fs.create_dir(self.remote_dir, recursive=True)
            for name in os.listdir(self.staging):
                with open(os.path.join(self.staging, name), "rb") as local, \
                        self.fs.open_output_stream(f"{self.remote_dir}/{name}") as remote:
                    remote.write(local.read())

    def close(self) -> None:
        self.writer.close()
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)


def tensorboard_scalars(report: dict[str, Any]) -> dict[str, float]:
    """Tag -> value for one report; validation values only from validated reports."""
    validated = bool(report.get("validated", 1))
    scalars = {}
    for key, value in report.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or key in SKIPPED_TAGS:
            continue
        if not math.isfinite(value):
            continue
        is_validation = key in VALIDATION_KEYS or key.startswith("pck@")
        if is_validation and not validated:
            continue  # a mid-epoch report carries a placeholder val_pck
        if key == "train_loss" and not validated:
            scalars["train/loss_running"] = float(value)  # the epoch's loss so far, rank 0
            continue
        if key == "pck@0.20" and "val_pck" in report:
            continue  # the same number as val_pck
        tag = TAGS.get(key) or (f"val/{key.replace('@', '_')}" if key.startswith("pck@") else f"report/{key}")
        scalars[tag] = float(value)
    return scalars


# ----------------------------------------------------------------------------- the callback
class RunHistory(UserCallback):
    """Appends every report (and every failure / restart) to metrics.jsonl; writes TensorBoard."""

    def __init__(self, tensorboard: bool = True, fence: Optional[Fence] = None):
        self.tensorboard = tensorboard
        self.fence = fence  # the driver's lease claim: nothing is written once it is not live (lease.py)
        self._started = False
        self._fs: Optional[pafs.FileSystem] = None
        self._run_dir = ""
        self._attempt = 0
        self._last_global_step: Optional[int] = None
        self._last_workers: Optional[int] = None
        self._last_checkpoint: Optional[str] = None
        self._pending_restart: Optional[str] = None  # reason of a restart not yet written
        self._last_failure: Optional[tuple[list[int], str]] = None
        self._needs_newline = False
        self._board: Optional[_TensorBoard] = None

    # The writer holds threads and files: it never travels with the callback to the controller.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_board"] = None
        return state

    @property
    def metrics_path(self) -> str:
        return f"{self._run_dir}/{METRICS_FILE}"

    def _start(self, run_context: Any) -> None:
        if self._started:
            return
        self._fs, self._run_dir = run_dir_of(run_context)
        existing = _read_bytes(self._fs, self.metrics_path)
        self._needs_newline = bool(existing) and not existing.endswith(b"\n")  # a line cut by a crash
        records = parse_lines(existing)
        if records:
            # A driver rerun: continue the previous attempts' count and remember where they stood.
            self._attempt = max(int(r.get("attempt", 0) or 0) for r in records)
            reports = [r for r in records if r.get("event") == "report"]
            if reports:
                self._last_global_step = reports[-1].get("global_step")
                self._last_workers = reports[-1].get("workers")
            checkpoints = [r["checkpoint"] for r in reports if r.get("checkpoint")]
            self._last_checkpoint = checkpoints[-1] if checkpoints else None
            self._pending_restart = "driver_rerun"
        else:
            self._attempt = 1
        self._started = True

    def _write(self, records: list[dict]) -> None:
        data = "".join(json.dumps(_json_value(r), sort_keys=False) + "\n" for r in records).encode()
        if self._needs_newline:
            data = b"\n" + data
            self._needs_newline = False
        _append(self._fs, self.metrics_path, data)

    # ------------------------------------------------------------------ UserCallback hooks
    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Optional[Checkpoint]) -> None:
        if self._fenced(run_context):
            return
        try:
            self._record_report(run_context, metrics, checkpoint)
        except Exception:  # noqa: BLE001 - the history must never stop training
            log.exception("run history: could not record a report in %s", self.metrics_path or "the run directory")

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        if self._fenced(run_context):
            return
        try:
            self._record_failure(run_context, worker_exceptions)
        except Exception:  # noqa: BLE001
            log.exception("run history: could not record a worker failure")

    def _fenced(self, run_context: Any) -> bool:
        """Whether the driver's claim is no longer live: another driver may own the run (lease.py)."""
        problem = self.fence.problem(*run_dir_of(run_context)) if self.fence is not None else None
        if problem:
            log.warning("run history: nothing written: %s", problem)
        return bool(problem)

    # ------------------------------------------------------------------ recording
    def _record_failure(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        self._start(run_context)
        ranks = sorted(int(r) for r in worker_exceptions)
        first = next(iter(worker_exceptions.values()), None)
        error = ("" if first is None else f"{type(first).__name__}: {first}")[:500]
        if (ranks, error) == self._last_failure:
            return  # the same failure seen again by another status poll (e.g. while preempting)
        self._last_failure = (ranks, error)
        self._write([{"event": "failure", "time": time.time(), "attempt": self._attempt, "ranks": ranks,
                      "error": error}])
        relay = find_relay(run_context.run_config.name)
        if relay is not None:  # said on the driver's console, with or without --verbose
            relay.write.remote(f"worker failure on rank(s) {ranks}: {error.splitlines()[0] if error else '?'}; "
                               f"Ray restarts the workers from the latest checkpoint if --max_failures allows\n")
        # The next report comes from the next attempt; its "restart" line is written with it.
        self._attempt += 1
        self._pending_restart = "worker_failure"

    def _record_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Optional[Checkpoint]) -> None:
        self._start(run_context)
        report = dict(metrics[0]) if metrics else {}
        global_step = report.get("global_step")
        workers = len(metrics)
        reason = self._pending_restart
        if reason is None and self._last_global_step is not None and global_step is not None \
                and global_step <= self._last_global_step:
            reason = "global_step_went_back"  # the group restarted from an earlier checkpoint
        if reason is None and self._last_workers is not None and workers != self._last_workers:
            reason = "workers_changed"  # an elastic resize restarts the group
        records = []
        if reason is not None:
            if reason != "worker_failure":  # a failure already counted its attempt
                self._attempt += 1
            records.append({"event": "restart", "time": time.time(), "attempt": self._attempt, "reason": reason,
                            "resumed_from": self._last_checkpoint, "previous_global_step": self._last_global_step,
                            "global_step": global_step})
            self._pending_restart = None
            if self._board is not None:
                self._board.close()
                self._board = None
        name = checkpoint.path.rstrip("/").rsplit("/", 1)[-1] if checkpoint is not None else None
        line = {"event": "report", "time": time.time(), "attempt": self._attempt, "checkpoint": name,
                "workers": workers}
        for key, value in report.items():  # a reported key never overwrites the history's own fields
            line[f"metric_{key}" if key in line else key] = value
        records.append(line)
        self._write(records)
        self._last_failure = None

        if name is not None:
            self._last_checkpoint = name
        self._last_global_step = global_step if global_step is not None else self._last_global_step
        self._last_workers = workers
        if self.tensorboard and global_step is not None:
            if self._board is None:
                purge = int(global_step) if reason is not None else None
                try:
                    self._board = _TensorBoard(self._fs, self._run_dir, self._attempt, purge)
                except ImportError:
                    log.warning("run history: tensorboardX is not installed; metrics.jsonl only")
                    self.tensorboard = False
                    return
            self._board.add(tensorboard_scalars(report), int(global_step))
