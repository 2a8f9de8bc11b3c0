"""`--pretrained`: backbone weights from a file, or from the Hugging Face Hub where it is reachable.

A file is `.safetensors` or anything `torch.load(weights_only=True)` reads: a state dict, or one
wrapped as {"state_dict": ...} / {"model": ...} (keys prefixed "module." by DDP are unwrapped).
`hf-hub:ORG/NAME` and `timm:NAME` ask timm to download the weights; without a network that fails,
and the message says how to fetch the file elsewhere and pass its path. No weights are downloaded
at run time otherwise, and none are part of cape-ray.

The model loads them with its own `load_pretrained(state_dict, source)` (see api.py), which reports
the tensors loaded, missing and unexpected, and refuses a shape mismatch naming the key.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cape_ray.model.api import LoadReport, ModelError

HUB_PREFIXES = ("hf-hub:", "timm:")


def is_hub_name(source: str) -> bool:
    return source.startswith(HUB_PREFIXES)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file; ModelError (one line) when it cannot be read as one."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"--pretrained {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt file, a pickle with Python objects, not a weights file
        raise ModelError(f"--pretrained {path}: cannot be read as weights ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); pass a .safetensors file or a "
                         f"torch state dict saved with torch.save(model.state_dict(), PATH)") from None
    for key in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ModelError(f"--pretrained {path}: holds no state dict of tensors (a mapping of names to tensors)")
    return {key.removeprefix("module."): value for key, value in data.items()}


def hub_state_dict(source: str, backbone: str) -> dict[str, torch.Tensor]:
    """Weights named `hf-hub:ORG/NAME` or `timm:NAME` (timm's pretrained tag; `timm:` alone: the
    backbone's), from the local Hugging Face cache or downloaded. Where the Hub cannot be reached:
    ModelError saying how to fetch the file elsewhere and pass it instead."""
    name = source.split(":", 1)[1] or backbone
    if source.startswith("hf-hub:"):
        repo = name
    else:
        import timm

        try:
            repo = timm.models.get_pretrained_cfg(name).hf_hub_id
        except Exception:  # noqa: BLE001 - timm raises several kinds for an unknown name
            repo = None
        if not repo:
            raise ModelError(f"--pretrained {source}: timm knows no Hugging Face weights for {name!r}; pass "
                             f"hf-hub:ORG/NAME or a file")
    advice = (f"on a machine with internet run `hf download {repo} model.safetensors --local-dir weights/`, copy "
              f"the file here and pass --pretrained weights/model.safetensors")
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo, "model.safetensors")
    if isinstance(cached, str):
        return read_state_dict(cached)
    if not hub_reachable():
        raise ModelError(f"--pretrained {source}: the Hugging Face Hub cannot be reached from here; {advice}")
    try:
        return read_state_dict(hf_hub_download(repo, "model.safetensors"))
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - no such repo, no such file, a network error
        raise ModelError(f"--pretrained {source}: cannot download {repo}/model.safetensors ({type(exc).__name__}); "
                         f"{advice}") from None


def hub_reachable(host: str = "huggingface.co", timeout_s: float = 3.0) -> bool:
    """Whether the Hub answers at all (a TCP connect), so that a machine without internet is told in
    seconds, not after the download client's retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def load_pretrained(model: nn.Module, source: str, backbone: str = "") -> LoadReport:
    """Load `source` into `model` through its `load_pretrained`; ModelError when it has none."""
    loader = getattr(model, "load_pretrained", None)
    if not callable(loader):
        raise ModelError(f"--pretrained: the model ({type(model).__name__}) has no load_pretrained(state_dict) "
                         f"method to take backbone weights (see cape_ray/model/api.py)")
    state_dict = hub_state_dict(source, backbone) if is_hub_name(source) else read_state_dict(source)
    return loader(state_dict, source=source)
