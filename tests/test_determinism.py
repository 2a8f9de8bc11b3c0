"""Deterministic mode: the flag, what the worker records and says, and that a training step and the
evaluation loop use no op that has no deterministic CUDA implementation.

A CPU run cannot execute CUDA kernels, so the op check records every aten op a real training step
(batch building, forward, backward, optimizer) and the real evaluation loop dispatch, and compares
them with the ops that `torch.use_deterministic_algorithms(True)` refuses on CUDA (its documented
list). tests/test_gpu.py runs the same loop on a GPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from cape_ray import checkpoint as ckpt, determinism, engine
from cape_ray.data.episodes import EpisodeSampler, TrainingBatches
from cape_ray.data.loading import load_split
from cape_ray.model import build_model
from cape_ray.worker import train_loop_per_worker
from local_edge import LocalEdge
from test_config_cli import parse
from tiny import make_config

# aten ops that raise under torch.use_deterministic_algorithms(True) on CUDA (torch's documented list)
NONDETERMINISTIC_ON_CUDA = {
    "aten.avg_pool3d_backward", "aten._adaptive_avg_pool2d_backward", "aten._adaptive_avg_pool3d_backward",
    "aten.adaptive_max_pool2d_backward", "aten.fractional_max_pool2d_backward", "aten.fractional_max_pool3d_backward",
    "aten.max_unpool2d", "aten.max_unpool3d", "aten.upsample_linear1d_backward", "aten.upsample_bilinear2d_backward",
    "aten.upsample_bicubic2d_backward", "aten.upsample_trilinear3d_backward", "aten._upsample_bilinear2d_aa_backward",
    "aten._upsample_bicubic2d_aa_backward", "aten.reflection_pad1d_backward", "aten.reflection_pad2d_backward",
    "aten.reflection_pad3d_backward", "aten.nll_loss_forward", "aten.nll_loss2d_forward", "aten._ctc_loss_backward",
    "aten._embedding_bag_backward", "aten._embedding_bag_dense_backward", "aten.put_", "aten.put", "aten.histc",
    "aten.bincount", "aten.median", "aten.nanmedian", "aten.kthvalue", "aten.grid_sampler_2d_backward",
    "aten.grid_sampler_3d_backward", "aten.cumsum", "aten.cumsum_", "aten.scatter_reduce", "aten.scatter_reduce_",
}


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def restored_flags():
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    yield before
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark) == before, "deterministic mode leaked out of its block"


def test_the_recorder_sees_an_op_without_a_deterministic_cuda_kernel():
    images = torch.rand(1, 1, 4, 4, requires_grad=True)
    with OpRecorder() as recorder:
        F.grid_sample(images, torch.zeros(1, 2, 2, 2), align_corners=False).sum().backward()
    assert "aten.grid_sampler_2d_backward" in recorder.ops & NONDETERMINISTIC_ON_CUDA


def test_a_training_step_and_the_evaluation_loop_use_only_deterministic_ops(tmp_path, restored_flags):
    config = make_config(tmp_path, use_skeleton=True, dropout=0.1)
    train = load_split(config, "train", config.num_queries_per_episode)
    val = load_split(config, "val", config.val_queries_per_episode)
    episodes = EpisodeSampler(val, config.num_shots, config.val_queries_per_episode).fixed_episodes(2)
    torch.manual_seed(0)
    model = build_model(config)
    optimizer = engine.build_optimizer(model, config)
    scheduler = engine.build_scheduler(optimizer, config, 10)
    batches = TrainingBatches(train, config, 0, 1, torch.device("cpu"))
    with determinism.algorithms(True), OpRecorder() as recorder:
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        before = [p.detach().clone() for p in model.parameters()]
        losses = engine.train_step(model, optimizer, scheduler, batches.step(0, 0), config.grad_clip)
        sums = engine.evaluate_episodes(model, val, episodes, batch_size=2, with_loss=True)
        unbanked = engine.evaluate_episodes(model, val, episodes, batch_size=2, feature_bank=False)
    assert torch.isfinite(losses).all() and len(losses) == config.accumulation_steps
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the step did train
    assert sums.keys() == unbanked.keys() and all(s["pairs"] > 0 for s in sums.values())
    # the step really differentiated the sampling ops whose CUDA backward would be at stake
    assert {"aten.convolution_backward", "aten.index_select", "aten.gather"} <= recorder.ops
    assert recorder.ops & NONDETERMINISTIC_ON_CUDA == set()


def test_the_mode_is_set_inside_its_block_and_restored_after(restored_flags, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with determinism.algorithms(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        with determinism.algorithms(False):  # an explicit --no-deterministic turns it off
            assert not torch.are_deterministic_algorithms_enabled()
        assert torch.are_deterministic_algorithms_enabled()
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    with determinism.algorithms(True):
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"  # a valid setting of the user's is kept


@pytest.mark.parametrize("requested, device, enforced", [
    (None, "cuda", True), (None, "cpu", False), (False, "cuda", False), (True, "cpu", True),
])
def test_unset_means_on_for_a_gpu(requested, device, enforced):
    assert determinism.resolve(requested, torch.device(device)) is enforced


def test_flags_in_both_spellings():
    assert parse([]).deterministic is None
    assert parse(["--deterministic"]).deterministic is True
    assert parse(["--no-deterministic"]).deterministic is False


@pytest.mark.parametrize("requested, recorded, said", [
    (None, False, "fp32) on cpu, 1 worker: CPU kernels are deterministic\n"),
    (True, True, "fp32) on cpu, 1 worker: CPU kernels are deterministic; deterministic mode also on\n"),
])
def test_the_worker_records_and_says_its_mode(tmp_path, capfd, restored_flags, requested, recorded, said):
    config = make_config(tmp_path, "mode", epochs=1, checkpoint_every_steps=0, deterministic=requested)
    edge = LocalEdge(Path(config.storage_path) / config.name)
    train_loop_per_worker(config.to_dict(), edge)
    state = ckpt.read_state(edge.latest)
    assert (state["device"], state["deterministic"], state["config"]["deterministic"]) == ("cpu", recorded, requested)
    assert said in capfd.readouterr().out
