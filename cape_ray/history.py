"""Run history: every report of a run, as JSON lines in the run directory, and the trackers fed from it.

`RunHistory` is a controller-side `ray.train.UserCallback`. For every report (rank 0's metrics,
which are the checkpoint's, seen after Ray registered the checkpoint) it writes one JSON line, then
hands the report to the run's trackers (trackers.py: TensorBoard, MLflow, W&B):

    {"event": "start", "time": ..., "epochs": 30, "trackers": ["tensorboard"], "host": ..., "pid": ...}
    {"event": "report", "time": ..., "attempt": 1, "checkpoint": "checkpoint_e001_...", "workers": 2,
     "epoch": 1, "step": 4, "global_step": 4, "validated": 1, "train_loss": ..., "val_loss": ...,
     "val_pck": ..., "pck@0.05": ..., ..., "mpck": ..., "lr": ..., "epoch_time_s": ..., ...}
    {"event": "failure", "time": ..., "attempt": 1, "ranks": [1], "error": "ActorDiedError: ..."}
    {"event": "restart", "time": ..., "attempt": 2, "reason": "worker_failure",
     "resumed_from": "checkpoint_e002_..._s000002", "previous_global_step": 6, "global_step": 8}
    {"event": "end", "time": ..., "status": "finished", "epoch": 30}

"start" and "end" are written by the driver (job.py) around `fit()`: "end" says how the run ended
(finished, failed with its error, or interrupted), which is what `cape-ray runs` reads. A report
line is the history's own fields (event, time, attempt, checkpoint, workers) and rank 0's metrics;
a reported key that collides with one of those fields is kept as `metric_<key>`.

Attempts count every start of training in this run directory: 1 for the first, +1 for each
worker-group restart within a `fit()` and for each driver rerun with the same name and storage.
A restart is recognised when
- workers failed (`after_exception`): a "failure" line at once (one per distinct failure between
  reports: the controller may show the same failure to several status polls), the "restart" line
  with the first report of the next attempt (a run that gives up records no restart that never
  happened);
- a new callback object (a driver rerun) finds reports in the history: it continues their count;
- the reported global step does not advance, or the number of workers changes (an elastic resize
  restarts the group without an exception).
`resumed_from` is the newest checkpoint recorded before the restart: the one Ray hands to the new
workers (the worker falls back to an earlier one, and says so in its log, if it does not verify).
Several lines may then carry the same epoch; the last one of an epoch is the one that counts.

Layout. Storage goes through pyarrow, so `s3://...` works like a local path, but object stores
cannot append, and rewriting one growing file costs the whole file per report. So:
- a local or NFS run directory has one `metrics.jsonl`, only ever appended to;
- an object store gets `metrics/000001.jsonl`, `metrics/000002.jsonl`, ...: segments of at most
  SEGMENT_RECORDS lines, the open one rewritten (one PUT of at most that many lines) per write.
  Concatenated in order they are the metrics.jsonl; a new writer (a rerun) starts a new segment.
`read_history` returns the same records for both (and reads an older run's single file first).
Recording never raises into the controller: a failure is logged. Nothing is written once the
driver's lease claim is no longer live (its `Fence`, cape_ray/lease.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

import pyarrow.fs as pafs
from ray.exceptions import RayActorError
from ray.train import Checkpoint, UserCallback

from cape_ray import storage, trackers as tracking
from cape_ray.console import find_relay
from cape_ray.lease import Fence

log = logging.getLogger("cape_ray")

METRICS_FILE = "metrics.jsonl"
SEGMENTS_DIR = "metrics"  # object stores: metrics/NNNNNN.jsonl
SEGMENT_RECORDS = 32  # lines per segment: bounds what one report rewrites
TAIL_BYTES = 64 << 10  # what `read_tail` reads of a local metrics.jsonl
HISTORY_FIELDS = tracking.HISTORY_FIELDS
TENSORBOARD_DIR = tracking.TENSORBOARD_DIR
tensorboard_scalars = tracking.tensorboard_scalars


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


def segment_paths(fs: pafs.FileSystem, run_dir: str) -> list[str]:
    """The object-store segments of a run's history, in order (empty for a local run)."""
    infos = fs.get_file_info(pafs.FileSelector(f"{run_dir.rstrip('/')}/{SEGMENTS_DIR}", allow_not_found=True))
    numbered = []
    for info in infos:
        stem, _, ext = info.base_name.partition(".")
        if info.type == pafs.FileType.File and ext == "jsonl" and stem.isdigit():
            numbered.append((int(stem), info.path))
    return [path for _, path in sorted(numbered)]


def read_records(fs: pafs.FileSystem, run_dir: str) -> list[dict]:
    """Every record of a run's history: metrics.jsonl, then the segments (if any), in order."""
    run_dir = run_dir.rstrip("/")
    records = parse_lines(_read_bytes(fs, f"{run_dir}/{METRICS_FILE}"))
    for path in segment_paths(fs, run_dir):
        records += parse_lines(_read_bytes(fs, path))
    return records


def has_history(fs: pafs.FileSystem, run_dir: str) -> bool:
    run_dir = run_dir.rstrip("/")
    return storage.exists(fs, f"{run_dir}/{METRICS_FILE}") or bool(segment_paths(fs, run_dir))


def read_history(run_dir: str) -> list[dict]:
    """Every record of `run_dir`'s history (local path or URI), in order, whatever its layout."""
    fs, path = storage.resolve(run_dir)
    if not has_history(fs, path):
        raise FileNotFoundError(f"no {METRICS_FILE} (nor {SEGMENTS_DIR}/*.jsonl) in {run_dir}")
    return read_records(fs, path)


def read_tail(fs: pafs.FileSystem, run_dir: str) -> list[dict]:
    """The last records of a run's history at a cost that does not grow with it: the last segment,
    or the end of metrics.jsonl (at least one whole line unless the file is empty)."""
    run_dir = run_dir.rstrip("/")
    segments = segment_paths(fs, run_dir)
    if segments:
        return parse_lines(_read_bytes(fs, segments[-1]))
    path = f"{run_dir}/{METRICS_FILE}"
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        return []
    start = max(0, (info.size or 0) - TAIL_BYTES)
    with fs.open_input_file(path) as handle:
        handle.seek(start)
        data = handle.read()
    if start > 0:
        data = data[data.find(b"\n") + 1:]  # the first line is cut: drop it
    return parse_lines(data)


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


# ----------------------------------------------------------------------------- writers
class HistoryWriter:
    """Appends records to a run's history. Local: appends to metrics.jsonl (after a line a crash
    cut short, a newline first). Object store: rewrites the open segment, SEGMENT_RECORDS lines at
    most, and starts the next one when it is full."""

    def __init__(self, fs: pafs.FileSystem, run_dir: str) -> None:
        self.fs, self.run_dir = fs, run_dir.rstrip("/")
        self.local = isinstance(fs, pafs.LocalFileSystem)
        self._ready = False
        self._needs_newline = False
        self._segment, self._data, self._lines = 0, b"", 0

    def _prepare(self) -> None:
        if self.local:
            self.fs.create_dir(self.run_dir, recursive=True)
            path = f"{self.run_dir}/{METRICS_FILE}"
            info = self.fs.get_file_info(path)
            if info.type == pafs.FileType.File and info.size:
                with self.fs.open_input_file(path) as handle:
                    handle.seek(info.size - 1)
                    self._needs_newline = handle.read(1) != b"\n"  # a line cut by a crash
        else:
            existing = segment_paths(self.fs, self.run_dir)
            last = int(existing[-1].rsplit("/", 1)[-1].split(".")[0]) if existing else 0
            self._segment = last + 1  # a new writer never rewrites an earlier one's segment
            self.fs.create_dir(f"{self.run_dir}/{SEGMENTS_DIR}", recursive=True)
        self._ready = True

    def write(self, records: list[dict]) -> None:
        if not records:
            return
        if not self._ready:
            self._prepare()
        data = "".join(json.dumps(_json_value(r)) + "\n" for r in records).encode()
        if self.local:
            if self._needs_newline:
                data, self._needs_newline = b"\n" + data, False
            with self.fs.open_append_stream(f"{self.run_dir}/{METRICS_FILE}") as stream:
                stream.write(data)
            return
        self._data += data
        self._lines += len(records)
        with self.fs.open_output_stream(f"{self.run_dir}/{SEGMENTS_DIR}/{self._segment:06d}.jsonl") as stream:
            stream.write(self._data)
        if self._lines >= SEGMENT_RECORDS:
            self._segment, self._data, self._lines = self._segment + 1, b"", 0


# ----------------------------------------------------------------------------- the callback
class RunHistory(UserCallback):
    """Writes every report (and every failure / restart) to the history; feeds the trackers."""

    writer_class = HistoryWriter

    def __init__(self, trackers: Optional[list] = None, tensorboard: bool = True, fence: Optional[Fence] = None):
        if trackers is None:
            trackers = [tracking.TensorBoardTracker()] if tensorboard else []
        self.trackers = tracking.TrackerSet(trackers)
        self.fence = fence  # the driver's lease claim: nothing is written once it is not live (lease.py)
        self._started = False
        self._fs: Optional[pafs.FileSystem] = None
        self._run_dir = ""
        self._run: Optional[tracking.RunInfo] = None
        self._writer: Optional[HistoryWriter] = None
        self._series = tracking.ReportSeries()
        self._attempt = 0
        self._last_global_step: Optional[int] = None
        self._last_workers: Optional[int] = None
        self._last_checkpoint: Optional[str] = None
        self._pending_restart: Optional[str] = None  # reason of a restart not yet written
        self._last_failure: Optional[tuple[list[int], str]] = None

    @classmethod
    def for_config(cls, config, fence: Optional[Fence] = None) -> "RunHistory":
        """The history of a run of `config`, with the trackers its --tracker flags name."""
        return cls(trackers=tracking.build(config), fence=fence)

    @property
    def metrics_path(self) -> str:
        return f"{self._run_dir}/{METRICS_FILE}"

    def _start(self, run_context: Any) -> None:
        if self._started:
            return
        self._fs, self._run_dir = run_dir_of(run_context)
        self._writer = self.writer_class(self._fs, self._run_dir)
        self._run = tracking.RunInfo(self._fs, self._run_dir, run_context.run_config.name)
        records = read_records(self._fs, self._run_dir)  # once per controller: a rerun continues them
        previous = [r for r in records if r.get("event") in ("report", "failure", "restart")]
        if previous:
            # A driver rerun: continue the previous attempts' count and remember where they stood.
            self._attempt = max(int(r.get("attempt", 0) or 0) for r in previous)
            reports = [r for r in previous if r.get("event") == "report"]
            if reports:
                self._last_global_step = reports[-1].get("global_step")
                self._last_workers = reports[-1].get("workers")
            checkpoints = [r["checkpoint"] for r in reports if r.get("checkpoint")]
            self._last_checkpoint = checkpoints[-1] if checkpoints else None
            self._pending_restart = "driver_rerun"
        else:
            self._attempt = 1
        # What the trackers may have missed (a driver killed before they logged, a server that
        # was down): sent with the first report, past what each tracker already holds.
        self.trackers.catch_up(self._series.feed_all(records))
        self._started = True

    def _write(self, records: list[dict]) -> None:
        self._writer.write(records)

    # ------------------------------------------------------------------ UserCallback hooks
    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Optional[Checkpoint]) -> None:
        if self._fenced(run_context):
            return
        try:
            self._record_report(run_context, metrics, checkpoint)
        except Exception:  # noqa: BLE001 - the history must never stop training
            log.exception("run history: could not record a report in %s", self._run_dir or "the run directory")

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
        # A dead worker process is seen again by every status poll until the controller acts (e.g.
        # while a preempted node drains): the same actor's death, once. An exception raised by the
        # training function ends its attempt at once, so the same words again are a new attempt's.
        if (ranks, error) == self._last_failure and isinstance(first, RayActorError):
            return
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
        name = checkpoint.path.rstrip("/").rsplit("/", 1)[-1] if checkpoint is not None else None
        line = {"event": "report", "time": time.time(), "attempt": self._attempt, "checkpoint": name,
                "workers": workers}
        for key, value in report.items():  # a reported key never overwrites the history's own fields
            line[f"metric_{key}" if key in line else key] = value
        records.append(line)
        self._write(records)  # the history first: it is what the trackers catch up from
        self._last_failure = None

        if name is not None:
            self._last_checkpoint = name
        self._last_global_step = global_step if global_step is not None else self._last_global_step
        self._last_workers = workers
        if reason is not None and global_step is not None:
            self.trackers.restart(int(global_step), self._attempt)
        points = [p for p in (self._series.feed(_json_value(r)) for r in records) if p is not None]
        self.trackers.log(self._run, points)


# ----------------------------------------------------------------------------- the driver's lines
def _run_location(config) -> tuple[pafs.FileSystem, str]:
    return storage.run_path(config.storage_path, config.name)


def record_start(config) -> None:
    """The driver's "start" line: this driver is about to train up to `config.epochs` epochs."""
    try:
        fs, run_dir = _run_location(config)
        HistoryWriter(fs, run_dir).write([{"event": "start", "time": time.time(), "epochs": config.epochs,
                                           "trackers": list(config.trackers), "host": socket.gethostname(),
                                           "pid": os.getpid()}])
    except Exception as exc:  # noqa: BLE001 - the history never stops a run
        log.warning("run history: could not record the start of the run: %s", exc)


def end_status(failure: Optional[BaseException | str]) -> str:
    if failure is None:
        return "finished"
    return "interrupted" if isinstance(failure, KeyboardInterrupt) else "failed"


def finish_run(config, failure: Optional[BaseException | str] = None) -> None:
    """The driver's "end" line after `fit()` (failure: what stopped it, if anything), then the
    trackers' end of run: what they missed, the artifacts and the run's status. Never raises."""
    status = end_status(failure)
    try:
        fs, run_dir = _run_location(config)
        records = read_records(fs, run_dir)
        epochs = [r.get("epoch") for r in records if r.get("event") == "report" and r.get("validated")]
        end = {"event": "end", "time": time.time(), "status": status, "epoch": epochs[-1] if epochs else None}
        if failure is not None:
            text = failure if isinstance(failure, str) else f"{type(failure).__name__}: {failure}"
            end["error"] = text.strip().splitlines()[0][:500] if text.strip() else type(failure).__name__
        HistoryWriter(fs, run_dir).write([end])
        records.append(end)
    except Exception as exc:  # noqa: BLE001
        log.warning("run history: could not record the end of the run: %s", exc)
        return
    tracking.finish(config, tracking.RunInfo(fs, run_dir, config.name), records, status)
