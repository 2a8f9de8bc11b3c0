"""What `cape-ray train` says before Ray starts: one line per config error (exit 2), and a rerun
with nothing left to train (exit 0). Ray is never started here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cape_ray import cli
from cape_ray.worker import train_loop_per_worker
from local_edge import LocalEdge
from tiny import cli_flags, make_config


def train_cli(capsys, config, *extra: str) -> tuple[int, str, str]:
    try:
        status = cli.main(["train", *cli_flags(config), *extra])
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("changes, words", [
    (dict(episodes_per_epoch=8, num_workers="1:4"), "--episodes_per_epoch 8 is smaller than one optimizer step (16"),
    (dict(best_metrics="val_pck:max,accuracy:max"), "--best_metrics: 'accuracy' is not a reported metric"),
    (dict(resume="/nonexistent/ckpt"), "--resume /nonexistent/ckpt: no such checkpoint or run directory"),
])
def test_config_errors_found_before_ray_are_one_line(tmp_path, capsys, changes, words, ray_must_not_start):
    status, out, err = train_cli(capsys, make_config(tmp_path, "bad", **changes))
    assert status == 2 and words in err and err.count("\n") == 1 and out == ""


def test_missing_mp100_files_and_a_resume_that_does_not_fit(tmp_path, capsys, ray_must_not_start):
    (tmp_path / "mp100").mkdir()
    status, _, err = train_cli(capsys, make_config(tmp_path, "data", data_root=str(tmp_path / "mp100")))
    assert status == 2 and "annotations/mp100_split1_train.json does not exist" in err

    done = make_config(tmp_path, "done", epochs=1, checkpoint_every_steps=0)
    train_loop_per_worker(done.to_dict(), LocalEdge(tmp_path / "done", quiet=True))
    status, _, err = train_cli(capsys, make_config(tmp_path, "other", resume=str(tmp_path / "done"), feature_dim=32))
    assert status == 2 and "model.feature_dim: 16 -> 32" in err


def test_a_rerun_with_nothing_left_to_train_says_why(tmp_path, capsys, ray_must_not_start):
    config = make_config(tmp_path, "finished", epochs=1, checkpoint_every_steps=0)
    edge = LocalEdge(tmp_path / "finished", quiet=True)
    train_loop_per_worker(config.to_dict(), edge)
    # what Ray's run snapshot records (Ray 2.60, pinned): the latest registered checkpoint's name
    snapshot = {"latest_checkpoint_result": {"checkpoint_dir_name": Path(edge.latest).name, "metrics": {}}}
    (tmp_path / "finished" / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))

    status, out, _ = train_cli(capsys, config)
    assert status == 0
    assert "run 'finished' has completed 1 epoch(s) and --epochs is 1: nothing left to train" in out
    assert "Pass a larger --epochs to continue it" in out
