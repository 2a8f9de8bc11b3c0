"""`--storage_path s3://...` end to end, against an S3-compatible server on loopback.

moto's server mode stands in for S3; everything else is real: pyarrow's S3 client in the driver,
the Ray Train controller and the workers, a worker SIGKILLed once mid-epoch, then a driver rerun of
the same name with more epochs. The checks read the bucket back through pyarrow.

The endpoint and credentials travel inside the storage URI (pyarrow's `s3://KEY:SECRET@bucket/...
?endpoint_override=...&scheme=http`): the filesystem Ray builds from it is pickled to the controller
and workers with its options, so no environment variable has to reach processes that were started
before this test (the session's Ray instance is shared).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from cape_ray import checkpoint as ckpt, storage
from cape_ray.job import build_trainer
from s3_server import BUCKET, s3_uri
from tiny import make_config, write_checkpoint

pytestmark = pytest.mark.slow


def test_uri_query_carries_endpoint_and_credentials(s3_endpoint):
    fs, path = storage.resolve(s3_uri(s3_endpoint, "probe"))
    assert isinstance(fs, pafs.S3FileSystem) and path == f"{BUCKET}/probe"
    with fs.open_output_stream(f"{path}/x/file") as out:
        out.write(b"1")
    assert storage.list_dirs(fs, path, "") == ["x"]
    storage.delete_dir(fs, f"{path}/x")
    assert not storage.exists(fs, f"{path}/x")


def test_size_check_reads_the_manifest_only_and_the_full_check_every_byte(s3_endpoint, tmp_path):
    local = write_checkpoint(tmp_path / "local", "checkpoint_e001", make_config(tmp_path), ranks=2)
    fs, path = storage.resolve(s3_uri(s3_endpoint, "checks/checkpoint_e001"))
    storage.upload_checkpoint(str(local), fs, path)
    assert storage.size_problems(fs, path) == [] and storage.problems(fs, path) == []

    data = bytearray((local / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # corrupted in place, same size
    with fs.open_output_stream(f"{path}/optimizer.pt") as out:
        out.write(bytes(data))
    assert storage.size_problems(fs, path) == []
    assert storage.problems(fs, path) == [f"s3://{path}/optimizer.pt does not match its SHA-256 in the manifest "
                                          f"(corrupted)"]

    with fs.open_output_stream(f"{path}/rng/rank_00002.pt") as out:  # not listed
        out.write(b"x")
    fs.delete_file(f"{path}/rng/rank_00001.pt")
    assert storage.size_problems(fs, path) == [
        f"s3://{path}/rng/rank_00001.pt is missing",
        f"s3://{path}/rng/rank_00002.pt is not listed in s3://{path}/manifest.json (not written with this "
        f"checkpoint): remove it, or use another checkpoint"]
    fs.delete_file(f"{path}/manifest.json")
    assert storage.size_problems(fs, path) == [f"s3://{path}/manifest.json is missing (checkpoint incomplete)"]


def test_killed_worker_and_driver_rerun_on_s3(ray_cluster, s3_endpoint, tmp_path):
    from ray import cloudpickle

    import faults

    cloudpickle.register_pickle_by_value(faults)
    uri = s3_uri(s3_endpoint, "runs")
    config = make_config(uri, "s3run")
    # compute_loss runs 8 times per epoch (4 steps x 2 micro-batches): call 14 is epoch 2, step 3.
    plan = {"rank": 0, "kill_at_call": 14, "marker": str(tmp_path / "killed.marker"),
            "log": str(tmp_path / "starts.log")}

    def fit(cfg):
        return build_trainer(cfg, faults.train_with_faults, {**cfg.to_dict(), "_fault_plan": plan}).fit()

    first = fit(config)
    assert first.error is None
    assert os.path.exists(plan["marker"]), "the worker was never killed"
    second = fit(config.replace(epochs=3))  # a driver rerun of the same name and storage
    assert second.error is None

    starts = [line.split("checkpoint=")[1] for line in Path(plan["log"]).read_text().splitlines()]
    assert len(starts) == 3, starts  # first attempt, restart after the kill, driver rerun
    assert starts[0] == "-"
    assert ckpt.position_from_name(starts[1]) in {(2, 1), (2, 2)}, f"restart resumed from {starts[1]}"
    assert starts[2] == ckpt.checkpoint_name(config, 2), f"the rerun resumed from {starts[2]}"

    # Read the bucket back with a client of its own.
    fs, run_dir = storage.run_path(uri, "s3run")
    assert isinstance(fs, pafs.S3FileSystem) and run_dir == f"{BUCKET}/runs/s3run"
    assert storage.exists(fs, f"{run_dir}/checkpoint_manager_snapshot.json")
    assert second.checkpoint.path == f"{run_dir}/{ckpt.checkpoint_name(config, 3)}"

    with tempfile.TemporaryDirectory() as scratch:
        final = ckpt.load_checkpoint(storage.download(fs, second.checkpoint.path, scratch))
    history = final.state["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert final.state["position"]["global_step"] == 12

    # Retention on S3: top-2 by val_pck + latest + the two best exports; mid-epoch ones deleted.
    by_score = sorted(history, key=lambda h: (h["retention_score"], h["epoch"]))
    top = {ckpt.checkpoint_name(config, h["epoch"]) for h in by_score[-2:]}
    latest = {ckpt.checkpoint_name(config, 3)}
    best_pck = max(history, key=lambda h: (h["val_pck"], -h["epoch"]))
    best_loss = min(history, key=lambda h: (h["val_loss"], h["epoch"]))
    exports = {ckpt.best_export_name("val_pck", best_pck["epoch"], best_pck),
               ckpt.best_export_name("val_loss", best_loss["epoch"], best_loss)}
    assert set(storage.list_dirs(fs, run_dir)) == top | latest | exports
    for name in top | latest | exports:
        assert storage.problems(fs, f"{run_dir}/{name}") == [], f"{name} does not verify"
