"""The prepared-split cache: real MP-100 files written by make-data, real processes, real damage.

A cached split must be exactly what `prepare` makes in memory, be built once per key however many
processes ask at once, and never be used when half-written, damaged or stale.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cache_child
from cape_ray.config import ConfigError, TrainConfig
from cape_ray.data import cache, mp100
from cape_ray.data.loading import load_split
from cape_ray.data.mp100 import MP100FormatError, export_synthetic, load_mp100
from cape_ray.data.transforms import prepare

CHILD = str(Path(__file__).with_name("cache_child.py"))
ANNOTATIONS = "annotations/mp100_split1_train.json"
TENSORS = ("images", "keypoints", "visible", "crop_to_original", "bbox", "category", "instance_ids")


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory) -> Path:
    """The built-in categories as MP-100 files (6 instances per category, 48 px). Read-only."""
    root = tmp_path_factory.mktemp("mp100")
    export_synthetic(root, seed=0, instances_per_category=6, canvas=48)
    return root


@pytest.fixture
def data(shared_data, tmp_path) -> Path:
    """A private copy of the MP-100 files, for tests that change them."""
    root = tmp_path / "mp100"
    shutil.copytree(shared_data, root)
    return root


def config(data_root: Path, cache_dir: Path, **changes) -> TrainConfig:
    return TrainConfig(**{"data_root": str(data_root), "cache_dir": str(cache_dir), "image_size": 32, **changes})


def reference(data_root: Path, image_size: int = 32, num_shots: int = 1, num_queries: int = 2):
    return prepare(load_mp100(data_root, 1, "train"), image_size, num_shots, num_queries)


def assert_same_split(a, b) -> None:
    for name in TENSORS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), f"{name} differs"
    assert list(a.rows_by_category) == list(b.rows_by_category)
    assert all(a.rows_by_category[c].tolist() == b.rows_by_category[c].tolist() for c in a.rows_by_category)
    assert list(a.categories.items()) == list(b.categories.items())
    assert (a.category_ids, a.skipped, a.notes, a.source) == (b.category_ids, b.skipped, b.notes, b.source)
    assert (a.image_size, a.num_shots, a.num_queries) == (b.image_size, b.num_shots, b.num_queries)
    assert a.adjacency.keys() == b.adjacency.keys()
    assert all(torch.equal(a.adjacency[c], b.adjacency[c]) for c in a.adjacency)


def entries(cache_dir: Path) -> list[Path]:
    root = cache_dir / cache.SUBDIRECTORY
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.exists() else []


def leftovers(cache_dir: Path) -> list[str]:
    root = cache_dir / cache.SUBDIRECTORY
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".")) if root.exists() else []


@pytest.fixture
def image_reads(monkeypatch) -> list[str]:
    """Every image file this process decodes, in order."""
    reads: list[str] = []
    read_image = mp100.MP100ImageLoader.__call__

    def counted(self, inst):
        reads.append(inst.file_name)
        return read_image(self, inst)

    monkeypatch.setattr(mp100.MP100ImageLoader, "__call__", counted)
    return reads


def mapping_of(tensor: torch.Tensor) -> tuple[str, str]:
    """(permissions, path) of the memory mapping that holds the tensor's data."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        start, end = (int(v, 16) for v in fields[0].split("-"))
        if start <= address < end:
            return fields[1], fields[5] if len(fields) > 5 else ""
    raise AssertionError("the tensor's data is in no mapping")


def test_first_load_builds_an_entry_equal_to_preparing_in_memory(shared_data, tmp_path, image_reads):
    split, outcome = cache.open_or_build(tmp_path / "cache", shared_data / ANNOTATIONS, shared_data / "images", 32, 1, 2,
                                         load_dataset=lambda: load_mp100(shared_data, 1, "train"))
    assert outcome.built and outcome.replaced is None
    assert outcome.threads == cache.available_cores()
    assert len(image_reads) == len(split) == 70 * 6  # every image decoded once
    assert_same_split(split, reference(shared_data))
    (entry,) = entries(tmp_path / "cache")
    assert entry == outcome.entry and entry.name.startswith("mp100_split1_train-32px-1shot-")
    assert leftovers(tmp_path / "cache") == []  # no staging directory left behind
    for name in ("images", "keypoints", "bbox"):  # read-only views of the entry's files
        permissions, path = mapping_of(getattr(split, name))
        assert path == str(entry / f"{name}.npy") and permissions.startswith("r-"), (name, permissions, path)
    fd = os.open(entry.with_name(entry.name + ".lock"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the builder released its lock
    finally:
        os.close(fd)


def test_second_load_is_a_hit_that_reads_no_image_and_changes_no_file(shared_data, tmp_path, image_reads):
    first = load_split(config(shared_data, tmp_path / "cache"), "train", 2)
    built_reads = len(image_reads)
    (entry,) = entries(tmp_path / "cache")
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in entry.iterdir()}
    second = load_split(config(shared_data, tmp_path / "cache"), "train", 2)
    assert len(image_reads) == built_reads  # nothing decoded: the build did not run
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in entry.iterdir()} == before
    assert entries(tmp_path / "cache") == [entry]
    assert_same_split(second, first)


def test_queries_share_an_entry_while_size_and_shots_get_their_own(shared_data, tmp_path, image_reads):
    cache_dir = tmp_path / "cache"
    two = load_split(config(shared_data, cache_dir), "train", 2)
    reads = len(image_reads)
    fifteen = load_split(config(shared_data, cache_dir), "train", 15)
    assert len(image_reads) == reads and len(entries(cache_dir)) == 1  # num_queries changes no array
    assert two.notes == {} and len(fifteen.notes) == 70  # 6 instances < 1 + 15: queries repeat
    assert_same_split(fifteen, reference(shared_data, num_queries=15))
    five_shot = load_split(config(shared_data, cache_dir, num_shots=5), "train", 2)
    larger = load_split(config(shared_data, cache_dir, image_size=48), "train", 2)
    assert len(entries(cache_dir)) == 3
    assert_same_split(five_shot, reference(shared_data, num_shots=5))
    assert_same_split(larger, reference(shared_data, image_size=48))


def test_changed_annotation_file_is_a_new_key_and_is_rebuilt(data, tmp_path, image_reads):
    cache_dir = tmp_path / "cache"
    load_split(config(data, cache_dir), "train", 2)
    reads = len(image_reads)
    path = data / ANNOTATIONS
    content = json.loads(path.read_text())
    content["annotations"][0]["keypoints"][0] += 1.5  # move one keypoint of the first instance
    path.write_text(json.dumps(content))
    changed = load_split(config(data, cache_dir), "train", 2)
    assert len(image_reads) == 2 * reads  # rebuilt in full
    assert len(entries(cache_dir)) == 2
    assert_same_split(changed, reference(data))
    row = int((changed.instance_ids == content["annotations"][0]["id"]).nonzero())
    assert changed.keypoints[row, 0, 0] * changed.crop_to_original[row, 0, 0] + changed.crop_to_original[row, 0, 2] \
        == pytest.approx(content["annotations"][0]["keypoints"][0], abs=1e-3)


def _flip_byte(path: Path, position: int) -> None:
    stat = path.stat()
    path.chmod(0o644)
    with open(path, "r+b") as fh:
        fh.seek(position)
        value = fh.read(1)[0]
        fh.seek(position)
        fh.write(bytes([value ^ 0xFF]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # size and mtime as before: only content tells


def _truncate(path: Path) -> None:
    path.chmod(0o644)
    os.truncate(path, path.stat().st_size - 100)


def _edit_manifest(entry: Path, change) -> None:
    manifest = entry / cache.MANIFEST_FILE
    manifest.chmod(0o644)
    content = json.loads(manifest.read_text())
    change(content)
    manifest.write_text(json.dumps(content))


DAMAGE = {
    "images truncated": (lambda e: _truncate(e / "images.npy"), "truncated"),
    "image bytes flipped": (lambda e: _flip_byte(e / "images.npy", (e / "images.npy").stat().st_size // 2), "damaged"),
    "keypoint bytes flipped": (lambda e: _flip_byte(e / "keypoints.npy", 200), "damaged"),
    "split.json edited": (lambda e: _flip_byte(e / "split.json", 10), "damaged"),
    "array file missing": (lambda e: (e / "visible.npy").unlink(), "missing"),
    "half-written (no manifest)": (lambda e: (e / cache.MANIFEST_FILE).unlink(), "never finished"),
    "manifest not JSON": (lambda e: (e / cache.MANIFEST_FILE).write_text("{\"layout\": 1, "), "not valid JSON"),
    "manifest of another key": (lambda e: _edit_manifest(e, lambda m: m["key"].update(image_size=48)), "stale"),
    "manifest of another crop rule": (lambda e: _edit_manifest(e, lambda m: m["key"].update(crop_rule=0)), "stale"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_entry_is_detected_discarded_and_rebuilt(shared_data, tmp_path, image_reads, damage):
    harm, reason = DAMAGE[damage]
    cache_dir = tmp_path / "cache"
    load_split(config(shared_data, cache_dir), "train", 2)
    reads = len(image_reads)
    (entry,) = entries(cache_dir)
    harm(entry)
    split, outcome = cache.open_or_build(cache_dir, shared_data / ANNOTATIONS, shared_data / "images", 32, 1, 2,
                                         load_dataset=lambda: load_mp100(shared_data, 1, "train"))
    assert outcome.built and reason in outcome.replaced, outcome.replaced
    assert len(image_reads) == 2 * reads
    assert_same_split(split, reference(shared_data))  # the damaged bytes were never used
    assert entries(cache_dir) == [entry] and leftovers(cache_dir) == []
    manifest = json.loads((entry / cache.MANIFEST_FILE).read_text())
    for name, expected in manifest["files"].items():  # the rebuilt entry is whole
        assert cache.file_sha256(entry / name) == expected["sha256"]


def test_bad_image_mid_build_names_file_and_record_and_leaves_no_cache(data, tmp_path):
    content = json.loads((data / ANNOTATIONS).read_text())
    middle = content["annotations"][len(content["annotations"]) // 2]
    image = next(i for i in content["images"] if i["id"] == middle["image_id"])
    (data / "images" / image["file_name"]).write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    cache_dir = tmp_path / "cache"
    with pytest.raises(MP100FormatError) as error:
        load_split(config(data, cache_dir), "train", 2)
    message = str(error.value)
    assert image["file_name"] in message and f"image id={image['id']}" in message
    assert f"annotation id={middle['id']}" in message and "Fix:" in message
    assert entries(cache_dir) == [] and leftovers(cache_dir) == []


def _child(args: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, CHILD, json.dumps(args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_two_processes_asking_at_once_build_once_and_both_get_the_split(shared_data, tmp_path):
    cache_dir, reads = tmp_path / "cache", tmp_path / "reads.log"
    args = {"data_root": str(shared_data), "cache_dir": str(cache_dir), "image_size": 32, "reads": str(reads),
            "delay": 0.005, "ready": str(tmp_path / "ready"), "go": str(tmp_path / "go")}
    children = [_child(args), _child(args)]
    _wait_for(lambda: len(list(tmp_path.glob("ready.*"))) == 2, 120, "both processes to be ready")
    (tmp_path / "go").touch()
    results = []
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    readers = reads.read_text().split()
    assert len(readers) == 70 * 6 and len(set(readers)) == 1  # one process decoded every image, once
    assert {r["fingerprint"] for r in results} == {cache_child.fingerprint(reference(shared_data))}
    (entry,) = entries(cache_dir)
    assert leftovers(cache_dir) == []
    manifest = json.loads((entry / cache.MANIFEST_FILE).read_text())
    assert manifest["built"]["pid"] == int(readers[0])
    assert all(cache.file_sha256(entry / n) == f["sha256"] for n, f in manifest["files"].items())


def test_builder_killed_midway_leaves_nothing_that_is_used(shared_data, tmp_path, image_reads):
    cache_dir, reads = tmp_path / "cache", tmp_path / "reads.log"
    child = _child({"data_root": str(shared_data), "cache_dir": str(cache_dir), "image_size": 32,
                    "reads": str(reads), "delay": 0.05})
    _wait_for(lambda: reads.exists() and len(reads.read_text().split()) >= 5, 120, "the build to start")
    child.send_signal(signal.SIGKILL)
    child.communicate()
    assert entries(cache_dir) == [] and any(".building-" in name for name in leftovers(cache_dir))
    split = load_split(config(shared_data, cache_dir), "train", 2)  # the dead builder's lock is gone
    assert len(image_reads) == 70 * 6
    assert_same_split(split, reference(shared_data))
    assert leftovers(cache_dir) == []  # its staging directory was removed


def test_cache_dir_must_be_absolute_home_relative_or_off(shared_data, tmp_path, image_reads, monkeypatch):
    with pytest.raises(ConfigError, match="--cache_dir"):
        config(shared_data, Path("relative/cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    load_split(config(shared_data, Path("~/cape-cache")), "train", 2)  # "~" expands where it is loaded
    assert len(entries(tmp_path / "home" / "cape-cache")) == 1
    off = load_split(TrainConfig(data_root=str(shared_data), cache_dir="", image_size=32), "train", 2)
    assert len(image_reads) == 2 * 70 * 6  # prepared again in memory
    assert not mapping_of(off.images)[1].endswith(".npy")
    assert_same_split(off, reference(shared_data))


def test_unwritable_cache_dir_names_the_path_and_the_fix(shared_data, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(cache.CacheError) as error:
        load_split(config(shared_data, blocker), "train", 2)
    assert str(blocker) in str(error.value) and "--cache_dir" in str(error.value)


@pytest.mark.slow
def test_worker_killed_with_a_cache_resumes_bitwise_equal_to_a_run_without_it(ray_cluster, shared_data, tmp_path):
    """A 2-worker Ray run on make-data files: one without the cache runs through; one with it has a
    worker SIGKILLed mid-epoch 2, restarts on the warm cache, and ends bitwise identical."""
    from ray import cloudpickle

    import faults
    from test_ray_job import assert_bitwise_equal, final_checkpoint, fit
    from tiny import make_config

    cloudpickle.register_pickle_by_value(faults)
    two_workers = dict(num_workers="2", episodes_per_epoch=32, keep=100, epochs=2)
    uncached = make_config(tmp_path, "uncached", data_root=str(shared_data), cache_dir="", **two_workers)
    assert fit(uncached).error is None

    cache_dir = tmp_path / "cache"
    cached = make_config(tmp_path, "cached", data_root=str(shared_data), cache_dir=str(cache_dir), **two_workers)
    # 8 compute_loss calls per epoch per rank: call 14 is epoch 2, step 3, after its mid-epoch checkpoints
    plan = {"rank": 1, "kill_at_call": 14, "marker": str(tmp_path / "killed.marker"), "log": str(tmp_path / "starts.log")}
    result = fit(cached, faults.train_with_faults, {**cached.to_dict(), "_fault_plan": plan})
    assert result.error is None
    assert os.path.exists(plan["marker"]), "the worker was never killed"
    starts = Path(plan["log"]).read_text().splitlines()
    assert len(starts) == 4 and all("checkpoint=checkpoint_e002_" in line for line in starts[2:]), starts

    assert_bitwise_equal(final_checkpoint(tmp_path / "cached"), final_checkpoint(tmp_path / "uncached"))
    killed_at = os.stat(plan["marker"]).st_mtime_ns
    built = {entry.name.split("-")[0]: (entry / "images.npy").stat().st_mtime_ns for entry in entries(cache_dir)}
    assert set(built) == {"mp100_split1_train", "mp100_split1_val"}
    assert all(when < killed_at for when in built.values())  # built before the kill, reused after it
    assert leftovers(cache_dir) == []
