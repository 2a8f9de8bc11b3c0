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

from .transforms import AugmentParams, PreparedSplit, augment as augment_images, \
    compose_affine, sample_augment_params

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


class TrainingBatches:
    """One rank's training micro-batches on its device, a pure function of the position: optimizer
    step starting at global episode `first_episode` of `epoch` -> `accumulation_steps` batches."""

    def __init__(self, split: PreparedSplit, config, rank: int, world_size: int, device: torch.device):
        self.split, self.rank, self.world_size, self.device = split, rank, world_size, device
        self.batch_size, self.accumulation, self.augment = config.batch_size, config.accumulation_steps, config.augment
        self.sampler = EpisodeSampler(split, config.num_shots, config.num_queries_per_episode, seed=config.seed)

    def step(self, epoch: int, first_episode: int) -> list[EpisodeBatch]:
        batches = []
        for micro in range(self.accumulation):
            indices = first_episode + global_episode_indices(0, micro, self.rank, self.world_size, self.batch_size,
                                                             self.accumulation)
            episodes = self.sampler.train_episodes(epoch, indices)
            batches.append(collate(self.split, episodes, augment=self.augment).to(self.device, non_blocking=True))
        return batches


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
    b, per = len(episodes), shots + queries
    counts = np.array([split.categories[e.category_id].num_keypoints for e in episodes])
    k = int(counts.max())

    rows = torch.from_numpy(np.concatenate([np.concatenate([e.support_rows, e.query_rows]) for e in episodes]))
    if augment and not images:
        raise ValueError("augment=True needs images")
    pixels = split.images.index_select(0, rows).float().div_(255.0) if images else None
    keypoints = split.keypoints.index_select(0, rows)[:, :k]
    visible = split.visible.index_select(0, rows)[:, :k]
    mask = torch.arange(k)[None, :] < torch.from_numpy(counts)[:, None]  # [B, K]
    query_rows = rows.view(b, per)[:, shots:].reshape(-1)
    to_original = split.crop_to_original.index_select(0, query_rows).view(b, queries, 2, 3)

    if augment:
        if any(e.augment is None for e in episodes):
            raise ValueError("augment=True needs training episodes (they carry augmentation parameters)")
        params = AugmentParams.concat([e.augment for e in episodes])
        pixels, keypoints, inverse = augment_images(pixels, keypoints, params)
        inside = ((keypoints >= 0) & (keypoints <= 1)).all(-1)
        row_mask = mask.repeat_interleave(per, dim=0)
        visible = visible & inside & row_mask
        keypoints = keypoints * row_mask[..., None]  # padding stays exactly 0
        query_inverse = inverse.view(b, per, 2, 3)[:, shots:]
        to_original = compose_affine(to_original, query_inverse)

    if pixels is not None:
        pixels = pixels.view(b, per, 3, *pixels.shape[-2:])
    keypoints = keypoints.reshape(b, per, k, 2)
    visible = visible.reshape(b, per, k)
    skeleton = torch.zeros(b, k, k)
    for i, e in enumerate(episodes):
        kc = int(counts[i])
        skeleton[i, :kc, :kc] = split.adjacency[e.category_id]
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
        category_ids=torch.tensor([e.category_id for e in episodes], dtype=torch.int64),
        support_rows=rows.view(b, per)[:, :shots].contiguous(),
        query_rows=rows.view(b, per)[:, shots:].contiguous(),
    )
