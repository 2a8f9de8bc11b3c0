"""The checkpoint contract: files, manifest, verification, loading, names, disk space. Every
checkpoint here is written by the real Checkpointer.save."""

import errno
import hashlib
import io
import json
import os
import shutil
from collections import namedtuple

import pytest
import torch

from cape_ray import checkpoint as ckpt, engine
from cape_ray.config import TrainConfig
from cape_ray.model import build_model
from tiny import make_config, write_checkpoint

NAME = "checkpoint_e002_lr3e-3_bs2_acc2_qpe2"


def test_checkpoint_holds_every_expected_field(tmp_path):
    path = write_checkpoint(tmp_path, NAME, make_config(tmp_path), ranks=2)
    names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    assert names == ["manifest.json", "model.pt", "optimizer.pt", "rng/rank_00000.pt", "rng/rank_00001.pt",
                     "scheduler.pt", "state.json"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == set(names) - {"manifest.json"}
    assert all(len(entry["sha256"]) == 64 and entry["size"] > 0 for entry in manifest["files"].values())
    state = json.loads((path / "state.json").read_text())
    assert state["schema_version"] == ckpt.SCHEMA_VERSION
    assert {"config", "position", "tracking", "history", "world_size", "metrics", "versions", "epoch",
            "best_val_loss", "best_pck", "epochs_without_improvement"} <= set(state)
    rank_file = torch.load(path / "rng/rank_00001.pt", weights_only=True)
    assert {"rng_state", "cuda_rng_state", "np_rng_state", "py_rng_state", "loss_sum", "loss_count"} <= set(rank_file)
    assert ckpt.verify_checkpoint(path) == []


def test_load_restores_model_optimizer_scheduler_exactly(tmp_path):
    config = make_config(tmp_path)
    path = write_checkpoint(tmp_path, NAME, config, seed=0)
    loaded = ckpt.load_checkpoint(path)
    torch.manual_seed(1)  # different weights and moments
    model = build_model(config)
    optimizer = engine.build_optimizer(model, config)
    scheduler = engine.build_scheduler(optimizer, config, 10)
    model.load_state_dict(loaded.model)
    optimizer.load_state_dict(loaded.optimizer)
    scheduler.load_state_dict(loaded.scheduler)
    torch.manual_seed(0)
    reference = build_model(config)
    assert not all(torch.equal(a, b) for a, b in zip(reference.parameters(), model.parameters()))  # stepped
    for key, value in loaded.model.items():
        assert torch.equal(model.state_dict()[key], value)
    for index, state in loaded.optimizer["state"].items():
        assert all(torch.equal(optimizer.state_dict()["state"][index][k], v) for k, v in state.items())
    assert scheduler.progress == 1.0 and scheduler.get_last_lr() == [g["lr"] for g in optimizer.param_groups]


def test_every_file_loads_with_weights_only(tmp_path):
    path = write_checkpoint(tmp_path, NAME, make_config(tmp_path), ranks=2)
    for p in list(path.glob("*.pt")) + list((path / "rng").glob("*.pt")):
        torch.load(p, weights_only=True)  # raises on any pickled Python object


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "delete", "no_manifest"])
def test_damaged_checkpoint_is_refused(tmp_path, damage):
    path = write_checkpoint(tmp_path, NAME, make_config(tmp_path))
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
    assert ckpt.verify_checkpoint(path)
    with pytest.raises(ckpt.CheckpointError, match="does not verify"):
        ckpt.load_checkpoint(path)


def test_schema_version_mismatch_is_refused(tmp_path):
    path = write_checkpoint(tmp_path, NAME, make_config(tmp_path))
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
    model = torch.nn.Linear(4, 4)
    with pytest.raises(ckpt.DiskSpaceError) as info:
        ckpt.write_checkpoint(tmp_path / "ck", model=model.state_dict(), optimizer={}, scheduler={}, state={},
                              rank_states={0: b"x"})
    message = str(info.value)
    assert str(tmp_path / "ck") in message and "1000 bytes free" in message and "needs" in message
    assert (existing / "data").exists()
    assert not (tmp_path / "ck" / "model.pt").exists()  # nothing half-written


def test_names_follow_the_pipeline_convention():
    config = TrainConfig(lr=1e-4, batch_size=2, accumulation_steps=4, num_queries_per_episode=2)
    assert ckpt.checkpoint_name(config, 1) == "checkpoint_e001_lr1e-4_bs2_acc4_qpe2"
    assert ckpt.checkpoint_name(config, 3, 500) == "checkpoint_e003_lr1e-4_bs2_acc4_qpe2_s000500"
    assert ckpt.format_lr(2.5e-4) == "2.5e-4" and ckpt.format_lr(1e-3) == "1e-3"
    assert ckpt.format_lr(1.25e-4) == "1.25e-4"  # not rounded to 1.3e-4: distinct rates, distinct names
    metrics = {"val_pck": 0.81234, "val_loss": 0.12341, "mpck": 0.70123}
    assert ckpt.best_export_name("val_pck", 89, metrics) == "checkpoint_best_pck_e089_pck0.8123_valloss0.1234"
    assert ckpt.best_export_name("val_loss", 42, metrics) == "checkpoint_best_loss_e042_valloss0.1234_pck0.8123"
    assert ckpt.best_export_name("mpck", 7, metrics) == "checkpoint_best_mpck_e007_mpck0.7012_pck0.8123_valloss0.1234"
    assert ckpt.is_export_of("checkpoint_best_pck_e089_pck0.8123_valloss0.1234", "val_pck")
    assert not ckpt.is_export_of("checkpoint_best_pck_e089_pck0.8123_valloss0.1234", "val_loss")
    assert not ckpt.is_export_of("checkpoint_best_pck_x_e001_pck_x0.1_pck0.1_valloss0.1", "val_pck")
    assert ckpt.position_from_name("checkpoint_e003_lr1e-4_bs2_acc4_qpe2_s000500") == (3, 500)
    assert ckpt.position_from_name("checkpoint_e003_lr1e-4_bs2_acc4_qpe2") > (3, 500)
    assert ckpt.position_from_name("checkpoint_best_pck_e089_pck0.8123_valloss0.1234") is None
    # a redone position keeps its place: a mid-epoch redo is not an epoch end
    assert ckpt.position_from_name("checkpoint_e002_lr1e-4_bs2_acc4_qpe2_s000002_redo") == (2, 2)
    assert ckpt.position_from_name("checkpoint_e002_lr1e-4_bs2_acc4_qpe2_redo_redo") == \
        ckpt.position_from_name("checkpoint_e002_lr1e-4_bs2_acc4_qpe2")


def test_model_that_does_not_fit_gives_clear_error():
    small = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)).state_dict()
    wide = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Linear(16, 2), torch.nn.ReLU()).state_dict()
    ckpt.check_model_shapes(small, small, "ck")
    with pytest.raises(ckpt.CheckpointError, match=r"does not fit this model \(3 shape mismatches.*0\.weight: checkpoint \(8, 4\) vs model \(16, 4\)"):
        ckpt.check_model_shapes(small, wide, "ck")


# ----------------------------------------------------------------------------- writing
def test_files_are_hashed_as_they_are_written_not_read_back(tmp_path, monkeypatch):
    def read_back(path):
        raise AssertionError(f"{path} was read back to hash it")

    model = torch.nn.Linear(300, 300).state_dict()  # 360 KB: large chunks take the overlapped path
    optimizer = {"state": {0: {"exp_avg": torch.randn(300, 300), "step": torch.tensor(3.0)}}, "param_groups": []}
    ranks = {rank: ckpt.serialize({"rng_state": torch.get_rng_state(), "loss_sum": 0.5 * rank}) for rank in range(2)}
    monkeypatch.setattr(ckpt, "_sha256", read_back)
    path = ckpt.write_checkpoint(tmp_path / "ck", model=model, optimizer=optimizer, scheduler={"last_epoch": 4},
                                 state={"epoch": 1}, rank_states=ranks)
    monkeypatch.undo()
    manifest = json.loads((path / "manifest.json").read_text())
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    assert sorted(manifest["files"]) == [f for f in files if f != "manifest.json"]
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    assert ckpt.verify_checkpoint(path) == []
    loaded = ckpt.load_checkpoint(path)
    assert all(torch.equal(loaded.model[k], v) for k, v in model.items())
    assert torch.equal(loaded.optimizer["state"][0]["exp_avg"], optimizer["state"][0]["exp_avg"])
    assert loaded.scheduler == {"last_epoch": 4} and sorted(loaded.rank_states) == [0, 1]
    assert loaded.rank_states[1]["loss_sum"] == 0.5


def test_the_writer_copies_every_chunk_but_the_tensors_own_bytes(tmp_path):
    """Chunks are hashed and written after write() returns: a tensor's own memory is handed on as
    it is, and anything else (a buffer torch.save may reuse at once) is copied first."""
    tensor = torch.arange(1 << 16, dtype=torch.float32)  # 256 KB
    memory = ckpt._TensorMemory({"model": {"w": tensor}, "optimizer": [torch.zeros(3)]})
    own = memoryview(tensor.numpy()).cast("B")
    assert memory.holds(own) and memory.holds(own[4096:]) and not memory.holds(memoryview(bytearray(1 << 17)))
    reused = bytearray(b"a" * (1 << 17))
    out = ckpt._HashingFile(tmp_path / "file", memory)
    out.write(reused)
    reused[:] = b"b" * (1 << 17)  # what torch.save may do with its buffer once write() returns
    out.write(own)
    out.write(b"tail")
    entry = out.close(durable=False)
    expected = b"a" * (1 << 17) + own.tobytes() + b"tail"
    assert (tmp_path / "file").read_bytes() == expected
    assert entry == {"size": len(expected), "sha256": hashlib.sha256(expected).hexdigest()}


def test_a_write_failing_in_the_writer_thread_stops_the_checkpoint_with_its_error(tmp_path, monkeypatch):
    class FullDisk(io.FileIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "open", lambda path, mode: FullDisk(path, "w"), raising=False)
    model = torch.nn.Linear(300, 300).state_dict()
    with pytest.raises(OSError, match="No space left on device"):
        ckpt.write_checkpoint(tmp_path / "ck", model=model, optimizer={"state": {}, "param_groups": []},
                              scheduler={}, state={"epoch": 1}, rank_states={0: b"rng"})
    assert not (tmp_path / "ck" / ckpt.MANIFEST).exists()


def test_a_checkpoint_is_never_written_over_other_files(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "old.pt").write_bytes(b"x")
    with pytest.raises(ckpt.CheckpointError, match=r"ck: it is not empty .* write into a new directory"):
        ckpt.write_checkpoint(tmp_path / "ck", model={}, optimizer={}, scheduler={}, state={}, rank_states={0: b"x"})
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["old.pt"]


# ----------------------------------------------------------------------------- what a manifest may list
def _relist(path, change) -> None:
    """Edit the manifest's file entries in place (what an altered or foreign manifest looks like)."""
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest["files"])
    (path / "manifest.json").write_text(json.dumps(manifest))


def _entry(file) -> dict:
    return {"size": file.stat().st_size, "sha256": ckpt._sha256(file)}


@pytest.mark.parametrize("name, reason", [
    ("{outside}", "an absolute path"),
    ("../outside.bin", "a '..' part"),
    ("rng/../../outside.bin", "a '..' part"),
    ("./model.pt", "an empty or '.' part"),
    ("rng//rank_00000.pt", "an empty or '.' part"),
    ("rng\\rank_00000.pt", "a backslash"),
])
def test_manifest_entries_must_be_relative_paths_inside_the_checkpoint(tmp_path, monkeypatch, name, reason):
    path = write_checkpoint(tmp_path / "run", NAME, make_config(tmp_path))
    outside = tmp_path / "run" / "outside.bin"  # what '../outside.bin' reaches from the checkpoint
    outside.write_bytes(b"not part of the checkpoint")
    name = name.format(outside=outside)
    if "\\" in name:
        shutil.copy(path / "rng" / "rank_00000.pt", path / name)  # a real file of that name, listed
    listed = outside if "outside" in name else path / name
    _relist(path, lambda files: files.update({name: _entry(listed)}))  # the right size and hash
    hashed = []
    sha256 = ckpt._sha256
    monkeypatch.setattr(ckpt, "_sha256", lambda p: hashed.append(os.path.realpath(p)) or sha256(p))
    problems = ckpt.verify_checkpoint(path)
    assert any(f"lists {name!r}, which is not a relative path inside the checkpoint ({reason}" in p
               for p in problems), problems
    assert str(outside) not in hashed  # nothing outside the checkpoint is read
    with pytest.raises(ckpt.CheckpointError, match="does not verify"):
        ckpt.load_checkpoint(path)


@pytest.mark.parametrize("stray", ["rng/rank_00001.pt", "notes.txt", "extra/model.pt"])
def test_files_the_manifest_does_not_list_are_refused_and_never_loaded(tmp_path, stray):
    path = write_checkpoint(tmp_path, NAME, make_config(tmp_path), ranks=1)
    (path / stray).parent.mkdir(exist_ok=True)
    shutil.copy(path / "rng" / "rank_00000.pt", path / stray)  # a valid rank file, unlisted
    assert f"{path / stray} is not listed in {path / 'manifest.json'}" in "\n".join(ckpt.verify_checkpoint(path))
    for verified in (False, True):
        with pytest.raises(ckpt.CheckpointError, match="is not listed"):
            ckpt.load_checkpoint(path, verified=verified)


def test_the_manifest_while_written_and_nfs_leftovers_are_not_strays(tmp_path):
    path = write_checkpoint(tmp_path, NAME, make_config(tmp_path))
    (path / "manifest.json.tmp").write_text("{")  # a rewrite cut short
    (path / ".nfs000000000123").write_bytes(b"x")  # NFS's name for a file deleted while open
    assert ckpt.verify_checkpoint(path) == []


def test_a_listed_file_that_is_a_link_is_refused(tmp_path):
    path = write_checkpoint(tmp_path / "run", NAME, make_config(tmp_path))
    outside = tmp_path / "elsewhere.pt"
    shutil.move(path / "model.pt", outside)
    (path / "model.pt").symlink_to(outside)  # same bytes, but outside the checkpoint
    assert f"{path / 'model.pt'} is not a regular file" in "\n".join(ckpt.verify_checkpoint(path))


@pytest.mark.parametrize("change, message", [
    (lambda files: files["model.pt"].pop("sha256"), "no valid size and SHA-256 for 'model.pt'"),
    (lambda files: files["model.pt"].update(size=-1), "no valid size and SHA-256 for 'model.pt'"),
    (lambda files: files.update({"": {"size": 0, "sha256": "0" * 64}}), "lists '', which is not a relative path"),
])
def test_a_malformed_manifest_entry_is_a_problem_not_a_crash(tmp_path, change, message):
    path = write_checkpoint(tmp_path, NAME, make_config(tmp_path))
    _relist(path, change)
    assert message in "\n".join(ckpt.verify_checkpoint(path))


# ----------------------------------------------------------------------------- loading what was just verified
def test_a_directory_just_verified_loads_without_hashing_again(tmp_path, monkeypatch):
    path = write_checkpoint(tmp_path, NAME, make_config(tmp_path), ranks=2)
    assert ckpt.verify_checkpoint(path) == []
    hashed = []
    sha256 = ckpt._sha256
    monkeypatch.setattr(ckpt, "_sha256", lambda p: hashed.append(p) or sha256(p))
    loaded = ckpt.load_checkpoint(path, verified=True)
    assert hashed == [] and sorted(loaded.rank_states) == [0, 1]
    assert ckpt.verify_checkpoint(path, hashes=False) == [] and hashed == []
    ckpt.load_checkpoint(path)  # the default still hashes every file
    assert len(hashed) == 6
    # what needs no hashing is still checked: the list and the sizes
    (path / "optimizer.pt").write_bytes((path / "optimizer.pt").read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match=r"optimizer.pt has 100 bytes"):
        ckpt.load_checkpoint(path, verified=True)
