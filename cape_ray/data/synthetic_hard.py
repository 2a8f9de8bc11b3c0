"""The hard built-in categories (`--data builtin-hard`, `cape-ray make-data --preset hard`).

100 categories, 70 train / 10 val / 20 test, from one seed, built to separate models where the
default set (synthetic.py) no longer does:

- Families. 12 body plans (humanoid, quadruped, insect, bird, face, hand, radial, snake, vehicle,
  garment, plant, fish), 8 or 9 categories each. The categories of a family share their layout and
  skeleton topology and differ in keypoint count, proportions, limb lengths and glyph style. Every
  family has a test category and at least 5 training ones, so a test category is new but related
  to training ones, as in MP-100's splits (a new animal body when others were seen).
- K from 5 to 40 keypoints per category (faces reach the high end, radial and snake the low one).
- Articulated limbs: every joint bends within its family's limit (a face barely, a snake a lot) and
  every bone stretches by up to +-30%, per instance.
- Left/right symmetry: 7 families are mirror-symmetric templates whose left and right keypoints wear
  the same glyph, so only the skeleton and its context tell them apart. Keypoints of one chain (a
  face contour, a snake's body) share a glyph too, and a fifth of the parts wear none.
- Occlusion and truncation: occluders cover about 5% of the keypoints, and 15% of the objects
  overhang the image border by 10-35% of their extent; those keypoints get visibility 0 (excluded
  from PCK, as MP-100 does), truncated ones keep their coordinates outside the image. About 12% of
  the keypoints end up hidden.
- Missing marks: an instance leaves out the glyph of 15% of its keypoints (they stay visible and
  labelled), so one support can lack a cue that another support or the context gives.
- Scale 0.5-2x (log-uniform), aspect and shear changes, and in-plane rotation: any turn for 9
  families, +-150 deg for the upright ones (humanoid, garment, plant).
- Clutter: textured backgrounds (stripes, checks or blotches over smooth noise), random strokes,
  distractor limbs wearing the category's own glyphs, and loose copies of its glyphs.
- Appearance changes per instance: a hue rotation (up to +-40 deg) and saturation change of every
  object colour, limb width and stripes, a lighting gradient over the image and sensor noise, so a
  support and a query of one category differ in appearance beyond geometry.

Layouts avoid piling keypoints at the object's centre and most families turn freely, so the support
positions are a weak prior: copying the support keypoints scores about 0.23 PCK@0.2 on the test
categories and predicting the crop centre about 0.19, where the default cnn reaches about 0.57
after 1,200 CPU-seconds of training (bench/quality.py; docs/benchmarks.md has the calibration).

Generation is vectorised numpy over the instances of one category with the default set's glyph
primitives: train + val + test take about 9 s on one core at the default sizes (60 instances of
96 px per category). Like the default set, the prepared splits are cached once per node
(builtin_cache.py; this module's source is part of the key), so a restarted worker opens them.

Determinism: every random draw comes from `np.random.default_rng([seed, category_id, tag])` (the
family layout and split from `[seed, tag]`), trigonometry and exponentials of drawn values go
through Python's `math`, and colour transforms are element-wise products (no BLAS), so the same seed
gives bitwise identical data, independent of the global RNG and of thread counts. Templates,
families and the split depend only on the seed; `instances_per_category` and `canvas` change the
instances.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from .dataset import Category, Instance, KeypointDataset
from .synthetic import (COLOURS, SHAPE_EXTENT, SHAPES, _glyph_inside, _min_gap, _stamp_patches, _to_uint8, _trig,
                        _upsample, check_sizes, rendered_instances)

# Bump when a change alters what a seed generates (the version is part of `source` and of make-data's
# description, so data made by different generators are never mistaken for each other).
GENERATOR_VERSION = 1
NUM_CATEGORIES = 100
SUBSET_SIZES = {"train": 70, "val": 10, "test": 20}
MIN_KEYPOINTS = 5
MAX_KEYPOINTS = 40

# Geometry of an instance (template units: centroid 0, farthest keypoint at radius 1).
SCALE_RANGE = (0.5, 2.0)  # log-uniform
OBJECT_RADIUS = 0.24  # template radius 1 -> this fraction of the canvas at scale 1
LOG_ASPECT_RANGE = 0.3
SHEAR_RANGE = 0.3
POINT_JITTER = 0.03
BONE_STRETCH = 0.3  # every bone's length times exp(+-this), per instance
ARTICULATION_MIN_GAP = 0.6  # posed keypoints stay this fraction of the template's closest pair apart
ARTICULATION_RETRIES = 8
TRUNCATION_PROB = 0.15  # objects pushed over a border ...
TRUNCATION_DEPTH = (0.1, 0.35)  # ... by this fraction of their extent
MIN_VISIBLE = 3  # every instance keeps at least this many visible keypoints (or K)

# Rendering (fractions of the canvas at scale 1 unless said otherwise).
GLYPH_RADIUS = 0.03
LIMB_WIDTH = 0.014
GLYPH_PROB = 0.8  # a part wears a glyph with this probability (else only the limbs mark it)
OCCLUSION_RATE = 0.05
GLYPH_DROP = 0.15  # an instance leaves out a keypoint's glyph (the keypoint stays visible)
HUE_SHIFT_DEG = 40.0  # object colours turn by up to this much about the grey axis, per instance
SATURATION_RANGE = (0.5, 1.2)
LIGHT_GAIN = (0.65, 1.3)
LIGHT_GRADIENT = 0.6  # brightness changes by up to +-this across the image
NOISE_SIGMA = (0.0, 8.0)
NUM_STROKES = (1, 4)
DISTRACTOR_LIMBS = (0, 2)  # limbs of 2-4 joints with the category's glyphs
LOOSE_GLYPHS = (0, 2)  # copies of the category's glyphs lying around

_COLOUR_VALUES = np.array(list(COLOURS.values()), dtype=np.float32)
_GREY_AXIS = 1.0 / math.sqrt(3.0)

# Tags that keep the generators of different purposes apart (never 0: see numpy SeedSequence).
_SPLIT_TAG = 7201
_TEMPLATE_TAG = 7202
_INSTANCE_TAG = 7203


# ------------------------------------------------------------------------------------ body plans
class _Body:
    """A template under construction: keypoints added as a tree (parents first), each with a part
    (keypoints of one part wear the same glyph), a bend limit relative to its family's, and for
    mirrored keypoints the index of its partner. Right-side geometry is given; `*_pair` adds the
    mirror image (x -> -x) as the left partner."""

    def __init__(self) -> None:
        self.xy: list[tuple[float, float]] = []
        self.parent: list[int] = []
        self.name: list[str] = []
        self.part: list[str] = []
        self.flex: list[float] = []
        self.partner: list[int] = []

    def add(self, name: str, x: float, y: float, parent: int = -1, part: str = "", flex: float = 1.0) -> int:
        if (parent < 0) != (not self.xy):
            raise AssertionError("the first keypoint is the root; every later one needs a parent")
        self.xy.append((float(x), float(y)))
        self.parent.append(parent)
        self.name.append(name)
        self.part.append(part or name)
        self.flex.append(flex)
        self.partner.append(-1)
        return len(self.xy) - 1

    def pair(self, name: str, x: float, y: float, parents, part: str = "", flex: float = 1.0) -> tuple[int, int]:
        left_parent, right_parent = parents if isinstance(parents, tuple) else (parents, parents)
        left = self.add(f"l_{name}", -x, y, left_parent, part or name, flex)
        right = self.add(f"r_{name}", x, y, right_parent, part or name, flex)
        self.partner[left], self.partner[right] = right, left
        return left, right

    def limb(self, name: str, parent: int, angle: float, length: float, count: int, part: str = "",
             flex: float = 1.0, curve: float = 0.0, per_joint: bool = True) -> list[int]:
        """`count` keypoints from `parent`, segments of `length` starting at `angle` degrees (0 = +x,
        90 = down) and turning by `curve` degrees at each joint."""
        x, y = self.xy[parent]
        out = []
        for j in range(count):
            a = math.radians(angle + j * curve)
            x, y = x + length * math.cos(a), y + length * math.sin(a)
            label = f"{part or name}{j}" if per_joint else (part or name)
            out.append(self.add(f"{name}{j}", x, y, out[-1] if out else parent, label, flex))
        return out

    def limb_pair(self, name: str, parents, angle: float, length: float, count: int, part: str = "",
                  flex: float = 1.0, curve: float = 0.0, per_joint: bool = True) -> tuple[list[int], list[int]]:
        left_parent, right_parent = parents if isinstance(parents, tuple) else (parents, parents)
        rx, ry = self.xy[right_parent]  # the left parent is its mirror image (or the same midline point)
        left: list[int] = []
        right: list[int] = []
        for j in range(count):
            a = math.radians(angle + j * curve)
            rx, ry = rx + length * math.cos(a), ry + length * math.sin(a)
            label = f"{part or name}{j}" if per_joint else (part or name)
            l_index = self.add(f"l_{name}{j}", -rx, ry, left[-1] if left else left_parent, label, flex)
            r_index = self.add(f"r_{name}{j}", rx, ry, right[-1] if right else right_parent, label, flex)
            self.partner[l_index], self.partner[r_index] = r_index, l_index
            left.append(l_index)
            right.append(r_index)
        return left, right


def _u(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


def _n(rng: np.random.Generator, low: int, high: int) -> int:
    """An integer in low..high inclusive."""
    return int(rng.integers(low, high + 1))


def _humanoid(b: _Body, rng: np.random.Generator) -> None:
    pelvis = b.add("pelvis", 0.0, 0.25, part="torso", flex=0.2)
    neck = b.limb("neck", pelvis, -90, _u(rng, 0.5, 0.65), 1, part="torso", flex=0.3)[0]
    head = b.limb("head", neck, -90, _u(rng, 0.2, 0.3), 1, flex=0.5)[0]
    if rng.random() < 0.5:
        b.pair("eye", 0.07, b.xy[head][1] - 0.03, head, flex=0.0)
    shoulders = b.pair("shoulder", _u(rng, 0.15, 0.25), b.xy[neck][1] + 0.05, neck, flex=0.3)
    b.limb_pair("arm", shoulders, _u(rng, 20, 100), _u(rng, 0.22, 0.32), _n(rng, 2, 3), flex=1.2,
                curve=_u(rng, -20, 20))
    hips = b.pair("hip", _u(rng, 0.1, 0.17), 0.3, pelvis, flex=0.2)
    b.limb_pair("leg", hips, _u(rng, 75, 90), _u(rng, 0.28, 0.38), _n(rng, 2, 3), flex=0.8)


def _quadruped(b: _Body, rng: np.random.Generator) -> None:
    seg = _u(rng, 0.25, 0.35)
    shoulders = b.add("withers", 0.0, -seg, part="spine", flex=0.3)
    hips = b.limb("hips", shoulders, 90, 2 * seg, 1, part="spine", flex=0.4)[0]
    neck = b.limb("neck", shoulders, -90, _u(rng, 0.15, 0.25), _n(rng, 1, 2), part="neck", flex=0.7,
                  per_joint=False)
    head = b.limb("head", neck[-1], -90, _u(rng, 0.12, 0.2), 2, part="head", flex=0.4)
    if rng.random() < 0.6:
        b.limb_pair("ear", head[0], _u(rng, -60, -20), _u(rng, 0.08, 0.12), 1, flex=0.5)
    b.limb("tail", hips, 90, _u(rng, 0.12, 0.2), _n(rng, 0, 4), part="tail", flex=1.0, per_joint=False)
    leg_len, leg_joints = _u(rng, 0.2, 0.3), _n(rng, 1, 3)
    b.limb_pair("fore_leg", shoulders, _u(rng, -25, 15), leg_len, leg_joints, part="leg", flex=0.9,
                curve=_u(rng, -20, 20))
    b.limb_pair("hind_leg", hips, _u(rng, 0, 40), leg_len, leg_joints, part="leg", flex=0.9,
                curve=_u(rng, -20, 20))


def _insect(b: _Body, rng: np.random.Generator) -> None:
    thorax = b.add("thorax", 0.0, 0.0, flex=0.2)
    head = b.limb("head", thorax, -90, _u(rng, 0.15, 0.22), 1, flex=0.3)[0]
    b.limb("abdomen", thorax, 90, _u(rng, 0.25, 0.35), _n(rng, 1, 2), flex=0.3, per_joint=False)
    b.limb_pair("antenna", head, _u(rng, -70, -35), _u(rng, 0.25, 0.35), _n(rng, 1, 3), flex=0.8,
                curve=_u(rng, -15, 15), per_joint=False)
    pairs = _n(rng, 2, 4)
    joints = min(_n(rng, 0, 2), (MAX_KEYPOINTS - len(b.xy)) // (2 * pairs) - 1)
    femur, bend = _u(rng, 0.45, 0.6), _u(rng, 10, 30)
    for p in range(pairs):  # a long first segment, then up to two short ones
        angle = -45 + p * 100 / (pairs - 1)
        curve = bend if angle > 0 else -bend
        knee = b.limb_pair(f"leg{p}_", thorax, angle, femur, 1, part="knee", flex=0.5)
        if joints:
            b.limb_pair(f"leg{p}_foot", (knee[0][0], knee[1][0]), angle + curve, _u(rng, 0.2, 0.3), joints,
                        part="foot", flex=0.6, curve=curve, per_joint=False)


def _bird(b: _Body, rng: np.random.Generator) -> None:
    body = b.add("body", 0.0, 0.0, flex=0.2)
    neck = b.limb("neck", body, -90, _u(rng, 0.2, 0.28), _n(rng, 1, 2), part="head", flex=0.4, per_joint=False)
    b.limb("beak", neck[-1], -90, _u(rng, 0.12, 0.18), 1, flex=0.2)
    tail = b.limb("tail", body, 90, _u(rng, 0.25, 0.35), _n(rng, 1, 2), flex=0.3, per_joint=False)
    if rng.random() < 0.5:
        b.limb_pair("tail_tip", tail[-1], _u(rng, 60, 80), _u(rng, 0.12, 0.18), 1, flex=0.3)
    shoulders = b.pair("shoulder", 0.15, -0.05, body, flex=0.2)
    wing = b.limb_pair("wing", shoulders, _u(rng, -20, 0), _u(rng, 0.55, 0.75) / 2, _n(rng, 2, 3), flex=0.5,
                       curve=_u(rng, 0, 25))
    for j in range(_n(rng, 1, len(wing[0]))):
        joint = len(wing[0]) - 1 - j
        b.limb_pair(f"feather{j}_", (wing[0][joint], wing[1][joint]), _u(rng, 60, 100), _u(rng, 0.12, 0.2), 1,
                    part="feather", flex=0.3)


def _face(b: _Body, rng: np.random.Generator) -> None:
    nose = b.add("nose_tip", 0.0, 0.05, part="nose", flex=0.1)
    b.limb("nose_bridge", nose, -90, _u(rng, 0.08, 0.12), _n(rng, 0, 3), part="nose", flex=0.1, per_joint=False)
    eye_x, eye_y = _u(rng, 0.2, 0.28), _u(rng, -0.25, -0.12)
    inner = b.pair("eye_inner", eye_x - 0.08, eye_y, nose, part="eye", flex=0.05)
    outer = b.pair("eye_outer", eye_x + 0.08, eye_y, inner, part="eye", flex=0.05)
    if rng.random() < 0.6:
        b.pair("eye_top", eye_x, eye_y - 0.05, inner, part="lid", flex=0.05)
        b.pair("eye_bottom", eye_x, eye_y + 0.05, inner, part="lid", flex=0.05)
    brow_points = _n(rng, 2, 4)
    brows = b.pair("brow0", eye_x - 0.12, eye_y - 0.16, inner, part="brow", flex=0.1)
    for j in range(1, brow_points):
        brows = b.pair(f"brow{j}", eye_x - 0.12 + j * 0.28 / (brow_points - 1), eye_y - 0.18 - 0.03 * (j % 2), brows,
                       part="brow", flex=0.1)
    mouth_y = _u(rng, 0.32, 0.42)
    b.pair("mouth_corner", _u(rng, 0.15, 0.25), mouth_y, nose, part="mouth", flex=0.1)
    if rng.random() < 0.6:
        b.add("mouth_top", 0.0, mouth_y - 0.05, nose, part="lip", flex=0.1)
        b.add("mouth_bottom", 0.0, mouth_y + 0.06, nose, part="lip", flex=0.1)
    width, height = _u(rng, 0.5, 0.7), _u(rng, 0.7, 0.85)
    chin = b.add("chin", 0.0, height, nose, part="contour", flex=0.1)
    per_side = min(_n(rng, 3, 10), (MAX_KEYPOINTS - len(b.xy)) // 2)
    prev: tuple[int, int] = (chin, chin)
    for j in range(per_side):  # from the chin up to the temple, along an ellipse
        a = math.radians(90 - (j + 1) * 100 / per_side)
        prev = b.pair(f"contour{j}", width * math.cos(a), height * math.sin(a) * 0.9, prev, part="contour", flex=0.1)


def _hand(b: _Body, rng: np.random.Generator) -> None:
    wrist = b.add("wrist", 0.0, 0.6, flex=0.2)
    fingers = _n(rng, 3, 4)
    joints, length, spread = _n(rng, 1, 3), _u(rng, 0.14, 0.2), _u(rng, 40, 70)
    for f in range(fingers):
        angle = -90 - spread / 2 + f * spread / (fingers - 1)
        x, y = b.xy[wrist]
        base = b.add(f"knuckle{f}", x + 0.5 * math.cos(math.radians(angle)), y + 0.5 * math.sin(math.radians(angle)),
                     wrist, part="knuckle", flex=0.2)
        b.limb(f"finger{f}_", base, angle, length * (1.15 if f in (1, 2) else 0.95), joints, part="finger", flex=0.7)
    side = 1 if rng.random() < 0.5 else -1  # a left or a right hand
    b.limb("thumb", wrist, -90 - side * _u(rng, 55, 75), _u(rng, 0.18, 0.25), _n(rng, 2, 3), flex=0.7,
           curve=side * 15)


def _radial(b: _Body, rng: np.random.Generator) -> None:
    arms = _n(rng, 3, 7)
    joints = min(_n(rng, 1, 5), MAX_KEYPOINTS // arms)
    joints = max(joints, -(-MIN_KEYPOINTS // arms))
    hub, curve = _u(rng, 0.3, 0.5), _u(rng, -20, 20)
    previous = -1
    for a in range(arms):  # a ring of hubs; arms of different lengths (the first the longest)
        reach = 1.0 if a == 0 else _u(rng, 0.6, 0.85)
        part = "lead" if a == 0 else "arm"
        angle = math.radians(a * 360 / arms - 90)
        previous = b.add(f"hub{a}", hub * math.cos(angle), hub * math.sin(angle), previous, part=f"{part}_hub",
                         flex=0.3 if a else 0.0)
        if joints > 1:
            b.limb(f"arm{a}_", previous, math.degrees(angle) + curve, (reach - hub) / (joints - 1), joints - 1,
                   part=part, flex=0.6, curve=curve)


def _snake(b: _Body, rng: np.random.Generator) -> None:
    head = b.add("head", 0.0, -0.9, flex=0.0)
    count = _n(rng, 4, 24)
    turn = _u(rng, 150, 300) * (1 if rng.random() < 0.5 else -1)  # a C or a coil
    curve = turn / count
    body = b.limb("body", head, 0, 1.8 / count, count, flex=1.0, curve=curve, per_joint=False)
    band = _n(rng, 3, 6)
    for j in range(band - 1, count - 1, band):  # marked bands along the body
        b.part[body[j]] = "band"
    b.part[body[-1]] = "tail"


def _vehicle(b: _Body, rng: np.random.Generator) -> None:
    centre = b.add("centre", 0.0, 0.0, flex=0.0)
    half_length, half_width = _u(rng, 0.8, 1.0), _u(rng, 0.3, 0.5)
    front = b.pair("front", half_width * 0.85, -half_length, centre, flex=0.1)
    b.pair("rear", half_width * 0.95, half_length, centre, flex=0.1)
    axles = _n(rng, 2, 3)
    for a in range(axles):
        y = -0.6 * half_length + a * 1.2 * half_length / (axles - 1)
        b.pair(f"wheel{a}", half_width + 0.05, y, centre, part="wheel", flex=0.05)
    if rng.random() < 0.5:
        b.pair("mirror", half_width + 0.12, -0.35 * half_length, centre, flex=0.05)
    if rng.random() < 0.5:
        b.pair("light", half_width * 0.5, -half_length - 0.02, front, flex=0.05)
    if rng.random() < 0.5:
        b.pair("roof_front", half_width * 0.6, -0.25, centre, part="roof", flex=0.05)
        b.pair("roof_rear", half_width * 0.6, 0.35, centre, part="roof", flex=0.05)
    if rng.random() < 0.5:
        b.add("bumper", 0.0, -half_length - 0.06, centre, flex=0.05)


def _garment(b: _Body, rng: np.random.Generator) -> None:
    collar = b.add("collar", 0.0, -0.7, flex=0.1)
    if rng.random() < 0.5:
        b.add("neckline", 0.0, -0.5, collar, flex=0.1)
    neck = b.pair("neck", _u(rng, 0.14, 0.2), -0.76, collar, flex=0.1)
    shoulder = b.pair("shoulder", _u(rng, 0.4, 0.5), -0.65, neck, flex=0.1)
    sleeve_angle = _u(rng, 25, 70)
    sleeve = b.limb_pair("sleeve", shoulder, sleeve_angle, _u(rng, 0.2, 0.35), _n(rng, 1, 2), flex=0.5,
                         per_joint=False)
    cuff = b.limb_pair("cuff", (sleeve[0][-1], sleeve[1][-1]), sleeve_angle + 90, _u(rng, 0.15, 0.2), 1, flex=0.2)
    width = _u(rng, 0.33, 0.45)
    prev = b.pair("armpit", width, -0.35, (cuff[0][-1], cuff[1][-1]), flex=0.2)
    sides = _n(rng, 1, 4)
    hem_y = _u(rng, 0.6, 0.85)
    flare = _u(rng, 0.0, 0.15)
    for j in range(sides):
        t = (j + 1) / (sides + 1)
        prev = b.pair(f"side{j}", width + flare * t, -0.35 + t * (hem_y + 0.35), prev, part="side", flex=0.1)
    hem = b.pair("hem_corner", width + flare, hem_y, prev, flex=0.1)
    hem_points = _n(rng, 0, 2)
    for j in range(hem_points):
        hem = b.pair(f"hem{j}", (width + flare) * (1 - (j + 1) / (hem_points + 1)), hem_y + 0.02, hem, part="hem",
                     flex=0.1)


def _plant(b: _Body, rng: np.random.Generator) -> None:
    base = b.add("base", 0.0, 0.6, flex=0.0)
    trunk = b.limb("trunk", base, -90, _u(rng, 0.2, 0.3), _n(rng, 1, 2), flex=0.3, per_joint=False)
    branches, joints = _n(rng, 3, 6), _n(rng, 1, 3)
    length, spread = _u(rng, 0.7, 0.9), _u(rng, 100, 160)
    for t in range(branches):  # a fan of branches from the top of the trunk, a leaf at each tip
        angle = -90 - spread / 2 + t * spread / (branches - 1) + _u(rng, -10, 10)
        branch = b.limb(f"branch{t}_", trunk[-1], angle, length / joints, joints, part="branch", flex=0.6,
                        curve=_u(rng, -15, 15), per_joint=False)
        b.part[branch[-1]] = "leaf"


def _fish(b: _Body, rng: np.random.Generator) -> None:
    body = b.add("body", 0.0, 0.0, flex=0.2)
    head = b.limb("head", body, 180, _u(rng, 0.3, 0.4), 1, flex=0.2)[0]
    b.limb("snout", head, 180, _u(rng, 0.1, 0.18), 1, flex=0.1)
    hx, hy = b.xy[head]
    b.add("eye", hx - 0.02, hy - 0.1, head, flex=0.0)
    spine = b.limb("spine", body, 0, _u(rng, 0.2, 0.3), _n(rng, 1, 3), flex=0.5, per_joint=False)
    fork = _u(rng, 25, 45)
    b.limb("tail_upper", spine[-1], -fork, _u(rng, 0.2, 0.3), 1, part="tail", flex=0.3)
    b.limb("tail_lower", spine[-1], fork, _u(rng, 0.2, 0.3), 1, part="tail", flex=0.3)
    b.limb("dorsal", body, _u(rng, -110, -70), _u(rng, 0.2, 0.3), _n(rng, 1, 2), part="fin", flex=0.3,
           per_joint=False)
    b.limb("pectoral", head, _u(rng, 60, 110), _u(rng, 0.15, 0.22), 1, part="fin", flex=0.4)
    b.limb("anal", spine[0], _u(rng, 60, 100), _u(rng, 0.15, 0.25), _n(rng, 1, 2), part="fin", flex=0.3,
           per_joint=False)


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[_Body, np.random.Generator], None]
    symmetric: bool  # mirror-symmetric templates (left/right partners look alike)
    max_rotation_deg: float  # in-plane rotation of an instance: +-this (180 = any turn)
    articulation_deg: float  # bend limit of a joint of flex 1


FAMILIES = (
    Family("humanoid", _humanoid, True, 150.0, 45.0),
    Family("quadruped", _quadruped, True, 180.0, 30.0),
    Family("insect", _insect, True, 180.0, 25.0),
    Family("bird", _bird, True, 180.0, 25.0),
    Family("face", _face, True, 180.0, 8.0),
    Family("hand", _hand, False, 180.0, 35.0),
    Family("radial", _radial, False, 180.0, 25.0),
    Family("snake", _snake, False, 180.0, 16.0),
    Family("vehicle", _vehicle, True, 180.0, 4.0),
    Family("garment", _garment, True, 150.0, 12.0),
    Family("plant", _plant, False, 150.0, 20.0),
    Family("fish", _fish, False, 180.0, 15.0),
)


# ------------------------------------------------------------------------------- split and families
@functools.lru_cache(maxsize=8)
def _layout(seed: int) -> tuple[dict[int, int], dict[int, str]]:
    """(family index of every category id 1..100, subset of every category id).

    Families get 8 or 9 categories; each family gives 1 or 2 categories to test and at most 1 to
    val, so every test category's family keeps at least 5 categories in train."""
    rng = np.random.default_rng([seed, _SPLIT_TAG])
    families = len(FAMILIES)
    sizes = np.full(families, NUM_CATEGORIES // families)
    sizes[rng.permutation(families)[:NUM_CATEGORIES % families]] += 1
    test = np.ones(families, dtype=np.int64)
    test[rng.permutation(families)[:SUBSET_SIZES["test"] - families]] += 1
    val = np.zeros(families, dtype=np.int64)
    val[rng.permutation(families)[:SUBSET_SIZES["val"]]] = 1
    ids = rng.permutation(NUM_CATEGORIES) + 1
    family_of: dict[int, int] = {}
    subset_of: dict[int, str] = {}
    start = 0
    for f in range(families):
        members = ids[start:start + sizes[f]]
        start += sizes[f]
        for i, cid in enumerate(members):
            family_of[int(cid)] = f
            subset_of[int(cid)] = "test" if i < test[f] else "val" if i < test[f] + val[f] else "train"
    return family_of, subset_of


def hard_category_ids(subset: str, seed: int = 0) -> list[int]:
    """Category ids (1..100) of `subset` in {"train", "val", "test"}; disjoint, 70/10/20."""
    if subset not in SUBSET_SIZES:
        raise ValueError(f"unknown subset {subset!r}; expected one of {sorted(SUBSET_SIZES)}")
    return sorted(cid for cid, s in _layout(seed)[1].items() if s == subset)


def category_family(category_id: int, seed: int = 0) -> Family:
    return FAMILIES[_layout(seed)[0][category_id]]


def category_name(category_id: int, seed: int = 0) -> str:
    return f"hard_{category_id:03d}_{category_family(category_id, seed).name}"


# ---------------------------------------------------------------------------------------- templates
@dataclass(frozen=True)
class HardTemplate:
    category: Category
    family: Family
    points: np.ndarray  # float64 [K, 2], centroid 0, max radius 1
    parents: np.ndarray  # int64 [K], -1 for the root (keypoint 0)
    order: np.ndarray  # int64 [K] root-first (parents come before children)
    flex: np.ndarray  # float64 [K] bend limit in radians
    partner: np.ndarray  # int64 [K] mirror partner, -1 if none
    part: np.ndarray  # int64 [K] part index
    part_shape: np.ndarray  # int64 [P] index into SHAPES, -1 for a part without a glyph
    part_colour: np.ndarray  # float32 [P, 3]
    glyph_size: float  # glyph radius multiplier
    limb_colour: np.ndarray  # float32 [3]
    limb_width: float  # limb width multiplier

    @property
    def glyph_parts(self) -> np.ndarray:
        return np.flatnonzero(self.part_shape >= 0)


def make_template(category_id: int, seed: int = 0) -> HardTemplate:
    if category_id not in _layout(seed)[0]:
        raise ValueError(f"category id must be in 1..{NUM_CATEGORIES}, got {category_id}")
    family = category_family(category_id, seed)
    rng = np.random.default_rng([seed, category_id, _TEMPLATE_TAG])
    body = _Body()
    family.build(body, rng)
    k = len(body.xy)
    if not MIN_KEYPOINTS <= k <= MAX_KEYPOINTS:
        raise AssertionError(f"{family.name} template with {k} keypoints")
    points = np.array(body.xy, dtype=np.float64)
    points[:, 0] *= math.exp(_u(rng, -0.2, 0.2))  # proportions (keeps a mirror image a mirror image)
    points -= points.mean(axis=0)
    points /= np.sqrt((points ** 2).sum(axis=1)).max()
    part_names = list(dict.fromkeys(body.part))
    part = np.array([part_names.index(p) for p in body.part], dtype=np.int64)
    has_glyph = rng.random(len(part_names)) < GLYPH_PROB
    has_glyph[part[0]] |= not has_glyph.any()
    shapes = np.where(has_glyph, rng.integers(0, len(SHAPES), len(part_names)), -1)
    colours = _COLOUR_VALUES[rng.integers(0, len(_COLOUR_VALUES), len(part_names))]
    parents = np.array(body.parent, dtype=np.int64)
    skeleton = tuple(sorted((min(int(p), c), max(int(p), c)) for c, p in enumerate(parents) if p >= 0))
    category = Category(id=category_id, name=category_name(category_id, seed), keypoint_names=tuple(body.name),
                        skeleton=skeleton, supercategory=family.name)
    return HardTemplate(category=category, family=family, points=points, parents=parents,
                        order=np.arange(k, dtype=np.int64),
                        flex=np.array(body.flex) * math.radians(family.articulation_deg),
                        partner=np.array(body.partner, dtype=np.int64), part=part, part_shape=shapes.astype(np.int64),
                        part_colour=colours, glyph_size=_u(rng, 0.8, 1.3),
                        limb_colour=rng.uniform(50, 210, 3).astype(np.float32), limb_width=_u(rng, 0.7, 1.5))


# ---------------------------------------------------------------------------------------- rendering
def _bend(template: HardTemplate, angles: np.ndarray, stretch: np.ndarray) -> np.ndarray:
    """Keypoints [n, K, 2] after turning each bone by angles [n, K] relative to its parent bone
    (angles accumulate down the tree from the root) and scaling its length by stretch [n, K]."""
    pts = template.points
    out = np.zeros((len(angles),) + pts.shape)
    out[:, 0] = pts[0]
    total = np.zeros_like(angles)
    for node in template.order[1:]:
        parent = template.parents[node]
        total[:, node] = total[:, parent] + angles[:, node]
        cos, sin = _trig(total[:, node])
        bone = (pts[node] - pts[parent])[None] * stretch[:, node, None]
        out[:, node, 0] = out[:, parent, 0] + cos * bone[:, 0] - sin * bone[:, 1]
        out[:, node, 1] = out[:, parent, 1] + sin * bone[:, 0] + cos * bone[:, 1]
    return out


def _articulate(template: HardTemplate, rng: np.random.Generator, n: int) -> np.ndarray:
    """Each instance bent at its joints within the joints' limits and its bones stretched; poses
    that fold keypoints onto each other are redrawn (then left as the template). -> [n, K, 2],
    centroid 0."""
    k = len(template.points)

    def draw(count: int) -> tuple[np.ndarray, np.ndarray]:
        angles = rng.uniform(-1.0, 1.0, (count, k)) * template.flex
        stretch = np.array([math.exp(v) for v in rng.uniform(-BONE_STRETCH, BONE_STRETCH, count * k)]).reshape(count, k)
        return angles, stretch

    floor = ARTICULATION_MIN_GAP * _min_gap(template.points[None])[0]
    posed = _bend(template, *draw(n))
    for _ in range(ARTICULATION_RETRIES):
        bad = np.flatnonzero(_min_gap(posed) < floor)
        if bad.size == 0:
            break
        posed[bad] = _bend(template, *draw(bad.size))
    else:
        bad = np.flatnonzero(_min_gap(posed) < floor)
        posed[bad] = template.points
    return posed - posed.mean(axis=1, keepdims=True)


def _colour_transform(rng: np.random.Generator, n: int) -> np.ndarray:
    """Per instance, a 3x3 colour matrix [n, 3, 3]: a hue rotation about the grey axis, then a
    saturation change (brightness comes from the lighting)."""
    cos, sin = _trig(np.radians(rng.uniform(-HUE_SHIFT_DEG, HUE_SHIFT_DEG, n)))
    saturation = rng.uniform(*SATURATION_RANGE, n)
    axis = np.full(3, _GREY_AXIS)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    outer = axis[:, None] * axis[None, :]
    rotation = (cos[:, None, None] * np.eye(3) + sin[:, None, None] * cross
                + (1 - cos)[:, None, None] * outer)  # Rodrigues
    grey = np.full((3, 3), 1.0 / 3.0)
    desaturate = saturation[:, None, None] * np.eye(3) + (1 - saturation)[:, None, None] * grey
    return (desaturate[:, :, :, None] * rotation[:, None, :, :]).sum(axis=2)  # desaturate @ rotation


def _apply_colour(matrix: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """matrix [n, 3, 3] applied to colours [n, ..., 3] -> uint8 (element-wise products, no BLAS)."""
    shape = (matrix.shape[0],) + (1,) * (colour.ndim - 2) + (3, 3)
    return _to_uint8((matrix.reshape(shape) * colour[..., None, :]).sum(-1))


def _thick_points(img: np.ndarray, pad: int, pts: np.ndarray, width: np.ndarray, colour: np.ndarray,
                  mask: Optional[np.ndarray] = None) -> None:
    """Stamp a square of width[i] pixels at every point pts [n, T, 2] of instance i (those in `mask`
    [n, T]), in colour uint8 [n, 3]; points off the padded image are skipped. Within one write every
    pixel of an instance gets that instance's one colour, so repeated pixels are harmless."""
    n, t = pts.shape[:2]
    size = img.shape[1]
    top = int(width.max())
    base = np.rint(pts - (width[:, None, None] - 1) / 2).astype(np.int64) + pad
    keep = ((base >= 0) & (base + top <= size)).all(-1)
    if mask is not None:
        keep &= mask
    rows = np.broadcast_to(np.arange(n)[:, None], (n, t))
    for d in range(top):
        for e in range(top):
            sel = keep & (width[:, None] > max(d, e))
            r = rows[sel]
            img[r, base[..., 1][sel] + d, base[..., 0][sel] + e] = colour[r]


def _segment_points(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Points 1 pixel or less apart along segments a -> b ([n, 2] each) -> [n, T, 2]."""
    steps = int(math.ceil(np.sqrt(((b - a) ** 2).sum(-1)).max())) + 2
    s = np.linspace(0.0, 1.0, steps)[None, :, None]
    return a[:, None] + s * (b - a)[:, None]


def _draw_limbs(img: np.ndarray, pad: int, edges: Sequence[tuple[np.ndarray, np.ndarray]], width: np.ndarray,
                colour: np.ndarray, stripe_colour: np.ndarray, stripe_period: np.ndarray) -> None:
    """Limbs along segments, striped where stripe_period [n] > 0 (two colours along the limb)."""
    for a, b in edges:
        pts = _segment_points(a, b)
        along = np.arange(pts.shape[1])[None, :]
        period = np.maximum(stripe_period, 1)[:, None]
        second = (stripe_period[:, None] > 0) & ((along // period) % 2 == 1)
        _thick_points(img, pad, pts, width, colour, ~second)
        _thick_points(img, pad, pts, width, stripe_colour, second)


def _background(rng: np.random.Generator, n: int, canvas: int) -> np.ndarray:
    """float32 [n, canvas, canvas, 3]: a base colour, a texture (stripes, checks or blotches) in a
    second colour, and smooth noise. Textures use floor/mod only (exact arithmetic)."""
    f32 = np.float32
    base = rng.uniform(40, 215, (n, 1, 1, 3)).astype(f32)
    second = rng.uniform(40, 215, (n, 1, 1, 3)).astype(f32)
    kind = rng.integers(0, 3, n)  # 0 stripes, 1 checks, 2 blotches
    cos, sin = _trig(rng.uniform(0.0, math.pi, n))
    period = rng.uniform(4.0, 16.0, n) * canvas / 96
    phase = rng.uniform(0.0, 1.0, n)
    strength = rng.uniform(0.25, 0.8, n)
    coords = np.arange(canvas, dtype=np.float64)
    x, y = coords[None, None, :], coords[None, :, None]
    u = (x * cos[:, None, None] + y * sin[:, None, None]) / period[:, None, None] + phase[:, None, None]
    v = (y * cos[:, None, None] - x * sin[:, None, None]) / period[:, None, None]
    stripes = (u - np.floor(u)) < 0.5
    checks = ((np.floor(u) + np.floor(v)) % 2) == 0
    blotch = _upsample(rng.normal(0, 1, (n, 6, 6, 1)).astype(f32), canvas)[..., 0] > 0
    pattern = np.where(kind[:, None, None] == 0, stripes, np.where(kind[:, None, None] == 1, checks, blotch))
    mix = (pattern * strength[:, None, None]).astype(f32)[..., None]
    low = _upsample(rng.normal(0, 22, (n, 5, 5, 3)).astype(f32), canvas)
    return base + (second - base) * mix + low


def _place(pts: np.ndarray, rng: np.random.Generator, canvas: int, margin: float) -> np.ndarray:
    """Translate every instance [n, K, 2] into the canvas: inside with room to spare, or (with
    probability TRUNCATION_PROB, and whenever it is too large) over a border. Instances left with
    fewer than MIN_VISIBLE keypoints inside are moved back toward the centre."""
    n, k = pts.shape[:2]
    lo, hi = pts.min(axis=1), pts.max(axis=1)
    size = hi - lo
    free = canvas - 1 - 2 * margin - size  # negative: larger than the canvas
    shift = margin - lo + rng.uniform(0.0, 1.0, (n, 2)) * free
    push = rng.random(n) < TRUNCATION_PROB
    axis = rng.integers(0, 2, n)
    side = rng.integers(0, 2, n)
    depth = rng.uniform(*TRUNCATION_DEPTH, n) * size[np.arange(n), axis]
    rows = np.flatnonzero(push)
    high_side = canvas - 1 + depth[rows] - hi[rows, axis[rows]]  # the far border
    low_side = -depth[rows] - lo[rows, axis[rows]]  # the near border
    shift[rows, axis[rows]] = np.where(side[rows] == 1, high_side, low_side)
    need = min(MIN_VISIBLE, k)
    centred = (canvas - 1) / 2 - (lo + hi) / 2
    for _ in range(6):
        placed = pts + shift[:, None, :]
        inside = ((placed >= 0) & (placed <= canvas - 1)).all(-1).sum(-1)
        bad = inside < need
        if not bad.any():
            break
        shift[bad] = (shift[bad] + centred[bad]) / 2
    else:
        shift[bad] = centred[bad]
    return pts + shift[:, None, :]


def render_instances(template: HardTemplate, n: int, rng: np.random.Generator, canvas: int = 96
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render n instances of one category: images uint8 [n, H, W, 3], keypoints float32 [n, K, 2]
    (pixel centres at integer coordinates; outside the image when truncated), visible bool [n, K]."""
    k = template.category.num_keypoints
    f32 = np.float32
    family = template.family

    # --- geometry: rotation . shear . aspect . scale of the articulated pose, then placement
    limit = math.radians(family.max_rotation_deg)
    theta = rng.uniform(-limit, limit, n)
    scale = np.array([math.exp(v) for v in rng.uniform(math.log(SCALE_RANGE[0]), math.log(SCALE_RANGE[1]), n)])
    aspect = np.array([math.exp(v) for v in rng.uniform(-LOG_ASPECT_RANGE, LOG_ASPECT_RANGE, n)])
    shear = rng.uniform(-SHEAR_RANGE, SHEAR_RANGE, n)
    local = _articulate(template, rng, n) + rng.normal(0.0, POINT_JITTER, (n, k, 2))
    cos, sin = _trig(theta)
    m00, m01 = cos * aspect, (cos * shear - sin) / aspect
    m10, m11 = sin * aspect, (sin * shear + cos) / aspect
    x, y = local[..., 0], local[..., 1]
    pts = np.stack([m00[:, None] * x + m01[:, None] * y, m10[:, None] * x + m11[:, None] * y], -1)
    pts *= (scale * OBJECT_RADIUS * canvas)[:, None, None]
    glyph_px = GLYPH_RADIUS * canvas * template.glyph_size
    keypoints = _place(pts, rng, canvas, margin=glyph_px * SCALE_RANGE[1] * SHAPE_EXTENT).astype(f32)
    kp = keypoints.astype(np.float64)  # render at exactly the stored positions

    # --- appearance of this instance
    colour_matrix = _colour_transform(rng, n)
    glyph_r = glyph_px * scale  # [n]
    limb_width = np.maximum(1, np.rint(LIMB_WIDTH * canvas * template.limb_width * scale
                                       * rng.uniform(0.7, 1.4, n))).astype(np.int64)
    limb_colour = _apply_colour(colour_matrix, template.limb_colour[None] + rng.normal(0, 12, (n, 3)))
    stripe_colour = _apply_colour(colour_matrix, rng.uniform(30, 225, (n, 3)))
    stripe_period = np.where(rng.random(n) < 0.4, rng.integers(2, 6, n), 0)

    glyph_half = int(math.ceil(SHAPE_EXTENT * glyph_r.max())) + 1
    occ_half = int(math.ceil(2.6 * max(glyph_r.max(), 2.0))) + 1
    pad = max(glyph_half, occ_half) + 2
    size = canvas + 2 * pad
    img = np.zeros((n, size, size, 3), dtype=np.uint8)
    img[:, pad:pad + canvas, pad:pad + canvas] = _to_uint8(_background(rng, n, canvas))

    def on_image(centres: np.ndarray, half: int) -> np.ndarray:  # patches that fit the padded image
        return ((np.floor(centres) - half + pad >= 0) & (np.floor(centres) + half + pad < size)).all(-1)

    # --- clutter strokes: quadratic Bezier curves
    t = np.linspace(0.0, 1.0, 2 * canvas)[None, :, None]
    strokes = rng.integers(NUM_STROKES[0], NUM_STROKES[1] + 1, n)
    for s in range(NUM_STROKES[1]):
        a, b, c = (rng.uniform(0, canvas - 1, (n, 1, 2)) for _ in range(3))
        curve = (1 - t) ** 2 * a + 2 * t * (1 - t) * b + t ** 2 * c
        width = np.ones(n, dtype=np.int64)
        colour = _to_uint8(rng.uniform(30, 225, (n, 3)))
        _thick_points(img, pad, curve, width, colour, np.broadcast_to((s < strokes)[:, None], curve.shape[:2]))

    # --- distractors: limbs of 2-4 joints and loose glyphs, wearing the category's own glyphs
    glyph_parts = template.glyph_parts
    limbs = rng.integers(DISTRACTOR_LIMBS[0], DISTRACTOR_LIMBS[1] + 1, n)
    joints = 4
    for d in range(DISTRACTOR_LIMBS[1]):
        start = rng.uniform(0, canvas - 1, (n, 2))
        heading = rng.uniform(-math.pi, math.pi, (n, joints))
        step = rng.uniform(0.12, 0.3, (n, joints, 1)) * OBJECT_RADIUS * canvas * scale[:, None, None]
        hcos, hsin = _trig(heading)
        chain = start[:, None] + np.cumsum(np.stack([hcos, hsin], -1) * step, axis=1)
        chain = np.concatenate([start[:, None], chain], axis=1)  # [n, joints + 1, 2]
        count = rng.integers(2, joints + 1, n)
        active = (d < limbs)[:, None] & (np.arange(joints + 1)[None] <= count[:, None])
        for j in range(joints):
            seg = _segment_points(chain[:, j], chain[:, j + 1])
            _thick_points(img, pad, seg, limb_width, limb_colour,
                          np.broadcast_to(active[:, j + 1, None], seg.shape[:2]))
        parts = glyph_parts[rng.integers(0, len(glyph_parts), (n, joints + 1))]
        worn = active & (rng.random((n, joints + 1)) < 0.7) & on_image(chain, glyph_half)
        _draw_glyphs(img, pad, chain, parts, template, colour_matrix, glyph_r, glyph_half, rng, worn)
    loose = rng.integers(LOOSE_GLYPHS[0], LOOSE_GLYPHS[1] + 1, n)
    centres = rng.uniform(0, canvas - 1, (n, LOOSE_GLYPHS[1], 2))
    parts = glyph_parts[rng.integers(0, len(glyph_parts), (n, LOOSE_GLYPHS[1]))]
    active = (np.arange(LOOSE_GLYPHS[1])[None] < loose[:, None]) & on_image(centres, glyph_half)
    _draw_glyphs(img, pad, centres, parts, template, colour_matrix, glyph_r, glyph_half, rng, active)

    # --- the object: limbs along the skeleton, then the keypoint glyphs (turned with the instance)
    edges = [(kp[:, a], kp[:, b]) for a, b in template.category.skeleton]
    _draw_limbs(img, pad, edges, limb_width, limb_colour, stripe_colour, stripe_period)
    parts = np.broadcast_to(template.part[None], (n, k))
    worn = (template.part_shape[template.part] >= 0)[None] & on_image(kp, glyph_half)
    worn &= rng.random((n, k)) >= GLYPH_DROP
    _draw_glyphs(img, pad, kp, parts, template, colour_matrix, glyph_r, glyph_half, rng, worn, turn=theta)

    # --- occluders: a rectangle near each occluded keypoint; visible = inside the image, not covered
    occluded = rng.random((n, k)) < OCCLUSION_RATE
    occ_r = np.maximum(glyph_r, 2.0)[:, None, None]
    occ_centre = kp + rng.uniform(-0.4, 0.4, (n, k, 2)) * occ_r
    occ_size = rng.uniform(1.0, 1.8, (n, k, 2)) * occ_r
    occ_colour = _to_uint8(rng.uniform(30, 225, (n, k, 3)))
    in_image = ((keypoints >= 0) & (keypoints <= canvas - 1)).all(-1)

    def covered_by(occ: np.ndarray) -> np.ndarray:
        inside = (np.abs(kp[:, :, None, :] - occ_centre[:, None, :, :]) <= occ_size[:, None]).all(-1)
        return (inside & occ[:, None, :]).any(-1)

    visible = in_image & ~covered_by(occluded)
    short = visible.sum(axis=1) < np.minimum(MIN_VISIBLE, in_image.sum(axis=1))
    if short.any():  # keep a few visible keypoints in every instance
        occluded[short] = False
        visible = in_image & ~covered_by(occluded)
    occluded &= on_image(occ_centre, occ_half)

    def occluder_inside(rows: np.ndarray, m: int, ox: np.ndarray, oy: np.ndarray) -> np.ndarray:
        return (np.abs(ox) <= occ_size[rows, m, 0, None, None]) & (np.abs(oy) <= occ_size[rows, m, 1, None, None])

    _stamp_patches(img, pad, occ_centre, occ_half, occ_colour, occluder_inside, occluded)

    # --- lighting: a brightness gradient over the whole image, then sensor noise
    light_cos, light_sin = _trig(rng.uniform(-math.pi, math.pi, n))
    gain = rng.uniform(*LIGHT_GAIN, n)
    slope = rng.uniform(-LIGHT_GRADIENT, LIGHT_GRADIENT, n) / canvas
    coords = np.arange(canvas, dtype=np.float64) - (canvas - 1) / 2
    ramp = (coords[None, None, :] * light_cos[:, None, None] + coords[None, :, None] * light_sin[:, None, None])
    field = (gain[:, None, None] * (1 + slope[:, None, None] * ramp)).astype(f32)[..., None]
    sigma = rng.uniform(*NOISE_SIGMA, n).astype(f32)[:, None, None, None]
    noise = rng.standard_normal((n, canvas, canvas, 3), dtype=f32) * sigma
    pixels = img[:, pad:pad + canvas, pad:pad + canvas].astype(f32) * field + noise
    return _to_uint8(pixels), keypoints, visible


def _draw_glyphs(img: np.ndarray, pad: int, centres: np.ndarray, parts: np.ndarray, template: HardTemplate,
                 colour_matrix: np.ndarray, glyph_r: np.ndarray, half: int, rng: np.random.Generator,
                 active: np.ndarray, turn: Optional[np.ndarray] = None) -> None:
    """Glyphs of `parts` [n, M] at centres [n, M, 2], in the instance's colours; turned by `turn` [n]
    (the instance's rotation) or at random."""
    n, m = parts.shape
    shape = template.part_shape[parts]
    colour = _apply_colour(colour_matrix, template.part_colour[parts])
    radius = np.broadcast_to(glyph_r[:, None], (n, m))
    angle = rng.uniform(-math.pi, math.pi, (n, m)) if turn is None else np.broadcast_to(turn[:, None], (n, m))
    gcos, gsin = _trig(np.ascontiguousarray(angle))
    _stamp_patches(img, pad, centres, half, colour, _glyph_inside(np.maximum(shape, 0), radius, gcos, gsin),
                   active & (shape >= 0))


def make_category_instances(category_id: int, seed: int = 0, instances_per_category: int = 60,
                            canvas: int = 96) -> tuple[Category, list[Instance]]:
    check_sizes(instances_per_category, canvas)
    template = make_template(category_id, seed)
    rng = np.random.default_rng([seed, category_id, _INSTANCE_TAG])
    images, keypoints, visible = render_instances(template, instances_per_category, rng, canvas)
    # the box of all keypoints (hidden and truncated too) plus a glyph's radius
    return template.category, rendered_instances(template.category, images, keypoints, visible, canvas,
                                                 margin=GLYPH_RADIUS * canvas)


def make_hard_split(subset: str, seed: int = 0, instances_per_category: int = 60,
                    canvas: int = 96) -> KeypointDataset:
    """The categories of `subset` ("train" | "val" | "test") with their rendered instances."""
    categories: dict[int, Category] = {}
    instances: dict[int, list[Instance]] = {}
    for cid in hard_category_ids(subset, seed):
        categories[cid], instances[cid] = make_category_instances(cid, seed, instances_per_category, canvas)
    return KeypointDataset(categories=categories, instances=instances,
                           source=f"built-in hard v{GENERATOR_VERSION} {subset} (seed {seed}, "
                                  f"{instances_per_category} per category, {canvas}px)")
