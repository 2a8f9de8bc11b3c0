"""MP-100 at full size, the data side: what the prepared-split cache buys, measured side by side in one run.

1. Writes the built-in categories at MP-100's sizes (`cape-ray make-data --mp100_sizes --scale S`):
   100 categories, K 5..35, JPEG images of 500-2,000 px; --scale shrinks the instance count for a
   small machine (image sizes stay), and every figure is also given per instance and extrapolated to
   the full-size training split.
2. Prepares the training split at --image_size: as without a cache (one thread, in memory), the
   cache's first build (all cores), a cached open (sizes, sealed times, sampled blocks: its cost does
   not grow with the split) and one with CAPE_VERIFY_CACHE=1 (every file hashed in full).
3. A worker SIGKILLed mid-epoch 2 -> its first optimizer step after Ray's restart (real Ray, real
   kill; 1 worker), with MP-100-sized data on a warm cache, with the built-in data, and with the
   MP-100-sized data without a cache.
4. Memory of 2 workers on this node, cache on vs off: PSS of each worker (/proc/PID/smaps_rollup)
   after the first step, and how much of it the prepared split takes.

    python bench/data_scale.py [--scale 0.05] [--image_size 256] [--restart_image_size 64] [--data DIR]

Goals printed next to the figures: restart -> first step with a warm cache <= 1.5x the built-in
data's; each extra worker on a node adds <= 10% of the prepared split's size; a first build uses
all cores. Shared machines are noisy: compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import ray  # noqa: E402
import torch  # noqa: E402
from ray import cloudpickle  # noqa: E402

import ray_overhead  # noqa: E402  (its kill-and-time train function)
from cape_ray.config import TrainConfig  # noqa: E402
from cape_ray.data import cache  # noqa: E402
from cape_ray.data.mp100 import annotation_path, load_mp100  # noqa: E402
from cape_ray.data.synthetic import synthetic_category_ids  # noqa: E402
from cape_ray.data.synthetic_large import export_mp100_sized, instances_per_category  # noqa: E402
from cape_ray.data.transforms import prepare  # noqa: E402
from cape_ray.job import build_trainer  # noqa: E402

MB = 1e6


def pss_bytes(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/smaps_rollup has no Pss line")


def mapped_pss_bytes(under: str, pid: int | str = "self") -> int:
    """PSS of the mappings of files under a directory (/proc/PID/smaps): this process's share of them."""
    total, inside = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = len(fields) >= 6 and fields[5].startswith(under)
        elif inside and fields[0] == "Pss:":
            total += int(fields[1]) * 1024
    return total


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_cpu_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs of the machine since boot, every process included."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user
    return total - idle, total


# ------------------------------------------------------------------------------------ 1. the data
def make_data(out: Path, scale: float, seed: int, threads: int) -> dict:
    started = time.perf_counter()
    export_mp100_sized(out, seed=seed, scale=scale, threads=threads)
    seconds = time.perf_counter() - started
    counts, pixels, files = {}, [], 0
    for subset in ("train", "val", "test"):
        content = json.loads(annotation_path(out, 1, subset).read_text())
        counts[subset] = len(content["annotations"])
        pixels += [image["width"] * image["height"] for image in content["images"]]
        files += len(content["images"])
    disk = sum(p.stat().st_size for p in (out / "images").rglob("*") if p.is_file())
    return {"seconds": seconds, "counts": counts, "images": files, "mean_mpx": sum(pixels) / len(pixels) / 1e6,
            "bytes_per_image": disk / files}


# ------------------------------------------------------------------------ 2. preparing the split
def measure_preparation(data: Path, cache_dir: Path, image_size: int) -> dict:
    torch.set_num_threads(1)  # as in a Ray worker
    annotation, images = annotation_path(data, 1, "train"), data / "images"

    wall, cpu = time.perf_counter(), cpu_seconds()
    in_memory = prepare(load_mp100(data, 1, "train"), image_size, 1, 2)
    without_cache, without_cache_cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    rows, split_bytes = len(in_memory), in_memory.images.numel()
    del in_memory

    def load():
        return load_mp100(data, 1, "train")

    wall, cpu, (busy, total) = time.perf_counter(), cpu_seconds(), machine_cpu_ticks()
    _, built = cache.open_or_build(cache_dir, annotation, images, image_size, 1, 2, load_dataset=load)
    build_wall, build_cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    busy_after, total_after = machine_cpu_ticks()
    machine_busy = (busy_after - busy) / (total_after - total)  # share of all cores busy, any process
    opens, full_opens = [], []
    for verify, times in (("", opens), ("1", full_opens)):
        os.environ[cache.VERIFY_ENV] = verify
        for _ in range(3):
            _, opened = cache.open_or_build(cache_dir, annotation, images, image_size, 1, 2, load_dataset=load)
            assert not opened.built
            times.append(opened.seconds)
    os.environ.pop(cache.VERIFY_ENV)
    # the validation split too, so that part 4 measures workers that only open the cache
    cache.open_or_build(cache_dir, annotation_path(data, 1, "val"), images, image_size, 1, 15,
                        load_dataset=lambda: load_mp100(data, 1, "val"))
    return {"rows": rows, "split_bytes": split_bytes, "without_cache": without_cache,
            "without_cache_cores": without_cache_cpu / without_cache, "build": build_wall,
            "threads": built.threads, "cores_busy": build_cpu / build_wall, "machine_busy": machine_busy,
            "open": min(opens), "full_open": min(full_opens)}


# ------------------------------------------------------------------------ 3. kill -> first step
def restart_seconds(config: TrainConfig, work: Path, name: str) -> float:
    """SIGKILL the single worker mid-epoch 2; seconds until its first optimizer step after the restart."""
    plan = {key: str(work / f"{name}_{key}.json") for key in ("marker", "restart", "restored")}
    steps = config.steps_per_epoch
    plan["kill_after_steps"] = steps + max(1, steps // 2)
    config = config.replace(name=name)
    result = build_trainer(config, ray_overhead.kill_once_then_train, {**config.to_dict(), "_kill_plan": plan}).fit()
    if result.error is not None:
        raise RuntimeError(f"the {name} run failed: {result.error}")
    killed_at = json.loads(Path(plan["marker"]).read_text())["killed_at"]
    return json.loads(Path(plan["restart"]).read_text())["first_step_at"] - killed_at


# ------------------------------------------------------------------------------------ 4. memory
def measure_memory_then_train(loop_config: dict) -> None:
    """Train, recording this worker's PSS right before it loads data, once both workers hold both splits
    (every page read once, as an epoch does), and after the first optimizer step."""
    loop_config = dict(loop_config)
    out = Path(loop_config.pop("_memory_out"))
    import torch.distributed as dist

    import cape_ray.data.cache  # noqa: F401  imported first: code is not data
    import cape_ray.data.mp100  # noqa: F401
    from cape_ray import engine, worker as worker_module

    rank = ray.train.get_context().get_world_rank()
    cache_dir = loop_config["cache_dir"]
    record = {"pid": os.getpid(), "split_bytes": 0}
    load, step = worker_module.load_split, engine.train_step

    def load_and_measure(config, subset, num_queries):
        if subset == "train":  # right before the first split: what the loop set up before is not data
            record["before_data"] = pss_bytes()
        split = load(config, subset, num_queries)
        int(split.images.view(-1)[::4096].sum())  # touch every page of the images
        record["split_bytes"] += sum(getattr(split, f).numel() * getattr(split, f).element_size()
                                     for f in ("images", "keypoints", "visible", "crop_to_original", "bbox",
                                               "category", "instance_ids"))
        if subset == "val":  # the worker loads train, then val
            if dist.is_initialized():
                dist.barrier()  # both workers hold both splits now
            record["with_data"] = pss_bytes()
            record["cache_files"] = mapped_pss_bytes(cache_dir) if cache_dir else 0
        return split

    def step_and_measure(*args, **kwargs):
        result = step(*args, **kwargs)
        if "after_first_step" not in record:
            record["after_first_step"] = pss_bytes()
            (out / f"rank_{rank}.json").write_text(json.dumps(record))
        return result

    worker_module.load_split, engine.train_step = load_and_measure, step_and_measure
    worker_module.train_loop_per_worker(loop_config)


def memory_of_two_workers(config: TrainConfig, out: Path) -> list[dict]:
    out.mkdir(parents=True)
    result = build_trainer(config, measure_memory_then_train, {**config.to_dict(), "_memory_out": str(out)}).fit()
    if result.error is not None:
        raise RuntimeError(f"the {config.name} run failed: {result.error}")
    return [json.loads((out / f"rank_{rank}.json").read_text()) for rank in (0, 1)]


# -------------------------------------------------------------------------------------- report
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=0.05,
                        help="instances per category x this (1.0 = MP-100's ~18k instances)")
    parser.add_argument("--image_size", type=int, default=256, help="model input for parts 2 and 4")
    parser.add_argument("--restart_image_size", type=int, default=64,
                        help="model input of the restart runs (part 3); 64 is the default config's")
    parser.add_argument("--data", default=None, help="reuse MP-100-format data written by an earlier run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args()
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")  # Ray's default poll interval
    cores = cache.available_cores()
    work = Path(tempfile.mkdtemp(prefix="cape_ray_data_scale_"))
    cache_dir = work / "cache"
    try:
        if args.data:
            data, made = Path(args.data), None
        else:
            data = work / "mp100"
            print(f"writing the MP-100-sized data (scale {args.scale:g}) to {data} ...", flush=True)
            made = make_data(data, args.scale, args.seed, cores)
        print(f"preparing the training split at {args.image_size} px ...", flush=True)
        prep = measure_preparation(data, cache_dir, args.image_size)
        full_rows = sum(instances_per_category(cid, args.seed, 1.0) for cid in synthetic_category_ids("train", args.seed))

        ray.init(num_cpus=max(4, cores), include_dashboard=False, log_to_driver=False)
        cloudpickle.register_pickle_by_value(ray_overhead)
        runs = work / "runs"
        # 64 steps per epoch: the kill comes 32 steps after the epoch-1 report, long after Ray registered it
        restart_base = TrainConfig(storage_path=str(runs), num_workers="1", max_failures=1, epochs=2,
                                   episodes_per_epoch=512, batch_size=8, checkpoint_every_steps=0, val_episodes=2,
                                   val_queries_per_episode=5, image_size=args.restart_image_size)
        print("worker SIGKILL -> first step after restart: 3 Ray runs ...", flush=True)
        restart = {
            "warm cache": restart_seconds(restart_base.replace(data_root=str(data), cache_dir=str(cache_dir)),
                                          work, "cached"),
            "built-in data": restart_seconds(restart_base, work, "builtin"),
            "no cache": restart_seconds(restart_base.replace(data_root=str(data), cache_dir=""), work, "uncached"),
        }
        print("memory of 2 workers: 2 Ray runs ...", flush=True)
        memory_base = TrainConfig(storage_path=str(runs), num_workers="2", epochs=1, episodes_per_epoch=8,
                                  batch_size=2, checkpoint_every_steps=0, val_episodes=1, val_queries_per_episode=3,
                                  image_size=args.image_size, data_root=str(data))
        memory = {
            "cache on": memory_of_two_workers(memory_base.replace(name="memory_on", cache_dir=str(cache_dir)),
                                              work / "memory_on"),
            "cache off": memory_of_two_workers(memory_base.replace(name="memory_off", cache_dir=""),
                                               work / "memory_off"),
        }
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print()
    if made:
        counts = made["counts"]
        print(f"data: {made['images']} images = instances (train {counts['train']}, val {counts['val']}, test "
              f"{counts['test']}), 100 categories, K 5..35, mean {made['mean_mpx']:.2f} Mpx, "
              f"{made['bytes_per_image'] / 1e3:.0f} KB per JPEG; written in {made['seconds']:.1f} s on {cores} "
              f"threads ({1000 * made['seconds'] * cores / made['images']:.0f} ms of one core per image)")
    rows, size = prep["rows"], prep["split_bytes"]
    per_row = lambda s: 1000 * s / rows  # noqa: E731
    print(f"\ntraining split at {args.image_size} px: {rows} instances, {size / MB:.1f} MB of images "
          f"({size / rows / 1e3:.0f} KB each); full size: {full_rows} instances, {full_rows * size / rows / 1e9:.2f} GB")
    print(f"{'':52s} {'seconds':>8s} {'ms/inst':>8s} {'full size':>10s}  goal")
    print(f"{'prepare without a cache (1 thread, every worker)':52s} {prep['without_cache']:8.2f} "
          f"{per_row(prep['without_cache']):8.2f} {full_rows * prep['without_cache'] / rows:9.0f}s")
    print(f"{'first build into the cache (' + str(prep['threads']) + ' threads, once per node)':52s} "
          f"{prep['build']:8.2f} {per_row(prep['build']):8.2f} {full_rows * prep['build'] / rows:9.0f}s")
    print(f"{'  cores busy (CPU s / wall s): without cache | build':52s} {prep['without_cache_cores']:8.2f} "
          f"{prep['cores_busy']:8.2f} {'':10s}  build uses all {cores} ({prep['threads']} threads)")
    print(f"{'  machine cores busy during the build (all processes)':52s} {'':8s} "
          f"{prep['machine_busy'] * cores:8.2f} {'':10s}  of {cores}: what others leave is the build's")
    print(f"{'cached open (sampled blocks, then mmap)':52s} {prep['open']:8.3f} {per_row(prep['open']):8.3f} "
          f"{'same':>10s}  does not grow with the split")
    print(f"{'cached open, CAPE_VERIFY_CACHE=1 (every file hashed)':52s} {prep['full_open']:8.3f} "
          f"{per_row(prep['full_open']):8.3f} {full_rows * prep['full_open'] / rows:9.1f}s")
    print(f"{'  speed-up of the first build over no cache':52s} {prep['without_cache'] / prep['build']:7.2f}x")

    print(f"\nworker SIGKILL -> first optimizer step after Ray's restart ({args.restart_image_size} px, 1 worker)")
    for label, seconds in restart.items():
        print(f"  {label:50s} {seconds:8.1f}s")
    ratio = restart["warm cache"] / restart["built-in data"]
    print(f"  {'ratio warm cache / built-in data':50s} {ratio:8.2f}x  <= 1.5x")

    print(f"\nmemory, 2 workers on one node, {args.image_size} px (PSS, /proc/PID/smaps_rollup; MB)")
    print(f"  {'':50s} {'cache on':>9s} {'cache off':>9s}")
    split_bytes = memory["cache on"][0]["split_bytes"]
    share = {}
    for rank in (0, 1):
        print(f"  {'worker ' + str(rank) + ': after the first step':50s} "
              f"{memory['cache on'][rank]['after_first_step'] / MB:9.1f} {memory['cache off'][rank]['after_first_step'] / MB:9.1f}")
    for rank in (0, 1):
        print(f"  {'worker ' + str(rank) + ': PSS of its mappings of the cache files':50s} "
              f"{memory['cache on'][rank]['cache_files'] / MB:9.1f} {'-':>9s}")
    for mode, records in memory.items():
        share[mode] = sum(r["with_data"] - r["before_data"] for r in records)
    print(f"  {'both: PSS growth from loading the splits':50s} {share['cache on'] / MB:9.1f} {share['cache off'] / MB:9.1f}")
    print(f"  {'prepared split (train + val tensors)':50s} {split_bytes / MB:9.1f} {split_bytes / MB:9.1f}")
    extra = {mode: (share[mode] - split_bytes) / split_bytes for mode in share}
    print(f"  {'extra worker adds (growth - split) / split':50s} {100 * extra['cache on']:8.1f}% "
          f"{100 * extra['cache off']:8.1f}%  <= 10%")


if __name__ == "__main__":
    main()
