"""Prepared MP-100 splits cached on a node's local disk: built once, mapped read-only by every worker.

Preparing a split (decode every image, crop, resize; `transforms.prepare`) takes minutes and
gigabytes at MP-100's size. Without a cache every worker repeats it on every start and restart and
holds its own copy. Here the first process on a node that needs a split builds it, over all the
node's cores, into `CACHE_DIR/prepared/<entry>/`; every process, the builder included, then maps
the arrays read-only, so the page cache holds one copy for all the workers of the node.

Key. An entry holds exactly what `prepare` returns for: the annotation file's bytes (SHA-256), the
image root (absolute path), image_size, num_shots (it decides which categories are usable, hence the
rows) and the crop rule (`CROP_RULE_VERSION`), in this layout (`LAYOUT_VERSION`). Its directory is
`<annotation file stem>-<S>px-<shots>shot-<first 16 hex of the key's SHA-256>`. num_queries is not
in the key: it changes no array, only the notes on categories with fewer than shots + queries
instances, recomputed at open. Image files are not hashed (that would cost a read of every image at
every start): the cache assumes images under the root are not replaced in place. Clear it if they are.

Entry files:
  images.npy, keypoints.npy, visible.npy, crop_to_original.npy, bbox.npy, category.npy,
  instance_ids.npy  the tensors of the PreparedSplit (.npy: dtype and shape in the header)
  split.json        its other fields: categories with their skeletons, rows per category, skipped, source
  manifest.json     written last: layout, key, and the size and SHA-256 of every other file

Building. Builders of one entry serialise on `fcntl.flock` of `<entry>.lock` (released by the
kernel when a builder dies). The build writes into a temporary directory that is renamed into place
once complete, so an entry directory is always whole; a builder killed midway leaves only its
temporary directory, which the next builder removes. A bad image fails the build with the reader's
error (file, image and annotation record, fix) and leaves nothing behind.

Opening. Every open verifies the entry fully: the manifest's key, each file's size and SHA-256
(0.8-1.7 GB/s on one core here: 1.5-3 s for a full-size training split of 2.5 GB, less than Ray
takes to restart a worker), then maps the very files it hashed. No fsync is needed for that reason: a file left
incomplete by a crash fails the check. An entry that is half-written, damaged or stale is reported,
discarded and rebuilt; it is never used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional, Union

import numpy as np
import torch

from .dataset import Category, KeypointDataset
from .transforms import (CROP_RULE_VERSION, PreparedSplit, log_category_problems, prepare, query_shortfall_notes,
                         skeleton_adjacency)

log = logging.getLogger("cape_ray.data")

LAYOUT_VERSION = 1
ARRAY_DTYPES = {  # PreparedSplit tensor field -> dtype of its .npy file
    "images": np.dtype(np.uint8),
    "keypoints": np.dtype(np.float32),
    "visible": np.dtype(np.bool_),
    "crop_to_original": np.dtype(np.float32),
    "bbox": np.dtype(np.float32),
    "category": np.dtype(np.int64),
    "instance_ids": np.dtype(np.int64),
}
SPLIT_FILE = "split.json"
MANIFEST_FILE = "manifest.json"
ENTRY_FILES = frozenset({f"{name}.npy" for name in ARRAY_DTYPES} | {SPLIT_FILE})
SUBDIRECTORY = "prepared"
_HASH_BLOCK = 1 << 20  # larger blocks hash no faster and leave more heap behind

PathLike = Union[str, os.PathLike]


class CacheError(RuntimeError):
    """The cache cannot be used or written; the message names the path and what to do."""


class _Unusable(Exception):
    """An entry that must not be used; the message says why."""


@dataclass(frozen=True)
class CacheKey:
    """Everything the content of a prepared split depends on."""

    annotation_sha256: str
    image_root: str  # absolute, symlinks resolved
    image_size: int
    num_shots: int
    crop_rule: int = CROP_RULE_VERSION
    layout: int = LAYOUT_VERSION

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class CacheOutcome:
    """What `open_or_build` did, for messages and benchmarks."""

    entry: Path
    built: bool
    seconds: float  # building (when built) or opening, verification included
    threads: int = 0  # image threads of the build (0 when not built)
    replaced: Optional[str] = None  # why an existing entry was discarded first


def file_sha256(path_or_file: Union[PathLike, BinaryIO]) -> str:
    if not hasattr(path_or_file, "readinto"):
        with open(path_or_file, "rb") as fh:
            return file_sha256(fh)
    fh = path_or_file
    fh.seek(0)
    digest, buffer = hashlib.sha256(), bytearray(_HASH_BLOCK)
    view = memoryview(buffer)
    while True:
        count = fh.readinto(buffer)
        if not count:
            return digest.hexdigest()
        digest.update(view[:count])


def available_cores() -> int:
    """Cores this process may run on (the node's, unless an affinity mask limits it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cache_key(annotation_file: PathLike, image_root: PathLike, image_size: int, num_shots: int) -> CacheKey:
    return CacheKey(annotation_sha256=file_sha256(annotation_file), image_root=os.path.realpath(image_root),
                    image_size=int(image_size), num_shots=int(num_shots))


def entry_name(annotation_file: PathLike, key: CacheKey) -> str:
    return f"{Path(annotation_file).stem}-{key.image_size}px-{key.num_shots}shot-{key.digest()[:16]}"


def _announce(message: str) -> None:
    """One progress line on stdout (Ray streams a worker's stdout to the driver and job logs)."""
    sys.stdout.write(f"[cape-ray data cache] {message}\n")
    sys.stdout.flush()


# ----------------------------------------------------------------------------------------- opening
def _read_only_tensor(array: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():
        # The array maps the cache read-only. torch warns that it cannot mark tensors read-only;
        # nothing downstream writes into a split (collate and evaluation index_select, which copies).
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _map_npy(fh: BinaryIO, name: str, dtype: np.dtype) -> np.ndarray:
    """Map an open .npy file read-only (the same file that was just hashed)."""
    fh.seek(0)
    try:
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, stored = read_header(fh)
    except ValueError as exc:
        raise _Unusable(f"{name}: not a readable .npy file ({exc})") from None
    if stored != dtype or fortran_order:
        raise _Unusable(f"{name}: holds {stored}{' (Fortran order)' if fortran_order else ''}, expected {dtype}")
    return np.memmap(fh, dtype=dtype, mode="r", offset=fh.tell(), shape=tuple(shape))


def _category_from_json(record: dict) -> Category:
    return Category(id=int(record["id"]), name=record["name"], keypoint_names=tuple(record["keypoint_names"]),
                    skeleton=tuple((int(a), int(b)) for a, b in record["skeleton"]),
                    supercategory=record["supercategory"])


def _category_to_json(category: Category) -> dict:
    return {"id": category.id, "name": category.name, "keypoint_names": list(category.keypoint_names),
            "skeleton": [list(edge) for edge in category.skeleton], "supercategory": category.supercategory}


def _open_entry(entry: Path, key: CacheKey, num_queries: int, report_problems: bool = True) -> PreparedSplit:
    """The entry as a PreparedSplit whose tensors map its files read-only; `_Unusable` if it is not whole,
    not intact or not for this key. Logs skipped categories and notes as `prepare` does, unless told
    not to (right after a build, whose `prepare` logged them)."""
    try:
        manifest = json.loads((entry / MANIFEST_FILE).read_bytes())
    except FileNotFoundError:
        raise _Unusable("no manifest.json: its build never finished") from None
    except (ValueError, UnicodeDecodeError):
        raise _Unusable("manifest.json is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("layout") != LAYOUT_VERSION or manifest.get("key") != key.as_dict():
        raise _Unusable("stale: it was built for another key (annotation file, image root, size, shots, crop rule "
                        "or layout)")
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != ENTRY_FILES:
        raise _Unusable(f"manifest.json lists {sorted(files) if isinstance(files, dict) else files!r}, "
                        f"expected {sorted(ENTRY_FILES)}")

    arrays: dict[str, np.ndarray] = {}
    meta: dict = {}
    for name in sorted(ENTRY_FILES):
        expected = files[name]
        try:
            fh = open(entry / name, "rb")
        except FileNotFoundError:
            raise _Unusable(f"{name} is missing") from None
        with fh:
            size = os.fstat(fh.fileno()).st_size
            if size != expected.get("bytes"):
                raise _Unusable(f"{name} has {size} bytes, the manifest says {expected.get('bytes')}: truncated "
                                "or overwritten")
            if file_sha256(fh) != expected.get("sha256"):
                raise _Unusable(f"{name}: its SHA-256 differs from the manifest's: the file is damaged")
            if name == SPLIT_FILE:
                fh.seek(0)
                meta = json.loads(fh.read())
            else:
                stem = name[:-len(".npy")]
                arrays[stem] = _map_npy(fh, name, ARRAY_DTYPES[stem])  # the mapping outlives the file object

    rows = arrays["images"].shape[0]
    if (arrays["images"].shape[1:] != (3, key.image_size, key.image_size)
            or any(a.shape[0] != rows for a in arrays.values())):
        raise _Unusable(f"array shapes disagree: {({k: v.shape for k, v in arrays.items()})}")
    categories = {int(c["id"]): _category_from_json(c) for c in meta["categories"]}
    rows_by_category = {int(cid): np.asarray(r, dtype=np.int64) for cid, r in meta["rows_by_category"].items()}
    category_ids = [int(cid) for cid in meta["category_ids"]]
    skipped = {int(cid): reason for cid, reason in meta["skipped"].items()}
    notes = query_shortfall_notes(categories, {cid: len(rows_by_category[cid]) for cid in category_ids},
                                  key.num_shots, num_queries)
    if report_problems:
        log_category_problems(meta["source"], skipped, notes)
    return PreparedSplit(
        **{name: _read_only_tensor(array) for name, array in arrays.items()},
        rows_by_category=rows_by_category,
        categories=categories,
        category_ids=category_ids,
        skipped=skipped,
        image_size=key.image_size,
        num_shots=key.num_shots,
        num_queries=num_queries,
        adjacency={cid: skeleton_adjacency(categories[cid]) for cid in category_ids},
        notes=notes,
        source=meta["source"],
    )


# ----------------------------------------------------------------------------------------- building
@contextlib.contextmanager
def _exclusive(lock_path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive flock on lock_path; the kernel drops it if this process dies."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _announce(f"waiting for another process that is preparing {what} (lock {lock_path})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove_tree(path: Path) -> None:
    """Move a directory out of the way (atomically), then delete it."""
    doomed = path.with_name(f".{path.name}.discarded-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.rename(path, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def _reserve(path: Path, shape: tuple[int, ...]) -> np.memmap:
    """A zeroed .npy file with its blocks allocated up front: a full disk fails here with an error,
    not later with SIGBUS while writing through the mapping."""
    needed = int(np.prod(shape))
    free = shutil.disk_usage(path.parent).free
    if free < needed:
        raise CacheError(f"{path.parent}: {free / 1e9:.2f} GB free, but the prepared split needs "
                         f"{needed / 1e9:.2f} GB. Free space there, point --cache_dir at a larger local disk, "
                         "or pass --cache_dir '' to prepare splits in memory without a cache.")
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    with open(path, "r+b") as fh:
        try:
            os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise CacheError(f"{path.parent}: no space left for the prepared split ({needed / 1e9:.2f} GB). "
                                 "Free space there, point --cache_dir elsewhere, or pass --cache_dir ''.") from None
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without it: go on
                raise
    return array


def _build(root: Path, name: str, key: CacheKey, annotation_file: Path, num_queries: int,
           load_dataset: Callable[[], KeypointDataset], threads: int) -> None:
    """Prepare the split into a temporary directory and rename it to root/name (call under the lock)."""
    for leftover in root.glob(f".{name}.building-*"):  # from builders that died: the lock is ours now
        shutil.rmtree(leftover, ignore_errors=True)
    staging = root / f".{name}.building-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        dataset = load_dataset()
        images: list[np.memmap] = []

        def allocate(shape: tuple[int, ...]) -> torch.Tensor:
            images.append(_reserve(staging / "images.npy", shape))
            return torch.from_numpy(images[0])

        split = prepare(dataset, key.image_size, key.num_shots, num_queries, threads=threads,
                        allocate_images=allocate)
        for field in ARRAY_DTYPES:
            if field != "images":
                np.save(staging / f"{field}.npy", getattr(split, field).numpy())
        images[0].flush()
        meta = {"source": split.source,
                "categories": [_category_to_json(c) for c in split.categories.values()],
                "category_ids": split.category_ids,
                "rows_by_category": {str(cid): rows.tolist() for cid, rows in split.rows_by_category.items()},
                "skipped": {str(cid): reason for cid, reason in split.skipped.items()}}
        (staging / SPLIT_FILE).write_text(json.dumps(meta), encoding="utf-8")
        rows = len(split)
        del split, images  # drop the writable mapping: from now on the entry is only read
        if file_sha256(annotation_file) != key.annotation_sha256:
            raise CacheError(f"{annotation_file} changed while its split was being prepared; nothing was cached. "
                             "Run again once the file is final.")
        files = {}
        for path in sorted(staging.iterdir()):
            files[path.name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
            path.chmod(0o444)  # guards against writes through other tools; deleting still works
        manifest = {"layout": LAYOUT_VERSION, "key": key.as_dict(), "annotation_file": str(annotation_file),
                    "rows": rows, "files": files,
                    "built": {"host": socket.gethostname(), "pid": os.getpid(), "threads": threads,
                              "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}}
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1), encoding="utf-8")  # last: complete
        try:
            os.rename(staging, root / name)
        except OSError as exc:
            # Only possible when the lock file was deleted under a running build, letting a second
            # builder in: keep the entry already in place, which the caller verifies.
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def open_or_build(cache_dir: PathLike, annotation_file: PathLike, image_root: PathLike, image_size: int,
                  num_shots: int, num_queries: int, load_dataset: Callable[[], KeypointDataset],
                  threads: Optional[int] = None) -> tuple[PreparedSplit, CacheOutcome]:
    """The prepared split of `annotation_file`, from the cache under cache_dir, built first if needed.

    `load_dataset()` reads the annotations (only called to build). `threads` defaults to every core
    this process may use: the other workers of the node wait for the split anyway.
    """
    started = time.perf_counter()
    annotation_file = Path(annotation_file)
    root = Path(cache_dir) / SUBDIRECTORY
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheError(f"cannot create the prepared-split cache {root} ({exc.strerror}). Pass --cache_dir with "
                         "a writable local directory, or --cache_dir '' to prepare splits in memory.") from None
    key = cache_key(annotation_file, image_root, image_size, num_shots)
    name = entry_name(annotation_file, key)
    entry = root / name
    if entry.is_dir():
        with contextlib.suppress(_Unusable):  # a bad entry is dealt with under the lock
            split = _open_entry(entry, key, num_queries)
            return split, CacheOutcome(entry, built=False, seconds=time.perf_counter() - started)

    with _exclusive(root / f"{name}.lock", f"{annotation_file.name} at {image_size} px"):
        replaced = None
        if entry.is_dir():  # built while we waited, or bad
            try:
                split = _open_entry(entry, key, num_queries)
                return split, CacheOutcome(entry, built=False, seconds=time.perf_counter() - started)
            except _Unusable as problem:
                replaced = str(problem)
                log.warning("prepared-split cache %s is unusable (%s); discarding and rebuilding it", entry, problem)
                _remove_tree(entry)
        threads = available_cores() if threads is None else max(1, int(threads))
        _announce(f"preparing {annotation_file} at {image_size} px with {threads} thread(s) into {entry}")
        build_started = time.perf_counter()
        _build(root, name, key, annotation_file, num_queries, load_dataset, threads)
        try:
            split = _open_entry(entry, key, num_queries, report_problems=False)
        except _Unusable as problem:
            raise CacheError(f"the prepared split just written to {entry} does not verify ({problem}); the disk "
                             f"may be failing. Delete {entry} and run again, or pass --cache_dir ''.") from None
        seconds = time.perf_counter() - build_started
        _announce(f"prepared {len(split)} instances in {seconds:.1f} s "
                  f"({split.images.numel() / 1e9:.2f} GB of images) -> {entry}")
        return split, CacheOutcome(entry, built=True, seconds=seconds, threads=threads, replaced=replaced)
