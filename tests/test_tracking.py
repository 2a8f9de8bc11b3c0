"""Best-loss / best-PCK tracking and early stopping, including their state across a resume."""

import json

from cape_ray.tracking import BestTracker, EarlyStopping, RunTracking


def roundtrip(tracking: RunTracking, patience=0, min_delta=0.0) -> RunTracking:
    """What a resume does: state_dict -> state.json text -> a fresh object."""
    fresh = RunTracking(patience, min_delta)
    fresh.load_state_dict(json.loads(json.dumps(tracking.state_dict())))
    return fresh


def test_best_loss_only_strictly_better():
    tracker = BestTracker("val_loss", "min")
    assert tracker.update(0.5, 1)
    assert not tracker.update(0.5, 2)  # equal is not better
    assert tracker.update(0.4, 3)
    assert (tracker.best, tracker.best_epoch) == (0.4, 3)
    assert not tracker.update(float("nan"), 4)


def test_best_pck_independent_of_best_loss():
    tracking = RunTracking(patience=0, min_delta=0.0)
    assert tracking.update(val_loss=0.30, val_pck=0.60, epoch=1) == {"is_best_loss": True, "is_best_pck": True, "stop": False}
    # loss improves while PCK drops: only the loss best changes
    flags = tracking.update(val_loss=0.25, val_pck=0.55, epoch=2)
    assert flags["is_best_loss"] and not flags["is_best_pck"]
    assert (tracking.best_loss.best, tracking.best_loss.best_epoch) == (0.25, 2)
    assert (tracking.best_pck.best, tracking.best_pck.best_epoch) == (0.60, 1)
    # PCK improves while loss worsens: only the PCK best changes
    flags = tracking.update(val_loss=0.40, val_pck=0.70, epoch=3)
    assert not flags["is_best_loss"] and flags["is_best_pck"]
    assert tracking.best_loss.best == 0.25 and tracking.best_pck.best == 0.70


def test_best_not_overwritten_after_resume():
    tracking = RunTracking(patience=0, min_delta=0.0)
    tracking.update(val_loss=0.1, val_pck=0.5, epoch=4)
    resumed = roundtrip(tracking)
    assert resumed.best_loss.best == 0.1 and resumed.best_loss.best_epoch == 4
    assert not resumed.update(val_loss=0.15, val_pck=0.4, epoch=5)["is_best_loss"]
    assert resumed.best_loss.best == 0.1
    assert resumed.update(val_loss=0.05, val_pck=0.4, epoch=6)["is_best_loss"]
    assert (resumed.best_loss.best, resumed.best_loss.best_epoch) == (0.05, 6)


def test_early_stopping_counts_and_survives_resume():
    tracking = RunTracking(patience=3, min_delta=0.01)
    tracking.update(1.0, 0.50, 1)
    tracking.update(1.0, 0.505, 2)  # below min_delta: no improvement
    assert tracking.early_stopping.epochs_without_improvement == 1
    resumed = roundtrip(tracking, patience=3, min_delta=0.01)
    assert resumed.early_stopping.epochs_without_improvement == 1
    assert not resumed.update(1.0, 0.50, 3)["stop"]
    assert resumed.update(1.0, 0.51, 4)["stop"]  # 0.51 - 0.50 is not > 0.01
    assert resumed.early_stopping.stopped_epoch == 4
    again = roundtrip(resumed, patience=3, min_delta=0.01)
    assert again.early_stopping.should_stop and again.early_stopping.stopped_epoch == 4
    # a resume with a larger patience may continue
    assert not roundtrip(resumed, patience=5, min_delta=0.01).early_stopping.should_stop


def test_early_stopping_disabled():
    stopping = EarlyStopping("val_pck", "max", patience=0)
    assert not any(stopping.update(0.1, e) for e in range(1, 20))
