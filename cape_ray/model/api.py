"""What a CAPE model is for cape-ray, and how one is built from a spec.

The training loop, evaluation, export and the checkpointer know no model class: they build a model
from a `ModelSpec` (a builder's name and its keyword arguments) and use only what this module
describes. docs/models.md has a complete small example.

A model is a `torch.nn.Module` with two methods (subclass `CapeModelBase` to get `forward` too):

    encode(images) -> features
        images     float [N, 3, H, W] in [0, 1]; H = W = the config's --image_size, the size the data
                   pipeline crops every instance to
        features   float [N, C, h, w], any C, h, w. One image's features must not depend on another
                   image of the batch: evaluation encodes each instance once and reuses its features
                   in every episode that shows it.

    decode(support_features, support_keypoints, support_visible, query_features, keypoint_mask,
           skeleton) -> Prediction
        support_features   [B, S, C, h, w]  encode() of the S supports of each of B episodes
        support_keypoints  [B, S, K, 2]     (x, y) in [0, 1] crop coordinates: 0 is the left/top edge
                                            of the image, 1 the right/bottom edge
        support_visible    bool [B, S, K]
        query_features     [B, Q, C, h, w]  encode() of the Q queries of each episode
        keypoint_mask      bool [B, K]      the category's real keypoints: episodes of categories with
                                            fewer keypoints are padded to the batch's K
        skeleton           float [B, K, K]  symmetric 0/1 adjacency of the category's skeleton

A `Prediction` holds
    coords      float [L, B, Q, K, 2]: every query keypoint's (x, y), same coordinates as above, after
                each of L >= 1 stages (e.g. proposals, then each decoder layer); the last is final
    similarity  float [B, Q, K, h, w] or None: logits over the query's feature cells

What cape-ray does with them (engine.py): the loss of a keypoint is the L1 distance of EVERY stage's
coords to the truth, plus 0.1 x the cross-entropy of `similarity` toward the true keypoint's cell
when the model gives one; it counts keypoints visible in the query and in every support. PCK
(metrics.py) is computed from coords[-1]. Padded keypoints (keypoint_mask False) may hold anything.

Optional methods, used when present:
    parameter_groups() -> {"backbone": [...], "head": [...]}   --backbone_lr_mult scales the first
    load_pretrained(state_dict) -> LoadReport                  --pretrained
    set_grad_checkpointing(enabled: bool)                      --grad_checkpointing

Builders. `--model cnn` and `--model vit` are registered here; `--model package.module:function`
(or `path/to/file.py:function`) imports a builder of your own. A builder is called with the spec's
keyword arguments and returns a model; the kwargs must be JSON values, because every checkpoint
records the spec (`describe`) and every command rebuilds the model from it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.nn as nn


class ModelError(ValueError):
    """A model that cannot be built or does not satisfy the interface; one line that says why."""


class Prediction(NamedTuple):
    coords: torch.Tensor  # [L, B, Q, K, 2]
    similarity: Optional[torch.Tensor] = None  # [B, Q, K, h, w] logits


@dataclass(frozen=True)
class LoadReport:
    """What `load_pretrained` did: tensor counts and names, for the one line a run prints."""

    source: str
    loaded: int
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()

    def line(self) -> str:
        def some(names: tuple[str, ...]) -> str:
            return f" ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" if names else ""

        return (f"pretrained weights {self.source}: {self.loaded} tensors loaded, {len(self.missing)} missing"
                f"{some(self.missing)}, {len(self.unexpected)} unexpected{some(self.unexpected)}")


class CapeModelBase(nn.Module):
    """Base class for models: `forward` = decode(encode(...)), supports and queries through the
    backbone in one call. Subclasses implement `encode` and `decode`."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, support_features: torch.Tensor, support_keypoints: torch.Tensor,
               support_visible: torch.Tensor, query_features: torch.Tensor, keypoint_mask: torch.Tensor,
               skeleton: torch.Tensor) -> Prediction:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, support_images: torch.Tensor, support_keypoints: torch.Tensor,
                support_visible: torch.Tensor, query_images: torch.Tensor, keypoint_mask: torch.Tensor,
                skeleton: torch.Tensor) -> Prediction:
        return forward_episode(self, support_images, support_keypoints, support_visible, query_images,
                               keypoint_mask, skeleton)


def forward_episode(model: nn.Module, support_images: torch.Tensor, support_keypoints: torch.Tensor,
                    support_visible: torch.Tensor, query_images: torch.Tensor, keypoint_mask: torch.Tensor,
                    skeleton: torch.Tensor) -> Prediction:
    """decode(encode(images)) for episode batches: support_images [B, S, 3, H, W], query_images
    [B, Q, 3, H, W]; one encode call for all of them."""
    batch, shots = support_images.shape[:2]
    queries = query_images.shape[1]
    features = model.encode(torch.cat([support_images.flatten(0, 1), query_images.flatten(0, 1)]))
    support_features, query_features = features.split([batch * shots, batch * queries])
    return model.decode(support_features.unflatten(0, (batch, shots)), support_keypoints, support_visible,
                        query_features.unflatten(0, (batch, queries)), keypoint_mask, skeleton)


# ------------------------------------------------------------------------------------ specs
@dataclass(frozen=True)
class ModelSpec:
    """How to build a model: a registered name (cnn, vit) or `module:function`, and its kwargs."""

    builder: str
    kwargs: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"builder": self.builder, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        return cls(str(data["builder"]), dict(data.get("kwargs") or {}))


def _builtin_builders() -> dict[str, Callable[..., nn.Module]]:
    # Imported on demand: the ViT model needs timm, which the CNN does not.
    def cnn(**kwargs):
        from cape_ray.model.cnn import build_cnn

        return build_cnn(**kwargs)

    def vit(**kwargs):
        from cape_ray.model.vit import build_vit

        return build_vit(**kwargs)

    return {"cnn": cnn, "vit": vit}


BUILDERS: dict[str, Callable[..., nn.Module]] = _builtin_builders()


def register_model(name: str, builder: Callable[..., nn.Module]) -> None:
    """Make `--model NAME` build with `builder` in this process (the workers import the module that
    registers it only if it is named with --model package.module:function; prefer that form)."""
    BUILDERS[name] = builder


def resolve_builder(name: str) -> Callable[..., nn.Module]:
    """The builder of a registered name, `package.module:function` or `path/to/file.py:function`.
    Raises ModelError with one line saying what is wrong."""
    if name in BUILDERS:
        return BUILDERS[name]
    module_name, _, function = name.partition(":")
    if not module_name or not function:
        raise ModelError(f"--model {name!r}: expected cnn, vit or package.module:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser().resolve()
            if not path.is_file():
                raise ModelError(f"--model {name!r}: no file {path}")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules.setdefault(path.stem, module)
            spec.loader.exec_module(module)
        else:
            # As `python -m` does: the current directory is importable, so `examples.my_model:build`
            # works from the project's root, for the console script too.
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except ModelError:
        raise
    except Exception as exc:  # ImportError, SyntaxError, an error at import time
        raise ModelError(f"--model {name!r}: cannot import {module_name}: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")) from None
    builder = getattr(module, function, None)
    if not callable(builder):
        raise ModelError(f"--model {name!r}: {module_name} has no function {function!r}")
    return builder


def module_source(name: str) -> Optional[Path]:
    """The directory or file that must reach the workers for builder `name` to import there: the
    top-level package of `package.module:function`, or the file of `file.py:function`; None for a
    registered name or a module that is installed (site-packages)."""
    if name in BUILDERS or ":" not in name:
        return None
    module_name = name.partition(":")[0]
    if module_name.endswith(".py"):
        return Path(module_name).expanduser().resolve()
    resolve_builder(name)  # imports it, or says why not
    top = sys.modules[module_name.split(".")[0]]
    location = getattr(top, "__file__", None) or next(iter(getattr(top, "__path__", [])), None)
    if location is None:
        return None
    path = Path(location).resolve()
    root = path.parent if path.name == "__init__.py" else path
    if "site-packages" in root.parts or "dist-packages" in root.parts:
        return None
    return root


def build(spec: ModelSpec) -> nn.Module:
    """Call the spec's builder with its kwargs and check that the result has the interface."""
    builder = resolve_builder(spec.builder)
    try:
        model = builder(**spec.kwargs)
    except TypeError as exc:
        signature = _signature(builder)
        raise ModelError(f"--model {spec.builder}: the builder{signature} does not take these arguments "
                         f"{sorted(spec.kwargs)}: {exc}") from None
    check_interface(model, spec.builder)
    return model


def _signature(function: Callable) -> str:
    try:
        return str(inspect.signature(function))
    except (TypeError, ValueError):
        return ""


def check_interface(model: Any, builder: str) -> None:
    if not isinstance(model, nn.Module):
        raise ModelError(f"--model {builder}: the builder returned {type(model).__name__}, not a torch.nn.Module")
    for method in ("encode", "decode"):
        if not callable(getattr(model, method, None)):
            raise ModelError(f"--model {builder}: {type(model).__name__} has no {method}() method "
                             f"(see cape_ray/model/api.py; subclass CapeModelBase)")


def check_episode(model: nn.Module, builder: str, image_size: int, num_shots: int) -> None:
    """Run one dummy episode (2 queries, 3 keypoints) through the model and check every shape of
    the interface; ModelError names the first that is wrong."""
    generator = torch.Generator().manual_seed(0)
    shots, queries, keypoints = num_shots, 2, 3
    inputs = dict(
        support_images=torch.rand(1, shots, 3, image_size, image_size, generator=generator),
        support_keypoints=torch.rand(1, shots, keypoints, 2, generator=generator),
        support_visible=torch.ones(1, shots, keypoints, dtype=torch.bool),
        query_images=torch.rand(1, queries, 3, image_size, image_size, generator=generator),
        keypoint_mask=torch.ones(1, keypoints, dtype=torch.bool),
        skeleton=torch.zeros(1, keypoints, keypoints),
    )
    prefix = f"--model {builder}: on a dummy episode ({shots} shot(s), {queries} queries, {keypoints} keypoints, " \
             f"{image_size} px)"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            features = model.encode(inputs["support_images"].flatten(0, 1))
            if not isinstance(features, torch.Tensor) or features.dim() != 4 or features.shape[0] != shots:
                raise ModelError(f"{prefix} encode() returned {_shape(features)}, expected [N={shots}, C, h, w]")
            output = forward_episode(model, **inputs)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"{prefix} the model raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                         ) from None
    finally:
        model.train(was_training)
    if not isinstance(output, Prediction):
        raise ModelError(f"{prefix} decode() returned {type(output).__name__}, expected cape_ray.model.api.Prediction")
    coords = output.coords
    if not isinstance(coords, torch.Tensor) or coords.dim() != 5 or tuple(coords.shape[1:]) != (1, queries, keypoints, 2):
        raise ModelError(f"{prefix} Prediction.coords is {_shape(coords)}, expected [L, 1, {queries}, {keypoints}, 2]")
    if output.similarity is not None:
        similarity = output.similarity
        if similarity.dim() != 5 or tuple(similarity.shape[:3]) != (1, queries, keypoints):
            raise ModelError(f"{prefix} Prediction.similarity is {_shape(similarity)}, expected "
                             f"[1, {queries}, {keypoints}, h, w] or None")


def _shape(value: Any) -> str:
    return f"a tensor of shape {list(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


# ------------------------------------------------------------------------------ the record
def fingerprint(model: nn.Module) -> str:
    """SHA-256 of the parameter and buffer names, shapes and dtypes: two models with the same
    fingerprint load each other's state_dict."""
    lines = [f"{name}:{tuple(tensor.shape)}:{str(tensor.dtype).removeprefix('torch.')}"
             for name, tensor in sorted(model.state_dict().items())]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def describe(model: nn.Module, spec: ModelSpec) -> dict[str, Any]:
    """What a checkpoint records of its model: the spec, parameter counts and the fingerprint."""
    parameters = list(model.parameters())
    return {**spec.to_dict(),
            "class": f"{type(model).__module__}.{type(model).__qualname__}",
            "parameters": sum(p.numel() for p in parameters),
            "trainable_parameters": sum(p.numel() for p in parameters if p.requires_grad),
            "fingerprint": fingerprint(model)}


def check_json(kwargs: dict, builder: str) -> None:
    try:
        json.dumps(kwargs, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"--model {builder}: its keyword arguments must be JSON values (a checkpoint records "
                         f"them): {exc}") from None


def load_matching(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> LoadReport:
    """Load the tensors of `state_dict` that `module` has (strict=False) after checking that every
    shared key has the same shape: a mismatch is a ModelError naming the key and both shapes."""
    expected = module.state_dict()
    for key, tensor in state_dict.items():
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape):
            raise ModelError(f"--pretrained {source}: {key} has shape {list(tensor.shape)} in the file but "
                             f"{list(expected[key].shape)} in the model as built here (another architecture or width?)")
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    return LoadReport(source, len(set(state_dict) & set(expected)), tuple(missing), tuple(unexpected))


def parameter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The model's own groups ({"backbone", "head"}), or every parameter as "head"."""
    groups = getattr(model, "parameter_groups", None)
    if callable(groups):
        return groups()
    return {"backbone": [], "head": list(model.parameters())}
