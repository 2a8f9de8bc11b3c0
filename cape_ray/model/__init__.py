"""CAPE model: backbone + matching proposals + refinement decoder."""

from cape_ray.model.backbone import Backbone, build_backbone
from cape_ray.model.cape import CapeModel, build_model

__all__ = ["Backbone", "CapeModel", "build_backbone", "build_model"]
