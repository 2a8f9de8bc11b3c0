"""Opening a cached prepared split at MP-100's full size: the cheap open against full verification.

Writes an MP-100-format training split with the full size's instance count (the 70 built-in training
categories, K 5..35, 100..260 instances each, as `make-data --mp100_sizes`), but every image record
points at one small PNG, so that building the cache entry at --image_size takes seconds instead of
decoding 12k photos. The entry is built by the cache's own builder, so its files have their real
sizes (3 x S x S bytes per instance). Then, side by side in one run:

  cheap open    what every open does: annotation hash remembered against the file's size, times
                and inode; per entry file its size, sealed times and inode, SHA-256 of sampled blocks
  full open     CAPE_VERIFY_CACHE=1: the annotation file and every entry file hashed in full, which
                is what every open did before the cheap open existed

each with the files in the page cache (warm: a restart on the same node) and evicted from it with
posix_fadvise(DONTNEED) (cold: after other work pushed them out; a network file system reads at
least this much over the network).

    python bench/cache_open.py [--scale 1.0] [--image_size 256] [--repeats 5] [--dir DIR]

Needs 3 x S x S bytes per instance of free disk under --dir (2.5 GB at full size and 256 px).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from cape_ray.data import cache  # noqa: E402
from cape_ray.data.dataset import Instance  # noqa: E402
from cape_ray.data.mp100 import annotation_path, annotation_record, category_record, load_mp100, \
    write_annotation_file  # noqa: E402
from cape_ray.data.synthetic import make_template, synthetic_category_ids  # noqa: E402
from cape_ray.data.synthetic_large import KEYPOINT_RANGE, instances_per_category  # noqa: E402

TILE = 64  # pixels a side of the one image every record points at


def write_split(out: Path, scale: float, seed: int) -> Path:
    """The training split's annotation file at the given scale, and its one image."""
    (out / "images").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (TILE, TILE, 3), dtype=np.uint8)).save(out / "images" / "tile.png")
    images, annotations, categories = [], [], []
    for cid in synthetic_category_ids("train", seed):
        template = make_template(cid, seed, KEYPOINT_RANGE)
        k = template.category.num_keypoints
        for i in range(instances_per_category(cid, seed, scale)):
            ident = cid * 100_000 + i
            points = rng.uniform(8, TILE - 8, (k, 2)).astype(np.float32)
            images.append({"id": ident, "file_name": "tile.png", "width": TILE, "height": TILE})
            annotations.append(annotation_record(Instance(
                id=ident, image_id=ident, category_id=cid, keypoints=points, visible=rng.random(k) < 0.9,
                bbox=np.array([4, 4, TILE - 8, TILE - 8], dtype=np.float32))))
        categories.append(category_record(template.category))
    return write_annotation_file(annotation_path(out, 1, "train"), "cache_open benchmark", images, annotations,
                                 categories)


def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache (only pages no process maps can go)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed_open(open_split, full: bool, cold_files: list[Path] | None) -> float:
    if full:
        os.environ[cache.VERIFY_ENV] = "1"
    else:
        os.environ.pop(cache.VERIFY_ENV, None)
    gc.collect()  # the previous split's mappings are gone: its pages can be evicted
    if cold_files:
        evict(cold_files)
    started = time.perf_counter()
    split, outcome = open_split()
    seconds = time.perf_counter() - started
    assert not outcome.built, "the entry was rebuilt: the benchmark measures opens only"
    del split
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="instances per category x this (1.0: ~12.6k)")
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5, help="opens per row (the fastest is printed)")
    parser.add_argument("--dir", default=None, help="where to write the data and the cache (a local disk)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cape_ray_cache_open_", dir=args.dir))
    try:
        data, cache_dir = work / "mp100", work / "cache"
        annotation = write_split(data, args.scale, args.seed)
        cache.SETTLED_NS = 0  # the annotation file was written a moment ago; a real one is older

        def open_split():
            return cache.open_or_build(cache_dir, annotation, data / "images", args.image_size, 1, 2,
                                       load_dataset=lambda: load_mp100(data, 1, "train"))

        started = time.perf_counter()
        split, built = open_split()
        build_seconds = time.perf_counter() - started
        rows, image_bytes = len(split), split.images.numel()
        del split
        files = [annotation] + sorted(p for p in built.entry.iterdir())
        entry_bytes = sum(p.stat().st_size for p in built.entry.iterdir())
        annotation_bytes = annotation.stat().st_size

        rows_out = {}
        for label, full, cold in (("cheap open, warm", False, False), ("full open, warm", True, False),
                                  ("cheap open, cold", False, True), ("full open, cold", True, True)):
            rows_out[label] = min(timed_open(open_split, full, files if cold else None)
                                  for _ in range(args.repeats))
    finally:
        os.environ.pop(cache.VERIFY_ENV, None)
        shutil.rmtree(work, ignore_errors=True)

    print(f"training split: {rows} instances at {args.image_size} px; entry {entry_bytes / 1e9:.2f} GB (images "
          f"{image_bytes / 1e9:.2f} GB), annotation file {annotation_bytes / 1e6:.1f} MB; built in "
          f"{build_seconds:.1f} s ({built.threads} threads, fsync included)")
    print(f"{'':24s} {'ms':>9s}")
    for label, seconds in rows_out.items():
        print(f"{label:24s} {1000 * seconds:9.1f}")
    print(f"{'full / cheap, warm':24s} {rows_out['full open, warm'] / rows_out['cheap open, warm']:8.0f}x")
    print(f"{'full / cheap, cold':24s} {rows_out['full open, cold'] / rows_out['cheap open, cold']:8.0f}x")


if __name__ == "__main__":
    main()
