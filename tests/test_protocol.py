"""`cape-ray evaluate --protocol mp100`: the papers' table end to end through the CLI on a tiny
MP-100-shaped set written here (the built-in test categories as MP-100 files, one copy per split),
with a tiny checkpoint per split; its numbers are those of a direct evaluation of each split, and
the published rows are there, each number with its source."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from cape_ray import cli, evaluate, protocol
from cape_ray.config import TrainConfig
from cape_ray.data.mp100 import annotation_path, write_mp100
from cape_ray.data.synthetic import make_synthetic_split
from cape_ray.published_mp100 import PUBLISHED
from tiny import write_checkpoint

# 21 instances per category: 5 supports + 15 queries fit, so no query repeats (as on MP-100)
INSTANCES = 21
EPISODES = 2  # per category (the papers: 200); the tiny set evaluates in about a second per setting
TINY = dict(image_size=32, feature_dim=16, refine_layers=1, num_threads=1)


@pytest.fixture(scope="module")
def mp100(tmp_path_factory):
    """(data root, {split: checkpoint}, a split-1 checkpoint): five splits sharing the same test
    categories, and one checkpoint per split, each trained (here: freshly built) with its split."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("protocol")
    data = root / "mp100"
    write_mp100({"test": make_synthetic_split("test", 0, INSTANCES, 48)}, data, split=1)
    for split in protocol.SPLITS[1:]:
        shutil.copy(annotation_path(data, 1, "test"), annotation_path(data, split, "test"))
    checkpoints = {}
    for split in protocol.SPLITS:
        config = TrainConfig(**TINY, data_root=str(data), mp100_split=split, cache_dir=str(root / "cache"))
        checkpoints[split] = str(write_checkpoint(root / "runs", f"split{split}", config, seed=split))
    return str(data), checkpoints


def test_the_table_is_each_splits_own_evaluation_beside_the_published_numbers(mp100, tmp_path, capsys):
    data, checkpoints = mp100
    out = tmp_path / "tables" / "mp100"
    code = cli.main(["evaluate", "--protocol", "mp100", "--data_root", data, "--episodes", str(EPISODES),
                     "--device", "cpu", "--threads", "1", "--out", str(out),
                     "--checkpoints", *[f"S{s}={path}" for s, path in checkpoints.items()]])
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads(out.with_suffix(".json").read_text())
    markdown = out.with_suffix(".md").read_text()
    assert report["splits_given"] == [1, 2, 3, 4, 5] and report["splits_missing"] == []
    assert report["protocol"] == {**report["protocol"], "episodes_per_category": EPISODES, "queries_per_episode": 15,
                                  "seed": protocol.SEED, "shots": [1, 5]}

    ours = report["rows"][0]
    assert ours["method"] == "cape-ray"
    for shots in protocol.SHOTS:
        setting = ours[f"{shots}-shot"]
        for split, path in checkpoints.items():
            direct = evaluate.run(path, "test", data_root=data, mp100_split=split, num_shots=shots,
                                  episodes=EPISODES, queries=15, seed=protocol.SEED, device="cpu")
            assert direct["mean_over_pairs"]["pairs"] == 20 * EPISODES * 15
            assert setting["splits"][split - 1] == 100 * direct["headline"]["value"]
            table_cell = f"{setting['splits'][split - 1]:.2f}"
            assert table_cell in printed and table_cell in markdown
        assert setting["mean"] == pytest.approx(sum(setting["splits"]) / 5)
        assert len(set(setting["splits"])) > 1  # five checkpoints, five numbers: each split used its own
    # nothing to report but the shortened episodes: 21 instances hold every episode without repeats
    assert report["notes"] == ["episodes per category: 2 instead of the papers' 200; cape-ray's numbers are not "
                               "comparable with the published ones"]

    published = report["rows"][1:]
    assert {row["method"] for row in published} == {"POMNet", "CapeFormer", "ESCAPE", "Pose Anything", "CapeX"}
    assert len(published) == len(PUBLISHED)
    for row, entry in zip(published, PUBLISHED):
        for setting in ("1-shot", "5-shot"):
            assert row[setting]["splits"] == entry[setting]["splits"]
            if entry[setting]["mean"] is not None:
                assert row[setting]["mean"] == entry[setting]["mean"] and row[setting]["mean_from"] == "source"
    pose_anything = next(r for r in published if r["method"] == "Pose Anything" and r["backbone"] == "SwinV2-T")
    assert pose_anything["1-shot"]["splits"] == [91.19, 87.81, 85.68, 85.87, 85.61]
    assert pose_anything["1-shot"]["mean"] == pytest.approx(87.232)
    assert pose_anything["1-shot"]["mean_from"] == protocol.COMPUTED
    assert "| Pose Anything | SwinV2-T | ECCV 2024 | 91.19 | 87.81 | 85.68 | 85.87 | 85.61 | 87.23* |" in markdown
    assert "github.com/orhir/PoseAnything" in markdown and "github.com/orhir/PoseAnything" in printed


def test_missing_splits_one_setting_and_refusals(mp100, tmp_path, capsys):
    data, checkpoints = mp100
    out = tmp_path / "one"
    assert cli.main(["evaluate", "--protocol", "mp100", "--data_root", data, "--episodes", "1", "--num_shots", "1",
                     "--device", "cpu", "--out", str(out) + ".json", "--checkpoints", f"split2={checkpoints[2]}"]) == 0
    report = json.loads((tmp_path / "one.json").read_text())
    assert (tmp_path / "one.md").is_file()
    assert report["splits_given"] == [2] and report["splits_missing"] == [1, 3, 4, 5]
    ours = report["rows"][0]
    assert ours["1-shot"]["splits"][1] is not None and ours["1-shot"]["mean"] is None
    assert ours["1-shot"]["mean_of_given_splits"] == ours["1-shot"]["splits"][1]
    assert ours["5-shot"]["splits"] == [None] * 5 and "5-shot" not in report["evaluations"]["2"]
    assert any("splits not given: S1, S3, S4, S5" in note for note in report["notes"])
    assert "5-shot not evaluated (--num_shots 1)" in report["notes"]
    capsys.readouterr()

    # a split's checkpoint must be trained on that split: refused before anything is evaluated
    assert cli.main(["evaluate", "--protocol", "mp100", "--data_root", data, "--device", "cpu",
                     "--out", str(tmp_path / "never"), "--checkpoints", f"S3={checkpoints[1]}"]) == 1
    assert "trained on MP-100 split 1" in capsys.readouterr().err
    assert not (tmp_path / "never.json").exists()
    # malformed pairs and flags that do not go with the protocol: one line, exit 2
    one = checkpoints[1]
    for argv in (["--checkpoints", f"S6={one}"], ["--checkpoints", f"S1={one}", f"1={one}"],
                 ["--checkpoint", one, "--checkpoints", f"S1={one}"], []):
        with pytest.raises(SystemExit) as exit_:
            cli.main(["evaluate", "--protocol", "mp100", *argv])
        assert exit_.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_episodes_have_the_papers_structure(mp100):
    """200 episodes per test category, each num_shots supports and 15 queries, all distinct instances
    of that category (the papers' random.sample(instances, num_shots + 15))."""
    data, checkpoints = mp100
    for shots in protocol.SHOTS:
        ev = evaluate.setup(checkpoints[1], "test", data_root=data, mp100_split=1, num_shots=shots,
                            episodes=protocol.EPISODES, queries=protocol.QUERIES, seed=protocol.SEED, device="cpu")
        per_category: dict[int, int] = {}
        for episode in ev.episodes:
            rows = episode.support_rows.tolist() + episode.query_rows.tolist()
            assert len(episode.support_rows) == shots and len(episode.query_rows) == 15
            assert len(set(rows)) == shots + 15
            assert set(rows) <= set(ev.data.rows_by_category[episode.category_id].tolist())
            per_category[episode.category_id] = per_category.get(episode.category_id, 0) + 1
        assert len(per_category) == 20 and set(per_category.values()) == {protocol.EPISODES}


def test_every_published_number_has_a_source():
    for entry in PUBLISHED:
        assert all(entry[key] for key in ("method", "backbone", "paper", "venue", "year")), entry
        for setting in ("1-shot", "5-shot"):
            given = entry[setting]
            numbers = [v for v in given["splits"] + [given["mean"]] if v is not None]
            assert len(given["splits"]) == 5
            assert all(0 < v <= 100 for v in numbers)
            assert bool(given["source"]) == bool(numbers), (entry["method"], setting)
            assert numbers or given.get("note"), "an empty setting says why"
            if given["mean"] is not None and None not in given["splits"]:  # a stated mean agrees with its splits
                assert given["mean"] == pytest.approx(sum(given["splits"]) / 5, abs=0.006), entry["method"]
