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


def cell_and_offset(points: torch.Tensor, height: int, width: int):
    """Normalised points [..., 2] -> (x0, y0) the cell at or left/above each point (int64), and
    (wx, wy) the point's offset from that cell's centre in cells, in [0, 1)."""
    x = points[..., 0] * width - 0.5  # pixel-centre convention, as grid_sample's align_corners=False
    y = points[..., 1] * height - 0.5
    x0, y0 = x.detach().floor(), y.detach().floor()
    return x0.long(), y0.long(), x - x0, y - y0


def cell_patches(features: torch.Tensor, x0: torch.Tensor, y0: torch.Tensor, start: int, size: int) -> torch.Tensor:
    """Feature vectors of the size x size cells from (x0 + start, y0 + start): features [N, D, H, W],
    x0 / y0 [N, P] -> [N, P, size, size, D]. Cells beyond the map are clipped to its border, which
    gives grid_sample's border padding (values and gradients) once interpolated. Whole vectors are
    selected (index_select: deterministic backward under torch.use_deterministic_algorithms, unlike
    grid_sample's), so a channels-last `features` (see `channels_last`) is read without a copy."""
    n, dim, height, width = features.shape
    steps = torch.arange(start, start + size, device=x0.device)
    xs = (x0.unsqueeze(-1) + steps).clamp(0, width - 1)  # [N, P, size]
    ys = (y0.unsqueeze(-1) + steps).clamp(0, height - 1)
    cells = ys.unsqueeze(-1) * width + xs.unsqueeze(-2)  # [N, P, size, size], row-major (y, x)
    cells = cells + (torch.arange(n, device=cells.device) * (height * width)).view(n, 1, 1, 1)
    table = features.permute(0, 2, 3, 1).reshape(n * height * width, dim)  # a view when channels-last
    return table.index_select(0, cells.flatten()).view(*cells.shape, dim)


def interpolate(values: torch.Tensor, wx: torch.Tensor, wy: torch.Tensor) -> torch.Tensor:
    """Bilinear interpolation between neighbouring cells: values [N, P, S, S, ...] at whole cells,
    offsets wx / wy [N, P] -> [N, P, S-1, S-1, ...] at the offset from every cell."""
    shape = wx.shape + (1, 1) + (1,) * (values.dim() - 4)
    wx, wy = wx.reshape(shape).to(values.dtype), wy.reshape(shape).to(values.dtype)
    top = values[:, :, :-1, :-1] * (1 - wx) + values[:, :, :-1, 1:] * wx
    bottom = values[:, :, 1:, :-1] * (1 - wx) + values[:, :, 1:, 1:] * wx
    return top * (1 - wy) + bottom * wy


def sample_features(features: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear features at normalised points: features [N, D, H, W], points [N, P, 2] -> [N, P, D].

    The same values as `grid_sample(mode="bilinear", padding_mode="border", align_corners=False)`,
    with a backward that is deterministic on CUDA (see cell_patches).
    """
    height, width = features.shape[-2:]
    x0, y0, wx, wy = cell_and_offset(points, height, width)
    return interpolate(cell_patches(features, x0, y0, 0, 2), wx, wy)[:, :, 0, 0]


def channels_last(features: torch.Tensor) -> torch.Tensor:
    """[N, D, H, W] with D fastest in memory: what `sample_features` reads without a copy."""
    return features.contiguous(memory_format=torch.channels_last)


def local_soft_argmax(logits: torch.Tensor, radius: int) -> torch.Tensor:
    """Soft-argmax restricted to a (2r+1)^2 window around the peak: logits [..., H, W] -> [..., 2].

    A global soft-argmax is pulled towards the centre by every other similar part; the window keeps
    the estimate on the best match while staying differentiable inside it. Only the window's
    logits are gathered (cells beyond the map get no weight).
    """
    height, width = logits.shape[-2:]
    flat = logits.flatten(-2)
    peak = flat.argmax(dim=-1, keepdim=True)
    steps = torch.arange(-radius, radius + 1, device=logits.device)
    ys, xs = peak // width + steps, peak % width + steps  # [..., 2r+1] rows and columns of the window
    inside = ((ys >= 0) & (ys < height)).unsqueeze(-1) & ((xs >= 0) & (xs < width)).unsqueeze(-2)
    cells = ys.clamp(0, height - 1).unsqueeze(-1) * width + xs.clamp(0, width - 1).unsqueeze(-2)
    window = flat.gather(-1, cells.flatten(-2)).masked_fill(~inside.flatten(-2), float("-inf"))
    prob = window.softmax(dim=-1).view(cells.shape)  # [..., 2r+1, 2r+1]
    x = (prob.sum(dim=-2) * (xs + 0.5).to(prob.dtype)).sum(dim=-1) / width
    y = (prob.sum(dim=-1) * (ys + 0.5).to(prob.dtype)).sum(dim=-1) / height
    return torch.stack([x, y], dim=-1)


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

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, H, W] in [0, 1] -> unit-norm features [N, D, h, w].

        One image's features never depend on another image of the batch (GroupNorm), so evaluation
        can encode each instance once and reuse its features in every episode that shows it.
        """
        return F.normalize(self.backbone(images), dim=1)

    def forward(self, support_images: torch.Tensor, support_keypoints: torch.Tensor,
                support_visible: torch.Tensor, query_images: torch.Tensor, keypoint_mask: torch.Tensor,
                skeleton: torch.Tensor, return_similarity: bool = False):
        """decode(encode(images)); supports and queries go through the backbone in one call."""
        batch, shots = support_images.shape[:2]
        queries = query_images.shape[1]
        features = self.encode(torch.cat([support_images.flatten(0, 1), query_images.flatten(0, 1)]))
        support_features, query_features = features.split([batch * shots, batch * queries])
        return self.decode(support_features.unflatten(0, (batch, shots)), support_keypoints, support_visible,
                           query_features.unflatten(0, (batch, queries)), keypoint_mask, skeleton,
                           return_similarity=return_similarity)

    def decode(self, support_features: torch.Tensor, support_keypoints: torch.Tensor,
               support_visible: torch.Tensor, query_features: torch.Tensor, keypoint_mask: torch.Tensor,
               skeleton: torch.Tensor, return_similarity: bool = False):
        """Encoded supports [B, S, D, h, w] and queries [B, Q, D, h, w] (from `encode`) ->
        coordinates [L, B, Q, K, 2] (proposal first, final last); with `return_similarity` also the
        similarity logits [B, Q, K, h, w] over the query feature map."""
        batch, shots = support_features.shape[:2]
        queries = query_features.shape[1]
        num_keypoints = support_keypoints.shape[2]

        # one token per keypoint: mean over the shots where it is visible (all shots if none is)
        sampled = sample_features(channels_last(support_features.flatten(0, 1)), support_keypoints.flatten(0, 1))
        sampled = sampled.view(batch, shots, num_keypoints, -1)
        weights = support_visible.to(sampled.dtype)
        weights = torch.where(weights.sum(dim=1, keepdim=True) > 0, weights, torch.ones_like(weights))
        weights = (weights / weights.sum(dim=1, keepdim=True)).unsqueeze(-1)
        token_features = (sampled * weights).sum(dim=1)  # [B, K, D]
        support_position = (support_keypoints * weights).sum(dim=1)  # [B, K, 2]
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
