"""One training step's loss, batched evaluation, optimizer/schedule, and the two baselines.

Framework-free: the Ray worker and the quality benchmark both call these. Evaluation returns SUMS
(loss over keypoints, PCK over pairs, counts) so that callers can add them over batches and ranks
and divide once in `summarize`: the result does not depend on batch size or world size.
"""

from __future__ import annotations

import math

import torch

from cape_ray.metrics import (
    PCK_THRESHOLDS,
    coordinate_l1,
    loss_valid_mask,
    pck_per_pair,
    pck_valid_mask,
    similarity_cross_entropy,
)

# weight of the similarity-map cross-entropy next to the coordinate L1 (see similarity_cross_entropy)
SIMILARITY_LOSS_WEIGHT = 0.1

MODEL_INPUTS = ("support_images", "support_keypoints", "support_visible", "query_images", "keypoint_mask",
                "skeleton")
BATCH_TENSORS = MODEL_INPUTS + ("query_keypoints", "query_visible", "query_bbox", "query_to_original")


def batch_tensors(batch, device: torch.device) -> dict[str, torch.Tensor]:
    """The tensors of an EpisodeBatch that the model and metrics use, on `device`."""
    return {name: getattr(batch, name).to(device) for name in BATCH_TENSORS}


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------------------------------- loss
def keypoint_losses(model: torch.nn.Module, tensors: dict[str, torch.Tensor]):
    """-> (per-keypoint loss [B, Q, K], loss mask [B, Q, K], predictions [L, B, Q, K, 2])."""
    coords, logits = model(*(tensors[name] for name in MODEL_INPUTS), return_similarity=True)
    gt = tensors["query_keypoints"]
    valid = loss_valid_mask(tensors["query_visible"], tensors["support_visible"], tensors["keypoint_mask"])
    losses = coordinate_l1(coords, gt)
    if SIMILARITY_LOSS_WEIGHT > 0:
        # a gt outside the crop (rotated out) has no cell to peak at: only the L1 applies there
        inside = ((gt >= 0) & (gt <= 1)).all(dim=-1)
        cross_entropy = similarity_cross_entropy(logits, gt)
        losses = losses + SIMILARITY_LOSS_WEIGHT * torch.where(inside, cross_entropy, torch.zeros_like(cross_entropy))
    return losses, valid, coords


def compute_loss(model: torch.nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (scalar loss: mean over valid keypoints of the batch, predictions [L, B, Q, K, 2])."""
    losses, valid, coords = keypoint_losses(model, batch_tensors(batch, model_device(model)))
    loss = losses.masked_fill(~valid, 0.0).sum() / valid.sum().clamp(min=1)
    return loss, coords


# ---------------------------------------------------------------------------------- evaluation
def pck_key(threshold: float) -> str:
    return f"pck@{threshold:.2f}"


@torch.no_grad()
def evaluation_sums(model: torch.nn.Module, batch) -> dict[str, float]:
    """Sums over the batch's pairs: loss_sum/loss_count (per keypoint), pck@a_sum (per pair) and pairs.
    Runs in eval mode and restores the model's mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        tensors = batch_tensors(batch, model_device(model))
        losses, loss_mask, coords = keypoint_losses(model, tensors)
    finally:
        model.train(was_training)
    sums = {
        "loss_sum": float(losses.double().masked_fill(~loss_mask, 0.0).sum()),
        "loss_count": float(loss_mask.sum()),
    }
    sums.update(pck_sums(coords[-1], tensors))
    return sums


def add_sums(total: dict[str, float], sums: dict[str, float]) -> dict[str, float]:
    """Accumulate one batch's evaluation_sums into `total` (in place; also returned)."""
    for key, value in sums.items():
        total[key] = total.get(key, 0.0) + value
    return total


def summarize(sums: dict[str, float]) -> dict[str, float]:
    """Summed evaluation_sums (over batches and ranks) -> val_loss, pck@a per threshold, val_pck
    (= PCK@0.2, the MP-100 headline) and mpck (mean over the thresholds)."""
    pairs = max(sums.get("pairs", 0.0), 1.0)
    metrics = {"val_loss": sums.get("loss_sum", 0.0) / max(sums.get("loss_count", 0.0), 1.0)}
    for threshold in PCK_THRESHOLDS:
        metrics[pck_key(threshold)] = sums.get(pck_key(threshold) + "_sum", 0.0) / pairs
    metrics["val_pck"] = metrics[pck_key(0.20)]
    metrics["mpck"] = sum(metrics[pck_key(t)] for t in PCK_THRESHOLDS) / len(PCK_THRESHOLDS)
    return metrics


def pck_sums(predictions: torch.Tensor, tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-threshold PCK sums over pairs and the pair count, for predictions [B, Q, K, 2]
    (the model's final layer, or a baseline's with `batch_tensors(batch, "cpu")`)."""
    valid = pck_valid_mask(tensors["query_visible"], tensors["support_visible"], tensors["keypoint_mask"])
    pck = pck_per_pair(predictions, tensors["query_keypoints"], valid, tensors["query_bbox"],
                       tensors["query_to_original"]).flatten(0, 1)  # [pairs, T]
    sums = {"pairs": float(pck.shape[0])}
    for index, threshold in enumerate(PCK_THRESHOLDS):
        sums[pck_key(threshold) + "_sum"] = float(pck[:, index].double().sum())
    return sums


# ----------------------------------------------------------------------------------- baselines
def copy_support_predictions(batch) -> torch.Tensor:
    """Every query keypoint where it is in the supports (mean over the shots that see it)."""
    keypoints, visible = batch.support_keypoints, batch.support_visible.to(batch.support_keypoints.dtype)
    weights = torch.where(visible.sum(dim=1, keepdim=True) > 0, visible, torch.ones_like(visible))
    mean = (keypoints * weights.unsqueeze(-1)).sum(dim=1) / weights.sum(dim=1).unsqueeze(-1)  # [B, K, 2]
    queries = batch.query_keypoints.shape[1]
    return mean.unsqueeze(1).expand(-1, queries, -1, -1).contiguous()


def center_predictions(batch) -> torch.Tensor:
    """Every keypoint at the image centre."""
    return torch.full_like(batch.query_keypoints, 0.5)


# ------------------------------------------------------------------------ optimizer and schedule
def build_optimizer(model: torch.nn.Module, config) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices and conv kernels (not on norms, biases or the temperature)."""
    decay, no_decay = [], []
    for _, parameter in sorted(model.named_parameters()):
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to 1 over `warmup_steps`, then cosine down to `min_lr_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-optimizer-step schedule. The lambda is a plain function, which LambdaLR does not save:
    state_dict() holds only primitives, and a fresh instance + load_state_dict gives the same LR."""
    warmup, ratio = config.warmup_steps, config.min_lr_ratio

    def factor(step: int) -> float:
        return lr_factor(step, warmup, total_steps, ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
