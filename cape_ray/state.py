"""TrainState: everything about a run that is the same on every rank and goes into state.json.

Per-rank state (RNG, the running train loss of the epoch) is not here: each rank has its own file in
the checkpoint (see checkpointer.py). Model, optimizer and scheduler have their own state_dicts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from cape_ray import __version__
from cape_ray.config import TrainConfig
from cape_ray.tracking import RunTracking


@dataclass
class Position:
    """Where training stands. `epoch` is the next epoch to run (0-based), i.e. the number of epochs
    completed; `step` / `episode` count the optimizer steps / episodes (all ranks) already done in
    it. Episodes are counted too, so that another world size continues the same episode sequence."""

    epoch: int = 0
    step: int = 0
    episode: int = 0
    global_step: int = 0
    episodes_per_step: int = 0  # batch_size x accumulation x world size

    @property
    def mid_epoch(self) -> bool:
        return self.step > 0


def library_versions() -> dict[str, str]:
    import numpy
    import ray
    import torch

    return {"cape_ray": __version__, "torch": torch.__version__, "ray": ray.__version__, "numpy": numpy.__version__}


@dataclass
class TrainState:
    config: TrainConfig  # this run's flags as given (the layout in force is position.episodes_per_step)
    world_size: int
    position: Position
    tracking: RunTracking
    history: list[dict] = field(default_factory=list)  # one metrics dict per validated epoch
    saved_versions: Optional[dict] = None  # the library versions of the checkpoint it was restored from
    model: Optional[dict] = None  # model/api.py describe(): builder, kwargs, parameter counts, fingerprint
    device: str = "cpu"  # "cpu" or "cuda": what trained this state
    deterministic: bool = False  # whether deterministic algorithms were enforced (determinism.py)
    grad_scaler: Optional[dict] = None  # fp16's gradient scaler (engine.MixedPrecision), set at each save
    config_changes: list[dict] = field(default_factory=list)  # flags changed on a rerun / --resume (identity.py)

    @classmethod
    def fresh(cls, config: TrainConfig, world_size: int, device: str = "cpu", deterministic: bool = False,
              episodes_per_step: Optional[int] = None) -> "TrainState":
        episodes_per_step = episodes_per_step or config.batch_size * config.accumulation_steps * world_size
        return cls(config, world_size, Position(episodes_per_step=episodes_per_step), RunTracking.from_config(config),
                   device=device, deterministic=deterministic)

    def state_dict(self, metrics: Optional[dict] = None) -> dict[str, Any]:
        """The JSON of state.json (schema_version is added by the checkpoint writer).

        `epoch`, `best_val_loss`, `best_pck` and `epochs_without_improvement` at the top level are the
        original pipeline's fields, for tools that read them; cape-ray itself reads `position` and
        `tracking`, which hold the same values and more.
        """
        tracking = self.tracking
        return {
            "epoch": self.position.epoch,  # epochs completed: a resume continues at epoch + 1
            "best_val_loss": tracking.best_value("val_loss"),
            "best_pck": tracking.best_value("val_pck"),
            "epochs_without_improvement": tracking.early_stopping.epochs_without_improvement,
            "position": dataclasses.asdict(self.position),
            "tracking": tracking.state_dict(),
            "history": list(self.history),
            "world_size": self.world_size,
            "num_threads": self.config.num_threads,
            "device": self.device,
            "deterministic": self.deterministic,
            "precision": self.config.precision,
            "grad_scaler": self.grad_scaler,
            "config_changes": list(self.config_changes),
            "config": self.config.to_dict(),
            "model": self.model,
            "versions": library_versions(),
            "metrics": dict(metrics or {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state. The flags of this run (config), its world size and its
        episodes per step (the layout planned for this world size) stay; position, tracking, history
        and the record of config changes come from `state`."""
        self.position = Position(**{**state["position"], "episodes_per_step": self.position.episodes_per_step})
        self.tracking.load_state_dict(state["tracking"])
        self.history = list(state["history"])
        self.config_changes = list(state.get("config_changes", []))
        self.grad_scaler = state.get("grad_scaler")
        self.saved_versions = state.get("versions")
