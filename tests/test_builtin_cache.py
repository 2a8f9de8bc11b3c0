"""The built-in data prepared once per node (data/builtin_cache.py): a restart opens the split
instead of generating it, bitwise the same; a damaged file or another generator is a new split."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cape_ray.config import TrainConfig
from cape_ray.data import builtin_cache, synthetic
from cape_ray.data.loading import load_split


def same(a, b) -> bool:
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            if not torch.equal(x, y):
                return False
        elif f.name in ("rows_by_category", "adjacency"):
            if x.keys() != y.keys() or not all(bool((x[k] == y[k]).all()) for k in x):
                return False
        elif x != y:
            return False
    return True


def test_a_second_start_opens_the_split_without_generating_it(tmp_path, monkeypatch):
    config = TrainConfig(cache_dir=str(tmp_path), synthetic_instances_per_category=6, synthetic_canvas=48,
                         image_size=32)
    fresh = load_split(config.replace(cache_dir=""), "val", 3)
    first = load_split(config, "val", 3)
    monkeypatch.setattr(synthetic, "make_synthetic_split", lambda *a, **k: pytest.fail("generated again"))
    again = load_split(config, "val", 3)
    assert same(fresh, first) and same(fresh, again)
    files = sorted(p.name for p in (tmp_path / builtin_cache.SUBDIRECTORY).iterdir())
    assert len(files) == 2 and files[0].startswith("val-builtin-") and files[1].endswith(".sha256")


def test_a_damaged_file_or_other_parameters_generate_it_again(tmp_path, caplog):
    config = TrainConfig(cache_dir=str(tmp_path), synthetic_instances_per_category=6, synthetic_canvas=48,
                         image_size=32)
    reference = load_split(config, "val", 3)
    (path,) = (tmp_path / builtin_cache.SUBDIRECTORY).glob("*.pt")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert same(load_split(config, "val", 3), reference)
    assert "does not match its checksum; generating it again" in caplog.text
    other = load_split(config.replace(data_seed=1), "val", 3)  # another seed: another file
    assert len(list((tmp_path / builtin_cache.SUBDIRECTORY).glob("*.pt"))) == 2 and not same(other, reference)


def test_the_hard_set_is_cached_apart_from_the_default_one(tmp_path, monkeypatch):
    from cape_ray.data import synthetic_hard

    config = TrainConfig(data="builtin-hard", cache_dir=str(tmp_path), synthetic_instances_per_category=4,
                         synthetic_canvas=48, image_size=32)
    fresh = load_split(config.replace(cache_dir=""), "val", 2)
    first = load_split(config, "val", 2)
    monkeypatch.setattr(synthetic_hard, "make_hard_split", lambda *a, **k: pytest.fail("generated again"))
    assert same(fresh, first) and same(fresh, load_split(config, "val", 2))
    default = load_split(config.replace(data="builtin"), "val", 2)  # same sizes, the other generator
    assert not same(default, first)
    names = sorted(p.name for p in (tmp_path / builtin_cache.SUBDIRECTORY).glob("*.pt"))
    assert len(names) == 2 and names[0].startswith("val-builtin-") and names[1].startswith("val-builtin-hard-")
