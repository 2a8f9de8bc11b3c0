"""What can be known before Ray starts: config errors as one line each, and a run with nothing left
to train, said without starting Ray.

Checked here: --best_metrics name metrics a report carries; an epoch holds at least one optimizer
step at the largest world size; MP-100 annotation files exist; --resume exists, verifies and fits
the model flags. Read here: the run's own latest checkpoint (from Ray's run snapshot in storage), to
say when a rerun has nothing left to train.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from cape_ray import checkpoint as ckpt, storage
from cape_ray.checkpointer import resolve_resume
from cape_ray.config import ConfigError, TrainConfig
from cape_ray.metrics import PCK_THRESHOLDS
from cape_ray.tracking import EarlyStopping, parse_best_metrics

# What every validated report carries, and --best_metrics may therefore name.
REPORTED_METRICS = ("train_loss", "val_loss", "val_pck", "mpck", "lr",
                    *(f"pck@{threshold:.2f}" for threshold in PCK_THRESHOLDS))
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray's run snapshot (Ray is pinned: its format is known)


def check(config: TrainConfig) -> None:
    """Raise ConfigError (one line) for anything in `config` that would fail after Ray starts."""
    for metric, _ in parse_best_metrics(config.best_metrics):
        if metric not in REPORTED_METRICS:
            raise ConfigError(f"--best_metrics: {metric!r} is not a reported metric; choose from "
                              f"{', '.join(REPORTED_METRICS)}")
    config.steps_per_epoch_at(config.worker_range()[1])
    if config.data_root is not None:
        from cape_ray.data.mp100 import annotation_path

        for subset in ("train", "val"):
            path = annotation_path(config.data_root, config.mp100_split, subset)
            if not os.path.isfile(path):
                raise ConfigError(f"--data_root: {path} does not exist (MP-100 layout: "
                                  f"DATA_ROOT/annotations/mp100_split{{N}}_{{train,val,test}}.json)")
    if config.resume:
        try:
            fs, path = resolve_resume(config.resume)  # verified there: read only its state.json here
            with fs.open_input_stream(f"{path}/{ckpt.STATE}") as stream:
                ckpt.check_compatible(json.loads(stream.read().decode()), config, path)
        except ckpt.CheckpointError as exc:
            raise ConfigError(str(exc) if str(exc).startswith("--resume") else f"--resume: {exc}") from None


def latest_state(config: TrainConfig) -> Optional[dict]:
    """state.json of the run's latest registered checkpoint; None when the run has none (or its
    snapshot or checkpoint cannot be read: then the workers decide, as they do on every start)."""
    fs, run_dir = storage.run_path(config.storage_path, config.name)
    try:
        with fs.open_input_stream(f"{run_dir}/{SNAPSHOT}") as stream:
            latest = json.loads(stream.read().decode())["latest_checkpoint_result"]
        if not latest:
            return None
        with fs.open_input_stream(f"{run_dir}/{latest['checkpoint_dir_name']}/{ckpt.STATE}") as stream:
            return json.loads(stream.read().decode())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def nothing_to_train(config: TrainConfig, state: Optional[dict]) -> Optional[str]:
    """Why a start of `config` on a run whose latest checkpoint holds `state` would train nothing."""
    if state is None:
        return None
    position = state["position"]
    if position["epoch"] >= config.epochs and position["step"] == 0:
        return (f"run '{config.name}' has completed {position['epoch']} epoch(s) and --epochs is {config.epochs}: "
                f"nothing left to train. Pass a larger --epochs to continue it, or another --name to start anew.")
    stopping = EarlyStopping("val_pck", "max", config.early_stopping_patience, config.early_stopping_min_delta)
    stopping.load_state_dict(state["tracking"]["early_stopping"])
    if stopping.should_stop:
        return (f"run '{config.name}' stopped early at epoch {stopping.stopped_epoch} ({stopping.epochs_without_improvement} "
                f"epochs without a val_pck improvement, --early_stopping_patience {config.early_stopping_patience}): "
                f"nothing left to train. A larger --early_stopping_patience continues it.")
    return None
