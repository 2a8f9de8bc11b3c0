"""What makes a run the same run (identity.py): reruns and --resume that would change a run's math
are refused before Ray starts with each differing field, --force accepts and records them, flags
that do not change the math are accepted and said; --epochs extends a run as --lr_schedule says."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from cape_ray import checkpoint as ckpt, cli, engine, identity
from cape_ray.config import TrainConfig
from cape_ray.worker import train_loop_per_worker
from local_edge import LocalEdge
from tiny import cli_flags, make_config

MODEL_SPEC_FIELDS = ("model", "backbone", "feature_dim", "refine_layers", "use_skeleton", "dropout", "model_kwargs",
                     "freeze_backbone", "train_backbone_blocks")


def train_cli(capsys, config, *extra: str) -> tuple[int, str, str]:
    try:
        status = cli.main(["train", *cli_flags(config), *extra])
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def finished_run(tmp_path: Path, name: str = "run", **changes) -> tuple[TrainConfig, LocalEdge]:
    """A 1-epoch run trained in this process, with the snapshot Ray (2.60, pinned) would leave."""
    config = make_config(tmp_path, name, epochs=1, checkpoint_every_steps=0, **changes)
    edge = LocalEdge(tmp_path / name, quiet=True)
    train_loop_per_worker(config.to_dict(), edge)
    snapshot = {"latest_checkpoint_result": {"checkpoint_dir_name": Path(edge.latest).name, "metrics": {}}}
    (tmp_path / name / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    return config, edge


def test_every_flag_is_either_math_said_ignored_or_part_of_the_model_spec():
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    groups = (identity.MATH_FIELDS, identity.INFORMATIONAL_FIELDS, identity.IGNORED_FIELDS, MODEL_SPEC_FIELDS)
    for name in names:
        assert sum(name in group for group in groups) == 1, f"{name} must be in exactly one group"
    assert sorted(n for group in groups for n in group) == sorted(names)


@pytest.mark.parametrize("changes, lines", [
    (dict(seed=5), ["seed: 0 -> 5"]),
    (dict(data_seed=3, episodes_per_epoch=32), ["data_seed: 0 -> 3", "episodes_per_epoch: 16 -> 32"]),
    (dict(batch_size=4), ["batch_size: 2 -> 4"]),
    (dict(precision="bf16"), ["precision: 'fp32' -> 'bf16'"]),
    (dict(feature_dim=32), ["model.feature_dim: 16 -> 32"]),
])
def test_a_rerun_that_changes_the_math_is_refused_with_each_difference(tmp_path, capsys, ray_must_not_start,
                                                                       changes, lines):
    config, _ = finished_run(tmp_path)
    status, out, err = train_cli(capsys, config.replace(epochs=2, **changes))
    assert status == 2 and "this rerun would change the run's math" in err and out == ""
    for line in lines:
        assert f"  {line}\n" in err
    assert "pass --force" in err


def test_force_accepts_it_and_records_it_in_the_history(tmp_path, capfd):
    config, edge = finished_run(tmp_path)
    forced = config.replace(epochs=2, seed=5, early_stopping_patience=7, force=True)
    rerun = LocalEdge.after(edge, quiet=False)
    train_loop_per_worker(forced.to_dict(), rerun)
    out = capfd.readouterr().out
    assert "! --force: seed: 0 -> 5 (changes the run's math; recorded in its history)" in out
    assert "! early_stopping_patience: 0 -> 7 (does not change the run's math)" in out
    state = ckpt.read_state(rerun.latest)
    assert state["config"]["seed"] == 5
    change = state["config_changes"][-1]
    assert change["forced"] and change["fields"]["seed"] == [0, 5] and change["at"]["epoch"] == 1
    assert change["fields"]["early_stopping_patience"] == [0, 7]


def test_flags_that_do_not_change_the_math_are_accepted(tmp_path, capsys, monkeypatch):
    config, _ = finished_run(tmp_path)
    from cape_ray import preflight

    latest = preflight.latest_state(config)
    preflight.check_continuation(config.replace(early_stopping_patience=3, keep=5, epochs=4), latest)  # no raise


def test_force_cannot_make_the_weights_fit_another_model(tmp_path, capsys, ray_must_not_start):
    config, _ = finished_run(tmp_path)
    status, _, err = train_cli(capsys, config.replace(epochs=2, feature_dim=32, force=True))
    assert status == 2 and "--force cannot change the model's shapes" in err
    # a model change that keeps every shape can be forced
    from cape_ray import preflight

    preflight.check_continuation(config.replace(dropout=0.2, force=True), preflight.latest_state(config))


def test_resume_into_a_new_run_is_compared_too_and_brings_the_bests_exports(tmp_path, capsys, ray_must_not_start):
    config, edge = finished_run(tmp_path, "source")
    status, _, err = train_cli(capsys, make_config(tmp_path, "new", epochs=2, seed=9, resume=str(tmp_path / "source")))
    assert status == 2 and "--resume" in err and "seed: 0 -> 9" in err


def test_resume_into_a_new_run_keeps_its_bests_with_their_exports(tmp_path):
    config, edge = finished_run(tmp_path, "source")
    exports = sorted(p.name for p in (tmp_path / "source").glob("checkpoint_best_*"))
    assert len(exports) == 2
    new = make_config(tmp_path, "new", epochs=1, checkpoint_every_steps=0, resume=edge.latest)
    (tmp_path / "new").mkdir()
    new_edge = LocalEdge(tmp_path / "new", quiet=True)
    train_loop_per_worker(new.replace(epochs=2).to_dict(), new_edge)
    state = ckpt.read_state(new_edge.latest)
    for tracker in state["tracking"]["best"].values():  # every tracked best has its export in the new run
        assert (tmp_path / "new" / tracker["export"]).is_dir()
        assert not ckpt.verify_checkpoint(tmp_path / "new" / tracker["export"])


@pytest.mark.parametrize("schedule", ["keep", "extend"])
def test_a_longer_run_says_how_its_schedule_continues(tmp_path, capfd, schedule):
    config, edge = finished_run(tmp_path)
    planned_floor = ckpt.read_state(edge.latest)["metrics"]["lr"]
    rerun = LocalEdge.after(edge, quiet=False)
    train_loop_per_worker(config.replace(epochs=2, lr_schedule=schedule).to_dict(), rerun)
    out = capfd.readouterr().out
    history = ckpt.read_state(rerun.latest)["history"]
    if schedule == "keep":
        assert "--epochs 2 extends a run whose LR schedule was planned for 1 epochs; with --lr_schedule keep" in out
        assert "epochs 2-2 train at the floor LR 6.00e-05" in out
        assert history[-1]["lr"] == pytest.approx(planned_floor)  # still the floor
    else:
        # epoch 2 starts where a 2-epoch cosine is after 4 steps (warmup 2), not at the 1-epoch floor
        now = config.lr * engine.lr_factor(4, config.warmup_steps, 8, config.min_lr_ratio)
        assert f"LR schedule re-planned for 2 epochs (--lr_schedule extend; it was planned for 1): the LR continues " \
               f"on the 2-epoch cosine, now {now:.2e} (was {planned_floor:.2e})" in out
        assert history[-1]["lr"] == pytest.approx(planned_floor)  # a 2-epoch cosine also ends at its floor
        changes = ckpt.read_state(rerun.latest)["config_changes"]
        assert any(c["fields"].get("lr_schedule_epochs") == [1, 2] for c in changes)
