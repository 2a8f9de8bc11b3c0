"""The math shared by training and evaluation: the loss, one optimizer step, the fixed-episode
evaluation loop (with its per-instance feature bank), optimizer and schedule, and two baselines.

Framework-free: the Ray worker, `cape-ray evaluate` / `show` and the benchmarks all call these.
Evaluation returns SUMS (loss over keypoints, PCK over pairs, counts) so that callers can add them
over batches, categories and ranks and divide once in `summarize`: the result does not depend on
batch size or world size.
"""

from __future__ import annotations

import contextlib
import logging
import math
from fractions import Fraction
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from cape_ray.data.episodes import Episode, collate
from cape_ray.data.transforms import PreparedSplit
from cape_ray.model.api import parameter_groups
from cape_ray.metrics import (
    PCK_THRESHOLDS,
    coordinate_l1,
    loss_valid_mask,
    pck_per_pair,
    pck_valid_mask,
    similarity_cross_entropy,
)

log = logging.getLogger("cape_ray")

# weight of the similarity-map cross-entropy next to the coordinate L1 (see similarity_cross_entropy)
SIMILARITY_LOSS_WEIGHT = 0.1
ENCODE_BLOCK = 64  # images per encode call when filling a feature bank
FEATURE_BANK_BYTES = 4 << 30  # a category whose bank would be larger is evaluated without one

MODEL_INPUTS = ("support_images", "support_keypoints", "support_visible", "query_images", "keypoint_mask",
                "skeleton")


def batch_tensors(batch, device: torch.device) -> dict[str, torch.Tensor]:
    """The tensors of an EpisodeBatch on `device` (images only if the batch has them)."""
    names = [n for n in ("support_images", "support_keypoints", "support_visible", "query_images",
                         "query_keypoints", "query_visible", "keypoint_mask", "skeleton", "query_bbox",
                         "query_to_original") if getattr(batch, n, None) is not None]
    return {name: getattr(batch, name).to(device, non_blocking=True) for name in names}


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


# ---------------------------------------------------------------------------------------- loss
def keypoint_losses(coords: torch.Tensor, logits: Optional[torch.Tensor], tensors: dict[str, torch.Tensor]):
    """Model outputs (model/api.py: Prediction) -> (per-keypoint loss [B, Q, K], loss mask [B, Q, K]).
    Computed in float32 whatever precision the model ran in."""
    gt = tensors["query_keypoints"]
    valid = loss_valid_mask(tensors["query_visible"], tensors["support_visible"], tensors["keypoint_mask"])
    losses = coordinate_l1(coords.float(), gt)
    if SIMILARITY_LOSS_WEIGHT > 0 and logits is not None:
        logits = logits.float()
        # a gt outside the crop (rotated out) has no cell to peak at: only the L1 applies there
        inside = ((gt >= 0) & (gt <= 1)).all(dim=-1)
        cross_entropy = similarity_cross_entropy(logits, gt)
        losses = losses + SIMILARITY_LOSS_WEIGHT * torch.where(inside, cross_entropy, torch.zeros_like(cross_entropy))
    return losses, valid


def compute_loss(model: torch.nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (scalar loss: mean over valid keypoints of the batch, predictions [L, B, Q, K, 2])."""
    tensors = batch_tensors(batch, model_device(model))
    coords, logits = model(*(tensors[name] for name in MODEL_INPUTS))
    losses, valid = keypoint_losses(coords, logits, tensors)
    loss = losses.masked_fill(~valid, 0.0).sum() / valid.sum().clamp(min=1)
    return loss, coords


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
               micro_batches: Sequence, grad_clip: float, amp: Optional["MixedPrecision"] = None) -> torch.Tensor:
    """One optimizer step over `micro_batches` (gradient accumulation; a DDP model averages
    gradients on the last micro-batch only). Returns the micro-batch losses, detached, on the model's
    device: reading them is left to the caller, so a GPU step needs no host synchronisation.

    `amp` runs the forward pass under autocast (--precision); fp16 scales the loss and skips a step
    whose gradients overflowed, as torch.amp.GradScaler does. `scheduler` (optional) is stepped
    once; the training loop sets its schedule from the position instead (see LrSchedule).
    """
    amp = amp or FP32
    losses = []
    for index, batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with amp.autocast(model_device(model)):
                loss, _ = compute_loss(model, batch)
            amp.scale(loss / len(micro_batches)).backward()
        losses.append(loss.detach())
    amp.unscale(optimizer)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    amp.step(optimizer)
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return torch.stack(losses)


# ---------------------------------------------------------------------------------- precision
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision:
    """--precision: fp32, or autocast in bf16 / fp16 for the forward pass (the loss is computed in
    float32 either way). fp16's narrow range needs a gradient scaler; its state (scale, steps since
    the last overflow) is part of the training state: checkpointed and restored, so a resumed run
    scales exactly as one that never stopped. bf16 has fp32's range and needs none."""

    def __init__(self, precision: str = "fp32", device_type: str = "cpu"):
        if precision not in ("fp32", *AUTOCAST_DTYPES):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
        self.precision = precision
        self.scaler = torch.amp.GradScaler(device_type) if precision == "fp16" else None

    def autocast(self, device: torch.device):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(torch.device(device).type, dtype=AUTOCAST_DTYPES[self.precision])

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:  # before clipping: the clip threshold is in true gradient units
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()

    def state_dict(self) -> Optional[dict]:
        """The scaler's state (primitives only), or None without one."""
        if self.scaler is None:
            return None
        return {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in self.scaler.state_dict().items()}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(dict(state))


FP32 = MixedPrecision("fp32")


# ---------------------------------------------------------------------------------- evaluation
def pck_key(threshold: float) -> str:
    return f"pck@{threshold:.2f}"


def output_sums(coords: torch.Tensor, logits: Optional[torch.Tensor], tensors: dict[str, torch.Tensor]
                ) -> dict[str, float]:
    """Sums over a batch's pairs from the model's outputs: pck@a_sum (per pair) and pairs, and with
    `logits` also loss_sum / loss_count (per keypoint)."""
    sums = pck_sums(coords[-1].float(), tensors)
    if logits is not None:
        losses, loss_mask = keypoint_losses(coords, logits, tensors)
        sums["loss_sum"] = float(losses.double().masked_fill(~loss_mask, 0.0).sum())
        sums["loss_count"] = float(loss_mask.sum())
    return sums


@torch.no_grad()
def evaluation_sums(model: torch.nn.Module, batch) -> dict[str, float]:
    """Loss and PCK sums of one batch through the model's forward (eval mode, restored after)."""
    was_training = model.training
    model.eval()
    try:
        tensors = batch_tensors(batch, model_device(model))
        coords, logits = model(*(tensors[name] for name in MODEL_INPUTS))
    finally:
        model.train(was_training)
    return output_sums(coords, logits, tensors)


def add_sums(total: dict[str, float], sums: dict[str, float]) -> dict[str, float]:
    """Accumulate one batch's sums into `total` (in place; also returned)."""
    for key, value in sums.items():
        total[key] = total.get(key, 0.0) + value
    return total


def summarize(sums: dict[str, float]) -> dict[str, float]:
    """Summed evaluation sums (over batches and ranks) -> val_loss, pck@a per threshold, val_pck
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


class FeatureBank:
    """`model.encode` of split rows, each computed once, looked up by row.

    Fixed episodes reuse instances heavily (MP-100 test: 200 episodes x 16 images drawn from a
    category's ~60-300 instances) and encoding is per image, so a category's instances are encoded
    once and every episode reads their features. Rows are encoded in blocks of ENCODE_BLOCK fixed by
    the category's row list, so a row's features never depend on which episodes asked for it.
    """

    def __init__(self, features: torch.Tensor, slot_of_row: torch.Tensor):
        # Kept as [M, h, w, D]: looked-up features are channels-last views, which the model's
        # sampling and similarity read without copying (see model/cape.py: channels_last).
        self.features = features.permute(0, 2, 3, 1).contiguous()
        self.slot_of_row = slot_of_row  # int64 [N]: split row -> index into features, -1 = absent

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        """rows int64 [...] -> features [..., D, h, w] (channels-last strides)."""
        slots = self.slot_of_row.index_select(0, rows.flatten())
        return self.features.index_select(0, slots).permute(0, 3, 1, 2).unflatten(0, rows.shape)

    @classmethod
    def for_category(cls, model: torch.nn.Module, split: PreparedSplit, category_id: int,
                     episodes: Sequence[Episode], max_bytes: int = FEATURE_BANK_BYTES) -> Optional["FeatureBank"]:
        """A bank of every row `episodes` use; None when it would not save work (it encodes more
        instances than the episodes hold images: few episodes per category) or exceed `max_bytes`."""
        device = model_device(model)
        category_rows = split.rows_by_category[category_id]
        used = np.unique(np.concatenate([np.concatenate([e.support_rows, e.query_rows]) for e in episodes]))
        blocks = [category_rows[b * ENCODE_BLOCK:(b + 1) * ENCODE_BLOCK]
                  for b in np.unique(np.searchsorted(category_rows, used) // ENCODE_BLOCK)]
        rows_needed = sum(len(block) for block in blocks)
        if rows_needed > sum(len(e.support_rows) + len(e.query_rows) for e in episodes):
            return None
        parts = []
        for block in blocks:
            images = split.images.index_select(0, torch.from_numpy(block)).to(device)
            parts.append(model.encode(images.float().div_(255.0)))  # as collate prepares them
            per_row = parts[0][0].numel() * parts[0].element_size()
            if rows_needed * per_row > max_bytes:
                log.warning("category %d: a feature bank of %d instances would need %.1f GB; evaluating it "
                            "without one", category_id, rows_needed, rows_needed * per_row / 1e9)
                return None
        rows = torch.from_numpy(np.concatenate(blocks))
        slot_of_row = torch.full((len(split),), -1, dtype=torch.int64)
        slot_of_row[rows] = torch.arange(len(rows))
        return cls(torch.cat(parts), slot_of_row.to(device))


def category_batches(episodes: Sequence[Episode], batch_size: int) -> list[list[Episode]]:
    """Consecutive episodes in batches of at most `batch_size`, never mixing categories (so no
    episode is padded to another category's keypoint count)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    batches: list[list[Episode]] = []
    for episode in episodes:
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and last[-1].category_id == episode.category_id:
            last.append(episode)
        else:
            batches.append([episode])
    return batches


def by_category(episodes: Sequence[Episode]) -> Iterator[tuple[int, list[Episode]]]:
    """Runs of consecutive episodes of one category (fixed_episodes lists them category by category)."""
    run: list[Episode] = []
    for episode in episodes:
        if run and run[-1].category_id != episode.category_id:
            yield run[0].category_id, run
            run = []
        run.append(episode)
    if run:
        yield run[0].category_id, run


@torch.inference_mode()
def predict_batch(model: torch.nn.Module, split: PreparedSplit, episodes: Sequence[Episode],
                  bank: Optional[FeatureBank] = None, amp: Optional["MixedPrecision"] = None):
    """(batch, tensors on the model's device, coords [L, B, Q, K, 2], similarity logits) for episodes
    of one category: from the bank's features, or encoding the batch's images."""
    with (amp or FP32).autocast(model_device(model)):
        return _predict_batch(model, split, episodes, bank)


def _predict_batch(model, split, episodes, bank):
    batch = collate(split, episodes, images=bank is None)
    tensors = batch_tensors(batch, model_device(model))
    if bank is None:
        supports, queries = tensors["support_images"], tensors["query_images"]
        features = model.encode(torch.cat([supports.flatten(0, 1), queries.flatten(0, 1)]))
        support_features, query_features = features.split([supports.shape[0] * supports.shape[1],
                                                           queries.shape[0] * queries.shape[1]])
        support_features = support_features.unflatten(0, supports.shape[:2])
        query_features = query_features.unflatten(0, queries.shape[:2])
    else:
        device = bank.slot_of_row.device
        support_features = bank.lookup(batch.support_rows.to(device))
        query_features = bank.lookup(batch.query_rows.to(device))
    coords, logits = model.decode(support_features, *(tensors[name] for name in ("support_keypoints",
                                  "support_visible")), query_features, tensors["keypoint_mask"],
                                  tensors["skeleton"])
    return batch, tensors, coords, logits


def evaluate_episodes(model: torch.nn.Module, split: PreparedSplit, episodes: Sequence[Episode],
                      batch_size: int, *, feature_bank: bool = True, with_loss: bool = False,
                      progress: Optional[Callable[[int, int, int], None]] = None,
                      amp: Optional["MixedPrecision"] = None) -> dict[int, dict[str, float]]:
    """The fixed-episode evaluation loop (validation, `cape-ray evaluate`, the benchmarks): sums per
    category (`output_sums` keys plus `episodes`). The model is put in eval mode and its mode restored.

    `progress(done_categories, total_categories, category_id)` is called after each category.
    """
    was_training = model.training
    model.eval()
    runs = list(by_category(episodes))
    sums: dict[int, dict[str, float]] = {}
    try:
        for done, (category_id, category_episodes) in enumerate(runs, start=1):
            total = sums.setdefault(category_id, {"episodes": 0.0})
            with torch.inference_mode(), (amp or FP32).autocast(model_device(model)):
                bank = FeatureBank.for_category(model, split, category_id, category_episodes) if feature_bank else None
            for batch_episodes in category_batches(category_episodes, batch_size):
                _, tensors, coords, logits = predict_batch(model, split, batch_episodes, bank, amp)
                add_sums(total, output_sums(coords, logits if with_loss else None, tensors))
                total["episodes"] += len(batch_episodes)
            if progress is not None:
                progress(done, len(runs), category_id)
    finally:
        model.train(was_training)
    return sums


def total_sums(sums_by_category: dict[int, dict[str, float]]) -> dict[str, float]:
    """Sums over categories (without the episode counts)."""
    total: dict[str, float] = {}
    for sums in sums_by_category.values():
        add_sums(total, {k: v for k, v in sums.items() if k != "episodes"})
    return total


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
    """AdamW over the trainable parameters; weight decay only on matrices and conv kernels (not on
    norms, biases or the temperature). With --backbone_lr_mult, the model's backbone parameters
    (model/api.py: parameter_groups) get groups of their own at lr x the multiplier."""
    backbone = {id(p) for p in parameter_groups(model)["backbone"]}
    mult = float(getattr(config, "backbone_lr_mult", 1.0))
    groups: dict[tuple[bool, bool], list] = {}
    for _, parameter in sorted(model.named_parameters()):
        if parameter.requires_grad:
            is_backbone = mult != 1.0 and id(parameter) in backbone
            groups.setdefault((is_backbone, parameter.dim() >= 2), []).append(parameter)
    param_groups = []
    for is_backbone in (False, True):
        for decay in (True, False):
            params = groups.get((is_backbone, decay), [])
            if params or not is_backbone:  # the two head groups always exist (a stable layout)
                param_groups.append({"params": params, "weight_decay": config.weight_decay if decay else 0.0,
                                     "lr": config.lr * (mult if is_backbone else 1.0)})
    return torch.optim.AdamW(param_groups, lr=config.lr)


def lr_factor(step: float, warmup_steps: int, total_steps: float, min_lr_ratio: float) -> float:
    """Linear warmup to 1 over `warmup_steps`, then cosine down to `min_lr_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class LrSchedule:
    """The learning rate as a function of how far training has come, not of a step counter.

    Progress is counted in reference steps: optimizer steps of the layout the run began with, i.e.
    `steps_per_epoch` per epoch. The training loop sets it from its position (`set_position`): a run
    whose episodes per optimizer step change (another world size, see checkpointer.plan_layout) has
    the same LR as one that never changed at the same episode count. Warmup over `warmup_steps`
    reference steps, then cosine to `min_lr_ratio` at the end of the planned `epochs`; past them the
    LR stays at the floor (a run extended with --lr_schedule keep) unless the plan is re-made for
    more epochs (--lr_schedule extend: `replan`).

    state_dict() holds the plan and the progress (primitives); the base LRs come from the optimizer
    as built from the config (before its state is loaded), so a forced change of --lr applies from
    the resume on.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, steps_per_epoch: int, epochs: int, warmup_steps: int,
                 min_lr_ratio: float):
        self.optimizer = optimizer
        # The base LR of each group is kept in the group, as torch's schedulers do: a schedule made
        # later over the same optimizer (re-planned, say) starts from the base, not from the LR the
        # first one has set by then.
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.steps_per_epoch, self.epochs = int(steps_per_epoch), int(epochs)
        self.warmup_steps, self.min_lr_ratio = int(warmup_steps), float(min_lr_ratio)
        self.progress = 0.0
        self.set_progress(0.0)

    @classmethod
    def for_config(cls, optimizer: torch.optim.Optimizer, config, steps_per_epoch: int) -> "LrSchedule":
        return cls(optimizer, steps_per_epoch=steps_per_epoch, epochs=config.epochs, warmup_steps=config.warmup_steps,
                   min_lr_ratio=config.min_lr_ratio)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def factor(self, progress: float) -> float:
        return lr_factor(progress, self.warmup_steps, self.total_steps, self.min_lr_ratio)

    def set_progress(self, progress: float) -> None:
        self.progress = float(progress)
        factor = self.factor(self.progress)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def reference_steps(self, epoch: int, episode: int, trained_episodes_per_epoch: int) -> float:
        """Progress at `episode` episodes into `epoch`, where an epoch trains
        `trained_episodes_per_epoch` episodes (exact for the run's first layout)."""
        return float(epoch * self.steps_per_epoch
                     + Fraction(episode * self.steps_per_epoch, trained_episodes_per_epoch))

    def set_position(self, epoch: int, episode: int, trained_episodes_per_epoch: int) -> None:
        self.set_progress(self.reference_steps(epoch, episode, trained_episodes_per_epoch))

    def step(self) -> None:
        """One reference step (for loops that count steps themselves)."""
        self.set_progress(self.progress + 1)

    def replan(self, epochs: int) -> None:
        """Plan the cosine over `epochs` from the start, keeping the progress (--lr_schedule extend)."""
        self.epochs = int(epochs)
        self.set_progress(self.progress)

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        """The plan and the progress; `last_epoch` and `_last_lr` as torch's schedulers name them (the
        original pipeline's `lr_scheduler`, see original_format.py), for tools that read those."""
        return {"steps_per_epoch": self.steps_per_epoch, "epochs": self.epochs, "progress": self.progress,
                "last_epoch": int(self.progress) if self.progress.is_integer() else self.progress,
                "_last_lr": self.get_last_lr()}

    def load_state_dict(self, state: dict) -> None:
        self.steps_per_epoch, self.epochs = int(state["steps_per_epoch"]), int(state["epochs"])
        self.set_progress(float(state["progress"]))


def build_scheduler(optimizer: torch.optim.Optimizer, config, total_steps: int) -> LrSchedule:
    """A schedule of `total_steps` optimizer steps counted by `step()` (benchmarks and tests)."""
    return LrSchedule(optimizer, steps_per_epoch=total_steps, epochs=1, warmup_steps=config.warmup_steps,
                      min_lr_ratio=config.min_lr_ratio)
