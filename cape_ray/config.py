"""TrainConfig: every flag of a cape-ray run in one frozen, validated dataclass.

The config travels as a plain JSON dict (to Ray workers, into every checkpoint's state.json) and is
rebuilt with `TrainConfig.from_dict`, so a checkpoint always says exactly how it was made.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from cape_ray.tracking import parse_best_metrics


class ConfigError(ValueError):
    """An invalid flag value; the message is one line a user can act on."""


BUILTIN_MODELS = ("cnn", "vit")
# What an unset (None) model flag means for each built-in model. A model of your own gets only what
# its builder declares (model/api.py); image_size defaults to the CNN's there.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "cnn": dict(backbone="small", feature_dim=64, refine_layers=2, use_skeleton=False, image_size=64),
    "vit": dict(backbone="vit_small_patch14_dinov2", feature_dim=256, refine_layers=3, use_skeleton=True,
                image_size=224),
}
DATA_SOURCES = ("builtin", "builtin-hard", "mp100")
PRECISIONS = ("fp32", "bf16", "fp16")
TRACKERS = ("mlflow", "wandb", "tensorboard", "none")
LR_SCHEDULES = ("keep", "extend")


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
    data: str = "builtin"  # builtin | builtin-hard | mp100 (implied by --data_root)
    data_root: Optional[str] = None  # MP-100-format files; None = built-in synthetic categories
    mp100_split: int = 1
    image_size: Optional[int] = None  # the crop every image is resized to (None: the model's default)
    data_seed: int = 0  # the built-in categories and the fixed validation episodes
    synthetic_instances_per_category: int = 60
    synthetic_canvas: int = 96
    # prepared MP-100 splits, one copy per node, shared by its workers; "~" expands on each node; "" = off
    cache_dir: str = "~/.cache/cape-ray"

    # --- model (cape_ray/model/api.py: what a model is; MODEL_DEFAULTS: what None means per model) ---
    model: str = "cnn"  # cnn | vit | package.module:builder (your own, see docs/models.md)
    backbone: Optional[str] = None  # cnn: small | large; vit: any timm ViT name
    feature_dim: Optional[int] = None  # width of the matching features / the keypoint decoder
    refine_layers: Optional[int] = None  # refinement (decoder) layers after the proposals
    use_skeleton: Optional[bool] = None  # the category skeleton as a graph prior in the decoder
    dropout: float = 0.1
    model_kwargs: dict = field(default_factory=dict)  # more keyword arguments for the model's builder
    pretrained: Optional[str] = None  # backbone weights: a .safetensors / torch file, or hf-hub:NAME / timm:NAME
    freeze_backbone: bool = False
    train_backbone_blocks: Optional[int] = None  # train only the last N backbone blocks (None: all)
    backbone_lr_mult: float = 1.0  # the backbone's learning rate = lr x this
    grad_checkpointing: bool = False  # recompute backbone activations in the backward pass (less memory)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 with a gradient scaler)

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
    storage_retries: int = 5  # attempts after a failed checkpoint store, with doubling waits from 2 s
    sync_checkpoints: bool = False  # store checkpoints on the training thread (no background writer)
    address: Optional[str] = None  # Ray cluster: local | auto | HOST:PORT (None: RAY_ADDRESS, else local)
    progress: str = "auto"  # bar (interactive) | lines (job logs) | auto: bar when stdout is a terminal
    verbose: bool = False  # also show Ray's own output (per-report lines, worker set-up, ...)

    # --- experiment tracking and reruns ---
    tracker: str = "tensorboard"  # comma-separated: mlflow, wandb, tensorboard, or none
    tracking_uri: Optional[str] = None  # MLflow tracking server (default: a file store in the run directory)
    lr_schedule: str = "keep"  # a rerun with more --epochs: keep the planned schedule, or extend it
    force: bool = False  # accept a rerun or --resume that changes the run's math (recorded in its history)

    def __post_init__(self) -> None:
        self._resolve_defaults()
        self.validate()

    def _resolve_defaults(self) -> None:
        """Fill the model flags left unset with the model's defaults, and the data source from
        --data_root, so that the saved config says exactly what ran (a frozen dataclass: set once)."""
        defaults = MODEL_DEFAULTS.get(self.model, {"image_size": MODEL_DEFAULTS["cnn"]["image_size"]})
        for key, value in defaults.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if self.data == "builtin" and self.data_root is not None:
            object.__setattr__(self, "data", "mp100")
        if isinstance(self.tracker, (list, tuple)):
            object.__setattr__(self, "tracker", ",".join(str(t) for t in self.tracker))

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need(cond: bool, flag: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"--{flag}: {msg}")

        need(isinstance(self.name, str) and bool(self.name.strip()) and self.name == self.name.strip()
             and self.name not in (".", "..") and not any(c in self.name for c in "/\\")
             and all(c.isprintable() for c in self.name), "name",
             f"must be a directory name: not empty, not '.' or '..', without '/', '\\', surrounding spaces or "
             f"control characters, got {self.name!r}")
        need(bool(self.storage_path), "storage_path", "must not be empty")
        for flag in ("epochs", "episodes_per_epoch", "batch_size", "accumulation_steps",
                     "num_queries_per_episode", "val_episodes", "val_queries_per_episode",
                     "num_threads", "pck_smoothing"):
            value = getattr(self, flag)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1, flag,
                 f"must be an integer >= 1, got {value!r}")
        for flag in ("warmup_steps", "early_stopping_patience", "checkpoint_every_steps",
                     "max_failures", "seed", "data_seed", "preemption_check_steps", "keep",
                     "keep_every", "storage_retries"):
            value = getattr(self, flag)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 0, flag,
                 f"must be an integer >= 0, got {value!r}")
        need(isinstance(self.max_preemption_failures, int) and self.max_preemption_failures >= -1,
             "max_preemption_failures", f"must be -1 (unlimited) or >= 0, got {self.max_preemption_failures!r}")
        need(self.num_shots in (1, 5), "num_shots", f"must be 1 or 5 (MP-100 protocol), got {self.num_shots!r}")
        for flag in ("feature_dim",):
            value = getattr(self, flag)
            need(value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1), flag,
                 f"must be an integer >= 1, got {value!r}")
        need(self.refine_layers is None or (isinstance(self.refine_layers, int) and self.refine_layers >= 0),
             "refine_layers", f"must be an integer >= 0, got {self.refine_layers!r}")
        for flag in ("lr", "weight_decay", "grad_clip", "min_lr_ratio", "early_stopping_min_delta",
                     "dropout", "cpus_per_worker", "backbone_lr_mult"):
            value = getattr(self, flag)
            need(isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, flag,
                 f"must be a finite number >= 0, got {value!r}")
        need(self.lr > 0, "lr", f"must be > 0, got {self.lr!r}")
        need(self.min_lr_ratio <= 1, "min_lr_ratio", "must be <= 1")
        need(self.dropout < 1, "dropout", "must be < 1")
        need(self.mp100_split in (1, 2, 3, 4, 5), "mp100_split", f"must be 1..5, got {self.mp100_split!r}")
        need(isinstance(self.image_size, int) and self.image_size >= 16, "image_size",
             f"must be an integer >= 16, got {self.image_size!r}")
        if self.model == "cnn":
            need(self.image_size >= 32 and self.image_size % 16 == 0, "image_size",
                 f"must be a multiple of 16, >= 32 for the cnn model, got {self.image_size!r}")
            need(self.backbone in ("small", "large"), "backbone",
                 f"must be small or large for the cnn model, got {self.backbone!r}")
        need(self.model in BUILTIN_MODELS or ":" in self.model, "model",
             f"must be cnn, vit or package.module:builder (a model of your own), got {self.model!r}")
        need(isinstance(self.model_kwargs, dict), "model_kwargs",
             f"must be a mapping of keyword arguments (JSON on the command line), got {self.model_kwargs!r}")
        need(self.train_backbone_blocks is None or (isinstance(self.train_backbone_blocks, int)
                                                    and self.train_backbone_blocks >= 0),
             "train_backbone_blocks", f"must be an integer >= 0, got {self.train_backbone_blocks!r}")
        need(self.model == "vit" or self.train_backbone_blocks is None, "train_backbone_blocks",
             f"applies to --model vit (its transformer blocks), not --model {self.model}")
        need(not (self.freeze_backbone and self.train_backbone_blocks), "train_backbone_blocks",
             "trains the last N backbone blocks; --freeze_backbone trains none: give one of them")
        need(self.precision in PRECISIONS, "precision", f"must be fp32, bf16 or fp16, got {self.precision!r}")
        need(self.data in DATA_SOURCES, "data", f"must be builtin, builtin-hard or mp100, got {self.data!r}")
        need(self.data != "mp100" or self.data_root is not None, "data",
             "mp100 reads MP-100-format files: give --data_root DIR")
        need(self.data == "mp100" or self.data_root is None, "data",
             f"--data_root reads MP-100-format files; --data {self.data} is built-in data: give one of them")
        trackers = self.trackers
        need(bool(trackers) and all(t in TRACKERS for t in trackers), "tracker",
             f"must be mlflow, wandb, tensorboard or none (repeatable), got {self.tracker!r}")
        need("none" not in trackers or len(trackers) == 1, "tracker", "none cannot be combined with a tracker")
        need(self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"must be keep or extend, got {self.lr_schedule!r}")
        need(self.address is None or bool(str(self.address).strip()), "address",
             "must be local, auto or HOST:PORT")
        need(self.synthetic_instances_per_category >= self.num_shots + 1, "synthetic_instances_per_category",
             f"must be >= num_shots + 1 = {self.num_shots + 1}")
        need(self.synthetic_canvas >= 32, "synthetic_canvas", f"must be >= 32 pixels, got {self.synthetic_canvas!r}")
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
    def trackers(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in str(self.tracker).split(",") if t.strip())

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

    def to_yaml(self) -> str:
        """The resolved config as YAML (`--config` reads it back: the same run)."""
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)




# ----------------------------------------------------------------------------- config files
def field_types() -> dict[str, type]:
    """Each field's type, Optional[...] unwrapped (str, int, float, bool or dict)."""
    import typing

    hints = typing.get_type_hints(TrainConfig)
    result = {}
    for f in fields(TrainConfig):
        args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)]
        result[f.name] = args[0] if args else hints[f.name]
    return result


TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping"}


def checked_value(key: str, value: Any, kind: type, source: str) -> Any:
    """`value` as a `kind` field takes it, or ConfigError naming the key and the expected type."""
    optional = TrainConfig.__dataclass_fields__[key].default is None
    if value is None and optional:
        return None
    if key == "tracker" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(value)  # a list of trackers
    if key == "num_workers" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # num_workers: 2 in YAML
    if kind is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    ok = (isinstance(value, bool) if kind is bool
          else isinstance(value, int) and not isinstance(value, bool) if kind is int
          else isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float
          else isinstance(value, kind))
    if not ok:
        raise ConfigError(f"{source}: {key}: expected {TYPE_NAMES.get(kind, kind.__name__)}"
                          f"{' or null' if optional else ''}, got {value!r} ({type(value).__name__})")
    return float(value) if kind is float else value


def read_config_file(path: str) -> dict[str, Any]:
    """The training settings of a YAML file (`--config`): every key a TrainConfig field, every value
    of its type. An unknown key names the closest valid one; a wrong type names the expected one."""
    import difflib

    import yaml

    try:
        with open(os.path.expanduser(path)) as handle:
            data = yaml.safe_load(handle)
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot be read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"--config {path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of settings (key: value lines), got {type(data).__name__}")
    types = field_types()
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name == "output_dir":
            name = "storage_path"
        if name not in types:
            close = difflib.get_close_matches(name, list(types), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys are those of `cape-ray train --help`"
            raise ConfigError(f"--config {path}: unknown key {key!r}{hint}")
        values[name] = checked_value(name, value, types[name], f"--config {path}")
    return values
