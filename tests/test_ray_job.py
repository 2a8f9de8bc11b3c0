"""The Ray Train job end to end: real Ray, real worker and driver processes killed.

A reference run trains uninterrupted; the other runs are killed (a worker by SIGKILL mid-epoch, the
driver by SIGKILL, the driver between Ray's registration of a best checkpoint and its export) and
must end bitwise identical to it, with the right exports: model weights, optimizer state, every
rank's RNG and running loss, and the per-epoch metrics history. The same loop without Ray, with
every crash point, is in test_resume.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch

from cape_ray import checkpoint as ckpt
from cape_ray.job import build_trainer
from tiny import cli_flags

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
# 2 workers x batch 2 x accumulation 2 = 8 episodes per optimizer step: 4 steps per epoch over the
# 32 episodes, a mid-epoch checkpoint after every step, validation each epoch.
TWO_WORKERS = dict(epochs=3, episodes_per_epoch=32, num_workers="2", keep=100)


def fit(config, train_fn=None, loop_config=None):
    kwargs = {} if train_fn is None else {"train_fn": train_fn, "train_loop_config": loop_config}
    return build_trainer(config, **kwargs).fit()


def regular_checkpoints(run_dir: Path) -> list[str]:
    names = [p.name for p in run_dir.iterdir() if p.is_dir() and ckpt.position_from_name(p.name)]
    return sorted(names, key=ckpt.position_from_name)


def final_checkpoint(run_dir: Path) -> ckpt.LoadedCheckpoint:
    return ckpt.load_checkpoint(run_dir / regular_checkpoints(run_dir)[-1])


def expected_exports(history: list[dict]) -> set[str]:
    """The export names the final history calls for (strictly better tracking: the first wins)."""
    best_pck = max(history, key=lambda h: (h["val_pck"], -h["epoch"]))
    best_loss = min(history, key=lambda h: (h["val_loss"], h["epoch"]))
    return {ckpt.best_export_name("val_pck", best_pck["epoch"], best_pck),
            ckpt.best_export_name("val_loss", best_loss["epoch"], best_loss)}


def exports_in(run_dir: Path) -> set[str]:
    return {p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint_best_")}


def assert_bitwise_equal(a: ckpt.LoadedCheckpoint, b: ckpt.LoadedCheckpoint) -> None:
    assert a.model.keys() == b.model.keys()
    for key in a.model:
        assert torch.equal(a.model[key], b.model[key]), f"model tensor {key} differs"
    assert a.optimizer["param_groups"] == b.optimizer["param_groups"]
    for index, state in a.optimizer["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b.optimizer["state"][index][key]), f"optimizer {index}/{key} differs"
    assert a.scheduler == b.scheduler
    for key in ("history", "position", "tracking", "epochs_without_improvement"):
        assert a.state[key] == b.state[key], f"state {key} differs"
    assert a.rank_states.keys() == b.rank_states.keys()
    for rank, mine in a.rank_states.items():
        theirs = b.rank_states[rank]
        assert (mine["loss_sum"], mine["loss_count"]) == (theirs["loss_sum"], theirs["loss_count"])
        assert torch.equal(mine["rng_state"], theirs["rng_state"]), f"rank {rank} torch RNG differs"
        assert mine["np_rng_state"] == theirs["np_rng_state"] and mine["py_rng_state"] == theirs["py_rng_state"]


def wait_for_idle_cluster(timeout: float = 60) -> None:
    """A killed driver's workers are torn down by Ray; wait until their CPUs are free again."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ray.available_resources().get("CPU", 0) >= ray.cluster_resources().get("CPU", 0):
            return
        time.sleep(0.5)
    raise AssertionError("Ray still holds the killed run's workers")


def driver_command(config) -> list[str]:
    return [sys.executable, "-m", "cape_ray", "train", *cli_flags(config)]


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory):
    """An uninterrupted 2-worker run that keeps every checkpoint."""
    from tiny import make_config

    config = make_config(tmp_path_factory.mktemp("reference"), "reference", **TWO_WORKERS)
    assert fit(config).error is None
    run_dir = Path(config.storage_path) / "reference"
    return run_dir, final_checkpoint(run_dir)


def test_checkpoint_from_a_real_run_holds_every_field(reference):
    run_dir, final = reference
    names = regular_checkpoints(run_dir)
    assert names[-1] == "checkpoint_e003_lr3e-3_bs2_acc2_qpe2"
    assert "checkpoint_e002_lr3e-3_bs2_acc2_qpe2_s000002" in names  # mid-epoch, every step
    files = {p.relative_to(final.path).as_posix() for p in Path(final.path).rglob("*") if p.is_file()}
    assert files == {"model.pt", "optimizer.pt", "scheduler.pt", "state.json", "manifest.json",
                     "rng/rank_00000.pt", "rng/rank_00001.pt"}
    state = final.state
    assert state["position"] == {**state["position"], "epoch": 3, "step": 0, "global_step": 12}
    assert state["epoch"] == 3 and [h["epoch"] for h in state["history"]] == [1, 2, 3]
    assert state["world_size"] == 2 and state["config"]["num_workers"] == "2"
    history = state["history"]
    assert state["best_pck"] == max(h["val_pck"] for h in history)
    assert state["best_val_loss"] == min(h["val_loss"] for h in history)
    assert exports_in(run_dir) == expected_exports(history)
    # the two ranks drew different dropout streams, and both were saved
    assert not torch.equal(final.rank_states[0]["rng_state"], final.rank_states[1]["rng_state"])


def test_worker_killed_mid_epoch_resumes_bitwise(reference, tiny_config, tmp_path):
    from ray import cloudpickle

    import faults

    cloudpickle.register_pickle_by_value(faults)
    config = tiny_config("killed", **{**TWO_WORKERS, "keep": 2})
    # compute_loss runs once per micro-batch: 8 calls per epoch per rank. Call 14 is epoch 2,
    # step 3 (after the mid-epoch checkpoints of steps 1 and 2 were reported).
    plan = {"rank": 1, "kill_at_call": 14, "marker": str(tmp_path / "killed.marker"),
            "log": str(tmp_path / "starts.log")}
    result = fit(config, faults.train_with_faults, {**config.to_dict(), "_fault_plan": plan})
    assert result.error is None
    assert os.path.exists(plan["marker"]), "the worker was never killed"
    starts = Path(plan["log"]).read_text().splitlines()
    assert len(starts) == 4  # two ranks, two attempts
    resumed_from = {line.split("checkpoint=")[1] for line in starts[2:]}
    assert len(resumed_from) == 1
    (name,) = resumed_from
    assert ckpt.position_from_name(name) in {(2, 1), (2, 2)}, f"resumed from {name}, not mid-epoch 2"

    run_dir = tmp_path / "killed"
    assert_bitwise_equal(final_checkpoint(run_dir), reference[1])

    # Retention: exactly top-2 by val_pck + latest + the two best exports; no mid-epoch leftovers.
    history = reference[1].state["history"]
    by_score = sorted(history, key=lambda h: (h["retention_score"], h["epoch"]))  # Ray: later wins ties
    top = {ckpt.checkpoint_name(config, h["epoch"]) for h in by_score[-2:]}
    latest = {ckpt.checkpoint_name(config, 3)}
    on_disk = {p.name for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_")}
    assert on_disk == top | latest | expected_exports(history)
    for name in on_disk:
        assert ckpt.verify_checkpoint(run_dir / name) == []


def test_a_worker_killed_during_a_background_write_resumes_from_the_previous_checkpoint(reference, tiny_config,
                                                                                    tmp_path):
    """Rank 0's writer is uploading epoch 2's second mid-epoch checkpoint (one file of it written)
    when its process is SIGKILLed: the previous checkpoint is the resume point, intact; the partial
    one never verifies, is removed and redone, and the run ends bitwise the uninterrupted one."""
    from ray import cloudpickle

    import faults

    cloudpickle.register_pickle_by_value(faults)
    config = tiny_config("store_killed", **TWO_WORKERS)
    partial = "checkpoint_e002_lr3e-3_bs2_acc2_qpe2_s000002"
    plan = {"checkpoint": partial, "marker": str(tmp_path / "killed.marker")}
    result = fit(config, faults.train_and_die_while_storing, {**config.to_dict(), "_kill_in_store": plan})
    assert result.error is None and os.path.exists(plan["marker"]), "the writer was never killed"
    run_dir = tmp_path / "store_killed"
    assert_bitwise_equal(final_checkpoint(run_dir), reference[1])
    for path in run_dir.iterdir():
        if path.is_dir() and path.name.startswith("checkpoint_"):
            assert ckpt.verify_checkpoint(path) == [], path.name  # the partial one was redone whole


def test_driver_killed_then_rerun_resumes_bitwise(reference, ray_cluster, tiny_config):
    config = tiny_config("driver", **TWO_WORKERS)
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    run_dir = Path(config.storage_path) / "driver"

    log1 = open(Path(config.storage_path) / "driver1.log", "w")
    driver = subprocess.Popen(driver_command(config), env=env, stdout=log1, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while time.time() < deadline and driver.poll() is None:
        snapshot = run_dir / "checkpoint_manager_snapshot.json"
        if snapshot.exists() and "checkpoint_e001_lr3e-3_bs2_acc2_qpe2\"" in snapshot.read_text():
            break
        time.sleep(0.1)
    assert driver.poll() is None, "the first driver ended before it could be killed"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    wait_for_idle_cluster()
    before = final_checkpoint(run_dir).state["position"]
    assert before["epoch"] < 3 or before["step"] > 0

    rerun = subprocess.run(driver_command(config), env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    output = rerun.stdout + rerun.stderr
    assert "RESUMING FROM CHECKPOINT" in output
    assert "✓ Torch RNG state restored (2 ranks, each its own)" in output
    assert "✓ Python RNG state restored" in output and "✗ CUDA RNG state not restored" in output
    # quiet by default: the project's lines once each, none of Ray's per-report lines
    assert output.count("RESUMING FROM CHECKPOINT") == 1 and len(re.findall(r"^epoch +3/3 ", output, re.M)) == 1
    assert "Reporting training result" not in output and "Checkpoint successfully created" not in output
    assert "(RayTrainWorker" not in output and "PreemptionWatcher" not in output
    assert_bitwise_equal(final_checkpoint(run_dir), reference[1])
    assert exports_in(run_dir) == expected_exports(reference[1].state["history"])


def test_driver_killed_at_a_new_best_before_ray_registers_it_gets_the_right_exports(reference, ray_cluster,
                                                                                     tiny_config):
    """The first new best (epoch 1's end): its checkpoint and exports are stored, then the driver is
    SIGKILLed before Ray registers the checkpoint. The rerun resumes from the checkpoint before, redoes
    epoch 1's end, and ends with the reference's weights and exports, nothing orphaned."""
    config = tiny_config("window", **TWO_WORKERS)
    run_dir = Path(config.storage_path) / "window"
    marker = Path(config.storage_path) / "killed.marker"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    first = subprocess.run([sys.executable, "-c", "import faults, sys; faults.drive_and_die_at_a_new_best(sys.argv[1:])",
                            str(marker), json.dumps(config.to_dict())], env=env, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == -signal.SIGKILL, first.stdout[-2000:] + first.stderr[-2000:]
    assert marker.exists()
    wait_for_idle_cluster()
    epoch_one = ckpt.checkpoint_name(config, 1)
    assert (run_dir / epoch_one).is_dir() and exports_in(run_dir)  # stored and exported ...
    assert f'"{epoch_one}"' not in (run_dir / "checkpoint_manager_snapshot.json").read_text()  # ... unregistered

    rerun = subprocess.run(driver_command(config), env=env, capture_output=True, text=True, timeout=300)
    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, output[-3000:]
    assert "RESUMING FROM CHECKPOINT" in output and "Will resume from epoch 1, after step 3" in output
    assert_bitwise_equal(final_checkpoint(run_dir), reference[1])
    assert exports_in(run_dir) == expected_exports(reference[1].state["history"])
    for path in run_dir.glob("checkpoint_*"):
        if path.is_dir():
            assert ckpt.verify_checkpoint(path) == [], path.name


def test_corrupted_latest_falls_back_to_previous_valid(ray_cluster, tiny_config):
    config = tiny_config("corrupt", epochs=2, checkpoint_every_steps=0, keep=100)
    assert fit(config).error is None
    run_dir = Path(config.storage_path) / "corrupt"
    first, latest = regular_checkpoints(run_dir)
    original_history = ckpt.load_checkpoint(run_dir / latest).state["history"]
    model_file = run_dir / latest / "model.pt"
    model_file.write_bytes(model_file.read_bytes()[:-64])  # truncated

    result = fit(config.replace(epochs=3))
    assert result.error is None
    names = regular_checkpoints(run_dir)
    assert f"{latest}_redo" in names  # epoch 2 redone under a unique name
    final = final_checkpoint(run_dir)
    history = final.state["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[0] == original_history[0]  # continued from the valid epoch-1 checkpoint
    assert ckpt.verify_checkpoint(run_dir / latest)  # the damaged one was never repaired or used
    assert json.loads((run_dir / first / "state.json").read_text())["position"]["epoch"] == 1


def test_two_worker_checkpoint_resumes_on_one_worker(reference, tiny_config):
    """Elastic resume: the global episode sequence continues (nothing skipped or repeated) and the
    effective batch is kept by doubling accumulation."""
    from ray import cloudpickle

    import faults

    cloudpickle.register_pickle_by_value(faults)
    run_dir, _ = reference
    source = run_dir / "checkpoint_e002_lr3e-3_bs2_acc2_qpe2_s000002"
    source_position = ckpt.read_state(source)["position"]
    assert source_position["episode"] == 16 and source_position["episodes_per_step"] == 8

    config = tiny_config("elastic", **{**TWO_WORKERS, "num_workers": "1"}, resume=str(source))
    log = Path(config.storage_path) / "episodes.log"
    result = fit(config, faults.train_with_episode_log, {**config.to_dict(), "_episode_log": str(log)})
    assert result.error is None
    seen: dict[int, list[int]] = {}
    for line in log.read_text().splitlines():
        epoch, index = map(int, line.split())
        seen.setdefault(epoch, []).append(index)
    assert sorted(seen[1]) == list(range(16, 32))  # epoch 2 (0-based 1) from where the 2 workers stopped
    assert sorted(seen[2]) == list(range(32))  # a whole epoch, each episode once
    names = regular_checkpoints(Path(config.storage_path) / "elastic")
    assert names[-1] == "checkpoint_e003_lr3e-3_bs2_acc4_qpe2"  # accumulation 2 -> 4 keeps 8 per step
    final = final_checkpoint(Path(config.storage_path) / "elastic")
    assert final.state["world_size"] == 1 and set(final.rank_states) == {0}
    assert final.state["position"]["episodes_per_step"] == 8
    assert [h["epoch"] for h in final.state["history"]] == [1, 2, 3]
    assert final.state["position"]["global_step"] == 12  # same step count as the 2-worker reference


def test_preemption_notice_writes_one_just_in_time_checkpoint(ray_cluster, tiny_config):
    from ray import cloudpickle

    import faults

    cloudpickle.register_pickle_by_value(faults)
    config = tiny_config("preempt", epochs=1, checkpoint_every_steps=0, preemption_check_steps=1)
    result = fit(config, faults.train_with_preemption_notice, {**config.to_dict(), "_notice_from_call": 3})
    assert result.error is None
    run_dir = Path(config.storage_path) / "preempt"
    mid_epoch = [n for n in regular_checkpoints(run_dir) if "_s0" in n]
    assert mid_epoch == ["checkpoint_e001_lr3e-3_bs2_acc2_qpe2_s000003"]  # once, at the notice
    state = ckpt.read_state(run_dir / mid_epoch[0])
    assert state["metrics"]["reason"] == "preemption" and state["metrics"]["retention_score"] == -1.0
    assert state["position"]["step"] == 3


def test_keep_every_and_keep_zero_survive_rays_retention_and_a_resume(ray_cluster, tiny_config):
    # --keep 1 --keep_every 2: every 2nd epoch's checkpoint is kept besides the best other one and
    # the latest, also across a driver rerun that extends the run
    config = tiny_config("every", epochs=4, keep=1, keep_every=2, checkpoint_every_steps=2)
    assert fit(config).error is None
    assert fit(config.replace(epochs=6)).error is None
    run_dir = Path(config.storage_path) / "every"
    history = final_checkpoint(run_dir).state["history"]
    best_other = max((h for h in history if h["epoch"] % 2), key=lambda h: (h["retention_score"], h["epoch"]))
    expected = {ckpt.checkpoint_name(config, e) for e in (2, 4, 6, best_other["epoch"])}
    assert set(regular_checkpoints(run_dir)) == expected
    assert exports_in(run_dir) == expected_exports(history)

    # --keep 0: nothing is ever deleted, mid-epoch checkpoints included
    config = tiny_config("all", keep=0, checkpoint_every_steps=2)
    assert fit(config).error is None
    assert regular_checkpoints(Path(config.storage_path) / "all") == [
        ckpt.checkpoint_name(config, 1, 2), ckpt.checkpoint_name(config, 1),
        ckpt.checkpoint_name(config, 2, 2), ckpt.checkpoint_name(config, 2)]
