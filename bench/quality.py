"""Quality benchmark: train the default config on the built-in synthetic categories for a time
budget in one process, then report PCK on the unseen TEST categories next to two baselines
(copy the support keypoints; predict the image centre), all from the same run.

Also prints how fast episodes are generated (augmented batches) versus consumed by training steps.

    python bench/quality.py [--minutes 10] [--threads 2] [--set lr=0.002 --set batch_size=32]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cape_ray import engine  # noqa: E402
from cape_ray.config import TrainConfig  # noqa: E402
from cape_ray.data.episodes import EpisodeSampler, TrainingBatches, collate  # noqa: E402
from cape_ray.data.loading import load_split  # noqa: E402
from cape_ray.model import build_model  # noqa: E402


def parse_overrides(pairs: list[str]) -> dict:
    """--set key=value pairs, typed after the TrainConfig default of that key."""
    defaults = TrainConfig().to_dict()
    changes = {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        if key not in defaults:
            raise SystemExit(f"--set {pair}: unknown config key {key!r}")
        default = defaults[key]
        if isinstance(default, bool):
            changes[key] = text.lower() in ("1", "true", "yes")
        elif isinstance(default, (int, float)):
            changes[key] = type(default)(float(text))
        else:
            changes[key] = text
    return changes


def evaluate(model: torch.nn.Module, split, episodes, batch_episodes: int = 4) -> dict[str, float]:
    """The evaluation loop of validation and `cape-ray evaluate` (feature bank, per-category batches)."""
    return engine.summarize(engine.total_sums(engine.evaluate_episodes(model, split, episodes, batch_episodes,
                                                                        with_loss=True)))


def evaluate_baseline(predict, split, episodes, batch_episodes: int = 64) -> dict[str, float]:
    sums: dict[str, float] = {}
    for start in range(0, len(episodes), batch_episodes):
        batch = collate(split, episodes[start:start + batch_episodes])
        engine.add_sums(sums, engine.pck_sums(predict(batch), engine.batch_tensors(batch, torch.device("cpu"))))
    return engine.summarize(sums)


def line(name: str, metrics: dict[str, float]) -> str:
    return f"  {name:<14} PCK@0.2 {metrics['val_pck']:.4f}   mPCK {metrics['mpck']:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget (data + steps + validation)")
    parser.add_argument("--steps", type=int, default=0, help="fixed number of steps (0 = plan from the budget)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--val-every", type=float, default=90.0, help="seconds between validations")
    parser.add_argument("--val-episodes", type=int, default=6, help="fixed episodes per val category")
    parser.add_argument("--test-episodes", type=int, default=None, help="per test category (default: config)")
    parser.add_argument("--similarity-weight", type=float, default=engine.SIMILARITY_LOSS_WEIGHT,
                        help="weight of the auxiliary similarity cross-entropy (ablation)")
    parser.add_argument("--save", default="", help="write the best weights here (for inspection)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    engine.SIMILARITY_LOSS_WEIGHT = args.similarity_weight
    config = TrainConfig(**parse_overrides(args.set))
    torch.manual_seed(config.seed)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"config: {config.to_dict()}")
    print(f"similarity loss weight {engine.SIMILARITY_LOSS_WEIGHT}")
    print(f"threads {args.threads}, load average at start {load:.2f} on {os.cpu_count()} cores")

    started = time.perf_counter()
    train = load_split(config, "train", config.num_queries_per_episode)
    val = load_split(config, "val", config.val_queries_per_episode)
    test = load_split(config, "test", config.val_queries_per_episode)
    print(f"data: {len(train)} train / {len(val)} val / {len(test)} test instances, "
          f"prepared in {time.perf_counter() - started:.1f}s")
    val_episodes = EpisodeSampler(val, config.num_shots, config.val_queries_per_episode,
                                  seed=config.data_seed).fixed_episodes(args.val_episodes)
    test_episodes = EpisodeSampler(test, config.num_shots, config.val_queries_per_episode,
                                   seed=config.data_seed).fixed_episodes(args.test_episodes or config.val_episodes)

    batches = TrainingBatches(train, config, 0, 1, torch.device("cpu"))
    episodes_per_step = config.batch_size * config.accumulation_steps

    def training_batches(step: int):
        epoch, position = divmod(step, config.steps_per_epoch)
        return batches.step(epoch, position * episodes_per_step)

    # data throughput on its own: building augmented training batches (after one warm-up batch)
    training_batches(10_000)
    data_started = time.perf_counter()
    data_steps = 20
    for step in range(data_steps):
        training_batches(10_001 + step)
    data_rate = data_steps * episodes_per_step / (time.perf_counter() - data_started)

    model = build_model(config)
    optimizer = engine.build_optimizer(model, config)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"model: {parameters:,} parameters ({config.backbone} backbone, {config.refine_layers} refinement layers)")

    budget = args.minutes * 60.0
    train_started = time.perf_counter()
    step_seconds = data_seconds = val_seconds = 0.0

    def train_step(step: int, scheduler=None) -> float:
        nonlocal step_seconds, data_seconds
        t0 = time.perf_counter()
        micro_batches = training_batches(step)
        t1 = time.perf_counter()
        model.train()
        losses = engine.train_step(model, optimizer, scheduler, micro_batches, config.grad_clip)
        t2 = time.perf_counter()
        data_seconds += t1 - t0
        step_seconds += t2 - t1
        return float(losses.mean())

    # The LR schedule needs its length in steps, the budget is in seconds: plan from measured speed
    # and re-plan at every validation (the machine may be shared, so speed drifts).
    def plan(step: int, seconds_per_validation: float) -> int:
        if args.steps:
            return args.steps
        elapsed = time.perf_counter() - train_started
        seconds_per_step = (elapsed - val_seconds) / step
        left = budget - elapsed
        validations_left = math.ceil(left / args.val_every)
        return step + max(1, int((left - validations_left * seconds_per_validation) / seconds_per_step))

    def validate(step: int) -> float:
        nonlocal val_seconds, best, best_state
        t0 = time.perf_counter()
        metrics = evaluate(model, val, val_episodes)
        seconds = time.perf_counter() - t0
        val_seconds += seconds
        marker = ""
        if metrics["val_pck"] > best["val_pck"]:
            best = {"val_pck": metrics["val_pck"], "step": step}
            best_state = copy.deepcopy(model.state_dict())
            marker = " *"
        elapsed = time.perf_counter() - train_started
        mean_loss = sum(recent_loss) / max(1, len(recent_loss))
        recent_loss.clear()
        print(f"  {elapsed:6.0f}s step {step:5d} lr {optimizer.param_groups[0]['lr']:.2e} "
              f"train loss {mean_loss:.4f}  val loss {metrics['val_loss']:.4f}  "
              f"val PCK@0.2 {metrics['val_pck']:.4f}{marker}", flush=True)
        return seconds

    best = {"val_pck": -1.0, "step": 0}
    best_state = None
    recent_loss: list[float] = []
    calibration_steps = 10
    scheduler = engine.build_scheduler(optimizer, config, total_steps=args.steps or 10**9)
    for step in range(calibration_steps):
        recent_loss.append(train_step(step, scheduler))
    step = calibration_steps
    total_steps = plan(step, validate(step))
    print(f"planned {total_steps} steps of {config.batch_size} episodes", flush=True)
    last_val = time.perf_counter()
    while step < total_steps and time.perf_counter() - train_started < budget:
        if step == calibration_steps or time.perf_counter() - last_val >= args.val_every:
            if step > calibration_steps:
                seconds = validate(step)
                total_steps = plan(step, seconds)
                last_val = time.perf_counter()
            state = scheduler.state_dict()
            scheduler = engine.build_scheduler(optimizer, config, total_steps=total_steps)
            scheduler.load_state_dict(state)
        recent_loss.append(train_step(step, scheduler))
        step += 1
    validate(step)
    train_seconds = time.perf_counter() - train_started
    episodes_trained = step * episodes_per_step
    train_rate = episodes_trained / step_seconds

    model.load_state_dict(best_state)
    if args.save:
        torch.save({"config": config.to_dict(), "model": best_state}, args.save)
    t0 = time.perf_counter()
    results = {
        "model": evaluate(model, test, test_episodes),
        "copy-support": evaluate_baseline(engine.copy_support_predictions, test, test_episodes),
        "image-centre": evaluate_baseline(engine.center_predictions, test, test_episodes),
    }
    test_seconds = time.perf_counter() - t0
    pairs = len(test_episodes) * config.val_queries_per_episode
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    print()
    print(f"trained {step} steps = {episodes_trained} episodes in {train_seconds:.0f}s "
          f"(steps {step_seconds:.0f}s, data {data_seconds:.0f}s, validation {val_seconds:.0f}s); "
          f"best val PCK@0.2 {best['val_pck']:.4f} at step {best['step']}")
    print(f"TEST: {len(test.category_ids)} unseen categories, {pairs} support-query pairs "
          f"({config.num_shots}-shot), evaluated in {test_seconds:.0f}s")
    for name, metrics in results.items():
        print(line(name, metrics))
    print("  model per threshold: " + "  ".join(f"{k} {v:.4f}" for k, v in results["model"].items()
                                                 if k.startswith("pck@")))
    loop_data_rate = episodes_trained / data_seconds
    print(f"THROUGHPUT: data {data_rate:.0f} episodes/s standalone, {loop_data_rate:.0f} episodes/s inside the "
          f"training loop (augmented batches); training {train_rate:.1f} episodes/s (steps only) -> ratio "
          f"{data_rate / train_rate:.0f}x standalone, {loop_data_rate / train_rate:.0f}x in the loop")
    print(f"load average at end {load:.2f}")


if __name__ == "__main__":
    main()
