"""A CAPE model of your own: `cape-ray train --model examples.my_model:build`.

cape-ray imports `build` (from the current directory, as `python -m` would), calls it with
--model_kwargs (e.g. --model_kwargs '{"width": 48}'), checks the model on a dummy episode before Ray
starts, and ships this module to every worker. What the two methods take and return is in
cape_ray/model/api.py; docs/models.md walks through this file.

The model: a small convolutional encoder shared by supports and queries; each support keypoint
becomes a token (the encoder's features at the keypoint, averaged over the shots that see it); the
query keypoint is where the query's features are most similar to the token (a soft-argmax in a
window around the best cell). One stage, no refinement: a baseline to start from.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from cape_ray.model.api import CapeModelBase, Prediction
from cape_ray.model.layers import local_soft_argmax, support_tokens


class TinyMatcher(CapeModelBase):
    def __init__(self, width: int = 32, window_radius: int = 2):
        super().__init__()
        # GroupNorm, not BatchNorm: one image's features must not depend on the other images
        self.encoder = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1), nn.GroupNorm(4, width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=2, dilation=2), nn.GroupNorm(4, width), nn.ReLU(),
            nn.Conv2d(width, width, 1),
        )
        self.log_scale = nn.Parameter(torch.tensor(math.log(20.0)))  # temperature of the similarity
        self.window_radius = window_radius

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Optional: lets --backbone_lr_mult and --freeze_backbone tell the encoder apart."""
        return {"backbone": list(self.encoder.parameters()), "head": [self.log_scale]}

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [0, 1] -> unit-length features [N, C, H/2, W/2]."""
        return F.normalize(self.encoder(images), dim=1)

    def decode(self, support_features, support_keypoints, support_visible, query_features, keypoint_mask,
               skeleton) -> Prediction:
        tokens, _ = support_tokens(support_features, support_keypoints, support_visible)  # [B, K, C]
        logits = self.log_scale.exp() * torch.einsum("bkc,bqchw->bqkhw", F.normalize(tokens, dim=-1),
                                                     query_features)
        coords = local_soft_argmax(logits, self.window_radius)  # [B, Q, K, 2]
        return Prediction(coords.unsqueeze(0), logits)  # one stage: L = 1


def build(width: int = 32) -> TinyMatcher:
    """The builder `--model examples.my_model:build` names; its arguments come from --model_kwargs."""
    return TinyMatcher(width=width)
