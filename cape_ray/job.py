"""Build the Ray Train job from a TrainConfig and run it.

Local runs start Ray themselves; with RAY_ADDRESS set (or inside `ray job submit`) they attach to
that cluster (--address picks one explicitly; a cluster that does not answer is refused before Ray
starts, cape_ray/ray_address.py). The run name is always set: rerunning the same command with the
same --name and --storage_path resumes from Ray's snapshot in storage after a driver crash. Only one
driver trains a run at a time (cape_ray/lease.py): a second one is refused while the first is alive,
and the workers and the history callback write nothing once the driver's claim is no longer live.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Optional

import ray
from ray.train import CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2.api.exceptions import TrainingFailedError

from cape_ray import history, preflight, ray_address, storage
from cape_ray.checkpointer import RETENTION_KEY, retention_slots
from cape_ray.config import TrainConfig
from cape_ray.console import DriverConsole
from cape_ray.lease import FENCE_KEY, DriverLease, Fence
from cape_ray.model.api import module_source
from cape_ray.worker import train_loop_per_worker


CONFIG_FILE = "config.yaml"


def storage_uri(config: TrainConfig) -> str:
    path = config.storage_path
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def build_trainer(config: TrainConfig, train_fn: Callable[[dict], None] = train_loop_per_worker,
                  train_loop_config: Optional[dict] = None, fence: Optional[Fence] = None) -> TorchTrainer:
    """The Ray Train job for `config`; `train_fn` / `train_loop_config` let a caller wrap the loop.
    `fence`: the driver's lease claim, checked by the workers and the history before they write."""
    loop_config = dict(train_loop_config or config.to_dict())
    if fence is not None:
        loop_config[FENCE_KEY] = fence.to_dict()  # train_loop_per_worker takes it out again
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
        callbacks=[history.RunHistory.for_config(config, fence=fence)],
    )
    return TorchTrainer(train_fn, train_loop_config=loop_config, scaling_config=scaling, run_config=run_config)


def job_runtime_env(config: TrainConfig) -> Optional[dict]:
    """What the workers need besides cape-ray: a model of your own (--model package.module:function)
    travels as a Ray py_module, so that its module imports on every node (a cluster's too). Ray
    uploads a local module only for the whole job (ray.init), which merges it into the job's own
    runtime env under `ray job submit`."""
    source = module_source(config.model)
    return {"py_modules": [str(source)]} if source is not None else None


def save_config(config: TrainConfig) -> None:
    """The resolved config as `{run directory}/config.yaml`: `cape-ray train --config` of it
    reproduces the run (a rerun that changed flags replaces it; state.json's config_changes keeps
    what changed when)."""
    fs, run_dir = storage.run_path(storage_uri(config), config.name)
    fs.create_dir(run_dir, recursive=True)
    with fs.open_output_stream(f"{run_dir}/{CONFIG_FILE}") as out:
        out.write(config.to_yaml().encode())


def storage_failure(error: BaseException) -> Optional[str]:
    """The message of a checkpoint storage failure among a failed run's worker errors, if any."""
    failures = getattr(error, "worker_failures", None) or {}
    for failure in failures.values():
        text = str(failure)
        if "StorageError" in type(failure).__name__ or "StorageError" in text:
            lines = [line for line in text.splitlines() if "StorageError" in line]
            return (lines[-1].split("StorageError:", 1)[-1].strip() if lines else text.splitlines()[-1])
    return None


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
    with DriverLease(storage_uri(config), config.name) as lease:
        latest = preflight.latest_state(config)
        preflight.check_continuation(config, latest)
        reason = preflight.nothing_to_train(config, latest)
        if reason:
            print(reason, flush=True)
            return None
        if init_ray and not ray.is_initialized():
            # --address, else RAY_ADDRESS (a cluster, or inside `ray job submit`), else the last
            # `ray start` on this machine, else a private instance; one that does not answer is
            # refused here (RayAddressError). Ray's own output reaches this driver only with
            # --verbose; the project's lines come through the console relay.
            ray.init(address=ray_address.choose(config.address), log_to_driver=config.verbose,
                     runtime_env=job_runtime_env(config))
        save_config(config)
        history.record_start(config)
        with DriverConsole(config.name) as console:
            try:
                result = build_trainer(config, train_fn, train_loop_config, fence=lease.fence()).fit()
            except TrainingFailedError as exc:
                history.finish_run(config, exc)
                message = storage_failure(exc)
                if message is None:
                    raise
                raise RunStopped(f"{message} (still failing after {config.storage_retries} retries and "
                                 f"{config.max_failures} restart(s))") from None
            except BaseException as exc:  # recorded as the run's end (failed / interrupted), then raised
                history.finish_run(config, exc)
                raise
        # The "end" line (what `cape-ray runs` reads) and the trackers' artifacts and status.
        history.finish_run(config, console.failure)
        # A driver that was stopped while Ray trained (SIGSTOP, a paused VM) and lost its lease
        # meanwhile says so here (LeaseLost), whatever fit() returned.
        lease.confirm()
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
