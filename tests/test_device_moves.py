"""Checkpoints that move between devices: a GPU checkpoint resumed on the CPU, and one written where
another number of GPUs was visible. The real loop runs in this process (tests/local_edge.py); the
GPU checkpoint is made by the real writer with a CUDA RNG state in its rank file, and a GPU count is
faked the way tests/test_rng.py fakes it. The moves onto a real GPU are in tests/test_gpu.py."""

from __future__ import annotations

from pathlib import Path

import torch

from cape_ray import checkpoint as ckpt, rng
from cape_ray.data.episodes import EpisodeSampler
from cape_ray.state import Position, TrainState
from cape_ray.worker import train_loop_per_worker
from local_edge import LocalEdge
from tiny import make_config, write_checkpoint

# tiny: 4 episodes per step, 4 steps per epoch, 2 epochs; the checkpoint is after step 2 of epoch 1
MID_EPOCH = Position(epoch=0, step=2, episode=8, global_step=2, episodes_per_step=4)


def gpu_checkpoint(tmp_path: Path, config, cuda_states: int, trained_on: int) -> Path:
    """A mid-epoch checkpoint as a GPU run in deterministic mode writes it."""
    state = TrainState.fresh(config, 1, device="cuda", deterministic=True)
    state.position = MID_EPOCH
    cuda = [torch.full((16,), device + 1, dtype=torch.uint8) for device in range(cuda_states)]
    rank_state = {**rng.capture(), "cuda_rng_state": cuda, "cuda_device": trained_on, "loss_sum": 1.5,
                  "loss_count": 4}
    return write_checkpoint(tmp_path / "gpu_run", ckpt.checkpoint_name(config, 1, 2), config, state=state,
                            rank_states={0: rank_state})


def resume(config, source: Path, monkeypatch) -> tuple[LocalEdge, list[tuple[int, int]]]:
    """Train from `source`; returns the edge and the (epoch, index) of every episode drawn."""
    drawn = []
    draw = EpisodeSampler.train_episodes

    def logged(self, epoch, indices):
        drawn.extend((epoch, int(i)) for i in indices)
        return draw(self, epoch, indices)

    monkeypatch.setattr(EpisodeSampler, "train_episodes", logged)
    resumed = config.replace(name="resumed", resume=str(source))
    edge = LocalEdge(Path(resumed.storage_path) / resumed.name)
    train_loop_per_worker(resumed.to_dict(), edge)
    return edge, drawn


def assert_trained_to_the_end(edge: LocalEdge, drawn) -> None:
    final = ckpt.load_checkpoint(edge.latest)
    assert final.state["position"] == {"epoch": 2, "step": 0, "episode": 0, "global_step": 8, "episodes_per_step": 4}
    assert [h["epoch"] for h in final.state["history"]] == [1, 2]
    assert drawn == [(0, i) for i in range(8, 16)] + [(1, i) for i in range(16)]  # the rest of epoch 1, then 2
    assert (final.state["device"], final.state["deterministic"]) == ("cpu", False)
    assert final.rank_states[0]["cuda_rng_state"] is None


def test_a_gpu_checkpoint_resumes_on_the_cpu(tmp_path, capfd, monkeypatch):
    config = make_config(tmp_path, "gpu_run")
    source = gpu_checkpoint(tmp_path, config, cuda_states=1, trained_on=0)
    edge, drawn = resume(config, source, monkeypatch)
    out = capfd.readouterr().out
    assert ("✓ Weights and optimizer state moved from cuda to cpu: the run continues from the checkpoint, but not "
            "bit for bit as it would have on cuda") in out
    assert ("✗ CUDA RNG state not restored: the checkpoint has 1 device state(s), no CUDA device here; dropout "
            "continues from the restored CPU generator") in out
    assert "✓ Will resume from epoch 1, after step 2 of it (global step 2)" in out
    assert "✓ Reproducibility: CPU kernels are deterministic\n" in out
    assert_trained_to_the_end(edge, drawn)
    # the running train loss of the interrupted epoch goes on from the checkpoint's 4 losses
    after_step_3 = ckpt.load_checkpoint(Path(edge.run_dir) / ckpt.checkpoint_name(config, 1, 3)).rank_states[0]
    assert after_step_3["loss_count"] == 6 and after_step_3["loss_sum"] > 1.5


def test_another_gpu_count_is_decided_and_said(tmp_path, capfd, monkeypatch):
    """Written where 2 GPUs were visible, by a rank on cuda:1; resumed where 1 is visible."""
    config = make_config(tmp_path, "gpu_run")
    source = gpu_checkpoint(tmp_path, config, cuda_states=2, trained_on=1)
    restored_into = []
    monkeypatch.setattr(rng, "visible_cuda_devices", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored_into.append((int(state[0]), device)))
    edge, drawn = resume(config, source, monkeypatch)
    out = capfd.readouterr().out
    assert ("✓ CUDA RNG state restored: the checkpoint has 2 device state(s), 1 visible here: this rank's stream "
            "(it trained on cuda:1) continues on cuda:0") in out
    assert restored_into[-1] == (2, 0)  # the state of cuda:1 went into cuda:0, last
    assert "without deterministic mode" not in out  # the checkpoint's run had it on
    assert_trained_to_the_end(edge, drawn)


def test_a_checkpoint_of_a_gpu_run_without_deterministic_mode_says_so(tmp_path, capfd, monkeypatch):
    config = make_config(tmp_path, "gpu_run", epochs=1)
    state = TrainState.fresh(config, 1, device="cuda", deterministic=False)
    state.position = MID_EPOCH
    source = write_checkpoint(tmp_path / "gpu_run", ckpt.checkpoint_name(config, 1, 2), config, state=state)
    resume(config, source, monkeypatch)
    assert ("✓ Reproducibility: CPU kernels are deterministic; the checkpoint was written without deterministic mode, so the steps "
            "before it cannot be reproduced bit for bit") in capfd.readouterr().out
