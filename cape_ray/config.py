"""TrainConfig: every flag of a cape-ray run in one frozen, validated dataclass.

The config travels as a plain JSON dict (to Ray workers, into every checkpoint's state.json) and is
rebuilt with `TrainConfig.from_dict`, so a checkpoint always says exactly how it was made.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, fields
from typing import Any, Optional

from cape_ray.tracking import parse_best_metrics


class ConfigError(ValueError):
    """An invalid flag value; the message is one line a user can act on."""


@dataclass(frozen=True)
class TrainConfig:
    # --- run identity and storage ---
    name: str = "cape-ray"  # Ray run name: rerunning with the same name + storage resumes
    storage_path: str = "runs"  # local/NFS directory or s3://bucket/prefix
    resume: Optional[str] = None  # start from this checkpoint directory
    seed: int = 0

    # --- schedule ---
    epochs: int = 30
    episodes_per_epoch: int = 2048  # training episodes per epoch, over all ranks
    batch_size: int = 16  # episodes per rank per micro-batch
    accumulation_steps: int = 1
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.02  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    early_stopping_patience: int = 0  # epochs without PCK improvement before stopping; 0 = off
    early_stopping_min_delta: float = 0.0
    pck_smoothing: int = 1  # best-PCK selection and early stopping use the mean of the last N val_pck
    best_metrics: str = "val_pck:max,val_loss:min"  # one best export per METRIC:min|max
    checkpoint_every_steps: int = 200  # mid-epoch checkpoints every N optimizer steps (0 = off); N steps
    # must take well over Ray's 2 s report poll interval, or reports stall training
    preemption_check_steps: int = 10  # ask Ray about node preemption every N steps (a collective)

    # --- episodes ---
    num_shots: int = 1
    num_queries_per_episode: int = 2
    val_episodes: int = 20  # per validation category
    val_queries_per_episode: int = 15  # MP-100 protocol
    augment: bool = True

    # --- data ---
    data_root: Optional[str] = None  # MP-100-format files; None = built-in synthetic categories
    mp100_split: int = 1
    image_size: int = 64
    data_seed: int = 0  # the built-in categories and the fixed validation episodes
    synthetic_instances_per_category: int = 60
    synthetic_canvas: int = 96
    # prepared MP-100 splits, one copy per node, shared by its workers; "~" expands on each node; "" = off
    cache_dir: str = "~/.cache/cape-ray"

    # --- model ---
    backbone: str = "small"  # small (CPU default) | large (real data)
    feature_dim: int = 64
    refine_layers: int = 2
    use_skeleton: bool = False
    dropout: float = 0.1

    # --- resources and fault tolerance ---
    num_workers: str = "1"  # "N" or "MIN:MAX" (elastic)
    use_gpu: bool = False
    deterministic: Optional[bool] = None  # deterministic CUDA kernels; None = on with use_gpu (CPU is anyway)
    cpus_per_worker: float = 1.0
    num_threads: int = 1  # torch CPU threads per worker: fixed, because it changes float rounding
    max_failures: int = 3
    max_preemption_failures: int = -1  # -1 = unlimited; preemptions never use max_failures
    keep: int = 2  # top-K checkpoints by (smoothed) val_pck kept, plus the latest; 0 = keep every one
    keep_every: int = 0  # also keep every N-th epoch's checkpoint (0 = off)
    progress: str = "auto"  # bar (interactive) | lines (job logs) | auto: bar when stdout is a terminal
    verbose: bool = False  # also show Ray's own output (per-report lines, worker set-up, ...)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need(cond: bool, flag: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"--{flag}: {msg}")

        need(bool(self.name) and "/" not in self.name, "name", f"must be a non-empty name without '/', got {self.name!r}")
        need(bool(self.storage_path), "storage_path", "must not be empty")
        for flag in ("epochs", "episodes_per_epoch", "batch_size", "accumulation_steps",
                     "num_queries_per_episode", "val_episodes", "val_queries_per_episode",
                     "num_threads", "feature_dim", "pck_smoothing"):
            value = getattr(self, flag)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1, flag,
                 f"must be an integer >= 1, got {value!r}")
        for flag in ("warmup_steps", "early_stopping_patience", "checkpoint_every_steps",
                     "refine_layers", "max_failures", "seed", "data_seed", "preemption_check_steps", "keep",
                     "keep_every"):
            value = getattr(self, flag)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 0, flag,
                 f"must be an integer >= 0, got {value!r}")
        need(isinstance(self.max_preemption_failures, int) and self.max_preemption_failures >= -1,
             "max_preemption_failures", f"must be -1 (unlimited) or >= 0, got {self.max_preemption_failures!r}")
        need(self.num_shots in (1, 5), "num_shots", f"must be 1 or 5 (MP-100 protocol), got {self.num_shots!r}")
        for flag in ("lr", "weight_decay", "grad_clip", "min_lr_ratio", "early_stopping_min_delta",
                     "dropout", "cpus_per_worker"):
            value = getattr(self, flag)
            need(isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, flag,
                 f"must be a finite number >= 0, got {value!r}")
        need(self.lr > 0, "lr", f"must be > 0, got {self.lr!r}")
        need(self.min_lr_ratio <= 1, "min_lr_ratio", "must be <= 1")
        need(self.dropout < 1, "dropout", "must be < 1")
        need(self.mp100_split in (1, 2, 3, 4, 5), "mp100_split", f"must be 1..5, got {self.mp100_split!r}")
        need(self.image_size >= 32 and self.image_size % 16 == 0, "image_size",
             f"must be a multiple of 16, >= 32, got {self.image_size!r}")
        need(self.synthetic_instances_per_category >= self.num_shots + 1, "synthetic_instances_per_category",
             f"must be >= num_shots + 1 = {self.num_shots + 1}")
        need(self.synthetic_canvas >= 32, "synthetic_canvas", f"must be >= 32 pixels, got {self.synthetic_canvas!r}")
        need(self.backbone in ("small", "large"), "backbone", f"must be small or large, got {self.backbone!r}")
        need(self.progress in ("auto", "bar", "lines"), "progress", f"must be auto, bar or lines, got {self.progress!r}")
        need(isinstance(self.cache_dir, str) and (self.cache_dir == "" or self.cache_dir.startswith("~")
                                                  or os.path.isabs(self.cache_dir)), "cache_dir",
             f"must be an absolute path, a path starting with ~ (expanded on each worker's node) or '' (no cache), "
             f"got {self.cache_dir!r}")
        need(self.deterministic is None or isinstance(self.deterministic, bool), "deterministic",
             f"must be true, false or unset, got {self.deterministic!r}")
        self.worker_range()  # raises on a malformed --num_workers
        try:
            parse_best_metrics(self.best_metrics)
        except ValueError as exc:
            raise ConfigError(f"--best_metrics: {exc} (e.g. val_pck:max,val_loss:min,mpck:max)") from None
        if self.data_root is not None:
            need(os.path.isdir(self.data_root), "data_root", f"directory {self.data_root!r} does not exist")

    def worker_range(self) -> tuple[int, int]:
        """(min, max) workers; equal for a fixed-size run."""
        text = str(self.num_workers)
        try:
            parts = [int(p) for p in text.split(":")]
        except ValueError:
            raise ConfigError(f"--num_workers: expected N or MIN:MAX, got {text!r}") from None
        if len(parts) == 1:
            parts = parts * 2
        if len(parts) != 2 or parts[0] < 1 or parts[1] < parts[0]:
            raise ConfigError(f"--num_workers: expected N >= 1 or MIN:MAX with 1 <= MIN <= MAX, got {text!r}")
        return parts[0], parts[1]

    # ------------------------------------------------------------------ derived values
    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch at world size 1; see `steps_per_epoch_at`."""
        return self.steps_per_epoch_at(1)

    def steps_per_epoch_at(self, world_size: int) -> int:
        """Optimizer steps per epoch: each consumes batch_size x accumulation_steps x world_size episodes."""
        episodes_per_step = self.batch_size * self.accumulation_steps * world_size
        if self.episodes_per_epoch < episodes_per_step:
            raise ConfigError(f"--episodes_per_epoch {self.episodes_per_epoch} is smaller than one optimizer "
                              f"step ({episodes_per_step} episodes: batch x accumulation x workers)")
        return self.episodes_per_epoch // episodes_per_step

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


# Fields whose change makes an old checkpoint's tensors unusable (shapes or meaning differ).
MODEL_FIELDS = ("backbone", "feature_dim", "refine_layers", "use_skeleton", "image_size")
