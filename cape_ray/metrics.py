"""PCK with MP-100's rules, and the training losses.

Shapes: B episodes, S support shots, Q queries per episode, K keypoints (padded to the batch max).
Coordinates are normalised crop coordinates unless a name says `pixels`.

PCK (MP-100): a keypoint counts if it is real, visible in the query and visible in EVERY support;
d = ||pred - gt|| / max(w, h) of the query's bbox, all in original image pixels; a pair scores the
fraction of its counted keypoints with d < a, or 0 if it has none (as does a pair whose bbox has no
size: the reference cannot normalise its distances); PCK is the mean over pairs.
Values are returned per pair so that callers can sum them over batches and ranks before dividing.
"""

from __future__ import annotations

import torch

from cape_ray.data.transforms import apply_affine

PCK_THRESHOLDS = (0.05, 0.10, 0.15, 0.20, 0.25)


def to_original_pixels(points: torch.Tensor, query_to_original: torch.Tensor) -> torch.Tensor:
    """points [B, Q, K, 2] normalised; query_to_original [B, Q, 2, 3] -> [B, Q, K, 2] original pixels."""
    return apply_affine(query_to_original, points)


def pck_valid_mask(query_visible: torch.Tensor, support_visible: torch.Tensor,
                   keypoint_mask: torch.Tensor) -> torch.Tensor:
    """[B, Q, K]: real, visible in the query and in every support (MP-100 evaluation)."""
    in_supports = support_visible.all(dim=1) & keypoint_mask  # [B, K]
    return query_visible & in_supports.unsqueeze(1)


def loss_valid_mask(query_visible: torch.Tensor, support_visible: torch.Tensor,
                    keypoint_mask: torch.Tensor) -> torch.Tensor:
    """[B, Q, K]: real, visible in the query and in at least one support (it has a token to match)."""
    in_supports = support_visible.any(dim=1) & keypoint_mask
    return query_visible & in_supports.unsqueeze(1)


def pck_per_pair(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, query_bbox: torch.Tensor,
                 query_to_original: torch.Tensor, thresholds=PCK_THRESHOLDS) -> torch.Tensor:
    """pred, gt [B, Q, K, 2] normalised; valid [B, Q, K]; query_bbox [B, Q, 4] (x, y, w, h) original
    pixels -> [B, Q, len(thresholds)] PCK of every pair (0 for a pair without valid keypoints)."""
    pred_pixels = to_original_pixels(pred.float(), query_to_original.float())
    gt_pixels = to_original_pixels(gt.float(), query_to_original.float())
    bbox_size = query_bbox[..., 2:].float().amax(dim=-1)  # [B, Q]
    # MP-100's reference counts no keypoint of a pair whose bbox has no size: the pair scores 0
    valid = valid & (bbox_size > 0).unsqueeze(-1)
    distance = (pred_pixels - gt_pixels).norm(dim=-1) / bbox_size.clamp(min=1e-6).unsqueeze(-1)  # [B, Q, K]
    limits = torch.tensor(thresholds, dtype=distance.dtype, device=distance.device)
    hits = (distance.unsqueeze(-1) < limits) & valid.unsqueeze(-1)  # [B, Q, K, T]
    counted = valid.sum(dim=-1, keepdim=True).clamp(min=1).to(distance.dtype)  # [B, Q, 1]
    return hits.sum(dim=2).to(distance.dtype) / counted


def mean_pck(per_threshold: dict[float, float]) -> float:
    """mPCK: mean over the thresholds."""
    return sum(per_threshold.values()) / len(per_threshold)


def coordinate_l1(coords: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """coords [L, B, Q, K, 2] (every layer), gt [B, Q, K, 2] -> [B, Q, K]: |dx| + |dy| averaged over
    layers, so the loss scale does not grow with the number of refinement layers."""
    return (coords - gt.unsqueeze(0)).abs().sum(dim=-1).mean(dim=0)


def similarity_cross_entropy(logits: torch.Tensor, gt: torch.Tensor, sigma_cells: float = 1.0) -> torch.Tensor:
    """logits [B, Q, K, h, w] over query cells, gt [B, Q, K, 2] -> [B, Q, K] cross-entropy against a
    Gaussian of `sigma_cells` around the gt: teaches the features to peak at the right cell, which
    the soft-argmax's L1 alone does only within its window."""
    height, width = logits.shape[-2:]
    ys = (torch.arange(height, device=logits.device, dtype=logits.dtype) + 0.5) / height
    xs = (torch.arange(width, device=logits.device, dtype=logits.dtype) + 0.5) / width
    dy = (ys - gt[..., 1:2]) * height  # [B, Q, K, h] in cells
    dx = (xs - gt[..., 0:1]) * width  # [B, Q, K, w]
    target = torch.exp(-(dy.unsqueeze(-1) ** 2 + dx.unsqueeze(-2) ** 2) / (2 * sigma_cells ** 2)).flatten(-2)
    target = target / target.sum(dim=-1, keepdim=True).clamp(min=1e-12)
    return -(target * logits.flatten(-2).log_softmax(dim=-1)).sum(dim=-1)
