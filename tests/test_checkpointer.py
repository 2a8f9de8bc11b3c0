"""The Checkpointer's decisions, without Ray and without training: which checkpoint a start
continues from, what it restores on which rank, what it removes and what it exports."""

from __future__ import annotations

import random
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np

import pyarrow.fs as pafs
import pytest
import torch

from cape_ray import checkpoint as ckpt, engine, identity, rng, storage
from cape_ray.checkpointer import (Layout, Checkpointer, Export, plan_layout, resolve_resume, retention_score,
                                   retention_slots, sync_exports)
from cape_ray.model import build_model
from cape_ray.state import TrainState
from tiny import make_config, write_checkpoint

E1, E2, E3 = (f"checkpoint_e00{e}_lr3e-3_bs2_acc2_qpe2" for e in (1, 2, 3))
E2_S1 = E2 + "_s000001"


def checkpointer(run_dir: Path, config, *, latest=None, registered=(), rank=0, world_size=1, reports=None,
                 others_failed=False, chosen=None):
    """A Checkpointer of one rank. `chosen` (a dict shared by the ranks of one test) plays the
    broadcast: rank 0 puts its choice there, the other ranks take it."""
    chosen = {} if chosen is None else chosen

    def broadcast(value):
        if rank == 0:
            chosen["value"] = value
        return chosen["value"]

    def report(metrics, stored, name):
        if reports is not None:
            reports.append((name, stored))

    def all_reduce(values):  # the other ranks contribute 1 per key when they failed
        return {k: v + (world_size - 1) * float(others_failed) for k, v in values.items()}

    return Checkpointer(config, fs=pafs.LocalFileSystem(), run_dir=str(run_dir),
                        latest=None if latest is None else str(run_dir / latest), registered=registered, rank=rank,
                        world_size=world_size, report=report, gather=lambda blob: {0: blob}, all_reduce=all_reduce,
                        broadcast=broadcast)


def damage(path: Path) -> None:
    target = path / "model.pt"
    target.write_bytes(target.read_bytes()[:-64])


def test_a_damaged_latest_falls_back_to_the_newest_valid_checkpoint_before_it(tmp_path):
    config = make_config(tmp_path)
    for name in (E1, E2_S1, E2, E3):
        write_checkpoint(tmp_path, name, config)
    damage(tmp_path / E3)
    damage(tmp_path / E2)
    restored = checkpointer(tmp_path, config, latest=E3, registered={E1, E2_S1, E2, E3}).restore()
    assert (restored.name, restored.fell_back_from, restored.source) == (E2_S1, E3, "ray")
    # the redone epoch-end reports a name Ray has not registered: the damaged one stays registered
    again = checkpointer(tmp_path, config, registered={E1, E2_S1, E2, E3})
    assert again.unique_name(E3) == E3 + "_redo" and again.unique_name(E3 + "_s000001") == E3 + "_s000001"


def test_no_valid_checkpoint_left_refuses_to_start_from_scratch(tmp_path):
    config = make_config(tmp_path)
    write_checkpoint(tmp_path, E1, config)
    damage(tmp_path / E1)
    with pytest.raises(ckpt.CheckpointError, match="refusing to start from scratch"):
        checkpointer(tmp_path, config, latest=E1, registered={E1}).restore()


def test_the_runs_own_latest_takes_precedence_over_resume(tmp_path):
    config = make_config(tmp_path, resume=str(tmp_path / "elsewhere"))
    write_checkpoint(tmp_path, E1, config)
    restored = checkpointer(tmp_path, config, latest=E1, registered={E1}).restore()
    assert restored.name == E1 and restored.resume_ignored == str(tmp_path / "elsewhere")


def test_resume_takes_a_checkpoint_or_a_run_directory_and_refuses_anything_else(tmp_path):
    config = make_config(tmp_path)
    run_dir = tmp_path / "old_run"
    for name in (E1, E2_S1, E2):
        write_checkpoint(run_dir, name, config)
    write_checkpoint(run_dir, "checkpoint_best_pck_e009_pck0.9000_valloss0.1000", config)  # never a candidate
    assert resolve_resume(str(run_dir / E1))[1] == str(run_dir / E1)
    assert resolve_resume(str(run_dir))[1] == str(run_dir / E2)  # its newest valid checkpoint
    damage(run_dir / E2)
    assert resolve_resume(str(run_dir))[1] == str(run_dir / E2_S1)
    with pytest.raises(ckpt.CheckpointError, match="does not verify"):
        resolve_resume(str(run_dir / E2))
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint or run directory"):
        resolve_resume(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="neither a checkpoint"):
        resolve_resume(str(tmp_path / "empty"))


def test_each_rank_restores_its_own_generators_and_running_loss(tmp_path):
    config = make_config(tmp_path, num_workers="2")
    states = {}
    for rank in range(2):
        rng.seed_everything(100 + rank)
        states[rank] = {**rng.capture(), "loss_sum": 1.5 + rank, "loss_count": 3 + rank}
    write_checkpoint(tmp_path, E2_S1, config, ranks=2, rank_states=states)
    chosen = {}
    for rank in range(2):
        rng.seed_everything(7)
        node = checkpointer(tmp_path, config, latest=E2_S1 if rank == 0 else None, registered={E2_S1}, rank=rank,
                            world_size=2, chosen=chosen)
        restored = node.restore()
        model = build_model(config)
        optimizer = engine.build_optimizer(model, config)
        scheduler = engine.build_scheduler(optimizer, config, 10)
        resumed = node.load_into(restored, TrainState.fresh(config, 2), model, optimizer, scheduler)
        assert (resumed.loss_sum, resumed.loss_count) == (1.5 + rank, 3 + rank)
        assert torch.equal(torch.get_rng_state(), states[rank]["rng_state"])
        assert np.random.get_state()[1].tolist() == list(states[rank]["np_rng_state"][1])
        assert random.getstate() == states[rank]["py_rng_state"]


def test_another_world_size_keeps_the_batch_or_says_why_not(tmp_path):
    config = make_config(tmp_path, batch_size=2, accumulation_steps=2)
    saved = {"world_size": 2, "position": {"episodes_per_step": 8}}
    assert plan_layout(config, 2, saved) == Layout(2, 8, None)
    one = plan_layout(config, 1, saved)
    assert one.accumulation_steps == 4 and one.episodes_per_step == 8 and "keeps the run's 8 episodes per step" in one.note
    three = plan_layout(config, 3, saved)  # 8 episodes cannot be split into 3 ranks x batch 2
    assert three.accumulation_steps == 1 and "cannot be kept" in three.note and "now 6" in three.note


def test_the_layout_in_force_survives_every_later_start(tmp_path):
    """2 -> 1 worker keeps 8 episodes per step with accumulation 4; the checkpoints written at 1
    worker say 8 episodes per step, so the next restart at 1 worker, and a rerun with the flags'
    accumulation 2, still train 8 per step (they went back to 4 per step, silently, before)."""
    config = make_config(tmp_path, batch_size=2, accumulation_steps=2)
    after_resize = {"world_size": 1, "position": {"episodes_per_step": 8}}  # written after 2 -> 1
    layout = plan_layout(config, 1, after_resize)
    assert (layout.accumulation_steps, layout.episodes_per_step) == (4, 8)
    assert "accumulation_steps 4 (the flag says 2) keeps the run's 8 episodes per step" in layout.note
    # only a forced change of the batch flags makes them the layout again
    forced = identity.Comparison(math=[identity.Difference("accumulation_steps", 4, 2)])
    assert plan_layout(config, 1, after_resize, forced) == Layout(2, 4, None)


def test_orphans_past_the_restore_point_are_removed_earlier_ones_reported(tmp_path):
    config = make_config(tmp_path)
    for name in (E1, E2_S1, E2, E3):
        write_checkpoint(tmp_path, name, config)
    node = checkpointer(tmp_path, config, registered={E1, E2})
    removed, reported = node.clean_orphans(ckpt.position_from_name(E2))
    assert removed == [E3] and reported == [E2_S1]
    assert not (tmp_path / E3).exists() and (tmp_path / E2_S1).exists()
    assert node.clean_orphans(None) == ([], [E2_S1])  # a fresh start deletes nothing


def test_old_exports_are_deleted_only_once_the_new_one_is_complete(tmp_path):
    config = make_config(tmp_path)
    write_checkpoint(tmp_path, E1, config)
    write_checkpoint(tmp_path, E2, config)
    old = "checkpoint_best_pck_e001_pck0.2000_valloss0.9000"
    wanted = "checkpoint_best_pck_e002_pck0.3000_valloss0.8000"
    shutil.copytree(tmp_path / E1, tmp_path / old)
    shutil.copytree(tmp_path / E2, tmp_path / wanted)
    (tmp_path / wanted / "manifest.json").unlink()  # an export cut short by a crash
    loss_export = "checkpoint_best_loss_e001_valloss0.9000_pck0.2000"
    shutil.copytree(tmp_path / E1, tmp_path / loss_export)

    # an export without its manifest is not complete: it is made again, and only then the old one goes
    deleted = []
    real_delete = storage.delete_dir

    def delete(fs, path):
        if path.endswith(old):  # the moment the old export goes, the new one is complete
            assert ckpt.verify_checkpoint(tmp_path / wanted) == []
        deleted.append(path.rsplit("/", 1)[-1])
        real_delete(fs, path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(storage, "delete_dir", delete)
        written, problems = sync_exports(pafs.LocalFileSystem(), str(tmp_path), [Export("val_pck", wanted, E2)])
    assert written == [wanted] and problems == [] and old in deleted and not (tmp_path / old).exists()
    assert (tmp_path / loss_export).exists()  # another metric's export is left alone

    # at a start every export is verified: a damaged one is made again
    (tmp_path / wanted / "model.pt").write_bytes(b"damaged")
    written, problems = sync_exports(pafs.LocalFileSystem(), str(tmp_path), [Export("val_pck", wanted, E2)],
                                     verify_existing=True)
    assert written == [wanted] and problems == [] and ckpt.verify_checkpoint(tmp_path / wanted) == []

    # an export whose checkpoint is gone cannot be made: the existing one stays, and it is said
    written, problems = sync_exports(pafs.LocalFileSystem(), str(tmp_path),
                                     [Export("val_pck", "checkpoint_best_pck_e003_pck0.4_valloss0.7", E3)])
    assert written == [] and "cannot be made" in problems[0] and (tmp_path / wanted).exists()


def test_retention_keeps_validated_bests_every_nth_epoch_and_never_unvalidated(tmp_path):
    config = make_config(tmp_path, epochs=300, keep=2, keep_every=50)
    assert retention_slots(config) == 2 + 6
    assert retention_slots(config.replace(keep=0)) is None  # keep every checkpoint
    assert retention_slots(config.replace(keep_every=0)) == 2
    assert retention_score(config, 100, True, 0.5) > retention_score(config, 99, True, 0.99) > \
        retention_score(config, 99, False, 0.99)
    assert retention_score(config, 99, True, 0.7) == 0.7


def test_save_reports_on_every_rank_but_writes_only_on_rank_zero(tmp_path):
    config = make_config(tmp_path)
    reports = []
    other = checkpointer(tmp_path, config, rank=1, world_size=2, reports=reports)
    model = build_model(config)
    optimizer = engine.build_optimizer(model, config)
    scheduler = engine.build_scheduler(optimizer, config, 10)
    other.save(E1, TrainState.fresh(config, 2), model, optimizer, scheduler, {"loss_sum": 0.0, "loss_count": 0}, {})
    assert reports == []  # like rank 0, it reports once the store is agreed: at the next poll or flush
    other.flush()
    assert reports == [(E1, None)] and not (tmp_path / E1).exists()


def saving(tmp_path, storage_retries: int = 5, **options):
    config = make_config(tmp_path, storage_retries=storage_retries)
    model = build_model(config)
    optimizer = engine.build_optimizer(model, config)
    scheduler = engine.build_scheduler(optimizer, config, 10)
    node = checkpointer(tmp_path / "run", config, **options)
    state = TrainState.fresh(config, options.get("world_size", 1))
    return node, lambda: node.save(E1, state, model, optimizer, scheduler, {"loss_sum": 0.0, "loss_count": 0}, {},
                                   wait=True)


def test_a_full_storage_stops_the_save_with_the_path_and_the_bytes_needed(tmp_path, monkeypatch):
    from cape_ray import storage

    reports = []
    _, save = saving(tmp_path, reports=reports)
    monkeypatch.setattr(storage, "free_bytes", lambda fs, path: 1000)
    with pytest.raises(ckpt.StorageError) as failure:
        save()
    message = str(failure.value)
    assert f"not enough space to store checkpoint {tmp_path / 'run' / E1}: needs " in message
    assert re.search(r"needs \d+ bytes \(the checkpoint\), 1000 bytes free", message)
    assert "rerun the same command" in message
    assert reports == [] and not (tmp_path / "run" / E1).exists()  # nothing reported, nothing half-written


def test_a_refused_upload_stops_the_save_and_leaves_nothing(tmp_path, monkeypatch):
    from cape_ray import storage

    upload = storage.upload_checkpoint

    def denied(local_dir, fs, path):
        upload(local_dir, fs, path)  # part of it lands, then the store refuses
        raise PermissionError(13, "AccessDenied: quota exceeded")

    monkeypatch.setattr(storage, "upload_checkpoint", denied)
    reports = []
    _, save = saving(tmp_path, reports=reports)
    with pytest.raises(ckpt.StorageError, match=r"cannot store checkpoint .*AccessDenied: quota exceeded.*rerun"):
        save()
    assert reports == [] and not (tmp_path / "run" / E1).exists()


def test_every_rank_stops_when_rank_zero_cannot_store(tmp_path):
    reports = []
    _, save = saving(tmp_path, rank=1, world_size=2, reports=reports, others_failed=True)
    with pytest.raises(ckpt.StorageError, match="rank 0 could not store checkpoint"):
        save()
    assert reports == []  # no rank enters Ray's report barrier alone


def test_a_store_that_fails_for_a_while_is_retried_and_lands_whole(tmp_path, monkeypatch, caplog):
    """A fault-injecting storage: the first two uploads fail (an S3 503, an NFS EIO), the third
    works. The checkpoint lands, verifies and is reported once; the retries are said."""
    upload, calls = storage.upload_checkpoint, []

    def flaky(local_dir, fs, path):
        calls.append(path)
        if len(calls) <= 2:
            upload(local_dir, fs, path)  # part of it may land before the error
            raise OSError(5, "Input/output error" if len(calls) == 1 else "AWS Error SERVICE_UNAVAILABLE (503)")
        upload(local_dir, fs, path)

    monkeypatch.setattr(storage, "upload_checkpoint", flaky)
    reports = []
    _, save = saving(tmp_path, reports=reports)
    save()
    assert len(calls) == 3 and [name for name, _ in reports] == [E1]
    assert ckpt.verify_checkpoint(tmp_path / "run" / E1) == []
    assert "retrying in" in caplog.text and "stored on attempt 3" in caplog.text


def test_a_store_that_keeps_failing_is_given_up_after_its_retries(tmp_path, monkeypatch):
    calls = []

    def broken(local_dir, fs, path):
        calls.append(path)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(storage, "upload_checkpoint", broken)
    reports = []
    _, save = saving(tmp_path, reports=reports, storage_retries=3)
    with pytest.raises(ckpt.StorageError, match="Input/output error"):
        save()
    assert len(calls) == 4 and reports == []  # the first try and 3 retries; then Ray's restart budget decides


def test_ranks_restore_what_rank_zero_chose_and_a_rank_that_cannot_read_it_fails_the_attempt(tmp_path, monkeypatch):
    """Rank 0 chooses the latest; rank 1 reads the same one. A transient read error on rank 1 does
    not make it fall back to an older checkpoint on its own (the ranks would diverge): it fails the
    attempt, and Ray starts it again."""
    config = make_config(tmp_path, num_workers="2")
    write_checkpoint(tmp_path, E1, config, ranks=2)
    write_checkpoint(tmp_path, E2, config, ranks=2)
    chosen = {}
    zero = checkpointer(tmp_path, config, latest=E2, registered={E1, E2}, rank=0, world_size=2, chosen=chosen)
    assert zero.restore().name == E2
    verify = ckpt.verify_checkpoint
    monkeypatch.setattr(ckpt, "verify_checkpoint", lambda d: ["model.pt cannot be read: I/O error"] or verify(d))
    one = checkpointer(tmp_path, config, latest=E2, registered={E1, E2}, rank=1, world_size=2, chosen=chosen)
    with pytest.raises(ckpt.CheckpointError, match=f"rank 1: checkpoint {E2}, chosen by rank 0, does not verify here"):
        one.restore()


# ------------------------------------------------------------------------ the background writer
def test_training_pays_only_for_the_snapshot_and_the_report_follows_the_store(tmp_path, monkeypatch):
    """The store blocks until the test lets it go: save() has returned long before, the checkpoint is
    not on storage and not reported yet; once stored, the next poll reports it. The snapshot is a
    copy: changing the weights after save() does not change what is stored."""
    release, upload = threading.Event(), storage.upload_checkpoint
    monkeypatch.setattr(storage, "upload_checkpoint", lambda *a: (release.wait(30), upload(*a)))
    reports = []
    node, _ = saving(tmp_path, reports=reports)
    config = make_config(tmp_path)
    model = build_model(config)
    optimizer = engine.build_optimizer(model, config)
    scheduler = engine.build_scheduler(optimizer, config, 10)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    node.save(E1, TrainState.fresh(config, 1), model, optimizer, scheduler, {"loss_sum": 0.0, "loss_count": 0}, {})
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)  # training goes on while the writer works
    node.poll()
    assert reports == [] and not (tmp_path / "run" / E1 / ckpt.MANIFEST).exists()  # still in flight
    release.set()
    node._pending.future.result(timeout=60)
    node.poll()
    assert [name for name, _ in reports] == [E1]
    stored = ckpt.load_checkpoint(tmp_path / "run" / E1).model
    assert all(torch.equal(stored[k], expected[k]) for k in expected)


def test_each_background_checkpoint_copies_into_the_previous_ones_copy(tmp_path):
    """From the second checkpoint on, the snapshot is copied into the first one's tensors (no 1 GB
    allocation at ViT-B size), and each stored checkpoint still holds the weights of its own step."""
    node, _ = saving(tmp_path)
    config = make_config(tmp_path)
    model = build_model(config)
    optimizer = engine.build_optimizer(model, config)
    scheduler = engine.build_scheduler(optimizer, config, 10)
    expected, storages = [], []
    for name in (E1, E2):
        expected.append({k: v.clone() for k, v in model.state_dict().items()})
        node.save(name, TrainState.fresh(config, 1), model, optimizer, scheduler, {"loss_sum": 0.0, "loss_count": 0},
                  {})
        storages.append({k: v.data_ptr() for k, v in node._spare["model"].items()})
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(1.0)  # the next step, while the writer works
    node.finish()
    assert storages[0] == storages[1] and node._spare is None  # reused, and let go at the end
    for name, weights in zip((E1, E2), expected):
        stored = ckpt.load_checkpoint(tmp_path / "run" / name).model
        assert all(torch.equal(stored[k], weights[k]) for k in weights), name


def test_a_snapshot_reuses_only_tensors_of_the_same_shape_dtype_and_strides():
    from cape_ray.checkpointer import snapshot

    earlier = {"a": torch.zeros(4, 3), "b": torch.zeros(3), "c": torch.zeros(3, 4).t(), "d": [torch.zeros(2)]}
    state = {"a": torch.randn(4, 3), "b": torch.randn(4), "c": torch.randn(3, 4),
             "d": [torch.randn(2, dtype=torch.float64)], "e": torch.randn(2)}
    copy = snapshot(state, earlier)
    assert copy["a"].data_ptr() == earlier["a"].data_ptr()  # the one that fits
    assert all(copy[k].data_ptr() != earlier[k].data_ptr() for k in "bc") and copy["d"][0].dtype == torch.float64
    for key in "abce":
        assert torch.equal(copy[key], state[key]) and copy[key].data_ptr() != state[key].data_ptr()
    taken = snapshot(state, copy_cpu=False)  # a synchronous write takes CPU tensors as they are
    assert taken["a"].data_ptr() == state["a"].data_ptr()


def test_at_most_one_checkpoint_is_in_flight_and_training_overlaps_it(tmp_path, monkeypatch):
    from cape_ray.worker import train_loop_per_worker
    from local_edge import LocalEdge

    from cape_ray.checkpointer import Checkpointer

    active, seen = [0], {"most": 0, "steps_during_stores": 0}
    write_and_store, train_step = Checkpointer._write_and_store, engine.train_step

    def slow_store(self, *args):
        active[0] += 1
        seen["most"] = max(seen["most"], active[0])
        time.sleep(0.3)
        try:
            return write_and_store(self, *args)
        finally:
            active[0] -= 1

    def counted_step(*args, **kwargs):
        seen["steps_during_stores"] += active[0] > 0
        return train_step(*args, **kwargs)

    monkeypatch.setattr(Checkpointer, "_write_and_store", slow_store)
    monkeypatch.setattr(engine, "train_step", counted_step)
    config = make_config(tmp_path, "overlap", epochs=1, checkpoint_every_steps=2)
    edge = LocalEdge(tmp_path / "overlap", quiet=True)
    train_loop_per_worker(config.to_dict(), edge)
    assert seen["most"] == 1 and seen["steps_during_stores"] > 0
    names = [name for name, _ in edge.reports]
    assert len(names) == 2 and names == sorted(names, key=ckpt.position_from_name)  # in order
    assert all(ckpt.verify_checkpoint(tmp_path / "overlap" / name) == [] for name, _ in edge.reports)


def test_a_background_store_failure_is_raised_on_every_rank_like_a_synchronous_one(tmp_path, monkeypatch):
    def broken(local_dir, fs, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage, "upload_checkpoint", broken)
    reports = []
    node, _ = saving(tmp_path, reports=reports, storage_retries=1)
    config = make_config(tmp_path)
    model = build_model(config)
    optimizer = engine.build_optimizer(model, config)
    node.save(E1, TrainState.fresh(config, 1), model, optimizer, engine.build_scheduler(optimizer, config, 10),
              {"loss_sum": 0.0, "loss_count": 0}, {})  # returns: the failure is the writer's
    with pytest.raises(ckpt.StorageError, match="No space left on device"):
        node.flush()
    assert reports == [] and not (tmp_path / "run" / E1).exists()


def test_sync_checkpoints_store_on_the_training_thread(tmp_path, monkeypatch):
    threads, upload = [], storage.upload_checkpoint
    monkeypatch.setattr(storage, "upload_checkpoint", lambda *a: (threads.append(threading.current_thread()),
                                                                  upload(*a)))
    reports = []
    config = make_config(tmp_path, sync_checkpoints=True)
    node = checkpointer(tmp_path / "run", config, reports=reports)
    model = build_model(config)
    optimizer = engine.build_optimizer(model, config)
    node.save(E1, TrainState.fresh(config, 1), model, optimizer, engine.build_scheduler(optimizer, config, 10),
              {"loss_sum": 0.0, "loss_count": 0}, {})
    assert threads == [threading.main_thread()] and [name for name, _ in reports] == [E1]
