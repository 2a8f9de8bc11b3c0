"""The original pipeline's checkpoint: 14 keys in one `.pth` file, for tools written against it.

cape-ray keeps a checkpoint as a directory (one file per part, a manifest that proves it complete,
one RNG file per rank); the original kept one `torch.save` dict. `original_checkpoint` builds that
dict from a cape-ray checkpoint, under the original's names:

    model, optimizer, lr_scheduler       the state_dicts
    epoch                                epochs completed (checkpoint_e150_... holds 150; the
                                         original resumed at epoch + 1)
    args                                 the run's flags (a dict; the original pickled a Namespace)
    train_stats, val_stats               {"loss": ...} and {"loss", "pck", "mpck", "pck@0.05", ...}
                                         of the checkpoint's epoch ({} mid-epoch for val_stats)
    best_val_loss, best_pck, epochs_without_improvement
    rng_state, np_rng_state, py_rng_state, cuda_rng_state
                                         rank 0's generators (cuda_rng_state: [] without CUDA, so
                                         torch.cuda.set_rng_state_all accepts it)

Every value is a tensor, a number, a string or a container of those: the file loads with
`torch.load(path, weights_only=True)`.
"""

from __future__ import annotations

from typing import Any

import torch

from cape_ray.checkpoint import LoadedCheckpoint

ORIGINAL_KEYS = ("model", "optimizer", "lr_scheduler", "epoch", "args", "train_stats", "val_stats",
                 "best_val_loss", "best_pck", "epochs_without_improvement",
                 "rng_state", "cuda_rng_state", "np_rng_state", "py_rng_state")


def original_checkpoint(loaded: LoadedCheckpoint) -> dict[str, Any]:
    state, metrics = loaded.state, loaded.state.get("metrics", {})
    rank0 = loaded.rank_states[0]
    val_stats = {}
    if metrics.get("validated"):
        val_stats = {"loss": metrics["val_loss"], "pck": metrics["val_pck"], "mpck": metrics["mpck"],
                     **{k: v for k, v in metrics.items() if k.startswith("pck@")}}
    train_stats = {"loss": metrics.get("train_loss"), "lr": metrics.get("lr")}
    return {
        "model": loaded.model,
        "optimizer": loaded.optimizer,
        "lr_scheduler": loaded.scheduler,
        "epoch": int(state["epoch"]),
        "args": dict(state["config"]),
        "train_stats": train_stats,
        "val_stats": val_stats,
        "best_val_loss": state["best_val_loss"],
        "best_pck": state["best_pck"],
        "epochs_without_improvement": int(state["epochs_without_improvement"]),
        "rng_state": rank0["rng_state"],
        "cuda_rng_state": list(rank0["cuda_rng_state"] or []),
        "np_rng_state": rank0["np_rng_state"],
        "py_rng_state": rank0["py_rng_state"],
    }


def describe(original: dict[str, Any]) -> list[str]:
    """One line per field, as `cape-ray inspect` prints them."""
    def fmt(value: Any) -> str:
        return "n/a" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    model = original["model"]
    optimizer = original["optimizer"]
    scheduler = original["lr_scheduler"]
    np_state, py_state = original["np_rng_state"], original["py_rng_state"]
    return [
        f"model: {len(model)} tensors, {sum(t.numel() for t in model.values()):,} values",
        f"optimizer: {len(optimizer.get('param_groups', []))} parameter groups, state for "
        f"{len(optimizer.get('state', {}))} parameters",
        f"lr_scheduler: {scheduler.get('last_epoch')} steps taken of {scheduler.get('steps_per_epoch', 0) * scheduler.get('epochs', 0)} "
        f"planned ({scheduler.get('epochs')} epochs), lr {fmt(scheduler.get('_last_lr', [None])[0])}",
        f"epoch: {original['epoch']}",
        f"args: {len(original['args'])} flags (name {original['args'].get('name')!r}, epochs "
        f"{original['args'].get('epochs')}, lr {original['args'].get('lr')})",
        f"train_stats: loss {fmt(original['train_stats']['loss'])}, lr {original['train_stats']['lr']:.3g}",
        "val_stats: " + (", ".join(f"{k} {fmt(v)}" for k, v in original["val_stats"].items())
                         or "none (a mid-epoch checkpoint)"),
        f"best_val_loss: {fmt(original['best_val_loss'])}",
        f"best_pck: {fmt(original['best_pck'])}",
        f"epochs_without_improvement: {original['epochs_without_improvement']}",
        f"rng_state: torch generator, {original['rng_state'].numel()} bytes",
        "cuda_rng_state: " + (f"{len(original['cuda_rng_state'])} device state(s)" if original["cuda_rng_state"]
                               else "none (written without CUDA)"),
        f"np_rng_state: {np_state[0]}, position {np_state[2]}",
        f"py_rng_state: version {py_state[0]}, {len(py_state[1])} words",
    ]


def save_pth(loaded: LoadedCheckpoint, path: str) -> dict[str, Any]:
    original = original_checkpoint(loaded)
    torch.save(original, path)
    return original
