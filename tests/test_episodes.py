import random
from collections import Counter

import numpy as np
import pytest
import torch

from cape_ray.data.episodes import EpisodeBatch, EpisodeSampler, collate, global_episode_indices, shard
from cape_ray.data.synthetic import make_synthetic_split
from cape_ray.data.transforms import prepare
from cape_ray.metrics import to_original_pixels


@pytest.fixture(scope="module")
def dataset():
    return make_synthetic_split("train", seed=0, instances_per_category=5, canvas=64)


@pytest.fixture(scope="module")
def split(dataset):
    return prepare(dataset, 32, num_shots=1, num_queries=2)


def _same_episode(a, b):
    return (a.category_id == b.category_id and np.array_equal(a.support_rows, b.support_rows)
            and np.array_equal(a.query_rows, b.query_rows)
            and (a.augment is None) == (b.augment is None)
            and (a.augment is None or (np.array_equal(a.augment.scale, b.augment.scale)
                                       and np.array_equal(a.augment.rotation, b.augment.rotation))))


def _batches_equal(a: EpisodeBatch, b: EpisodeBatch):
    return all(torch.equal(getattr(a, name), getattr(b, name)) for name in a.__dataclass_fields__)


def test_training_episode_is_a_function_of_seed_epoch_index(split):
    one, two = EpisodeSampler(split, seed=5), EpisodeSampler(split, seed=5)
    for epoch, index in [(0, 0), (0, 17), (3, 1000), (7, 69), (7, 70)]:
        assert _same_episode(one.train_episode(epoch, index), two.train_episode(epoch, index))
    # out-of-order calls give the same episodes
    forward = [one.train_episode(2, i) for i in range(10)]
    backward = [two.train_episode(2, i) for i in reversed(range(10))][::-1]
    assert all(_same_episode(a, b) for a, b in zip(forward, backward))
    other = EpisodeSampler(split, seed=6)
    assert not all(_same_episode(one.train_episode(0, i), other.train_episode(0, i)) for i in range(10))
    assert not all(_same_episode(one.train_episode(0, i), one.train_episode(1, i)) for i in range(10))


def test_global_rng_has_no_influence(split):
    sampler = EpisodeSampler(split, seed=1)
    episodes = sampler.train_episodes(4, range(8))
    batch = collate(split, episodes, augment=True)
    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    random.random(), np.random.rand(5), torch.rand(5)
    fresh = EpisodeSampler(split, seed=1)
    again = fresh.train_episodes(4, range(8))
    assert all(_same_episode(a, b) for a, b in zip(episodes, again))
    assert _batches_equal(batch, collate(split, again, augment=True))
    np.random.seed(7), torch.manual_seed(7)
    assert _batches_equal(batch, collate(split, again, augment=True))


def test_categories_are_balanced_and_rows_are_distinct(split):
    sampler = EpisodeSampler(split, seed=0)
    n = len(split.category_ids)
    episodes = sampler.train_episodes(0, range(3 * n))
    assert Counter(e.category_id for e in episodes) == Counter({c: 3 for c in split.category_ids})
    for e in episodes:
        rows = np.concatenate([e.support_rows, e.query_rows])
        assert len(set(rows.tolist())) == len(rows)  # 5 instances: 1 support + 2 distinct queries
        assert set(rows.tolist()) <= set(split.rows_by_category[e.category_id].tolist())
        assert len(e.augment) == 3


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_rank_sharding_covers_each_index_once(world_size, accumulation):
    batch_size, steps = 4, 5
    seen = []
    for step in range(steps):
        per_step = []
        for micro in range(accumulation):
            for rank in range(world_size):
                per_step += global_episode_indices(step, micro, rank, world_size, batch_size, accumulation).tolist()
        g = batch_size * accumulation * world_size
        assert sorted(per_step) == list(range(step * g, (step + 1) * g))  # a step's set depends only on G
        seen += per_step
    assert sorted(seen) == list(range(steps * batch_size * accumulation * world_size))


def test_step_content_does_not_depend_on_how_it_is_split():
    def step_set(world_size, accumulation):
        return sorted(i for m in range(accumulation) for r in range(world_size)
                      for i in global_episode_indices(3, m, r, world_size, 4, accumulation).tolist())
    assert step_set(1, 2) == step_set(2, 1)
    assert step_set(1, 6) == step_set(3, 2) == step_set(2, 3)


def test_fixed_episodes_are_identical_across_calls_and_shard_cleanly(split):
    sampler = EpisodeSampler(split, seed=0)
    first = sampler.fixed_episodes(3, num_queries=4, seed=11)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    second = EpisodeSampler(split, seed=99).fixed_episodes(3, num_queries=4, seed=11)
    assert len(first) == 3 * len(split.category_ids)
    assert all(_same_episode(a, b) for a, b in zip(first, second))
    assert all(e.augment is None and len(e.query_rows) == 4 for e in first)
    assert [e.category_id for e in first[:3]] == [split.category_ids[0]] * 3
    assert not all(_same_episode(a, b) for a, b in zip(first, sampler.fixed_episodes(3, 4, seed=12)))
    for world_size in (1, 2, 3):
        parts = [shard(first, r, world_size) for r in range(world_size)]
        assert sum(len(p) for p in parts) == len(first)
        for r, part in enumerate(parts):
            assert part == first[r::world_size]


def test_small_category_repeats_queries_but_never_a_support(dataset):
    cid = dataset.category_ids[0]
    small = type(dataset)(categories={cid: dataset.categories[cid]}, instances={cid: dataset.instances[cid][:2]})
    split = prepare(small, 32, num_shots=1, num_queries=3)
    assert cid in split.notes
    for e in EpisodeSampler(split, seed=0).fixed_episodes(4, 3):
        assert len(set(e.query_rows.tolist())) == 1 and e.support_rows[0] not in e.query_rows


def test_collate_shapes_and_padding_with_mixed_keypoint_counts(split):
    sampler = EpisodeSampler(split, seed=0)
    by_k = {}
    for cid in split.category_ids:
        by_k.setdefault(split.categories[cid].num_keypoints, cid)
    ks = sorted(by_k)
    chosen = [by_k[ks[0]], by_k[ks[-1]], by_k[ks[len(ks) // 2]]]
    episodes = [e for e in sampler.fixed_episodes(1, 2) if e.category_id in chosen]
    batch = collate(split, episodes)
    b, k = 3, ks[-1]
    assert batch.support_images.shape == (b, 1, 3, 32, 32) and batch.query_images.shape == (b, 2, 3, 32, 32)
    assert batch.support_images.dtype == torch.float32
    assert 0 <= batch.query_images.min() <= batch.query_images.max() <= 1
    assert batch.support_keypoints.shape == (b, 1, k, 2) and batch.query_keypoints.shape == (b, 2, k, 2)
    assert batch.support_visible.shape == (b, 1, k) and batch.query_visible.dtype == torch.bool
    assert batch.keypoint_mask.shape == (b, k) and batch.skeleton.shape == (b, k, k)
    assert batch.query_bbox.shape == (b, 2, 4) and batch.query_to_original.shape == (b, 2, 2, 3)
    assert batch.category_ids.tolist() == [e.category_id for e in episodes]
    for i, e in enumerate(episodes):
        kc = split.categories[e.category_id].num_keypoints
        assert batch.keypoint_mask[i].sum() == kc and batch.keypoint_mask[i, :kc].all()
        assert (batch.query_keypoints[i, :, kc:] == 0).all() and not batch.query_visible[i, :, kc:].any()
        assert not batch.support_visible[i, :, kc:].any()
        assert torch.equal(batch.skeleton[i], batch.skeleton[i].T) and batch.skeleton[i].sum() == 2 * (kc - 1)
        assert batch.skeleton[i, kc:].sum() == 0
        assert torch.equal(batch.support_images[i, 0], split.images[e.support_rows[0]].float() / 255)
    assert _batches_equal(batch, batch.to("cpu"))


def test_augmented_batch_maps_back_to_original_pixels(dataset, split):
    sampler = EpisodeSampler(split, seed=3)
    episodes = sampler.train_episodes(0, range(12))
    plain, augmented = collate(split, episodes), collate(split, episodes, augment=True)
    assert not torch.equal(plain.query_images, augmented.query_images)
    originals = {}
    for cid in dataset.category_ids:
        for row, inst in zip(split.rows_by_category.get(cid, []), dataset.instances[cid]):
            originals[int(row)] = inst.keypoints
    for batch in (plain, augmented):
        pixels = to_original_pixels(batch.query_keypoints, batch.query_to_original)
        for i, e in enumerate(episodes):
            for q, row in enumerate(e.query_rows):
                truth = torch.from_numpy(originals[int(row)])
                torch.testing.assert_close(pixels[i, q, : len(truth)], truth, atol=1e-3, rtol=0)
    # keypoints pushed out of the crop by augmentation are no longer visible
    outside = ((augmented.query_keypoints < 0) | (augmented.query_keypoints > 1)).any(-1)
    assert not (augmented.query_visible & outside).any()
    assert (augmented.query_visible <= plain.query_visible).all()
