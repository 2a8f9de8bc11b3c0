"""Capture and restore every global RNG of one process (python, numpy, torch CPU, CUDA).

States are stored as tensors and plain Python values only, so a checkpoint loads with
`torch.load(weights_only=True)` and no allow-list. Data order and augmentation never use these
generators (they are drawn from position-seeded generators, see data/episodes.py); what remains
here is dropout and anything else a model draws at training time.
"""

from __future__ import annotations

import hashlib
import random
import warnings
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def derived_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (used to re-seed a rank deterministically)."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def capture() -> dict[str, Any]:
    version, mt_state, gauss_next = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state: dict[str, Any] = {
        "python_version": int(version),
        "python_state": torch.tensor(mt_state, dtype=torch.int64),
        "python_gauss_next": gauss_next,  # None or float
        "numpy_kind": str(np_kind),
        "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64).copy()),
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_cached_gaussian": float(np_cached),
        "torch_cpu": torch.get_rng_state(),
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore(state: dict[str, Any]) -> list[str]:
    """Restore a state made by `capture`; returns the names of the generators restored."""
    random.setstate((
        state["python_version"],
        tuple(int(v) for v in state["python_state"].tolist()),
        state["python_gauss_next"],
    ))
    np.random.set_state((
        state["numpy_kind"],
        state["numpy_keys"].numpy().astype(np.uint32),
        state["numpy_pos"],
        state["numpy_has_gauss"],
        state["numpy_cached_gaussian"],
    ))
    torch.set_rng_state(state["torch_cpu"])
    restored = ["python", "numpy", "torch"]
    cuda_states = state.get("cuda") or []
    if cuda_states:
        # A CPU resume of a GPU run (or another device count) cannot continue the CUDA stream;
        # say so instead of failing, since the CPU generators above are still exact.
        if not torch.cuda.is_available() or len(cuda_states) != torch.cuda.device_count():
            available = torch.cuda.device_count() if torch.cuda.is_available() else 0
            warnings.warn(
                f"checkpoint holds CUDA RNG state for {len(cuda_states)} device(s) but "
                f"{available} are visible: CUDA RNG not restored", RuntimeWarning, stacklevel=2)
        else:
            torch.cuda.set_rng_state_all(cuda_states)
            restored.append("cuda")
    return restored
