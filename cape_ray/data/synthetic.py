"""Built-in procedural keypoint categories: 100 templates, 70 train / 10 val / 20 test, from one seed.

A category is a template: K keypoints (5..15) spread over an ellipse (denser towards its rim), a tree
skeleton joining them, and one glyph per keypoint (a shape in a colour, unique within the category).
An instance is the template posed by bending it at its skeleton joints (up to +-40 deg per bone),
then a random rotation (+-60 deg), scale (0.7-1.2), aspect change, shear, translation and per-point
jitter; it is rendered with limbs along the skeleton edges over a cluttered background (smooth noise,
random curves), with distractor glyphs (shapes the category does not use), occluders over ~10% of
the keypoints (those get visibility 0) and colour jitter.

The pose, rim-heavy layouts and rotation make the support positions a weak prior: copying the
support keypoints (in normalised crop coordinates) scores about 0.30 PCK@0.2 on unseen categories,
predicting the crop centre about 0.12, while the glyphs keep every keypoint identifiable.

Rendering is vectorised numpy over every instance of one category at once: the background is
upsampled smooth noise, lines are stamped along sampled points, and glyphs / occluders are evaluated
on small pixel patches around their centres and composited in painter's order.

Determinism: every random draw comes from `np.random.default_rng([seed, category_id, tag])`, and the
few transcendental functions (cos, sin, exp of per-instance parameters) go through Python's `math`,
so the same seed gives bitwise identical data, independent of the global RNG and of thread counts.
Changing `instances_per_category` or `canvas` changes every instance of a category (draws are sized
by them); the templates and the split assignment depend only on the seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .dataset import Category, Instance, KeypointDataset

NUM_CATEGORIES = 100
SUBSET_SIZES = {"train": 70, "val": 10, "test": 20}
MIN_KEYPOINTS = 5
MAX_KEYPOINTS = 15

# Geometry of an instance (template units: centroid 0, farthest keypoint at radius 1).
MAX_ROTATION_DEG = 60.0
SCALE_RANGE = (0.7, 1.2)
SHEAR_RANGE = 0.3
LOG_ASPECT_RANGE = 0.2
POINT_JITTER = 0.04
OBJECT_RADIUS = 0.3  # template radius 1 -> this fraction of the canvas at scale 1
GLYPH_RADIUS = 0.04  # glyph radius as a fraction of the canvas at scale 1
BBOX_MARGIN = 0.03  # bbox margin around the keypoints, fraction of the canvas
OCCLUSION_RATE = 0.1
MAX_DISTRACTORS = 4
NUM_STROKES = 3
SPREAD_RADIAL_POWER = 0.25
ARTICULATION_DEG = 40.0
ARTICULATION_MIN_GAP = 0.75  # posed keypoints stay this fraction of the template's closest pair apart
ARTICULATION_RETRIES = 8

SHAPES = ("disc", "ring", "square", "frame", "plus", "cross", "triangle", "diamond",
          "bar0", "bar45", "bar90", "bar135")
COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 220, 230),
    "orange": (250, 140, 30),
    "white": (250, 250, 250),
    "purple": (120, 40, 170),
    "black": (15, 15, 15),
}
_COLOUR_NAMES = tuple(COLOURS)
_COLOUR_VALUES = np.array([COLOURS[c] for c in _COLOUR_NAMES], dtype=np.float32)
NUM_GLYPHS = len(SHAPES) * len(COLOURS)  # glyph id = shape index * len(COLOURS) + colour index
SHAPE_EXTENT = 1.3  # every shape lies within this radius (glyph-radius units)

# Tags that keep the generators of different purposes apart (never 0: see numpy SeedSequence).
_SPLIT_TAG = 7001
_TEMPLATE_TAG = 7002
_INSTANCE_TAG = 7003
_ID_STRIDE = 100_000  # annotation/image id = category id * stride + instance index


def category_name(category_id: int) -> str:
    return f"synth_{category_id:03d}"


def synthetic_category_ids(subset: str, seed: int = 0) -> list[int]:
    """Category ids (1..100) of `subset` in {"train", "val", "test"}; disjoint, 70/10/20."""
    if subset not in SUBSET_SIZES:
        raise ValueError(f"unknown subset {subset!r}; expected one of {sorted(SUBSET_SIZES)}")
    order = np.random.default_rng([seed, _SPLIT_TAG]).permutation(NUM_CATEGORIES) + 1
    start = 0
    for name, size in SUBSET_SIZES.items():
        if name == subset:
            return sorted(int(c) for c in order[start:start + size])
        start += size
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------- templates
@dataclass(frozen=True)
class SyntheticTemplate:
    category: Category
    points: np.ndarray  # float64 [K, 2], centroid 0, max radius 1
    parents: np.ndarray  # int64 [K] parent keypoint in the skeleton tree, -1 for the root (keypoint 0)
    order: np.ndarray  # int64 [K] keypoints in root-first order
    glyph_shape: np.ndarray  # int64 [K] index into SHAPES
    glyph_colour: np.ndarray  # float32 [K, 3]
    glyph_size: np.ndarray  # float64 [K] radius multiplier
    limb_colour: np.ndarray  # float32 [3]
    spare_glyphs: np.ndarray  # int64 glyph ids the category does not use (for distractors)


def _spread_points(rng: np.random.Generator, k: int) -> np.ndarray:
    """K points in an ellipse, kept apart (dart throwing) so glyphs rarely overlap."""
    aspect = rng.uniform(0.45, 1.0)
    min_dist = 0.6 * math.sqrt(math.pi * aspect / k)
    while True:
        points: list[np.ndarray] = []
        for _ in range(400 * k):
            if len(points) == k:
                break
            # radius drawn with density rising outward: few keypoints sit near the centre
            radius = rng.random() ** SPREAD_RADIAL_POWER
            angle = rng.uniform(-math.pi, math.pi)
            cand = np.array([radius * math.cos(angle), aspect * radius * math.sin(angle)])
            if all(math.dist(cand, p) >= min_dist for p in points):
                points.append(cand)
        if len(points) == k:
            break
        min_dist *= 0.9  # too tight for this ellipse: relax and retry
    raw = np.array(points)
    angle = rng.uniform(0.0, math.pi)
    c, s = math.cos(angle), math.sin(angle)
    pts = np.stack([c * raw[:, 0] - s * raw[:, 1], s * raw[:, 0] + c * raw[:, 1]], axis=1)
    pts -= pts.mean(axis=0)
    return pts / np.sqrt((pts ** 2).sum(axis=1)).max()


def _random_tree(rng: np.random.Generator, pts: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Each keypoint, in random order, joins the nearest keypoint already in the tree."""
    order = rng.permutation(len(pts))
    edges = []
    for i, node in enumerate(order[1:], start=1):
        placed = order[:i]
        dist = ((pts[placed] - pts[node]) ** 2).sum(axis=1)
        parent = int(placed[int(np.argmin(dist))])
        edges.append((parent, int(node)))
    return tuple(edges)


def _tree_order(k: int, edges: tuple[tuple[int, int], ...]) -> tuple[np.ndarray, np.ndarray]:
    """(parent of each keypoint, -1 for the root; keypoints in root-first order) of a tree."""
    neighbours: dict[int, list[int]] = {i: [] for i in range(k)}
    for a, b in edges:
        neighbours[a].append(b)
        neighbours[b].append(a)
    parents = np.full(k, -1, dtype=np.int64)
    order, seen = [0], {0}
    for node in order:  # breadth-first from keypoint 0
        for nb in neighbours[node]:
            if nb not in seen:
                seen.add(nb)
                parents[nb] = node
                order.append(nb)
    return parents, np.array(order, dtype=np.int64)


def make_template(category_id: int, seed: int = 0,
                  keypoint_range: tuple[int, int] = (MIN_KEYPOINTS, MAX_KEYPOINTS)) -> SyntheticTemplate:
    """Category `category_id`'s template; K is drawn from `keypoint_range` (inclusive)."""
    rng = np.random.default_rng([seed, category_id, _TEMPLATE_TAG])
    k = int(rng.integers(keypoint_range[0], keypoint_range[1] + 1))
    pts = _spread_points(rng, k)
    skeleton = _random_tree(rng, pts)
    skeleton = tuple(sorted((min(a, b), max(a, b)) for a, b in skeleton))
    parents, order = _tree_order(k, skeleton)
    glyphs = rng.choice(NUM_GLYPHS, size=k, replace=False)
    shape = glyphs // len(COLOURS)
    colour = glyphs % len(COLOURS)
    names = tuple(f"kp{i:02d}_{_COLOUR_NAMES[colour[i]]}_{SHAPES[shape[i]]}" for i in range(k))
    spare = np.setdiff1d(np.arange(NUM_GLYPHS), glyphs)
    limb = rng.uniform(60, 200, 3).astype(np.float32)
    category = Category(id=category_id, name=category_name(category_id), keypoint_names=names,
                        skeleton=skeleton, supercategory="synthetic")
    return SyntheticTemplate(category=category, points=pts, parents=parents, order=order,
                             glyph_shape=shape.astype(np.int64),
                             glyph_colour=_COLOUR_VALUES[colour], glyph_size=rng.uniform(0.85, 1.15, k),
                             limb_colour=limb, spare_glyphs=spare.astype(np.int64))


# ---------------------------------------------------------------------------------------- rendering
def _shape_mask(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of one shape; (u, v) in glyph-radius units, glyph frame."""
    name = SHAPES[shape]
    au, av = np.abs(u), np.abs(v)
    if name == "disc":
        return u * u + v * v <= 1.0
    if name == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.3)
    if name == "square":
        return np.maximum(au, av) <= 0.8
    if name == "frame":
        m = np.maximum(au, av)
        return (m <= 0.9) & (m >= 0.45)
    if name == "plus":
        return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))
    if name == "cross":
        p, q = np.abs(u + v) * 0.70710678, np.abs(u - v) * 0.70710678
        return ((p <= 0.3) & (q <= 1.0)) | ((q <= 0.3) & (p <= 1.0))
    if name == "triangle":  # circumradius 1, apex up (negative y is up in images)
        return (v <= 0.5) & (0.8660254 * u - 0.5 * v <= 0.5) & (-0.8660254 * u - 0.5 * v <= 0.5)
    if name == "diamond":
        return au + av <= 1.0
    if name.startswith("bar"):
        phi = math.radians(int(name[3:]))
        c, s = math.cos(phi), math.sin(phi)
        return (np.abs(c * u + s * v) <= 1.0) & (np.abs(c * v - s * u) <= 0.28)
    raise AssertionError(name)


def _stamp_patches(img: np.ndarray, pad: int, centres: np.ndarray, half: int, colour: np.ndarray,
                   inside, active: np.ndarray | None = None) -> None:
    """Composite one patch per (instance, item), items in painter's order, into uint8 `img`.

    centres float64 [n, M, 2] canvas pixels; colour uint8 [n, M, 3]; active bool [n, M] or None.
    `inside(rows, m, ox, oy) -> bool [len(rows), P, P]` tests item m of the given instances at pixel
    offsets ox [len(rows), 1, P], oy [len(rows), P, 1] from its centre. Only active pairs are touched.
    """
    n, m_items = centres.shape[:2]
    offsets = np.arange(-half, half + 1)
    base = np.floor(centres).astype(np.int64)
    for m in range(m_items):
        rows = np.arange(n) if active is None else np.flatnonzero(active[:, m])
        if rows.size == 0:
            continue
        px = base[rows, m, 0, None] + offsets  # [r, P]
        py = base[rows, m, 1, None] + offsets
        ox = (px - centres[rows, m, 0, None])[:, None, :]
        oy = (py - centres[rows, m, 1, None])[:, :, None]
        mask = inside(rows, m, ox, oy)
        index = (rows[:, None, None], py[:, :, None] + pad, px[:, None, :] + pad)
        img[index] = np.where(mask[..., None], colour[rows, m, None, None, :], img[index])


def _glyph_inside(shape: np.ndarray, radius: np.ndarray, cos: np.ndarray, sin: np.ndarray):
    """Inside-test for glyphs; arrays [n, M]; each glyph is turned by its own angle."""

    def inside(rows: np.ndarray, m: int, ox: np.ndarray, oy: np.ndarray) -> np.ndarray:
        c, s = cos[rows, m, None, None], sin[rows, m, None, None]
        r = radius[rows, m, None, None]
        u = (c * ox + s * oy) / r
        v = (c * oy - s * ox) / r
        kinds = shape[rows, m]
        first = int(kinds[0])
        if (kinds == first).all():  # keypoint glyphs: one shape for every instance
            return _shape_mask(first, u, v)
        out = np.zeros(u.shape, dtype=bool)
        for kind in np.unique(kinds):
            sel = kinds == kind
            out[sel] = _shape_mask(int(kind), u[sel], v[sel])
        return out

    return inside


def _upsample(low: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of float32 [n, g, g, C] to [n, size, size, C] (elementwise, no BLAS)."""
    g = low.shape[1]
    pos = np.clip((np.arange(size) + 0.5) * (g / size) - 0.5, 0, g - 1)
    i0 = np.floor(pos).astype(np.int64)
    i1 = np.minimum(i0 + 1, g - 1)
    w = (pos - i0).astype(np.float32)

    def lerp(a: np.ndarray, axis: int, weight: np.ndarray) -> np.ndarray:
        lo, hi = np.take(a, i0, axis=axis), np.take(a, i1, axis=axis)
        hi -= lo
        hi *= weight
        lo += hi
        return lo

    return lerp(lerp(low, 2, w[None, None, :, None]), 1, w[None, :, None, None])


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(values, 0, 255)).astype(np.uint8)


def _draw_polyline_points(img: np.ndarray, pad: int, pts: np.ndarray, colour: np.ndarray,
                          thickness: int) -> None:
    """Stamp `thickness`x`thickness` squares at sampled points pts [n, T, 2]; colour uint8 [n, 3]."""
    base = np.rint(pts - (thickness - 1) / 2).astype(np.int64) + pad
    n, t = pts.shape[:2]
    rows = np.broadcast_to(np.arange(n)[:, None], (n, t))
    for dy in range(thickness):
        for dx in range(thickness):
            # one colour per instance, so repeated pixels in one write get the same value
            img[rows, base[..., 1] + dy, base[..., 0] + dx] = colour[:, None, :]


def _trig(angles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = angles.ravel().tolist()
    cos = np.array([math.cos(a) for a in flat]).reshape(angles.shape)
    sin = np.array([math.sin(a) for a in flat]).reshape(angles.shape)
    return cos, sin


def _bend(template: SyntheticTemplate, angles: np.ndarray) -> np.ndarray:
    """Keypoints [n, K, 2] after turning each bone by angles [n, K] relative to its parent bone
    (angles accumulate down the tree from the root, keypoint 0)."""
    pts = template.points
    out = np.zeros((len(angles),) + pts.shape)
    out[:, 0] = pts[0]
    total = np.zeros_like(angles)
    for node in template.order[1:]:
        parent = template.parents[node]
        total[:, node] = total[:, parent] + angles[:, node]
        cos, sin = _trig(total[:, node])
        bone = pts[node] - pts[parent]
        out[:, node, 0] = out[:, parent, 0] + cos * bone[0] - sin * bone[1]
        out[:, node, 1] = out[:, parent, 1] + sin * bone[0] + cos * bone[1]
    return out


def _min_gap(points: np.ndarray) -> np.ndarray:
    """Smallest distance between two keypoints of each instance; points [n, K, 2] -> [n]."""
    diff = points[:, :, None, :] - points[:, None, :, :]
    dist = np.sqrt((diff ** 2).sum(-1))
    k = points.shape[1]
    dist[:, np.arange(k), np.arange(k)] = np.inf
    return dist.min(axis=(1, 2))


def _articulate(template: SyntheticTemplate, rng: np.random.Generator, n: int) -> np.ndarray:
    """Pose each instance by bending the figure at its joints, so instances differ by more than a
    global affine. Poses that fold keypoints onto each other are redrawn (then left unbent)."""
    limit = math.radians(ARTICULATION_DEG)
    k = len(template.points)
    angles = rng.uniform(-limit, limit, (n, k))
    floor = ARTICULATION_MIN_GAP * _min_gap(template.points[None])[0]
    posed = _bend(template, angles)
    for _ in range(ARTICULATION_RETRIES):
        bad = np.flatnonzero(_min_gap(posed) < floor)
        if bad.size == 0:
            break
        angles[bad] = rng.uniform(-limit, limit, (bad.size, k))
        posed[bad] = _bend(template, angles[bad])
    else:
        bad = np.flatnonzero(_min_gap(posed) < floor)
        posed[bad] = template.points
    return posed - posed.mean(axis=1, keepdims=True)


def render_instances(template: SyntheticTemplate, n: int, rng: np.random.Generator,
                     canvas: int = 96, max_rotation_deg: float | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render n instances of one category: images uint8 [n, H, W, 3], keypoints float32 [n, K, 2]
    (pixel centres at integer coordinates), visible bool [n, K]."""
    k = template.category.num_keypoints
    f32 = np.float32
    glyph_px = GLYPH_RADIUS * canvas
    if max_rotation_deg is None:
        max_rotation_deg = MAX_ROTATION_DEG

    # --- geometry: rotation . shear . aspect . scale, then shrink to fit and translate
    theta = rng.uniform(-math.radians(max_rotation_deg), math.radians(max_rotation_deg), n)
    scale = rng.uniform(*SCALE_RANGE, n)
    aspect = np.array([math.exp(a) for a in rng.uniform(-LOG_ASPECT_RANGE, LOG_ASPECT_RANGE, n).tolist()])
    shear = rng.uniform(-SHEAR_RANGE, SHEAR_RANGE, n)
    local = _articulate(template, rng, n) + rng.normal(0.0, POINT_JITTER, (n, k, 2))
    cos, sin = _trig(theta)
    gain = scale * OBJECT_RADIUS * canvas
    m00, m01 = cos * aspect, (cos * shear - sin) / aspect
    m10, m11 = sin * aspect, (sin * shear + cos) / aspect
    x, y = local[..., 0], local[..., 1]
    pts = np.stack([m00[:, None] * x + m01[:, None] * y, m10[:, None] * x + m11[:, None] * y], -1)
    pts *= gain[:, None, None]
    margin = SHAPE_EXTENT * glyph_px * SCALE_RANGE[1] * 1.15 + 1.0
    room = canvas - 1 - 2 * margin
    extent = (pts.max(axis=1) - pts.min(axis=1)).max(axis=1)
    shrink = np.minimum(1.0, room / extent)
    pts *= shrink[:, None, None]
    scale = scale * shrink
    lo, hi = pts.min(axis=1), pts.max(axis=1)
    shift = rng.uniform(0.0, 1.0, (n, 2)) * (room - (hi - lo)) + margin - lo
    keypoints = (pts + shift[:, None, :]).astype(f32)
    kp = keypoints.astype(np.float64)  # render at exactly the stored positions

    # Colour jitter (per-channel gain and offset) is pointwise, so it is applied to every colour
    # before drawing, and the canvas can stay uint8.
    jitter_gain = (rng.uniform(0.8, 1.2, (n, 1)) * rng.uniform(0.92, 1.08, (n, 3))).astype(f32)
    jitter_offset = rng.uniform(-12, 12, (n, 3)).astype(f32)

    def jitter(colour: np.ndarray) -> np.ndarray:  # colour [n, ..., 3] -> uint8
        extra = (1,) * (colour.ndim - 2)
        g = jitter_gain.reshape((n,) + extra + (3,))
        o = jitter_offset.reshape((n,) + extra + (3,))
        return _to_uint8(colour * g + o)

    # --- background: tinted grey plus two octaves of smooth noise, built at low resolution
    low_res = max(8, canvas // 4)
    grey = rng.uniform(60, 190, (n, 1, 1, 1))
    tint = rng.normal(0, 18, (n, 1, 1, 3))
    coarse = rng.normal(0, 28, (n, 4, 4, 3)).astype(f32)
    fine = rng.normal(0, 12, (n, 12, 12, 3)).astype(f32)
    low = (grey + tint).astype(f32) + _upsample(coarse, low_res) + _upsample(fine, low_res)
    low = low * jitter_gain[:, None, None, :] + jitter_offset[:, None, None, :]

    glyph_r = glyph_px * scale[:, None] * template.glyph_size[None]  # [n, K]
    glyph_half = int(math.ceil(SHAPE_EXTENT * max(glyph_r.max(), glyph_px * 1.15 * SCALE_RANGE[1]))) + 1
    occ_half = int(math.ceil(0.3 * glyph_r.max() + 2.2 * max(glyph_r.max(), 2.0))) + 1
    pad = max(occ_half, glyph_half) + 2
    size = canvas + 2 * pad
    img = np.zeros((n, size, size, 3), dtype=np.uint8)
    img[:, pad:pad + canvas, pad:pad + canvas] = _to_uint8(_upsample(low, canvas))

    # --- clutter strokes: quadratic Bezier curves in muted colours
    t = np.linspace(0.0, 1.0, 2 * canvas)[None, :, None]
    for _ in range(NUM_STROKES):
        a, b, c = (rng.uniform(0, canvas - 1, (n, 1, 2)) for _ in range(3))
        curve = (1 - t) ** 2 * a + 2 * t * (1 - t) * b + t ** 2 * c
        _draw_polyline_points(img, pad, curve, jitter(rng.uniform(40, 215, (n, 3))), 1)

    # --- distractors: glyphs the category does not use, placed away from the keypoints
    count = rng.integers(1, MAX_DISTRACTORS + 1, n)
    active = np.arange(MAX_DISTRACTORS)[None] < count[:, None]
    glyph_ids = rng.choice(template.spare_glyphs, (n, MAX_DISTRACTORS))
    cand = rng.uniform(margin, canvas - 1 - margin, (n, MAX_DISTRACTORS, 8, 2))
    gap = ((cand[:, :, :, None, :] - kp[:, None, None, :, :]) ** 2).sum(-1).min(-1)  # [n, D, 8]
    pick = np.argmax(gap, axis=2)
    d_centres = np.take_along_axis(cand, pick[..., None, None], axis=2)[:, :, 0]
    d_radius = glyph_px * scale[:, None] * rng.uniform(0.85, 1.15, (n, MAX_DISTRACTORS))
    d_cos, d_sin = _trig(rng.uniform(0, 2 * math.pi, (n, MAX_DISTRACTORS)))
    _stamp_patches(img, pad, d_centres, glyph_half, jitter(_COLOUR_VALUES[glyph_ids % len(COLOURS)]),
                   _glyph_inside(glyph_ids // len(COLOURS), d_radius, d_cos, d_sin), active)

    # --- limbs along the skeleton edges
    thickness = max(1, int(round(canvas / 48)))
    limb_colour = jitter(template.limb_colour[None] + rng.normal(0, 10, (n, 3)))
    for a, b in template.category.skeleton:
        seg = kp[:, b] - kp[:, a]
        steps = int(math.ceil(np.sqrt((seg ** 2).sum(-1)).max() * 1.5)) + 2
        s = np.linspace(0.0, 1.0, steps)[None, :, None]
        _draw_polyline_points(img, pad, kp[:, a, None] + s * seg[:, None], limb_colour, thickness)

    # --- keypoint glyphs (they turn with the instance)
    kcos = np.broadcast_to(cos[:, None], (n, k))
    ksin = np.broadcast_to(sin[:, None], (n, k))
    shape = np.broadcast_to(template.glyph_shape[None], (n, k))
    colours = jitter(np.broadcast_to(template.glyph_colour[None], (n, k, 3)))
    _stamp_patches(img, pad, kp, glyph_half, colours, _glyph_inside(shape, glyph_r, kcos, ksin))

    # --- occluders: a rectangle over each occluded keypoint; visibility = centre not covered
    occluded = rng.random((n, k)) < OCCLUSION_RATE
    occ_centre = kp + rng.uniform(-0.3, 0.3, (n, k, 2)) * glyph_r[..., None]
    occ_size = rng.uniform(1.5, 2.2, (n, k, 2)) * np.maximum(glyph_r, 2.0)[..., None]
    occ_colour = jitter(rng.uniform(30, 225, (n, k, 3)))

    def covered_by(occ: np.ndarray) -> np.ndarray:
        inside = (np.abs(kp[:, :, None, :] - occ_centre[:, None, :, :]) <= occ_size[:, None]).all(-1)
        return (inside & occ[:, None, :]).any(-1)

    visible = ~covered_by(occluded)
    none_left = ~visible.any(axis=1)
    if none_left.any():  # every instance keeps at least one visible keypoint
        occluded[none_left] = False
        visible = ~covered_by(occluded)

    def occluder_inside(rows: np.ndarray, m: int, ox: np.ndarray, oy: np.ndarray) -> np.ndarray:
        return (np.abs(ox) <= occ_size[rows, m, 0, None, None]) & (np.abs(oy) <= occ_size[rows, m, 1, None, None])

    _stamp_patches(img, pad, occ_centre, occ_half, occ_colour, occluder_inside, occluded)

    images = np.ascontiguousarray(img[:, pad:pad + canvas, pad:pad + canvas])
    return images, keypoints, visible


def keypoint_bbox(keypoints: np.ndarray, canvas: int, margin: Optional[float] = None) -> np.ndarray:
    """Tight box of ALL keypoints (occluded too) plus a margin (pixels; default BBOX_MARGIN of the
    canvas), clipped to the image: x, y, w, h."""
    margin = BBOX_MARGIN * canvas if margin is None else margin
    lo = np.clip(keypoints.min(axis=0) - margin, 0, canvas)
    hi = np.clip(keypoints.max(axis=0) + margin, 0, canvas)
    return np.array([lo[0], lo[1], hi[0] - lo[0], hi[1] - lo[1]], dtype=np.float32)


def check_sizes(instances_per_category: int, canvas: int) -> None:
    if not 1 <= instances_per_category < _ID_STRIDE:
        raise ValueError(f"instances_per_category must be in 1..{_ID_STRIDE - 1}, got {instances_per_category}")
    if canvas < 32:
        raise ValueError(f"canvas must be >= 32 pixels, got {canvas}")


def rendered_instances(category: Category, images: np.ndarray, keypoints: np.ndarray, visible: np.ndarray,
                       canvas: int, margin: Optional[float] = None) -> list[Instance]:
    """A category's rendered images and keypoints as Instances (ids: category id * stride + index)."""
    return [Instance(id=category.id * _ID_STRIDE + i, image_id=category.id * _ID_STRIDE + i, category_id=category.id,
                     keypoints=keypoints[i], visible=visible[i], bbox=keypoint_bbox(keypoints[i], canvas, margin),
                     file_name=f"{category.name}/{i:06d}.png", width=canvas, height=canvas, image=images[i])
            for i in range(len(images))]


def make_category_instances(category_id: int, seed: int = 0, instances_per_category: int = 60,
                            canvas: int = 96) -> tuple[Category, list[Instance]]:
    check_sizes(instances_per_category, canvas)
    template = make_template(category_id, seed)
    rng = np.random.default_rng([seed, category_id, _INSTANCE_TAG])
    images, keypoints, visible = render_instances(template, instances_per_category, rng, canvas)
    return template.category, rendered_instances(template.category, images, keypoints, visible, canvas)


def make_synthetic_split(subset: str, seed: int = 0, instances_per_category: int = 60,
                         canvas: int = 96) -> KeypointDataset:
    """The categories of `subset` ("train" | "val" | "test") with their rendered instances."""
    categories: dict[int, Category] = {}
    instances: dict[int, list[Instance]] = {}
    for cid in synthetic_category_ids(subset, seed):
        categories[cid], instances[cid] = make_category_instances(cid, seed, instances_per_category, canvas)
    return KeypointDataset(categories=categories, instances=instances,
                           source=f"synthetic {subset} (seed {seed}, {instances_per_category} per category, "
                                  f"{canvas}px)")
