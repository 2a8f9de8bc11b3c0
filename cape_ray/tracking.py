"""Best-metric tracking, PCK smoothing and early stopping: small objects, each with its own state_dict.

They live inside every checkpoint (state.json), so a resume, a restart after a failure and a rerun
after a driver crash all continue them exactly: a restored best of 0.10 is not replaced by a later
0.15, and the counter of epochs without improvement goes on where it stopped.

Selection uses PCK smoothed over the last `--pck_smoothing` validations (1 = the raw value): the
val_pck best, early stopping and checkpoint retention all see the same smoothed number, while the
raw val_pck is still what is reported and written into names.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

SELECTION_PCK = "val_pck"  # the metric smoothing applies to, and early stopping watches


class BestTracker:
    """Remembers the best value of one metric and where it is: the checkpoint that holds it and the
    name of its best export. Improves only when strictly better."""

    def __init__(self, metric: str, mode: str) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.metric, self.mode = metric, mode
        self.best: Optional[float] = None
        self.best_epoch: Optional[int] = None  # 1-based epoch of the best value
        self.checkpoint: Optional[str] = None  # checkpoint directory name holding the best weights
        self.export: Optional[str] = None  # the best export's directory name

    def reset(self) -> None:
        """Forget the best (e.g. its weights are nowhere to be found): the next value is a new best."""
        self.best = self.best_epoch = self.checkpoint = self.export = None

    def is_better(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        return value < self.best if self.mode == "min" else value > self.best

    def update(self, value: float, epoch: int, checkpoint: Optional[str] = None,
               export: Optional[str] = None) -> bool:
        """Record `value`; True if it is a new best."""
        if not self.is_better(value):
            return False
        self.best, self.best_epoch = float(value), int(epoch)
        self.checkpoint, self.export = checkpoint, export
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "best": self.best, "best_epoch": self.best_epoch,
                "checkpoint": self.checkpoint, "export": self.export}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["metric"] != self.metric or state["mode"] != self.mode:
            raise ValueError(f"tracker state is for {state['metric']}/{state['mode']}, "
                             f"not {self.metric}/{self.mode}")
        self.best = None if state["best"] is None else float(state["best"])
        self.best_epoch = None if state["best_epoch"] is None else int(state["best_epoch"])
        self.checkpoint, self.export = state.get("checkpoint"), state.get("export")


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
        if state["metric"] != self.metric or state["mode"] != self.mode:
            raise ValueError(f"early-stopping state is for {state['metric']}/{state['mode']}, "
                             f"not {self.metric}/{self.mode}")
        self.reference = None if state["reference"] is None else float(state["reference"])
        self.epochs_without_improvement = int(state["epochs_without_improvement"])
        self.stopped_epoch = state["stopped_epoch"]
        if not self.should_stop:
            self.stopped_epoch = None


class MovingAverage:
    """Mean of the last `window` values (window 1: the value itself)."""

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = int(window)
        self.values: list[float] = []

    def add(self, value: float) -> float:
        self.values = (self.values + [float(value)])[-self.window:]
        return self.mean

    @property
    def mean(self) -> float:
        # fsum: the same values give the same mean whatever the order of earlier additions
        return math.fsum(self.values) / len(self.values) if self.values else float("nan")

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window, "values": list(self.values)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # a resume with another --pck_smoothing keeps the values it has, up to the new window
        self.values = [float(v) for v in state["values"]][-self.window:]


def parse_best_metrics(text: str) -> tuple[tuple[str, str], ...]:
    """'val_pck:max,val_loss:min' -> (('val_pck', 'max'), ('val_loss', 'min')); ValueError on bad input."""
    pairs = []
    for item in (part.strip() for part in str(text).split(",")):
        metric, _, mode = item.rpartition(":")
        if not metric or mode not in ("min", "max"):
            raise ValueError(f"expected METRIC:min or METRIC:max, got {item!r}")
        if any(metric == m for m, _ in pairs):
            raise ValueError(f"{metric} is named twice")
        pairs.append((metric, mode))
    return tuple(pairs)


def export_kind(metric: str) -> str:
    """The word a best export's name uses for `metric`: pck and loss for the two classic ones."""
    return {"val_pck": "pck", "val_loss": "loss"}.get(metric) or re.sub(r"[^A-Za-z0-9.]+", "", metric)


def best_flag(metric: str) -> str:
    """The report key that marks a new best by `metric`: is_best_pck, is_best_loss, is_best_mpck, ..."""
    return f"is_best_{export_kind(metric)}"


@dataclass
class TrackingUpdate:
    """What one validated epoch changed."""

    new_best: list[str] = field(default_factory=list)  # metrics with a new best, in --best_metrics order
    stop: bool = False
    selection_pck: float = float("nan")  # the (smoothed) PCK that selection used


class RunTracking:
    """All tracking state of a run: one BestTracker per --best_metrics entry, PCK smoothing, and early
    stopping on the (smoothed) PCK."""

    def __init__(self, best_metrics: tuple[tuple[str, str], ...] = (("val_pck", "max"), ("val_loss", "min")),
                 patience: int = 0, min_delta: float = 0.0, pck_smoothing: int = 1) -> None:
        self.best = {metric: BestTracker(metric, mode) for metric, mode in best_metrics}
        self.pck_average = MovingAverage(pck_smoothing)
        self.early_stopping = EarlyStopping(SELECTION_PCK, "max", patience, min_delta)

    @classmethod
    def from_config(cls, config) -> "RunTracking":
        return cls(parse_best_metrics(config.best_metrics), config.early_stopping_patience,
                   config.early_stopping_min_delta, config.pck_smoothing)

    def update(self, metrics: dict[str, float], epoch: int, checkpoint: Optional[str] = None,
               export_name=None) -> TrackingUpdate:
        """Record one validated epoch's metrics. `export_name(metric)` names a new best's export."""
        selection_pck = self.pck_average.add(metrics[SELECTION_PCK])
        result = TrackingUpdate(selection_pck=selection_pck)
        for metric, tracker in self.best.items():
            if metric not in metrics:
                raise KeyError(f"--best_metrics names {metric!r}, which is not among the reported metrics "
                               f"{sorted(metrics)}")
            value = selection_pck if metric == SELECTION_PCK else float(metrics[metric])
            if tracker.update(value, epoch, checkpoint, export_name(metric) if export_name else None):
                result.new_best.append(metric)
        result.stop = self.early_stopping.update(selection_pck, epoch)
        return result

    def report_fields(self, update: TrackingUpdate) -> dict[str, Any]:
        """What a validated report carries about tracking: new-best flags (the export callback reads
        them), the bests, the selection PCK, the early-stopping counter."""
        fields: dict[str, Any] = {best_flag(metric): int(metric in update.new_best) for metric in self.best}
        fields.update({f"best_{metric}": tracker.best for metric, tracker in self.best.items()})
        fields.update({"val_pck_selected": update.selection_pck,
                       "epochs_without_improvement": self.early_stopping.epochs_without_improvement,
                       "early_stopped": int(update.stop)})
        return fields

    def best_value(self, metric: str) -> Optional[float]:
        tracker = self.best.get(metric)
        return None if tracker is None else tracker.best

    def state_dict(self) -> dict[str, Any]:
        return {"best": {metric: tracker.state_dict() for metric, tracker in self.best.items()},
                "pck_smoothing": self.pck_average.state_dict(),
                "early_stopping": self.early_stopping.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A metric added to --best_metrics on resume starts fresh; one dropped is no longer tracked.
        for metric, tracker in self.best.items():
            if metric in state["best"]:
                tracker.load_state_dict(state["best"][metric])
        self.pck_average.load_state_dict(state["pck_smoothing"])
        self.early_stopping.load_state_dict(state["early_stopping"])
