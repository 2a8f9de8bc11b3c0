"""metrics.jsonl and TensorBoard history: the callback alone (failures, restarts, reruns, truncated
files, object stores) and one real tiny Ray run, rerun by a second driver with more epochs, whose
history, curves, prediction grid and evaluation the later tests check."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs as pafs
import pytest
from ray.exceptions import ActorDiedError
from ray.train import RunConfig

from cape_ray import checkpoint as ckpt, cli, evaluate, history, plots
from tiny import TINY

# ----------------------------------------------------------------------------- the callback alone


def context(storage_path: str, name: str = "run", filesystem=None) -> SimpleNamespace:
    return SimpleNamespace(run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=filesystem))


def report(callback, ctx, global_step: int, epoch: int = 1, checkpoint: str | None = None, workers: int = 1,
           validated: int = 0) -> None:
    metrics = {"epoch": epoch, "step": global_step, "global_step": global_step, "validated": validated,
               "train_loss": 1.0 / global_step, "val_pck": 0.5 if validated else -1.0, "lr": 1e-3}
    saved = None if checkpoint is None else SimpleNamespace(path=f"/anywhere/run/{checkpoint}")
    callback.after_report(ctx, [metrics] * workers, saved)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_same_exception_in_two_attempts_is_two_failures(tmp_path):
    """A training function's exception ends its attempt at once: the same words again come from
    the next attempt (a storage failure that outlasts its retries, attempt after attempt)."""
    ctx = context(str(tmp_path))
    callback = history.RunHistory(tensorboard=False)
    report(callback, ctx, 2)
    for _ in range(3):
        callback.after_exception(ctx, {0: RuntimeError("cannot store checkpoint")})
    records = lines(tmp_path / "run" / history.METRICS_FILE)
    assert [r["event"] for r in records] == ["report", "failure", "failure", "failure"]
    assert [r["attempt"] for r in records] == [1, 1, 2, 3]


def test_failures_restarts_and_reruns_are_appended(tmp_path):
    ctx = context(str(tmp_path))
    callback = history.RunHistory(tensorboard=False)
    report(callback, ctx, 2)
    report(callback, ctx, 4, checkpoint="checkpoint_e001_lr1e-3_bs2_acc1_qpe2_s000004")
    died = ActorDiedError()
    callback.after_exception(ctx, {1: died})
    callback.after_exception(ctx, {1: died})  # the same dead worker, polled again
    report(callback, ctx, 6, checkpoint="checkpoint_e001_lr1e-3_bs2_acc1_qpe2_s000006")
    report(callback, ctx, 6)  # the global step did not advance: restarted from an earlier checkpoint
    report(callback, ctx, 8, workers=2)  # the group was resized

    rerun = history.RunHistory(tensorboard=False)  # a new driver: a new callback object
    report(rerun, ctx, 10, epoch=2, validated=1)

    records = lines(tmp_path / "run" / history.METRICS_FILE)
    assert [r["event"] for r in records] == ["report", "report", "failure", "restart", "report", "restart", "report",
                                            "restart", "report", "restart", "report"]
    assert [r["attempt"] for r in records] == [1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    failure, restart = records[2], records[3]
    assert failure["ranks"] == [1] and failure["error"].startswith("ActorDiedError: ")
    assert restart == {**restart, "reason": "worker_failure", "previous_global_step": 4, "global_step": 6,
                       "resumed_from": "checkpoint_e001_lr1e-3_bs2_acc1_qpe2_s000004"}
    assert [r["reason"] for r in records if r["event"] == "restart"] == [
        "worker_failure", "global_step_went_back", "workers_changed", "driver_rerun"]
    assert records[-2]["resumed_from"] == "checkpoint_e001_lr1e-3_bs2_acc1_qpe2_s000006"
    assert records[1]["checkpoint"] == "checkpoint_e001_lr1e-3_bs2_acc1_qpe2_s000004"
    assert records[0]["checkpoint"] is None
    assert records[-1]["workers"] == 1 and records[-3]["workers"] == 2


def test_a_line_cut_by_a_crash_is_skipped_and_appending_goes_on(tmp_path):
    ctx = context(str(tmp_path))
    report(history.RunHistory(tensorboard=False), ctx, 2, checkpoint="checkpoint_e001_x_s000002")
    path = tmp_path / "run" / history.METRICS_FILE
    path.write_text(path.read_text() + '{"event": "report", "attempt": 1, "glo')  # driver killed mid-write
    report(history.RunHistory(tensorboard=False), ctx, 2)
    records = history.read_history(str(tmp_path / "run"))
    assert [(r["event"], r["attempt"]) for r in records] == [("report", 1), ("restart", 2), ("report", 2)]
    assert records[1]["resumed_from"] == "checkpoint_e001_x_s000002"


def test_object_store_history_is_segments_read_back_in_order_with_rolled_tensorboard_files():
    fs = pafs._MockFileSystem()  # an in-memory filesystem that cannot append, like S3
    ctx = context("bucket/runs", filesystem=fs)
    # an older run's single file comes first; this version never rewrites it
    fs.create_dir("bucket/runs/run")
    with fs.open_output_stream("bucket/runs/run/metrics.jsonl") as out:
        out.write(b'{"event": "report", "attempt": 1, "global_step": 1, "epoch": 1}\n')
    callback = history.RunHistory()
    total = history.SEGMENT_RECORDS + 8
    for step in range(2, total + 1):
        report(callback, ctx, step, validated=int(step == total))
    segments = history.segment_paths(fs, "bucket/runs/run")
    assert [p.rsplit("/", 1)[-1] for p in segments] == ["000001.jsonl", "000002.jsonl"]
    sizes = [len(history.parse_lines(fs.open_input_stream(p).read())) for p in segments]
    assert sizes == [history.SEGMENT_RECORDS, total - history.SEGMENT_RECORDS]  # the restart line included
    with fs.open_input_stream("bucket/runs/run/metrics.jsonl") as stream:
        assert len(stream.read().splitlines()) == 1
    records = history.read_records(fs, "bucket/runs/run")
    assert [r["event"] for r in records[:2]] == ["report", "restart"]  # a driver rerun of the older run
    assert [r["global_step"] for r in records if r["event"] == "report"] == list(range(1, total + 1))
    assert history.read_tail(fs, "bucket/runs/run") == records[-(total - history.SEGMENT_RECORDS):]

    # a new writer (a driver rerun) starts a segment of its own
    history.RunHistory(tensorboard=False).after_report(ctx, [{"global_step": total + 1, "epoch": 2}], None)
    assert history.segment_paths(fs, "bucket/runs/run")[-1].endswith("000003.jsonl")
    assert history.read_records(fs, "bucket/runs/run")[-1]["global_step"] == total + 1

    # TensorBoard: a new event file every ROLL_REPORTS reports, so no upload grows with the run
    events = fs.get_file_info(pafs.FileSelector("bucket/runs/run/tensorboard"))
    names = sorted(e.base_name for e in events)
    assert len(names) == 2 and names[0].endswith(".attempt002") and names[1].endswith(".attempt002.part001")
    assert all(e.size > 0 for e in events)


def test_tensorboard_scalars_name_every_report_key():
    validated = {"epoch": 1, "step": 4, "global_step": 4, "validated": 1, "train_loss": 0.25, "val_pck": 0.5,
                 "pck@0.10": 0.3, "lr": 1e-3, "reason": "scheduled", "is_best_pck": True}
    assert history.tensorboard_scalars(validated) == {"train/loss": 0.25, "val/pck_0.20": 0.5, "val/pck_0.10": 0.3,
                                                      "train/lr": 1e-3, "progress/epoch": 1.0}
    mid_epoch = {**validated, "validated": 0, "val_pck": -1.0}  # val_pck is a placeholder there
    assert history.tensorboard_scalars(mid_epoch) == {"train/loss_running": 0.25, "train/lr": 1e-3,
                                                      "progress/epoch": 1.0}


# ----------------------------------------------------------------------------- a real run
# The shared tiny run with one micro-batch per step: 8 steps per epoch, a mid-epoch checkpoint at step 4.
TINY_RUN = dict(accumulation_steps=1, checkpoint_every_steps=4, keep=100, max_failures=0)


@pytest.fixture(scope="module")
def tiny_run(ray_cluster, tmp_path_factory):
    """A 2-epoch run, then the same run rerun by a new driver with 3 epochs (it resumes and appends)."""
    from cape_ray.job import build_trainer
    from tiny import make_config

    storage = tmp_path_factory.mktemp("history")
    config = make_config(storage, "tiny", **TINY_RUN)
    assert build_trainer(config).fit().error is None
    assert build_trainer(config.replace(epochs=3)).fit().error is None
    return storage / "tiny"


def read_events(path: Path) -> list:
    """Events of a TensorBoard file (TFRecord framing: length, crc, payload, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    data, events, offset = path.read_bytes(), [], 0
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        payload = data[offset + 12:offset + 12 + length]
        events.append(Event.FromString(payload))
        offset += 12 + length + 4
    return events


@pytest.mark.slow
def test_run_history_has_one_line_per_report_and_the_rerun_marker(tiny_run):
    records = history.read_history(str(tiny_run))
    reports = [r for r in records if r["event"] == "report"]
    # 8 steps per epoch, a mid-epoch checkpoint at step 4: two reports per epoch, 3 epochs
    assert [(r["epoch"], r["step"], r["attempt"]) for r in reports] == [
        (1, 4, 1), (1, 8, 1), (2, 4, 1), (2, 8, 1), (3, 4, 2), (3, 8, 2)]
    assert [r["event"] for r in records].index("restart") == 4
    restart = records[4]
    assert restart["attempt"] == 2 and restart["reason"] == "driver_rerun"
    assert restart["resumed_from"] == "checkpoint_e002_lr3e-3_bs2_acc1_qpe2"
    for r in reports:
        assert (tiny_run / r["checkpoint"]).is_dir() and r["workers"] == 1
        assert {"train_loss", "lr", "global_step", "time"} <= set(r)
    validated = [r for r in reports if r["validated"]]
    assert all({"val_loss", "val_pck", "pck@0.05", "pck@0.25", "mpck", "epoch_time_s"} <= set(r) for r in validated)
    final = ckpt.load_checkpoint(tiny_run / "checkpoint_e003_lr3e-3_bs2_acc1_qpe2")
    assert [h["val_pck"] for h in final.state["history"]] == [r["val_pck"] for r in validated]


@pytest.mark.slow
def test_tensorboard_has_one_file_per_attempt(tiny_run):
    files = sorted((tiny_run / history.TENSORBOARD_DIR).iterdir())
    assert [f.name.rsplit(".", 1)[-1] for f in files] == ["attempt001", "attempt002"]
    pck = {}
    for f in files:
        for event in read_events(f):
            for value in event.summary.value:
                if value.tag == "val/pck_0.20":
                    pck[event.step] = value.simple_value
    assert sorted(pck) == [8, 16, 24]
    # the rerun's file starts by purging steps from its first one on (they would be redone work)
    starts = [e.step for e in read_events(files[1]) if e.WhichOneof("what") == "session_log"]
    assert starts == [20]


@pytest.mark.slow
def test_plot_and_show_from_the_run(tiny_run, tmp_path, capsys):
    curves = tmp_path / "curves.png"
    assert cli.main(["plot", str(tiny_run), "--out", str(curves)]) == 0
    grid = tmp_path / "grid.png"
    best = next(p for p in tiny_run.iterdir() if p.name.startswith("checkpoint_best_pck_"))
    assert cli.main(["show", str(best), "--split", "val", "--episodes", "3", "--queries", "2", "--out", str(grid),
                     "--device", "cpu"]) == 0
    from PIL import Image

    with Image.open(curves) as image:
        assert image.size == plots.curves_size() and image.getextrema() != ((255, 255),) * 3
    with Image.open(grid) as image:
        assert image.size == plots.grid_size(3, 1 + 2)
    series = plots.epoch_series(history.read_history(str(tiny_run)))
    assert series["epochs"] == [1, 2, 3] and [r["x"] for r in series["restarts"]] == [2.0]


@pytest.mark.slow
def test_evaluate_reproduces_the_runs_validation(tiny_run):
    """On the val split with the training's episode settings, evaluation scores exactly the episodes
    training validated on, so it must find the PCK training recorded."""
    name = "checkpoint_e003_lr3e-3_bs2_acc1_qpe2"
    report = evaluate.run(str(tiny_run / name), "val", episodes=TINY["val_episodes"],
                          queries=TINY["val_queries_per_episode"], device="cpu", with_loss=True)
    recorded = ckpt.load_checkpoint(tiny_run / name).state["metrics"]
    assert report["mean_over_pairs"]["pck@0.20"] == pytest.approx(recorded["val_pck"], abs=1e-6)
    assert report["mean_over_pairs"]["loss"] == pytest.approx(recorded["val_loss"], rel=1e-5)


@pytest.mark.slow
def test_a_killed_worker_leaves_a_failure_and_a_restart_line(ray_cluster, tmp_path):
    from ray import cloudpickle

    import faults
    from cape_ray.job import build_trainer
    from tiny import make_config

    cloudpickle.register_pickle_by_value(faults)
    config = make_config(tmp_path, "killed", **{**TINY_RUN, "epochs": 1, "max_failures": 1})
    # one micro-batch per step: call 6 is step 6 of epoch 1, after the mid-epoch checkpoint of step 4
    plan = {"rank": 0, "kill_at_call": 6, "marker": str(tmp_path / "killed.marker"),
            "log": str(tmp_path / "starts.log")}
    result = build_trainer(config, faults.train_with_faults, {**config.to_dict(), "_fault_plan": plan}).fit()
    assert result.error is None and Path(plan["marker"]).exists()

    records = history.read_history(str(tmp_path / "killed"))
    events = [r["event"] for r in records]
    assert events.count("failure") == 1 and events.count("restart") == 1
    failure, restart = records[events.index("failure")], records[events.index("restart")]
    assert events.index("restart") > events.index("failure")
    assert failure["attempt"] == 1 and failure["ranks"] == [0] and restart["attempt"] == 2
    assert restart["reason"] == "worker_failure"
    before = [r["checkpoint"] for r in records[:events.index("failure")] if r.get("checkpoint")]
    assert restart["resumed_from"] == (before[-1] if before else None)
    # what the restarted worker was handed (the report just before a kill is often lost: then none)
    resumed = Path(plan["log"]).read_text().splitlines()[-1].split("checkpoint=")[1]
    assert restart["resumed_from"] == (None if resumed == "-" else resumed)
    after = [r for r in records[events.index("restart") + 1:] if r["event"] == "report"]
    assert after and all(r["attempt"] == 2 for r in after) and after[-1]["epoch"] == 1 and after[-1]["validated"] == 1
