"""The hard built-in categories: determinism, the family split, K range, hidden keypoints, mirror
symmetry, the MP-100 export read back, and `--data builtin-hard` through load_split / evaluate."""

import json
import random

import numpy as np
import pytest
import torch

from cape_ray import cli
from cape_ray.config import TrainConfig
from cape_ray.data import synthetic_hard as hard
from cape_ray.data.loading import load_split
from cape_ray.data.mp100 import load_mp100
from cape_ray.evaluate import evaluation_config

SUBSETS = ("train", "val", "test")


def _arrays(dataset):
    return [(inst.id, inst.file_name, inst.image, inst.keypoints, inst.visible, inst.bbox)
            for cid in dataset.category_ids for inst in dataset.instances[cid]]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x[:2] == y[:2]
        for u, v in zip(x[2:], y[2:]):
            assert u.dtype == v.dtype and np.array_equal(u, v)


def test_same_seed_gives_bitwise_identical_data_regardless_of_global_rng():
    first = _arrays(hard.make_hard_split("val", seed=3, instances_per_category=4, canvas=64))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    random.random(), np.random.rand(7), torch.rand(3)
    second = _arrays(hard.make_hard_split("val", seed=3, instances_per_category=4, canvas=64))
    _assert_same(first, second)
    other = _arrays(hard.make_hard_split("val", seed=4, instances_per_category=4, canvas=64))
    assert not np.array_equal(first[0][2], other[0][2])
    assert hard.hard_category_ids("test", seed=3) != hard.hard_category_ids("test", seed=4)


def test_split_sizes_and_families_spread_over_train_and_test():
    ids = {s: hard.hard_category_ids(s, seed=0) for s in SUBSETS}
    assert [len(ids[s]) for s in SUBSETS] == [70, 10, 20]
    assert sorted(ids["train"] + ids["val"] + ids["test"]) == list(range(1, 101))
    family = {cid: hard.category_family(cid).name for cid in range(1, 101)}
    assert len(set(family.values())) == len(hard.FAMILIES) >= 10
    for cid in ids["test"]:  # new but related: its family has categories to train on
        assert sum(family[t] == family[cid] for t in ids["train"]) >= 5
    assert {family[c] for c in ids["test"]} == set(family.values())  # every family is tested
    with pytest.raises(ValueError):
        hard.hard_category_ids("holdout")


def test_templates_keypoint_range_tree_skeleton_and_related_categories():
    counts = []
    for cid in range(1, 101):
        template = hard.make_template(cid)
        category = template.category
        k = category.num_keypoints
        counts.append(k)
        assert category.supercategory == template.family.name and template.family.name in category.name
        assert len(set(category.keypoint_names)) == k and len(category.skeleton) == k - 1
        assert all(0 <= p < c for c, p in enumerate(template.parents[1:], start=1))  # a tree rooted at 0
        assert np.isclose(np.sqrt((template.points ** 2).sum(1)).max(), 1.0)
    assert min(counts) == hard.MIN_KEYPOINTS and 36 <= max(counts) <= hard.MAX_KEYPOINTS
    assert len(set(counts)) >= 20


def test_mirror_symmetric_categories_have_lookalike_left_and_right_keypoints():
    symmetric = 0
    for cid in range(1, 101):
        template = hard.make_template(cid)
        partners = np.flatnonzero(template.partner >= 0)
        if not template.family.symmetric:
            assert partners.size == 0
            continue
        symmetric += 1
        assert partners.size >= 4
        other = template.partner[partners]
        assert np.array_equal(template.partner[other], partners)
        names = template.category.keypoint_names
        for i, j in zip(partners, other):
            assert {names[i][:2], names[j][:2]} == {"l_", "r_"} and names[i][2:] == names[j][2:]
        # a mirror image about the vertical axis, and the same glyph on both sides
        assert np.allclose(template.points[other], template.points[partners] * [-1, 1], atol=1e-12)
        assert np.array_equal(template.part[partners], template.part[other])
    assert symmetric >= 40


def test_truncated_and_occluded_keypoints_are_invisible(monkeypatch):
    canvas, n = 64, 24
    outside = hidden_inside = total = 0
    for cid in hard.hard_category_ids("train")[:12]:
        template = hard.make_template(cid)
        images, keypoints, visible = hard.render_instances(template, n, np.random.default_rng([7, cid]), canvas)
        with monkeypatch.context() as patch:
            patch.setattr(hard, "OCCLUSION_RATE", 0.0)
            clear, same_keypoints, visible_clear = hard.render_instances(template, n, np.random.default_rng([7, cid]),
                                                                         canvas)
        assert np.array_equal(keypoints, same_keypoints)
        in_image = ((keypoints >= 0) & (keypoints <= canvas - 1)).all(-1)
        assert not visible[~in_image].any() and not visible_clear[~in_image].any()  # truncated: hidden
        assert np.array_equal(visible_clear, in_image)  # without occluders only truncation hides
        assert (visible.sum(1) >= np.minimum(hard.MIN_VISIBLE, template.category.num_keypoints)).all()
        for i, j in zip(*np.nonzero(in_image & ~visible)):  # occluded: an occluder covers the keypoint
            x, y = np.rint(keypoints[i, j]).astype(int)
            window = (slice(max(y - 1, 0), y + 2), slice(max(x - 1, 0), x + 2))
            assert (images[i][window] != clear[i][window]).any()
        outside += int((~in_image).sum())
        hidden_inside += int((in_image & ~visible).sum())
        total += visible.size
    assert outside > 0.01 * total and hidden_inside > 0.02 * total
    assert outside + hidden_inside < 0.3 * total


def test_copying_the_support_is_a_weak_baseline_on_test_categories():
    from tiny import copy_support_pck

    categories = [hard.make_category_instances(cid, instances_per_category=10, canvas=96)[1]
                  for cid in hard.hard_category_ids("test")]
    assert copy_support_pck(categories) <= 0.3


def test_make_data_preset_hard_reads_back_as_the_generated_instances(tmp_path):
    assert cli.main(["make-data", "--out", str(tmp_path), "--preset", "hard", "--seed", "2",
                     "--instances_per_category", "2", "--canvas", "48", "--split", "3"]) == 0
    for subset in SUBSETS:
        generated = hard.make_hard_split(subset, seed=2, instances_per_category=2, canvas=48)
        loaded = load_mp100(tmp_path, 3, subset)
        assert loaded.categories == generated.categories
        for cid in generated.category_ids:
            assert len(loaded.instances[cid]) == len(generated.instances[cid])
            for g, back in zip(generated.instances[cid], loaded.instances[cid]):
                assert (back.id, back.file_name, back.width, back.height) == (g.id, g.file_name, g.width, g.height)
                for x, y in ((g.keypoints, back.keypoints), (g.visible, back.visible), (g.bbox, back.bbox),
                             (g.image, loaded.load_image(back))):
                    assert x.dtype == y.dtype and np.array_equal(x, y)


def test_data_builtin_hard_loads_through_load_split_and_evaluation_config():
    config = TrainConfig(data="builtin-hard", synthetic_instances_per_category=3, synthetic_canvas=48,
                         image_size=32)
    split = load_split(config, "test", num_queries=2)
    assert split.category_ids == hard.hard_category_ids("test")
    assert all(split.categories[c].supercategory in {f.name for f in hard.FAMILIES} for c in split.category_ids)
    assert split.images.shape[2:] == (32, 32) and split.max_keypoints <= hard.MAX_KEYPOINTS
    assert "hard" in split.source

    saved = TrainConfig().to_dict()
    assert evaluation_config(saved, data="builtin-hard").data == "builtin-hard"
    assert evaluation_config(config.to_dict(), data="builtin").data == "builtin"
    with pytest.raises(Exception, match="--data_root"):
        evaluation_config(saved, data="mp100")


def test_evaluate_a_checkpoint_on_the_hard_set_with_the_data_flag(tmp_path, capsys):
    from tiny import write_checkpoint

    torch.set_num_threads(1)
    config = TrainConfig(image_size=32, feature_dim=16, refine_layers=1, synthetic_instances_per_category=4,
                         synthetic_canvas=48, num_threads=1)  # trained on the default built-in set
    checkpoint = write_checkpoint(tmp_path, "checkpoint_e001", config)
    out = tmp_path / "report.json"
    assert cli.main(["evaluate", "--checkpoint", str(checkpoint), "--data", "builtin-hard", "--episodes", "1",
                     "--queries", "2", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["data"].startswith("hard built-in")
    assert [row["id"] for row in report["categories"]] == hard.hard_category_ids("test")
    assert "hard_" in capsys.readouterr().out
