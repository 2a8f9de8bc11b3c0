"""CAPE models: the interface (api.py), the built-in CNN and ViT models, pretrained weights.

`model_spec(config)` turns a TrainConfig's model flags into the spec a checkpoint records;
`build_model(config)` builds it. Everything else builds from a spec (`api.build`).
"""

from __future__ import annotations

from cape_ray.model.api import (
    CapeModelBase,
    LoadReport,
    ModelError,
    ModelSpec,
    Prediction,
    build,
    describe,
    parameter_groups,
)
from cape_ray.model.backbone import Backbone, build_backbone

__all__ = ["Backbone", "CapeModelBase", "LoadReport", "ModelError", "ModelSpec", "Prediction", "build",
           "build_backbone", "build_model", "describe", "model_spec", "parameter_groups"]


def model_spec(config) -> ModelSpec:
    """The spec a TrainConfig describes. Built-in models take the model flags; a model of your own
    takes --model_kwargs only (what its builder declares). --model_kwargs adds to or overrides the
    built-in models' arguments too (e.g. heads, or backbone_args for a tiny ViT)."""
    if config.model == "cnn":
        kwargs = dict(backbone=config.backbone, feature_dim=config.feature_dim, refine_layers=config.refine_layers,
                      use_skeleton=config.use_skeleton, dropout=config.dropout, freeze_backbone=config.freeze_backbone)
    elif config.model == "vit":
        kwargs = dict(backbone=config.backbone, image_size=config.image_size, feature_dim=config.feature_dim,
                      refine_layers=config.refine_layers, use_skeleton=config.use_skeleton, dropout=config.dropout,
                      freeze_backbone=config.freeze_backbone, train_backbone_blocks=config.train_backbone_blocks)
    else:
        kwargs = {}
    return ModelSpec(config.model, {**kwargs, **config.model_kwargs})


def build_model(config):
    """The model of `config`, freshly initialised from the global torch generator (the caller seeds
    it). A model of your own with --freeze_backbone has its parameter_groups()["backbone"] frozen."""
    model = build(model_spec(config))
    if config.freeze_backbone and config.model not in ("cnn", "vit"):
        backbone = parameter_groups(model)["backbone"]
        if not backbone:
            raise ModelError(f"--freeze_backbone: --model {config.model} names no backbone parameters "
                             f"(parameter_groups() -> {{'backbone': [...], 'head': [...]}})")
        for parameter in backbone:
            parameter.requires_grad_(False)
    if config.grad_checkpointing:
        toggle = getattr(model, "set_grad_checkpointing", None)
        if not callable(toggle):
            raise ModelError(f"--grad_checkpointing: --model {config.model} has no set_grad_checkpointing(enabled)")
        toggle(True)
    return model
