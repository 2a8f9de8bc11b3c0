"""The guarantees at model scale: the CNN, ViT-S/14 and ViT-B/14 (224 px), each trained as a Ray
Train job with two workers and, over the same model and batches, in a plain single-process loop.

Printed per model:
  parameters             all, and trained
  checkpoint             bytes of one checkpoint (model, optimizer, schedule, state, RNG)
  s/step Ray job         median seconds per optimizer step on a worker of the 2-worker job (after
                         the first step, which pays one-off costs)
  s/step plain loop      the same median in one process without Ray: the same model, rank 0's
                         batches of the same layout (batch per worker), the same thread count,
                         alone on the machine
  s/step plain, 2 at once  the same, with two such processes at once (rank 0's and rank 1's
                         batches): the machine load of the 2-worker job without Ray and DDP
  ratios                 plain / Ray, for each of the two plain figures (goal >= 0.95: Ray and DDP
                         cost at most 5%). Two busy processes on a machine share its memory
                         bandwidth and caches whatever runs them; the second ratio leaves that out
                         and measures what Ray and DDP add, the first includes it
  blocked by checkpoint  seconds the training thread waited for the epoch's checkpoint (the
                         background writer: a copy in memory), and that as a share of a 10-minute
                         epoch with one checkpoint (goal <= 2%)
  peak RSS per worker    the largest resident memory of a worker process (ru_maxrss)

    python bench/model_scale.py [--models cnn,vit_small_patch14_dinov2,vit_base_patch14_dinov2]
                                [--steps 5] [--rounds 2] [--batch_size 2] [--image_size 224]

Each Ray job trains one epoch of `steps + 1` optimizer steps and writes one checkpoint at its end;
validation is one episode per category. Each model is measured in `--rounds` rounds of the three
(the Ray job, the plain loop alone, two plain loops at once; every other round in the reverse
order), and each figure is the median of every timed step of its kind: on a shared machine a
burst of other work lands in one round of one kind rather than deciding a ratio. The machine's
load is printed: the figures move with it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cape_ray import engine, rng  # noqa: E402
from cape_ray.config import TrainConfig  # noqa: E402
from cape_ray.data.episodes import TrainingBatches  # noqa: E402
from cape_ray.data.loading import load_split  # noqa: E402
from cape_ray.model import build_model, describe, model_spec  # noqa: E402

WORKERS = 2
TEN_MINUTES = 600.0


def config_for(model: str, args, root: str, name: str) -> TrainConfig:
    steps = args.steps + 1  # the first step pays one-off costs and is not timed
    common = dict(name=name, storage_path=root, epochs=1, batch_size=args.batch_size, accumulation_steps=1,
                  episodes_per_epoch=steps * args.batch_size * WORKERS, num_workers=str(WORKERS), val_episodes=1,
                  val_queries_per_episode=2, checkpoint_every_steps=0, keep=0, max_failures=0, progress="lines",
                  num_threads=1, tracker="none", image_size=args.image_size)
    if model == "cnn":
        return TrainConfig(model="cnn", **common)
    return TrainConfig(model="vit", backbone=model, **common)


def timed_train(loop_config: dict) -> None:
    """The real worker loop; every optimizer step timed, and this process's peak RSS, into files."""
    from cape_ray import engine as engine_module
    from cape_ray.checkpointer import Checkpointer
    from cape_ray.worker import train_loop_per_worker

    loop_config = dict(loop_config)
    out = loop_config.pop("_bench_out")
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    step = engine_module.train_step
    times = []

    def timed(*args, **kwargs):
        started = time.perf_counter()
        result = step(*args, **kwargs)
        times.append(time.perf_counter() - started)
        return result

    save, blocked = Checkpointer.save, []

    def timed_save(*args, **kwargs):  # what the training thread waits for (the writer does the rest)
        started = time.perf_counter()
        save(*args, **kwargs)
        blocked.append(time.perf_counter() - started)

    engine_module.train_step = timed
    Checkpointer.save = timed_save
    train_loop_per_worker(loop_config)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(out, f"rank{rank}.json").write_text(json.dumps({"step_s": times, "peak_rss": peak, "blocked_s": blocked}))


def ray_job(config: TrainConfig, out: Path) -> dict:
    from ray import cloudpickle

    from cape_ray.job import build_trainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    out.mkdir(parents=True, exist_ok=True)
    result = build_trainer(config, timed_train, {**config.to_dict(), "_bench_out": str(out)}).fit()
    if result.error is not None:
        raise result.error
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORKERS)]
    run_dir = Path(config.storage_path) / config.name
    checkpoint = next(p for p in run_dir.iterdir() if p.name.startswith("checkpoint_e001") and p.is_dir())
    return {"times": [t for r in ranks for t in r["step_s"][1:]],
            "peak_rss": max(r["peak_rss"] for r in ranks),
            "blocked_s": max(sum(r["blocked_s"]) for r in ranks),
            "checkpoint_bytes": sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())}


def plain_loop(config: TrainConfig, steps: int, rank: int = 0) -> dict:
    """Rank `rank`'s batches of the 2-worker layout, the same optimizer step, no Ray and no DDP."""
    torch.set_num_threads(config.num_threads)
    split = load_split(config, "train", config.num_queries_per_episode)
    batches = TrainingBatches(split, config, rank, WORKERS, torch.device("cpu"))
    rng.seed_everything(config.seed)
    model = build_model(config)
    optimizer = engine.build_optimizer(model, config)
    model.train()
    times = []
    for step in range(steps + 1):
        started = time.perf_counter()
        engine.train_step(model, optimizer, None, batches.step(0, step * config.batch_size * WORKERS), config.grad_clip)
        times.append(time.perf_counter() - started)
    record = describe(model, model_spec(config))
    return {"times": times[1:], "parameters": record["parameters"],
            "trainable": record["trainable_parameters"]}


def plain_loops_at_once(config: TrainConfig, steps: int) -> dict:
    """`plain_loop` in WORKERS processes at once, rank r's batches in process r: their steps' times."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("spawn")) as pool:
        loops = [pool.submit(plain_loop, config, steps, rank) for rank in range(WORKERS)]
        return {"times": [t for loop in loops for t in loop.result()["times"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn,vit_small_patch14_dinov2,vit_base_patch14_dinov2")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per model (after a first one)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the three measurements per model")
    parser.add_argument("--batch_size", type=int, default=2, help="episodes per worker per step")
    parser.add_argument("--image_size", type=int, default=224)
    args = parser.parse_args()
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")

    import ray

    print(f"# python bench/model_scale.py --models {args.models} --steps {args.steps} --rounds {args.rounds} "
          f"--batch_size {args.batch_size} --image_size {args.image_size}")
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.1f}; {WORKERS} workers x 1 thread, {args.batch_size} episodes (1 support + 2 "
          f"queries) per worker per step")
    rows = []
    with tempfile.TemporaryDirectory(prefix="cape_ray_scale_") as root:
        ray.init(include_dashboard=False, log_to_driver=False, num_cpus=WORKERS)
        try:
            for model in args.models.split(","):
                rounds = []
                for index in range(args.rounds):
                    config = config_for(model, args, root, f"{model.replace('_patch14_dinov2', '')}_{index}")
                    kinds = {"ray": lambda: ray_job(config, Path(root) / f"{config.name}_out"),
                             "alone": lambda: plain_loop(config, args.steps),
                             "both": lambda: plain_loops_at_once(config, args.steps)}
                    # every other round reversed: a drift in the machine's speed evens out
                    order = list(kinds) if index % 2 == 0 else list(kinds)[::-1]
                    measured = {kind: kinds[kind]() for kind in order}
                    rounds.append((measured["ray"], measured["alone"], measured["both"]))
                job = {**rounds[0][0], "step_s": statistics.median(t for r in rounds for t in r[0]["times"]),
                       "peak_rss": max(r[0]["peak_rss"] for r in rounds),
                       "blocked_s": statistics.median(r[0]["blocked_s"] for r in rounds)}
                plain = {**rounds[0][1], "step_s": statistics.median(t for r in rounds for t in r[1]["times"])}
                both = {"step_s": statistics.median(t for r in rounds for t in r[2]["times"])}
                rows.append((model, plain, both, job))
                print(f"  {model}: done", flush=True)
        finally:
            ray.shutdown()
    print(f"# load after: {os.getloadavg()[0]:.1f}")
    header = (f"| model | parameters (trained) | checkpoint | s/step Ray job | s/step plain loop alone "
              f"| plain alone/Ray | s/step plain, {WORKERS} at once | plain {WORKERS} at once/Ray (goal >= 0.95) "
              f"| blocked by the checkpoint | share of a 10-min epoch (goal <= 2%) | peak RSS per worker |")
    print(header)
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model, plain, both, job in rows:
        print(f"| {model} | {plain['parameters'] / 1e6:.2f}M ({plain['trainable'] / 1e6:.2f}M) | "
              f"{job['checkpoint_bytes'] / 1e6:.0f} MB | {job['step_s']:.3f} | {plain['step_s']:.3f} | "
              f"{plain['step_s'] / job['step_s']:.3f} | {both['step_s']:.3f} | {both['step_s'] / job['step_s']:.3f} | "
              f"{job['blocked_s']:.2f} s | {100 * job['blocked_s'] / TEN_MINUTES:.3f}% | "
              f"{job['peak_rss'] / 1e9:.2f} GB |")


if __name__ == "__main__":
    main()
