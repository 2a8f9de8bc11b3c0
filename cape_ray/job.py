"""Build the Ray Train job from a TrainConfig and run it.

Local runs start Ray themselves; with RAY_ADDRESS set (or inside `ray job submit`) they attach to
that cluster. The run name is always set: rerunning the same command with the same --name and
--storage_path resumes from Ray's snapshot in storage after a driver crash. Only one driver trains a
run at a time (cape_ray/lease.py): a second one is refused while the first is alive.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Optional

import ray
from ray.train import CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from cape_ray import history, preflight
from cape_ray.checkpointer import RETENTION_KEY, retention_slots
from cape_ray.config import TrainConfig
from cape_ray.console import DriverConsole
from cape_ray.lease import DriverLease
from cape_ray.worker import train_loop_per_worker


def storage_uri(config: TrainConfig) -> str:
    path = config.storage_path
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def build_trainer(config: TrainConfig, train_fn: Callable[[dict], None] = train_loop_per_worker,
                  train_loop_config: Optional[dict] = None) -> TorchTrainer:
    """The Ray Train job for `config`; `train_fn` / `train_loop_config` let a caller wrap the loop."""
    low, high = config.worker_range()
    resources = {"CPU": config.cpus_per_worker}
    if config.use_gpu:
        resources["GPU"] = 1
    scaling = ScalingConfig(num_workers=low if low == high else (low, high), use_gpu=config.use_gpu,
                            resources_per_worker=resources)
    run_config = RunConfig(
        name=config.name,
        storage_path=storage_uri(config),
        failure_config=FailureConfig(max_failures=config.max_failures,
                                     max_preemption_failures=config.max_preemption_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=retention_slots(config),
                                           checkpoint_score_attribute=RETENTION_KEY, checkpoint_score_order="max"),
        callbacks=[history.RunHistory.for_config(config)],
    )
    return TorchTrainer(train_fn, train_loop_config=train_loop_config or config.to_dict(),
                        scaling_config=scaling, run_config=run_config)


class RunStopped(RuntimeError):
    """The workers stopped the run on a failure that restarting cannot fix (its message says which)."""


def run(config: TrainConfig, *, init_ray: bool = True, train_fn: Callable[[dict], None] = train_loop_per_worker,
        train_loop_config: Optional[dict] = None) -> Optional[Result]:
    """Check what can be checked before Ray starts, take the run's lease, then train. Returns None
    when the run has nothing left to train (said in one line). ConfigError: a flag that cannot work.
    `train_fn` / `train_loop_config` let a caller wrap the loop (see build_trainer)."""
    preflight.check(config)
    if config.progress == "auto":
        # Workers never see a terminal; the driver does, and draws their progress on it.
        config = config.replace(progress="bar" if sys.stdout.isatty() else "lines")
    # One driver per run: a second one refuses here, before Ray starts (cape_ray/lease.py).
    with DriverLease(storage_uri(config), config.name):
        reason = preflight.nothing_to_train(config, preflight.latest_state(config))
        if reason:
            print(reason, flush=True)
            return None
        if init_ray and not ray.is_initialized():
            # ray.init() attaches to RAY_ADDRESS when set (a cluster, or inside `ray job submit`),
            # and otherwise starts a local instance on this machine. Ray's own output reaches
            # this driver only with --verbose; the project's lines come through the console relay.
            ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=config.verbose)
        history.record_start(config)
        with DriverConsole(config.name) as console:
            try:
                result = build_trainer(config, train_fn, train_loop_config).fit()
            except BaseException as exc:  # recorded as the run's end (failed / interrupted), then raised
                history.finish_run(config, exc)
                raise
        # The "end" line (what `cape-ray runs` reads) and the trackers' artifacts and status.
        history.finish_run(config, console.failure)
    print(summary(result), flush=True)
    if console.failure:
        raise RunStopped(console.failure)
    return result


def summary(result: Result) -> str:
    metrics: Optional[dict] = result.metrics or {}
    lines = [f"run directory: {result.path}"]
    if result.checkpoint is not None:
        lines.append(f"latest checkpoint: {result.checkpoint.path}")
    if metrics:
        lines.append(f"last report: epoch {metrics.get('epoch')}  val_pck {metrics.get('val_pck')}  "
                     f"best val_pck {metrics.get('best_val_pck')}  best val_loss {metrics.get('best_val_loss')}")
    return "\n".join(lines)
