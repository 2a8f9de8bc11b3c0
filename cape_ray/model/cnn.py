"""The convolutional CAPE model (`--model cnn`, the default): a small CNN that trains on a CPU.

support images -> features sampled at the support keypoints -> one token per keypoint (mean over the
shots that see it) -> cosine similarity with every query feature -> local soft-argmax proposal ->
refinement layers that look at the query around the current estimate and predict a correction.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from cape_ray.model.api import CapeModelBase, LoadReport, Prediction, load_matching
from cape_ray.model.backbone import build_backbone
from cape_ray.model.layers import (
    CoordinateEmbedding,
    KeypointSelfAttention,
    SkeletonGraphConv,
    cell_and_offset,
    cell_patches,
    channels_last,
    interpolate,
    inverse_sigmoid,
    local_soft_argmax,
    support_tokens,
)


class RefinementLayer(nn.Module):
    """Keypoint tokens look at each other (and the skeleton), then at the query around the current
    estimate (local similarity pattern + feature at the estimate), and predict a coordinate delta."""

    def __init__(self, dim: int, heads: int, dropout: float, use_skeleton: bool, window: int):
        super().__init__()
        self.position = CoordinateEmbedding(dim)
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = KeypointSelfAttention(dim, heads, dropout)
        self.graph_norm = nn.LayerNorm(dim) if use_skeleton else None
        self.graph = SkeletonGraphConv(dim) if use_skeleton else None
        if window % 2 != 1:
            raise ValueError(f"the refinement window must be odd (centred on the estimate), got {window}")
        self.window = window
        self.look = nn.Linear(window * window + dim, dim)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim), nn.Dropout(dropout))
        self.delta_norm = nn.LayerNorm(dim)
        self.delta = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 2))
        nn.init.zeros_(self.delta[-1].weight)  # start as the identity: refinement can only help
        nn.init.zeros_(self.delta[-1].bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens, estimate, support_tokens, query_features, scale, key_mask, adjacency):
        """tokens [N, K, D]; estimate [N, K, 2] (detached); support_tokens [N, K, D] unit norm;
        query_features [N, D, H, W] unit norm -> (tokens, new estimate)."""
        height, width = query_features.shape[-2:]
        h = tokens + self.position(estimate)
        h = h + self.dropout(self.attn(self.attn_norm(h), key_mask))
        if self.graph is not None:
            h = h + self.dropout(self.graph(self.graph_norm(h), adjacency, key_mask))

        # similarity of the support token to the query on a window of cells around the estimate.
        # The window's points are whole cells apart, so they share the estimate's sub-cell offset:
        # interpolating the similarity of a (window + 1)^2 patch of cells gives all of them.
        x0, y0, wx, wy = cell_and_offset(estimate, height, width)
        radius = self.window // 2
        patch = cell_patches(query_features, x0, y0, -radius, self.window + 1)  # [N, K, W+1, W+1, D]
        cell_similarity = (patch * support_tokens[:, :, None, None, :]).sum(dim=-1)
        similarity = scale * interpolate(cell_similarity, wx, wy).flatten(2)  # [N, K, W*W] row-major (y, x)
        centre = interpolate(patch[:, :, radius:radius + 2, radius:radius + 2], wx, wy)[:, :, 0, 0]
        h = h + self.look(torch.cat([similarity.softmax(dim=-1) * self.window, centre], dim=-1))

        h = h + self.ffn(self.ffn_norm(h))
        delta = self.delta(self.delta_norm(h))
        return h, torch.sigmoid(inverse_sigmoid(estimate) + delta)


class CnnCape(CapeModelBase):
    """CNN features (GroupNorm: no image sees another) shared by supports and queries; cosine
    similarity with a learnable temperature; windowed soft-argmax proposals; refinement layers."""

    def __init__(self, backbone: str = "small", feature_dim: int = 64, refine_layers: int = 2,
                 use_skeleton: bool = False, dropout: float = 0.1, heads: int = 4,
                 proposal_radius: int = 2, refine_window: int = 5, freeze_backbone: bool = False):
        super().__init__()
        self.backbone = build_backbone(backbone, feature_dim)
        heads = math.gcd(heads, feature_dim)
        # cosine similarity is in [-1, 1]; a learnable temperature makes the softmax over cells sharp
        self.log_scale = nn.Parameter(torch.tensor(math.log(20.0)))
        self.proposal_radius = proposal_radius
        self.token_proj = nn.Linear(feature_dim, feature_dim)
        self.support_position = CoordinateEmbedding(feature_dim)
        self.layers = nn.ModuleList(
            RefinementLayer(feature_dim, heads, dropout, use_skeleton, refine_window)
            for _ in range(refine_layers)
        )
        self.backbone.requires_grad_(not freeze_backbone)

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=math.log(100.0)).exp()

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"backbone": list(self.backbone.parameters()),
                "head": [p for n, p in self.named_parameters() if not n.startswith("backbone.")]}

    def load_pretrained(self, state_dict: dict[str, torch.Tensor], source: str = "") -> LoadReport:
        """Backbone weights: keys as in `self.backbone` (or as in a whole CnnCape's, "backbone." first)."""
        prefix = "backbone."
        if any(key.startswith(prefix) for key in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        return load_matching(self.backbone, state_dict, source)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, H, W] in [0, 1] -> unit-norm features [N, D, h, w]."""
        return F.normalize(self.backbone(images), dim=1)

    def decode(self, support_features: torch.Tensor, support_keypoints: torch.Tensor,
               support_visible: torch.Tensor, query_features: torch.Tensor, keypoint_mask: torch.Tensor,
               skeleton: torch.Tensor) -> Prediction:
        batch, queries, num_keypoints = support_features.shape[0], query_features.shape[1], support_keypoints.shape[2]
        token_features, support_position = support_tokens(support_features, support_keypoints, support_visible)
        unit_tokens = F.normalize(token_features, dim=-1)

        scale = self.scale
        logits = scale * torch.einsum("bkd,bqdhw->bqkhw", unit_tokens, query_features)
        estimate = local_soft_argmax(logits, self.proposal_radius)  # [B, Q, K, 2]
        estimates = [estimate]

        if self.layers:
            def per_pair(x: torch.Tensor) -> torch.Tensor:  # [B, ...] -> [B*Q, ...]
                return x.unsqueeze(1).expand(batch, queries, *x.shape[1:]).flatten(0, 1)

            tokens = per_pair(self.token_proj(token_features) + self.support_position(support_position))
            pair_unit_tokens = per_pair(unit_tokens)
            key_mask = per_pair(keypoint_mask)
            adjacency = per_pair(skeleton.to(tokens.dtype))
            flat_features = channels_last(query_features.flatten(0, 1))  # sampled by every layer
            current = estimate.flatten(0, 1)
            for layer in self.layers:
                # detached between layers: each layer learns its own correction (as in CapeFormer)
                tokens, current = layer(tokens, current.detach(), pair_unit_tokens, flat_features, scale,
                                        key_mask, adjacency)
                estimates.append(current.view(batch, queries, num_keypoints, 2))
        return Prediction(torch.stack(estimates), logits)


def build_cnn(backbone: str = "small", feature_dim: int = 64, refine_layers: int = 2, use_skeleton: bool = False,
              dropout: float = 0.1, freeze_backbone: bool = False, **extra) -> CnnCape:
    """`--model cnn`: CnnCape from the config's model flags (`extra`: --model_kwargs, e.g. heads)."""
    return CnnCape(backbone=backbone, feature_dim=feature_dim, refine_layers=refine_layers,
                   use_skeleton=use_skeleton, dropout=dropout, freeze_backbone=freeze_backbone, **extra)
