"""The one tiny configuration every training test runs, and checkpoints written by the real writer.

TINY: 1 worker x batch 2 x accumulation 2 = 4 episodes per optimizer step, 16 episodes per epoch,
so 4 steps per epoch; a mid-epoch checkpoint after every step; 2 epochs; validation on 2 episodes x 3
queries per validation category; 32 px images and a 16-channel model. Tests change what they need
(`tiny_config(name, num_workers="2", ...)`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pyarrow.fs as pafs
import torch

from cape_ray import engine, rng
from cape_ray.checkpoint import serialize
from cape_ray.checkpointer import Checkpointer
from cape_ray.config import TrainConfig
from cape_ray.model import build_model, describe, model_spec
from cape_ray.state import TrainState

TINY = dict(
    epochs=2, episodes_per_epoch=16, batch_size=2, accumulation_steps=2, num_queries_per_episode=2,
    checkpoint_every_steps=1, val_episodes=2, val_queries_per_episode=3, image_size=32, feature_dim=16,
    refine_layers=1, synthetic_instances_per_category=6, synthetic_canvas=48, num_workers="1", keep=2,
    warmup_steps=2, max_failures=2, lr=3e-3, num_threads=1, progress="lines",
)


# The ViT model at test size: DINOv2 ViT-S/14's architecture with 2 blocks of width 32, at 28 px (a
# 2 x 2 grid of patches), and a 2-layer decoder of width 32.
TINY_VIT = dict(model="vit", image_size=28, feature_dim=32, refine_layers=2,
                model_kwargs={"backbone_args": {"depth": 2, "embed_dim": 32, "num_heads": 2}})


def make_config(storage_path, name: str = "run", **changes) -> TrainConfig:
    return TrainConfig(**{**TINY, "name": name, "storage_path": str(storage_path), **changes})


def tiny_vit(storage_path, name: str = "vit", **changes) -> TrainConfig:
    return make_config(storage_path, name, **{**TINY_VIT, **changes})


def cli_flags(config: TrainConfig) -> list[str]:
    """`cape-ray train` flags that rebuild `config` (defaults left out)."""
    defaults = TrainConfig().to_dict()
    flags = []
    for key, value in config.to_dict().items():
        if value == defaults[key] or value is None:
            continue
        if isinstance(value, dict):
            flags += [f"--{key}", json.dumps(value)]
        elif key == "tracker":
            flags += [item for tracker in value.split(",") for item in ("--tracker", tracker)]
        elif isinstance(value, bool):
            flags.append(f"--{key}" if value else f"--no-{key.replace('_', '-')}")
        else:
            flags += [f"--{key}", str(value)]
    return flags


def write_checkpoint(run_dir, name: str, config: TrainConfig, *, seed: int = 0, ranks: int = 1,
                     metrics: Optional[dict] = None, state: Optional[TrainState] = None,
                     rank_states: Optional[dict[int, dict]] = None) -> Path:
    """A checkpoint of a freshly built model (one AdamW step taken), written by the real Checkpointer.
    Each rank's state is this process's RNG after `rank` extra draws, so ranks differ."""
    torch.manual_seed(seed)
    model = build_model(config)
    optimizer = engine.build_optimizer(model, config)
    scheduler = engine.build_scheduler(optimizer, config, 10)
    sum(p.sum() for p in model.parameters()).backward()
    optimizer.step()
    scheduler.step()
    state = state or TrainState.fresh(config, ranks)
    state.model = state.model or describe(model, model_spec(config))
    if rank_states is None:
        rank_states = {}
        for rank in range(ranks):
            torch.rand(rank + 1)
            rank_states[rank] = {**rng.capture(), "loss_sum": 0.5 * rank, "loss_count": rank}
    blobs = {rank: serialize(value) for rank, value in rank_states.items()}
    Path(run_dir).mkdir(parents=True, exist_ok=True)

    checkpointer = Checkpointer(config, fs=pafs.LocalFileSystem(), run_dir=str(run_dir), latest=None, registered=(),
                                rank=0, world_size=ranks, report=lambda metrics, stored, name: None,
                                gather=lambda blob: blobs, all_reduce=dict)
    checkpointer.save(name, state, model, optimizer, scheduler, rank_states[0], metrics or {"val_pck": 0.5}, wait=True)
    return Path(run_dir) / name


def copy_support_pck(categories, pairs_per_category: int = 20, seed: int = 0) -> float:
    """PCK@0.2 of copying a support's keypoints (normalised to its crop box) onto a query's crop
    box, over random support/query pairs of each category's instances: the baseline a built-in set
    must keep low, or the support positions give the answer away."""
    import numpy as np

    from cape_ray.data.transforms import crop_box

    rng = np.random.default_rng(seed)
    scores = []
    for insts in categories:
        boxes = np.array([crop_box(i.bbox) for i in insts])
        norm = [(i.keypoints - b[:2]) / b[2] for i, b in zip(insts, boxes)]
        for _ in range(pairs_per_category):
            s, q = rng.choice(len(insts), 2, replace=False)
            valid = insts[s].visible & insts[q].visible
            pred = norm[s] * boxes[q, 2] + boxes[q, :2]
            err = np.linalg.norm(pred - insts[q].keypoints, axis=1) / insts[q].bbox[2:].max()
            scores.append(((err < 0.2) & valid).sum() / valid.sum() if valid.any() else 0.0)
    return float(np.mean(scores))
