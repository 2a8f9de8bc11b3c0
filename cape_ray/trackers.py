"""Experiment trackers fed from the run history: TensorBoard, MLflow and Weights & Biases.

`--tracker` names them (repeatable or comma-separated; `none` for metrics.jsonl alone). They are
fed by the history callback (history.py) on the Ray Train controller, so they log once per report,
rank 0's metrics, after Ray registered the report's checkpoint. The driver ends them after `fit()`
(`finish`): what they missed, the artifacts (training curves, the best exports' metadata) and the
run's status.

One tracking run per cape-ray run: the MLflow run id and the W&B run id are kept in the run
directory (`tracking.json`) and reused by worker restarts (the same controller), driver reruns and
`--resume` of the run.

Exactly one value per metric and step. A report is logged only after its checkpoint is registered,
so a restart (which resumes from the latest registered checkpoint) never redoes a logged step,
except after a fallback from a damaged checkpoint. For that case, and for everything else, MLflow
and W&B log only steps past the last one the tracking run holds (asked of MLflow when it opens; a
redone step is bitwise the step already logged, resume being exact); TensorBoard starts a new event
file that purges the redone steps. What a tracker missed (a driver killed between the history line
and the tracker, a server that was down) is sent from the history when it answers again, at the
next start and at the end of the run.

A tracker that fails (a server down or unreachable, a missing package) costs one warning line and
is tried again after RETRY_S seconds, then after twice as long each time (up to RETRY_MAX_S); the
run and its metrics.jsonl go on.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import netrc
import os
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional
from urllib.parse import urlparse

import pyarrow.fs as pafs

from cape_ray import __version__, storage
from cape_ray.checkpoint import STATE, position_from_name

log = logging.getLogger("cape_ray")

TENSORBOARD_DIR = "tensorboard"
IDS_FILE = "tracking.json"  # the tracking runs' ids, kept with the run
MLFLOW_DIR = "mlruns"  # the default MLflow file store, inside a local run directory
EXPERIMENT = "cape-ray"  # MLflow experiment and W&B project unless MLFLOW_EXPERIMENT_NAME / WANDB_PROJECT say
ROLL_REPORTS = 32  # object stores: a new TensorBoard event file every N reports bounds each upload
RETRY_S = 60.0  # a failed tracker is tried again after this long, doubling per failed try ...
RETRY_MAX_S = 900.0  # ... up to this: a try at an unreachable host holds the controller for a timeout
MAX_PENDING = 100_000  # reports kept for a tracker that is down (older ones come from the history later)
CARRIED_ENV = ("MLFLOW_", "WANDB_")  # the driver's settings, carried to the controller process
# A tracking server that is down must cost seconds, not MLflow's minutes of retries (users' values win).
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
MLFLOW_STATUS = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
MLFLOW_BATCH = 1000  # metrics per log_batch call (MLflow's limit)
MLFLOW_PARAM_BATCH = 100
MLFLOW_VALUE_LENGTH = 6000
MARKER = "progress/epoch"  # in every report, logged last: the steps a run holds are this metric's

# Tracker tags of the known report keys; any other number goes under report/<key>
TAGS = {
    "train_loss": "train/loss",
    "lr": "train/lr",
    "val_loss": "val/loss",
    "val_pck": "val/pck_0.20",  # TensorBoard and MLflow allow no '@' in names
    "mpck": "val/mpck",
    "epoch": MARKER,
    "epoch_time_s": "time/epoch_s",
    "step_time_s": "time/step_s",
    "checkpoint_time_s": "time/checkpoint_s",
}
VALIDATION_KEYS = ("val_loss", "val_pck", "mpck", "best_val_loss", "best_val_pck")
SKIPPED_TAGS = ("step", "global_step", "validated")
HISTORY_FIELDS = ("event", "time", "attempt", "checkpoint", "workers")


class TrackerUnavailable(RuntimeError):
    """A tracker that cannot work in this installation (its package is missing): not retried."""


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


# ----------------------------------------------------------------------------- what is logged
@dataclass
class Point:
    """One report as the trackers log it: at its global step, with its report time."""

    step: int
    time: float
    scalars: dict[str, float]
    workers: int = 1
    attempt: int = 1


class ReportSeries:
    """History records, in order -> the points trackers log. Adds the timings a report implies:
    `time/step_s`, training seconds per optimizer step over the epoch (or the part of it this
    attempt trained), and `time/checkpoint_s`, seconds spent storing checkpoints since the
    previous epoch's report; both on validated reports, from the attempt's running totals."""

    def __init__(self) -> None:
        self._previous: Optional[dict] = None  # this attempt's previous validated report
        self._resumed: Optional[tuple[int, int]] = None  # (epoch, step) this attempt resumed from

    def feed(self, record: dict) -> Optional[Point]:
        event = record.get("event", "report")
        if event == "restart":
            self._previous = None
            name = record.get("resumed_from")
            self._resumed = position_from_name(name) if name else None
            return None
        if event != "report" or record.get("global_step") is None:
            return None
        metrics = {k: v for k, v in record.items() if k not in HISTORY_FIELDS}
        scalars = tensorboard_scalars(metrics)
        scalars.update(self._timing(metrics))
        if MARKER in scalars:  # last, so that a step is counted as held only once all of it is
            scalars[MARKER] = scalars.pop(MARKER)
        return Point(int(record["global_step"]), float(record.get("time") or time.time()), scalars,
                     int(record.get("workers") or 1), int(record.get("attempt") or 1))

    def feed_all(self, records: Iterable[dict]) -> list[Point]:
        return [p for p in map(self.feed, records) if p is not None]

    def _timing(self, report: dict) -> dict[str, float]:
        train, stored = report.get("train_time_total_s"), report.get("checkpoint_time_total_s")
        if not report.get("validated") or not isinstance(train, (int, float)):
            return {}
        timing = {}
        previous = self._previous
        if previous is not None:
            steps = report["global_step"] - previous["global_step"]
            train -= previous.get("train_time_total_s") or 0.0
            if isinstance(stored, (int, float)):
                stored -= previous.get("checkpoint_time_total_s") or 0.0
        else:  # the attempt's first epoch: it started at step 0 of the epoch, or where it resumed
            resumed = self._resumed
            start = resumed[1] if resumed is not None and resumed[0] == report.get("epoch") else 0
            steps = int(report.get("step") or 0) - start
        if "step_time_s" not in report and steps > 0 and train >= 0:
            timing["time/step_s"] = train / steps
        if "checkpoint_time_s" not in report and isinstance(stored, (int, float)) and stored >= 0:
            timing["time/checkpoint_s"] = float(stored)
        self._previous = report
        return timing


def unique_steps(points: Iterable[Point]) -> list[Point]:
    """One point per step, the last one given (a redone step), in step order."""
    by_step = {p.step: p for p in points}
    return [by_step[s] for s in sorted(by_step)]


# ----------------------------------------------------------------------------- the run and its ids
@dataclass
class RunInfo:
    """The cape-ray run a tracker logs for: its run directory and name."""

    fs: pafs.FileSystem
    run_dir: str
    name: str

    @property
    def display(self) -> str:
        return storage.display(self.run_dir, self.fs)


def read_ids(run: RunInfo) -> dict:
    try:
        with run.fs.open_input_stream(f"{run.run_dir}/{IDS_FILE}") as stream:
            ids = json.loads(stream.read().decode())
        return ids if isinstance(ids, dict) else {}
    except (FileNotFoundError, ValueError):
        return {}
    except OSError:
        if not storage.exists(run.fs, f"{run.run_dir}/{IDS_FILE}"):
            return {}
        raise


def write_ids(run: RunInfo, tracker: str, entry: dict) -> None:
    """Record one tracker's ids in tracking.json (a whole-file write: a rename locally, one PUT on S3)."""
    ids = read_ids(run)
    if ids.get(tracker) == entry:
        return
    ids[tracker] = entry
    data = json.dumps(ids, indent=1).encode()
    path = f"{run.run_dir}/{IDS_FILE}"
    run.fs.create_dir(run.run_dir, recursive=True)
    if isinstance(run.fs, pafs.LocalFileSystem):
        partial = f"{path}.{os.getpid()}.tmp"
        with run.fs.open_output_stream(partial) as out:
            out.write(data)
        run.fs.move(partial, path)
    else:
        with run.fs.open_output_stream(path) as out:
            out.write(data)


def say(run_name: str, text: str) -> None:
    """One line on the driver's console (through the run's relay when called on the controller)."""
    from cape_ray.console import find_relay

    relay = None
    with contextlib.suppress(Exception):
        relay = find_relay(run_name)
    if relay is not None:
        relay.write.remote(f"{text}\n")
    log.warning("%s", text)


_said: set[str] = set()


def say_once(run_name: str, text: str) -> None:
    if text not in _said:
        _said.add(text)
        say(run_name, text)


# ----------------------------------------------------------------------------- configuration
def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_commit() -> Optional[str]:
    """HEAD of the git checkout cape_ray is imported from; None when it is not one (an installed package)."""
    package = Path(__file__).resolve().parent
    try:
        top = subprocess.run(["git", "-C", str(package), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=10)
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != package.parent:
            return None
        head = subprocess.run(["git", "-C", str(package), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = head.stdout.strip() if head.returncode == 0 else ""
    return commit or None


def run_tags(config) -> dict[str, str]:
    """Versions, git commit and device of a run (the world size is tagged from its reports)."""
    tags = {"cape_ray.version": __version__, "torch.version": _version("torch"), "ray.version": _version("ray"),
            "timm.version": _version("timm"), "device": "cuda" if config.use_gpu else "cpu"}
    commit = git_commit()
    if commit:
        tags["cape_ray.git_commit"] = commit
    return tags


def run_params(config) -> dict[str, str]:
    """The resolved configuration as flat strings (a dict as JSON), within MLflow's length limit."""
    params = {}
    for key, value in config.to_dict().items():
        text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
        params[key] = text[:MLFLOW_VALUE_LENGTH]
    return params


def _carried_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(CARRIED_ENV)}


def mlflow_uri(config, run_dir: str, local: bool) -> tuple[str, Optional[str]]:
    """(tracking URI, a note to say or None): --tracking_uri, else MLFLOW_TRACKING_URI, else a file
    store in the run directory; a run on an object store gets one in the driver's working directory."""
    uri = config.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        if "://" not in uri and not uri.startswith(("databricks", "sqlite:")):  # a plain directory
            uri = Path(os.path.abspath(os.path.expanduser(uri))).as_uri()
        return uri, None
    if local:
        return Path(run_dir, MLFLOW_DIR).as_uri(), None
    store = Path(os.getcwd(), MLFLOW_DIR)
    return store.as_uri(), (f"MLflow: the run's storage is an object store, which cannot hold MLflow's file store; "
                            f"tracking to {store} on this machine (give --tracking_uri for a tracking server)")


def wandb_mode() -> Optional[str]:
    """None when WANDB_MODE is set (W&B reads it); online when the user logged in (an API key in the
    environment or in ~/.netrc); else offline."""
    if os.environ.get("WANDB_MODE"):
        return None
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    with contextlib.suppress(Exception):
        if netrc.netrc().authenticators(host):
            return "online"
    return "offline"


def build(config) -> list["Tracker"]:
    """The trackers `config.tracker` names, set up on the driver (its environment, its working
    directory); they open where they log (the controller) and when the run ends (the driver)."""
    fs, run_dir = storage.run_path(config.storage_path, config.name)
    local = isinstance(fs, pafs.LocalFileSystem)
    trackers: list[Tracker] = []
    for name in config.trackers:
        if name == "tensorboard":
            trackers.append(TensorBoardTracker())
        elif name == "mlflow":
            uri, note = mlflow_uri(config, run_dir, local)
            if note:
                say_once(config.name, note)
            trackers.append(MlflowTracker(uri, run_params(config), run_tags(config), _carried_env()))
        elif name == "wandb":
            if importlib.util.find_spec("wandb") is None:
                say_once(config.name, "W&B: the wandb package is not installed (pip install 'cape-ray[wandb]'); "
                                      "not tracking with W&B, metrics.jsonl has everything")
                continue
            directory = os.environ.get("WANDB_DIR") or (run_dir if local else os.getcwd())
            trackers.append(WandbTracker(wandb_mode(), directory, os.environ.get("WANDB_PROJECT") or EXPERIMENT,
                                         config.to_dict(), run_tags(config), _carried_env()))
    return trackers


# ----------------------------------------------------------------------------- trackers
class Tracker:
    """What every tracker does. `open` starts or resumes its tracking run; `log` takes points in
    step order; `restart` says a new attempt resumes at `step`; `finish` ends the tracking run."""

    name = ""
    catches_up = True  # back-fills what it missed from the history (TensorBoard's files are their own)
    where = ""  # where it logs, for messages

    def open(self, run: RunInfo) -> None:
        raise NotImplementedError

    def log(self, points: list[Point]) -> None:
        raise NotImplementedError

    def restart(self, step: int, attempt: int) -> None:
        pass

    def finish(self, status: str, files: list[str]) -> None:
        pass

    def close(self) -> None:
        pass

    # Live handles (clients, writers, threads) never travel with the callback to the controller.
    _live: tuple[str, ...] = ()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for key in self._live:
            state[key] = None
        return state


class TensorBoardTracker(Tracker):
    """tensorboardX event files under `{run_dir}/tensorboard/`, one per attempt; a resumed attempt's
    file starts with a purge at its first step, which hides the previous attempt's events from that
    step on (they are redone). On an object store the files are written locally and uploaded after
    every report; a new file every `roll_reports` reports keeps each upload bounded."""

    name = "tensorboard"
    catches_up = False
    _live = ("_writer", "_fs")

    def __init__(self, roll_reports: Optional[int] = ROLL_REPORTS) -> None:
        self.roll_reports = roll_reports
        self._fs: Optional[pafs.FileSystem] = None
        self._remote = ""
        self._writer = None
        self._staging: Optional[str] = None
        self._purge: Optional[int] = None
        self._part = 0  # files written by this attempt
        self._count = 0  # reports in the current file

    def open(self, run: RunInfo) -> None:
        self._fs, self._remote = run.fs, f"{run.run_dir}/{TENSORBOARD_DIR}"

    @property
    def _local(self) -> bool:
        return isinstance(self._fs, pafs.LocalFileSystem)

    def _open_writer(self, attempt: int) -> None:
        from tensorboardX import SummaryWriter

        if self._local:
            logdir = self._remote
        else:
            self._staging = logdir = tempfile.mkdtemp(prefix="cape_ray_tensorboard_")
        os.makedirs(logdir, exist_ok=True)
        # The suffix keeps two attempts (and files) started within one second in separate, ordered files.
        suffix = f".attempt{attempt:03d}" + (f".part{self._part:03d}" if self._part else "")
        self._writer = SummaryWriter(logdir=logdir, purge_step=self._purge, flush_secs=30, filename_suffix=suffix)
        self._purge, self._count = None, 0
        self._part += 1

    def _upload(self) -> None:
        if self._staging is None:
            return
        if self._count <= 1:  # a new file: make sure its directory exists (once per file, not per report)
            self._fs.create_dir(self._remote, recursive=True)
        for name in os.listdir(self._staging):  # one file: this writer's
            with open(os.path.join(self._staging, name), "rb") as local, \
                    self._fs.open_output_stream(f"{self._remote}/{name}") as remote:
                remote.write(local.read())

    def log(self, points: list[Point]) -> None:
        for point in points:
            if self._writer is None:
                self._open_writer(point.attempt)
            for tag, value in point.scalars.items():
                self._writer.add_scalar(tag, value, global_step=point.step)
            self._count += 1
        if self._writer is None:
            return
        self._writer.flush()
        self._upload()
        if not self._local and self.roll_reports and self._count >= self.roll_reports:
            self._close_writer()

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._upload()
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def restart(self, step: int, attempt: int) -> None:
        self._close_writer()
        self._purge, self._part = step, 0

    def close(self) -> None:
        self._close_writer()


def _import_quietly(module: str) -> None:
    with contextlib.suppress(Exception):  # the tracker imports it again, and says what failed
        importlib.import_module(module)


@contextlib.contextmanager
def _quiet():
    """MLflow's and W&B's own warnings (e.g. the file store's maintenance notice) stay out of the run's output."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class MlflowTracker(Tracker):
    """One MLflow run per cape-ray run: parameters (the configuration), tags (versions, git commit,
    device, world size), a metric per tracker tag at the report's global step, and the artifacts."""

    name = "mlflow"
    _live = ("_client",)

    def __init__(self, tracking_uri: str, params: dict[str, str], tags: dict[str, str],
                 env: Optional[dict[str, str]] = None, experiment: Optional[str] = None) -> None:
        self.tracking_uri, self.params, self.tags = tracking_uri, params, tags
        self.where = tracking_uri
        self.env = dict(env or {})
        self.experiment = experiment or self.env.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
        self._client = None
        self.run_id: Optional[str] = None
        self.logged_through = -1  # the last step the MLflow run holds
        self._workers: Optional[int] = None

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        # Unpickled on the controller well before the first report: import MLflow (~2 s) meanwhile,
        # so that the first report, which the workers wait for, does not.
        threading.Thread(target=_import_quietly, args=("mlflow.tracking",), daemon=True).start()

    def _environment(self) -> None:
        os.environ.update(self.env)
        for key, value in MLFLOW_HTTP_DEFAULTS.items():
            if key not in self.env:
                os.environ[key] = value
        if self.tracking_uri.startswith("file:"):
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3 asks file-store users to opt in

    def open(self, run: RunInfo) -> None:
        self._environment()
        with _quiet():
            from mlflow.entities import Param, RunTag
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=self.tracking_uri)
            run_id = (read_ids(run).get("mlflow") or {}).get("run_id")
            found = None
            if run_id:
                try:
                    found = client.get_run(run_id)
                except MlflowException as exc:
                    if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                        raise
                if found is not None and found.info.lifecycle_stage != "active":
                    found = None
            experiment = client.get_experiment_by_name(self.experiment)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(self.experiment)
            if found is None:  # its id may not have been recorded (killed right after creating it)
                quote = '"' if "'" in run.display else "'"
                matches = client.search_runs([experiment_id], max_results=1, filter_string=(
                    f"tags.`cape_ray.run_dir` = {quote}{run.display}{quote}"))
                found = matches[0] if matches else None
            tags = {**self.tags, "cape_ray.run_dir": run.display}
            if found is None:
                created = client.create_run(experiment_id, run_name=run.name, tags=tags)
                self.run_id, self.logged_through = created.info.run_id, -1
                write_ids(run, "mlflow", self._ids(experiment_id))
                params = [Param(k, v) for k, v in self.params.items()]
                for i in range(0, len(params), MLFLOW_PARAM_BATCH):
                    client.log_batch(self.run_id, params=params[i:i + MLFLOW_PARAM_BATCH])
            else:
                self.run_id = found.info.run_id
                write_ids(run, "mlflow", self._ids(found.info.experiment_id))
                if found.info.status != "RUNNING":
                    client.update_run(self.run_id, status="RUNNING")
                logged = found.data.params
                new = [Param(k, v) for k, v in self.params.items() if k not in logged]
                # MLflow parameters are immutable: a rerun's changed flag is a tag of its new value.
                tags.update({f"rerun.{k}": v for k, v in self.params.items() if k in logged and logged[k] != v})
                for i in range(0, len(new), MLFLOW_PARAM_BATCH):
                    client.log_batch(self.run_id, params=new[i:i + MLFLOW_PARAM_BATCH])
                history = client.get_metric_history(self.run_id, MARKER)
                self.logged_through = max((m.step for m in history), default=-1)
            client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        self._client, self._workers = client, None

    def _ids(self, experiment_id: str) -> dict:
        return {"tracking_uri": self.tracking_uri, "experiment_id": experiment_id, "run_id": self.run_id}

    def log(self, points: list[Point]) -> None:
        from mlflow.entities import Metric, RunTag

        fresh = [p for p in points if p.step > self.logged_through]
        if not fresh:
            return
        with _quiet():
            if fresh[-1].workers != self._workers:
                self._client.log_batch(self.run_id, tags=[RunTag("world_size", str(fresh[-1].workers))])
                self._workers = fresh[-1].workers
            batch: list = []
            for point in fresh:
                timestamp = int(point.time * 1000)
                metrics = [Metric(k, v, timestamp, point.step) for k, v in point.scalars.items()]
                if batch and len(batch) + len(metrics) > MLFLOW_BATCH:
                    self._client.log_batch(self.run_id, metrics=batch)
                    batch = []
                batch += metrics
                self.logged_through = point.step  # a failure reopens and asks MLflow again
            self._client.log_batch(self.run_id, metrics=batch)

    def finish(self, status: str, files: list[str]) -> None:
        with _quiet():
            for path in files:
                self._client.log_artifact(self.run_id, path)
            self._client.set_terminated(self.run_id, MLFLOW_STATUS.get(status, "FINISHED"))


class WandbTracker(Tracker):
    """One W&B run per cape-ray run, offline unless the user has configured W&B (WANDB_MODE, an API
    key, `wandb login`). W&B takes steps in increasing order only and drops the others: steps the
    run already holds are not sent again."""

    name = "wandb"
    _live = ("_run",)

    def __init__(self, mode: Optional[str], directory: str, project: str, config: dict[str, Any],
                 tags: dict[str, str], env: Optional[dict[str, str]] = None) -> None:
        self.mode, self.directory, self.project = mode, directory, project
        self.config, self.tags, self.env = config, tags, dict(env or {})
        self._run = None
        self.logged_through = -1

    def open(self, run: RunInfo) -> None:
        os.environ.update(self.env)
        try:
            import wandb
        except ImportError:
            raise TrackerUnavailable("W&B: the wandb package is not installed (pip install 'cape-ray[wandb]')")
        entry = read_ids(run).get("wandb") or {}
        run_id = entry.get("id") or wandb.util.generate_id()
        os.makedirs(self.directory, exist_ok=True)
        options = {"mode": self.mode} if self.mode else {}
        with _quiet():
            self._run = wandb.init(project=entry.get("project") or self.project, name=run.name, id=run_id,
                                   resume="allow", dir=self.directory, config=self.config,
                                   tags=[f"device:{self.tags.get('device')}"], **options)
            self._run.config.update({"versions": self.tags, "run_dir": run.display}, allow_val_change=True)
        write_ids(run, "wandb", {"id": run_id, "project": entry.get("project") or self.project})
        self.logged_through = int(getattr(self._run, "step", 0) or 0) - 1 if getattr(self._run, "resumed", False) else -1

    def log(self, points: list[Point]) -> None:
        for point in points:
            if point.step <= self.logged_through:
                continue
            self._run.log({**point.scalars, "world_size": point.workers}, step=point.step)
            self.logged_through = point.step

    def finish(self, status: str, files: list[str]) -> None:
        import wandb

        with _quiet():
            if files:
                artifact = wandb.Artifact(f"{self._run.name}-summary", type="cape-ray-run")
                for path in files:
                    artifact.add_file(path)
                self._run.log_artifact(artifact)
            self._run.finish(exit_code=0 if status == "finished" else 1)
        self._run = None

    def close(self) -> None:
        if self._run is not None:
            with _quiet(), contextlib.suppress(Exception):
                self._run.finish()
            self._run = None


# ----------------------------------------------------------------------------- failures cost a line
@dataclass
class _Guard:
    """One tracker with its failures contained: the first costs a warning line, then it is tried
    again after RETRY_S, doubling up to RETRY_MAX_S; what it missed meanwhile is kept (trackers that
    catch up) and sent then."""

    tracker: Tracker
    opened: bool = False
    off: bool = False
    down: bool = False
    retry_at: float = 0.0
    delay: float = RETRY_S
    pending: list = field(default_factory=list)
    later: str = f"trying again in {RETRY_S:.0f} s (then less often) and at the end of the run"

    def send(self, run: RunInfo, points: list[Point]) -> None:
        if self.off:
            return
        if self.tracker.catches_up:
            self.pending.extend(points)
            del self.pending[:-MAX_PENDING]
            points = unique_steps(self.pending)
        if not self.opened and time.monotonic() < self.retry_at:
            return
        try:
            if not self.opened:
                self.tracker.open(run)
                self.opened = True
            self.tracker.log(points)
            self.pending, self.delay = [], RETRY_S
            if self.down:
                self.down = False
                say(run.name, f"{self.tracker.name}: tracking works again")
        except TrackerUnavailable as exc:
            self.off = True
            say_once(run.name, f"{exc}; not tracking with {self.tracker.name}, metrics.jsonl has everything")
        except Exception as exc:  # noqa: BLE001 - a tracker never fails the run
            if not self.down:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                first = first if len(first) <= 160 else first[:160] + "..."
                where = f" to {self.tracker.where}" if self.tracker.where else ""
                say(run.name, f"{self.tracker.name}: tracking{where} failed ({type(exc).__name__}: {first}); the run "
                              f"goes on and metrics.jsonl keeps every report; {self.later}")
            self.down, self.opened, self.retry_at = True, False, time.monotonic() + self.delay
            self.delay = min(RETRY_MAX_S, 2 * self.delay)
            with contextlib.suppress(Exception):
                self.tracker.close()


class TrackerSet:
    """The run's trackers as the history callback drives them."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.guards = [_Guard(t) for t in trackers]

    @property
    def trackers(self) -> list[Tracker]:
        return [g.tracker for g in self.guards]

    def catch_up(self, points: list[Point]) -> None:
        """Reports already in the history: sent with the next `log`, past what each tracker holds."""
        for guard in self.guards:
            if guard.tracker.catches_up:
                guard.pending = list(points)

    def log(self, run: RunInfo, points: list[Point]) -> None:
        for guard in self.guards:
            guard.send(run, points)

    def restart(self, step: int, attempt: int) -> None:
        for guard in self.guards:
            with contextlib.suppress(Exception):
                guard.tracker.restart(step, attempt)


# ----------------------------------------------------------------------------- the end of a run
def best_exports(config, run: RunInfo) -> dict:
    """The best exports of the run's latest checkpoint: per --best_metrics entry (the first is the
    primary), its name, epoch, value, metrics and model record, from the export's state.json."""
    from cape_ray import preflight

    state = preflight.latest_state(config) or {}
    from cape_ray.tracking import parse_best_metrics

    bests = (state.get("tracking") or {}).get("best", {})
    order = [m for m, _ in parse_best_metrics(config.best_metrics) if m in bests]  # state.json sorts its keys
    exports = []
    for metric in order + sorted(set(bests) - set(order)):
        tracker = bests[metric]
        if not tracker.get("export"):
            continue
        entry = {"metric": metric, "mode": tracker.get("mode"), "best": tracker.get("best"),
                 "epoch": tracker.get("best_epoch"), "name": tracker["export"], "checkpoint": tracker.get("checkpoint")}
        try:
            with run.fs.open_input_stream(f"{run.run_dir}/{tracker['export']}/{STATE}") as stream:
                export_state = json.loads(stream.read().decode())
            entry.update({"metrics": export_state.get("metrics"), "model": export_state.get("model"),
                          "position": export_state.get("position")})
        except (OSError, ValueError) as exc:
            entry["problem"] = f"state.json unreadable: {exc}"
        exports.append(entry)
    return {"run": config.name, "run_dir": run.display, "epochs_completed": state.get("epoch"), "exports": exports}


def run_uri(config) -> str:
    """`{storage_path}/{name}` as a path or URI (a URI's query options stay at its end)."""
    path = config.storage_path
    if "://" not in path:
        return os.path.join(os.path.abspath(os.path.expanduser(path)), config.name)
    base, _, query = path.partition("?")
    return f"{base.rstrip('/')}/{config.name}" + (f"?{query}" if query else "")


def artifacts(config, run: RunInfo, directory: str) -> list[str]:
    """The files a tracking run gets at the end: the curves PNG and best_exports.json."""
    from cape_ray import plots

    files = []
    try:
        files.append(plots.plot_curves(run_uri(config), os.path.join(directory, f"curves_{config.name}.png")))
    except (FileNotFoundError, ValueError) as exc:  # no validated epoch yet
        log.info("no training curves for the tracker: %s", exc)
    summary = os.path.join(directory, "best_exports.json")
    with open(summary, "w") as out:
        json.dump(best_exports(config, run), out, indent=1)
    files.append(summary)
    return files


def finish(config, run: RunInfo, records: list[dict], status: str) -> None:
    """On the driver after `fit()`: each tracker that keeps a run catches up from the history, gets
    the artifacts and the run's status. A failure costs one line."""
    trackers = [t for t in build(config) if t.catches_up]
    if not trackers:
        return
    points = ReportSeries().feed_all(records)
    with tempfile.TemporaryDirectory(prefix="cape_ray_artifacts_") as directory:
        try:
            files = artifacts(config, run, directory)
        except Exception as exc:  # noqa: BLE001
            say(config.name, f"tracking: could not make the run's artifacts: {exc}")
            files = []
        for tracker in trackers:
            guard = _Guard(tracker, pending=list(points), later="a rerun of this run sends what it missed")
            guard.send(run, [])
            if not guard.opened:
                continue
            try:
                tracker.finish(status, files)
            except Exception as exc:  # noqa: BLE001
                say(config.name, f"{tracker.name}: could not end the tracking run ({type(exc).__name__}: {exc})")
            finally:
                with contextlib.suppress(Exception):
                    tracker.close()
