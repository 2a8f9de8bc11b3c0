"""A storage path that fills up: the run stops with one line naming the path and the bytes needed,
without spending restarts on a failure that would repeat, and a rerun after space is freed resumes.

The storage is a real small filesystem (a tmpfs mounted by the test); the driver is a real
`cape-ray train` process on the session's Ray instance. Mounting needs root: where the machine
does not allow it, the test says so and skips (the same decisions are tested without a mount in
test_checkpointer.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cape_ray import checkpoint as ckpt
from tiny import cli_flags, make_config, write_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path):
    """Mount a tmpfs; yields (path, resize(bytes))."""
    mount = tmp_path / "small"
    mount.mkdir()

    def resize(size: int) -> None:
        options = f"size={size}" if not os.path.ismount(mount) else f"remount,size={size}"
        command = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")

    try:
        yield mount, resize
    finally:
        if os.path.ismount(mount):
            subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_storage_is_retried_then_restarted_then_stops_in_one_line_and_a_rerun_resumes(ray_cluster, small_disk, tmp_path):
    mount, resize = small_disk
    size = sum(p.stat().st_size for p in write_checkpoint(tmp_path / "probe", "c", make_config(tmp_path))
               .rglob("*") if p.is_file())
    # Epoch 1 stores its mid-epoch checkpoint (1 x size), then its end (1 x size) with two new best
    # exports (2 x size). What is left cannot hold epoch 2's first checkpoint (size + 1 MB margin).
    resize(4 * size + ckpt.DISK_MARGIN_BYTES + 512 * 1024)
    config = make_config(mount, "full", epochs=2, checkpoint_every_steps=2)
    command = [sys.executable, "-m", "cape_ray", "train", *cli_flags(config)]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}

    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]
    error = first.stderr.strip().splitlines()[-1]
    run_dir = mount / "full"
    assert error.startswith("cape-ray train: error: not enough space to store checkpoint "
                            f"{run_dir}/checkpoint_e002_lr3e-3_bs2_acc2_qpe2_s000002: needs "), error
    assert "bytes free" in error and "rerun the same command" in error
    # retried (--storage_retries, doubling waits), then handed to Ray's restart budget: the run ends
    # only once the failure has outlasted both, and says so
    assert error.endswith(f"(still failing after {config.storage_retries} retries and {config.max_failures} "
                          f"restart(s))"), error
    assert first.stdout.count("worker failure on rank(s)") == config.max_failures + 1
    events = [json.loads(line)["event"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert events.count("failure") == config.max_failures + 1  # each attempt failed at this checkpoint
    assert "checkpoint_e002_lr3e-3_bs2_acc2_qpe2_s000002" not in os.listdir(run_dir)  # nothing half-written

    resize(64 << 20)  # space freed
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "Checkpoint: checkpoint_e001_lr3e-3_bs2_acc2_qpe2  [" in second.stdout
    final = ckpt.load_checkpoint(run_dir / "checkpoint_e002_lr3e-3_bs2_acc2_qpe2")
    assert [h["epoch"] for h in final.state["history"]] == [1, 2]
    for path in run_dir.glob("checkpoint_*"):
        if path.is_dir():
            assert ckpt.verify_checkpoint(path) == [], path.name
