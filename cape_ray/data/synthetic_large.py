"""The built-in categories at MP-100's sizes, streamed to disk as MP-100 files (`make-data --mp100_sizes`).

MP-100 has 100 categories and about 18k instances, most one per image, photos of 500-2,000 pixels a
side, and up to 68 keypoints per category. This writes a dataset of that shape from the built-in
generator, to measure what data preparation costs at full size on a machine without MP-100:
- the 100 categories split 70 / 10 / 20 exactly as the built-in data (same seed, same ids);
- K drawn from 5..35 per category, 100..260 instances per category (about 18k in all), one per image;
- every image is a photo-sized canvas (long side 500..2,000 px, aspect 0.6..1) of smooth colour
  texture, with the object rendered by `synthetic.render_instances` at OBJECT_CANVAS pixels and
  resized to fill 35-95% of the short side, so a crop reads and decodes as much as a real one does.

`scale` multiplies the instances per category (at least MIN_INSTANCES each) to fit a small machine;
image sizes stay as they are, so per-instance figures measured on a scaled-down copy carry over.

Written as JPEG by default, like MP-100's sources: decoding then costs what it does on the real data.
JPEG is lossy, so unlike `export_synthetic` the pixels do not round-trip; annotations do.
Everything is a pure function of the seed and scale.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from .dataset import Instance
from .mp100 import SUBSETS, annotation_path, annotation_record, category_record, write_annotation_file
from .synthetic import keypoint_bbox, make_template, render_instances, synthetic_category_ids

INSTANCES_PER_CATEGORY = (100, 260)  # uniform; mean 180 -> ~18k instances over 100 categories
KEYPOINT_RANGE = (5, 35)
LONG_SIDE = (500, 2000)  # image pixels
ASPECT = (0.6, 1.0)  # short side / long side
OBJECT_FRACTION = (0.35, 0.95)  # object square side / image short side
OBJECT_CANVAS = 128  # objects are rendered at this size, then resized into the image
MIN_INSTANCES = 8  # per category when scaled down: enough for 5-shot episodes
JPEG_QUALITY = 90
TEXTURE_CELL = 12  # image pixels per random texture value before bicubic upsampling
TEXTURE_CONTRAST = 40.0  # standard deviation of the texture around the image's base colour
_ID_STRIDE = 100_000  # annotation / image id = category id * stride + instance index
# tags keep the generators of different purposes apart
_COUNT_TAG, _PLACEMENT_TAG, _TEXTURE_TAG, _RENDER_TAG = 7101, 7102, 7103, 7104

PathLike = Union[str, os.PathLike]


def instances_per_category(category_id: int, seed: int, scale: float) -> int:
    low, high = INSTANCES_PER_CATEGORY
    full = int(np.random.default_rng([seed, category_id, _COUNT_TAG]).integers(low, high + 1))
    return max(MIN_INSTANCES, int(round(full * scale)))


def _placements(category_id: int, seed: int, n: int) -> np.ndarray:
    """int64 [n, 5]: image width, height, object side, object left, object top."""
    rng = np.random.default_rng([seed, category_id, _PLACEMENT_TAG])
    long_side = rng.integers(LONG_SIDE[0], LONG_SIDE[1] + 1, n)
    short_side = np.maximum(1, np.round(long_side * rng.uniform(*ASPECT, n))).astype(np.int64)
    portrait = rng.random(n) < 0.5
    width, height = np.where(portrait, short_side, long_side), np.where(portrait, long_side, short_side)
    side = np.maximum(OBJECT_CANVAS // 2, np.round(short_side * rng.uniform(*OBJECT_FRACTION, n))).astype(np.int64)
    left = np.floor(rng.random(n) * (width - side + 1)).astype(np.int64)
    top = np.floor(rng.random(n) * (height - side + 1)).astype(np.int64)
    return np.stack([width, height, side, left, top], axis=1)


def _compose(obj: np.ndarray, placement: np.ndarray, texture_seed: list[int]) -> Image.Image:
    """A photo-sized image: smooth random colour texture with the object pasted in."""
    width, height, side, left, top = (int(v) for v in placement)
    rng = np.random.default_rng(texture_seed)
    grid = (math.ceil(height / TEXTURE_CELL) + 1, math.ceil(width / TEXTURE_CELL) + 1, 3)
    cells = np.clip(rng.uniform(50, 200, 3) + rng.normal(0, TEXTURE_CONTRAST, grid), 0, 255).astype(np.uint8)
    image = Image.fromarray(cells).resize((width, height), Image.BICUBIC)
    image.paste(Image.fromarray(obj).resize((side, side), Image.BILINEAR), (left, top))
    return image


def export_mp100_sized(out_dir: PathLike, seed: int = 0, scale: float = 1.0, split: int = 1,
                       image_format: str = "jpg", threads: int = 1, subsets: tuple[str, ...] = SUBSETS
                       ) -> dict[str, Path]:
    """Write the MP-100-sized dataset (`subsets` of it) under out_dir; returns the annotation paths.

    Images are encoded `threads` at a time (PIL releases the GIL while encoding); one category's
    rendered objects are in memory at a time.
    """
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be jpg or png, got {image_format!r}")
    out = Path(out_dir)
    written: dict[str, Path] = {}
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="cape-ray-export") as pool:
        for subset in subsets:
            images, annotations, categories = [], [], []
            for cid in synthetic_category_ids(subset, seed):
                template = make_template(cid, seed, KEYPOINT_RANGE)
                n = instances_per_category(cid, seed, scale)
                objects, keypoints, visible = render_instances(
                    template, n, np.random.default_rng([seed, cid, _RENDER_TAG]), OBJECT_CANVAS)
                placements = _placements(cid, seed, n)
                name = template.category.name
                (out / "images" / name).mkdir(parents=True, exist_ok=True)

                def write_image(i: int) -> str:
                    file_name = f"{name}/{i:06d}.{image_format}"
                    image = _compose(objects[i], placements[i], [seed, cid, _TEXTURE_TAG, i])
                    if image_format == "jpg":
                        image.save(out / "images" / file_name, format="JPEG", quality=JPEG_QUALITY)
                    else:
                        image.save(out / "images" / file_name, format="PNG", compress_level=1)
                    return file_name

                file_names = list(pool.map(write_image, range(n)))
                for i, file_name in enumerate(file_names):
                    width, height, side, left, top = (int(v) for v in placements[i])
                    factor = side / OBJECT_CANVAS
                    # pixel centres sit at integer coordinates in both images
                    points = (keypoints[i].astype(np.float64) + 0.5) * factor - 0.5 + [left, top]
                    x, y, w, h = keypoint_bbox(keypoints[i], OBJECT_CANVAS).astype(np.float64)
                    bbox = [(x + 0.5) * factor - 0.5 + left, (y + 0.5) * factor - 0.5 + top, w * factor, h * factor]
                    ident = cid * _ID_STRIDE + i
                    images.append({"id": ident, "file_name": file_name, "width": width, "height": height})
                    annotations.append(annotation_record(Instance(
                        id=ident, image_id=ident, category_id=cid, keypoints=points.astype(np.float32),
                        visible=visible[i], bbox=np.array(bbox, dtype=np.float32))))  # the reader clips it
                categories.append(category_record(template.category))
            written[subset] = write_annotation_file(
                annotation_path(out, split, subset),
                f"cape-ray built-in categories at MP-100 sizes (seed {seed}, scale {scale:g})",
                images, annotations, categories)
    return written
