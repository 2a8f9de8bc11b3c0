"""The checkpoint contract: names, files, manifest, verification, loading.

A checkpoint is a directory:
    model.pt  optimizer.pt  scheduler.pt   tensors and primitives only (torch.save of state_dicts)
    state.json                             schema version, config, position, tracking, history, ...;
                                           the original pipeline's epoch, best_val_loss, best_pck and
                                           epochs_without_improvement at its top level
    rng/rank_00000.pt ...                  one per rank: rng_state, cuda_rng_state, np_rng_state,
                                           py_rng_state and its running train-loss sum of the epoch
    manifest.json                          size + SHA-256 of every other file, written LAST

A checkpoint is valid only if its manifest verifies. Every load uses `weights_only=True`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from cape_ray.config import TrainConfig
from cape_ray.tracking import export_kind

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
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
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tensor_bytes(obj: Any) -> int:
    """Bytes of all tensors inside a nested state_dict (the bulk of a checkpoint)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


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
                     state: dict, rank_states: dict[int, bytes]) -> Path:
    """Write a complete checkpoint into `directory` (created) and return it.

    `rank_states` holds each rank's serialized own state: its RNG (rng.capture) and anything else
    that differs per rank (the running train loss of the epoch). `state` is TrainState.state_dict().
    The manifest is written last: a crash part-way leaves a directory that never verifies.
    """
    directory = Path(directory)
    needed = (tensor_bytes(model) + tensor_bytes(optimizer) + tensor_bytes(scheduler)
              + sum(len(b) for b in rank_states.values()) + DISK_MARGIN_BYTES)
    check_free_space(directory, needed)

    for file_name, obj in zip(TENSOR_FILES, (model, optimizer, scheduler)):
        torch.save(obj, directory / file_name)
    (directory / "rng").mkdir(exist_ok=True)
    for rank, blob in sorted(rank_states.items()):
        (directory / "rng" / f"rank_{rank:05d}.pt").write_bytes(blob)
    full_state = {"schema_version": SCHEMA_VERSION, **state}
    (directory / STATE).write_text(json.dumps(full_state, indent=1, sort_keys=True))

    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "files": {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
                  for p in files},
    }
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, directory / MANIFEST)
    return directory


# ----------------------------------------------------------------------------- verifying
def verify_checkpoint(directory: str | os.PathLike) -> list[str]:
    """Problems found in a local checkpoint directory; an empty list means it is valid."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return [f"{manifest_path} is missing (checkpoint incomplete)"]
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as exc:
        return [f"{manifest_path} is unreadable: {exc}"]
    problems = []
    for required in (*TENSOR_FILES, STATE):
        if required not in files:
            problems.append(f"{manifest_path} does not list {required}")
    if not any(name.startswith("rng/") for name in files):
        problems.append(f"{manifest_path} lists no rng/rank_*.pt file")
    for name, expected in sorted(files.items()):
        path = directory / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != expected["size"]:
            problems.append(f"{path} has {path.stat().st_size} bytes, manifest says {expected['size']} (truncated?)")
        elif _sha256(path) != expected["sha256"]:
            problems.append(f"{path} does not match its SHA-256 in the manifest (corrupted)")
    return problems


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


def load_checkpoint(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Verify, then load a local checkpoint directory. Raises CheckpointError if it is not valid."""
    directory = Path(directory)
    problems = verify_checkpoint(directory)
    if problems:
        raise CheckpointError(f"checkpoint {directory} does not verify: " + "; ".join(problems))
    state = read_state(directory)
    if state.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(
            f"checkpoint {directory} has schema_version {state.get('schema_version')}, this cape-ray "
            f"reads {SCHEMA_VERSION}; use the cape-ray version that wrote it")
    load = lambda p: torch.load(p, map_location=map_location, weights_only=True)  # noqa: E731
    rng = {int(p.stem.split("_")[1]): torch.load(p, weights_only=True)
           for p in sorted((directory / "rng").glob("rank_*.pt"))}
    return LoadedCheckpoint(str(directory), load(directory / "model.pt"), load(directory / "optimizer.pt"),
                            load(directory / "scheduler.pt"), state, rng)


def check_compatible(state: dict, config: TrainConfig, path: str) -> None:
    """A clear error instead of a shape-mismatch traceback when the model would not fit: the
    checkpoint's model spec (builder and arguments) against `config`'s (identity.py)."""
    from cape_ray.identity import compare

    diffs = [d for d in compare(state["config"], state.get("model"), config).math if d.field.startswith("model")]
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was written with another model ({'; '.join(d.line() for d in diffs)}). "
            f"Resume with the same model flags, or start a new run with another --name.")


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
