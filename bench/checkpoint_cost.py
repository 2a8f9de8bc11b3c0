"""What writing a checkpoint costs, measured side by side in one run.

The state is a ViT-B-sized model with its AdamW moments (about 1 GB): VitCape with the
vit_base_patch14_dinov2 backbone at 224 px after one AdamW step (random gradients, no forward
pass), or with --synthetic random tensors of the same shapes. Printed, each the median of
--repeats rounds in which every variant runs once (in a rotated order, each after an os.sync so
that no variant pays for another's write-back):

  synchronous write   write_checkpoint into a local directory: every file hashed as it is written,
                      fsynced, the manifest last (what a checkpoint costs the training loop when
                      it waits for it)
  torch.save          the same model, optimizer and scheduler state dicts, one torch.save each, into
                      the same directory's disk, nothing else
  ratio               the throughputs like for like (goal >= 0.8x): write_checkpoint without fsync
                      (durable=False: how the checkpointer stages every checkpoint before its
                      store fsyncs it) against torch.save, and write_checkpoint against torch.save
                      followed by fsync; beside them, write_checkpoint against torch.save without
                      fsync, and the way hashes were made before: torch.save, then each file read back.
  CPU                 each variant's CPU seconds (all threads): hashing is CPU work, so where no
                      core is idle the wall-clock ratio tends to the inverse of the CPU ratio.
  background writer   what the training thread pays with the default writer: the snapshot (a copy
                      of the state in memory, checkpointer.snapshot, into the previous
                      checkpoint's copy as a run does) and the hand-over to the writer thread;
                      against the synchronous write (goal <= 10%) and as a share of a 10-minute
                      epoch with one checkpoint (goal <= 1%); the run's first checkpoint, which
                      allocates the copy, apart; and how long the write then takes in the background.
  Checkpointer.save   the same two ways through the real checkpointer on a local storage path
                      (stage, hash, check the room, store with fsync and the manifest last,
                      report), one checkpointer of each kind saving checkpoint after checkpoint:
                      the time the training thread is blocked with --sync_checkpoints and with the
                      background writer (goal <= 10%), and the background write's end.
  precision           per --precision (fp32, bf16, fp16) and with --grad_checkpointing: seconds
                      per optimizer step of the ViT model (--step_backbone, default ViT-S/14 at
                      224 px; 2 episodes of 1 support and 2 queries, 17 keypoints, every block
                      trained), the activations a forward keeps for the backward pass (what
                      gradient checkpointing trades for recomputation), and the peak memory a step
                      adds above the built model (RSS on a CPU, allocated memory on a GPU), each
                      variant in a process of its own.

    python bench/checkpoint_cost.py [--repeats 5] [--dir DIR] [--synthetic] [--only write,background,checkpointer,precision]
                                    [--step_backbone vit_small_patch14_dinov2] [--steps 3]

The machine's load is printed before and after: on a shared machine the figures move with it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from cape_ray import checkpoint as ckpt, engine, rng
from cape_ray.checkpointer import snapshot
from cape_ray.config import TrainConfig
from cape_ray.model import build_model
from cape_ray.state import TrainState

BACKBONE = "vit_base_patch14_dinov2"


@dataclass
class CheckpointState:
    """What one checkpoint holds, ready to write: the arguments of write_checkpoint."""

    model: dict
    optimizer: dict
    scheduler: dict
    state: dict
    rank_states: dict[int, bytes]
    source: str

    @property
    def tensor_bytes(self) -> int:
        return ckpt.tensor_bytes(self.model) + ckpt.tensor_bytes(self.optimizer)


def vit_base_training() -> tuple[TrainConfig, torch.nn.Module, torch.optim.Optimizer, engine.LrSchedule]:
    """VitCape (ViT-B/14 DINOv2 backbone, 224 px), its optimizer after one AdamW step (random
    gradients, no forward pass: the moments exist from here) and its schedule."""
    config = TrainConfig(model="vit", backbone=BACKBONE, image_size=224)
    torch.manual_seed(0)
    model = build_model(config)
    optimizer = engine.build_optimizer(model, config)
    scheduler = engine.build_scheduler(optimizer, config, 1000)
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter) * 1e-3
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return config, model, optimizer, scheduler


def vit_base_state(synthetic: bool) -> CheckpointState:
    """The state of `vit_base_training`; with `synthetic`, random tensors of the same shapes in the
    same layout."""
    config, model, optimizer, scheduler = vit_base_training()
    model_state, optimizer_state = model.state_dict(), optimizer.state_dict()
    source = f"VitCape({BACKBONE}, 224 px) after one AdamW step"
    if synthetic:
        model_state = {k: torch.randn_like(v) if v.is_floating_point() else v.clone() for k, v in model_state.items()}
        optimizer_state["state"] = {i: {k: torch.randn_like(v) for k, v in s.items()}
                                    for i, s in optimizer_state["state"].items()}
        source = f"random tensors shaped as {source}"
    running = {**rng.capture(), "loss_sum": 0.0, "loss_count": 0}
    return CheckpointState(model_state, optimizer_state, scheduler.state_dict(),
                           TrainState.fresh(config, 1).state_dict(), {0: ckpt.serialize(running)}, source)


# ----------------------------------------------------------------------------- the variants
def write_synchronously(state: CheckpointState, target: Path, durable: bool = True) -> None:
    ckpt.write_checkpoint(target, model=state.model, optimizer=state.optimizer, scheduler=state.scheduler,
                          state=state.state, rank_states=state.rank_states, durable=durable)


def plain_torch_save(state: CheckpointState, target: Path, durable: bool = False) -> None:
    target.mkdir()
    for name, obj in zip(ckpt.TENSOR_FILES, (state.model, state.optimizer, state.scheduler)):
        torch.save(obj, target / name)
        if durable:
            with open(target / name, "rb+") as f:
                os.fsync(f.fileno())


def save_then_hash(state: CheckpointState, target: Path) -> None:
    """The writer before hashing moved into the write: torch.save each file, then read it back for its SHA-256."""
    plain_torch_save(state, target)
    for name in ckpt.TENSOR_FILES:
        ckpt._sha256(target / name)


def bytes_in(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


@dataclass
class Figure:
    seconds: float  # wall clock, median
    cpu_seconds: float  # CPU time of this process, all threads, median (what the work itself costs)
    size: int  # bytes written

    @property
    def rate(self) -> float:
        return self.size / self.seconds / 1e6


def measure(variants: dict[str, Callable[[Path], None]], root: Path, repeats: int) -> dict[str, Figure]:
    """Each variant's medians, the variants rotated round by round."""
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in variants}
    written: dict[str, int] = {}
    names = list(variants)
    for round_index in range(repeats):
        for name in names[round_index % len(names):] + names[:round_index % len(names)]:
            target = root / name.replace(" ", "_")
            os.sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            variants[name](target)
            seconds[name].append(time.perf_counter() - start)
            cpu_seconds[name].append(time.process_time() - start_cpu)
            written[name] = bytes_in(target)
            shutil.rmtree(target)
    return {name: Figure(statistics.median(seconds[name]), statistics.median(cpu_seconds[name]), written[name])
            for name in variants}


# ----------------------------------------------------------------------------- the figures
def synchronous_write(state: CheckpointState, root: Path, repeats: int) -> list[str]:
    figures = measure({
        "write_checkpoint": lambda target: write_synchronously(state, target),
        "write_checkpoint without fsync": lambda target: write_synchronously(state, target, durable=False),
        "torch.save": lambda target: plain_torch_save(state, target),
        "torch.save + fsync": lambda target: plain_torch_save(state, target, durable=True),
        "torch.save, then read back, hash": lambda target: save_then_hash(state, target),
    }, root, repeats)

    lines = [f"{'':<32s} {'wall':>9s} {'CPU':>9s} {'written':>11s} {'throughput':>12s}"]
    lines += [f"{name:<32s} {f.seconds:7.3f} s {f.cpu_seconds:7.3f} s {f.size / 1e6:8.1f} MB {f.rate:7.0f} MB/s"
              for name, f in figures.items()]
    staged = figures["write_checkpoint without fsync"].rate / figures["torch.save"].rate
    durable = figures["write_checkpoint"].rate / figures["torch.save + fsync"].rate
    goal = lambda ratio: "met" if ratio >= 0.8 else "NOT met"  # noqa: E731
    lines += [
        f"synchronous checkpoint write: {figures['write_checkpoint'].seconds:.3f} s (hashing and fsync included)",
        "write throughput vs torch.save, like for like (goal >= 0.8x):",
        f"  neither synced (how every checkpoint is staged before it is stored): {staged:.2f}x ({goal(staged)})",
        f"  both synced (write_checkpoint vs torch.save + fsync): {durable:.2f}x ({goal(durable)})",
        f"  write_checkpoint synced vs torch.save not synced: "
        f"{figures['write_checkpoint'].rate / figures['torch.save'].rate:.2f}x; torch.save then a second read to "
        f"hash (no fsync): {figures['torch.save, then read back, hash'].rate / figures['torch.save'].rate:.2f}x",
        f"  CPU time vs torch.save: {figures['write_checkpoint'].cpu_seconds / figures['torch.save'].cpu_seconds:.2f}x "
        f"(SHA-256 of every byte, on its own thread per file; on a machine with no idle core the wall-clock ratio "
        f"falls towards its inverse)",
    ]
    return lines


def background_writer(state: CheckpointState, root: Path, repeats: int, synchronous_seconds: float | None) -> list[str]:
    """The training thread's share of a background checkpoint, and the write it hands over. Each
    snapshot copies into the previous one, as the checkpointer does; the first allocates it."""
    blocked, written, previous = [], [], None
    with ThreadPoolExecutor(1) as writer:
        for index in range(repeats + 1):
            target = root / f"background_{index}"
            os.sync()
            start = time.perf_counter()
            previous = snapshot(dict(model=state.model, optimizer=state.optimizer, scheduler=state.scheduler,
                                     state=state.state, rank_states=state.rank_states), previous)
            future = writer.submit(ckpt.write_checkpoint, target, **previous)
            blocked.append(time.perf_counter() - start)
            future.result()  # here training would go on; the wait only times the background write
            written.append(time.perf_counter() - start)
            shutil.rmtree(target)
    first_s, blocked_s = blocked[0], statistics.median(blocked[1:])
    written_s = statistics.median(written[1:])
    lines = [f"training thread blocked per checkpoint: {blocked_s:.3f} s (the snapshot in memory, copied into the "
             f"previous checkpoint's copy, and the hand-over); the run's first checkpoint, which allocates that "
             f"copy: {first_s:.3f} s"]
    if synchronous_seconds:
        share = blocked_s / synchronous_seconds
        lines.append(f"  vs the synchronous write ({synchronous_seconds:.3f} s): {share:.1%} "
                     f"(goal <= 10%: {'met' if share <= 0.10 else 'NOT met'}); the first checkpoint "
                     f"{first_s / synchronous_seconds:.1%}")
    epoch_share = blocked_s / 600.0
    lines += [f"  share of a 10-minute epoch with one checkpoint: {epoch_share:.3%} "
              f"(goal <= 1%: {'met' if epoch_share <= 0.01 else 'NOT met'})",
              f"the write itself, in the background thread: {written_s - blocked_s:.3f} s (it shares the cores "
              f"with training meanwhile)"]
    return lines


def checkpointer_save(root: Path, repeats: int) -> list[str]:
    """What Checkpointer.save costs the training thread, --sync_checkpoints against the background
    writer, on a local storage path: the whole path a checkpoint takes (gather, stage with hashes,
    check the room, store with fsync and the manifest last, report), not the write alone. One
    checkpointer of each kind saves `repeats` + 1 checkpoints, as a run does; the first is shown
    apart (the background writer allocates its copy of the state there)."""
    import pyarrow.fs as pafs

    from cape_ray.checkpointer import Checkpointer

    config, model, optimizer, schedule = vit_base_training()
    state = TrainState.fresh(config, 1)
    running = {"loss_sum": 0.0, "loss_count": 0}
    blocked: dict[str, list[float]] = {"sync": [], "background": []}
    stored_after: list[float] = []
    checkpointers = {}
    for mode in ("sync", "background"):
        run_dir = root / f"run_{mode}"
        run_dir.mkdir()
        checkpointers[mode] = Checkpointer(
            config.replace(sync_checkpoints=mode == "sync"), fs=pafs.LocalFileSystem(), run_dir=str(run_dir),
            latest=None, registered=(), rank=0, world_size=1, report=lambda metrics, stored, name: None,
            gather=lambda blob: {0: blob}, all_reduce=dict)
    for index in range(repeats + 1):
        for mode in ("sync", "background") if index % 2 == 0 else ("background", "sync"):
            checkpointer = checkpointers[mode]
            os.sync()
            start = time.perf_counter()
            checkpointer.save(f"checkpoint_e{index + 1:03d}", state, model, optimizer, schedule, running,
                              {"val_pck": 0.5, "val_loss": 1.0})
            blocked[mode].append(time.perf_counter() - start)
            checkpointer.flush()  # here training would go on until the next step boundary
            if mode == "background":
                stored_after.append(time.perf_counter() - start)
            shutil.rmtree(root / f"run_{mode}" / f"checkpoint_e{index + 1:03d}")
    for checkpointer in checkpointers.values():
        checkpointer.finish()
    sync_s, background_s = statistics.median(blocked["sync"][1:]), statistics.median(blocked["background"][1:])
    first_s = blocked["background"][0]
    share = background_s / sync_s
    epoch_share = background_s / 600.0
    return [
        f"Checkpointer.save, ViT-B/14 state, local storage path ({repeats + 1} checkpoints per mode; medians of "
        f"all but the first):",
        f"  --sync_checkpoints: training thread blocked {sync_s:.3f} s (stage, hash, store with fsync, report)",
        f"  background writer:  training thread blocked {background_s:.3f} s = {share:.1%} of the synchronous "
        f"(goal <= 10%: {'met' if share <= 0.10 else 'NOT met'}); stored {statistics.median(stored_after[1:]):.3f} s "
        f"after the call, while training goes on",
        f"  the run's first checkpoint (allocates the copy): blocked {first_s:.3f} s = {first_s / sync_s:.1%} of "
        f"the synchronous",
        f"  share of a 10-minute epoch with one checkpoint, blocked: {epoch_share:.3%} "
        f"(goal <= 1%: {'met' if epoch_share <= 0.01 else 'NOT met'})",
    ]


# ----------------------------------------------------------------------------- precision
STEP_EPISODES, STEP_QUERIES, STEP_KEYPOINTS = 2, 2, 17


def synthetic_batch(image_size: int) -> SimpleNamespace:
    generator = torch.Generator().manual_seed(0)
    b, q, k = STEP_EPISODES, STEP_QUERIES, STEP_KEYPOINTS
    skeleton = torch.zeros(b, k, k)
    skeleton[:, torch.arange(k - 1), torch.arange(1, k)] = 1
    return SimpleNamespace(
        support_images=torch.rand(b, 1, 3, image_size, image_size, generator=generator),
        support_keypoints=torch.rand(b, 1, k, 2, generator=generator) * 0.8 + 0.1,
        support_visible=torch.ones(b, 1, k, dtype=torch.bool),
        query_images=torch.rand(b, q, 3, image_size, image_size, generator=generator),
        query_keypoints=torch.rand(b, q, k, 2, generator=generator) * 0.8 + 0.1,
        query_visible=torch.ones(b, q, k, dtype=torch.bool),
        keypoint_mask=torch.ones(b, k, dtype=torch.bool),
        skeleton=skeleton + skeleton.transpose(1, 2))


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def saved_for_backward(model: torch.nn.Module, batch, amp) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one forward (each storage once):
    the activation memory that gradient checkpointing trades for recomputation, measured exactly
    and alike on every device (an allocator's peak on a CPU also holds its caches)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with amp.autocast(engine.model_device(model)):
            loss, _ = engine.compute_loss(model, batch)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def one_variant(backbone: str, precision: str, grad_checkpointing: bool, steps: int) -> dict:
    """Run in a process of its own: build the ViT model, one warm-up step, then `steps` timed ones."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = TrainConfig(model="vit", backbone=backbone, image_size=224, precision=precision,
                         grad_checkpointing=grad_checkpointing, train_backbone_blocks=None, freeze_backbone=False)
    torch.manual_seed(0)
    model = build_model(config).to(device)
    optimizer = engine.build_optimizer(model, config)
    amp = engine.MixedPrecision(precision, device.type)
    batch = synthetic_batch(224)
    engine.train_step(model, optimizer, None, [batch], 1.0, amp)  # the optimizer's moments exist from here
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resident_bytes()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.train_step(model, optimizer, None, [batch], 1.0, amp)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:  # the allocator's view: it keeps freed memory, so this is coarser than the saved bytes below
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    saved = saved_for_backward(model, batch, amp)
    return {"seconds": statistics.median(times), "peak_bytes": max(0, peak), "saved_bytes": saved, "device": device.type,
            "parameters": sum(p.numel() for p in model.parameters())}


def precision_table(backbone: str, steps: int) -> list[str]:
    variants = [("fp32", False), ("bf16", False), ("fp16", False), ("fp32", True), ("bf16", True)]
    results = {}
    for precision, gc in variants:
        done = subprocess.run([sys.executable, __file__, "--_variant", json.dumps([backbone, precision, gc, steps])],
                              capture_output=True, text=True)
        if done.returncode != 0:
            results[(precision, gc)] = None
            print(f"  {precision}{' + grad ckpt' if gc else ''}: failed: {done.stderr.strip().splitlines()[-1:]}")
            continue
        results[(precision, gc)] = json.loads(done.stdout.strip().splitlines()[-1])
    first = next(r for r in results.values() if r)
    unit = "GPU memory allocated" if first["device"] == "cuda" else "RSS"
    lines = [f"{backbone} at 224 px ({first['parameters'] / 1e6:.1f}M parameters) on {first['device']}, "
             f"{STEP_EPISODES} episodes x (1 support + {STEP_QUERIES} queries), {steps} timed steps, medians:",
             f"{'variant':<26s} {'s/step':>8s} {'vs fp32':>8s} {'saved for backward':>19s} "
             f"{'peak ' + unit + ' added by a step':>34s}"]
    fp32 = results.get(("fp32", False))
    for (precision, gc), r in results.items():
        if not r:
            continue
        name = f"{precision}{' + grad checkpointing' if gc else ''}"
        speed = f"{fp32['seconds'] / r['seconds']:.2f}x" if fp32 else "-"
        lines.append(f"{name:<26s} {r['seconds']:8.2f} {speed:>8s} {r['saved_bytes'] / 1e6:16.0f} MB "
                     f"{r['peak_bytes'] / 1e6:31.0f} MB")
    for precision in ("fp32", "bf16"):
        off, on = results.get((precision, False)), results.get((precision, True))
        if off and on and off["saved_bytes"]:
            lines.append(f"grad checkpointing in {precision}: activations saved for backward "
                         f"{off['saved_bytes'] / 1e6:.0f} -> {on['saved_bytes'] / 1e6:.0f} MB "
                         f"({1 - on['saved_bytes'] / off['saved_bytes']:.0%} less), peak {unit} added by a step "
                         f"{off['peak_bytes'] / 1e6:.0f} -> {on['peak_bytes'] / 1e6:.0f} MB, "
                         f"for {on['seconds'] / off['seconds']:.2f}x the step time")
    return lines


def machine_line(root: Path) -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    disk = shutil.disk_usage(root)
    return (f"{os.cpu_count()} cores, load average {load} (a shared machine: other work moves these figures), "
            f"{disk.free / 1e9:.0f} GB free under {root}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="rounds; each figure is their median")
    parser.add_argument("--dir", default=None, help="where to write (default: a new directory under TMPDIR)")
    parser.add_argument("--synthetic", action="store_true", help="random tensors of the ViT-B state's shapes")
    parser.add_argument("--only", default="write,background,checkpointer,precision",
                        help="which parts, comma-separated")
    parser.add_argument("--step_backbone", default="vit_small_patch14_dinov2", help="the ViT of the precision part")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per precision variant")
    parser.add_argument("--_variant", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._variant:
        print(json.dumps(one_variant(*json.loads(args._variant))))
        return
    parts = set(args.only.split(","))

    print(f"$ python {' '.join(sys.argv)}")
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}   torch {torch.__version__}")
    if parts & {"write", "background", "checkpointer"}:
        start = time.perf_counter()
        state = vit_base_state(args.synthetic)
        print(f"state: {state.source}: {state.tensor_bytes / 1e6:.0f} MB of tensors (built in "
              f"{time.perf_counter() - start:.0f} s)")
        with tempfile.TemporaryDirectory(prefix="checkpoint_cost_", dir=args.dir) as tmp:
            root = Path(tmp)
            print(f"before: {machine_line(root)}")
            synchronous_seconds = None
            if "write" in parts:
                print(f"\n== synchronous write ({args.repeats} rounds, medians) ==")
                for line in synchronous_write(state, root, args.repeats):
                    print(line)
                    if line.startswith("synchronous checkpoint write:"):
                        synchronous_seconds = float(line.split(":")[1].split()[0])
            if "background" in parts:
                print(f"\n== background writer ({args.repeats} rounds, medians) ==")
                for line in background_writer(state, root, args.repeats, synchronous_seconds):
                    print(line)
            if "checkpointer" in parts:
                print()
                for line in checkpointer_save(root, args.repeats):
                    print(line)
            print(f"\nafter: {machine_line(root)}")
        del state
    if "precision" in parts:
        print("\n== precision and gradient checkpointing ==")
        for line in precision_table(args.step_backbone, args.steps):
            print(line)
        print(f"load average at end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
