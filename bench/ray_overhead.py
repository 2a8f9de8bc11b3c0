"""What Ray Train and checkpointing cost, measured side by side in one run.

Prints four figures for the default config (1 worker, built-in data):
  1. steady-state steps/s of the Ray job vs the same optimizer step in a plain loop (goal >= 0.95x);
  2. share of training time spent checkpointing at the default cadence (goal <= 2%);
  3. checkpoint write speed vs a raw torch.save of the same tensors (goal >= 0.8x);
  4. worker SIGKILL -> first optimizer step after Ray's restart, in seconds, and steps of work lost.

    python bench/ray_overhead.py [--epochs 2] [--checkpoint_every_steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import ray  # noqa: E402
import torch  # noqa: E402
from ray import cloudpickle  # noqa: E402

from cape_ray import checkpoint as ckpt, engine, rng  # noqa: E402
from cape_ray.config import TrainConfig  # noqa: E402
from cape_ray.data.episodes import TrainingBatches  # noqa: E402
from cape_ray.data.loading import load_split  # noqa: E402
from cape_ray.job import build_trainer  # noqa: E402
from cape_ray.model import build_model  # noqa: E402
from cape_ray.state import TrainState  # noqa: E402


def plain_loop_steps_per_second(config: TrainConfig, steps: int, warmup: int = 5) -> float:
    """The worker's own batches and optimizer step (engine.train_step), in this process, without Ray."""
    torch.set_num_threads(config.num_threads)
    split = load_split(config, "train", config.num_queries_per_episode)
    batches = TrainingBatches(split, config, 0, 1, torch.device("cpu"))
    rng.seed_everything(config.seed)
    model = build_model(config)
    optimizer = engine.build_optimizer(model, config)
    scheduler = engine.build_scheduler(optimizer, config, config.steps_per_epoch * config.epochs)
    model.train()
    per_epoch, episodes_per_step = config.steps_per_epoch, config.batch_size * config.accumulation_steps
    elapsed = 0.0
    for i in range(warmup + steps):
        start = time.perf_counter()
        engine.train_step(model, optimizer, scheduler, batches.step(i // per_epoch, (i % per_epoch) * episodes_per_step),
                          config.grad_clip)
        if i >= warmup:
            elapsed += time.perf_counter() - start
    return steps / elapsed


def checkpoint_write_ratio(config: TrainConfig, repeats: int = 7) -> tuple[float, float, int]:
    """(checkpoint MB/s, raw torch.save MB/s, checkpoint bytes) for the real model + optimizer."""
    model = build_model(config)
    optimizer = engine.build_optimizer(model, config)
    scheduler = engine.build_scheduler(optimizer, config, 100)
    model(*_dummy_inputs(config)).sum().backward()
    optimizer.step()  # materialise the Adam moments
    rank_blob = ckpt.serialize({**rng.capture(), "loss_sum": 0.0, "loss_count": 0})
    state = TrainState.fresh(config, 1).state_dict()
    raw_times, checkpoint_times = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            start = time.perf_counter()
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict()}, Path(tmp, f"raw{i}.pt"))
            raw_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            ckpt.write_checkpoint(Path(tmp, f"ck{i}"), model=model.state_dict(), optimizer=optimizer.state_dict(),
                                  scheduler=scheduler.state_dict(), state=state, rank_states={0: rank_blob})
            checkpoint_times.append(time.perf_counter() - start)
        raw_bytes = Path(tmp, "raw0.pt").stat().st_size
        checkpoint_bytes = sum(p.stat().st_size for p in Path(tmp, "ck0").rglob("*") if p.is_file())
    return (checkpoint_bytes / statistics.median(checkpoint_times) / 1e6,
            raw_bytes / statistics.median(raw_times) / 1e6, checkpoint_bytes)


def _dummy_inputs(config: TrainConfig):
    s, k, q = config.image_size, 6, 1
    return (torch.rand(1, config.num_shots, 3, s, s), torch.rand(1, config.num_shots, k, 2),
            torch.ones(1, config.num_shots, k, dtype=torch.bool), torch.rand(1, q, 3, s, s),
            torch.ones(1, k, dtype=torch.bool), torch.zeros(1, k, k))


def kill_once_then_train(loop_config: dict) -> None:
    """Train; on the first attempt, SIGKILL this worker after `kill_after_steps` optimizer steps."""
    loop_config = dict(loop_config)
    plan = loop_config.pop("_kill_plan")
    from cape_ray import worker as worker_module

    step_fn = engine.train_step
    first_attempt = not os.path.exists(plan["marker"])
    steps_done = 0

    def timed_step(*args, **kwargs):
        nonlocal steps_done
        result = step_fn(*args, **kwargs)
        steps_done += 1
        if first_attempt and steps_done == plan["kill_after_steps"]:
            Path(plan["marker"]).write_text(json.dumps({"killed_at": time.time()}))
            os.kill(os.getpid(), signal.SIGKILL)
        if not first_attempt and steps_done == 1:
            Path(plan["restart"]).write_text(json.dumps({"first_step_at": time.time()}))
        return result

    engine.train_step = timed_step
    if not first_attempt:
        restored = ray.train.get_checkpoint()  # read now: retention may delete it later
        with restored.as_directory() as local:
            global_step = ckpt.read_state(local)["position"]["global_step"]
        Path(plan["restored"]).write_text(json.dumps({"name": restored.path.rstrip("/").rsplit("/", 1)[-1],
                                                      "global_step": global_step}))
    worker_module.train_loop_per_worker(loop_config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--checkpoint_every_steps", type=int, default=None,
                        help="default: the config default")
    args = parser.parse_args()
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")  # Ray's default poll interval
    work = Path(tempfile.mkdtemp(prefix="cape_ray_bench_"))
    changes = {"epochs": args.epochs, "storage_path": str(work), "num_workers": "1", "max_failures": 1}
    if args.checkpoint_every_steps is not None:
        changes["checkpoint_every_steps"] = args.checkpoint_every_steps
    config = TrainConfig(**changes)
    print(f"config: {config.steps_per_epoch} steps/epoch x {config.epochs} epochs, batch {config.batch_size}, "
          f"checkpoint every {config.checkpoint_every_steps or 'epoch only'} steps, {config.num_threads} thread(s)")

    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        # 1 + 2: the Ray job, timed inside the worker with the same timer as the plain loop.
        result = build_trainer(config.replace(name="overhead")).fit()
        metrics = result.metrics
        ray_train_s, ray_ckpt_s = metrics["train_time_total_s"], metrics["checkpoint_time_total_s"]
        ray_steps = metrics["global_step"]
        # The last epoch-end report is not in its own totals: count the ones before it only.
        ray_rate = ray_steps / (ray_train_s + ray_ckpt_s)
        plain_rate = plain_loop_steps_per_second(config, steps=min(ray_steps, 150))

        # 3: checkpoint writes vs raw torch.save
        ck_mbs, raw_mbs, ck_bytes = checkpoint_write_ratio(config)

        # 4: kill -> restart
        cloudpickle.register_pickle_by_value(__import__(__name__))
        plan = {name: str(work / f"{name}.json") for name in ("marker", "restart", "restored")}
        kill_after = config.steps_per_epoch + max(1, config.steps_per_epoch // 2)  # mid-epoch 2
        plan["kill_after_steps"] = kill_after
        kill_config = config.replace(name="kill", epochs=2)
        build_trainer(kill_config, kill_once_then_train, {**kill_config.to_dict(), "_kill_plan": plan}).fit()
        killed_at = json.loads(Path(plan["marker"]).read_text())["killed_at"]
        first_step_at = json.loads(Path(plan["restart"]).read_text())["first_step_at"]
        restored = json.loads(Path(plan["restored"]).read_text())
        restored_name, steps_lost = restored["name"], kill_after - restored["global_step"]
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'measure':58s} {'value':>14s}  goal")
    print(f"{'Ray job (1 worker) steps/s incl. checkpoint stalls':58s} {ray_rate:14.2f}")
    print(f"{'plain loop steps/s (same train_step, no Ray)':58s} {plain_rate:14.2f}")
    print(f"{'  ratio Ray / plain':58s} {ray_rate / plain_rate:13.3f}x  >= 0.95x")
    print(f"{'share of training time spent checkpointing':58s} {100 * ray_ckpt_s / (ray_train_s + ray_ckpt_s):13.2f}%  <= 2%")
    print(f"{'checkpoint write MB/s (manifest + SHA-256 included)':58s} {ck_mbs:14.1f}")
    print(f"{'raw torch.save MB/s (same tensors)':58s} {raw_mbs:14.1f}")
    print(f"{'  ratio checkpoint / raw':58s} {ck_mbs / raw_mbs:13.3f}x  >= 0.8x")
    print(f"{'checkpoint size (bytes)':58s} {ck_bytes:14d}")
    print(f"{'worker SIGKILL -> first step after restart (s)':58s} {first_step_at - killed_at:14.1f}")
    print(f"{'steps of work lost (resumed from ' + restored_name[:24] + '...)':58s} {steps_lost:14d}")


if __name__ == "__main__":
    main()
