"""Evaluation throughput: the batched evaluation of `cape-ray evaluate` next to pair-by-pair evaluation
(one support set + one query per forward, every image encoded again each time: how the MP-100
reference code evaluates), on the same fixed episodes with the same model, in one run.

Three paths, all producing the same PCK sums:
  reference   one forward per support-query pair (batch size 1)
  batched     --batch-size episodes per forward, all 15 queries of an episode share its supports
  bank        batched, and the backbone runs once per instance into a feature bank (the default of
              `cape-ray evaluate`)

    python bench/eval_throughput.py [--checkpoint DIR] [--categories 2] [--episodes 200]
                                    [--reference-episodes 8] [--batch-size 16] [--threads 1]

The reference path is slow (15 forwards per episode), so it is timed on the first
--reference-episodes episodes of every category; its rate per episode does not depend on how many
episodes there are. The batched paths run on all episodes, as an evaluation does: the bank's gain
grows with the episodes per category (MP-100: 200 for test), because instances repeat across them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cape_ray import engine, evaluate  # noqa: E402
from cape_ray.config import TrainConfig  # noqa: E402
from cape_ray.data.episodes import Episode, EpisodeSampler  # noqa: E402
from cape_ray.data.loading import load_split  # noqa: E402
from cape_ray.model import build_model  # noqa: E402


def pair_by_pair(model, split, episodes) -> dict[str, float]:
    """One forward per (support set, single query), every image encoded again: the reference evaluation."""
    pairs = [Episode(e.category_id, e.support_rows, query.reshape(1)) for e in episodes for query in e.query_rows]
    return engine.total_sums(engine.evaluate_episodes(model, split, pairs, 1, feature_bank=False))


def batched(model, split, episodes, batch_size: int, bank: bool) -> dict[str, float]:
    return engine.total_sums(engine.evaluate_episodes(model, split, episodes, batch_size, feature_bank=bank))


def timed(fn):
    """(value, wall seconds, CPU seconds of this process). With one thread, CPU time leaves out the
    time other processes on a shared machine take from us; wall time is what a user waits."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - wall, time.process_time() - cpu


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="evaluate this checkpoint (default: a fresh model)")
    parser.add_argument("--categories", type=int, default=2, help="test categories to use")
    parser.add_argument("--episodes", type=int, default=200, help="episodes per category (MP-100 test: 200)")
    parser.add_argument("--queries", type=int, default=evaluate.MP100_QUERIES)
    parser.add_argument("--reference-episodes", type=int, default=8,
                        help="episodes per category timed pair by pair")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="episodes per forward (batched paths; default: evaluate's for the device)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved timing rounds (median reported): load from other processes "
                             "then hits every path alike")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (all paths)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.batch_size is None:
        args.batch_size = evaluate.default_batch_size(device)

    if args.checkpoint:
        ev = evaluate.setup(args.checkpoint, "test", episodes=args.episodes, queries=args.queries, device=args.device)
        model, split, config = ev.model, ev.data, ev.config
    else:
        config = TrainConfig()
        torch.manual_seed(0)
        model = build_model(config).to(device).eval()
        split = load_split(config, "test", args.queries)
    sampler = EpisodeSampler(split, config.num_shots, args.queries, seed=config.data_seed)
    chosen = set(split.category_ids[:args.categories])
    episodes = [e for e in sampler.fixed_episodes(args.episodes) if e.category_id in chosen]
    seen: dict[int, int] = {}
    reference_episodes = []
    for episode in episodes:  # the first --reference-episodes of every category
        seen[episode.category_id] = seen.get(episode.category_id, 0) + 1
        if seen[episode.category_id] <= args.reference_episodes:
            reference_episodes.append(episode)
    print(f"model: {sum(p.numel() for p in model.parameters())} parameters, backbone {config.backbone}, "
          f"image {config.image_size}px; device {device}, {args.threads} thread(s)")
    print(f"episodes: {len(chosen)} test categories x {args.episodes} x {args.queries} queries "
          f"({len(episodes) * args.queries} pairs); reference timed on {len(reference_episodes)} of them; "
          f"{args.rounds} rounds")

    # warm-up: first calls allocate and pick kernels
    batched(model, split, episodes[:2], args.batch_size, bank=False)
    pair_by_pair(model, split, episodes[:1])

    names = ("reference (1 pair per forward)", f"batched ({args.batch_size} episodes per forward)",
             f"batched + feature bank ({args.batch_size} episodes per forward)")
    paths = (
        (reference_episodes, lambda: pair_by_pair(model, split, reference_episodes)),
        (episodes, lambda: batched(model, split, episodes, args.batch_size, bank=False)),
        (episodes, lambda: batched(model, split, episodes, args.batch_size, bank=True)),
    )
    wall_rates: dict[str, list[float]] = {n: [] for n in names}
    cpu_rates: dict[str, list[float]] = {n: [] for n in names}
    results: dict[str, dict[str, float]] = {}
    for _ in range(args.rounds):
        for name, (subset, fn) in zip(names, paths):
            results[name], wall, cpu = timed(fn)
            wall_rates[name].append(len(subset) / wall)
            cpu_rates[name].append(len(subset) / cpu)
    bank_subset = batched(model, split, reference_episodes, args.batch_size, bank=True)

    print(f"\n  {'path':<58} {'wall clock':>20} {'CPU time':>20}")
    base_wall, base_cpu = median(wall_rates[names[0]]), median(cpu_rates[names[0]])
    for name in names:
        wall, cpu = median(wall_rates[name]), median(cpu_rates[name])
        print(f"  {name:<58} {wall:7.2f} ep/s {wall / base_wall:5.1f}x {cpu:7.2f} ep/s {cpu / base_cpu:5.1f}x")

    # the same numbers from every path (PCK hits are sums over pairs)
    pck = engine.pck_key(0.20) + "_sum"
    for name, a, b in (("reference vs bank, same episodes", results[names[0]], bank_subset),
                       ("batched vs bank, all episodes", results[names[1]], results[names[2]])):
        print(f"  PCK@0.2 hits {name}: {a[pck]:.1f} vs {b[pck]:.1f} over {int(a['pairs'])} pairs")
    wall, cpu = median(wall_rates[names[2]]), median(cpu_rates[names[2]])
    print(f"\nratio batched evaluation / batch-size-1 evaluation: {wall / base_wall:.1f}x wall clock "
          f"({wall:.2f} vs {base_wall:.2f} episodes/s), {cpu / base_cpu:.1f}x CPU time "
          f"({cpu:.2f} vs {base_cpu:.2f} episodes/s)")


if __name__ == "__main__":
    main()
