"""Quality benchmark: train in one process for a budget, then report PCK@0.2 on the unseen TEST
categories next to two baselines (copy the support keypoints; predict the image centre).

Budget. By default the budget counts this process's CPU time (time.process_time), so that runs on
a machine shared with other work compare: 1,200 CPU-seconds stand for 10 minutes of 2 threads on a
quiet 2-core machine. OpenMP threads are told to sleep rather than spin while they wait
(OMP_WAIT_POLICY=PASSIVE, set here before torch loads), or a descheduled partner thread would turn
waiting into CPU time: on a loaded machine spinning tripled the CPU time of a step. `--minutes`
keeps the old wall-clock budget. Either way the budget covers training steps and validation, not
data generation or the final test; both the CPU-seconds and the wall time are printed.

One run (default): the default config (cnn model, built-in data, 1-shot) or what --data, --model,
--shots and --set change; it also prints how fast augmented batches are built versus consumed.

The table (--table): both built-in sets x every model of --model (cnn; vit at a CPU size, VIT_CPU)
x 1-shot and 5-shot, each trained and tested at the same budget, with the copy-support and
image-centre baselines as rows; one markdown table. --out keeps every finished cell in a JSON file,
and a later run with the same file and budget skips them (a long table survives an interruption).

    python bench/quality.py [--cpu-seconds 1200 | --minutes 10] [--threads 2] [--data builtin-hard]
                            [--model vit] [--shots 5] [--set lr=0.002 --set batch_size=32]
    python bench/quality.py --table [--cpu-seconds 300] [--out bench_quality.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads its OpenMP runtime
os.environ.setdefault("KMP_BLOCKTIME", "0")

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cape_ray import engine  # noqa: E402
from cape_ray.config import TrainConfig  # noqa: E402
from cape_ray.data.episodes import EpisodeSampler, TrainingBatches, collate  # noqa: E402
from cape_ray.data.loading import load_split  # noqa: E402
from cape_ray.model import build_model  # noqa: E402

SETS = ("builtin", "builtin-hard")
MODELS = ("cnn", "vit")
SHOTS = (1, 5)
# --model vit sized for 2 CPU cores (ViT-S/14 at 224 px trains a few hundred steps in 10 minutes
# there): a ViT-Ti layout (width 192, 3 heads) cut to 4 blocks with 8-px patches, at the cnn's 64-px
# crops (an 8 x 8 token grid), a 128-wide decoder of 2 layers; 2.5M parameters trained from scratch
# at lr 1e-3 (3e-3, the cnn's, did worse), about 1.2x the cnn's CPU-seconds per training step.
# 4-px patches (a 16 x 16 grid) cost 4.5x per step and did no better in 300 CPU-seconds.
VIT_CPU = dict(model="vit", backbone="vit_tiny_patch16_224", image_size=64, feature_dim=128, refine_layers=2,
               lr=1e-3, model_kwargs={"backbone_args": {"patch_size": 8, "depth": 4}})
BASELINES = {"copy-support": engine.copy_support_predictions, "image-centre": engine.center_predictions}


def parse_overrides(pairs: list[str]) -> dict:
    """--set key=value pairs, typed after the TrainConfig default of that key (JSON for dicts)."""
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
        elif isinstance(default, dict):
            changes[key] = json.loads(text)
        elif default is None and text.lstrip("-").isdigit():
            changes[key] = int(text)
        else:
            changes[key] = text
    return changes


def cell_config(data: str, model: str, shots: int, overrides: dict) -> TrainConfig:
    """The default config on `data` with `model` (vit: VIT_CPU) and `shots`, then --set overrides."""
    changes = dict(VIT_CPU) if model == "vit" else {"model": model}
    changes.update(data=data, num_shots=shots)
    changes.update(overrides)
    return TrainConfig(**changes)


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


class Clock:
    """The budget's clock (CPU seconds of this process, or wall seconds) next to the wall clock."""

    def __init__(self, cpu: bool):
        self.cpu = cpu
        self.unit = "CPU-s" if cpu else "s"
        self.read = time.process_time if cpu else time.perf_counter


_SPLITS: dict[tuple, object] = {}


def splits_for(config: TrainConfig):
    """(train, val, test) prepared splits, kept for the next cell that needs the same ones."""
    key = (config.data, config.data_seed, config.synthetic_instances_per_category, config.synthetic_canvas,
           config.data_root, config.image_size, config.num_shots)
    if key not in _SPLITS:
        _SPLITS.clear()  # one set at a time in memory
        _SPLITS[key] = (load_split(config, "train", config.num_queries_per_episode),
                        load_split(config, "val", config.val_queries_per_episode),
                        load_split(config, "test", config.val_queries_per_episode))
    return _SPLITS[key]


def train_and_test(config: TrainConfig, args, clock: Clock, verbose: bool = True) -> dict:
    """Train `config` for the budget, keep the best validated weights, test them and the baselines."""
    torch.manual_seed(config.seed)
    say = print if verbose else (lambda *a, **k: None)
    started, cpu_started = time.perf_counter(), time.process_time()
    train, val, test = splits_for(config)
    data_seconds_wall = time.perf_counter() - started
    say(f"data: {len(train)} train / {len(val)} val / {len(test)} test instances ({config.data}), "
        f"ready in {time.process_time() - cpu_started:.1f} CPU-s, {data_seconds_wall:.1f}s")
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
    data_started = clock.read()
    data_steps = 20
    for step in range(data_steps):
        training_batches(10_001 + step)
    data_rate = data_steps * episodes_per_step / max(clock.read() - data_started, 1e-9)

    model = build_model(config)
    optimizer = engine.build_optimizer(model, config)
    parameters = sum(p.numel() for p in model.parameters())
    say(f"model: {config.model}, {parameters:,} parameters ({config.backbone} backbone, {config.refine_layers} "
        f"refinement layers, {config.image_size} px), {config.num_shots}-shot")

    budget = args.minutes * 60.0 if args.minutes else args.cpu_seconds
    train_started, wall_started = clock.read(), time.perf_counter()
    step_seconds = data_seconds = val_seconds = 0.0

    def train_step(step: int, scheduler=None) -> float:
        nonlocal step_seconds, data_seconds
        t0 = clock.read()
        micro_batches = training_batches(step)
        t1 = clock.read()
        model.train()
        losses = engine.train_step(model, optimizer, scheduler, micro_batches, config.grad_clip)
        t2 = clock.read()
        data_seconds += t1 - t0
        step_seconds += t2 - t1
        return float(losses.mean())

    # The LR schedule needs its length in steps, the budget is in seconds: plan from measured speed
    # and re-plan at every validation (the machine may be shared, so speed drifts).
    def plan(step: int, seconds_per_validation: float) -> int:
        if args.steps:
            return args.steps
        elapsed = clock.read() - train_started
        seconds_per_step = (elapsed - val_seconds) / step
        left = budget - elapsed
        validations_left = math.ceil(left / val_every)
        return step + max(1, int((left - validations_left * seconds_per_validation) / seconds_per_step))

    def validate(step: int) -> float:
        nonlocal val_seconds, best, best_state
        t0 = clock.read()
        metrics = evaluate(model, val, val_episodes)
        seconds = clock.read() - t0
        val_seconds += seconds
        marker = ""
        if metrics["val_pck"] > best["val_pck"]:
            best = {"val_pck": metrics["val_pck"], "step": step}
            best_state = copy.deepcopy(model.state_dict())
            marker = " *"
        elapsed = clock.read() - train_started
        mean_loss = sum(recent_loss) / max(1, len(recent_loss))
        recent_loss.clear()
        say(f"  {elapsed:6.0f}{clock.unit} {time.perf_counter() - wall_started:6.0f}s step {step:5d} "
            f"lr {optimizer.param_groups[0]['lr']:.2e} train loss {mean_loss:.4f}  val loss {metrics['val_loss']:.4f}  "
            f"val PCK@0.2 {metrics['val_pck']:.4f}{marker}", flush=True)
        return seconds

    # validations every val_every budget seconds: --val-every is in 2-thread wall seconds, so CPU
    # budgets validate at the same points of training
    val_every = args.val_every * (2.0 if clock.cpu else 1.0)
    best = {"val_pck": -1.0, "step": 0}
    best_state = None
    recent_loss: list[float] = []
    calibration_steps = 10
    scheduler = engine.build_scheduler(optimizer, config, total_steps=args.steps or 10**9)
    for step in range(calibration_steps):
        recent_loss.append(train_step(step, scheduler))
    step = calibration_steps
    total_steps = plan(step, validate(step))
    say(f"planned {total_steps} steps of {config.batch_size} episodes", flush=True)
    last_val = clock.read()
    while step < total_steps and clock.read() - train_started < budget:
        if step == calibration_steps or clock.read() - last_val >= val_every:
            if step > calibration_steps:
                seconds = validate(step)
                total_steps = plan(step, seconds)
                last_val = clock.read()
            progress = scheduler.progress  # the same position on the re-planned cosine
            scheduler = engine.build_scheduler(optimizer, config, total_steps=total_steps)
            scheduler.set_progress(progress)
        recent_loss.append(train_step(step, scheduler))
        step += 1
    validate(step)
    train_seconds = clock.read() - train_started
    train_wall = time.perf_counter() - wall_started

    model.load_state_dict(best_state)
    if args.save:
        torch.save({"config": config.to_dict(), "model": best_state}, args.save)
    t0 = time.perf_counter()
    results = {"model": evaluate(model, test, test_episodes)}
    for name, predict in BASELINES.items():
        results[name] = evaluate_baseline(predict, test, test_episodes)
    return {
        "data": config.data, "model": config.model, "shots": config.num_shots, "parameters": parameters,
        "threads": args.threads, "date": datetime.date.today().isoformat(),
        "steps": step, "episodes": step * episodes_per_step, "budget": budget, "budget_unit": clock.unit,
        "train_seconds": train_seconds, "train_wall_seconds": train_wall, "step_seconds": step_seconds,
        "data_seconds": data_seconds, "val_seconds": val_seconds, "best_val_pck": best["val_pck"],
        "best_step": best["step"], "test_categories": len(test.category_ids),
        "test_pairs": len(test_episodes) * config.val_queries_per_episode,
        "test_wall_seconds": time.perf_counter() - t0,
        "data_rate": data_rate, "results": results, "config": config.to_dict(),
    }


def report_run(run: dict, clock: Clock) -> None:
    results = run["results"]
    print()
    print(f"trained {run['steps']} steps = {run['episodes']} episodes in {run['train_seconds']:.0f} {clock.unit} "
          f"({run['train_wall_seconds']:.0f}s wall; steps {run['step_seconds']:.0f}, data {run['data_seconds']:.0f}, "
          f"validation {run['val_seconds']:.0f} {clock.unit}); best val PCK@0.2 {run['best_val_pck']:.4f} at step "
          f"{run['best_step']}")
    print(f"TEST: {run['test_categories']} unseen categories, {run['test_pairs']} support-query pairs "
          f"({run['shots']}-shot), evaluated in {run['test_wall_seconds']:.0f}s")
    for name, metrics in results.items():
        print(line(name, metrics))
    print("  model per threshold: " + "  ".join(f"{k} {v:.4f}" for k, v in results["model"].items()
                                                 if k.startswith("pck@")))
    train_rate = run["episodes"] / run["step_seconds"]
    loop_data_rate = run["episodes"] / run["data_seconds"]
    print(f"THROUGHPUT: data {run['data_rate']:.0f} episodes/{clock.unit} standalone, {loop_data_rate:.0f} inside "
          f"the training loop (augmented batches); training {train_rate:.1f} episodes/{clock.unit} (steps only) -> "
          f"ratio {run['data_rate'] / train_rate:.0f}x standalone, {loop_data_rate / train_rate:.0f}x in the loop")


def table(runs: dict[str, dict], budget_text: str) -> str:
    """One markdown table: a row per set x predictor, a column pair per shot count."""
    lines = [f"| set | predictor | 1-shot PCK@0.2 | 5-shot PCK@0.2 | training (1-shot / 5-shot) |",
             "|---|---|---|---|---|"]
    for data in SETS:
        rows: dict[str, dict[int, str]] = {}
        notes: dict[str, dict[int, str]] = {}
        for key, run in runs.items():
            if run["data"] != data:
                continue
            name = {"cnn": "cnn (default)", "vit": "vit (CPU size)"}.get(run["model"], run["model"])
            rows.setdefault(name, {})[run["shots"]] = f"{run['results']['model']['val_pck']:.3f}"
            notes.setdefault(name, {})[run["shots"]] = f"{run['steps']} steps"
            for baseline in BASELINES:
                rows.setdefault(baseline, {})[run["shots"]] = f"{run['results'][baseline]['val_pck']:.3f}"
        order = [n for n in rows if n not in BASELINES] + [n for n in BASELINES if n in rows]
        for name in order:
            by_shots = rows[name]
            note = " / ".join(notes.get(name, {}).get(s, "-") for s in SHOTS) if name in notes else "none"
            lines.append(f"| {data} | {name} | {by_shots.get(1, '-')} | {by_shots.get(5, '-')} | {note} |")
    lines.append("")
    lines.append(f"Budget per trained cell: {budget_text}. PCK@0.2 on the 20 unseen test categories of each set.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-seconds", type=float, default=1200.0,
                        help="training budget in CPU seconds of this process (default 1,200 = 10 minutes of 2 threads)")
    parser.add_argument("--minutes", type=float, default=0.0, help="wall-clock training budget instead (the old mode)")
    parser.add_argument("--steps", type=int, default=0, help="fixed number of steps (0 = plan from the budget)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--data", choices=SETS, default=None, help="built-in set (default: the config's)")
    parser.add_argument("--model", default=None,
                        help="cnn or vit (vit: the CPU size VIT_CPU); with --table a comma list (default cnn,vit)")
    parser.add_argument("--shots", type=int, choices=SHOTS, default=None, help="support images per episode")
    parser.add_argument("--table", action="store_true", help="every set x model x shot count, one table")
    parser.add_argument("--out", default="", help="with --table: JSON of finished cells (reused when rerun)")
    parser.add_argument("--val-every", type=float, default=90.0,
                        help="seconds between validations (2-thread seconds: doubled for a CPU budget)")
    parser.add_argument("--val-episodes", type=int, default=6, help="fixed episodes per val category")
    parser.add_argument("--test-episodes", type=int, default=None, help="per test category (default: config)")
    parser.add_argument("--similarity-weight", type=float, default=engine.SIMILARITY_LOSS_WEIGHT,
                        help="weight of the auxiliary similarity cross-entropy (ablation)")
    parser.add_argument("--save", default="", help="write the best weights here (for inspection)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    engine.SIMILARITY_LOSS_WEIGHT = args.similarity_weight
    clock = Clock(cpu=not args.minutes)
    overrides = parse_overrides(args.set)
    budget_text = (f"{args.minutes:g} minutes wall-clock" if args.minutes else
                   f"{args.cpu_seconds:g} CPU-seconds (= {args.cpu_seconds / 120:.3g} minutes of 2 threads)")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{datetime.date.today().isoformat()}: budget {budget_text}, {args.threads} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, load average at start {load:.2f} on "
          f"{os.cpu_count()} cores; similarity loss weight {engine.SIMILARITY_LOSS_WEIGHT}")

    if not args.table:
        base = TrainConfig(**overrides)
        config = cell_config(args.data or base.data, args.model or base.model, args.shots or base.num_shots, overrides)
        print(f"config: {config.to_dict()}")
        report_run(train_and_test(config, args, clock), clock)
    else:
        models = (args.model or ",".join(MODELS)).split(",")
        done: dict[str, dict] = {}
        if args.out and os.path.exists(args.out):
            with open(args.out) as fh:
                saved = json.load(fh)
            done = {k: v for k, v in saved.items() if v["budget"] == (args.minutes * 60 or args.cpu_seconds)
                    and v["budget_unit"] == clock.unit and v["threads"] == args.threads}
        for data in ([args.data] if args.data else reversed(SETS)):  # the hard set's cells first
            for shots in ([args.shots] if args.shots else SHOTS):
                for model in models:
                    key = f"{data}/{model}/{shots}"
                    config = cell_config(data, model, shots, overrides)
                    if key in done and done[key]["config"] == config.to_dict():
                        print(f"{key}: kept from {args.out}")
                        continue
                    print(f"\n=== {key}", flush=True)
                    run = train_and_test(config, args, clock)
                    report_run(run, clock)
                    done[key] = run
                    if args.out:
                        tmp = args.out + ".tmp"
                        with open(tmp, "w") as fh:
                            json.dump(done, fh, indent=1)
                        os.replace(tmp, args.out)
        print()
        print(table(done, budget_text))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average at end {load:.2f}")


if __name__ == "__main__":
    main()
