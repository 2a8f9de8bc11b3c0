import json
import logging

import numpy as np
import pytest
from PIL import Image

from cape_ray.data.dataset import Category, Instance, KeypointDataset
from cape_ray.data.mp100 import MP100FormatError, export_synthetic, load_mp100, write_mp100
from cape_ray.data.synthetic import make_synthetic_split
from cape_ray.data.transforms import prepare

FILE = "mp100_split1_train.json"


def _base() -> dict:
    """Two categories (3 and 2 keypoints), three images, annotations covering every skip rule."""
    return {
        "images": [
            {"id": 1, "file_name": "cat/a.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "cat/b.png", "width": 40, "height": 30},
            {"id": 3, "file_name": "dog/c.png", "width": 20, "height": 20},
        ],
        "categories": [
            {"id": 7, "name": "cat", "supercategory": "animal", "keypoints": ["nose", "ear", "tail"],
             "skeleton": [[1, 2], [2, 3]]},
            {"id": 9, "name": "dog", "keypoints": ["head", "foot"], "skeleton": [[2, 1]]},
            {"id": 11, "name": "unused", "keypoints": ["x"], "skeleton": []},
        ],
        "annotations": [
            # v = 2, 1, 0 -> visible, visible (min(1, v)), hidden; bbox sticks out and gets clipped
            {"id": 100, "image_id": 1, "category_id": 7, "bbox": [-5, 2, 30, 40], "num_keypoints": 2,
             "keypoints": [10, 12, 2, 20, 5, 1, 3, 4, 0]},
            {"id": 101, "image_id": 2, "category_id": 7, "bbox": [1, 1, 10, 10], "num_keypoints": 3,
             "keypoints": [2, 3, 2, 4, 5, 2, 6, 7, 2]},
            {"id": 102, "image_id": 3, "category_id": 9, "bbox": [0, 0, 20, 20], "num_keypoints": 1,
             "keypoints": [5, 5, 2, 0, 0, 0]},
            # skipped: no bbox / all-zero keypoints / num_keypoints 0 / nothing visible
            {"id": 103, "image_id": 2, "category_id": 7, "num_keypoints": 1, "keypoints": [2, 3, 2, 0, 0, 0, 0, 0, 0]},
            {"id": 104, "image_id": 2, "category_id": 7, "bbox": [1, 1, 5, 5], "keypoints": [0] * 9},
            {"id": 105, "image_id": 2, "category_id": 7, "bbox": [1, 1, 5, 5], "num_keypoints": 0,
             "keypoints": [2, 3, 2, 0, 0, 0, 0, 0, 0]},
            {"id": 106, "image_id": 3, "category_id": 9, "bbox": [1, 1, 5, 5], "keypoints": [2, 3, 0, 4, 4, 0]},
        ],
    }


def _write(root, data=None, text=None, images=True):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    path = root / "annotations" / FILE
    path.write_text(text if text is not None else json.dumps(data if data is not None else _base()))
    if images:
        for rec in _base()["images"]:
            target = root / "images" / rec["file_name"]
            target.parent.mkdir(parents=True, exist_ok=True)
            pixels = np.full((rec["height"], rec["width"], 3), rec["id"] * 40, dtype=np.uint8)
            Image.fromarray(pixels).save(target)
    return path


def test_loads_valid_file_with_mp100_rules(tmp_path):
    _write(tmp_path)
    ds = load_mp100(tmp_path, 1, "train")
    assert sorted(ds.categories) == [7, 9]  # "unused" has no annotation record
    cat = ds.categories[7]
    assert cat.keypoint_names == ("nose", "ear", "tail") and cat.skeleton == ((0, 1), (1, 2))
    assert ds.categories[9].skeleton == ((1, 0),) and cat.supercategory == "animal"
    assert [i.id for i in ds.instances[7]] == [100, 101] and [i.id for i in ds.instances[9]] == [102]
    first = ds.instances[7][0]
    assert first.visible.tolist() == [True, True, False]
    np.testing.assert_array_equal(first.keypoints, np.array([[10, 12], [20, 5], [3, 4]], dtype=np.float32))
    np.testing.assert_array_equal(first.bbox, np.array([0, 2, 25, 28], dtype=np.float32))  # clipped to 40x30
    assert first.file_name == "cat/a.png" and (first.width, first.height) == (40, 30) and first.image is None
    image = ds.load_image(first)
    assert image.shape == (30, 40, 3) and image.dtype == np.uint8 and (image == 40).all()


def _mutate(data, path, value):
    node = data
    for key in path[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return data


_DELETE = object()

# (change to the base file, record named in the message, field named in the message)
BAD_RECORDS = {
    "missing images key": (("images",), _DELETE, "top level", "images"),
    "missing annotations key": (("annotations",), _DELETE, "top level", "annotations"),
    "missing categories key": (("categories",), _DELETE, "top level", "categories"),
    "keypoint count": (("annotations", 1, "keypoints"), [1, 2, 2, 3, 4, 2], "annotation id=101", "keypoints"),
    "unknown category": (("annotations", 0, "category_id"), 42, "annotation id=100", "category_id"),
    "unknown image": (("annotations", 2, "image_id"), 77, "annotation id=102", "image_id"),
    "non-finite bbox": (("annotations", 1, "bbox"), [1, float("nan"), 3, 4], "annotation id=101", "bbox"),
    "negative bbox": (("annotations", 1, "bbox"), [1, 1, -3, 4], "annotation id=101", "bbox"),
    "non-finite keypoint": (("annotations", 1, "keypoints", 0), float("inf"), "annotation id=101", "keypoints"),
    "duplicate image": (("images", 1, "id"), 1, "image id=1", "id"),
    "duplicate annotation": (("annotations", 1, "id"), 100, "annotation id=100", "id"),
    "duplicate category": (("categories", 1, "id"), 7, "category id=7", "id"),
    "skeleton 0-based": (("categories", 1, "skeleton"), [[0, 1]], "category id=9", "skeleton"),
    "skeleton too large": (("categories", 0, "skeleton"), [[1, 4]], "category id=7", "skeleton"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_records_name_file_record_and_field(tmp_path, case):
    path, value, record, field = BAD_RECORDS[case]
    _write(tmp_path, _mutate(_base(), path, value))
    with pytest.raises(MP100FormatError) as err:
        load_mp100(tmp_path, 1, "train")
    message = str(err.value)
    assert FILE in message and record in message and f"'{field}'" in message and "Fix:" in message, message
    assert err.value.record == record and err.value.field == field
    assert isinstance(err.value, ValueError)


def test_missing_image_file(tmp_path):
    _write(tmp_path)
    (tmp_path / "images" / "dog" / "c.png").unlink()
    with pytest.raises(MP100FormatError) as err:
        load_mp100(tmp_path, 1, "train")
    message = str(err.value)
    assert FILE in message and "image id=3" in message and "'file_name'" in message and "c.png" in message


def test_malformed_json_reports_line_and_column(tmp_path):
    _write(tmp_path, text='{\n  "images": [\n    {"id": 1,, "file_name": "x"}\n  ]\n}')
    with pytest.raises(MP100FormatError) as err:
        load_mp100(tmp_path, 1, "train")
    assert FILE in str(err.value) and "line 3 column" in str(err.value) and "malformed JSON" in str(err.value)


def test_missing_annotation_file_explains_layout(tmp_path):
    with pytest.raises(MP100FormatError) as err:
        load_mp100(tmp_path, 2, "val")
    assert "mp100_split2_val.json" in str(err.value) and "annotations" in str(err.value)


def test_empty_split_is_an_error(tmp_path):
    data = _base()
    data["annotations"] = [a for a in data["annotations"] if a["id"] >= 103]  # only skipped ones
    _write(tmp_path, data)
    with pytest.raises(MP100FormatError) as err:
        load_mp100(tmp_path, 1, "train")
    assert FILE in str(err.value) and "'annotations'" in str(err.value) and "no usable instance" in str(err.value)


def test_image_size_mismatch_is_reported_when_read(tmp_path):
    data = _base()
    data["images"][0]["width"] = 41
    _write(tmp_path, data)
    ds = load_mp100(tmp_path, 1, "train")
    with pytest.raises(MP100FormatError) as err:
        ds.load_image(ds.instances[7][0])
    assert "a.png" in str(err.value) and "'width/height'" in str(err.value)


def test_category_with_too_few_instances_is_reported_not_raised(tmp_path, caplog):
    _write(tmp_path)
    ds = load_mp100(tmp_path, 1, "train")  # category 9 has one usable instance
    with caplog.at_level(logging.WARNING, logger="cape_ray.data"):
        split = prepare(ds, 32, num_shots=1, num_queries=2)
    assert split.category_ids == [7] and 9 in split.skipped and "1 usable instance" in split.skipped[9]
    assert 7 in split.notes  # 2 instances: 1 support + repeated queries
    assert "dog" in caplog.text
    assert len(split) == 2


def _instances_equal(a: Instance, b: Instance, a_pixels: np.ndarray, b_pixels: np.ndarray):
    assert (a.id, a.image_id, a.category_id, a.width, a.height) == (b.id, b.image_id, b.category_id, b.width, b.height)
    for x, y in ((a.keypoints, b.keypoints), (a.visible, b.visible), (a.bbox, b.bbox), (a_pixels, b_pixels)):
        assert x.dtype == y.dtype and np.array_equal(x, y)


def test_make_data_output_reads_back_as_the_generated_instances(tmp_path):
    export_synthetic(tmp_path, seed=5, instances_per_category=3, canvas=64)
    for subset in ("train", "val", "test"):
        generated = make_synthetic_split(subset, seed=5, instances_per_category=3, canvas=64)
        loaded = load_mp100(tmp_path, 1, subset)
        assert loaded.categories == generated.categories
        for cid in generated.category_ids:
            assert len(loaded.instances[cid]) == len(generated.instances[cid])
            for g, l in zip(generated.instances[cid], loaded.instances[cid]):
                assert l.file_name == g.file_name
                _instances_equal(g, l, g.image, loaded.load_image(l))


def test_hidden_keypoints_and_visible_zero_keypoints_round_trip(tmp_path):
    category = Category(7, "thing", ("a", "b", "c"), ((0, 2), (1, 2)), "misc")
    pixels = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
    inst = Instance(id=5, image_id=8, category_id=7,
                    keypoints=np.array([[0, 0], [12.25, 3.5], [29.75, 19.125]], dtype=np.float32),
                    visible=np.array([True, False, True]), bbox=np.array([0, 0, 30, 20], dtype=np.float32),
                    file_name="thing/x.jpg", width=30, height=20, image=pixels)
    write_mp100({"val": KeypointDataset({7: category}, {7: [inst]})}, tmp_path, split=3)
    loaded = load_mp100(tmp_path, 3, "val")
    back = loaded.instances[7][0]
    assert loaded.categories[7] == category and back.file_name == "thing/x.png"
    _instances_equal(inst, back, pixels, loaded.load_image(back))
