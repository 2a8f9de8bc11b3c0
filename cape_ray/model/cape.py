"""Matching-based category-agnostic pose estimation.

support images -> features sampled at the support keypoints -> one token per keypoint (mean over the
shots that see it) -> cosine similarity with every query feature -> local soft-argmax proposal ->
refinement layers that look at the query around the current estimate and predict a correction.

Keypoints are (x, y) in [0, 1] crop coordinates: 0 is the left/top edge of the image, 1 the
right/bottom edge, which is exactly `grid_sample`'s convention with `align_corners=False`.
Episodes of categories with different K share a batch: `keypoint_mask` marks the real keypoints,
and padded ones never reach a real keypoint (attention and graph are masked, everything else is
per keypoint).
"""

from __future__ import annotations

import math
import torch
import torch.nn as nn
import torch.nn.functional as F

from cape_ray.model.backbone import build_backbone


def sample_features(features: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear features at normalised points: features [N, D, H, W], points [N, P, 2] -> [N, P, D]."""
    grid = (points * 2 - 1).unsqueeze(2)  # [N, P, 1, 2] in grid_sample's [-1, 1]
    sampled = F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return sampled.squeeze(3).transpose(1, 2)


def cell_centres(height: int, width: int, device: torch.device) -> torch.Tensor:
    """[H*W, 2] normalised (x, y) of every feature cell's centre, row-major."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=-1)


def local_soft_argmax(logits: torch.Tensor, radius: int) -> torch.Tensor:
    """Soft-argmax restricted to a (2r+1)^2 window around the peak: logits [..., H, W] -> [..., 2].

    A global soft-argmax is pulled towards the centre by every other similar part; the window keeps
    the estimate on the best match while staying differentiable inside it.
    """
    height, width = logits.shape[-2:]
    flat = logits.flatten(-2)
    peak = flat.argmax(dim=-1, keepdim=True)
    peak_y, peak_x = peak // width, peak % width
    cell_y = torch.arange(height, device=logits.device).repeat_interleave(width)
    cell_x = torch.arange(width, device=logits.device).repeat(height)
    window = ((cell_y - peak_y).abs() <= radius) & ((cell_x - peak_x).abs() <= radius)
    prob = flat.masked_fill(~window, float("-inf")).softmax(dim=-1)
    return prob @ cell_centres(height, width, logits.device).to(prob.dtype)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    x = x.clamp(eps, 1 - eps)
    return torch.log(x / (1 - x))


class CoordinateEmbedding(nn.Module):
    """Fourier features of (x, y) -> dim: tells a token where its current estimate is."""

    def __init__(self, dim: int, num_frequencies: int = 8):
        super().__init__()
        self.register_buffer("frequencies", math.pi * 2.0 ** torch.arange(num_frequencies), persistent=False)
        self.proj = nn.Linear(4 * num_frequencies, dim)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        angles = (points.unsqueeze(-1) * self.frequencies).flatten(-2)
        return self.proj(torch.cat([angles.sin(), angles.cos()], dim=-1))


class KeypointSelfAttention(nn.Module):
    """Multi-head self-attention among the keypoint tokens of one pair; padded keys are masked."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        n, k, dim = x.shape
        q, key, v = self.qkv(x).view(n, k, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ key.transpose(-2, -1)) / math.sqrt(dim // self.heads)
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        attended = self.dropout(scores.softmax(dim=-1)) @ v
        return self.out(attended.transpose(1, 2).reshape(n, k, dim))


class SkeletonGraphConv(nn.Module):
    """One graph convolution over the category skeleton: each keypoint mixes in its neighbours' mean."""

    def __init__(self, dim: int):
        super().__init__()
        self.self_proj = nn.Linear(dim, dim)
        self.neighbour_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, adjacency: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        adjacency = adjacency * key_mask[:, None, :].to(adjacency.dtype)
        degree = adjacency.sum(dim=-1, keepdim=True).clamp(min=1.0)
        neighbours = (adjacency / degree) @ self.neighbour_proj(x)
        return F.gelu(self.self_proj(x) + neighbours)


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
        n, k, dim = tokens.shape
        height, width = query_features.shape[-2:]
        h = tokens + self.position(estimate)
        h = h + self.dropout(self.attn(self.attn_norm(h), key_mask))
        if self.graph is not None:
            h = h + self.dropout(self.graph(self.graph_norm(h), adjacency, key_mask))

        # similarity of the support token to the query on a window of cells around the estimate
        steps = torch.arange(self.window, device=tokens.device, dtype=tokens.dtype) - (self.window - 1) / 2
        offset_y, offset_x = torch.meshgrid(steps / height, steps / width, indexing="ij")
        offsets = torch.stack([offset_x.reshape(-1), offset_y.reshape(-1)], dim=-1)  # [P, 2]
        points = estimate.unsqueeze(2) + offsets  # [N, K, P, 2]
        around = sample_features(query_features, points.view(n, -1, 2)).view(n, k, -1, dim)
        similarity = scale * (around * support_tokens.unsqueeze(2)).sum(dim=-1)  # [N, K, P]
        centre = around[:, :, around.shape[2] // 2]
        h = h + self.look(torch.cat([similarity.softmax(dim=-1) * self.window, centre], dim=-1))

        h = h + self.ffn(self.ffn_norm(h))
        delta = self.delta(self.delta_norm(h))
        return h, torch.sigmoid(inverse_sigmoid(estimate) + delta)


class CapeModel(nn.Module):
    def __init__(self, backbone: str = "small", feature_dim: int = 64, refine_layers: int = 2,
                 use_skeleton: bool = False, dropout: float = 0.1, heads: int = 4,
                 proposal_radius: int = 2, refine_window: int = 5):
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

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=math.log(100.0)).exp()

    def forward(self, support_images: torch.Tensor, support_keypoints: torch.Tensor,
                support_visible: torch.Tensor, query_images: torch.Tensor, keypoint_mask: torch.Tensor,
                skeleton: torch.Tensor, return_similarity: bool = False):
        """-> coordinates [L, B, Q, K, 2] (proposal first, final last); with `return_similarity`
        also the similarity logits [B, Q, K, h, w] over the query feature map."""
        batch, shots = support_images.shape[:2]
        queries = query_images.shape[1]
        num_keypoints = support_keypoints.shape[2]

        features = self.backbone(torch.cat([support_images.flatten(0, 1), query_images.flatten(0, 1)]))
        features = F.normalize(features, dim=1)
        support_features, query_features = features.split([batch * shots, batch * queries])

        # one token per keypoint: mean over the shots where it is visible (all shots if none is)
        sampled = sample_features(support_features, support_keypoints.flatten(0, 1))
        sampled = sampled.view(batch, shots, num_keypoints, -1)
        weights = support_visible.to(sampled.dtype)
        weights = torch.where(weights.sum(dim=1, keepdim=True) > 0, weights, torch.ones_like(weights))
        weights = (weights / weights.sum(dim=1, keepdim=True)).unsqueeze(-1)
        token_features = (sampled * weights).sum(dim=1)  # [B, K, D]
        support_position = (support_keypoints * weights).sum(dim=1)  # [B, K, 2]
        unit_tokens = F.normalize(token_features, dim=-1)

        height, width = query_features.shape[-2:]
        query_features = query_features.view(batch, queries, -1, height, width)
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
            flat_features = query_features.flatten(0, 1)
            current = estimate.flatten(0, 1)
            for layer in self.layers:
                # detached between layers: each layer learns its own correction (as in CapeFormer)
                tokens, current = layer(tokens, current.detach(), pair_unit_tokens, flat_features, scale,
                                        key_mask, adjacency)
                estimates.append(current.view(batch, queries, num_keypoints, 2))

        coords = torch.stack(estimates)
        return (coords, logits) if return_similarity else coords


def build_model(config) -> CapeModel:
    """The model a TrainConfig describes (fields: backbone, feature_dim, refine_layers, use_skeleton,
    dropout)."""
    return CapeModel(
        backbone=config.backbone,
        feature_dim=config.feature_dim,
        refine_layers=config.refine_layers,
        use_skeleton=config.use_skeleton,
        dropout=config.dropout,
    )
