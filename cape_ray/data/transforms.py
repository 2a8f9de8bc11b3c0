"""Crop every instance once to the model input, and augment episodes in batches.

Coordinate conventions (shared by the whole package):
- Original pixels: the centre of pixel column i is x = i (rows likewise), so an image of width W
  spans [-0.5, W - 0.5]; keypoints and bboxes of a `KeypointDataset` use this frame.
- Normalised crop coordinates: 0 = left/top edge of the crop square, 1 = right/bottom edge; output
  pixel j of an S-pixel crop has its centre at (j + 0.5) / S. This matches
  `grid_sample(..., align_corners=False)`.
- The crop square has side L = 1.25 * max(bbox w, h) around the bbox centre (x0, y0 = its top-left
  corner), so `crop_to_original = [[L, 0, x0], [0, L, y0]]`.

Crops are sampled bilinearly with zeros outside the image. When the crop is more than S original
pixels wide, each output pixel averages f x f bilinear samples (f = ceil(L / S), at most 4), a box
filter that keeps thin structures from aliasing away.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .dataset import Category, Instance, KeypointDataset

log = logging.getLogger("cape_ray.data")

CROP_PADDING = 1.25
# Bump whenever a change here alters the pixels or coordinates `prepare` produces (padding, sampling,
# supersampling, rounding): prepared splits cached on disk are keyed by it (data/cache.py).
CROP_RULE_VERSION = 1
MAX_SUPERSAMPLE = 4
_CHUNK_VALUES = 24_000_000  # float values per batched grid_sample call (bounds memory)

# Augmentation (MP-100 training recipe): scale x clip(N(1, 0.15), 0.85, 1.15); with probability
# 0.6 a rotation clip(N(0, 15 deg), +-30 deg); no flips.
AUG_SCALE_SIGMA = 0.15
AUG_SCALE_RANGE = (0.85, 1.15)
AUG_ROTATION_PROB = 0.6
AUG_ROTATION_SIGMA_DEG = 15.0
AUG_ROTATION_MAX_DEG = 30.0


@dataclass
class PreparedSplit:
    """Every usable instance of one split, cropped to the model input; rows = instances."""

    images: torch.Tensor  # uint8 [N, 3, S, S]
    keypoints: torch.Tensor  # float32 [N, Kmax, 2], normalised crop coordinates, 0 for padding
    visible: torch.Tensor  # bool [N, Kmax], False for padding
    crop_to_original: torch.Tensor  # float32 [N, 2, 3]
    bbox: torch.Tensor  # float32 [N, 4] original pixels (x, y, w, h)
    category: torch.Tensor  # int64 [N]
    instance_ids: torch.Tensor  # int64 [N] annotation ids
    rows_by_category: dict[int, np.ndarray]  # int64 row indices, dataset order
    categories: dict[int, Category]  # every category of the dataset, usable or not
    category_ids: list[int]  # sorted ids of the categories that can form an episode
    skipped: dict[int, str]  # category id -> why it cannot form an episode
    image_size: int
    num_shots: int
    num_queries: int
    # category id -> float32 [K, K] symmetric 0/1 skeleton adjacency
    adjacency: dict[int, torch.Tensor] = field(default_factory=dict)
    # category id -> note for usable categories with fewer than num_shots + num_queries instances
    notes: dict[int, str] = field(default_factory=dict)
    source: str = ""

    @property
    def max_keypoints(self) -> int:
        return int(self.keypoints.shape[1])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device | str) -> "PreparedSplit":
        """This split with its tensors on `device` (itself where they already are)."""
        moved = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **moved)


# ------------------------------------------------------------------------------------------ helpers
def crop_box(bbox: np.ndarray) -> tuple[float, float, float]:
    """(x0, y0, side) of the square crop around a bbox (x, y, w, h), original pixels."""
    x, y, w, h = (float(v) for v in bbox)
    side = max(CROP_PADDING * max(w, h), 1.0)  # a degenerate box still gets a 1-pixel crop
    return x + w / 2 - side / 2, y + h / 2 - side / 2, side


def apply_affine(affine: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """points [..., K, 2] through affine [..., 2, 3] -> [..., K, 2]."""
    return points @ affine[..., :2].transpose(-1, -2) + affine[..., None, :, 2]


def compose_affine(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """The affine of `outer(inner(p))`; both [..., 2, 3]."""
    linear = outer[..., :2] @ inner[..., :2]
    shift = (outer[..., :2] @ inner[..., 2:])[..., 0] + outer[..., 2]
    return torch.cat([linear, shift[..., None]], dim=-1)


def skeleton_adjacency(category: Category) -> torch.Tensor:
    k = category.num_keypoints
    adj = torch.zeros(k, k, dtype=torch.float32)
    for a, b in category.skeleton:
        adj[a, b] = adj[b, a] = 1.0
    return adj


def _crop_batch(images: np.ndarray, boxes: np.ndarray, size: int, factor: int) -> torch.Tensor:
    """Crop uint8 [B, H, W, 3] at boxes [B, 3] = (x0, y0, side) -> uint8 [B, 3, size, size]."""
    b, h, w = images.shape[:3]
    src = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    fine = size * factor
    steps = (torch.arange(fine, dtype=torch.float64) + 0.5) / fine  # sub-pixel centres in [0, 1]
    box = torch.from_numpy(boxes).double()
    xs = box[:, 0, None] + steps[None] * box[:, 2, None]  # original pixels [B, fine]
    ys = box[:, 1, None] + steps[None] * box[:, 2, None]
    gx = (2 * xs + 1) / w - 1  # pixel-centre convention -> align_corners=False grid
    gy = (2 * ys + 1) / h - 1
    grid = torch.stack([gx[:, None, :].expand(b, fine, fine), gy[:, :, None].expand(b, fine, fine)], dim=-1)
    out = F.grid_sample(src, grid.float(), mode="bilinear", padding_mode="zeros", align_corners=False)
    if factor > 1:
        out = F.avg_pool2d(out, factor)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _supersample(side: float, size: int) -> int:
    return int(min(MAX_SUPERSAMPLE, max(1, math.ceil(side / size - 1e-6))))


def _checked_image(dataset: KeypointDataset, inst: Instance) -> np.ndarray:
    img = dataset.load_image(inst)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"{dataset.source}: image of instance {inst.id} ({inst.file_name}) must be uint8 "
                         f"[H, W, 3], got {img.dtype} {img.shape}")
    if inst.width and inst.height and img.shape[:2] != (inst.height, inst.width):
        raise ValueError(f"{dataset.source}: image of instance {inst.id} ({inst.file_name}) is "
                         f"{img.shape[1]}x{img.shape[0]} but its record says {inst.width}x{inst.height}; "
                         "fix the width/height of the image record")
    return img


def _crop_windowed(img: np.ndarray, box: tuple[float, float, float], size: int) -> torch.Tensor:
    """Crop one image, converting only the window the crop touches (large photos, small objects)."""
    x0, y0, side = box
    h, w = img.shape[:2]
    left = max(0, int(math.floor(x0)) - 2)
    top = max(0, int(math.floor(y0)) - 2)
    right = min(w, int(math.ceil(x0 + side)) + 3)
    bottom = min(h, int(math.ceil(y0 + side)) + 3)
    if right <= left or bottom <= top:  # crop lies entirely outside the image
        return torch.zeros(3, size, size, dtype=torch.uint8)
    window = np.array(img[top:bottom, left:right])[None]  # a writable copy: decoded PIL arrays are read-only
    boxes = np.array([[x0 - left, y0 - top, side]])
    return _crop_batch(window, boxes, size, _supersample(side, size))[0]


# ------------------------------------------------------------------------------------------ prepare
def query_shortfall_notes(categories: dict[int, Category], counts: dict[int, int], num_shots: int,
                          num_queries: int) -> dict[int, str]:
    """Notes for usable categories with fewer than num_shots + num_queries instances (queries repeat)."""
    return {cid: (f"category {cid} ({categories[cid].name}) has {count} instances, fewer than num_shots + "
                  f"num_queries = {num_shots + num_queries}: queries repeat within an episode")
            for cid, count in counts.items() if count < num_shots + num_queries}


def log_category_problems(source: str, skipped: dict[int, str], notes: dict[int, str]) -> None:
    if skipped:
        log.warning("%s: %d categor%s skipped (too few instances): %s", source or "dataset",
                    len(skipped), "y" if len(skipped) == 1 else "ies", "; ".join(skipped.values()))
    for note in notes.values():
        log.warning("%s: %s", source or "dataset", note)


def _crop_from_disk(dataset: KeypointDataset, rows: list[Instance], boxes: np.ndarray, images: torch.Tensor,
                    image_size: int, threads: int) -> None:
    """Read each image once, crop the windows its instances touch into `images`, `threads` images at a
    time: PIL decoding and torch release the GIL, so threads scale over cores. Every row is computed
    by the same single-image code whatever the thread count, so the pixels do not depend on it."""
    by_image: dict[tuple[str, int], list[int]] = {}
    for i in sorted(range(len(rows)), key=lambda i: (rows[i].file_name, rows[i].image_id, i)):
        by_image.setdefault((rows[i].file_name, rows[i].image_id), []).append(i)

    def crop_image(members: list[int]) -> None:
        pixels = _checked_image(dataset, rows[members[0]])
        for i in members:
            images[i] = _crop_windowed(pixels, tuple(boxes[i]), image_size)

    if threads <= 1:
        for members in by_image.values():
            crop_image(members)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="cape-ray-crop") as pool:
        futures = [pool.submit(crop_image, members) for members in by_image.values()]
        try:
            for future in futures:  # in submission order: the first bad image in file order is reported
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def prepare(dataset: KeypointDataset, image_size: int, num_shots: int = 1, num_queries: int = 1, *,
            threads: int = 1, allocate_images: Optional[Callable[[tuple[int, ...]], torch.Tensor]] = None
            ) -> PreparedSplit:
    """Crop every instance of the categories that can form an episode (>= num_shots + 1 instances).

    Categories with fewer instances are listed in `skipped` (and logged), not raised on. Categories
    with at least num_shots + 1 but fewer than num_shots + num_queries instances stay usable: their
    episodes repeat query instances; they are listed in `notes`.

    `threads` images are read and cropped at once (images on disk). `allocate_images(shape)` returns
    the zeroed uint8 tensor to fill (for example one backed by a file); by default a new tensor.
    """
    if image_size < 1 or num_shots < 1 or num_queries < 1:
        raise ValueError(f"image_size, num_shots and num_queries must be >= 1, got {image_size}, "
                         f"{num_shots}, {num_queries}")
    need = num_shots + 1
    skipped: dict[int, str] = {}
    usable: list[int] = []
    for cid in dataset.category_ids:
        count = len(dataset.instances.get(cid, []))
        if count < need:
            skipped[cid] = (f"category {cid} ({dataset.categories[cid].name}) has {count} usable instance(s); "
                            f"an episode needs num_shots + 1 = {need}")
        else:
            usable.append(cid)
    notes = query_shortfall_notes(dataset.categories, {cid: len(dataset.instances[cid]) for cid in usable},
                                  num_shots, num_queries)
    log_category_problems(dataset.source, skipped, notes)
    if not usable:
        raise ValueError(f"{dataset.source or 'dataset'}: no category has num_shots + 1 = {need} instances, "
                         "so no episode can be formed; add instances or lower --num_shots")

    rows: list[Instance] = [inst for cid in usable for inst in dataset.instances[cid]]
    n = len(rows)
    kmax = max(dataset.categories[cid].num_keypoints for cid in usable)
    boxes = np.array([crop_box(inst.bbox) for inst in rows], dtype=np.float64).reshape(n, 3)

    keypoints = np.zeros((n, kmax, 2), dtype=np.float32)
    visible = np.zeros((n, kmax), dtype=bool)
    for i, inst in enumerate(rows):
        k = len(inst.keypoints)
        keypoints[i, :k] = (np.asarray(inst.keypoints, dtype=np.float64) - boxes[i, :2]) / boxes[i, 2]
        visible[i, :k] = inst.visible
    affine = np.zeros((n, 2, 3), dtype=np.float32)
    affine[:, 0, 0] = affine[:, 1, 1] = boxes[:, 2]
    affine[:, :, 2] = boxes[:, :2]

    image_shape = (n, 3, image_size, image_size)
    images = (torch.zeros(image_shape, dtype=torch.uint8) if allocate_images is None
              else allocate_images(image_shape))
    if all(inst.image is not None for inst in rows):
        # In memory (synthetic): one grid_sample per group of same-size images and supersampling.
        groups: dict[tuple, list[int]] = {}
        for i, inst in enumerate(rows):
            img = _checked_image(dataset, inst)
            groups.setdefault((img.shape, _supersample(boxes[i, 2], image_size)), []).append(i)
        for (shape, factor), members in groups.items():
            per_chunk = max(1, _CHUNK_VALUES // (3 * (shape[0] * shape[1] + (image_size * factor) ** 2)))
            for start in range(0, len(members), per_chunk):
                idx = members[start:start + per_chunk]
                stack = np.stack([rows[i].image for i in idx])
                images[idx] = _crop_batch(stack, boxes[idx], image_size, factor)
    else:
        _crop_from_disk(dataset, rows, boxes, images, image_size, threads)

    rows_by_category: dict[int, np.ndarray] = {}
    start = 0
    for cid in usable:
        count = len(dataset.instances[cid])
        rows_by_category[cid] = np.arange(start, start + count, dtype=np.int64)
        start += count
    return PreparedSplit(
        images=images,
        keypoints=torch.from_numpy(keypoints),
        visible=torch.from_numpy(visible),
        crop_to_original=torch.from_numpy(affine),
        bbox=torch.from_numpy(np.stack([np.asarray(inst.bbox, dtype=np.float32) for inst in rows])),
        category=torch.tensor([inst.category_id for inst in rows], dtype=torch.int64),
        instance_ids=torch.tensor([inst.id for inst in rows], dtype=torch.int64),
        rows_by_category=rows_by_category,
        categories=dict(dataset.categories),
        category_ids=usable,
        skipped=skipped,
        image_size=image_size,
        num_shots=num_shots,
        num_queries=num_queries,
        adjacency={cid: skeleton_adjacency(dataset.categories[cid]) for cid in usable},
        notes=notes,
        source=dataset.source,
    )


# ------------------------------------------------------------------------------------- augmentation
@dataclass(frozen=True)
class AugmentParams:
    """Per-image augmentation: a similarity transform about the crop centre."""

    scale: np.ndarray  # float64 [M]
    rotation: np.ndarray  # float64 [M] radians (0 when not rotated)

    def __len__(self) -> int:
        return len(self.scale)

    @staticmethod
    def concat(parts: list["AugmentParams"]) -> "AugmentParams":
        return AugmentParams(np.concatenate([p.scale for p in parts]), np.concatenate([p.rotation for p in parts]))

    @staticmethod
    def identity(count: int) -> "AugmentParams":
        return AugmentParams(np.ones(count), np.zeros(count))


def sample_augment_params(rng: np.random.Generator, count: int) -> AugmentParams:
    """Draw parameters for `count` images from an explicit generator (fixed draw order)."""
    scale = np.clip(rng.normal(1.0, AUG_SCALE_SIGMA, count), *AUG_SCALE_RANGE)
    rotate = rng.random(count) < AUG_ROTATION_PROB
    degrees = np.clip(rng.normal(0.0, AUG_ROTATION_SIGMA_DEG, count), -AUG_ROTATION_MAX_DEG, AUG_ROTATION_MAX_DEG)
    return AugmentParams(scale=scale, rotation=np.where(rotate, np.deg2rad(degrees), 0.0))


def augment_affines(params: AugmentParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(forward, inverse) affines [M, 2, 3] in normalised crop coordinates.

    forward: p_aug = c + s R (p - c) with c = (0.5, 0.5); inverse maps augmented back to crop coords.
    """
    s = torch.from_numpy(np.asarray(params.scale, dtype=np.float64))
    a = torch.from_numpy(np.asarray(params.rotation, dtype=np.float64))
    cos, sin = torch.cos(a), torch.sin(a)
    centre = torch.full((len(s), 2, 1), 0.5, dtype=torch.float64)
    fwd_linear = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2) * s[:, None, None]
    inv_linear = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2) / s[:, None, None]
    forward = torch.cat([fwd_linear, centre - fwd_linear @ centre], -1)
    inverse = torch.cat([inv_linear, centre - inv_linear @ centre], -1)
    return forward, inverse


def augment_matrices(params: AugmentParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(theta for `affine_grid`, forward, inverse), float64 [M, 2, 3], computed on the CPU.

    The last bit of the trigonometry can depend on how many images one call holds (vectorised and
    scalar kernels differ), so a caller that wants `augment`'s exact bits passes the same images per
    call as `augment` gets (see TrainingBatches).
    """
    forward, inverse = augment_affines(params)
    # affine_grid works in [-1, 1] coordinates centred on the crop centre: g = 2p - 1, so sampling
    # the source at the inverse transform is its linear part with no shift.
    theta = torch.cat([inverse[:, :, :2], torch.zeros(len(params), 2, 1, dtype=torch.float64)], -1)
    return theta, forward, inverse


def warp(images: torch.Tensor, keypoints: torch.Tensor, theta: torch.Tensor, forward: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [M, 3, S, S] sampled at `theta` (zeros outside) and keypoints [M, K, 2] moved by
    `forward`, on whatever device they are (see augment_matrices)."""
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out, apply_affine(forward, keypoints)


def augment(images: torch.Tensor, keypoints: torch.Tensor, params: AugmentParams
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotate/scale images [M, 3, S, S] (float) about the crop centre, zeros outside.

    Returns (images, keypoints [M, K, 2] transformed analytically, inverse [M, 2, 3]) where
    `inverse` maps augmented normalised coordinates back to the un-augmented crop coordinates
    (compose it after `crop_to_original` to reach original pixels).
    """
    theta, forward, inverse = augment_matrices(params)
    out, moved = warp(images, keypoints, theta.to(images.dtype), forward.to(keypoints.dtype))
    return out, moved, inverse.to(torch.float32)
