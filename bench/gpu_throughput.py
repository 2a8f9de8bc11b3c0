"""Training steps/s on one device, and what is not the model in them, measured side by side in one run.

    python bench/gpu_throughput.py [--device cuda|cpu] [--epochs 3] [--episodes_per_epoch N]
                                   [--val_episodes N] [--steps 100] [--rounds 3] [--profile]

For the default config (or the flags' changes) on `--device` (default: cuda when available):
  1. the Ray job's steady state: a real 1-worker TorchTrainer run (--use_gpu on cuda, deterministic
     mode as the run's default), timed inside the worker (its epochs' `train_time_total_s`), the
     first epoch left out as warm-up;
  2. the model-bound limit: forward + backward + optimizer step of the same model on device-resident
     batches built beforehand, in this process;
  3. their ratio (goal >= 0.7x), and the Ray job's steps/s against the goal of >= 100 steps/s set for
     the default config on one H200;
  4. where the rest goes, in this process: a step with the worker's batch path (the epoch planned,
     batches built on the device), the previous path (episodes collated on the CPU and copied every
     step), and the per-epoch planning;
  5. what deterministic mode costs: the worker's path with and without it (and with it but without
     torch's filling of uninitialized memory, a part of its cost), in alternating rounds.
`--profile` adds a torch.profiler table of a few steady-state steps of the worker's path.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import ray  # noqa: E402
import torch  # noqa: E402

from cape_ray import checkpoint as ckpt, determinism, engine, rng  # noqa: E402
from cape_ray.config import TrainConfig  # noqa: E402
from cape_ray.data.episodes import EpisodeSampler, TrainingBatches, collate, global_episode_indices  # noqa: E402
from cape_ray.data.loading import load_split  # noqa: E402
from cape_ray.data.transforms import PreparedSplit  # noqa: E402
from cape_ray.job import build_trainer  # noqa: E402
from cape_ray.model import build_model  # noqa: E402

STEPS_PER_S_GOAL = 100.0  # the default config on one H200
RAY_TO_MODEL_GOAL = 0.7


# ----------------------------------------------------------------------------- the Ray job
def ray_steady_state(config: TrainConfig) -> tuple[float, str]:
    """Steps/s of a 1-worker Ray job between its first and last epoch reports, timed in the worker."""
    result = build_trainer(config).fit()
    if result.error is not None:
        raise RuntimeError(f"the Ray job failed: {result.error}")
    run_dir = Path(config.storage_path) / config.name
    ends = sorted((position, path) for path in run_dir.iterdir()
                  if (position := ckpt.position_from_name(path.name)) and position[1] == sys.maxsize)  # epoch ends
    reports = [ckpt.read_state(path)["metrics"] for _, path in ends]  # keep=0: every epoch's is there
    if len(reports) < 2:
        first = reports[0]
        return first["global_step"] / first["train_time_total_s"], "epoch 1, warm-up included"
    first, last = reports[0], reports[-1]
    rate = (last["global_step"] - first["global_step"]) / (last["train_time_total_s"] - first["train_time_total_s"])
    return rate, "epoch 2" if len(reports) == 2 else f"epochs 2..{len(reports)}"


# ----------------------------------------------------------------------------- in this process
class Trainer:
    """The worker's model, optimizer and schedule on `device`, fresh from the config's seed."""

    def __init__(self, config: TrainConfig, device: torch.device):
        rng.seed_everything(config.seed)
        self.model = build_model(config).to(device)
        self.optimizer = engine.build_optimizer(self.model, config)
        self.scheduler = engine.build_scheduler(self.optimizer, config, config.steps_per_epoch * config.epochs)
        self.grad_clip = config.grad_clip
        self.model.train()

    def step(self, micro_batches) -> torch.Tensor:
        return engine.train_step(self.model, self.optimizer, self.scheduler, micro_batches, self.grad_clip)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(step: Callable[[int], object], steps: int, warmup: int, device: torch.device) -> float:
    """Steps/s of `step(i)` over `steps` calls after `warmup`, the device drained at both ends."""
    for i in range(warmup):
        step(i)
    synchronize(device)
    started = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    synchronize(device)
    return steps / (time.perf_counter() - started)


def model_bound(config: TrainConfig, split: PreparedSplit, device: torch.device, steps: int, warmup: int) -> float:
    """Forward + backward + optimizer step on 8 steps' batches built on the device beforehand."""
    batches = TrainingBatches(split, config, 0, 1, device)
    per_step = batches.episodes_per_step
    built = [batches.step(0, i * per_step) for i in range(min(8, config.steps_per_epoch))]
    trainer = Trainer(config, device)
    return rate(lambda i: trainer.step(built[i % len(built)]), steps, warmup, device)


def worker_path(config: TrainConfig, split: PreparedSplit, device: torch.device, steps: int, warmup: int) -> float:
    """The worker's step: batches indexed from the epoch's plan, then the optimizer step. An epoch
    is planned at its first step: in the warm-up when warmup + steps <= steps per epoch (the plan's
    cost is then measured apart, by `planning_seconds`), else the timed steps include plans too."""
    batches = TrainingBatches(split, config, 0, 1, device)
    per_step, per_epoch = batches.episodes_per_step, config.steps_per_epoch
    trainer = Trainer(config, device)
    return rate(lambda i: trainer.step(batches.step(i // per_epoch, (i % per_epoch) * per_step)), steps, warmup,
                device)


def previous_path(config: TrainConfig, split: PreparedSplit, device: torch.device, steps: int, warmup: int) -> float:
    """The path before batches moved to the device: each micro-batch's episodes drawn and collated
    on the CPU, then copied."""
    sampler = EpisodeSampler(split, config.num_shots, config.num_queries_per_episode, seed=config.seed)
    per_step, per_epoch = config.batch_size * config.accumulation_steps, config.steps_per_epoch
    trainer = Trainer(config, device)

    def step(i: int):
        epoch, first = i // per_epoch, (i % per_epoch) * per_step
        micro_batches = [collate(split, sampler.train_episodes(epoch, first + global_episode_indices(
            0, micro, 0, 1, config.batch_size, config.accumulation_steps)), augment=config.augment)
            .to(device, non_blocking=True) for micro in range(config.accumulation_steps)]
        return trainer.step(micro_batches)

    return rate(step, steps, warmup, device)


def planning_seconds(config: TrainConfig, split: PreparedSplit, device: torch.device, repeats: int = 3) -> float:
    """Median seconds to plan one whole epoch for rank 0 (episodes drawn, moved to the device)."""
    batches = TrainingBatches(split, config, 0, 1, device)
    times = []
    for epoch in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        batches.plan_epoch(epoch, 0)
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def deterministic_cost(config: TrainConfig, split: PreparedSplit, device: torch.device, steps: int, warmup: int,
                       rounds: int) -> dict[str, float]:
    """Median steps/s of the worker's path with deterministic mode on (as the worker runs it), on
    without filling uninitialized memory, and off, in alternating rounds so that drifts of the
    machine hit all alike."""
    import torch.utils.deterministic as deterministic_settings

    variants = {"on": (True, True), "on, no fill": (True, False), "off": (False, True)}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    filling = deterministic_settings.fill_uninitialized_memory
    try:
        for _ in range(rounds):
            for name, (enforced, fill) in variants.items():
                # With the mode on, torch fills every torch.empty with NaN by default, so that a kernel
                # reading memory it never wrote cannot vary: a cost the worker keeps.
                deterministic_settings.fill_uninitialized_memory = fill
                with determinism.algorithms(enforced):
                    rates[name].append(worker_path(config, split, device, steps, warmup))
    finally:
        deterministic_settings.fill_uninitialized_memory = filling
    return {name: statistics.median(values) for name, values in rates.items()}


def host_syncs_per_step(config: TrainConfig, split: PreparedSplit) -> Optional[dict[str, float]]:
    """Synchronising CUDA calls per step of the worker's path (planned epoch), deterministic mode on
    and off: each one stalls the host until the GPU has caught up. None for a one-step epoch."""
    import warnings

    steps = min(5, config.steps_per_epoch - 1)  # after the first step, within the epoch's plan
    if steps < 1:
        return None
    counts = {}
    for name, enforced in (("on", True), ("off", False)):
        with determinism.algorithms(enforced):
            batches = TrainingBatches(split, config, 0, 1, torch.device("cuda"))
            trainer = Trainer(config, torch.device("cuda"))
            per_step = batches.episodes_per_step
            trainer.step(batches.step(0, 0))  # the plan's copy to the device, and the library handles
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    for i in range(1, 1 + steps):
                        trainer.step(batches.step(0, i * per_step))
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            counts[name] = sum("synchronizing" in str(w.message) for w in caught) / steps
    return counts


def profile(config: TrainConfig, split: PreparedSplit, device: torch.device, steps: int = 5) -> str:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    batches = TrainingBatches(split, config, 0, 1, device)
    per_step, per_epoch = batches.episodes_per_step, config.steps_per_epoch
    trainer = Trainer(config, device)

    def step(i: int):
        return trainer.step(batches.step(i // per_epoch, (i % per_epoch) * per_step))

    for i in range(5):  # warm-up, and the epoch's plan
        step(i)
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as profiler:
        for i in range(5, 5 + steps):
            step(i)
        synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort_by, row_limit=30)


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, default=3, help="of the Ray job (the first is warm-up)")
    parser.add_argument("--episodes_per_epoch", type=int, default=None, help="default: the config's")
    parser.add_argument("--val_episodes", type=int, default=None, help="per validation category; default: the config's")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per in-process measurement")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before each in-process measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the deterministic-mode comparison")
    parser.add_argument("--profile", action="store_true", help="also print a torch.profiler table of a few steps")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu)")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")  # Ray's default poll interval

    work = Path(tempfile.mkdtemp(prefix="cape_ray_gpu_bench_"))
    changes = {"epochs": args.epochs, "storage_path": str(work), "num_workers": "1", "keep": 0,
               "use_gpu": device.type == "cuda", "progress": "lines", "name": "throughput"}
    for flag in ("episodes_per_epoch", "val_episodes"):
        if getattr(args, flag) is not None:
            changes[flag] = getattr(args, flag)
    config = TrainConfig(**changes)
    default_config = all(getattr(config, f) == getattr(TrainConfig(), f) for f in
                         ("batch_size", "accumulation_steps", "image_size", "feature_dim", "refine_layers", "backbone"))
    enforced = determinism.resolve(config.deterministic, device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {device_name}; config: batch {config.batch_size} x accumulation {config.accumulation_steps}, "
          f"{config.steps_per_epoch} steps/epoch, {config.image_size} px, {config.num_threads} CPU thread(s); "
          f"Ray job: {config.epochs} epochs, deterministic mode {'on' if enforced else 'off'}")

    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    try:
        ray_rate, ray_span = ray_steady_state(config)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    torch.set_num_threads(config.num_threads)  # as the worker: the thread count changes the speed too
    split = load_split(config, "train", config.num_queries_per_episode)
    steps, warmup = args.steps, args.warmup
    with determinism.algorithms(enforced):
        bare_rate = model_bound(config, split, device, steps, warmup)
        worker_rate = worker_path(config, split, device, steps, warmup)
        previous_rate = previous_path(config, split, device, steps, warmup)
        plan_s = planning_seconds(config, split, device)
        table = profile(config, split, device) if args.profile else None
    modes = deterministic_cost(config, split, device, steps, warmup, args.rounds)
    syncs = host_syncs_per_step(config, split) if device.type == "cuda" else None

    goal_note = "(default config, one H200)" if default_config else "(set for the default config; these flags differ)"
    print()
    print(f"{'measure':66s} {'value':>10s}  goal")
    print(f"{'Ray job steps/s, 1 worker, steady state (' + ray_span + ')':66s} {ray_rate:10.2f}")
    print(f"{'model-bound steps/s (fwd + bwd + optimizer, batches pre-built)':66s} {bare_rate:10.2f}")
    print(f"{'  ratio Ray job / model-bound':66s} {ray_rate / bare_rate:9.3f}x  >= {RAY_TO_MODEL_GOAL}x")
    print(f"{'  Ray job steps/s against the goal':66s} {ray_rate:10.2f}  >= {STEPS_PER_S_GOAL:.0f} {goal_note}")
    print(f"{'in-process steps/s, worker batch path (planned epoch, on device)':66s} {worker_rate:10.2f}")
    print(f"{'in-process steps/s, previous path (CPU collate + copy per step)':66s} {previous_rate:10.2f}")
    print(f"{'  ratio worker path / previous path':66s} {worker_rate / previous_rate:9.3f}x")
    print(f"{'per-epoch planning, ms per epoch (ms per step amortised)':66s} {1e3 * plan_s:10.1f}"
          f"  ({1e3 * plan_s / config.steps_per_epoch:.2f} ms/step)")
    print(f"{'worker path steps/s, deterministic mode on (median of ' + str(args.rounds) + ')':66s} {modes['on']:10.2f}")
    print(f"{'worker path steps/s, deterministic mode off':66s} {modes['off']:10.2f}")
    print(f"{'  cost of deterministic mode (1 - on / off)':66s} {100 * (1 - modes['on'] / modes['off']):9.1f}%")
    print(f"{'  of which filling uninitialized memory (1 - on / on without fill)':66s} "
          f"{100 * (1 - modes['on'] / modes['on, no fill']):9.1f}%")
    if device.type == "cuda" and syncs is None:
        print(f"{'host syncs per step':66s} {'n/a':>10s}  (one step per epoch: every step is planned)")
    if syncs is not None:
        print(f"{'host syncs per step (synchronising CUDA calls), deterministic on / off':66s} "
              f"{syncs['on']:10.1f}  / {syncs['off']:.1f}  (0 wanted)")
    if table is not None:
        print()
        print(f"torch.profiler: 5 steady-state steps of the worker path ({device_name})")
        print(table)


if __name__ == "__main__":
    main()
