"""Trackers fed from the run history: MLflow read back from its store (one tracking run per cape-ray
run, one value per metric and step across restarts, reruns and a lost log), a tracking server that
is down, W&B offline and without its package, the timings a report implies, and one real Ray run
whose worker is SIGKILLed mid-run."""

from __future__ import annotations

import importlib.machinery
import json
import logging
import os
import sys
import types
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from cape_ray import history, trackers
from s3_server import free_port
from tiny import make_config
from tracked_edge import run_context, train

NAME = "checkpoint_e{:03d}_lr3e-3_bs2_acc2_qpe2{}"


@pytest.fixture(autouse=True)
def restore_environment():
    """Trackers set MLflow's and W&B's variables in the process that logs; keep them to each test."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def report_metrics(global_step: int, steps_per_epoch: int = 4, value: float = 0.0) -> dict:
    """What the worker reports at `global_step`: a mid-epoch checkpoint, or the epoch's end."""
    epoch, step = (global_step - 1) // steps_per_epoch + 1, (global_step - 1) % steps_per_epoch + 1
    metrics = {"epoch": epoch, "step": step, "global_step": global_step, "validated": int(step == steps_per_epoch),
               "train_loss": 1.0 / global_step + value, "lr": 1e-3, "retention_score": -1.0}
    if metrics["validated"]:
        metrics.update({"val_loss": 0.9 / epoch, "val_pck": 0.1 * epoch + value, "mpck": 0.05 * epoch,
                        **{f"pck@{t:.2f}": t * epoch for t in (0.05, 0.1, 0.15, 0.2, 0.25)},
                        "best_val_pck": 0.1 * epoch, "best_val_loss": 0.9 / epoch, "epoch_time_s": 2.0,
                        "train_time_total_s": 1.5 * epoch, "checkpoint_time_total_s": 0.1 * epoch})
    return metrics


def checkpoint_of(metrics: dict):
    suffix = "" if metrics["validated"] else f"_s{metrics['step']:06d}"
    return SimpleNamespace(path=f"/anywhere/{NAME.format(metrics['epoch'], suffix)}")


def send(callback, context, *steps, value: float = 0.0) -> None:
    for step in steps:
        metrics = report_metrics(step, value=value)
        callback.after_report(context, [metrics], checkpoint_of(metrics))


def mlflow_store(run_dir: Path):
    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    experiment = client.get_experiment_by_name(trackers.EXPERIMENT)
    return client, client.search_runs([experiment.experiment_id])


def metric_values(client, run_id: str) -> dict[str, list]:
    """Every logged (step, value) of every metric of the run."""
    keys = client.get_run(run_id).data.metrics
    return {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)] for key in keys}


# ----------------------------------------------------------------------------- what a report implies
def test_report_series_derives_step_and_checkpoint_time_per_attempt():
    series = trackers.ReportSeries()
    records = [
        {"event": "report", "time": 1.0, "attempt": 1, "workers": 2, **report_metrics(4)},
        {"event": "report", "time": 2.0, "attempt": 1, **report_metrics(8), "train_time_total_s": 5.0,
         "checkpoint_time_total_s": 0.5},
        {"event": "restart", "attempt": 2, "resumed_from": NAME.format(3, "_s000001")},
        {"event": "report", "time": 3.0, "attempt": 2, **report_metrics(12), "train_time_total_s": 0.9,
         "checkpoint_time_total_s": 0.2},
    ]
    first, second, third = series.feed_all(records)
    assert (first.step, first.workers, first.time) == (4, 2, 1.0)
    assert first.scalars["time/step_s"] == pytest.approx(1.5 / 4)  # the attempt's first epoch, from step 0
    assert second.scalars["time/step_s"] == pytest.approx((5.0 - 1.5) / 4)
    assert second.scalars["time/checkpoint_s"] == pytest.approx(0.5 - 0.1)
    assert third.scalars["time/step_s"] == pytest.approx(0.9 / 3)  # resumed at step 1 of epoch 3
    assert third.scalars["time/checkpoint_s"] == pytest.approx(0.2) and third.attempt == 2
    assert list(third.scalars)[-1] == trackers.MARKER  # logged last: it marks the step as held
    assert {"val/pck_0.05", "val/pck_0.25", "val/pck_0.20", "val/loss", "train/loss", "train/lr",
            "time/epoch_s"} <= set(third.scalars)


# ----------------------------------------------------------------------------- MLflow
def test_mlflow_holds_one_run_and_one_value_per_step_across_restarts_reruns_and_a_lost_log(tmp_path):
    config = make_config(tmp_path, "tracked", tracker="mlflow,tensorboard", epochs=3)
    context = run_context(config)
    run_dir = tmp_path / "tracked"
    first = history.RunHistory.for_config(config)
    send(first, context, 1, 2, 3, 4, 5, 6)
    # a fallback from a damaged checkpoint: the group resumes at step 4 and redoes 5 and 6, bitwise
    send(first, context, 5, 6, 7)

    # a driver rerun: a new callback; Ray resumes from step 7
    second = history.RunHistory.for_config(config)
    send(second, context, 8)
    # this driver is killed after the history line of step 9, before MLflow heard of it
    metrics = report_metrics(9)
    history.HistoryWriter(*history.storage.run_path(str(tmp_path), "tracked")).write(
        [{"event": "report", "time": 9.0, "attempt": 3, "checkpoint": NAME.format(3, "_s000001"), "workers": 1,
          **metrics}])

    third = history.RunHistory.for_config(config)  # the next rerun sends step 9 with its first report
    send(third, context, 10, 11, 12)
    history.finish_run(config)

    client, runs = mlflow_store(run_dir)
    assert len(runs) == 1, "one MLflow run per cape-ray run"
    run = runs[0]
    assert json.loads((run_dir / trackers.IDS_FILE).read_text())["mlflow"]["run_id"] == run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    values = metric_values(client, run.info.run_id)
    for key, logged in values.items():
        steps = [step for step, _ in logged]
        assert len(steps) == len(set(steps)), f"{key} holds a step twice: {sorted(steps)}"
    assert sorted(s for s, _ in values[trackers.MARKER]) == list(range(1, 13))
    assert sorted(s for s, _ in values["val/pck_0.20"]) == [4, 8, 12]
    assert sorted(s for s, _ in values["val/pck_0.05"]) == [4, 8, 12]
    assert dict(values["train/loss_running"])[9] == pytest.approx(report_metrics(9)["train_loss"])
    # the rerun resumed at step 3 of epoch 2: its training total covers one step
    assert dict(values["time/step_s"])[8] == pytest.approx(report_metrics(8)["train_time_total_s"] / 1)
    assert {"time/checkpoint_s", "train/lr", "val/loss", "val/mpck"} <= set(values)
    params = run.data.params
    assert params["epochs"] == "3" and params["tracker"] == "mlflow,tensorboard" and params["model_kwargs"] == "{}"
    tags = run.data.tags
    assert tags["world_size"] == "1" and tags["device"] == "cpu" and tags["cape_ray.version"]
    assert {"torch.version", "ray.version", "timm.version", "cape_ray.run_dir"} <= set(tags)
    assert tags["timm.version"] != "not installed"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"curves_tracked.png", "best_exports.json"} <= artifacts
    # TensorBoard alongside: its own files, a purge at each resumed attempt's first step
    assert len(list((run_dir / trackers.TENSORBOARD_DIR).iterdir())) == 4

    # a rerun that changes a flag: MLflow's parameters stay, the new value is a tag
    rerun = config.replace(epochs=4)
    fourth = history.RunHistory.for_config(rerun)
    send(fourth, context, 13)
    run = client.get_run(run.info.run_id)
    assert run.data.params["epochs"] == "3" and run.data.tags["rerun.epochs"] == "4"
    assert run.info.status == "RUNNING"


def test_a_down_tracking_server_costs_a_warning_line_and_the_run_finishes(tmp_path, caplog, monkeypatch):
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    config = make_config(tmp_path, "down", tracker="mlflow", tracking_uri=closed, epochs=1)
    opened = Counter()
    real_open = trackers.MlflowTracker.open

    def counted_open(self, run):
        opened["tries"] += 1
        return real_open(self, run)

    monkeypatch.setattr(trackers.MlflowTracker, "open", counted_open)
    callback = history.RunHistory.for_config(config)
    with caplog.at_level(logging.WARNING, logger="cape_ray"):
        train(config, callback)  # the real loop, in this process: 4 reports
        assert opened["tries"] == 1, "a server that is down is asked again only after RETRY_S"
        history.finish_run(config)
    warnings = [r.getMessage() for r in caplog.records if "mlflow" in r.getMessage()]
    assert len(warnings) == 2, warnings  # one while training, one at the end
    assert f"tracking to {closed} failed" in warnings[0] and "metrics.jsonl keeps every report" in warnings[0]
    assert all("\n" not in w for w in warnings)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"  # seconds, not MLflow's minutes of retries
    records = history.read_history(str(tmp_path / "down"))
    assert [r["global_step"] for r in records if r["event"] == "report"] == [1, 2, 3, 4]
    assert records[-1] == {**records[-1], "event": "end", "status": "finished", "epoch": 1}
    assert not (tmp_path / "down" / trackers.IDS_FILE).exists()


def test_a_tracker_that_comes_back_gets_every_report_it_missed(monkeypatch, caplog):
    clock = [0.0]
    monkeypatch.setattr(trackers.time, "monotonic", lambda: clock[0])

    class Flaky(trackers.Tracker):
        name = "flaky"

        def __init__(self):
            self.up, self.tries, self.logged = False, 0, []

        def open(self, run):
            self.tries += 1
            if not self.up:
                raise ConnectionError("connection refused")

        def log(self, points):
            self.logged += [p.step for p in points]

    flaky = Flaky()
    guard = trackers._Guard(flaky)
    run = trackers.RunInfo(None, "/nowhere", "flaky-run")
    with caplog.at_level(logging.WARNING, logger="cape_ray"):
        for now, step in ((0, 1), (30, 2), (61, 3), (120, 4)):  # tries at 0 and 61, then not before 181
            clock[0] = now
            guard.send(run, [trackers.Point(step, now, {"train/lr": 1.0})])
        assert flaky.tries == 2 and flaky.logged == []
        flaky.up, clock[0] = True, 182
        guard.send(run, [trackers.Point(5, 182, {"train/lr": 1.0}), trackers.Point(4, 182, {"train/lr": 2.0})])
    assert flaky.tries == 3 and flaky.logged == [1, 2, 3, 4, 5]  # once each, in step order
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "tracking failed (ConnectionError: connection refused)" in lines[0] and "works again" in lines[1]


def test_mlflow_store_defaults(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    local = make_config(tmp_path, "a")
    assert trackers.mlflow_uri(local, str(tmp_path / "a"), True) == ((tmp_path / "a" / "mlruns").as_uri(), None)
    uri, note = trackers.mlflow_uri(local.replace(storage_path="s3://bucket/runs"), "bucket/runs/a", False)
    assert uri == (tmp_path / "mlruns").as_uri() and "--tracking_uri" in note
    assert trackers.mlflow_uri(local.replace(tracking_uri="http://mlflow:5000"), "", True)[0] == "http://mlflow:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    assert trackers.mlflow_uri(local, "", True)[0] == "sqlite:///mlflow.db"
    assert trackers.mlflow_uri(local.replace(tracking_uri="stores"), "", True)[0] == (tmp_path / "stores").as_uri()
    assert make_config(tmp_path, tracker=["mlflow", "tensorboard"]).trackers == ("mlflow", "tensorboard")


# ----------------------------------------------------------------------------- W&B
def test_wandb_without_its_package_is_one_warning_line(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None if name == "wandb" else object())
    trackers._said.clear()
    config = make_config(tmp_path, "nowandb", tracker="wandb,tensorboard")
    with caplog.at_level(logging.WARNING, logger="cape_ray"):
        built = [t.name for t in trackers.build(config)]
        trackers.build(config)  # the callback's and the driver's: still one line
    assert built == ["tensorboard"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "pip install 'cape-ray[wandb]'" in lines[0]


class FakeWandbRun:
    def __init__(self, resumed_step=None, **options):
        self.options, self.name, self.logged, self.artifacts, self.exit_code = options, options["name"], [], [], None
        self.resumed, self.step = resumed_step is not None, resumed_step or 0
        self.config = SimpleNamespace(update=lambda values, allow_val_change: self.options.update(extra=values))

    def log(self, values, step):
        self.logged.append((step, values))

    def log_artifact(self, artifact):
        self.artifacts.append(artifact)

    def finish(self, exit_code=0):
        self.exit_code = exit_code


def test_wandb_is_offline_unless_configured_and_keeps_one_run_id(tmp_path, monkeypatch):
    runs: list[FakeWandbRun] = []
    resumed_step = {"value": None}

    def init(**options):
        runs.append(FakeWandbRun(resumed_step["value"], **options))
        return runs[-1]

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init, fake.util = init, SimpleNamespace(generate_id=lambda: "run0id")
    fake.Artifact = lambda name, type: SimpleNamespace(name=name, files=[], add_file=lambda p: None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: not logged in
    config = make_config(tmp_path, "wb", tracker="wandb")
    context = run_context(config)

    send(history.RunHistory.for_config(config), context, 1, 2, 3)
    assert runs[0].options == {**runs[0].options, "id": "run0id", "resume": "allow", "mode": "offline",
                               "dir": str(tmp_path / "wb"), "project": "cape-ray", "name": "wb"}
    assert runs[0].options["config"]["epochs"] == config.epochs
    assert [step for step, _ in runs[0].logged] == [1, 2, 3]

    resumed_step["value"] = 4  # the rerun finds W&B holding steps up to 3
    send(history.RunHistory.for_config(config), context, 3, 4)
    assert runs[1].options["id"] == "run0id" and [step for step, _ in runs[1].logged] == [4]
    history.finish_run(config, "storage full")
    assert runs[2].exit_code == 1 and len(runs[2].artifacts) == 1
    assert json.loads((tmp_path / "wb" / trackers.IDS_FILE).read_text())["wandb"] == {"id": "run0id",
                                                                                      "project": "cape-ray"}
    monkeypatch.setenv("WANDB_API_KEY", "key")
    assert trackers.wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert trackers.wandb_mode() is None  # W&B reads it itself


# ----------------------------------------------------------------------------- a real Ray run
@pytest.mark.slow
def test_killed_worker_and_a_redone_epoch_leave_one_mlflow_value_per_metric_and_step(ray_cluster, tmp_path):
    """A worker SIGKILLed mid-run, then a driver rerun with one more epoch whose latest checkpoint is
    damaged: it falls back to epoch 1 and redoes epoch 2 (steps 5-8 are in the history twice)."""
    from ray import cloudpickle

    import faults
    from cape_ray import job, runs

    cloudpickle.register_pickle_by_value(faults)
    config = make_config(tmp_path, "killed", tracker="mlflow", max_failures=1)
    # 4 steps of 2 micro-batches per epoch, a checkpoint at every step: call 11 is epoch 2, step 2
    plan = {"rank": 0, "kill_at_call": 11, "marker": str(tmp_path / "killed.marker"),
            "log": str(tmp_path / "starts.log")}
    job.run(config, train_fn=faults.train_with_faults, train_loop_config={**config.to_dict(), "_fault_plan": plan})
    assert Path(plan["marker"]).exists(), "the worker was never killed"
    run_dir = tmp_path / "killed"
    model = next((run_dir / "checkpoint_e002_lr3e-3_bs2_acc2_qpe2").glob("model.*"))
    model.write_bytes(model.read_bytes()[:-64])  # the latest checkpoint no longer verifies
    job.run(config.replace(epochs=3))

    records = history.read_history(str(run_dir))
    events = [r["event"] for r in records]
    assert events.count("start") == events.count("end") == 2 and {"failure", "restart"} <= set(events)
    reported = Counter(r["global_step"] for r in records if r["event"] == "report")
    assert sorted(reported) == list(range(1, 13)) and reported[8] == 2  # epoch 2 was redone
    first_report = {}
    for r in records:
        if r["event"] == "report":
            first_report.setdefault(r["global_step"], r)

    client, found = mlflow_store(run_dir)
    assert len(found) == 1 and found[0].info.status == "FINISHED"
    values = metric_values(client, found[0].info.run_id)
    for key, logged in values.items():
        steps = [step for step, _ in logged]
        assert len(steps) == len(set(steps)), f"{key} holds a step twice: {sorted(steps)}"
    assert sorted(s for s, _ in values[trackers.MARKER]) == list(range(1, 13))
    assert sorted(s for s, _ in values["val/pck_0.20"]) == [4, 8, 12]
    # A step is logged once: a redone one keeps its first value (here the rerun's 3-epoch learning-rate
    # schedule changed the redone epoch's numbers; metrics.jsonl and TensorBoard show the redone ones).
    for step, value in values["val/pck_0.20"]:
        assert value == first_report[step]["val_pck"]
    for step, value in values["train/loss_running"]:
        assert value == first_report[step]["train_loss"]
    run = found[0]
    assert run.data.params["epochs"] == "2" and run.data.tags["rerun.epochs"] == "3"
    assert run.data.tags["world_size"] == "1" and run.data.tags.get("cape_ray.git_commit")  # a git checkout here
    best = json.loads(Path(client.download_artifacts(run.info.run_id, "best_exports.json", str(tmp_path)))
                      .read_text())
    assert best["exports"][0]["metric"] == "val_pck" and best["exports"][0]["name"].startswith("checkpoint_best_pck")
    assert best["exports"][0]["model"]["fingerprint"] and best["epochs_completed"] == 3
    assert not (run_dir / trackers.TENSORBOARD_DIR).exists()  # --tracker mlflow alone
    (listed,) = runs.list_runs(str(tmp_path))
    assert (listed["name"], listed["status"], listed["epochs_done"], listed["epochs_planned"]) == (
        "killed", "finished", 3, 3)
