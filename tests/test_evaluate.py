"""Evaluation: MP-100 protocol numbers that do not depend on batch size, bank or repetition; bad
checkpoints refused; the CLI's table and JSON. A checkpoint written from a fresh tiny model (no Ray)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cape_ray import cli, engine, evaluate
from cape_ray.config import TrainConfig
from cape_ray.data.episodes import EpisodeSampler
from cape_ray.data.loading import load_split
from tiny import write_checkpoint

TINY = dict(image_size=32, feature_dim=16, refine_layers=1, synthetic_instances_per_category=6,
            synthetic_canvas=48, num_threads=1)
# 3 episodes x (1 support + 3 queries) = 12 images per category > its 6 instances: the bank is used
EPISODES, QUERIES = 3, 3


def write_fresh_checkpoint(directory, config: TrainConfig, seed: int = 0):
    """A checkpoint of a freshly built model, written by the real writer."""
    return write_checkpoint(Path(directory).parent, Path(directory).name, config, seed=seed)


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return str(write_fresh_checkpoint(tmp_path_factory.mktemp("eval") / "checkpoint_e001", TrainConfig(**TINY)))


def numbers(report: dict) -> dict:
    """Everything but the timings."""
    timing = ("episodes_per_second", "batch_size")
    return {k: v for k, v in report.items() if not k.endswith("seconds") and k not in timing}


def test_same_numbers_for_any_batch_size_and_repeated_runs(checkpoint_dir):
    runs = {size: evaluate.run(checkpoint_dir, "val", episodes=EPISODES, queries=QUERIES, batch_size=size,
                               device="cpu", with_loss=True) for size in (1, 2)}
    runs["repeat"] = evaluate.run(checkpoint_dir, "val", episodes=EPISODES, queries=QUERIES, batch_size=2,
                                  device="cpu", with_loss=True)
    assert numbers(runs["repeat"]) == numbers(runs[2])  # repeated run: bitwise the same report
    one, two = runs[1], runs[2]
    assert [r["id"] for r in one["categories"]] == [r["id"] for r in two["categories"]]
    for a, b in zip(one["categories"] + [one["mean_over_pairs"]], two["categories"] + [two["mean_over_pairs"]]):
        assert a["pairs"] == b["pairs"]
        for key in evaluate.PCK_KEYS + ("mpck",):
            assert a[key] == b[key], key  # PCK counts hits: batch size moves coordinates by ~1e-7 at most
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-6)
    categories = len(one["categories"])
    assert one["mean_over_pairs"]["pairs"] == categories * EPISODES * QUERIES
    # equal pairs per category: the mean over pairs (MP-100) equals the mean over categories
    assert one["mean_over_pairs"]["pck@0.20"] == pytest.approx(one["mean_over_categories"]["pck@0.20"], abs=1e-12)
    assert one["headline"] == {"metric": "pck@0.20", "averaged_over": "pairs",
                               "value": one["mean_over_pairs"]["pck@0.20"]}


def test_feature_bank_matches_the_models_own_forward(checkpoint_dir):
    ev = evaluate.setup(checkpoint_dir, "val", episodes=EPISODES, queries=QUERIES, device="cpu")
    banked = engine.evaluate_episodes(ev.model, ev.data, ev.episodes, 2, feature_bank=True)
    plain = engine.evaluate_episodes(ev.model, ev.data, ev.episodes, 2, feature_bank=False)
    assert banked.keys() == plain.keys()
    for category_id in banked:
        assert banked[category_id]["pairs"] == plain[category_id]["pairs"] == EPISODES * QUERIES
        for key in evaluate.PCK_KEYS:
            # different encode batches round differently: at most a keypoint flips at a threshold
            assert banked[category_id][key + "_sum"] == pytest.approx(plain[category_id][key + "_sum"], abs=0.5)
    # the bank is really used, and its predictions are the forward's up to rounding
    category_id, episodes = next(engine.by_category(ev.episodes))
    with torch.inference_mode():
        bank = engine.FeatureBank.for_category(ev.model, ev.data, category_id, episodes)
    assert bank is not None
    _, _, from_bank, _ = engine.predict_batch(ev.model, ev.data, episodes[:2], bank)
    _, _, from_images, _ = engine.predict_batch(ev.model, ev.data, episodes[:2])
    assert torch.allclose(from_bank, from_images, atol=1e-5)


def test_episodes_are_the_mp100_protocol(checkpoint_dir):
    ev = evaluate.setup(checkpoint_dir, "test", episodes=2, queries=15, device="cpu")
    sampler = EpisodeSampler(load_split(ev.config, "test", 15), 1, 15, seed=ev.config.data_seed)
    expected = sampler.fixed_episodes(2)
    assert [(e.category_id, e.support_rows.tolist(), e.query_rows.tolist()) for e in ev.episodes] == \
           [(e.category_id, e.support_rows.tolist(), e.query_rows.tolist()) for e in expected]
    assert evaluate.DEFAULT_EPISODES == {"test": 200, "val": 100, "train": 100}
    batches = engine.category_batches(ev.episodes, 3)
    assert all(len({e.category_id for e in batch}) == 1 and len(batch) <= 3 for batch in batches)
    assert sum(len(b) for b in batches) == len(ev.episodes)


def test_a_checkpoint_that_does_not_verify_is_refused(checkpoint_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint_dir, broken)
    model_file = broken / "model.pt"
    model_file.write_bytes(model_file.read_bytes()[:-16])
    with pytest.raises(evaluate.EvaluationError, match="(?s)does not verify.*model.pt"):
        evaluate.setup(str(broken), "val", episodes=1, queries=1, device="cpu")
    assert cli.main(["evaluate", "--checkpoint", str(broken), "--split", "val", "--device", "cpu",
                     "--out", str(tmp_path / "never.json")]) == 1
    assert "refusing to evaluate" in capsys.readouterr().err
    assert not (tmp_path / "never.json").exists()
    with pytest.raises(evaluate.EvaluationError, match="no checkpoint at"):
        evaluate.setup(str(tmp_path / "missing"), "val")


def test_cli_prints_the_table_and_writes_json_from_a_uri(checkpoint_dir, tmp_path, capsys):
    out = tmp_path / "report.json"
    code = cli.main(["evaluate", "--checkpoint", "file://" + checkpoint_dir, "--split", "val", "--episodes", "2",
                     "--queries", "3", "--batch-size", "4", "--device", "cpu", "--threads", "1", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert "mean over pairs (MP-100)" in printed and "mean over categories" in printed
    assert f"PCK@0.20 = {report['headline']['value']:.4f}" in printed
    first = report["categories"][0]
    assert set(first) >= {"id", "name", "pairs", "episodes", "mpck", *evaluate.PCK_KEYS}
    assert first["name"] in printed and first["pairs"] == 6
    assert report["episodes_per_category"] == 2 and report["queries_per_episode"] == 3 and report["split"] == "val"


def test_data_root_and_shots_override_the_checkpoint(tmp_path):
    from cape_ray.data.mp100 import export_synthetic

    export_synthetic(tmp_path / "mp100", seed=0, instances_per_category=6, canvas=48, split=2)
    config = TrainConfig(**TINY)
    directory = write_fresh_checkpoint(tmp_path / "ck", config.replace(data_root=str(tmp_path / "mp100"),
                                                                       cache_dir=str(tmp_path / "cache")))
    (tmp_path / "mp100").rename(tmp_path / "moved")  # the training data is not where it was
    with pytest.raises(evaluate.EvaluationError, match="data_root"):
        evaluate.setup(str(directory), "val")
    report = evaluate.run(str(directory), "val", data_root=str(tmp_path / "moved"), mp100_split=2, num_shots=5,
                          episodes=1, queries=1, device="cpu")
    assert report["num_shots"] == 5 and "split 2" in report["data"]
    assert report["mean_over_pairs"]["pairs"] == len(report["categories"]) > 0
