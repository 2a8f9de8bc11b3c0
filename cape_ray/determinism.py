"""Deterministic mode: the same inputs give the same bits on a GPU too.

CPU kernels are deterministic already. On CUDA some are not (atomic adds in backward passes,
cuDNN's algorithm choice, cuBLAS's split reductions), so two GPU runs with the same seed drift apart
at rounding level from the first step, and a resumed run cannot be bitwise equal to an uninterrupted
one. Deterministic mode makes every CUDA kernel deterministic or raises on one that has no
deterministic implementation; the models are built from ops that all have one (model/layers.py), and
a timm backbone's fused attention (scaled_dot_product_attention, whose fused CUDA backward kernels
are not deterministic) is switched to its plain matmul-softmax path (`prepare_model`).

`--deterministic` / `--no-deterministic`; unset, it is on when the run trains on a GPU.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch

# cuBLAS needs a fixed workspace per handle to reduce in a fixed order; ":4096:8" is one of the two
# settings NVIDIA documents (":16:8" is the other, slower one).
CUBLAS_WORKSPACE_CONFIG = ":4096:8"


def resolve(requested: Optional[bool], device: torch.device) -> bool:
    """Whether to enforce deterministic algorithms: as requested, else on for a CUDA device."""
    return requested if requested is not None else torch.device(device).type == "cuda"


@contextlib.contextmanager
def algorithms(enforced: bool) -> Iterator[None]:
    """Enforce deterministic algorithms (or not) inside the block; the previous settings come back
    after it, so a process that runs the loop more than once (tests, benchmarks) starts clean."""
    if enforced:
        # cuBLAS reads this when it creates a handle, i.e. at this process's first matmul on a
        # device, not when CUDA is initialised: setting it here works even after NCCL has set up
        # CUDA for the process group, as long as no matmul has run yet. An existing setting is
        # kept (":16:8" is valid too; anything else makes torch raise at the first matmul).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    # Only a change is made: torch's switch imports its compiler stack (about a second of a
    # restart, for a CPU run that changes nothing).
    changed = enforced != previous[0]
    if changed:
        torch.use_deterministic_algorithms(enforced)
    if enforced:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False  # benchmarking picks algorithms by timing: run-dependent
    try:
        yield
    finally:
        if changed:
            torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[2], previous[3]


def prepare_model(model: torch.nn.Module, enforced: bool) -> int:
    """In deterministic mode, turn off fused attention in every module that has the switch (timm's
    attention blocks: `fused_attn`); the math is the same, computed step by step. Returns how many."""
    switched = 0
    if enforced:
        for module in model.modules():
            if getattr(module, "fused_attn", False):
                module.fused_attn = False
                switched += 1
    return switched


def describe(device_type: str, enforced: bool) -> str:
    """What a run on `device_type` with deterministic mode `enforced` reproduces, in a few words."""
    if device_type == "cuda":
        if enforced:
            return "deterministic mode on: CUDA runs and resumes are bitwise reproducible"
        return "deterministic mode OFF: CUDA runs and resumes match to rounding, not bitwise"
    return "CPU kernels are deterministic" + ("; deterministic mode also on" if enforced else "")
