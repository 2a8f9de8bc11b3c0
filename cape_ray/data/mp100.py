"""Read and write MP-100 / COCO-keypoint annotation files.

Layout: `DATA_ROOT/annotations/mp100_split{N}_{train,val,test}.json`, images under
`DATA_ROOT/images/` with each image record's `file_name` relative to that folder.

Reading (`load_mp100`) follows the MP-100 reference loaders:
- visibility = min(1, v): v = 0 is not visible, v >= 1 is visible (v must be finite and >= 0);
- an annotation is skipped (not an error) when its bbox is missing or empty, its keypoints are all
  zero, `num_keypoints` is 0, no keypoint is visible, or its bbox has no area inside the image;
- the bbox is clipped to the image rectangle [0, width] x [0, height];
- the skeleton is read as 1-BASED keypoint index pairs (COCO tradition) and converted to 0-based;
  an index outside 1..K is rejected, so a 0-based file fails loudly whenever it uses index 0
  (a 0-based file that never mentions keypoint 0 cannot be told apart: convert such files first).
Every record is validated at load time (and every image file's existence is checked), so a broken
file fails before training starts. Errors are `MP100FormatError` naming the file, the record and
the field, and how to fix it. Categories listed in the file but without any annotation record are
left out (MP-100 files may list categories of other subsets); a category whose annotations were
all skipped stays in, with no instances, and `prepare` reports it.

Images are read lazily with PIL as uint8 RGB, pixels as stored (no EXIF rotation); a decoded size
that differs from the image record's width/height raises `MP100FormatError` when it is read.

Writing (`write_mp100`) produces the same layout with lossless PNG images. Visible keypoints are
written with v = 2, not-visible ones with v = 0 and their x, y kept (v = 1 would read back as
visible under min(1, v)), so a written dataset reads back identically.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
from PIL import Image

from .dataset import Category, Instance, KeypointDataset

log = logging.getLogger("cape_ray.data")

SUBSETS = ("train", "val", "test")
PathLike = Union[str, os.PathLike]


class MP100FormatError(ValueError):
    """An MP-100 file or record that cannot be used; says where (file, record, field) and how to fix."""

    def __init__(self, file: PathLike, problem: str, *, record: str = "", field: str = "", fix: str = ""):
        self.file, self.record, self.field, self.problem, self.fix = str(file), record, field, problem, fix
        where = self.file + (f": {record}" if record else "") + (f", field '{field}'" if field else "")
        super().__init__(f"{where}: {problem}" + (f" Fix: {fix}" if fix else ""))


def annotation_path(data_root: PathLike, split: int, subset: str) -> Path:
    return Path(data_root) / "annotations" / f"mp100_split{split}_{subset}.json"


class MP100ImageLoader:
    """Reads an instance's image from the image root (a plain class so datasets pickle)."""

    def __init__(self, image_root: PathLike):
        self.image_root = str(image_root)

    def __call__(self, inst: Instance) -> np.ndarray:
        path = os.path.join(self.image_root, inst.file_name)
        record = f"image id={inst.image_id} (annotation id={inst.id})"
        try:
            with Image.open(path) as img:
                pixels = np.asarray(img.convert("RGB"), dtype=np.uint8)
        except (OSError, ValueError) as exc:
            raise MP100FormatError(path, f"cannot be read as an image ({exc}).", record=record,
                                   field="file_name", fix="replace the file with a valid image") from None
        if inst.width and inst.height and pixels.shape[:2] != (inst.height, inst.width):
            raise MP100FormatError(path, f"decodes to {pixels.shape[1]}x{pixels.shape[0]} pixels but the image "
                                   f"record says {inst.width}x{inst.height}.", record=record,
                                   field="width/height", fix="correct the record or the image file")
        return pixels


# ------------------------------------------------------------------------------------------ reading
class _Checker:
    """Field accessors that raise MP100FormatError naming the file and record."""

    def __init__(self, file: Path):
        self.file = file

    def fail(self, record: str, field: str, problem: str, fix: str) -> MP100FormatError:
        return MP100FormatError(self.file, problem, record=record, field=field, fix=fix)

    def integer(self, rec: dict, key: str, record: str, minimum: Optional[int] = None) -> int:
        if key not in rec:
            raise self.fail(record, key, "is missing.", f"add an integer '{key}'")
        value = rec[key]
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(record, key, f"must be an integer, got {value!r}.", f"write '{key}' as an integer")
        if minimum is not None and value < minimum:
            raise self.fail(record, key, f"must be >= {minimum}, got {value}.", f"write a valid '{key}'")
        return value

    def numbers(self, value: Any, record: str, field: str, length: Optional[int] = None) -> np.ndarray:
        if not isinstance(value, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise self.fail(record, field, f"must be a list of numbers, got {_short(value)}.",
                            f"write '{field}' as a JSON list of numbers")
        if length is not None and len(value) != length:
            raise self.fail(record, field, f"must have {length} numbers, got {len(value)}.",
                            f"write exactly {length} numbers")
        arr = np.asarray(value, dtype=np.float64).reshape(-1)
        if not np.isfinite(arr).all():
            raise self.fail(record, field, f"contains a non-finite value ({_short(value)}).",
                            "replace NaN/Infinity with real coordinates")
        return arr


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise MP100FormatError(path, "annotation file not found.", fix=(
            f"expected DATA_ROOT/annotations/{path.name} (DATA_ROOT/annotations/mp100_split{{N}}_{{train,val,test}}"
            ".json with images under DATA_ROOT/images/); check --data_root and --mp100_split"))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MP100FormatError(path, f"malformed JSON: {exc.msg}.", record=f"line {exc.lineno} column {exc.colno}",
                               fix="repair the JSON syntax at that position (a truncated download or a "
                                   "hand edit?)") from None
    except UnicodeDecodeError as exc:
        raise MP100FormatError(path, f"is not UTF-8 text ({exc.reason}).", fix="write the file as UTF-8 JSON") from None
    if not isinstance(data, dict):
        raise MP100FormatError(path, f"top level must be a JSON object, got {type(data).__name__}.",
                               record="top level", fix="write {\"images\": [...], \"annotations\": [...], "
                                                       "\"categories\": [...]}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise MP100FormatError(path, "missing top-level key.", record="top level", field=key,
                                   fix=f"add the '{key}' list (COCO-keypoint format)")
        if not isinstance(data[key], list):
            raise MP100FormatError(path, f"must be a list, got {type(data[key]).__name__}.", record="top level",
                                   field=key, fix=f"write '{key}' as a JSON list")
    return data


def _record_name(kind: str, rec: Any, position: int) -> str:
    if isinstance(rec, dict) and isinstance(rec.get("id"), int) and not isinstance(rec.get("id"), bool):
        return f"{kind} id={rec['id']}"
    return f"{kind} #{position} (no valid id)"


def _records(check: _Checker, records: list, kind: str) -> Iterator[tuple[str, dict, int]]:
    """(name for messages, record, id) of each record, checked to be an object with a unique id."""
    seen: set[int] = set()
    for pos, rec in enumerate(records):
        name = _record_name(kind, rec, pos)
        if not isinstance(rec, dict):
            raise check.fail(name, "", f"must be a JSON object, got {_short(rec)}.", f"write the {kind} as an object")
        rid = check.integer(rec, "id", name)
        if rid in seen:
            raise check.fail(name, "id", f"duplicate {kind} id {rid}.", f"give every {kind} a unique id")
        seen.add(rid)
        yield name, rec, rid


def _parse_categories(check: _Checker, records: list) -> dict[int, Category]:
    categories: dict[int, Category] = {}
    for name, rec, cid in _records(check, records, "category"):
        cname = rec.get("name")
        if not isinstance(cname, str) or not cname:
            raise check.fail(name, "name", f"must be a non-empty string, got {_short(cname)}.", "add the category name")
        names = rec.get("keypoints")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise check.fail(name, "keypoints", f"must be a non-empty list of keypoint names, got {_short(names)}.",
                             "list the category's keypoint names in order")
        k = len(names)
        raw_skeleton = rec.get("skeleton", [])
        if raw_skeleton is None:
            raw_skeleton = []
        if not isinstance(raw_skeleton, list):
            raise check.fail(name, "skeleton", f"must be a list of [a, b] pairs, got {_short(raw_skeleton)}.",
                             "write the skeleton as a list of 1-based index pairs")
        edges = []
        for edge in raw_skeleton:
            ok = (isinstance(edge, list) and len(edge) == 2
                  and all(isinstance(v, int) and not isinstance(v, bool) for v in edge))
            if not ok:
                raise check.fail(name, "skeleton", f"edge {_short(edge)} is not a pair of integers.",
                                 "write each edge as [a, b] with 1-based keypoint indices")
            a, b = edge
            if min(a, b) < 1:
                raise check.fail(name, "skeleton", f"edge {edge} uses index {min(a, b)}, but skeleton indices "
                                 f"are 1-based (COCO): 1..{k} for this category's {k} keypoints.",
                                 "write 1-based indices (add 1 to every index of a 0-based skeleton)")
            if max(a, b) > k:
                raise check.fail(name, "skeleton", f"edge {edge} uses index {max(a, b)}, beyond the category's "
                                 f"{k} keypoints (indices are 1-based: 1..{k}).",
                                 "correct the edge, or the category's keypoint name list")
            if a == b:
                raise check.fail(name, "skeleton", f"edge {edge} joins a keypoint to itself.", "remove the edge")
            edges.append((a - 1, b - 1))
        supercategory = rec.get("supercategory", "")
        categories[cid] = Category(id=cid, name=cname, keypoint_names=tuple(names), skeleton=tuple(edges),
                                   supercategory=supercategory if isinstance(supercategory, str) else "")
    return categories


def _parse_images(check: _Checker, records: list, image_root: Path) -> dict[int, dict]:
    images: dict[int, dict] = {}
    for name, rec, iid in _records(check, records, "image"):
        file_name = rec.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            raise check.fail(name, "file_name", f"must be a non-empty path, got {_short(file_name)}.",
                             "write the image path relative to DATA_ROOT/images/")
        width = check.integer(rec, "width", name, minimum=1)
        height = check.integer(rec, "height", name, minimum=1)
        path = image_root / file_name
        if not path.is_file():
            raise check.fail(name, "file_name", f"image file {str(path)!r} not found.",
                             "rebuild the MP-100 images from their source datasets under DATA_ROOT/images/ "
                             "(file_name is relative to it), or drop the record")
        images[iid] = {"file_name": file_name, "width": width, "height": height}
    return images


def _parse_annotations(check: _Checker, records: list, images: dict[int, dict],
                       categories: dict[int, Category]) -> tuple[dict[int, list[Instance]], Counter]:
    instances: dict[int, list[Instance]] = {}
    skipped: Counter = Counter()
    for name, rec, aid in _records(check, records, "annotation"):
        iid = check.integer(rec, "image_id", name)
        if iid not in images:
            raise check.fail(name, "image_id", f"unknown image id {iid} (not in 'images').",
                             "add the image record or correct image_id")
        cid = check.integer(rec, "category_id", name)
        if cid not in categories:
            raise check.fail(name, "category_id", f"unknown category id {cid} (not in 'categories').",
                             "add the category record or correct category_id")
        category = categories[cid]
        k = category.num_keypoints
        if "keypoints" not in rec:
            raise check.fail(name, "keypoints", "is missing.", f"add {3 * k} numbers: x, y, v per keypoint")
        raw = rec["keypoints"]
        if isinstance(raw, list) and len(raw) != 3 * k:
            raise check.fail(name, "keypoints", f"has {len(raw)} values ({len(raw) / 3:g} keypoints) but category "
                             f"{cid} ({category.name!r}) names {k} keypoints, which needs {3 * k} values.",
                             f"write x, y, v for each of the {k} keypoint names of the category, in order")
        kps = check.numbers(raw, name, "keypoints", 3 * k).reshape(k, 3)
        if (kps[:, 2] < 0).any():
            raise check.fail(name, "keypoints", f"has a negative visibility flag v ({kps[:, 2].min():g}).",
                             "use v = 0 (not visible), 1 (occluded, counts as visible in MP-100) or 2 (visible)")
        num = rec.get("num_keypoints")
        if num is not None:
            num = check.integer(rec, "num_keypoints", name, minimum=0)
        bbox_raw = rec.get("bbox")
        bbox = None
        if bbox_raw is not None and bbox_raw != []:
            bbox = check.numbers(bbox_raw, name, "bbox", 4)
            if bbox[2] < 0 or bbox[3] < 0:
                raise check.fail(name, "bbox", f"has a negative width or height {bbox.tolist()}.",
                                 "write the bbox as [x, y, width, height] with width, height >= 0")
        visible = np.minimum(1.0, kps[:, 2]) > 0
        image = images[iid]
        reason = None
        if bbox is None:
            reason = "no bbox"
        elif num == 0:
            reason = "num_keypoints == 0"
        elif not kps.any():
            reason = "all keypoints zero"
        elif not visible.any():
            reason = "no visible keypoint"
        else:
            w, h = image["width"], image["height"]
            inside = bbox[0] >= 0 and bbox[1] >= 0 and bbox[0] + bbox[2] <= w and bbox[1] + bbox[3] <= h
            if not inside:  # clip; a box already inside keeps its exact numbers
                x0, y0 = min(max(bbox[0], 0.0), w), min(max(bbox[1], 0.0), h)
                x1, y1 = min(max(bbox[0] + bbox[2], 0.0), w), min(max(bbox[1] + bbox[3], 0.0), h)
                bbox = np.array([x0, y0, x1 - x0, y1 - y0])
            if bbox[2] <= 0 or bbox[3] <= 0:
                reason = "bbox has no area inside the image"
        instances.setdefault(cid, [])
        if reason is not None:
            skipped[reason] += 1
            continue
        instances[cid].append(Instance(
            id=aid, image_id=iid, category_id=cid, keypoints=kps[:, :2].astype(np.float32), visible=visible,
            bbox=bbox.astype(np.float32), file_name=image["file_name"], width=image["width"],
            height=image["height"]))
    return instances, skipped


def load_mp100(data_root: PathLike, split: int, subset: str) -> KeypointDataset:
    """Load `DATA_ROOT/annotations/mp100_split{split}_{subset}.json`, validating every record."""
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
    root = Path(data_root)
    path = annotation_path(root, split, subset)
    data = _read_json(path)
    check = _Checker(path)
    categories = _parse_categories(check, data["categories"])
    images = _parse_images(check, data["images"], root / "images")
    instances, skipped = _parse_annotations(check, data["annotations"], images, categories)
    used = {cid: categories[cid] for cid in sorted(instances)}
    total = sum(len(v) for v in instances.values())
    if total == 0:
        detail = ", ".join(f"{n} {why}" for why, n in skipped.items()) or "no annotation records"
        raise MP100FormatError(path, f"the split has no usable instance ({detail}).", record="whole file",
                               field="annotations", fix="check that this is the right file and that its "
                                                        "annotations have bboxes and visible keypoints")
    if skipped:
        log.info("%s: skipped %d annotation(s): %s", path, sum(skipped.values()),
                 ", ".join(f"{n} {why}" for why, n in sorted(skipped.items())))
    return KeypointDataset(categories=used, instances={cid: instances[cid] for cid in used},
                           image_loader=MP100ImageLoader(root / "images"),
                           source=f"{path} ({total} instances, {len(used)} categories)")


# ------------------------------------------------------------------------------------------ writing
def _png_name(inst: Instance, category: Category) -> str:
    name = inst.file_name or f"{category.name}/{inst.image_id:012d}.png"
    stem, ext = os.path.splitext(name)
    return name if ext.lower() == ".png" else stem + ".png"


def category_record(category: Category) -> dict:
    """A category as MP-100 writes it (skeleton 1-based)."""
    return {"id": int(category.id), "name": category.name, "supercategory": category.supercategory,
            "keypoints": list(category.keypoint_names), "skeleton": [[a + 1, b + 1] for a, b in category.skeleton]}


def annotation_record(inst: Instance) -> dict:
    """An instance as MP-100 writes it: visible keypoints v = 2, hidden v = 0 with x, y kept."""
    flags = np.where(np.asarray(inst.visible, dtype=bool), 2, 0)
    triples = [[float(x), float(y), int(v)] for (x, y), v in zip(np.asarray(inst.keypoints), flags)]
    bbox = [float(v) for v in np.asarray(inst.bbox)]
    return {"id": int(inst.id), "image_id": int(inst.image_id), "category_id": int(inst.category_id),
            "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0, "num_keypoints": int((flags > 0).sum()),
            "keypoints": [v for triple in triples for v in triple]}


def write_annotation_file(path: PathLike, description: str, images: list[dict], annotations: list[dict],
                          categories: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump({"info": {"description": description}, "images": images, "annotations": annotations,
                   "categories": categories}, fh, separators=(",", ":"))
    return path


def write_mp100(datasets: dict[str, KeypointDataset], out_dir: PathLike, split: int = 1) -> dict[str, Path]:
    """Write `{subset: dataset}` as MP-100 files under out_dir; returns the annotation paths."""
    out = Path(out_dir)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for subset, dataset in datasets.items():
        if subset not in SUBSETS:
            raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
        images, annotations = [], []
        image_files: dict[int, str] = {}
        for cid in dataset.category_ids:
            category = dataset.categories[cid]
            for inst in dataset.instances.get(cid, []):
                if inst.image_id not in image_files:
                    pixels = dataset.load_image(inst)
                    file_name = _png_name(inst, category)
                    target = out / "images" / file_name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(pixels).save(target, format="PNG", compress_level=1)
                    image_files[inst.image_id] = file_name
                    images.append({"id": int(inst.image_id), "file_name": file_name,
                                   "width": int(pixels.shape[1]), "height": int(pixels.shape[0])})
                annotations.append(annotation_record(inst))
        categories = [category_record(dataset.categories[cid]) for cid in dataset.category_ids]
        written[subset] = write_annotation_file(annotation_path(out, split, subset),
                                                f"cape-ray export of {dataset.source}", images, annotations,
                                                categories)
    return written


def export_synthetic(out_dir: PathLike, seed: int = 0, instances_per_category: int = 60, canvas: int = 96,
                     split: int = 1, preset: str = "default") -> dict[str, Path]:
    """Render built-in categories (`preset` default: synthetic.py, hard: synthetic_hard.py) and write
    them as an MP-100 dataset (`make-data`)."""
    if preset == "hard":
        from .synthetic_hard import make_hard_split as make_split
    elif preset == "default":
        from .synthetic import make_synthetic_split as make_split
    else:
        raise ValueError(f"preset must be default or hard, got {preset!r}")
    datasets = {subset: make_split(subset, seed, instances_per_category, canvas) for subset in SUBSETS}
    return write_mp100(datasets, out_dir, split)
