"""Pictures: curves from a metrics.jsonl (latest report of an epoch wins, restarts placed where they
resumed), the prediction grid of a checkpoint, and their pixel sizes. No Ray (the real run's
pictures are checked in test_history.py)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from cape_ray import cli, plots
from cape_ray.config import TrainConfig
from test_evaluate import TINY, write_fresh_checkpoint

NAME = "checkpoint_e{:03d}_lr1e-3_bs2_acc1_qpe2"


def record(epoch, step, attempt, validated, **values):
    return {"event": "report", "attempt": attempt, "epoch": epoch, "step": step, "global_step": (epoch - 1) * 4 + step,
            "validated": validated, "checkpoint": NAME.format(epoch) + ("" if validated else f"_s{step:06d}"),
            "train_loss": 1.0 / epoch, **values}


def run_records() -> list[dict]:
    """3 epochs; a worker died in epoch 3 after its mid-epoch checkpoint; epoch 3 was redone."""
    return [
        record(1, 4, 1, 1, val_loss=0.9, val_pck=0.30, mpck=0.2),
        record(2, 2, 1, 0, val_pck=-1.0),
        record(2, 4, 1, 1, val_loss=0.7, val_pck=0.50, mpck=0.4),
        record(3, 2, 1, 0, val_pck=-1.0),
        {"event": "failure", "attempt": 1, "ranks": [1], "error": "ActorDiedError"},
        {"event": "restart", "attempt": 2, "reason": "worker_failure", "resumed_from": NAME.format(3) + "_s000002"},
        record(3, 4, 2, 1, val_loss=0.8, val_pck=0.45, mpck=0.35),
        {"event": "restart", "attempt": 3, "reason": "driver_rerun", "resumed_from": NAME.format(3)},
        record(3, 4, 3, 1, val_loss=0.6, val_pck=0.55, mpck=0.45),  # the same epoch, redone: this one counts
    ]


def write_run(tmp_path, records) -> str:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(run)


def test_epoch_series_takes_the_last_report_of_an_epoch_and_places_restarts():
    series = plots.epoch_series(run_records())
    assert series["epochs"] == [1, 2, 3]
    assert series["val_pck"] == [0.30, 0.50, 0.55] and series["val_loss"] == [0.9, 0.7, 0.6]
    assert series["running"] == [(1.5, 0.5), (2.5, 1 / 3)]  # mid-epoch reports at step 2 of 4
    assert [(r["x"], r["attempt"]) for r in series["restarts"]] == [(2.5, 2), (3.0, 3)]
    assert series["attempts"] == 3
    assert plots._best(series["epochs"], series["val_pck"], "max") == (3, 0.55)
    assert plots._best([1, 2, 3], [0.5, 0.4, 0.4], "min") == (2, 0.4)  # the first epoch reaching the best


def test_plot_writes_a_png_of_the_expected_size(tmp_path):
    run = write_run(tmp_path, run_records())
    out = tmp_path / "curves.png"
    assert cli.main(["plot", run, "--out", str(out)]) == 0
    with Image.open(out) as image:
        assert image.size == plots.curves_size() == (1200, 480)
        assert len(image.getcolors(1 << 16) or range(1 << 16)) > 50  # drawn, not blank
    assert cli.main(["plot", str(tmp_path / "nowhere")]) == 1


def test_plot_refuses_a_run_without_a_validated_epoch(tmp_path):
    run = write_run(tmp_path, [record(1, 2, 1, 0, val_pck=-1.0)])
    with pytest.raises(ValueError, match="no validated epoch"):
        plots.plot_curves(run, str(tmp_path / "x.png"))


def test_show_writes_a_grid_of_the_expected_size(tmp_path):
    torch.set_num_threads(1)
    checkpoint = write_fresh_checkpoint(tmp_path / "checkpoint_e001", TrainConfig(**TINY))
    out = tmp_path / "grid.png"
    path = plots.show_predictions(str(checkpoint), str(out), "test", episodes=2, queries=3, device="cpu")
    assert path == str(out)
    with Image.open(out) as image:
        assert image.size == plots.grid_size(2, 1 + 3) == (800, 530)
    five_shot = tmp_path / "five.png"
    assert cli.main(["show", str(checkpoint), "--num-shots", "5", "--episodes", "1", "--queries", "1",
                     "--out", str(five_shot), "--device", "cpu"]) == 0
    with Image.open(five_shot) as image:
        assert image.size == plots.grid_size(1, 5 + 1)
