"""The checkpoint contract: files, manifest, verification, loading, names, disk space."""

import json
import shutil
from collections import namedtuple

import pytest
import torch

from cape_ray import checkpoint as ckpt
from cape_ray import rng
from cape_ray.config import TrainConfig
from cape_ray.tracking import RunTracking


def tiny_training_state(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 10))
    for _ in range(3):
        model(torch.randn(5, 4)).square().mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def write(tmp_path, config=None, ranks=(0,)):
    config = config or TrainConfig()
    model, optimizer, scheduler = tiny_training_state()
    tracking = RunTracking(3, 0.0)
    tracking.update(0.1, 0.7, 2)
    state = {"config": config.to_dict(), "position": {"epoch": 2, "step": 0, "global_step": 6},
             "tracking": tracking.state_dict(), "world_size": len(ranks), "metrics": {"val_pck": 0.7}}
    blobs = {r: ckpt.serialize({"rng": rng.capture(), "loss_sum": 0.0, "loss_count": 0}) for r in ranks}
    path = ckpt.write_checkpoint(tmp_path / "ck", model=model.state_dict(), optimizer=optimizer.state_dict(),
                                 scheduler=scheduler.state_dict(), state=state, rank_states=blobs)
    return path, (model, optimizer, scheduler)


def test_checkpoint_holds_every_expected_field(tmp_path):
    path, _ = write(tmp_path, ranks=(0, 1))
    names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    assert names == ["manifest.json", "model.pt", "optimizer.pt", "rng/rank_00000.pt", "rng/rank_00001.pt",
                     "scheduler.pt", "state.json"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == set(names) - {"manifest.json"}
    assert all(len(entry["sha256"]) == 64 and entry["size"] > 0 for entry in manifest["files"].values())
    state = json.loads((path / "state.json").read_text())
    assert state["schema_version"] == ckpt.SCHEMA_VERSION
    assert {"config", "position", "tracking", "world_size", "metrics"} <= set(state)
    assert ckpt.verify_checkpoint(path) == []


def test_load_restores_model_optimizer_scheduler_exactly(tmp_path):
    path, (model, optimizer, scheduler) = write(tmp_path)
    loaded = ckpt.load_checkpoint(path)
    fresh_model, fresh_opt, fresh_sched = tiny_training_state(seed=1)  # different weights and moments
    fresh_model.load_state_dict(loaded.model)
    fresh_opt.load_state_dict(loaded.optimizer)
    fresh_sched.load_state_dict(loaded.scheduler)
    for a, b in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(optimizer.state.values(), fresh_opt.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    assert fresh_sched.get_last_lr() == scheduler.get_last_lr()
    assert fresh_sched.last_epoch == scheduler.last_epoch
    # one more identical step keeps them identical
    torch.manual_seed(5)
    x = torch.randn(5, 4)
    for m, o, s in ((model, optimizer, scheduler), (fresh_model, fresh_opt, fresh_sched)):
        m.eval()
        m(x).square().mean().backward()
        o.step()
        s.step()
    for a, b in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(a, b)
    tracking = RunTracking(3, 0.0)
    tracking.load_state_dict(loaded.state["tracking"])
    assert tracking.best_pck.best == 0.7 and tracking.best_loss.best == 0.1


def test_every_file_loads_with_weights_only(tmp_path):
    path, _ = write(tmp_path)
    for p in list(path.glob("*.pt")) + list((path / "rng").glob("*.pt")):
        torch.load(p, weights_only=True)  # raises on any pickled Python object


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "delete", "no_manifest"])
def test_damaged_checkpoint_is_refused(tmp_path, damage):
    path, _ = write(tmp_path)
    target = path / "optimizer.pt"
    if damage == "corrupt":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    elif damage == "delete":
        target.unlink()
    else:
        (path / "manifest.json").unlink()
    problems = ckpt.verify_checkpoint(path)
    assert problems
    with pytest.raises(ckpt.CheckpointError, match="does not verify"):
        ckpt.load_checkpoint(path)


def test_incompatible_model_config_gives_clear_error(tmp_path):
    path, _ = write(tmp_path, TrainConfig(feature_dim=64))
    loaded = ckpt.load_checkpoint(path)
    ckpt.check_compatible(loaded.state, TrainConfig(feature_dim=64), str(path))
    with pytest.raises(ckpt.CheckpointError, match="feature_dim: checkpoint 64 vs now 128"):
        ckpt.check_compatible(loaded.state, TrainConfig(feature_dim=128), str(path))


def test_schema_version_mismatch_is_refused(tmp_path):
    path, _ = write(tmp_path)
    state = json.loads((path / "state.json").read_text())
    state["schema_version"] = 999
    (path / "state.json").write_text(json.dumps(state))
    # rewrite the manifest entry so only the schema differs
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["state.json"] = {"size": (path / "state.json").stat().st_size,
                                       "sha256": ckpt._sha256(path / "state.json")}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match="schema_version 999"):
        ckpt.load_checkpoint(path)


def test_not_enough_disk_space_names_path_and_bytes(tmp_path, monkeypatch):
    existing = tmp_path / "keep_me"
    existing.mkdir()
    (existing / "data").write_text("x")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10_000, 9_000, 1_000))
    with pytest.raises(ckpt.DiskSpaceError) as info:
        write(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "ck") in message and "1000 bytes free" in message and "needs" in message
    assert (existing / "data").exists()
    assert not (tmp_path / "ck" / "model.pt").exists()  # nothing half-written


def test_names_follow_the_pipeline_convention():
    config = TrainConfig(lr=1e-4, batch_size=2, accumulation_steps=4, num_queries_per_episode=2)
    assert ckpt.checkpoint_name(config, 1) == "checkpoint_e001_lr1e-4_bs2_acc4_qpe2"
    assert ckpt.checkpoint_name(config, 3, 500) == "checkpoint_e003_lr1e-4_bs2_acc4_qpe2_s000500"
    assert ckpt.format_lr(2.5e-4) == "2.5e-4" and ckpt.format_lr(1e-3) == "1e-3"
    assert ckpt.best_export_name("pck", 89, 0.81234, 0.12341) == "checkpoint_best_pck_e089_pck0.8123_valloss0.1234"
    assert ckpt.best_export_name("loss", 42, 0.76543, 0.09871) == "checkpoint_best_loss_e042_valloss0.0987_pck0.7654"
    assert ckpt.position_from_name("checkpoint_e003_lr1e-4_bs2_acc4_qpe2_s000500") == (3, 500)
    assert ckpt.position_from_name("checkpoint_e003_lr1e-4_bs2_acc4_qpe2") > (3, 500)
    assert ckpt.position_from_name("checkpoint_best_pck_e089_pck0.8123_valloss0.1234") is None


def test_model_that_does_not_fit_gives_clear_error():
    small = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)).state_dict()
    wide = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Linear(16, 2), torch.nn.ReLU()).state_dict()
    ckpt.check_model_shapes(small, small, "ck")
    with pytest.raises(ckpt.CheckpointError, match=r"does not fit this model \(3 shape mismatches.*0\.weight: checkpoint \(8, 4\) vs model \(16, 4\)"):
        ckpt.check_model_shapes(small, wide, "ck")
