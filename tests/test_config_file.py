"""Runs described by a config file: `--config run.yaml`, flags overriding it, errors that name the
key (and the closest valid one, or the expected type) before Ray starts; the run directory's
config.yaml reproduces the run; the examples' configs load."""

from __future__ import annotations

from pathlib import Path

import pytest

from cape_ray import cli, job
from cape_ray.config import ConfigError, TrainConfig, read_config_file

ROOT = Path(__file__).resolve().parents[1]


def parse(argv: list[str]) -> TrainConfig:
    parser = cli.build_parser()
    args = parser.parse_args(["train", *argv])
    return cli.config_from_args(args, parser._subparsers._group_actions[0].choices["train"])


def test_a_config_file_sets_every_flag_and_the_command_line_overrides_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: demo\nepochs: 7\nbatch_size: 4\ntracker: [mlflow, tensorboard]\nnum_workers: 2\n"
                    "model_kwargs: {heads: 2}\nuse_skeleton: true\nlr: 1e-3\n")
    config = parse(["--config", str(path), "--epochs", "9"])
    assert (config.name, config.epochs, config.batch_size, config.lr) == ("demo", 9, 4, 1e-3)
    assert config.tracker == "mlflow,tensorboard" and config.num_workers == "2"
    assert config.model_kwargs == {"heads": 2} and config.use_skeleton is True


@pytest.mark.parametrize("text, words", [
    ("epochz: 3\n", "unknown key 'epochz'; did you mean 'epochs'?"),
    ("batch-size: big\n", "batch_size: expected an integer, got 'big' (str)"),
    ("lr: [1, 2]\n", "lr: expected a number, got [1, 2] (list)"),
    ("use_gpu: maybe\n", "use_gpu: expected true or false, got 'maybe' (str)"),
    ("- epochs\n", "expected a mapping of settings"),
    ("epochs: [\n", "not valid YAML (line 2, column 1)"),
])
def test_a_bad_config_file_is_one_line_naming_the_key(tmp_path, capsys, ray_must_not_start, text, words):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--config", str(path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and words in err and err.count("\n") == 1 and str(path) in err


def test_the_run_directorys_config_reproduces_the_run(tmp_path):
    config = parse(["--name", "again", "--storage_path", str(tmp_path), "--epochs", "3", "--tracker", "mlflow",
                    "--tracker", "tensorboard", "--model_kwargs", '{"heads": 2}', "--no-augment", "--lr", "0.001"])
    job.save_config(config)
    saved = tmp_path / "again" / job.CONFIG_FILE
    assert parse(["--config", str(saved)]) == config


@pytest.mark.parametrize("name", ["quickstart.yaml", "mp100_vit_split1.yaml", "cluster.yaml"])
def test_the_examples_configs_load(tmp_path, name):
    values = read_config_file(str(ROOT / "examples" / name))
    if "data_root" in values:  # the recipes' data lives where a user puts it
        values["data_root"] = str(tmp_path)
    config = TrainConfig(**values)
    assert config.name and config.epochs >= 1


def test_a_storage_path_with_a_tilde_is_the_home_directory(tmp_path, monkeypatch):
    from cape_ray import storage

    monkeypatch.setenv("HOME", str(tmp_path))
    fs, path = storage.run_path("~/runs", "demo")
    assert path == f"{tmp_path}/runs/demo"
    assert job.storage_uri(TrainConfig(storage_path="~/runs")) == f"{tmp_path}/runs"


def test_unknown_keys_in_a_dict_are_refused_too():
    with pytest.raises(ConfigError, match="unknown config keys"):
        TrainConfig.from_dict({"epochz": 3})
