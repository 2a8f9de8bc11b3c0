"""The prepared-split cache: real MP-100 files written by make-data, real processes, real damage.

A cached split must be exactly what `prepare` makes in memory, be built once per key however many
processes ask at once, and never be used when half-written, damaged or stale; opening it must not
read whole files.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
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


@pytest.fixture
def full_hashes(monkeypatch) -> list[str]:
    """The paths of the files the cache hashes in full, in order. Annotation hashes are remembered at once."""
    hashed: list[str] = []
    hash_file = cache.file_sha256

    def counted(path_or_file):
        if hasattr(path_or_file, "readinto"):  # a path is opened, then hashed through this again
            hashed.append(path_or_file.name)
        return hash_file(path_or_file)

    monkeypatch.setattr(cache, "file_sha256", counted)
    monkeypatch.setattr(cache, "SETTLED_NS", 0)  # test files are seconds old
    return hashed


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


def test_second_load_is_a_hit_that_reads_no_image_no_whole_file_and_changes_no_file(shared_data, tmp_path,
                                                                                   image_reads, full_hashes):
    first = load_split(config(shared_data, tmp_path / "cache"), "train", 2)
    built_reads = len(image_reads)
    (entry,) = entries(tmp_path / "cache")
    assert str(shared_data / ANNOTATIONS) in full_hashes  # the build hashes it, and the files it writes
    assert any(path.endswith("/images.npy") for path in full_hashes)
    assert (entry / "images.npy").stat().st_size > cache.SAMPLE_BLOCK * cache.SAMPLE_COUNT  # so it is sampled
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_ctime_ns) for p in entry.iterdir()}
    full_hashes.clear()
    second = load_split(config(shared_data, tmp_path / "cache"), "train", 2)
    assert len(image_reads) == built_reads  # nothing decoded: the build did not run
    # neither the annotation file (its hash is remembered) nor images.npy (sampled) was read in full
    assert str(shared_data / ANNOTATIONS) not in full_hashes and str(entry / "images.npy") not in full_hashes
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_ctime_ns) for p in entry.iterdir()} == before
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


def test_changed_annotation_file_is_a_new_key_and_is_rebuilt(data, tmp_path, image_reads, full_hashes):
    cache_dir = tmp_path / "cache"
    load_split(config(data, cache_dir), "train", 2)
    load_split(config(data, cache_dir), "train", 2)
    reads = len(image_reads)
    path = data / ANNOTATIONS
    assert full_hashes.count(str(path)) == 2  # to key the build and to check it after; not to open it again
    # Move one keypoint of the first instance, keeping the file's size and mtime: only its ctime tells.
    stat, content = path.stat(), json.loads(path.read_text())
    moved = next(edit for edit in ({**content, "annotations": [
        {**content["annotations"][0], "keypoints": [content["annotations"][0]["keypoints"][0] + delta,
                                                    *content["annotations"][0]["keypoints"][1:]]},
        *content["annotations"][1:]]} for delta in (1.0, -1.0, 2.0, -2.0, 3.0, -3.0))
        if len(json.dumps(edit, separators=(",", ":"))) == stat.st_size)
    path.write_text(json.dumps(moved, separators=(",", ":")))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    changed = load_split(config(data, cache_dir), "train", 2)
    assert len(image_reads) == 2 * reads  # rebuilt in full
    assert len(entries(cache_dir)) == 2
    assert_same_split(changed, reference(data))
    x = moved["annotations"][0]["keypoints"][0]
    assert x != content["annotations"][0]["keypoints"][0]
    row = int((changed.instance_ids == moved["annotations"][0]["id"]).nonzero())
    assert changed.keypoints[row, 0, 0] * changed.crop_to_original[row, 0, 0] + changed.crop_to_original[row, 0, 2] \
        == pytest.approx(x, abs=1e-3)


def test_key_holds_the_versions_of_the_code_that_makes_the_pixels(monkeypatch):
    import PIL
    from PIL import features

    def key():
        return cache.cache_key("0" * 64, "/data/images", 256, 1)

    base = key()
    assert base == key() and base.pillow == PIL.__version__ and base.numpy == np.__version__
    assert base.torch == torch.__version__ and base.cpu_kernels == torch.backends.cpu.get_cpu_capability()
    assert features.version_codec("jpg") in base.libjpeg or features.version("libjpeg_turbo") in base.libjpeg
    version = features.version
    changes = {
        "pillow": lambda m: m.setattr(PIL, "__version__", "9.0.0"),
        "libjpeg": lambda m: m.setattr(features, "version", lambda f: "2.0.0" if f == "libjpeg_turbo" else version(f)),
        "libjpeg (IJG instead of turbo)": lambda m: m.setattr(features, "version",
                                                              lambda f: None if f == "libjpeg_turbo" else version(f)),
        "numpy": lambda m: m.setattr(np, "__version__", "1.26.0"),
        "torch": lambda m: m.setattr(torch, "__version__", "2.0.0"),
        "cpu kernels": lambda m: m.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT"),
    }
    names = {cache.entry_name("a.json", base)}
    for what, change in changes.items():
        with monkeypatch.context() as m:
            change(m)
            names.add(cache.entry_name("a.json", key()))
        assert len(names) == 2 + list(changes).index(what), f"{what} is not in the key"
    assert key() == base  # versions are read at every call, not remembered


def test_changed_library_version_builds_its_own_entry_and_the_old_one_stays_in_use(shared_data, tmp_path,
                                                                                   image_reads, monkeypatch):
    import PIL

    def open_split():
        return cache.open_or_build(tmp_path / "cache", shared_data / ANNOTATIONS, shared_data / "images", 32, 1, 2,
                                   load_dataset=lambda: load_mp100(shared_data, 1, "train"))

    _, first = open_split()
    with monkeypatch.context() as m:
        m.setattr(PIL, "__version__", "9.0.0")  # as after upgrading Pillow
        split, upgraded = open_split()
        _, again = open_split()
    assert first.built and upgraded.built and not again.built and upgraded.entry == again.entry != first.entry
    assert len(image_reads) == 2 * 70 * 6
    assert json.loads((upgraded.entry / cache.MANIFEST_FILE).read_text())["key"]["pillow"] == "9.0.0"
    _, back = open_split()  # the versions of the first build again: its entry, nothing decoded
    assert not back.built and back.entry == first.entry and len(image_reads) == 2 * 70 * 6
    assert entries(tmp_path / "cache") == sorted([first.entry, upgraded.entry])
    assert_same_split(split, reference(shared_data))


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


def _reseal(entry: Path, name: str) -> None:
    """Record the file's current times and inode in the manifest: damage the file system did not record."""
    stat = (entry / name).stat()
    _edit_manifest(entry, lambda m: m["files"][name].update(sealed=[stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]))


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


def test_damage_the_file_system_did_not_record_is_caught_where_sampled_and_by_full_verification(
        shared_data, tmp_path, image_reads, monkeypatch):
    """A byte flipped with size, times and inode as sealed (as a failing disk would): an open hashes
    only sampled blocks, so a flip between them is used; CAPE_VERIFY_CACHE=1 catches it."""
    def open_split():
        return cache.open_or_build(tmp_path / "cache", shared_data / ANNOTATIONS, shared_data / "images", 32, 1, 2,
                                   load_dataset=lambda: load_mp100(shared_data, 1, "train"))

    expected = reference(shared_data)
    image_reads.clear()
    _, built = open_split()
    images = built.entry / "images.npy"
    offsets = cache.sample_offsets(images.stat().st_size)
    between = offsets[0] + cache.SAMPLE_BLOCK  # the first byte after the first sampled block
    assert not any(o <= between < o + cache.SAMPLE_BLOCK for o in offsets)
    _flip_byte(images, between)
    _reseal(built.entry, "images.npy")
    damaged, opened = open_split()
    assert not opened.built  # the limit of a cheap open
    header = images.stat().st_size - damaged.images.numel()
    position = between - header
    assert int(damaged.images.reshape(-1)[position]) == int(expected.images.reshape(-1)[position]) ^ 0xFF
    del damaged

    monkeypatch.setenv(cache.VERIFY_ENV, "1")
    split, verified = open_split()
    assert verified.built and "SHA-256 differs" in verified.replaced, verified.replaced
    assert_same_split(split, expected)
    monkeypatch.delenv(cache.VERIFY_ENV)

    _flip_byte(images, images.stat().st_size - 1)  # the last byte, in the last sampled block
    _reseal(built.entry, "images.npy")
    split, sampled = open_split()
    assert sampled.built and "sampled blocks" in sampled.replaced, sampled.replaced
    assert_same_split(split, expected)
    assert len(image_reads) == 3 * 70 * 6


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


def test_cache_on_a_network_file_system_warns_once_naming_the_path_and_the_fix(shared_data, tmp_path, monkeypatch,
                                                                              caplog):
    home = tmp_path / "net home"  # /proc/mounts writes the space as \\040
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/vda / ext4 rw,relatime 0 0\n"
                      f"server:/export/home {str(home).replace(' ', chr(92) + '040')} nfs4 rw,relatime 0 0\n"
                      f"sshfs#me@host: {tmp_path / 'sshfs'} fuse.sshfs rw 0 0\n"
                      f"fuse-overlayfs {tmp_path / 'container'} fuse.fuse-overlayfs rw 0 0\n")
    monkeypatch.setattr(cache, "MOUNTS", str(mounts))
    monkeypatch.setattr(cache, "_warned_network", set())
    kinds = {name: cache.filesystem_type(tmp_path / name / "cache") for name in ("net home", "sshfs", "container", "x")}
    assert kinds == {"net home": "nfs4", "sshfs": "fuse.sshfs", "container": "fuse.fuse-overlayfs", "x": "ext4"}
    assert [cache.is_network_filesystem(k) for k in kinds.values()] == [True, True, False, False]

    caplog.set_level(logging.WARNING, logger="cape_ray.data")
    for _ in range(2):
        load_split(config(shared_data, home / "cache"), "train", 2)  # it works, with a warning
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(home / "cache" / cache.SUBDIRECTORY) in warning and "nfs4" in warning
    assert "--cache_dir" in warning and "local disk" in warning


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
