"""Building blocks shared by cape-ray's models: bilinear sampling of feature maps, the windowed
soft-argmax that turns a similarity map into a keypoint, support keypoint tokens, coordinate
embeddings, attention among keypoints and the skeleton graph convolution.

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


def support_tokens(support_features: torch.Tensor, support_keypoints: torch.Tensor,
                   support_visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per keypoint from the supports [B, S, D, h, w] at their keypoints [B, S, K, 2]:
    the mean over the shots where the keypoint is visible (over all shots if none sees it).
    -> (tokens [B, K, D], mean support position [B, K, 2])."""
    batch, shots, num_keypoints = support_keypoints.shape[:3]
    sampled = sample_features(channels_last(support_features.flatten(0, 1)), support_keypoints.flatten(0, 1))
    sampled = sampled.view(batch, shots, num_keypoints, -1)
    weights = support_visible.to(sampled.dtype)
    weights = torch.where(weights.sum(dim=1, keepdim=True) > 0, weights, torch.ones_like(weights))
    weights = (weights / weights.sum(dim=1, keepdim=True)).unsqueeze(-1)
    return (sampled * weights).sum(dim=1), (support_keypoints * weights).sum(dim=1)


def cell_centres(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised (x, y) of every cell centre of an h x w map, row-major: [h * w, 2]."""
    ys = (torch.arange(height, device=device, dtype=dtype) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=dtype) + 0.5) / width
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(-1, 2)
