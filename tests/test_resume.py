"""The real training loop, in this process, interrupted and resumed: it must end bitwise identical
to a run that never stopped. No Ray here (tests/local_edge.py plays its part); the slow tests in
test_ray_job.py kill real Ray processes.

Every generator matters in these runs: dropout draws from torch, and the loss is scaled by draws
from python's and numpy's global generators, so a generator that is not restored changes the
weights. The tracked bests include `lr:max`, which only gets worse after the warmup: a tracker that
forgot its best on resume would export a worse checkpoint as the best.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cape_ray import checkpoint as ckpt, engine
from cape_ray.worker import train_loop_per_worker
from local_edge import Crash, LocalEdge
from tiny import make_config

BEST = "val_pck:max,val_loss:min,lr:max"
REPORTS_PER_EPOCH = 4  # 3 mid-epoch checkpoints (every step but the last) + the epoch end


@pytest.fixture(autouse=True)
def global_generators_matter(monkeypatch):
    compute_loss = engine.compute_loss

    def scaled(model, batch):
        loss, coords = compute_loss(model, batch)
        return loss * (1 + 1e-3 * random.random() + 1e-3 * float(np.random.rand())), coords

    monkeypatch.setattr(engine, "compute_loss", scaled)


def config_for(root: Path, name: str, **changes):
    # min_delta 1: no PCK ever counts as an improvement, so the counter of epochs without one runs
    return make_config(root, name, epochs=3, keep=100, best_metrics=BEST, early_stopping_patience=10,
                       early_stopping_min_delta=1.0, **changes)


def run(config, **edge_options) -> LocalEdge:
    edge = LocalEdge(Path(config.storage_path) / config.name, **edge_options)
    train_loop_per_worker(config.to_dict(), edge)
    return edge


def crash_then_resume(config, crash_after: int, **crash_options) -> LocalEdge:
    first = LocalEdge(Path(config.storage_path) / config.name, crash_after=crash_after,
                      **crash_options)
    with pytest.raises(Crash):
        train_loop_per_worker(config.to_dict(), first)
    second = LocalEdge.after(first)
    train_loop_per_worker(config.to_dict(), second)
    return second


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        global_generators_matter.__wrapped__(patch)
        config = config_for(tmp_path_factory.mktemp("reference"), "reference")
        run(config)
    return Path(config.storage_path) / "reference"


def directories(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.is_dir())


def assert_same_checkpoint(a: Path, b: Path) -> None:
    one, two = ckpt.load_checkpoint(a), ckpt.load_checkpoint(b)
    for key in one.model:
        assert torch.equal(one.model[key], two.model[key]), f"{a.name}: model {key}"
    for index, state in one.optimizer["state"].items():
        for key, value in state.items():
            assert torch.equal(value, two.optimizer["state"][index][key]), f"{a.name}: optimizer {index}/{key}"
    assert one.scheduler == two.scheduler
    deterministic = ("position", "tracking", "history", "epoch", "best_val_loss", "best_pck",
                     "epochs_without_improvement")
    for key in deterministic:
        assert one.state[key] == two.state[key], f"{a.name}: state {key}"
    assert one.rank_states.keys() == two.rank_states.keys()
    for rank, mine in one.rank_states.items():
        theirs = two.rank_states[rank]
        assert (mine["loss_sum"], mine["loss_count"]) == (theirs["loss_sum"], theirs["loss_count"]), \
            f"{a.name}: rank {rank} running loss"
        assert torch.equal(mine["rng_state"], theirs["rng_state"]), f"{a.name}: rank {rank} torch RNG"
        assert mine["np_rng_state"] == theirs["np_rng_state"], f"{a.name}: rank {rank} numpy RNG"
        assert mine["py_rng_state"] == theirs["py_rng_state"], f"{a.name}: rank {rank} python RNG"


def assert_same_run(resumed: Path, reference: Path) -> None:
    assert directories(resumed) == directories(reference)  # the same checkpoints and the same exports
    for name in directories(reference):
        assert_same_checkpoint(resumed / name, reference / name)


def test_reference_is_a_run_whose_resume_can_go_wrong(reference):
    """Preconditions of the tests below: running losses mid-epoch, a counter, a best that gets worse."""
    mid = ckpt.load_checkpoint(reference / "checkpoint_e002_lr3e-3_bs2_acc2_qpe2_s000002")
    assert mid.rank_states[0]["loss_count"] == 4 and mid.rank_states[0]["loss_sum"] > 0
    end = ckpt.load_checkpoint(reference / "checkpoint_e002_lr3e-3_bs2_acc2_qpe2")
    assert end.state["epochs_without_improvement"] == 1
    history = ckpt.load_checkpoint(reference / "checkpoint_e003_lr3e-3_bs2_acc2_qpe2").state["history"]
    assert history[2]["lr"] < history[0]["lr"] and history[0]["is_best_lr"] == 1 and history[2]["is_best_lr"] == 0
    exports = [n for n in directories(reference) if n.startswith("checkpoint_best_")]
    assert len(exports) == 3 and any(n.startswith("checkpoint_best_lr_e001_") for n in exports)


@pytest.mark.parametrize("crash_after", [REPORTS_PER_EPOCH + 2, 2 * REPORTS_PER_EPOCH],
                         ids=["mid-epoch-2", "end-of-epoch-2"])
def test_crash_then_resume_is_bitwise_identical(reference, tmp_path, crash_after):
    crash_then_resume(config_for(tmp_path, "resumed"), crash_after)
    assert_same_run(tmp_path / "resumed", reference)


@pytest.mark.parametrize("before_report", [True, False], ids=["before-registration", "after-registration"])
def test_a_crash_around_a_new_best_keeps_the_right_exports(reference, tmp_path, before_report):
    """Epoch 1's checkpoint is a new best by every metric. A crash after it and its exports are
    stored but before Ray registers it: the restart redoes it from the mid-epoch checkpoint and
    exports the same; a crash right after the registration: the restart continues."""
    crash_then_resume(config_for(tmp_path, "window"), REPORTS_PER_EPOCH, crash_before_report=before_report)
    assert_same_run(tmp_path / "window", reference)


def test_exports_missing_at_a_start_are_made_from_the_restored_tracking(reference, tmp_path, capfd):
    """However they went missing (deleted by hand, a crash inside a copy), a start remakes the
    exports its restored tracking names, from their checkpoints."""
    edge = crash_then_resume(config_for(tmp_path, "missing"), 2 * REPORTS_PER_EPOCH)  # stop after epoch 2
    run_dir = tmp_path / "missing"
    for export in run_dir.glob("checkpoint_best_*"):
        shutil.rmtree(export)
    (run_dir / "checkpoint_best_pck_e001_pck0.1000_valloss0.9000").mkdir()  # a copy cut short
    train_loop_per_worker(config_for(tmp_path, "missing").to_dict(), LocalEdge.after(edge))
    assert "was missing (a crash came before it was made): exported now" in capfd.readouterr().out
    assert_same_run(run_dir, reference)


def test_resume_from_a_path_continues_exactly(reference, tmp_path):
    config = config_for(tmp_path, "from_path", resume=str(reference / "checkpoint_e002_lr3e-3_bs2_acc2_qpe2_s000001"))
    run(config)
    assert_same_checkpoint(tmp_path / "from_path" / "checkpoint_e003_lr3e-3_bs2_acc2_qpe2",
                           reference / "checkpoint_e003_lr3e-3_bs2_acc2_qpe2")


def test_a_run_that_stopped_early_trains_nothing_on_rerun(tmp_path, capfd):
    config = make_config(tmp_path, "early", epochs=4, checkpoint_every_steps=0, early_stopping_patience=1,
                         early_stopping_min_delta=1.0)
    edge = run(config)
    history = ckpt.load_checkpoint(edge.latest).state["history"]
    assert [h["epoch"] for h in history] == [1, 2] and history[-1]["early_stopped"] == 1
    before = directories(tmp_path / "early")
    rerun = LocalEdge.after(edge)
    train_loop_per_worker(config.to_dict(), rerun)
    assert rerun.reports == [] and directories(tmp_path / "early") == before
    assert "early stopping already triggered at epoch 2; nothing to train" in capfd.readouterr().out


@pytest.mark.parametrize("crash_point", ["stored-not-exported", "deleting-a-replaced-export"])
def test_a_crash_at_each_step_of_a_new_best_keeps_the_right_exports(reference, tmp_path, monkeypatch, crash_point):
    """The sequence of a new best: the checkpoint stored; its exports made; Ray registers it (the
    two crashes around the registration are above); the exports it replaced deleted once Ray
    committed it. A crash at each step restores a checkpoint whose exports all exist, and the run
    ends as the uninterrupted one, exports included."""
    from cape_ray import checkpointer as checkpointer_module, storage

    crashed = []
    if crash_point == "stored-not-exported":
        sync_exports = checkpointer_module.sync_exports

        def crash_before_exporting(fs, run_dir, exports, **options):
            exports = list(exports)
            if options.get("refresh") and exports and not crashed:
                crashed.append(exports)
                raise Crash("the checkpoint is stored, its exports are not made")
            return sync_exports(fs, run_dir, exports, **options)

        monkeypatch.setattr(checkpointer_module, "sync_exports", crash_before_exporting)
    else:
        delete = storage.delete_dir_quietly

        def crash_while_deleting(fs, path):
            if path.rsplit("/", 1)[-1].startswith("checkpoint_best_") and not crashed:
                crashed.append(path)
                delete(fs, path)  # the first replaced export goes, then the process dies
                raise Crash("deleting the exports a new best replaced")
            return delete(fs, path)

        monkeypatch.setattr(storage, "delete_dir_quietly", crash_while_deleting)
    config = config_for(tmp_path, crash_point)
    first = LocalEdge(tmp_path / crash_point)
    with pytest.raises(Crash):
        train_loop_per_worker(config.to_dict(), first)
    assert crashed
    train_loop_per_worker(config.to_dict(), LocalEdge.after(first))
    assert_same_run(tmp_path / crash_point, reference)


def test_an_export_outlives_the_checkpoint_it_was_made_from(reference, tmp_path):
    """Retention ranks by PCK, so the checkpoint holding the best loss can be deleted; its export is
    a whole checkpoint of its own, complete before that checkpoint was even registered: the run
    (crashed and resumed after that deletion) keeps it and ends with the reference's exports."""
    config = config_for(tmp_path, "evicted")
    first = LocalEdge(tmp_path / "evicted", crash_after=2 * REPORTS_PER_EPOCH + 1)  # epoch 3, after step 1
    with pytest.raises(Crash):
        train_loop_per_worker(config.to_dict(), first)
    run_dir = tmp_path / "evicted"
    best_loss = ckpt.read_state(first.latest)["tracking"]["best"]["val_loss"]
    assert best_loss["checkpoint"] != Path(first.latest).name and (run_dir / best_loss["export"]).is_dir()
    shutil.rmtree(run_dir / best_loss["checkpoint"])  # what Ray's retention may do
    train_loop_per_worker(config.to_dict(), LocalEdge.after(first))
    assert directories(run_dir) == [d for d in directories(reference) if d != best_loss["checkpoint"]]
    for name in directories(run_dir):
        if name.startswith("checkpoint_best_"):
            assert_same_checkpoint(run_dir / name, reference / name)
