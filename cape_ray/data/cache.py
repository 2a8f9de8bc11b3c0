"""Prepared MP-100 splits cached on a node's local disk: built once, mapped read-only by every worker.

Preparing a split (decode every image, crop, resize; `transforms.prepare`) takes minutes and
gigabytes at MP-100's size. Without a cache every worker repeats it on every start and restart and
holds its own copy. Here the first process on a node that needs a split builds it, over all the
node's cores, into `CACHE_DIR/prepared/<entry>/`; every process, the builder included, then maps
the arrays read-only, so the page cache holds one copy for all the workers of the node. The cache
belongs on a local disk: a cache directory on NFS, CIFS or FUSE is used, with one warning
(docs/data.md says why).

Key. An entry holds exactly what `prepare` returns for: the annotation file's bytes (SHA-256), the
image root (absolute path), image_size, num_shots (it decides which categories are usable, hence the
rows), the crop rule (`CROP_RULE_VERSION`) and the code that turns files into pixels: the versions of
Pillow (decoding, colour conversion), of the libjpeg it uses, of numpy and torch (crop and resize)
and torch's CPU kernel set (AVX2, AVX512: its float code paths differ), in this layout
(`LAYOUT_VERSION`). Its directory is `<annotation file stem>-<S>px-<shots>shot-<first 16 hex of the
key's SHA-256>`. num_queries is not in the key: it changes no array, only the notes on categories
with fewer than shots + queries instances, recomputed at open. Image files are not hashed (that
would cost a read of every image at every start): the cache assumes images under the root are not
replaced in place. Clear it if they are.

The annotation file's SHA-256 is remembered in `<stem>.<16 hex of its path>.annotation.json` next to
the entries, against the file's size, mtime, ctime and inode: it is hashed again only when one of
them changed (and not remembered while the file is younger than SETTLED_NS, since a write within
one timestamp tick after the hash would leave all four unchanged).

Entry files:
  images.npy, keypoints.npy, visible.npy, crop_to_original.npy, bbox.npy, category.npy,
  instance_ids.npy  the tensors of the PreparedSplit (.npy: dtype and shape in the header)
  split.json        its other fields: categories with their skeletons, rows per category, skipped, source
  manifest.json     written last: layout, key, and for every other file its size, SHA-256, the SHA-256
                    of sampled blocks, and its mtime, ctime and inode once sealed

Building. Builders of one entry serialise on `fcntl.flock` of `<entry>.lock` (released by the
kernel when a builder dies). The build writes into a temporary directory that is renamed into place
once complete and flushed to disk (fsync of every file, then of the manifest, then of both
directories), so an entry directory is always whole, also after a power cut; a builder killed
midway leaves only its temporary directory, which the next builder removes. A bad image fails the
build with the reader's error (file, image and annotation record, fix) and leaves nothing behind.

Opening costs milliseconds whatever the split's size. It checks the manifest's key, then per file:
its size (truncation), and either, when its mtime, ctime and inode are those sealed in the
manifest, the SHA-256 of SAMPLE_COUNT blocks spread over it, first and last included (the whole
file when small), or, when any of them changed (the file was written, touched or copied since), the
SHA-256 of the whole file. A write through the file system changes the ctime, so it is caught;
damage that bypasses it (a bit flipped by the disk itself in a block the sample misses) is not:
`CAPE_VERIFY_CACHE=1` in the environment makes every open hash every file in full, the annotation
file included. An entry that is half-written, damaged or stale is reported, discarded and rebuilt;
it is never used.
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
import re
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

LAYOUT_VERSION = 2  # 2: manifests hold sampled hashes and sealed file times
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
SAMPLE_BLOCK, SAMPLE_COUNT = 1 << 16, 16  # what an open hashes of a file: 1 MiB, however large the file
SETTLED_NS = 2_000_000_000  # an annotation file changed more recently than this is hashed at every open
VERIFY_ENV = "CAPE_VERIFY_CACHE"  # set to 1: every open hashes every file in full
MOUNTS = "/proc/mounts"
# File systems whose flock, memory maps and reads make a poor home for the cache (docs/data.md).
NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "lustre",
                                 "gpfs", "beegfs", "ocfs2", "gfs2", "davfs", "fuse"})
LOCAL_FUSE = frozenset({"fuse-overlayfs"})  # a container's own root, on the node's disk

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
    pillow: str  # the rest: `software_versions()`
    libjpeg: str
    numpy: str
    torch: str
    cpu_kernels: str
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


def full_verification() -> bool:
    """Whether opens hash every file in full (`CAPE_VERIFY_CACHE=1`) instead of sampling."""
    return os.environ.get(VERIFY_ENV, "") not in ("", "0")


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


def sample_offsets(size: int) -> list[int]:
    """Where the SAMPLE_COUNT blocks of a file of `size` bytes start: evenly spread, first and last included."""
    last = size - SAMPLE_BLOCK
    return [i * last // (SAMPLE_COUNT - 1) for i in range(SAMPLE_COUNT)]


def sampled_sha256(fh: BinaryIO, size: int) -> str:
    """SHA-256 of the sampled blocks of an open file of `size` bytes (of the whole file when it is small)."""
    if size <= SAMPLE_BLOCK * SAMPLE_COUNT:
        return file_sha256(fh)
    digest = hashlib.sha256()
    for offset in sample_offsets(size):
        digest.update(os.pread(fh.fileno(), SAMPLE_BLOCK, offset))
    return digest.hexdigest()


def _sealed_stat(stat: os.stat_result) -> list[int]:
    """What a write, a touch or a copy changes however it is done: ctime cannot be set back."""
    return [stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def software_versions() -> dict[str, str]:
    """Versions of the code between an image file and a prepared split's bytes (the key's last parts)."""
    import PIL
    from PIL import features

    turbo = features.version("libjpeg_turbo")
    return {"pillow": PIL.__version__,
            "libjpeg": f"libjpeg-turbo {turbo}" if turbo else f"libjpeg {features.version_codec('jpg')}",
            "numpy": np.__version__, "torch": str(torch.__version__),
            "cpu_kernels": torch.backends.cpu.get_cpu_capability()}


def cache_key(annotation_sha256: str, image_root: PathLike, image_size: int, num_shots: int) -> CacheKey:
    return CacheKey(annotation_sha256=annotation_sha256, image_root=os.path.realpath(image_root),
                    image_size=int(image_size), num_shots=int(num_shots), **software_versions())


def annotation_sha256(root: Path, annotation_file: Path, remembered: bool = True) -> tuple[str, bool]:
    """(SHA-256 of the annotation file, whether it came from the record of an earlier hash).

    The record is used when the file's size, mtime, ctime and inode are as they were when it was
    hashed; otherwise (or with remembered=False) the file is hashed and the record rewritten.
    """
    real = os.path.realpath(annotation_file)
    record = root / f"{annotation_file.stem}.{hashlib.sha256(real.encode()).hexdigest()[:16]}.annotation.json"
    with open(annotation_file, "rb") as fh:
        before = os.fstat(fh.fileno())
        fingerprint = [before.st_size, *_sealed_stat(before)]
        if remembered:
            with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
                known = json.loads(record.read_bytes())
                if known.get("path") == real and known.get("stat") == fingerprint:
                    return str(known["sha256"]), True
        digest = file_sha256(fh)
        after = os.fstat(fh.fileno())
    changed = [after.st_size, *_sealed_stat(after)] != fingerprint
    settled = time.time_ns() - max(after.st_mtime_ns, after.st_ctime_ns) > SETTLED_NS
    if not changed and settled:
        temporary = record.with_name(f".{record.name}.{os.getpid()}-{secrets.token_hex(4)}")
        with contextlib.suppress(OSError):  # no record: the next open hashes again
            temporary.write_text(json.dumps({"path": real, "stat": fingerprint, "sha256": digest}))
            os.replace(temporary, record)
        with contextlib.suppress(OSError):
            temporary.unlink()
    return digest, False


def entry_name(annotation_file: PathLike, key: CacheKey) -> str:
    return f"{Path(annotation_file).stem}-{key.image_size}px-{key.num_shots}shot-{key.digest()[:16]}"


def _unescape_mount_path(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)  # /proc/mounts writes " " as \040


def filesystem_type(path: PathLike) -> Optional[str]:
    """The type of the file system that holds path (longest mount point above it in MOUNTS), or None."""
    real = os.path.realpath(path)
    try:
        lines = Path(MOUNTS).read_text().splitlines()
    except OSError:  # not Linux
        return None
    best, kind = -1, None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = _unescape_mount_path(fields[1])
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= best:  # a later mount on the same point hides the earlier one
            best, kind = len(point), fields[2]
    return kind


def is_network_filesystem(kind: Optional[str]) -> bool:
    if kind is None:
        return False
    base, _, subtype = kind.partition(".")
    return base in NETWORK_FILESYSTEMS and subtype not in LOCAL_FUSE


_warned_network: set[str] = set()


def _warn_if_network(root: Path) -> None:
    """One warning per process and directory when the cache is on a network or FUSE file system."""
    if str(root) in _warned_network:
        return
    _warned_network.add(str(root))
    kind = filesystem_type(root)
    if is_network_filesystem(kind):
        log.warning("prepared-split cache %s is on a %s file system: its locks may not hold across nodes, its "
                    "memory maps fail with SIGBUS if the server goes away, and every open reads over the "
                    "network. Pass --cache_dir with a directory on a local disk of each node (docs/data.md).",
                    root, kind)


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


def _open_entry(entry: Path, key: CacheKey, num_queries: int, report_problems: bool = True,
                full: bool = False) -> PreparedSplit:
    """The entry as a PreparedSplit whose tensors map its files read-only; `_Unusable` if it is not whole,
    not intact or not for this key (checked as the module's docstring says; `full`: every file hashed
    in full). Logs skipped categories and notes as `prepare` does, unless told not to (right after a
    build, whose `prepare` logged them)."""
    try:
        manifest = json.loads((entry / MANIFEST_FILE).read_bytes())
    except FileNotFoundError:
        raise _Unusable("no manifest.json: its build never finished") from None
    except (ValueError, UnicodeDecodeError):
        raise _Unusable("manifest.json is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("layout") != LAYOUT_VERSION or manifest.get("key") != key.as_dict():
        raise _Unusable("stale: it was built for another key (annotation file, image root, size, shots, crop rule, "
                        "library versions or layout)")
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != ENTRY_FILES:
        raise _Unusable(f"manifest.json lists {sorted(files) if isinstance(files, dict) else files!r}, "
                        f"expected {sorted(ENTRY_FILES)}")

    arrays: dict[str, np.ndarray] = {}
    meta: dict = {}
    hashed_in_full = []
    for name in sorted(ENTRY_FILES):
        expected = files[name]
        try:
            fh = open(entry / name, "rb")
        except FileNotFoundError:
            raise _Unusable(f"{name} is missing") from None
        with fh:
            stat = os.fstat(fh.fileno())
            if stat.st_size != expected.get("bytes"):
                raise _Unusable(f"{name} has {stat.st_size} bytes, the manifest says {expected.get('bytes')}: "
                                "truncated or overwritten")
            if full or _sealed_stat(stat) != expected.get("sealed"):  # written, touched or copied since
                hashed_in_full.append(name)
                if file_sha256(fh) != expected.get("sha256"):
                    raise _Unusable(f"{name}: its SHA-256 differs from the manifest's: the file is damaged")
            elif sampled_sha256(fh, stat.st_size) != expected.get("sampled_sha256"):
                raise _Unusable(f"{name}: the SHA-256 of its sampled blocks differs from the manifest's: the file "
                                "is damaged")
            if name == SPLIT_FILE:
                fh.seek(0)
                meta = json.loads(fh.read())
            else:
                stem = name[:-len(".npy")]
                arrays[stem] = _map_npy(fh, name, ARRAY_DTYPES[stem])  # the mapping outlives the file object

    if hashed_in_full and not full:
        log.info("prepared-split cache %s: %s changed on disk since the build (mtime, ctime or inode) and are hashed "
                 "in full at every open; delete the entry to have it rebuilt and opened cheaply", entry,
                 ", ".join(hashed_in_full))
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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EROFS):  # a file system without it: nothing to flush
            raise
    finally:
        os.close(fd)


def _seal(staging: Path, key: CacheKey, annotation_file: Path, rows: int, threads: int) -> None:
    """Make the staged files read-only and durable, then write the manifest that names them (last)."""
    files = {}
    for path in sorted(staging.iterdir()):
        path.chmod(0o444)  # guards against writes through other tools; deleting still works
        _fsync(path)  # on disk before the manifest that vouches for it
        with open(path, "rb") as fh:
            stat = os.fstat(fh.fileno())
            files[path.name] = {"bytes": stat.st_size, "sha256": file_sha256(fh),
                                "sampled_sha256": sampled_sha256(fh, stat.st_size), "sealed": _sealed_stat(stat)}
    manifest = {"layout": LAYOUT_VERSION, "key": key.as_dict(), "annotation_file": str(annotation_file),
                "rows": rows, "files": files,
                "built": {"host": socket.gethostname(), "pid": os.getpid(), "threads": threads,
                          "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}}
    (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    _fsync(staging / MANIFEST_FILE)
    _fsync(staging)


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
        _seal(staging, key, annotation_file, rows, threads)
        try:
            os.rename(staging, root / name)
            _fsync(root)
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
    full = full_verification()
    annotation_file = Path(annotation_file)
    root = Path(cache_dir) / SUBDIRECTORY
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheError(f"cannot create the prepared-split cache {root} ({exc.strerror}). Pass --cache_dir with "
                         "a writable local directory, or --cache_dir '' to prepare splits in memory.") from None
    _warn_if_network(root)
    digest, remembered = annotation_sha256(root, annotation_file, remembered=not full)
    while True:
        key = cache_key(digest, image_root, image_size, num_shots)
        name = entry_name(annotation_file, key)
        entry = root / name
        if entry.is_dir():
            with contextlib.suppress(_Unusable):  # a bad entry is dealt with under the lock
                split = _open_entry(entry, key, num_queries, full=full)
                return split, CacheOutcome(entry, built=False, seconds=time.perf_counter() - started)
        if not remembered:
            break
        # A miss with a remembered hash: hash the file before building, so that a record gone stale
        # (the file rewritten with its size, times and inode unchanged) cannot name the entry.
        fresh, remembered = annotation_sha256(root, annotation_file, remembered=False)
        if fresh == digest:
            break
        digest = fresh

    with _exclusive(root / f"{name}.lock", f"{annotation_file.name} at {image_size} px"):
        replaced = None
        if entry.is_dir():  # built while we waited, or bad
            try:
                split = _open_entry(entry, key, num_queries, full=full)
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
