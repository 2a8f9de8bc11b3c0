"""Training on a GPU is bitwise reproducible: two runs, and a run whose worker is SIGKILLed and
resumed, end equal; a training step never waits on the host; checkpoints move between CPU and GPU.

Marked `gpu` and skipped without a CUDA device (`python -m pytest -m gpu -q`). The Ray runs use the
shared test instance (conftest.py), which detects the machine's GPUs. The CPU halves of these
checks are in test_training_batches.py, test_determinism.py and test_device_moves.py.
"""

from __future__ import annotations

import os

# cuBLAS reads this when a handle is made, at this process's first matmul on a device: set it before
# any in-process test runs one, since they train in deterministic mode (cape_ray/determinism.py).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from cape_ray import checkpoint as ckpt, determinism, engine, rng  # noqa: E402
from cape_ray.data.episodes import TrainingBatches  # noqa: E402
from cape_ray.data.loading import load_split  # noqa: E402
from cape_ray.model import build_model  # noqa: E402
from cape_ray.worker import train_loop_per_worker  # noqa: E402
from local_edge import LocalEdge  # noqa: E402
from tiny import make_config  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def gpu_cluster(ray_cluster):
    import ray

    if ray.cluster_resources().get("GPU", 0) < 1:  # a use_gpu run would wait for a GPU forever
        pytest.fail(f"the test Ray instance has no GPU resource ({ray.cluster_resources()}); it must be started "
                    "without num_gpus so that Ray detects the GPUs")
    return ray_cluster


def gpu_config(storage_path, name: str, **changes):
    return make_config(storage_path, name, use_gpu=True, keep=100, **changes)


@pytest.fixture(scope="module")
def gpu_reference(gpu_cluster, tmp_path_factory):
    """An uninterrupted 1-worker --use_gpu run of the tiny config, every checkpoint kept."""
    from test_ray_job import final_checkpoint, fit

    config = gpu_config(tmp_path_factory.mktemp("gpu_reference"), "reference")
    assert fit(config).error is None
    return final_checkpoint(Path(config.storage_path) / "reference")


def assert_same_cuda_rng(a: ckpt.LoadedCheckpoint, b: ckpt.LoadedCheckpoint) -> None:
    for rank, mine in a.rank_states.items():
        theirs = b.rank_states[rank]
        assert mine["cuda_rng_state"], f"rank {rank}: no CUDA RNG state was saved"
        assert len(mine["cuda_rng_state"]) == len(theirs["cuda_rng_state"])
        assert all(torch.equal(x, y) for x, y in zip(mine["cuda_rng_state"], theirs["cuda_rng_state"])), \
            f"rank {rank}: CUDA RNG differs"
        assert mine["cuda_device"] == theirs["cuda_device"]


def test_two_uninterrupted_gpu_runs_end_bitwise_equal(gpu_reference, tmp_path):
    from test_ray_job import assert_bitwise_equal, final_checkpoint, fit

    config = gpu_config(tmp_path, "again")
    assert fit(config).error is None
    again = final_checkpoint(tmp_path / "again")
    assert (again.state["device"], again.state["deterministic"]) == ("cuda", True)
    assert again.state["config"]["use_gpu"] and again.state["config"]["deterministic"] is None  # on by default
    assert_bitwise_equal(again, gpu_reference)
    assert_same_cuda_rng(again, gpu_reference)


def test_a_killed_gpu_worker_resumes_bitwise_with_its_cuda_rng(gpu_reference, tmp_path):
    from ray import cloudpickle

    import faults
    from test_ray_job import assert_bitwise_equal, final_checkpoint, fit

    cloudpickle.register_pickle_by_value(faults)
    config = gpu_config(tmp_path, "killed")
    # 2 compute_loss calls per step, 8 per epoch: call 14 is in epoch 2, step 3, after the
    # mid-epoch checkpoints of its steps 1 and 2 were reported
    plan = {"rank": 0, "kill_at_call": 14, "marker": str(tmp_path / "killed.marker"),
            "log": str(tmp_path / "starts.log"), "banner_log": str(tmp_path / "banner.log")}
    result = fit(config, faults.train_with_faults, {**config.to_dict(), "_fault_plan": plan})
    assert result.error is None
    assert os.path.exists(plan["marker"]), "the worker was never killed"
    starts = Path(plan["log"]).read_text().splitlines()
    assert len(starts) == 2  # one rank, two attempts
    resumed_from = starts[1].split("checkpoint=")[1]
    assert ckpt.position_from_name(resumed_from) in {(2, 1), (2, 2)}, f"resumed from {resumed_from}"
    assert ckpt.load_checkpoint(tmp_path / "killed" / resumed_from).rank_states[0]["cuda_rng_state"]

    banner = Path(plan["banner_log"]).read_text()
    assert "  ✓ CUDA RNG state restored\n" in banner
    assert "  ✓ Device: cuda, as when the checkpoint was written" in banner
    assert "  ✓ Reproducibility: deterministic mode on: CUDA runs and resumes are bitwise reproducible" in banner
    final = final_checkpoint(tmp_path / "killed")
    assert_bitwise_equal(final, gpu_reference)
    assert_same_cuda_rng(final, gpu_reference)


def test_a_training_step_never_waits_on_the_host(tmp_path):
    """Batches, forward, backward, clipping, optimizer and the loss sum, as the worker runs them, with
    deterministic mode off: what is checked is this project's code. Deterministic kernels of torch
    may synchronise on their own; bench/gpu_throughput.py counts those per step."""
    config = make_config(tmp_path, use_gpu=True)
    split = load_split(config, "train", config.num_queries_per_episode)
    with determinism.algorithms(False):
        rng.seed_everything(0)
        model = build_model(config).to(CUDA)
        optimizer = engine.build_optimizer(model, config)
        scheduler = engine.build_scheduler(optimizer, config, 8)
        batches = TrainingBatches(split, config, 0, 1, CUDA)
        loss_sum = torch.zeros((), dtype=torch.float64, device=CUDA)
        per_step = batches.episodes_per_step

        def step(index: int) -> None:  # as the worker's loop does it
            nonlocal loss_sum
            losses = engine.train_step(model, optimizer, scheduler, batches.step(0, index * per_step), config.grad_clip)
            loss_sum += losses.double().sum()

        step(0)  # plans the epoch (one copy to the device) and makes the cuBLAS / cuDNN handles
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step(1)
            step(2)
            with pytest.raises(RuntimeError):  # the mode does catch a read-back
                float(loss_sum)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss_sum) and float(loss_sum) > 0


def test_gpu_batches_are_the_cpu_batches_up_to_the_warps_rounding(tmp_path):
    config = make_config(tmp_path)
    split = load_split(config, "train", config.num_queries_per_episode)
    on_gpu, on_cpu = TrainingBatches(split, config, 0, 1, CUDA), TrainingBatches(split, config, 0, 1, "cpu")
    exact = ("support_visible", "query_visible", "keypoint_mask", "skeleton", "query_bbox", "category_ids",
             "support_rows", "query_rows")
    for step in range(config.steps_per_epoch):
        for gpu, cpu in zip(on_gpu.step(1, 4 * step), on_cpu.step(1, 4 * step)):
            for name in exact:
                assert torch.equal(getattr(gpu, name).cpu(), getattr(cpu, name)), name
            for name in ("support_images", "query_images", "support_keypoints", "query_keypoints", "query_to_original"):
                assert getattr(gpu, name).device.type == "cuda"
                torch.testing.assert_close(getattr(gpu, name).cpu(), getattr(cpu, name), rtol=1e-5, atol=1e-5)


def test_checkpoints_move_from_cpu_to_gpu_and_back(tmp_path, capfd):
    """A CPU run's checkpoint resumed on the GPU, and that run's checkpoint resumed on the CPU."""

    def train(name: str, device: str, epochs: int, resume=None) -> LocalEdge:
        config = make_config(tmp_path, name, epochs=epochs, checkpoint_every_steps=0, resume=resume)
        edge = LocalEdge(tmp_path / name)
        edge.device = torch.device(device)
        train_loop_per_worker(config.to_dict(), edge)
        return edge

    cpu_run = train("cpu_run", "cpu", 1)
    capfd.readouterr()
    gpu_run = train("gpu_run", "cuda", 2, resume=cpu_run.latest)
    out = capfd.readouterr().out
    assert "✓ Weights and optimizer state moved from cpu to cuda" in out
    assert "✗ CUDA RNG state not restored: not in the checkpoint (written without CUDA); seeded deterministically" in out
    assert "✓ Reproducibility: deterministic mode on: CUDA runs and resumes are bitwise reproducible" in out
    on_gpu = ckpt.load_checkpoint(gpu_run.latest)
    assert [h["epoch"] for h in on_gpu.state["history"]] == [1, 2]
    assert (on_gpu.state["device"], on_gpu.state["deterministic"]) == ("cuda", True)
    assert on_gpu.rank_states[0]["cuda_rng_state"]
    saved_on = lambda edge: {t.device.type for t in torch.load(Path(edge.latest) / "model.pt", weights_only=True).values()}  # noqa: E731
    assert saved_on(gpu_run) == {"cpu"}  # a checkpoint holds CPU tensors whatever the device

    back = train("back_on_cpu", "cpu", 3, resume=gpu_run.latest)
    out = capfd.readouterr().out
    assert "✓ Weights and optimizer state moved from cuda to cpu" in out
    assert "✓ Reproducibility: CPU kernels are deterministic" in out
    on_cpu = ckpt.load_checkpoint(back.latest)
    assert [h["epoch"] for h in on_cpu.state["history"]] == [1, 2, 3]
    assert on_cpu.state["device"] == "cpu" and saved_on(back) == {"cpu"}


def test_a_snapshot_of_gpu_state_lands_in_pinned_cpu_memory_and_is_reused():
    from cape_ray.checkpointer import snapshot

    state = {"w": torch.randn(64, 64, device=CUDA), "step": torch.tensor(3.0, device=CUDA)}
    first = snapshot(state)
    assert all(t.device.type == "cpu" and t.is_pinned() for t in first.values())
    state["w"].add_(1.0)
    second = snapshot(state, first)
    assert second["w"].data_ptr() == first["w"].data_ptr() and torch.equal(second["w"], state["w"].cpu())
