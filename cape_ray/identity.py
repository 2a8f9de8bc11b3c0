"""What makes a run the same run.

A checkpoint continues the math it was written with: the model (its builder and arguments), the data,
the seeds, the episodes and batch layout, the optimizer and schedule, the precision and the thread
count (which changes float rounding). A rerun of a run name, a restart and `--resume` compare the
flags they are given with the checkpoint's; a flag that would change that math is refused before
Ray starts, with each differing field and both values, unless --force, which accepts it and records
it in the run's history (`config_changes` in state.json). Flags that do not change the math
(patience, retention, logging, workers) are accepted and said. `--epochs` is the run's length:
a larger one extends the run; how its LR schedule continues is --lr_schedule's choice.

`--num_workers` changes the world size, not the math: the episodes per optimizer step stay as
the run started them (checkpointer.plan_layout).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

# Fields whose change changes what the run computes from here on.
MATH_FIELDS = (
    "data", "data_root", "mp100_split", "image_size", "synthetic_instances_per_category", "synthetic_canvas",
    "data_seed", "seed", "augment", "num_shots", "num_queries_per_episode", "episodes_per_epoch", "batch_size",
    "accumulation_steps", "lr", "weight_decay", "warmup_steps", "min_lr_ratio", "grad_clip", "backbone_lr_mult",
    "precision", "num_threads", "val_episodes", "val_queries_per_episode",
)
# Accepted as they are and said; they do not change the training math (pretrained weights are read
# only when a run starts from scratch: a continued run takes its weights from the checkpoint).
INFORMATIONAL_FIELDS = (
    "early_stopping_patience", "early_stopping_min_delta", "pck_smoothing", "best_metrics", "keep", "keep_every",
    "checkpoint_every_steps", "preemption_check_steps", "num_workers", "use_gpu", "deterministic",
    "cpus_per_worker", "max_failures", "max_preemption_failures", "cache_dir", "progress", "verbose", "tracker",
    "tracking_uri", "storage_retries", "sync_checkpoints", "grad_checkpointing", "pretrained", "lr_schedule",
)
# Never compared: where the run lives, how it was started, and the run's length (see `extension`).
IGNORED_FIELDS = ("name", "storage_path", "resume", "force", "address", "epochs")


@dataclass(frozen=True)
class Difference:
    field: str
    old: Any
    new: Any

    def line(self) -> str:
        return f"{self.field}: {self.old!r} -> {self.new!r}"


@dataclass
class Comparison:
    """How a config differs from the one a checkpoint was written with."""

    math: list[Difference] = field(default_factory=list)  # refused without --force
    other: list[Difference] = field(default_factory=list)  # accepted, said

    @property
    def changes_math(self) -> bool:
        return bool(self.math)

    def refusal(self, what: str, checkpoint: str) -> str:
        lines = "\n".join(f"  {d.line()}" for d in self.math)
        return (f"{what} would change the run's math; the checkpoint {checkpoint} was trained with other values:\n"
                f"{lines}\nRerun with the checkpoint's values, start a new run with another --name, or pass --force "
                f"to continue with the new values (recorded in the run's history).")

    def record(self, position: dict[str, Any], forced: bool) -> dict[str, Any]:
        """The entry --force adds to state.json's config_changes."""
        return {"at": {k: position.get(k) for k in ("epoch", "step", "global_step")}, "forced": forced,
                "fields": {d.field: [d.old, d.new] for d in self.math + self.other}}


def model_record_spec(model_record: Optional[dict]) -> Optional[dict]:
    if not model_record:
        return None
    return {"builder": model_record.get("builder"), "kwargs": model_record.get("kwargs") or {}}


def compare(saved_config: dict[str, Any], saved_model: Optional[dict], config) -> Comparison:
    """Differences between a checkpoint's config (and model record) and `config`."""
    from cape_ray.model import model_spec

    result = Comparison()
    now = config.to_dict()
    if saved_model is not None:
        old_spec = model_record_spec(saved_model)
        new_spec = model_spec(config).to_dict()
        if old_spec["builder"] != new_spec["builder"]:
            result.math.append(Difference("model", old_spec["builder"], new_spec["builder"]))
        else:
            old_kwargs, new_kwargs = old_spec["kwargs"], new_spec["kwargs"]
            for key in sorted(set(old_kwargs) | set(new_kwargs)):
                if old_kwargs.get(key) != new_kwargs.get(key):
                    result.math.append(Difference(f"model.{key}", old_kwargs.get(key), new_kwargs.get(key)))
    for name in MATH_FIELDS:
        if name in saved_config and saved_config[name] != now[name]:
            result.math.append(Difference(name, saved_config[name], now[name]))
    for name in INFORMATIONAL_FIELDS:
        if name in saved_config and saved_config[name] != now[name]:
            result.other.append(Difference(name, saved_config[name], now[name]))
    return result
