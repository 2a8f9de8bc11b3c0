"""Training batches built on the model's device from a per-epoch plan are bitwise the batches
`collate` builds on the CPU from the same episodes, and the episodes drawn are exactly those trained."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cape_ray.config import TrainConfig
from cape_ray.data.episodes import EpisodeSampler, TrainingBatches, collate, global_episode_indices
from cape_ray.data.synthetic import make_synthetic_split
from cape_ray.data.transforms import prepare

# ops that read a tensor's value back to the host: each one waits for a GPU to finish
HOST_READS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique2",
              "aten.unique_consecutive", "aten.unique_dim"}


@pytest.fixture(scope="module")
def split():
    # categories with different keypoint counts, so micro-batches pad to different widths
    return prepare(make_synthetic_split("train", seed=0, instances_per_category=6, canvas=64), 32, 1, 2)


def config(**changes) -> TrainConfig:
    return TrainConfig(**{"episodes_per_epoch": 48, "batch_size": 3, "accumulation_steps": 2,
                          "num_queries_per_episode": 2, "image_size": 32, "seed": 11, **changes})


def expected_step(split, config, rank, world_size, epoch, first_episode):
    """The previous path: draw each micro-batch's episodes and collate them on the CPU."""
    sampler = EpisodeSampler(split, config.num_shots, config.num_queries_per_episode, seed=config.seed)
    return [collate(split, sampler.train_episodes(epoch, first_episode + global_episode_indices(
        0, micro, rank, world_size, config.batch_size, config.accumulation_steps)), augment=config.augment)
        for micro in range(config.accumulation_steps)]


def assert_same_batches(built, expected):
    assert len(built) == len(expected)
    for one, other in zip(built, expected):
        for field in dataclasses.fields(one):
            mine, theirs = getattr(one, field.name), getattr(other, field.name)
            assert mine.dtype == theirs.dtype and mine.shape == theirs.shape, field.name
            assert torch.equal(mine, theirs), f"{field.name} differs"


@pytest.mark.parametrize("augment", [True, False])
@pytest.mark.parametrize("rank, world_size", [(0, 1), (1, 2)])
def test_planned_batches_are_bitwise_the_collated_ones(split, augment, rank, world_size):
    cfg = config(augment=augment)
    batches = TrainingBatches(split, cfg, rank, world_size, torch.device("cpu"))
    per_step = cfg.batch_size * cfg.accumulation_steps * world_size
    steps = cfg.episodes_per_epoch // per_step
    widths = set()
    for epoch in (0, 3):
        for step in range(steps):
            built = batches.step(epoch, step * per_step)
            assert_same_batches(built, expected_step(split, cfg, rank, world_size, epoch, step * per_step))
            widths.update(b.num_keypoints for b in built)
    assert len(widths) > 1  # padding to different widths was exercised


def test_the_augmentation_is_really_applied(split):
    on = TrainingBatches(split, config(), 0, 1, torch.device("cpu")).step(0, 0)[0]
    off = TrainingBatches(split, config(augment=False), 0, 1, torch.device("cpu")).step(0, 0)[0]
    assert torch.equal(on.query_rows, off.query_rows)
    assert not torch.equal(on.query_images, off.query_images)
    assert not torch.equal(on.query_to_original, off.query_to_original)


def test_episodes_are_drawn_once_per_epoch_and_exactly_the_ones_trained(split, monkeypatch):
    calls = []
    draw = EpisodeSampler.train_episodes

    def logged(self, epoch, indices):
        calls.append((epoch, [int(i) for i in indices]))
        return draw(self, epoch, indices)

    monkeypatch.setattr(EpisodeSampler, "train_episodes", logged)
    cfg = config(episodes_per_epoch=50)  # 50 = 8 whole steps of 6 episodes, and 2 left over that are never trained
    batches = TrainingBatches(split, cfg, 0, 1, torch.device("cpu"))
    for step in range(8):
        batches.step(0, 6 * step)
    # a resume in the middle of epoch 1, after 3 steps: only the remaining ones are drawn
    for step in range(3, 8):
        batches.step(1, 6 * step)
    assert calls == [(0, list(range(48))), (1, list(range(18, 48)))]


def test_each_rank_draws_its_own_share(split, monkeypatch):
    drawn = []
    draw = EpisodeSampler.train_episodes

    def logged(self, epoch, indices):
        drawn.append([int(i) for i in indices])
        return draw(self, epoch, indices)

    monkeypatch.setattr(EpisodeSampler, "train_episodes", logged)
    cfg = config(batch_size=2, accumulation_steps=2, episodes_per_epoch=24)
    for rank in range(3):
        TrainingBatches(split, cfg, rank, 3, torch.device("cpu")).step(0, 0)
    assert sorted(sum(drawn, [])) == list(range(24))  # every episode of the epoch, by exactly one rank
    assert drawn[1][:4] == [2, 3, 8, 9]  # rank 1: its block of micro-batch 0, then of micro-batch 1


def test_steps_asked_out_of_order_are_still_right(split):
    cfg = config()
    batches = TrainingBatches(split, cfg, 0, 1, torch.device("cpu"))
    for epoch, first in [(0, 24), (0, 6), (2, 42), (0, 6), (0, 0)]:
        assert_same_batches(batches.step(epoch, first), expected_step(split, cfg, 0, 1, epoch, first))


def test_a_step_beyond_the_epoch_is_refused(split):
    batches = TrainingBatches(split, config(), 0, 1, torch.device("cpu"))
    with pytest.raises(ValueError, match="no optimizer step of 6 episodes starts at episode 44"):
        batches.step(0, 44)


class HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) in HOST_READS:
            self.seen.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_a_planned_step_reads_nothing_back_from_the_device(split):
    batches = TrainingBatches(split, config(), 0, 1, torch.device("cpu"))
    batches.step(0, 0)  # plans the epoch (one transfer to the device)
    with HostReads() as reads:
        built = batches.step(0, 6)
    assert reads.seen == [] and len(built) == 2
    # the detector itself: a value read back is seen
    with HostReads() as reads:
        float(built[0].query_images.sum())
    assert reads.seen == ["aten._local_scalar_dense"]


def test_the_split_is_moved_once_and_batches_index_it(split):
    batches = TrainingBatches(split, config(), 0, 1, torch.device("cpu"))
    assert batches.split.images is split.images  # on the CPU: the same tensors, no copy
    skeletons = batches.skeletons
    for slot, cid in enumerate(split.category_ids):
        k = split.categories[cid].num_keypoints
        assert torch.equal(skeletons[slot, :k, :k], split.adjacency[cid])
        assert not skeletons[slot, k:].any() and not skeletons[slot, :, k:].any()
