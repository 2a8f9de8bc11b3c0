"""Config validation and the CLI flags (both spellings, one-line errors before Ray starts)."""

import subprocess
import sys

import pytest

from cape_ray.cli import build_parser, config_from_args
from cape_ray.config import ConfigError, TrainConfig


def parse(argv):
    parser = build_parser()
    args = parser.parse_args(["train", *argv])
    sub = parser._subparsers._group_actions[0].choices["train"]
    return config_from_args(args, sub)


def test_both_spellings():
    a = parse(["--batch_size", "3", "--num_queries_per_episode", "4", "--early_stopping_patience", "2"])
    b = parse(["--batch-size", "3", "--num-queries-per-episode", "4", "--early-stopping-patience", "2"])
    assert a == b and a.batch_size == 3 and a.num_queries_per_episode == 4


def test_every_documented_flag_parses(tmp_path):
    config = parse(["--epochs", "2", "--batch_size", "2", "--accumulation_steps", "4",
                    "--num_queries_per_episode", "2", "--early_stopping_patience", "5",
                    "--output_dir", str(tmp_path), "--resume", str(tmp_path), "--lr", "1e-4",
                    "--num_shots", "5", "--num_workers", "2:8", "--use_gpu", "--max_failures", "7",
                    "--keep", "3", "--name", "r1", "--seed", "9", "--checkpoint_every_steps", "50",
                    "--episodes_per_epoch", "64", "--val_episodes", "3", "--data_root", str(tmp_path),
                    "--mp100_split", "2"])
    assert config.storage_path == str(tmp_path) and config.worker_range() == (2, 8)
    assert config.use_gpu and config.num_shots == 5 and config.lr == 1e-4 and config.mp100_split == 2


def test_split_id_is_mp100_split():
    assert parse(["--split_id", "3"]).mp100_split == 3
    assert parse(["--split-id", "4"]).mp100_split == 4 and parse([]).mp100_split == 1


def test_json_round_trip():
    config = TrainConfig(epochs=3, resume="/x", num_workers="1:2")
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown config keys"):
        TrainConfig.from_dict({**config.to_dict(), "bogus": 1})


@pytest.mark.parametrize("changes,flag", [
    ({"lr": 0.0}, "--lr"), ({"num_shots": 2}, "--num_shots"), ({"batch_size": 0}, "--batch_size"),
    ({"num_workers": "3:1"}, "--num_workers"), ({"num_workers": "two"}, "--num_workers"),
    ({"mp100_split": 6}, "--mp100_split"), ({"data_root": "/no/such/dir"}, "--data_root"),
    ({"name": "a/b"}, "--name"), ({"lr": float("nan")}, "--lr"), ({"cache_dir": "relative/dir"}, "--cache_dir"),
])
def test_invalid_values_name_the_flag(changes, flag):
    with pytest.raises(ConfigError, match=flag):
        TrainConfig(**changes)


def test_cli_error_is_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, "-m", "cape_ray", "train", "--lr", "-1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "--lr" in last and "must be" in last
    assert "ray" not in proc.stderr.lower().replace("cape-ray", "")  # failed before Ray started


def test_failure_config_counts_preemptions_separately():
    from cape_ray.job import build_trainer

    trainer = build_trainer(TrainConfig(max_failures=4, max_preemption_failures=9, num_workers="2:8", keep=3))
    run_config, scaling = trainer.run_config, trainer.scaling_config
    assert run_config.failure_config.max_failures == 4
    assert run_config.failure_config.max_preemption_failures == 9
    assert scaling.num_workers == (2, 8)
    assert run_config.checkpoint_config.num_to_keep == 3
    # retention ranks by the (smoothed) PCK, with every --keep_every-th epoch on top (checkpointer.py)
    assert run_config.checkpoint_config.checkpoint_score_attribute == "retention_score"
    assert run_config.checkpoint_config.checkpoint_score_order == "max"
    assert run_config.name == "cape-ray"
