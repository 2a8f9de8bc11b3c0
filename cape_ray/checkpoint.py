"""The checkpoint contract: names, files, manifest, verification, loading.

A checkpoint is a directory:
    model.pt  optimizer.pt  scheduler.pt   tensors and primitives only (torch.save of state_dicts)
    state.json                             schema version, config, position, tracking, history, ...;
                                           the original pipeline's epoch, best_val_loss, best_pck and
                                           epochs_without_improvement at its top level
    rng/rank_00000.pt ...                  one per rank: rng_state, cuda_rng_state, np_rng_state,
                                           py_rng_state and its running train-loss sum of the epoch
    manifest.json                          size + SHA-256 of every other file, written LAST (and,
                                           on a durable write, after every file and directory
                                           reached the disk)

A checkpoint is valid only if its manifest verifies: it lists every file of the directory, each a
relative path inside it, with its size and SHA-256. Every load uses `weights_only=True`.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import io
import json
import os
import re
import shutil
import stat
import sys
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import torch

from cape_ray.config import TrainConfig
from cape_ray.tracking import export_kind

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
MANIFEST_TMP = MANIFEST + ".tmp"  # the manifest while it is written (renamed when whole)
STATE = "state.json"
TENSOR_FILES = ("model.pt", "optimizer.pt", "scheduler.pt")
DISK_MARGIN_BYTES = 1 << 20  # room for state.json, manifest and filesystem overhead


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: corrupt, incomplete or incompatible."""


class DiskSpaceError(OSError):
    """Not enough free space to write a checkpoint; nothing was deleted."""


class StorageError(RuntimeError):
    """A checkpoint cannot be stored: no space, no permission, over a quota. Retrying would fail the
    same way, so the run stops (with the message) instead of spending restarts; a rerun after the
    cause is fixed resumes from the last stored checkpoint."""


# ----------------------------------------------------------------------------- names
def format_lr(lr: float) -> str:
    """1e-4 -> '1e-4', 2.5e-4 -> '2.5e-4', 1.25e-4 -> '1.25e-4' (the original pipeline's spelling;
    up to 6 significant digits, so two learning rates that differ get different names)."""
    mantissa, exponent = f"{lr:.5e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def checkpoint_name(config: TrainConfig, epoch: int, step_in_epoch: Optional[int] = None) -> str:
    """`checkpoint_e001_lr1e-4_bs2_acc4_qpe2` at epoch end, `..._s000500` mid-epoch (1-based epoch)."""
    name = (f"checkpoint_e{epoch:03d}_lr{format_lr(config.lr)}_bs{config.batch_size}"
            f"_acc{config.accumulation_steps}_qpe{config.num_queries_per_episode}")
    if step_in_epoch is not None:
        name += f"_s{step_in_epoch:06d}"
    return name


def best_export_name(metric: str, epoch: int, metrics: dict[str, float]) -> str:
    """Export name of the best checkpoint by `metric` (1-based epoch; raw values of that epoch):
    checkpoint_best_pck_e089_pck0.8123_valloss0.1234, checkpoint_best_loss_e042_valloss0.0987_pck0.7654,
    and for any other metric checkpoint_best_mpck_e050_mpck0.7012_pck0.8123_valloss0.1234."""
    pck, loss = f"pck{float(metrics['val_pck']):.4f}", f"valloss{float(metrics['val_loss']):.4f}"
    if metric == "val_pck":
        return f"checkpoint_best_pck_e{epoch:03d}_{pck}_{loss}"
    if metric == "val_loss":
        return f"checkpoint_best_loss_e{epoch:03d}_{loss}_{pck}"
    kind = export_kind(metric)
    return f"checkpoint_best_{kind}_e{epoch:03d}_{kind}{float(metrics[metric]):.4f}_{pck}_{loss}"


def is_export_of(name: str, metric: str) -> bool:
    """Whether directory `name` is a best export for `metric` (exact: 'pck' never matches 'pck_x')."""
    return re.match(rf"^checkpoint_best_{re.escape(export_kind(metric))}_e\d+_", name) is not None


# `_redo` marks a position redone after falling back from a damaged checkpoint of the same name.
_POSITION = re.compile(r"^checkpoint_e(\d+)_.*?(?:_s(\d+))?(?:_redo)*$")


def position_from_name(name: str) -> Optional[tuple[int, int]]:
    """(epoch, step) of a regular checkpoint name; epoch-end sorts after its mid-epoch steps."""
    if name.startswith("checkpoint_best_"):
        return None
    match = _POSITION.match(name)
    if not match:
        return None
    step = int(match.group(2)) if match.group(2) is not None else sys.maxsize
    return int(match.group(1)), step


# ----------------------------------------------------------------------------- writing
_SMALL_CHUNK_BYTES = 1 << 16  # smaller chunks are gathered and handed on together


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside a nested state_dict (dicts, lists, tuples)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


class _TensorMemory:
    """Where the CPU tensors being saved lie in memory. torch.save hands a tensor's bytes to the file
    as a view of the tensor itself, and nothing changes the state while it is written, so such a
    chunk may be hashed and written after `write` has returned; any other chunk (headers, records
    built on the fly) may be reused by torch.save at once and is copied first. A chunk is judged by
    its address, so a torch.save that copied tensors would only make the writer copy too."""

    def __init__(self, obj: Any):
        storages = (tensor.untyped_storage() for tensor in _tensors(obj) if tensor.device.type == "cpu")
        spans = sorted({(storage.data_ptr(), storage.nbytes()) for storage in storages})
        self.starts = [start for start, _ in spans]
        self.ends = [start + size for start, size in spans]

    def holds(self, chunk: memoryview) -> bool:
        try:
            address = np.frombuffer(chunk, dtype=np.uint8).ctypes.data
        except (ValueError, TypeError):  # not one contiguous block
            return False
        index = bisect.bisect_right(self.starts, address) - 1
        return index >= 0 and address + chunk.nbytes <= self.ends[index]


class _HashingFile:
    """A file being written that hashes its bytes on the way (no second read to build the manifest).

    One thread hashes the chunks and another writes them, each in order, while torch.save goes on
    serialising: the three overlap (hashing and writing release the GIL). `close` waits for both.
    """

    def __init__(self, path: Path, tensors: _TensorMemory):
        self.file = open(path, "wb")
        self.tensors = tensors
        self.digest = hashlib.sha256()
        self.size = 0
        self.small = bytearray()
        self.hasher = ThreadPoolExecutor(1, thread_name_prefix="cape_ray_hash")
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="cape_ray_write")
        self.pending: deque[Future] = deque()
        # the first chunk that failed to hash or write: the rest is passed over (torch.save ends
        # its archive regardless) and `close` raises it
        self.failed: Optional[BaseException] = None

    def write(self, data) -> int:
        chunk = memoryview(data)
        size = chunk.nbytes
        self.size += size
        if self.failed is not None:
            return size
        if size < _SMALL_CHUNK_BYTES:
            self.small += chunk
            if len(self.small) >= _SMALL_CHUNK_BYTES:
                self._hand_on_small()
            return size
        self._hand_on_small()
        self._hand_on(chunk if isinstance(data, bytes) or self.tensors.holds(chunk) else bytes(chunk))
        while self.pending and self.pending[0].done() and self.failed is None:
            self.failed = self.pending.popleft().exception()
        return size

    def _hand_on_small(self) -> None:
        if self.small:
            self._hand_on(bytes(self.small))
            self.small.clear()

    def _hand_on(self, chunk) -> None:
        self.pending.append(self.hasher.submit(self.digest.update, chunk))
        self.pending.append(self.writer.submit(self.file.write, chunk))

    def _drain(self) -> None:
        if self.failed is None:
            self._hand_on_small()
        while self.pending and self.failed is None:
            self.failed = self.pending.popleft().exception()
        for future in self.pending:
            future.cancel()
        self.hasher.shutdown(wait=True)  # nothing may touch the file or the state after this
        self.writer.shutdown(wait=True)
        if self.failed is not None:
            raise self.failed

    def flush(self) -> None:
        pass  # the file is flushed once at close, after every chunk

    def close(self, durable: bool) -> dict:
        """Wait for every chunk, close (fsynced first when `durable`) and return the file's manifest entry."""
        with self.file:
            self._drain()
            self.file.flush()
            if durable:
                os.fsync(self.file.fileno())
        return {"size": self.size, "sha256": self.digest.hexdigest()}

    def abort(self) -> None:
        with self.file:
            try:
                self._drain()
            except Exception:
                pass  # the error that stopped the write is the one raised


def _write_file(path: Path, content: Any, tensors: _TensorMemory, durable: bool) -> dict:
    """Write `content` (bytes as they are, anything else with torch.save) to `path`; its manifest entry."""
    out = _HashingFile(path, tensors)
    try:
        if isinstance(content, bytes):
            out.write(content)
        else:
            torch.save(content, out)
    except BaseException:
        out.abort()
        raise
    return out.close(durable)


def fsync_directory(path: str | os.PathLike) -> None:
    """Make the entries of directory `path` (files created or renamed in it) durable.

    A filesystem that cannot sync a directory (EINVAL and the like, seen on some FUSE mounts) is
    left as it is: its files were synced, and there is nothing more to ask of it.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.ENOSYS, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_manifest(directory: str | os.PathLike, files: dict[str, dict], durable: bool = True) -> None:
    """Write `directory`'s manifest: the last file of a checkpoint, after every file it lists.

    Written under a temporary name and renamed, so that manifest.json is whole or absent. With
    `durable`, the caller has synced every listed file and directory already; the manifest is synced
    before its rename, and the directory after it.
    """
    directory = Path(directory)
    manifest = {"schema_version": SCHEMA_VERSION, "files": dict(sorted(files.items()))}
    tmp = directory / MANIFEST_TMP
    with open(tmp, "w") as f:
        f.write(json.dumps(manifest, indent=1, sort_keys=True))
        f.flush()
        if durable:
            os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST)
    if durable:
        fsync_directory(directory)


def tensor_bytes(obj: Any) -> int:
    """Bytes of all tensors inside a nested state_dict (the bulk of a checkpoint)."""
    return sum(tensor.numel() * tensor.element_size() for tensor in _tensors(obj))


def serialize(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def check_free_space(directory: Path, needed: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise DiskSpaceError(
            f"not enough disk space to write a checkpoint in {directory}: "
            f"needs {needed} bytes, {free} bytes free. Free space there (or set TMPDIR to a "
            f"larger disk); no checkpoint was deleted.")


def write_checkpoint(directory: str | os.PathLike, *, model: dict, optimizer: dict, scheduler: dict,
                     state: dict, rank_states: dict[int, bytes], durable: bool = True) -> Path:
    """Write a complete checkpoint into `directory` (new or empty; created) and return it.

    `rank_states` holds each rank's serialized own state: its RNG (rng.capture) and anything else
    that differs per rank (the running train loss of the epoch). `state` is TrainState.state_dict().
    Each file is hashed as it is written. The manifest is written last: a crash part-way leaves a
    directory that never verifies. `durable` (the default) fsyncs every file and directory before
    the manifest, and the manifest after, so that no power loss leaves a manifest whose files did
    not reach the disk; a staging directory that is copied elsewhere and deleted can do without.
    """
    directory = Path(directory)
    if directory.is_dir() and any(directory.iterdir()):
        raise CheckpointError(f"cannot write a checkpoint into {directory}: it is not empty (a checkpoint lists "
                              f"every file of its directory). Remove it, or write into a new directory.")
    needed = (tensor_bytes(model) + tensor_bytes(optimizer) + tensor_bytes(scheduler)
              + sum(len(b) for b in rank_states.values()) + DISK_MARGIN_BYTES)
    check_free_space(directory, needed)
    (directory / "rng").mkdir()

    contents: dict[str, Any] = dict(zip(TENSOR_FILES, (model, optimizer, scheduler)))
    contents.update((rank_file(rank), bytes(blob)) for rank, blob in sorted(rank_states.items()))
    full_state = {"schema_version": SCHEMA_VERSION, **state}
    contents[STATE] = json.dumps(full_state, indent=1, sort_keys=True).encode()
    # The tensor files are written side by side: SHA-256 is the bulk of the cost, and one file's
    # hash cannot be spread over cores.
    tensors = _TensorMemory((model, optimizer, scheduler))
    with ThreadPoolExecutor(len(TENSOR_FILES)) as file_pool:
        pending = {name: file_pool.submit(_write_file, directory / name, content, tensors, durable)
                   for name, content in contents.items()}
        files = {name: entry.result() for name, entry in pending.items()}
    if durable:
        fsync_directory(directory / "rng")
        fsync_directory(directory)
    write_manifest(directory, files, durable)
    if durable:
        fsync_directory(directory.resolve().parent)  # the checkpoint's own entry
    return directory


# ----------------------------------------------------------------------------- verifying
def rank_file(rank: int) -> str:
    return f"rng/rank_{rank:05d}.pt"


_RANK_FILE = re.compile(r"^rng/rank_(\d+)\.pt$")


def rank_files(names: Iterable[str]) -> dict[int, str]:
    """rank -> file, for the names among `names` that are rank files as `rank_file` spells them."""
    ranks = {}
    for name in names:
        match = _RANK_FILE.match(name)
        if match and name == rank_file(int(match.group(1))):
            ranks[int(match.group(1))] = name
    return ranks


def _unusable_name(name: Any) -> Optional[str]:
    """Why `name` cannot be a file of a checkpoint (a relative path inside it), or None."""
    if not isinstance(name, str) or not name:
        return "an empty name"
    if "\\" in name or "\x00" in name:
        return "a backslash or NUL in it"
    if name.startswith("/"):
        return "an absolute path"
    parts = name.split("/")
    if ".." in parts:
        return "a '..' part"
    if "." in parts or "" in parts:
        return "an empty or '.' part"
    if name in (MANIFEST, MANIFEST_TMP):
        return "the manifest itself"
    return None


def _valid_entry(entry: Any) -> bool:
    return (isinstance(entry, dict) and type(entry.get("size")) is int and entry["size"] >= 0
            and isinstance(entry.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]) is not None)


def parse_manifest(text: str | bytes, manifest_path: str) -> tuple[Optional[dict[str, dict]], list[str]]:
    """(the entries that are safe to use, problems) of a manifest's text; (None, problems) when it
    cannot be read at all. Every entry must be a relative path inside the checkpoint."""
    try:
        files = json.loads(text)["files"]
        if not isinstance(files, dict):
            raise TypeError(f"'files' is a {type(files).__name__}, not a mapping")
    except (ValueError, KeyError, TypeError) as exc:
        return None, [f"{manifest_path} is unreadable: {exc!r}"]
    usable, problems = {}, []
    for name, entry in files.items():
        reason = _unusable_name(name)
        if reason:
            problems.append(f"{manifest_path} lists {name!r}, which is not a relative path inside the checkpoint "
                            f"({reason}): the manifest was altered, use another checkpoint")
        elif not _valid_entry(entry):
            problems.append(f"{manifest_path} gives no valid size and SHA-256 for {name!r}: the manifest was altered, "
                            f"use another checkpoint")
        else:
            usable[name] = entry
    for required in (*TENSOR_FILES, STATE):
        if required not in files:
            problems.append(f"{manifest_path} does not list {required}")
    if not rank_files(files):
        problems.append(f"{manifest_path} lists no rng/rank_NNNNN.pt file")
    return usable, problems


def listing_problems(files: dict[str, dict], present: dict[str, Optional[int]], where: str,
                     manifest_path: str) -> list[str]:
    """Every listed file present with its listed size, and nothing unlisted. `present` maps each
    entry found in the checkpoint directory `where` (relative name) to its size, None where it is
    not a regular file (a link, a device)."""
    problems = []
    for name, expected in sorted(files.items()):
        path = f"{where}/{name}"
        if name not in present:
            problems.append(f"{path} is missing")
        elif present[name] is None:
            problems.append(f"{path} is not a regular file (a link?); the manifest lists a file there")
        elif present[name] != expected["size"]:
            problems.append(f"{path} has {present[name]} bytes, manifest says {expected['size']} (truncated?)")
    for name in sorted(set(present) - set(files) - {MANIFEST, MANIFEST_TMP}):
        # .nfsXXXX: what NFS leaves of a file deleted while open; never read
        if not name.rsplit("/", 1)[-1].startswith(".nfs"):
            problems.append(f"{where}/{name} is not listed in {manifest_path} (not written with this checkpoint): "
                            f"remove it, or use another checkpoint")
    return problems


def _local_entries(directory: Path) -> dict[str, Optional[int]]:
    """Everything under `directory` but directories: relative name -> size (None: not a regular
    file). Links are not followed, so nothing outside the directory is looked at."""
    entries = {}
    for root, dirs, names in os.walk(directory):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = os.path.join(root, name)
            info = os.lstat(path)
            entries[Path(path).relative_to(directory).as_posix()] = info.st_size if stat.S_ISREG(info.st_mode) else None
    return entries


def _check(directory: Path, hashes: bool) -> tuple[dict[str, dict], list[str]]:
    """(the manifest's usable entries, problems) of a local checkpoint directory."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return {}, [f"{manifest_path} is missing (checkpoint incomplete)"]
    try:
        text = manifest_path.read_bytes()
    except OSError as exc:
        return {}, [f"{manifest_path} cannot be read: {exc}"]
    files, problems = parse_manifest(text, str(manifest_path))
    if files is None:
        return {}, problems
    present = _local_entries(directory)
    problems += listing_problems(files, present, str(directory), str(manifest_path))
    if hashes:
        for name, expected in sorted(files.items()):
            if present.get(name) == expected["size"] and _sha256(directory / name) != expected["sha256"]:
                problems.append(f"{directory / name} does not match its SHA-256 in the manifest (corrupted)")
    return files, problems


def verify_checkpoint(directory: str | os.PathLike, *, hashes: bool = True) -> list[str]:
    """Problems found in a local checkpoint directory; an empty list means it is valid: its manifest
    lists relative paths inside it only, every listed file is there with its size and SHA-256, and
    nothing else is. `hashes=False` checks all of that but the SHA-256 (reads no file but the manifest)."""
    return _check(Path(directory), hashes)[1]


# ----------------------------------------------------------------------------- loading
@dataclass
class LoadedCheckpoint:
    path: str
    model: dict
    optimizer: dict
    scheduler: dict
    state: dict
    rank_states: dict[int, dict]  # rank -> rng.capture() fields + loss_sum, loss_count

    @property
    def config(self) -> TrainConfig:
        return TrainConfig.from_dict(self.state["config"])


def read_state(directory: str | os.PathLike) -> dict:
    return json.loads((Path(directory) / STATE).read_text())


def load_checkpoint(directory: str | os.PathLike, map_location: str | torch.device = "cpu", *,
                    verified: bool = False) -> LoadedCheckpoint:
    """Verify, then load a local checkpoint directory. Raises CheckpointError if it is not valid.

    `verified=True`: the caller has just verified this directory (verify_checkpoint found nothing),
    so its files are not hashed again, only checked against the manifest's list and sizes.
    """
    directory = Path(directory)
    files, problems = _check(directory, hashes=not verified)
    if problems:
        raise CheckpointError(f"checkpoint {directory} does not verify: " + "; ".join(problems))
    state = read_state(directory)
    if state.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(
            f"checkpoint {directory} has schema_version {state.get('schema_version')}, this cape-ray "
            f"reads {SCHEMA_VERSION}; use the cape-ray version that wrote it")
    load = lambda p: torch.load(p, map_location=map_location, weights_only=True)  # noqa: E731
    rng = {rank: torch.load(directory / name, weights_only=True) for rank, name in sorted(rank_files(files).items())}
    return LoadedCheckpoint(str(directory), load(directory / "model.pt"), load(directory / "optimizer.pt"),
                            load(directory / "scheduler.pt"), state, rng)


def check_model_shapes(saved: dict, expected: dict, path: str) -> None:
    """Every tensor of the checkpoint fits the model as built now, or a clear error listing why."""
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    mismatched = [f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in saved and tuple(saved[k].shape) != tuple(v.shape)]
    if missing or unexpected or mismatched:
        details = (mismatched + [f"missing {k}" for k in missing] + [f"unexpected {k}" for k in unexpected])
        raise CheckpointError(
            f"checkpoint {path} does not fit this model ({len(mismatched)} shape mismatches, {len(missing)} "
            f"missing, {len(unexpected)} unexpected tensors; first: {'; '.join(details[:3])}). It was written "
            f"by another model configuration or cape-ray version; resume with the flags it was trained with.")
