"""Best-metric tracking and early stopping, each a small object with its own state_dict.

They live inside every checkpoint, so a resume, a restart after a failure and a rerun after a driver
crash all continue them exactly: a restored best of 0.10 is not replaced by a later 0.15.
"""

from __future__ import annotations

import math
from typing import Any, Optional


class BestTracker:
    """Remembers the best value of one metric; improves only when strictly better."""

    def __init__(self, metric: str, mode: str) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.metric = metric
        self.mode = mode
        self.best: Optional[float] = None
        self.best_epoch: Optional[int] = None  # 1-based epoch of the best value

    def is_better(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        return value < self.best if self.mode == "min" else value > self.best

    def update(self, value: float, epoch: int) -> bool:
        """Record `value`; True if it is a new best."""
        if not self.is_better(value):
            return False
        self.best, self.best_epoch = float(value), int(epoch)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["metric"] != self.metric or state["mode"] != self.mode:
            raise ValueError(f"tracker state is for {state['metric']}/{state['mode']}, "
                             f"not {self.metric}/{self.mode}")
        self.best = None if state["best"] is None else float(state["best"])
        self.best_epoch = None if state["best_epoch"] is None else int(state["best_epoch"])


class EarlyStopping:
    """Stops after `patience` validated epochs without an improvement of more than `min_delta`.

    patience == 0 disables it. The reference value is the best seen so far, so a slow drift of small
    improvements below `min_delta` still counts as no improvement.
    """

    def __init__(self, metric: str, mode: str, patience: int, min_delta: float = 0.0) -> None:
        self.metric, self.mode = metric, mode
        self.patience, self.min_delta = int(patience), float(min_delta)
        self.reference: Optional[float] = None
        self.epochs_without_improvement = 0
        self.stopped_epoch: Optional[int] = None

    @property
    def enabled(self) -> bool:
        return self.patience > 0

    @property
    def should_stop(self) -> bool:
        # Derived from the counter and the CURRENT patience, so a resume with a larger
        # --early_stopping_patience may continue a run that had stopped.
        return self.enabled and self.epochs_without_improvement >= self.patience

    def update(self, value: float, epoch: int) -> bool:
        """Record one validated epoch; True when training should stop now."""
        improved = math.isfinite(value) and (
            self.reference is None
            or (value > self.reference + self.min_delta if self.mode == "max"
                else value < self.reference - self.min_delta))
        if improved:
            self.reference = float(value)
            self.epochs_without_improvement = 0
        else:
            self.epochs_without_improvement += 1
        if self.should_stop and self.stopped_epoch is None:
            self.stopped_epoch = int(epoch)
        return self.should_stop

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "reference": self.reference,
                "epochs_without_improvement": self.epochs_without_improvement,
                "stopped_epoch": self.stopped_epoch, "stopped": self.should_stop}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference = None if state["reference"] is None else float(state["reference"])
        self.epochs_without_improvement = int(state["epochs_without_improvement"])
        self.stopped_epoch = state["stopped_epoch"]
        if not self.should_stop:
            self.stopped_epoch = None


class RunTracking:
    """All tracking state of a run: best loss, best PCK and early stopping on PCK."""

    def __init__(self, patience: int, min_delta: float) -> None:
        self.best_loss = BestTracker("val_loss", "min")
        self.best_pck = BestTracker("val_pck", "max")
        self.early_stopping = EarlyStopping("val_pck", "max", patience, min_delta)

    def update(self, val_loss: float, val_pck: float, epoch: int) -> dict[str, bool]:
        return {
            "is_best_loss": self.best_loss.update(val_loss, epoch),
            "is_best_pck": self.best_pck.update(val_pck, epoch),
            "stop": self.early_stopping.update(val_pck, epoch),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"best_loss": self.best_loss.state_dict(), "best_pck": self.best_pck.state_dict(),
                "early_stopping": self.early_stopping.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_loss.load_state_dict(state["best_loss"])
        self.best_pck.load_state_dict(state["best_pck"])
        self.early_stopping.load_state_dict(state["early_stopping"])
