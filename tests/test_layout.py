"""A run whose world size changes (an elastic resize, a rerun with other --num_workers) keeps its
episodes per optimizer step, at every later start too, and its LR stays a function of the episodes
it has trained: the real loop, resumed from checkpoints of another world size (rank 0's view; the
Ray runs that resize for real are in test_ray_job.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cape_ray import checkpoint as ckpt, engine
from cape_ray.state import Position, TrainState
from cape_ray.worker import train_loop_per_worker
from local_edge import Crash, LocalEdge
from tiny import make_config, write_checkpoint


def world(edge: LocalEdge, size: int) -> LocalEdge:
    """Rank 0 of a world of `size` (its peers' shares of the collectives are left out)."""
    edge.world_size = size
    return edge


def test_the_effective_batch_survives_a_resize_and_every_later_start(tmp_path):
    """Written at 2 workers (8 episodes per step), resumed at 1: accumulation 4 keeps 8, and it is
    still 8 at the next restart at 1 worker (the flags say accumulation 2: 4 per step at 1 worker)."""
    config = make_config(tmp_path, "resized", epochs=2, batch_size=2, accumulation_steps=2, episodes_per_epoch=32)
    state = TrainState.fresh(config, 2)
    state.position = Position(epoch=1, step=0, episode=0, global_step=4, episodes_per_step=8)
    name = ckpt.checkpoint_name(config, 1)
    write_checkpoint(tmp_path / "resized", name, config, ranks=2, state=state)
    latest = str(tmp_path / "resized" / name)

    first = LocalEdge(tmp_path / "resized", latest=latest, registered={name}, crash_after=2, quiet=True)
    with pytest.raises(Crash):
        train_loop_per_worker(config.to_dict(), first)
    second = LocalEdge.after(first)  # a restart at the same, new world size
    train_loop_per_worker(config.to_dict(), second)
    for edge in (first, second):
        for checkpoint, _ in edge.reports:
            position = ckpt.read_state(tmp_path / "resized" / checkpoint)["position"]
            assert position["episodes_per_step"] == 8, checkpoint
            assert "_acc4_" in checkpoint  # the accumulation in force, in the name too
    assert ckpt.read_state(second.latest)["position"]["global_step"] == 4 + 32 // 8  # 4 steps of epoch 2


def test_the_lr_of_a_resized_run_is_the_unresized_ones_at_the_same_episode_count(tmp_path):
    """2 -> 3 workers after epoch 1 of 3: 8 episodes per step cannot be split into 3 ranks x batch 2,
    so the run goes on at 6 per step (8 steps an epoch instead of 6). At every step boundary the LR
    is the one the unresized run has at that episode count, and the run ends at the floor."""
    config = make_config(tmp_path, "lr", epochs=3, batch_size=2, accumulation_steps=2, episodes_per_epoch=48,
                         warmup_steps=4, num_workers="2:3")
    state = TrainState.fresh(config, 2)
    state.position = Position(epoch=1, step=0, episode=0, global_step=6, episodes_per_step=8)
    name = ckpt.checkpoint_name(config, 1)
    write_checkpoint(tmp_path / "lr", name, config, ranks=2, state=state)
    # the checkpoint's schedule: planned at 2 workers (6 steps per epoch), 6 steps done
    _rewrite_schedule(tmp_path / "lr" / name, {"steps_per_epoch": 6, "epochs": 3, "progress": 6.0})

    edge = world(LocalEdge(tmp_path / "lr", latest=str(tmp_path / "lr" / name), registered={name}, quiet=True), 3)
    train_loop_per_worker(config.to_dict(), edge)

    unresized = engine.lr_factor
    checked = 0
    for checkpoint, metrics in edge.reports:
        position = ckpt.read_state(tmp_path / "lr" / checkpoint)["position"]
        assert position["episodes_per_step"] == 6
        episodes = position["epoch"] * 48 + position["episode"]
        expected = config.lr * unresized(episodes / 8, config.warmup_steps, 3 * 6, config.min_lr_ratio)
        assert metrics["lr"] == pytest.approx(expected, rel=1e-12), checkpoint
        checked += 1
    assert checked >= 16  # every step of epochs 2 and 3 (a checkpoint after each)
    assert edge.reports[-1][1]["lr"] == pytest.approx(config.lr * config.min_lr_ratio, rel=1e-12)


def _rewrite_schedule(directory: Path, schedule_state: dict) -> None:
    """Give a written checkpoint another LR schedule state (and a manifest that matches it)."""
    loaded = ckpt.load_checkpoint(directory)
    blobs = {rank: (directory / ckpt.rank_file(rank)).read_bytes() for rank in loaded.rank_states}
    state = {k: v for k, v in loaded.state.items() if k != "schema_version"}
    shutil.rmtree(directory)
    ckpt.write_checkpoint(directory, model=loaded.model, optimizer=loaded.optimizer, scheduler=dict(schedule_state),
                          state=state, rank_states=blobs)


def test_a_preemption_notice_that_goes_away_rearms_the_just_in_time_checkpoint(tmp_path):
    """A notice, withdrawn (the node stayed), then a new notice: two just-in-time checkpoints, one
    per notice (the flag never reset before: the second preemption got none)."""
    config = make_config(tmp_path, "notices", epochs=1, episodes_per_epoch=64, checkpoint_every_steps=0,
                         preemption_check_steps=2)
    notices = iter([None, "first", None, "second", "second", None, None, None])

    class Notice:
        preempted_ranks, deadline_ms = [0], 1000

    edge = LocalEdge(tmp_path / "notices", quiet=True)
    edge.preemption_notice = lambda: Notice() if next(notices, None) else None
    train_loop_per_worker(config.to_dict(), edge)
    reasons = [metrics.get("reason") for _, metrics in edge.reports]
    assert reasons.count("preemption") == 2
