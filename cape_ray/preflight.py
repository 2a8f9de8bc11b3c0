"""What can be known before Ray starts: config errors as one line each, and a run with nothing left
to train, said without starting Ray.

Checked here: --best_metrics name metrics a report carries; an epoch holds at least one optimizer
step at the largest world size; MP-100 annotation files exist; the model builds (a model of your
own is imported and run on a dummy episode; a built-in one is built without memory, on the meta
device, which checks its sizes); --pretrained loads into it; the precision runs on the device;
--resume exists and verifies. Read here: the run's own latest checkpoint (from Ray's run snapshot in
storage), to refuse a rerun or --resume that would change the run's math (identity.py) and to say
when a rerun has nothing left to train.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

import torch

from cape_ray import checkpoint as ckpt, identity, storage
from cape_ray.checkpointer import resolve_resume
from cape_ray.config import BUILTIN_MODELS, ConfigError, TrainConfig
from cape_ray.model import ModelError, build_model
from cape_ray.model.api import check_episode, fingerprint
from cape_ray.model.weights import load_pretrained
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
    check_precision(config)
    model = check_model(config)
    if config.pretrained and not config.resume and latest_state(config) is None:
        check_pretrained(config, model)


def resume_state(config: TrainConfig) -> tuple[str, dict]:
    """(checkpoint path, state.json) of --resume: it exists and verifies (ConfigError if not)."""
    try:
        fs, path = resolve_resume(config.resume)  # verified there: read only its state.json here
        with fs.open_input_stream(f"{path}/{ckpt.STATE}") as stream:
            return path, json.loads(stream.read().decode())
    except ckpt.CheckpointError as exc:
        raise ConfigError(str(exc) if str(exc).startswith("--resume") else f"--resume: {exc}") from None


def check_continuation(config: TrainConfig, latest: Optional[dict]) -> None:
    """A rerun of the run (its latest checkpoint `latest`) or --resume PATH continues a checkpoint:
    refuse flags that would change its math, with the differences, unless --force; with --force, the
    model must still fit the checkpoint's weights (the model fingerprint)."""
    if latest is not None:
        what, checkpoint, state = "this rerun", f"{config.name}'s latest", latest
    elif config.resume:
        path, state = resume_state(config)
        what, checkpoint = f"--resume {config.resume}", path.rsplit("/", 1)[-1]
    else:
        return
    comparison = identity.compare(state["config"], state.get("model"), config)
    if comparison.changes_math and not config.force:
        raise ConfigError(comparison.refusal(what, checkpoint))
    saved_model = state.get("model") or {}
    if saved_model.get("fingerprint") and any(d.field.startswith("model") for d in comparison.math):
        with torch.device("meta"):
            built = check_model(config)
        if fingerprint(built) != saved_model["fingerprint"]:
            raise ConfigError(f"--force cannot change the model's shapes: the weights of {checkpoint} do not fit "
                              f"the model these flags build ({', '.join(d.line() for d in comparison.math)}). Start "
                              f"a new run with another --name.")


def check_model(config: TrainConfig) -> torch.nn.Module:
    """The model of `config`, checked: a model of your own is imported, built and run on a dummy
    episode (one line per problem); a built-in one is built on the meta device (no memory), which
    checks that its sizes agree (e.g. --image_size and the ViT's patch size)."""
    custom = config.model not in BUILTIN_MODELS
    try:
        if custom:
            model = build_model(config)
            check_episode(model, config.model, config.image_size, config.num_shots)
            return model
        with torch.device("meta"):
            return build_model(config)
    except ModelError as exc:
        raise ConfigError(str(exc)) from None


def check_pretrained(config: TrainConfig, model: torch.nn.Module) -> None:
    """--pretrained loads into the model as built (shapes compared on the meta device for the
    built-in models); a mismatch names the key and both shapes."""
    if config.model not in BUILTIN_MODELS:
        model = build_model(config)  # check_model built it for real; build it again (no RNG concerns here)
    try:
        report = load_pretrained(model, config.pretrained, config.backbone or "")
    except ModelError as exc:
        raise ConfigError(str(exc)) from None
    if report.loaded == 0:
        raise ConfigError(f"--pretrained {config.pretrained}: none of its {len(report.unexpected)} tensors is a "
                          f"parameter of --backbone {config.backbone} (first: {', '.join(report.unexpected[:3])}); "
                          f"is it the weights of another architecture?")


def check_precision(config: TrainConfig) -> None:
    """--precision must run on the device the workers train on (as far as this machine can tell)."""
    device_type = "cuda" if config.use_gpu else "cpu"
    if config.precision != "fp32" and not torch.amp.is_autocast_available(device_type):
        raise ConfigError(f"--precision {config.precision}: this torch has no autocast for {device_type}")
    if config.precision == "bf16" and config.use_gpu and torch.cuda.is_available() \
            and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--precision bf16: {torch.cuda.get_device_name()} does not support bfloat16 (it needs "
                          f"compute capability 8.0 or newer); use --precision fp16")
    if config.precision == "fp16" and not config.use_gpu:
        # Allowed (the tests resume fp16 runs on CPU), but CPUs have few fp16 kernels: said once.
        print("cape-ray train: note: --precision fp16 on CPU workers runs slowly (a ViT-S step took 23x as long "
              "as in fp32 in bench/checkpoint_cost.py); bf16 is the fast choice on a CPU", file=sys.stderr)


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
