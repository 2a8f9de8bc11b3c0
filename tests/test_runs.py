"""`cape-ray runs`: real run directories made by the training loop in this process (one finished, one
whose worker died), the statuses that need a crash or a live driver made from copies of them, and
the same listing on S3 (a moto server on loopback)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from cape_ray import cli, history, lease, runs
from s3_server import s3_uri
from tiny import make_config
from tracked_edge import train


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    """Two runs of the real loop: `done` (2 epochs, ended by its driver) and `crashed` (its worker
    died at the 5th report, epoch 2, and nothing restarted it)."""
    root = tmp_path_factory.mktemp("runs")
    done = make_config(root, "done", tracker="none")
    history.record_start(done)
    train(done, history.RunHistory.for_config(done))
    history.finish_run(done)
    crashed = make_config(root, "crashed", tracker="none", epochs=3)
    history.record_start(crashed)
    train(crashed, history.RunHistory.for_config(crashed), crash_after=5, resume=False)
    return root


def copy_run(storage: Path, source: str, name: str, tmp_path: Path) -> Path:
    shutil.copytree(storage / source, tmp_path / name)
    return tmp_path / name


def by_name(listed: list[dict]) -> dict[str, dict]:
    return {r["name"]: r for r in listed}


def test_finished_and_preempted_runs_of_the_real_loop(storage, capsys):
    assert cli.main(["runs", str(storage), "--json"]) == 0
    listed = by_name(json.loads(capsys.readouterr().out))
    done, crashed = listed["done"], listed["crashed"]
    assert (done["status"], done["epochs_done"], done["epochs_planned"]) == ("finished", 2, 2)
    assert 0 < done["best_pck"] <= 1 and done["best_loss"] > 0
    final = json.loads((storage / "done" / "checkpoint_e002_lr3e-3_bs2_acc2_qpe2" / "state.json").read_text())
    assert (done["best_pck"], done["best_loss"]) == (final["best_pck"], final["best_val_loss"])
    assert (crashed["status"], crashed["epochs_done"], crashed["epochs_planned"]) == ("preempted", 1, 3)
    assert crashed["note"].startswith("workers failed")
    assert done["last_update"].endswith("Z") and done["path"] == str(storage / "done")

    assert cli.main(["runs", str(storage)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["NAME", "STATUS", "EPOCHS"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert rows["done"][1:3] == ["finished", "2/2"] and rows["crashed"][1:3] == ["preempted", "1/3"]


def test_failed_running_and_killed_driver_runs(storage, tmp_path, capsys):
    # a driver that saw its run fail (e.g. out of --max_failures) wrote so
    copy_run(storage, "crashed", "failed", tmp_path)
    history.finish_run(make_config(tmp_path, "failed", tracker="none", epochs=3), RuntimeError("out of retries\nmore"))
    # a driver killed mid-run: the history just stops
    killed = copy_run(storage, "crashed", "killed", tmp_path)
    lines = (killed / history.METRICS_FILE).read_text().splitlines()
    (killed / history.METRICS_FILE).write_text("\n".join(line for line in lines if '"failure"' not in line) + "\n")
    # a driver killed after the last checkpoint, before its end line: the checkpoint says it is done
    complete = copy_run(storage, "done", "complete", tmp_path)
    lines = (complete / history.METRICS_FILE).read_text().splitlines()
    (complete / history.METRICS_FILE).write_text("\n".join(lines[:-1]) + "\n")
    # a run whose driver is alive (another process on this machine holds its lease)
    live = copy_run(storage, "crashed", "live", tmp_path)
    driver = subprocess.Popen(["sleep", "60"])
    try:
        record = {"token": "t" * 16, "host": "here", "pid": driver.pid, "process_start": lease.process_start(driver.pid),
                  "machine": lease.machine_id(), "heartbeat": time.time(), "started": "now"}
        (live / lease.LEASE_FILE).write_text(json.dumps(record))
        listed = by_name(runs.list_runs(str(tmp_path)))
    finally:
        driver.kill()
        driver.wait()
    assert listed["failed"]["status"] == "failed" and listed["failed"]["note"] == "RuntimeError: out of retries"
    assert listed["killed"]["status"] == "preempted" and "driver killed" in listed["killed"]["note"]
    assert listed["complete"]["status"] == "finished" and listed["complete"]["epochs_done"] == 2
    assert listed["live"]["status"] == "running" and f"pid {driver.pid}" in listed["live"]["note"]
    assert by_name(runs.list_runs(str(tmp_path)))["live"]["status"] == "preempted"  # its driver is gone now
    assert next(iter(listed)) == "live"  # the most recently updated first

    assert cli.main(["runs", str(tmp_path / "nowhere")]) == 1
    assert capsys.readouterr().err.count("\n") == 1


def test_read_tail_of_a_long_local_history_reads_its_end(tmp_path):
    writer = history.HistoryWriter(pafs.LocalFileSystem(), str(tmp_path))
    records = [{"event": "report", "global_step": i, "padding": "x" * 200} for i in range(1000)]
    writer.write(records)
    tail = history.read_tail(pafs.LocalFileSystem(), str(tmp_path))
    assert tail == records[-len(tail):] and 100 < len(tail) < 1000


def test_runs_on_s3_read_segments_snapshot_and_state(storage, s3_endpoint):
    uri = s3_uri(s3_endpoint, "listed")
    fs, base = history.storage.resolve(uri)
    pafs.copy_files(str(storage / "crashed"), f"{base}/crashed", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)
    # Ray's snapshot names the latest checkpoint it registered
    snapshot = {"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_e001_lr3e-3_bs2_acc2_qpe2"}}
    with fs.open_output_stream(f"{base}/crashed/checkpoint_manager_snapshot.json") as out:
        out.write(json.dumps(snapshot).encode())
    history.finish_run(make_config(uri, "crashed", tracker="none", epochs=3), "StorageError: bucket quota")
    assert [p.rsplit("/", 1)[-1] for p in history.segment_paths(fs, f"{base}/crashed")] == ["000001.jsonl"]
    records = history.read_history(f"{uri.split('?')[0]}/crashed?{uri.split('?')[1]}")
    local = history.read_history(str(storage / "crashed"))
    assert records[:-1] == local and records[-1]["status"] == "failed"
    (listed,) = runs.list_runs(uri)
    assert (listed["name"], listed["status"], listed["epochs_done"], listed["epochs_planned"]) == (
        "crashed", "failed", 1, 3)
    assert listed["note"] == "StorageError: bucket quota" and listed["path"].startswith("s3://")
