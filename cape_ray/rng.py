"""Capture and restore every global RNG of one process: torch CPU, CUDA, numpy, python.

The state uses the original pipeline's field names, each in the form its own library restores:
    rng_state       torch.get_rng_state()            -> torch.set_rng_state(...)
    cuda_rng_state  torch.cuda.get_rng_state_all()   -> torch.cuda.set_rng_state_all(...), or None
    np_rng_state    np.random.get_state() as a tuple -> np.random.set_state(...)
    py_rng_state    random.getstate()                -> random.setstate(...)
and `cuda_device`, the index of the CUDA device this rank trained on (None without CUDA): dropout on
a GPU draws from that device's generator only, so its stream is the one a resume must continue.
Only tensors, tuples, ints, floats and strings: a checkpoint loads with `torch.load(weights_only=True)`.

Data order and augmentation never use these generators (they are drawn from position-seeded
generators, see data/episodes.py); what remains here is dropout and anything else drawn at training
time.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

RNG_KEYS = ("rng_state", "cuda_rng_state", "np_rng_state", "py_rng_state")
CAPTURED_KEYS = RNG_KEYS + ("cuda_device",)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def derived_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (used to re-seed a rank deterministically)."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def visible_cuda_devices() -> int:
    """CUDA devices this process can use (0 without CUDA). One place to ask, so that tests can fake
    a GPU machine for the restore logic without faking CUDA for torch itself."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def capture() -> dict[str, Any]:
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    cuda, cuda_device = None, None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [s.cpu() for s in torch.cuda.get_rng_state_all()]
        cuda_device = torch.cuda.current_device()  # Ray Train sets it to the rank's device
    return {
        "rng_state": torch.get_rng_state(),
        "cuda_rng_state": cuda,  # one state per visible device; None where CUDA was not in use
        "cuda_device": cuda_device,
        "np_rng_state": (str(kind), tuple(int(k) for k in keys), int(position), int(has_gauss),
                         float(cached_gaussian)),
        "py_rng_state": random.getstate(),
    }


@dataclass
class RestoredRng:
    """What `restore` did, generator by generator, for the resume banner."""

    restored: list[str] = field(default_factory=list)  # of torch, cuda, numpy, python
    cuda_note: str = ""  # why CUDA was not restored, or how

    @property
    def cuda(self) -> bool:
        return "cuda" in self.restored


def restore(state: dict[str, Any], cuda_fallback_seed: Optional[int] = None) -> RestoredRng:
    """Restore a state made by `capture`.

    CUDA: device i is restored from state i for every device both sides have, and the stream of the
    device the rank trained on (`cuda_device`) continues on the device it trains on now, so a
    checkpoint written where N devices were visible resumes where M are, on whichever index the
    rank now has. A CPU resume of a GPU run cannot continue the CUDA stream (dropout then draws from
    the restored CPU generator), and a GPU resume of a CPU run has none to continue: those cases are
    said in `cuda_note`, and where this process uses CUDA without a saved state it is seeded from
    `cuda_fallback_seed` (deterministic).
    """
    torch.set_rng_state(state["rng_state"])
    np.random.set_state(state["np_rng_state"])
    random.setstate(state["py_rng_state"])
    result = RestoredRng(restored=["torch"])
    saved = state.get("cuda_rng_state") or []
    visible = visible_cuda_devices()
    if saved and visible:
        shared = min(len(saved), visible)
        for device in range(shared):
            torch.cuda.set_rng_state(saved[device], device)
        result.restored.append("cuda")
        trained_on = state.get("cuda_device")
        now = torch.cuda.current_device() if trained_on is not None else None
        if trained_on is not None and trained_on != now:
            torch.cuda.set_rng_state(saved[trained_on], now)
        if len(saved) != visible or trained_on != now:
            counts = f"the checkpoint has {len(saved)} device state(s), {visible} visible here: "
            result.cuda_note = counts + (f"restored by device index for {shared}" if trained_on is None else
                                         f"this rank's stream (it trained on cuda:{trained_on}) continues on cuda:{now}")
    elif saved:
        result.cuda_note = (f"the checkpoint has {len(saved)} device state(s), no CUDA device here; dropout "
                            "continues from the restored CPU generator")
    elif visible:
        result.cuda_note = "not in the checkpoint (written without CUDA)"
        if cuda_fallback_seed is not None:
            torch.cuda.manual_seed_all(cuda_fallback_seed)
            result.cuda_note += "; seeded deterministically"
    else:
        result.cuda_note = "n/a (no CUDA here or in the checkpoint)"
    result.restored += ["numpy", "python"]
    return result
