"""Episodes: which instances form a support/query set, as pure functions of seeds, and batching.

Training: episode `index` of `epoch` is a function of (seed, epoch, index) only. Its category comes
from a balanced schedule: global indices are cut into blocks of C (number of categories) and each
block visits every category once, in an order drawn from
`default_rng([seed, epoch, block, _BLOCK_TAG])`. Its supports, queries and augmentation parameters
come from `default_rng([seed, epoch, index])`. The global RNGs of random / numpy / torch are never
used, so resuming, reseeding or changing the world size does not change any episode.

Validation / test: per category, E fixed episodes from `default_rng([seed, category_id, e])`,
`num_shots` supports shared by `num_queries` queries, no augmentation.

Supports and queries of an episode are distinct instances. A category with fewer than
num_shots + num_queries instances (but at least num_shots + 1) repeats queries, cycling through the
non-support instances.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence, TypeVar

import numpy as np
import torch

from .transforms import AugmentParams, PreparedSplit, augment_matrices, compose_affine, sample_augment_params, warp

_BLOCK_TAG = 9001  # keeps the category schedule's generator apart from the episode generators
T = TypeVar("T")


@dataclass(frozen=True)
class Episode:
    category_id: int
    support_rows: np.ndarray  # int64 [num_shots] rows of the PreparedSplit
    query_rows: np.ndarray  # int64 [num_queries]
    augment: Optional[AugmentParams] = None  # supports first, then queries; None = never augmented


@dataclass
class EpisodeBatch:
    support_images: Optional[torch.Tensor]  # float32 [B, S, 3, H, W] in [0, 1]; None when built without images
    support_keypoints: torch.Tensor  # float32 [B, S, K, 2] normalised crop coordinates
    support_visible: torch.Tensor  # bool [B, S, K]
    query_images: Optional[torch.Tensor]  # float32 [B, Q, 3, H, W]
    query_keypoints: torch.Tensor  # float32 [B, Q, K, 2]
    query_visible: torch.Tensor  # bool [B, Q, K]
    keypoint_mask: torch.Tensor  # bool [B, K] real keypoints of each episode's category
    skeleton: torch.Tensor  # float32 [B, K, K] symmetric 0/1 adjacency
    query_bbox: torch.Tensor  # float32 [B, Q, 4] original pixels
    query_to_original: torch.Tensor  # float32 [B, Q, 2, 3] augmented normalised -> original pixels
    category_ids: torch.Tensor  # int64 [B]
    support_rows: torch.Tensor  # int64 [B, S] rows of the PreparedSplit
    query_rows: torch.Tensor  # int64 [B, Q]

    def to(self, device, non_blocking: bool = False) -> "EpisodeBatch":
        return EpisodeBatch(**{f.name: None if getattr(self, f.name) is None
                               else getattr(self, f.name).to(device, non_blocking=non_blocking)
                               for f in dataclasses.fields(self)})

    @property
    def batch_size(self) -> int:
        return int(self.category_ids.shape[0])

    @property
    def num_keypoints(self) -> int:
        return int(self.keypoint_mask.shape[1])


# --------------------------------------------------------------------------------------- indexing
def global_episode_indices(step: int, micro: int, rank: int, world_size: int, batch_size: int,
                           accumulation_steps: int) -> np.ndarray:
    """Global episode indices of micro-batch `micro` of optimizer step `step` on `rank`.

    A step consumes G = batch_size * accumulation_steps * world_size consecutive indices; within it,
    micro-batch m of rank r takes s*G + m*batch_size*world_size + r*batch_size + j, j < batch_size.
    """
    if not (0 <= rank < world_size and 0 <= micro < accumulation_steps and batch_size >= 1 and step >= 0):
        raise ValueError(f"bad episode position: step={step} micro={micro}/{accumulation_steps} "
                         f"rank={rank}/{world_size} batch_size={batch_size}")
    per_step = batch_size * accumulation_steps * world_size
    start = step * per_step + micro * batch_size * world_size + rank * batch_size
    return np.arange(start, start + batch_size, dtype=np.int64)


def shard(episodes: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Every world_size-th episode starting at `rank` (fixed evaluation episodes)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world size {world_size}")
    return list(episodes[rank::world_size])


def _pick_rows(rng: np.random.Generator, rows: np.ndarray, shots: int, queries: int
               ) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(len(rows))
    rest = order[shots:]
    query = rest[:queries] if len(rest) >= queries else np.resize(rest, queries)
    return rows[order[:shots]], rows[query]


class EpisodeSampler:
    """Episodes over the usable categories of one PreparedSplit."""

    def __init__(self, split: PreparedSplit, num_shots: Optional[int] = None, num_queries: Optional[int] = None,
                 seed: int = 0):
        self.split = split
        self.num_shots = split.num_shots if num_shots is None else int(num_shots)
        self.num_queries = split.num_queries if num_queries is None else int(num_queries)
        self.seed = int(seed)
        self.category_ids = list(split.category_ids)
        if not self.category_ids:
            raise ValueError(f"{split.source}: no category can form an episode")
        if self.num_shots < 1 or self.num_queries < 1:
            raise ValueError(f"num_shots and num_queries must be >= 1, got {self.num_shots}, {self.num_queries}")
        for cid in self.category_ids:
            if len(split.rows_by_category[cid]) < self.num_shots + 1:
                raise ValueError(f"{split.source}: category {cid} has {len(split.rows_by_category[cid])} "
                                 f"instances, fewer than num_shots + 1 = {self.num_shots + 1}; prepare the "
                                 "split with the same num_shots")
        self._schedule: dict[tuple[int, int], np.ndarray] = {}

    # ------------------------------------------------------------------ training
    def train_category(self, epoch: int, index: int) -> int:
        count = len(self.category_ids)
        block, position = divmod(int(index), count)
        key = (int(epoch), block)
        order = self._schedule.get(key)
        if order is None:
            if len(self._schedule) > 256:  # epochs move on; keep the cache small
                self._schedule.clear()
            order = np.random.default_rng([self.seed, int(epoch), block, _BLOCK_TAG]).permutation(count)
            self._schedule[key] = order
        return self.category_ids[int(order[position])]

    def train_episode(self, epoch: int, index: int) -> Episode:
        if epoch < 0 or index < 0:
            raise ValueError(f"epoch and index must be >= 0, got {epoch}, {index}")
        cid = self.train_category(epoch, index)
        rng = np.random.default_rng([self.seed, int(epoch), int(index)])
        support, query = _pick_rows(rng, self.split.rows_by_category[cid], self.num_shots, self.num_queries)
        params = sample_augment_params(rng, self.num_shots + self.num_queries)
        return Episode(category_id=cid, support_rows=support, query_rows=query, augment=params)

    def train_episodes(self, epoch: int, indices: Sequence[int]) -> list[Episode]:
        return [self.train_episode(epoch, int(i)) for i in indices]

    # ------------------------------------------------------------------ evaluation
    def fixed_episodes(self, num_episodes_per_category: int, num_queries: Optional[int] = None,
                       seed: Optional[int] = None) -> list[Episode]:
        """E episodes per usable category (category order, then e), identical on every call."""
        queries = self.num_queries if num_queries is None else int(num_queries)
        base = self.seed if seed is None else int(seed)
        episodes = []
        for cid in self.category_ids:
            rows = self.split.rows_by_category[cid]
            for e in range(int(num_episodes_per_category)):
                rng = np.random.default_rng([base, cid, e])
                support, query = _pick_rows(rng, rows, self.num_shots, queries)
                episodes.append(Episode(category_id=cid, support_rows=support, query_rows=query))
        return episodes


@dataclass(frozen=True)
class EpochPlan:
    """The episodes of one rank's remaining optimizer steps of an epoch, as tensors: what a step
    indexes. Episode tensors are [steps, accumulation, batch_size, ...] and live on the batches'
    device; `widths` (each micro-batch's padded keypoint count) stays on the host, so that slicing
    to it never waits for the device."""

    epoch: int
    first_episode: int  # global index of the first episode of the plan's first step
    episodes_per_step: int
    rows: torch.Tensor  # int64 [steps, acc, B * (S + Q)] split rows, each episode's supports then queries
    counts: torch.Tensor  # int64 [steps, acc, B] keypoints of each episode's category
    slots: torch.Tensor  # int64 [steps, acc, B] position of each episode's category in split.category_ids
    category_ids: torch.Tensor  # int64 [steps, acc, B]
    widths: np.ndarray  # int64 [steps, acc] on the host
    # float32 [steps, acc, B * (S + Q), 2, 3] (see transforms.augment_matrices); None without augmentation
    augmentation: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

    @property
    def steps(self) -> int:
        return int(self.widths.shape[0])

    def step_of(self, epoch: int, first_episode: int) -> Optional[int]:
        """The plan's step that starts at `first_episode` of `epoch`, or None if it has none."""
        offset = first_episode - self.first_episode
        if epoch != self.epoch or offset < 0 or offset % self.episodes_per_step:
            return None
        step = offset // self.episodes_per_step
        return step if step < self.steps else None


class TrainingBatches:
    """One rank's training micro-batches on its device, a pure function of the position: optimizer
    step starting at global episode `first_episode` of `epoch` -> `accumulation_steps` batches.

    The split is moved to the device once. The first step asked for in an epoch (its start, or where
    a resume continues) plans every remaining step of the epoch for this rank: one
    `EpisodeSampler.train_episodes` call draws their episodes, and their rows, keypoint counts and
    augmentation matrices go to the device together. A step then only indexes the plan and runs the
    batch arithmetic (gather, warp, keypoint transforms) where the model runs. The batches are
    bitwise those `collate` builds on the CPU from the same episodes.
    """

    def __init__(self, split: PreparedSplit, config, rank: int, world_size: int, device: torch.device):
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.batch_size, self.accumulation, self.augment = config.batch_size, config.accumulation_steps, config.augment
        self.episodes_per_epoch = config.episodes_per_epoch
        self.sampler = EpisodeSampler(split, config.num_shots, config.num_queries_per_episode, seed=config.seed)
        self.shots, self.queries = self.sampler.num_shots, self.sampler.num_queries
        self.split = split.to(self.device)
        categories = split.category_ids
        self._slot_of = {cid: slot for slot, cid in enumerate(categories)}
        self._num_keypoints = np.array([split.categories[cid].num_keypoints for cid in categories], dtype=np.int64)
        # every category's skeleton, zero-padded to the split's largest K: a batch's are a gather
        kmax = split.max_keypoints
        skeletons = torch.zeros(len(categories), kmax, kmax)
        for slot, cid in enumerate(categories):
            kc = int(self._num_keypoints[slot])
            skeletons[slot, :kc, :kc] = split.adjacency[cid]
        self.skeletons = skeletons.to(self.device)
        self.plan: Optional[EpochPlan] = None

    @property
    def episodes_per_step(self) -> int:
        return self.batch_size * self.accumulation * self.world_size

    def step_indices(self, first_episode: int) -> np.ndarray:
        """The global episode indices this rank trains in the step starting at `first_episode`,
        micro-batch by micro-batch, as global_episode_indices lays them out."""
        return first_episode + np.concatenate([
            global_episode_indices(0, micro, self.rank, self.world_size, self.batch_size, self.accumulation)
            for micro in range(self.accumulation)])

    def step(self, epoch: int, first_episode: int) -> list[EpisodeBatch]:
        step = self.plan.step_of(epoch, first_episode) if self.plan is not None else None
        if step is None:
            self.plan, step = self.plan_epoch(epoch, first_episode), 0
        return [self._micro_batch(self.plan, step, micro) for micro in range(self.accumulation)]

    def plan_epoch(self, epoch: int, first_episode: int) -> EpochPlan:
        """Plan this rank's steps of `epoch` from the one starting at global episode `first_episode`."""
        per_step = self.episodes_per_step
        steps = (self.episodes_per_epoch - first_episode) // per_step
        if first_episode < 0 or steps < 1:
            raise ValueError(f"no optimizer step of {per_step} episodes starts at episode {first_episode} of an "
                             f"epoch of {self.episodes_per_epoch}")
        indices = np.concatenate([self.step_indices(first_episode + per_step * step) for step in range(steps)])
        episodes = self.sampler.train_episodes(epoch, indices)

        shape = (steps, self.accumulation, self.batch_size)
        rows = np.stack([np.concatenate([e.support_rows, e.query_rows]) for e in episodes]).reshape(*shape[:2], -1)
        slots = np.array([self._slot_of[e.category_id] for e in episodes], dtype=np.int64).reshape(shape)
        counts = self._num_keypoints[slots]
        category_ids = np.array([e.category_id for e in episodes], dtype=np.int64).reshape(shape)
        augmentation = None
        if self.augment:
            # One call per micro-batch, as collate makes it: the bits of the trigonometry may depend on
            # the images per call, and a plan that starts mid-epoch (a resume) must give the same bits.
            per_micro = [augment_matrices(AugmentParams.concat([e.augment for e in episodes[i:i + self.batch_size]]))
                         for i in range(0, len(episodes), self.batch_size)]
            augmentation = tuple(torch.stack([m[part] for m in per_micro]).to(torch.float32)
                                 .view(*shape[:2], -1, 2, 3).to(self.device) for part in range(3))
        def on_device(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(array).to(self.device)

        return EpochPlan(epoch=int(epoch), first_episode=int(first_episode), episodes_per_step=per_step,
                         rows=on_device(rows), counts=on_device(counts), slots=on_device(slots),
                         category_ids=on_device(category_ids), widths=counts.max(axis=-1), augmentation=augmentation)

    def _micro_batch(self, plan: EpochPlan, step: int, micro: int) -> EpisodeBatch:
        width = int(plan.widths[step, micro])
        skeleton = self.skeletons.index_select(0, plan.slots[step, micro])[:, :width, :width].contiguous()
        matrices = None if plan.augmentation is None else tuple(m[step, micro] for m in plan.augmentation)
        return assemble(self.split, plan.rows[step, micro], plan.counts[step, micro], width,
                        plan.category_ids[step, micro], skeleton, self.shots, self.queries, matrices)


# ---------------------------------------------------------------------------------------- collate
def collate(split: PreparedSplit, episodes: Sequence[Episode], augment: bool = False,
            images: bool = True) -> EpisodeBatch:
    """Stack episodes into tensors, padded to the largest keypoint count K of the batch.

    With `augment`, every image is rotated/scaled by its episode's parameters; keypoints that leave
    the crop become invisible, and `query_to_original` includes the augmentation. Without `images`
    the batch has everything but the pixels (for evaluation from precomputed features).
    """
    if not episodes:
        raise ValueError("collate needs at least one episode")
    shots, queries = len(episodes[0].support_rows), len(episodes[0].query_rows)
    if any(len(e.support_rows) != shots or len(e.query_rows) != queries for e in episodes):
        raise ValueError("all episodes of a batch need the same numbers of supports and queries")
    if augment and not images:
        raise ValueError("augment=True needs images")
    if augment and any(e.augment is None for e in episodes):
        raise ValueError("augment=True needs training episodes (they carry augmentation parameters)")
    counts = np.array([split.categories[e.category_id].num_keypoints for e in episodes])
    k = int(counts.max())
    rows = torch.from_numpy(np.concatenate([np.concatenate([e.support_rows, e.query_rows]) for e in episodes]))
    skeleton = torch.zeros(len(episodes), k, k)
    for i, e in enumerate(episodes):
        kc = int(counts[i])
        skeleton[i, :kc, :kc] = split.adjacency[e.category_id]
    matrices = None
    if augment:
        matrices = tuple(m.to(torch.float32) for m in augment_matrices(AugmentParams.concat([e.augment for e in episodes])))
    return assemble(split, rows, torch.from_numpy(counts), k,
                    torch.tensor([e.category_id for e in episodes], dtype=torch.int64), skeleton, shots, queries,
                    matrices, images=images)


def assemble(split: PreparedSplit, rows: torch.Tensor, counts: torch.Tensor, width: int, category_ids: torch.Tensor,
             skeleton: torch.Tensor, shots: int, queries: int,
             matrices: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
             images: bool = True) -> EpisodeBatch:
    """The batch arithmetic shared by `collate` (CPU) and `TrainingBatches` (the model's device):
    rows int64 [B * (S + Q)] (each episode's supports then queries), counts int64 [B] keypoints per
    episode, `width` = max(counts) as a host int, skeleton [B, width, width]; `matrices` = float32
    (theta, forward, inverse) [B * (S + Q), 2, 3] to augment with (transforms.augment_matrices)."""
    b, per = int(counts.shape[0]), shots + queries
    pixels = split.images.index_select(0, rows).float().div_(255.0) if images else None
    keypoints = split.keypoints.index_select(0, rows)[:, :width]
    visible = split.visible.index_select(0, rows)[:, :width]
    mask = torch.arange(width, device=rows.device)[None, :] < counts[:, None]  # [B, K]
    query_rows = rows.view(b, per)[:, shots:].reshape(-1)
    to_original = split.crop_to_original.index_select(0, query_rows).view(b, queries, 2, 3)

    if matrices is not None:
        theta, forward, inverse = matrices
        pixels, keypoints = warp(pixels, keypoints, theta, forward)
        inside = ((keypoints >= 0) & (keypoints <= 1)).all(-1)
        row_mask = mask[:, None].expand(b, per, width).reshape(b * per, width)  # each episode's mask per image
        visible = visible & inside & row_mask
        keypoints = keypoints * row_mask[..., None]  # padding stays exactly 0
        query_inverse = inverse.view(b, per, 2, 3)[:, shots:]
        to_original = compose_affine(to_original, query_inverse)

    if pixels is not None:
        pixels = pixels.view(b, per, 3, *pixels.shape[-2:])
    keypoints = keypoints.reshape(b, per, width, 2)
    visible = visible.reshape(b, per, width)
    query_bbox = split.bbox.index_select(0, query_rows).view(b, queries, 4)
    return EpisodeBatch(
        support_images=None if pixels is None else pixels[:, :shots].contiguous(),
        support_keypoints=keypoints[:, :shots].contiguous(),
        support_visible=visible[:, :shots].contiguous(),
        query_images=None if pixels is None else pixels[:, shots:].contiguous(),
        query_keypoints=keypoints[:, shots:].contiguous(),
        query_visible=visible[:, shots:].contiguous(),
        keypoint_mask=mask,
        skeleton=skeleton,
        query_bbox=query_bbox,
        query_to_original=to_original,
        category_ids=category_ids,
        support_rows=rows.view(b, per)[:, :shots].contiguous(),
        query_rows=rows.view(b, per)[:, shots:].contiguous(),
    )
