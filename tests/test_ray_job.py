"""The Ray Train job end to end: real Ray, real worker and driver processes killed.

A reference run trains uninterrupted; the other runs are killed (a worker by SIGKILL mid-epoch, the
driver by SIGKILL) or resumed from a path, and must end bitwise identical to it: model weights,
optimizer state, every rank's RNG and the per-epoch metrics history.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch

from cape_ray import checkpoint as ckpt
from cape_ray.config import TrainConfig
from cape_ray.job import build_trainer

pytestmark = pytest.mark.slow

# 2 workers x batch 2 x accumulation 2 = 8 episodes per optimizer step: 4 steps per epoch, a
# mid-epoch checkpoint after every step, validation each epoch.
BASE = dict(
    epochs=3, episodes_per_epoch=32, batch_size=2, accumulation_steps=2, num_queries_per_episode=2,
    checkpoint_every_steps=1, val_episodes=2, val_queries_per_episode=3, image_size=32, feature_dim=16,
    refine_layers=1, synthetic_instances_per_category=6, synthetic_canvas=48, num_workers="2", keep=100,
    warmup_steps=2, max_failures=2, lr=3e-3,
)


def make_config(tmp: Path, name: str, **changes) -> TrainConfig:
    return TrainConfig(**{**BASE, "name": name, "storage_path": str(tmp), **changes})


def fit(config: TrainConfig, train_fn=None, loop_config=None):
    kwargs = {} if train_fn is None else {"train_fn": train_fn, "train_loop_config": loop_config}
    return build_trainer(config, **kwargs).fit()


def regular_checkpoints(run_dir: Path) -> list[str]:
    names = [p.name for p in run_dir.iterdir() if p.is_dir() and ckpt.position_from_name(p.name)]
    return sorted(names, key=ckpt.position_from_name)


def final_checkpoint(run_dir: Path) -> ckpt.LoadedCheckpoint:
    return ckpt.load_checkpoint(run_dir / regular_checkpoints(run_dir)[-1])


def assert_bitwise_equal(a: ckpt.LoadedCheckpoint, b: ckpt.LoadedCheckpoint) -> None:
    assert a.model.keys() == b.model.keys()
    for key in a.model:
        assert torch.equal(a.model[key], b.model[key]), f"model tensor {key} differs"
    assert a.optimizer["param_groups"] == b.optimizer["param_groups"]
    assert a.optimizer["state"].keys() == b.optimizer["state"].keys()
    for index, state in a.optimizer["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b.optimizer["state"][index][key]), f"optimizer {index}/{key} differs"
    assert a.scheduler == b.scheduler
    assert a.state["position"]["history"] == b.state["position"]["history"]
    assert a.state["position"]["global_step"] == b.state["position"]["global_step"]
    assert a.state["tracking"] == b.state["tracking"]
    assert a.rank_states.keys() == b.rank_states.keys()
    for rank in a.rank_states:
        assert a.rank_states[rank]["loss_sum"] == b.rank_states[rank]["loss_sum"]
        for key, value in a.rank_states[rank]["rng"].items():
            other = b.rank_states[rank]["rng"][key]
            same = torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
            assert same, f"rank {rank} RNG {key} differs"


def wait_for_idle_cluster(timeout: float = 60) -> None:
    """A killed driver's workers are torn down by Ray; wait until their CPUs are free again."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ray.available_resources().get("CPU", 0) >= ray.cluster_resources().get("CPU", 0):
            return
        time.sleep(0.5)
    raise AssertionError("Ray still holds the killed run's workers")


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory):
    """An uninterrupted 2-worker run that keeps every checkpoint."""
    tmp = tmp_path_factory.mktemp("reference")
    config = make_config(tmp, "reference")
    result = fit(config)
    assert result.error is None
    return tmp / "reference", final_checkpoint(tmp / "reference")


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
    assert [h["epoch"] for h in state["position"]["history"]] == [1, 2, 3]
    assert state["world_size"] == 2 and state["config"]["num_workers"] == "2"
    assert {"best_loss", "best_pck", "early_stopping"} <= set(state["tracking"])
    assert {"python_state", "numpy_keys", "torch_cpu", "cuda"} <= set(final.rank_states[1]["rng"])
    history = state["position"]["history"]
    assert state["tracking"]["best_pck"]["best"] == max(h["val_pck"] for h in history)
    assert state["tracking"]["best_loss"]["best"] == min(h["val_loss"] for h in history)
    # the two ranks drew different dropout streams, and both were saved
    assert not torch.equal(final.rank_states[0]["rng"]["torch_cpu"], final.rank_states[1]["rng"]["torch_cpu"])


def test_worker_killed_mid_epoch_resumes_bitwise(reference, tmp_path):
    from ray import cloudpickle

    import faults

    cloudpickle.register_pickle_by_value(faults)
    config = make_config(tmp_path, "killed", keep=2)
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
    history = reference[1].state["position"]["history"]
    by_score = sorted(history, key=lambda h: (h["val_pck"], h["epoch"]))  # Ray: later wins ties
    top = {ckpt.checkpoint_name(config, h["epoch"]) for h in by_score[-2:]}
    latest = {ckpt.checkpoint_name(config, 3)}
    best_pck = max(history, key=lambda h: (h["val_pck"], -h["epoch"]))  # strictly-better tracking: first wins
    best_loss = min(history, key=lambda h: (h["val_loss"], h["epoch"]))
    exports = {ckpt.best_export_name("pck", best_pck["epoch"], best_pck["val_pck"], best_pck["val_loss"]),
               ckpt.best_export_name("loss", best_loss["epoch"], best_loss["val_pck"], best_loss["val_loss"])}
    on_disk = {p.name for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_")}
    assert on_disk == top | latest | exports
    for name in exports:
        assert ckpt.verify_checkpoint(run_dir / name) == []


def test_resume_from_path_continues_exactly(reference, tmp_path):
    run_dir, final = reference
    mid = run_dir / "checkpoint_e002_lr3e-3_bs2_acc2_qpe2_s000001"
    config = make_config(tmp_path, "from_path", resume=str(mid))
    assert fit(config).error is None
    resumed = final_checkpoint(tmp_path / "from_path")
    assert_bitwise_equal(resumed, final)


def test_driver_killed_then_rerun_resumes_bitwise(reference, ray_cluster, tmp_path):
    config = make_config(tmp_path, "driver")
    flags = []
    for key, value in config.to_dict().items():
        if value is not None and key != "augment" and not isinstance(value, bool):
            flags += [f"--{key}", str(value)]
    command = [sys.executable, "-m", "cape_ray", "train", *flags]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    run_dir = tmp_path / "driver"

    log1 = open(tmp_path / "driver1.log", "w")
    driver = subprocess.Popen(command, env=env, stdout=log1, stderr=subprocess.STDOUT)
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

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    output = rerun.stdout + rerun.stderr
    assert "RESUMING FROM CHECKPOINT" in output
    assert "RNG restored: python, numpy, torch (2 ranks)" in output
    assert_bitwise_equal(final_checkpoint(run_dir), reference[1])


def test_early_stopping_fires_and_stays_stopped(ray_cluster, tmp_path):
    # min_delta 1.0 cannot be beaten by a PCK: epoch 1 sets the reference, epoch 2 stops (patience 1).
    config = make_config(tmp_path, "early", epochs=4, num_workers="1", checkpoint_every_steps=0,
                         early_stopping_patience=1, early_stopping_min_delta=1.0)
    result = fit(config)
    assert result.error is None
    run_dir = tmp_path / "early"
    final = final_checkpoint(run_dir)
    assert [h["epoch"] for h in final.state["position"]["history"]] == [1, 2]
    assert final.state["tracking"]["early_stopping"]["stopped_epoch"] == 2
    assert result.metrics["early_stopped"] == 1
    before = sorted(p.name for p in run_dir.iterdir())
    rerun = fit(config)  # driver rerun at the stopping boundary: nothing is trained again
    assert rerun.error is None
    assert sorted(p.name for p in run_dir.iterdir()) == before
    assert final_checkpoint(run_dir).state["position"]["global_step"] == final.state["position"]["global_step"]


def test_corrupted_latest_falls_back_to_previous_valid(ray_cluster, tmp_path):
    config = make_config(tmp_path, "corrupt", epochs=2, num_workers="1", checkpoint_every_steps=0)
    assert fit(config).error is None
    run_dir = tmp_path / "corrupt"
    first, latest = regular_checkpoints(run_dir)
    original_history = ckpt.load_checkpoint(run_dir / latest).state["position"]["history"]
    model_file = run_dir / latest / "model.pt"
    model_file.write_bytes(model_file.read_bytes()[:-64])  # truncated

    result = fit(config.replace(epochs=3))
    assert result.error is None
    names = regular_checkpoints(run_dir)
    assert f"{latest}_redo" in names  # epoch 2 redone under a unique name
    final = final_checkpoint(run_dir)
    history = final.state["position"]["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[0] == original_history[0]  # continued from the valid epoch-1 checkpoint
    assert ckpt.verify_checkpoint(run_dir / latest)  # the damaged one was never repaired or used
    assert json.loads((run_dir / first / "state.json").read_text())["position"]["epoch"] == 1


def test_two_worker_checkpoint_resumes_on_one_worker(reference, tmp_path):
    """Elastic resume: the global episode sequence continues (nothing skipped or repeated) and the
    effective batch is kept by doubling accumulation."""
    from ray import cloudpickle

    import faults

    cloudpickle.register_pickle_by_value(faults)
    run_dir, _ = reference
    source = run_dir / "checkpoint_e002_lr3e-3_bs2_acc2_qpe2_s000002"
    source_position = ckpt.read_state(source)["position"]
    assert source_position["episode"] == 16 and source_position["episodes_per_step"] == 8

    config = make_config(tmp_path, "elastic", num_workers="1", resume=str(source))
    log = tmp_path / "episodes.log"
    result = fit(config, faults.train_with_episode_log, {**config.to_dict(), "_episode_log": str(log)})
    assert result.error is None
    seen: dict[int, list[int]] = {}
    for line in log.read_text().splitlines():
        epoch, index = map(int, line.split())
        seen.setdefault(epoch, []).append(index)
    assert sorted(seen[1]) == list(range(16, 32))  # epoch 2 (0-based 1) from where the 2 workers stopped
    assert sorted(seen[2]) == list(range(32))  # a whole epoch, each episode once
    names = regular_checkpoints(tmp_path / "elastic")
    assert names[-1] == "checkpoint_e003_lr3e-3_bs2_acc4_qpe2"  # accumulation 2 -> 4 keeps 8 per step
    final = final_checkpoint(tmp_path / "elastic")
    assert final.state["world_size"] == 1 and set(final.rank_states) == {0}
    assert final.state["position"]["episodes_per_step"] == 8
    assert [h["epoch"] for h in final.state["position"]["history"]] == [1, 2, 3]
    assert final.state["position"]["global_step"] == 12  # same step count as the 2-worker reference


def test_preemption_notice_writes_one_just_in_time_checkpoint(ray_cluster, tmp_path):
    from ray import cloudpickle

    import faults

    cloudpickle.register_pickle_by_value(faults)
    config = make_config(tmp_path, "preempt", num_workers="1", epochs=1, checkpoint_every_steps=0,
                         preemption_check_steps=1)
    result = fit(config, faults.train_with_preemption_notice, {**config.to_dict(), "_notice_from_call": 3})
    assert result.error is None
    mid_epoch = [n for n in regular_checkpoints(tmp_path / "preempt") if "_s0" in n]
    assert mid_epoch == ["checkpoint_e001_lr3e-3_bs2_acc2_qpe2_s000003"]  # once, at the notice
    state = ckpt.read_state(tmp_path / "preempt" / mid_epoch[0])
    assert state["metrics"]["reason"] == "preemption" and state["metrics"]["val_pck"] == -1.0
    assert state["position"]["step"] == 3
