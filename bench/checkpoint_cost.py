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
  ratio               the two throughputs (goal >= 0.8x), and beside it the same with the two
                      halves of the difference taken apart: write_checkpoint without fsync
                      (durable=False, hashing only) and torch.save followed by fsync; and the
                      way hashes were made before: torch.save, then each file read back.
  CPU                 each variant's CPU seconds (all threads): hashing is CPU work, so where no
                      core is idle the wall-clock ratio tends to the inverse of the CPU ratio.

    python bench/checkpoint_cost.py [--repeats 5] [--dir DIR] [--synthetic]

The machine's load is printed before and after: on a shared machine the figures move with it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from cape_ray import checkpoint as ckpt, engine, rng
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


def vit_base_state(synthetic: bool) -> CheckpointState:
    """VitCape (ViT-B/14 DINOv2 backbone, 224 px) after one AdamW step; with `synthetic`, random
    tensors of the same shapes in the same layout."""
    config = TrainConfig(model="vit", backbone=BACKBONE, image_size=224)
    torch.manual_seed(0)
    model = build_model(config)
    optimizer = engine.build_optimizer(model, config)
    scheduler = engine.build_scheduler(optimizer, config, 1000)
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter) * 1e-3
    optimizer.step()  # the AdamW moments exist from here
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
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
    ratio = figures["write_checkpoint"].rate / figures["torch.save"].rate
    lines += [
        f"synchronous checkpoint write: {figures['write_checkpoint'].seconds:.3f} s (hashing and fsync included)",
        f"write throughput vs torch.save: {ratio:.2f}x (goal >= 0.8x: {'met' if ratio >= 0.8 else 'NOT met'})",
        f"  hashing alone (no fsync either side): "
        f"{figures['write_checkpoint without fsync'].rate / figures['torch.save'].rate:.2f}x; both durable "
        f"(vs torch.save + fsync): {figures['write_checkpoint'].rate / figures['torch.save + fsync'].rate:.2f}x; "
        f"torch.save then a second read to hash (no fsync): "
        f"{figures['torch.save, then read back, hash'].rate / figures['torch.save'].rate:.2f}x",
        f"  CPU time vs torch.save: {figures['write_checkpoint'].cpu_seconds / figures['torch.save'].cpu_seconds:.2f}x "
        f"(SHA-256 of every byte; on a machine with no idle core the wall-clock ratio falls towards its inverse)",
    ]
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
    args = parser.parse_args()

    print(f"$ python {' '.join(sys.argv)}")
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}   torch {torch.__version__}")
    start = time.perf_counter()
    state = vit_base_state(args.synthetic)
    print(f"state: {state.source}: {state.tensor_bytes / 1e6:.0f} MB of tensors (built in "
          f"{time.perf_counter() - start:.0f} s)")
    with tempfile.TemporaryDirectory(prefix="checkpoint_cost_", dir=args.dir) as tmp:
        root = Path(tmp)
        print(f"before: {machine_line(root)}")
        print(f"\n== synchronous write ({args.repeats} rounds, medians) ==")
        for line in synchronous_write(state, root, args.repeats):
            print(line)
        print(f"\nafter: {machine_line(root)}")


if __name__ == "__main__":
    main()
