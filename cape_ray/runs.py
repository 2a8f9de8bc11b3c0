"""`cape-ray runs STORAGE_PATH`: the runs under a storage path, what state each is in, how far it got.

Read from what a run directory holds, at a cost that does not grow with the run:
- the driver lease (lease.py): a live holder means the run is training now;
- the end of the history (history.read_tail): the driver's "end" line says how the run ended;
- Ray's run snapshot and the latest checkpoint's state.json: epochs done, planned, best PCK and loss
  (without a snapshot, the newest checkpoint by position).

Statuses
- running: a driver holds the run's lease and is alive;
- finished: the last thing the driver wrote is a finished end, or the latest checkpoint completed
  every planned epoch (or stopped early) with nothing started since;
- failed: the run ended on an error its driver saw (out of --max_failures, storage failure, ...);
- preempted: it stopped without ending: a killed or lost driver, a preempted machine, a Ctrl-C, or
  workers that failed last; rerunning the same command resumes it.
"""

from __future__ import annotations

import datetime
import json
from typing import Any, Optional

import pyarrow.fs as pafs

from cape_ray import history, storage
from cape_ray.checkpoint import STATE, position_from_name
from cape_ray.lease import LEASE_FILE, DriverLease
from cape_ray.preflight import SNAPSHOT

RUN_MARKERS = (history.METRICS_FILE, history.SEGMENTS_DIR, SNAPSHOT, LEASE_FILE)


def _read_json(fs: pafs.FileSystem, path: str) -> Optional[dict]:
    try:
        with fs.open_input_stream(path) as stream:
            value = json.loads(stream.read().decode())
        return value if isinstance(value, dict) else None
    except (OSError, ValueError):
        return None


def latest_state(fs: pafs.FileSystem, run_dir: str, names: list[str]) -> Optional[dict]:
    """state.json of the run's latest checkpoint: Ray's snapshot says which; without one (or if it
    is gone), the newest regular checkpoint by position."""
    snapshot = _read_json(fs, f"{run_dir}/{SNAPSHOT}") or {}
    latest = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    candidates = [latest] if latest else []
    by_position = sorted((position_from_name(n), n) for n in names if position_from_name(n) is not None)
    candidates += [n for _, n in reversed(by_position) if n != latest]
    for name in candidates[:3]:  # a damaged newest one: the one before is as good a summary
        state = _read_json(fs, f"{run_dir}/{name}/{STATE}")
        if state is not None:
            return state
    return None


def _lease_holder(storage_path: str, name: str) -> Optional[dict]:
    """The lease record of a live driver of the run, else None."""
    try:
        lease = DriverLease(storage_path, name)
        record = lease.read()
        return record if record is not None and lease.holder_alive(record) else None
    except Exception:  # noqa: BLE001 - an unreadable lease says nothing about the run's state
        return None


def _iso(seconds: Optional[float]) -> Optional[str]:
    if seconds is None:
        return None
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def summarize(storage_path: str, fs: pafs.FileSystem, run_dir: str, name: str) -> dict[str, Any]:
    """One run's line of `cape-ray runs`."""
    entries = fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
    names = [e.base_name for e in entries if e.type == pafs.FileType.Directory and e.base_name.startswith("checkpoint_")]
    tail = history.read_tail(fs, run_dir)
    state = latest_state(fs, run_dir, names)
    holder = _lease_holder(storage_path, name)

    position = (state or {}).get("position") or {}
    planned = ((state or {}).get("config") or {}).get("epochs")
    starts = [r for r in tail if r.get("event") == "start"]
    if starts and starts[-1].get("epochs"):
        planned = starts[-1]["epochs"]
    reports = [r for r in tail if r.get("event") == "report"]
    epochs_done = (state or {}).get("epoch")
    if epochs_done is None and reports:
        validated = [r["epoch"] for r in reports if r.get("validated") and r.get("epoch") is not None]
        epochs_done = validated[-1] if validated else max(0, int(reports[-1].get("epoch") or 1) - 1)
    best_pck, best_loss = (state or {}).get("best_pck"), (state or {}).get("best_val_loss")
    if state is None and reports:
        best_pck, best_loss = reports[-1].get("best_val_pck"), reports[-1].get("best_val_loss")
    stopped_early = bool((((state or {}).get("tracking") or {}).get("early_stopping") or {}).get("stopped"))

    completed = state is not None and not position.get("step") and (
        stopped_early or (planned is not None and (epochs_done or 0) >= planned))
    times = [r["time"] for r in tail if isinstance(r.get("time"), (int, float))]
    last_update = max(times) if times else None
    last = tail[-1] if tail else None
    note = ""
    if holder is not None:
        status = "running"
        note = f"driver {holder.get('host')} pid {holder.get('pid')}"
        last_update = max(last_update or 0.0, float(holder.get("heartbeat") or 0.0)) or None
    elif last is not None and last.get("event") == "end":
        status = {"finished": "finished", "failed": "failed"}.get(last.get("status"), "preempted")
        note = last.get("error") or ("interrupted" if last.get("status") == "interrupted" else "")
    elif completed and (last is None or last.get("event") != "start"):
        status = "finished"  # its driver was gone before it wrote the end (or it predates end lines)
    else:
        status = "preempted"
        if last is None:
            note = "no report yet"
        elif last.get("event") == "failure":
            note = f"workers failed: {last.get('error', '')}"[:120]
        elif last.get("event") == "start":
            note = "stopped before its first report"
        else:
            note = "stopped without ending (driver killed or machine lost); rerun to resume"
    if stopped_early and status == "finished":
        note = note or f"stopped early at epoch {epochs_done}"
    return {"name": name, "path": storage.display(run_dir, fs), "status": status, "epochs_done": epochs_done,
            "epochs_planned": planned, "best_pck": best_pck, "best_loss": best_loss,
            "last_update": _iso(last_update), "last_update_s": last_update, "note": note}


def is_run(fs: pafs.FileSystem, path: str) -> bool:
    children = {e.base_name for e in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))}
    return bool(children & set(RUN_MARKERS)) or any(c.startswith("checkpoint_") for c in children)


def list_runs(storage_path: str) -> list[dict[str, Any]]:
    """Every run directly under `storage_path` (local path or URI), the most recently updated first."""
    fs, base = storage.resolve(storage_path)
    base = base.rstrip("/")
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{storage_path}: no such directory (give the --storage_path of your runs)")
    if info.type != pafs.FileType.Directory:
        raise NotADirectoryError(f"{storage_path} is not a directory: give the --storage_path of your runs")
    runs = []
    for entry in fs.get_file_info(pafs.FileSelector(base)):
        if entry.type == pafs.FileType.Directory and is_run(fs, entry.path):
            runs.append(summarize(storage_path, fs, entry.path, entry.base_name))
    runs.sort(key=lambda r: (-(r["last_update_s"] or 0.0), r["name"]))
    return runs


def _number(value: Optional[float], digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(runs: list[dict[str, Any]]) -> str:
    if not runs:
        return "no runs"
    header = ("NAME", "STATUS", "EPOCHS", "BEST PCK", "BEST LOSS", "LAST UPDATE (UTC)", "NOTE")
    rows = [header]
    for run in runs:
        done, planned = run["epochs_done"], run["epochs_planned"]
        epochs = "-" if done is None else f"{done}/{planned}" if planned else str(done)
        rows.append((run["name"], run["status"], epochs, _number(run["best_pck"]), _number(run["best_loss"]),
                     (run["last_update"] or "-").replace("T", " ").rstrip("Z"), run["note"] or ""))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header) - 1)]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1]
                     for row in rows).rstrip()
