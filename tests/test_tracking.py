"""Best-metric tracking, PCK smoothing and early stopping, including their state across a resume."""

import json

import pytest

from cape_ray.tracking import BestTracker, EarlyStopping, MovingAverage, RunTracking, parse_best_metrics

BOTH = (("val_pck", "max"), ("val_loss", "min"))


def roundtrip(tracking: RunTracking, **settings) -> RunTracking:
    """What a resume does: state_dict -> state.json text -> a fresh object."""
    fresh = RunTracking(**{"best_metrics": tuple((m, t.mode) for m, t in tracking.best.items()),
                           "patience": tracking.early_stopping.patience,
                           "min_delta": tracking.early_stopping.min_delta,
                           "pck_smoothing": tracking.pck_average.window, **settings})
    fresh.load_state_dict(json.loads(json.dumps(tracking.state_dict())))
    return fresh


def epoch(tracking: RunTracking, number: int, val_loss: float, val_pck: float, **more):
    return tracking.update({"val_loss": val_loss, "val_pck": val_pck, **more}, number,
                           checkpoint=f"checkpoint_e{number:03d}", export_name=lambda m: f"best_{m}_e{number:03d}")


def test_best_loss_only_strictly_better():
    tracker = BestTracker("val_loss", "min")
    assert tracker.update(0.5, 1)
    assert not tracker.update(0.5, 2)  # equal is not better
    assert tracker.update(0.4, 3)
    assert (tracker.best, tracker.best_epoch) == (0.4, 3)
    assert not tracker.update(float("nan"), 4)


def test_best_pck_independent_of_best_loss():
    tracking = RunTracking(BOTH)
    assert epoch(tracking, 1, 0.30, 0.60).new_best == ["val_pck", "val_loss"]
    # loss improves while PCK drops: only the loss best changes
    assert epoch(tracking, 2, 0.25, 0.55).new_best == ["val_loss"]
    assert (tracking.best["val_loss"].best, tracking.best["val_loss"].best_epoch) == (0.25, 2)
    assert (tracking.best["val_pck"].best, tracking.best["val_pck"].best_epoch) == (0.60, 1)
    # PCK improves while loss worsens: only the PCK best changes, and it records where it lives
    assert epoch(tracking, 3, 0.40, 0.70).new_best == ["val_pck"]
    assert tracking.best["val_loss"].best == 0.25 and tracking.best["val_pck"].best == 0.70
    assert tracking.best["val_pck"].checkpoint == "checkpoint_e003"
    assert tracking.best["val_pck"].export == "best_val_pck_e003"
    assert tracking.best["val_loss"].export == "best_val_loss_e002"


def test_best_not_overwritten_after_resume():
    tracking = RunTracking(BOTH)
    epoch(tracking, 4, 0.1, 0.5)
    resumed = roundtrip(tracking)
    assert resumed.best["val_loss"].best == 0.1 and resumed.best["val_loss"].best_epoch == 4
    assert resumed.best["val_loss"].export == "best_val_loss_e004"
    assert "val_loss" not in epoch(resumed, 5, 0.15, 0.4).new_best
    assert resumed.best["val_loss"].best == 0.1
    assert "val_loss" in epoch(resumed, 6, 0.05, 0.4).new_best
    assert (resumed.best["val_loss"].best, resumed.best["val_loss"].best_epoch) == (0.05, 6)


def test_early_stopping_watches_pck_not_loss():
    # the loss keeps improving while PCK stalls: stop after the patience
    stalled = RunTracking(BOTH, patience=2)
    assert not epoch(stalled, 1, 0.9, 0.5).stop
    assert not epoch(stalled, 2, 0.8, 0.5).stop
    assert epoch(stalled, 3, 0.7, 0.5).stop
    # PCK keeps improving while the loss gets worse: never stop
    improving = RunTracking(BOTH, patience=2)
    assert not any(epoch(improving, e, 0.5 + 0.1 * e, 0.1 * e).stop for e in range(1, 6))
    assert improving.early_stopping.epochs_without_improvement == 0


def test_early_stopping_counts_and_survives_resume():
    tracking = RunTracking(BOTH, patience=3, min_delta=0.01)
    epoch(tracking, 1, 1.0, 0.50)
    epoch(tracking, 2, 1.0, 0.505)  # below min_delta: no improvement
    assert tracking.early_stopping.epochs_without_improvement == 1
    resumed = roundtrip(tracking)
    assert resumed.early_stopping.epochs_without_improvement == 1
    assert not epoch(resumed, 3, 1.0, 0.50).stop
    assert epoch(resumed, 4, 1.0, 0.51).stop  # 0.51 - 0.50 is not > 0.01
    assert resumed.early_stopping.stopped_epoch == 4
    again = roundtrip(resumed)
    assert again.early_stopping.should_stop and again.early_stopping.stopped_epoch == 4
    # a resume with a larger patience may continue
    assert not roundtrip(resumed, patience=5).early_stopping.should_stop


def test_early_stopping_disabled():
    stopping = EarlyStopping("val_pck", "max", patience=0)
    assert not any(stopping.update(0.1, e) for e in range(1, 20))


def test_smoothed_pck_selects_the_best_and_stops_while_the_raw_value_is_kept():
    tracking = RunTracking(BOTH, patience=2, pck_smoothing=3)
    values = [0.50, 0.90, 0.40, 0.60, 0.61]  # a lucky spike at epoch 2
    updates = [epoch(tracking, e, 1.0 - 0.01 * e, pck) for e, pck in enumerate(values, start=1)]
    assert [round(u.selection_pck, 6) for u in updates] == [0.5, 0.7, 0.6, 0.633333, 0.536667]
    # the best is the smoothed maximum, at epoch 2 (mean of 0.5, 0.9)
    assert tracking.best["val_pck"].best == pytest.approx(0.7) and tracking.best["val_pck"].best_epoch == 2
    assert [u.stop for u in updates[:4]] == [False, False, False, True]  # 2 epochs below 0.7 smoothed
    resumed = roundtrip(tracking)
    assert resumed.pck_average.values == [0.40, 0.60, 0.61]
    assert epoch(resumed, 6, 0.5, 0.7).selection_pck == pytest.approx((0.60 + 0.61 + 0.7) / 3)


def test_moving_average_window_one_is_the_value():
    average = MovingAverage(1)
    assert [average.add(v) for v in (0.3, 0.1, 0.7)] == [0.3, 0.1, 0.7]


def test_any_reported_metric_can_have_a_best():
    tracking = RunTracking(parse_best_metrics("val_pck:max,val_loss:min,mpck:max"))
    assert epoch(tracking, 1, 0.3, 0.5, mpck=0.4).new_best == ["val_pck", "val_loss", "mpck"]
    assert epoch(tracking, 2, 0.4, 0.4, mpck=0.45).new_best == ["mpck"]
    assert tracking.report_fields(epoch(tracking, 3, 0.2, 0.6, mpck=0.1))["is_best_mpck"] == 0
    with pytest.raises(KeyError, match="not among the reported metrics"):
        epoch(RunTracking(parse_best_metrics("train_loss:min")), 1, 0.3, 0.5)
    for bad in ("val_pck", "val_pck:up", "val_pck:max,val_pck:min", ":max"):
        with pytest.raises(ValueError):
            parse_best_metrics(bad)
