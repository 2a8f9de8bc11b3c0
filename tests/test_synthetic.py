import random

import numpy as np
import pytest
import torch

from cape_ray.data import synthetic
from cape_ray.data.synthetic import (COLOURS, SHAPES, make_category_instances, make_synthetic_split, make_template,
                                     synthetic_category_ids)


def _arrays(ds):
    out = []
    for cid in ds.category_ids:
        for inst in ds.instances[cid]:
            out.append((inst.id, inst.file_name, inst.image, inst.keypoints, inst.visible, inst.bbox))
    return out


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x[0] == y[0] and x[1] == y[1]
        for u, v in zip(x[2:], y[2:]):
            assert u.dtype == v.dtype and np.array_equal(u, v)


def test_split_sizes_disjoint_and_deterministic():
    ids = {s: synthetic_category_ids(s, seed=0) for s in ("train", "val", "test")}
    assert [len(ids[s]) for s in ("train", "val", "test")] == [70, 10, 20]
    assert sorted(ids["train"] + ids["val"] + ids["test"]) == list(range(1, 101))
    assert ids == {s: synthetic_category_ids(s, seed=0) for s in ids}
    assert synthetic_category_ids("test", seed=1) != ids["test"]
    with pytest.raises(ValueError):
        synthetic_category_ids("holdout")


def test_same_seed_gives_bitwise_identical_data_regardless_of_global_rng():
    first = _arrays(make_synthetic_split("val", seed=3, instances_per_category=5, canvas=64))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    random.random(), np.random.rand(7), torch.rand(3)
    second = _arrays(make_synthetic_split("val", seed=3, instances_per_category=5, canvas=64))
    _assert_same(first, second)
    other = _arrays(make_synthetic_split("val", seed=4, instances_per_category=5, canvas=64))
    assert not np.array_equal(first[0][2], other[0][2])


def test_templates_keypoint_range_tree_skeleton_and_distinct_glyphs():
    counts = []
    for cid in range(1, 101):
        category = make_template(cid, seed=0).category
        k = category.num_keypoints
        counts.append(k)
        assert category.name == f"synth_{cid:03d}"
        assert len(set(category.keypoint_names)) == k  # names encode the glyph, so glyphs are distinct too
        assert len(category.skeleton) == k - 1
        reached, frontier = {0}, [0]
        while frontier:  # a tree: k - 1 edges that connect every keypoint
            node = frontier.pop()
            for a, b in category.skeleton:
                assert 0 <= a < k and 0 <= b < k
                for u, v in ((a, b), (b, a)):
                    if u == node and v not in reached:
                        reached.add(v)
                        frontier.append(v)
        assert len(reached) == k
    assert min(counts) == 5 and max(counts) == 15
    assert len(set(counts)) >= 8


def test_instance_fields():
    category, insts = make_category_instances(17, seed=0, instances_per_category=20, canvas=96)
    k = category.num_keypoints
    assert category.name == "synth_017"
    visible_fraction = np.mean([inst.visible.mean() for inst in insts])
    assert 0.75 < visible_fraction < 0.97
    for i, inst in enumerate(insts):
        assert inst.file_name == f"synth_017/{i:06d}.png"
        assert inst.image.shape == (96, 96, 3) and inst.image.dtype == np.uint8
        assert inst.keypoints.shape == (k, 2) and inst.keypoints.dtype == np.float32
        assert inst.visible.dtype == bool and inst.visible.any()
        assert (inst.width, inst.height) == (96, 96)
        assert ((inst.keypoints >= 0) & (inst.keypoints <= 95)).all()
        x, y, w, h = inst.bbox
        assert x >= 0 and y >= 0 and x + w <= 96 and y + h <= 96
        # the box holds every keypoint, occluded ones too
        assert (inst.keypoints[:, 0] >= x).all() and (inst.keypoints[:, 0] <= x + w).all()
        assert (inst.keypoints[:, 1] >= y).all() and (inst.keypoints[:, 1] <= y + h).all()


def test_visible_solid_glyphs_show_their_colour_at_the_keypoint():
    palette = np.array(list(COLOURS.values()), dtype=np.float64)
    solid = {SHAPES.index(s) for s in ("disc", "square", "plus", "cross", "triangle", "diamond")}
    hits = total = 0
    for cid in (3, 40, 77):
        template = make_template(cid, seed=0)
        _, insts = make_category_instances(cid, seed=0, instances_per_category=10, canvas=96)
        for inst in insts:
            for j in np.flatnonzero(inst.visible):
                if template.glyph_shape[j] not in solid:
                    continue
                x, y = np.rint(inst.keypoints[j]).astype(int)
                pixel = inst.image[y, x].astype(np.float64)
                nearest = np.argmin(((palette - pixel) ** 2).sum(1))
                hits += np.allclose(palette[nearest], template.glyph_colour[j])
                total += 1
    assert total > 30 and hits / total > 0.8


def test_copying_the_support_is_a_weak_baseline_on_test_categories():
    from tiny import copy_support_pck

    categories = [make_category_instances(cid, seed=0, instances_per_category=12, canvas=96)[1]
                  for cid in synthetic_category_ids("test", seed=0)]
    assert copy_support_pck(categories) <= 0.35


def test_rejects_bad_sizes():
    with pytest.raises(ValueError):
        make_category_instances(1, instances_per_category=0)
    with pytest.raises(ValueError):
        make_category_instances(1, canvas=16)
    assert synthetic.NUM_CATEGORIES == 100
