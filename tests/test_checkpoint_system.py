"""Checkpoint system tests: the four suites of the original pipeline, on cape-ray's real code path.

    pytest tests/test_checkpoint_system.py -v
    .venv/bin/python tests/test_checkpoint_system.py          (standalone: a line per check)

Every test trains the real loop (cape_ray.worker.train_loop_per_worker) in this process, with
tests/local_edge.py standing in for Ray: checkpoints are written by the real writer and runs resume
through the real restore. Where a test needs particular validation results (a loss that improves
while PCK does not, a best from long ago), the validation numbers are scripted; training, tracking,
checkpoints and exports are not.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # standalone: local_edge, tiny
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # and cape_ray

from cape_ray import checkpoint as ckpt, engine, rng  # noqa: E402
from cape_ray.original_format import ORIGINAL_KEYS, save_pth  # noqa: E402
from cape_ray.worker import train_loop_per_worker  # noqa: E402
from local_edge import Crash, LocalEdge  # noqa: E402
from tiny import make_config  # noqa: E402

RULE = "=" * 80


def check(condition: bool, message: str) -> None:
    assert condition, message
    print(f"✓ {message}")


@contextlib.contextmanager
def scripted_validation(values: list[tuple[float, float]]):
    """Validation reports these (val_loss, val_pck) pairs, one per validated epoch, in order."""
    summarize, calls = engine.summarize, iter(values)

    def scripted(sums):
        metrics = summarize(sums)
        loss, pck = next(calls)
        return {**metrics, "val_loss": loss, "val_pck": pck, "pck@0.20": pck}

    engine.summarize = scripted
    try:
        yield
    finally:
        engine.summarize = summarize


def train(root: Path, name: str, crash_after=None, edge=None, **changes) -> LocalEdge:
    # each checkpoint reported as soon as it is written, as the original pipeline saved them: a crash
    # after the N-th report then comes before the next epoch's validation (scripted below)
    config = make_config(root, name, **{"sync_checkpoints": True, **changes})
    edge = edge or LocalEdge(root / name, crash_after=crash_after, quiet=True)
    try:
        train_loop_per_worker(config.to_dict(), edge)
    except Crash:
        pass
    return edge


def exports(run_dir: Path, kind: str) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith(f"checkpoint_best_{kind}_"))


def test_checkpoint_contains_expected_fields():
    with tempfile.TemporaryDirectory() as tmp:
        edge = train(Path(tmp), "fields", epochs=1)
        path = Path(edge.latest)
        check(path.name == "checkpoint_e001_lr3e-3_bs2_acc2_qpe2" and ckpt.verify_checkpoint(path) == [],
              "Checkpoint written and its manifest verifies (every file present, sizes and SHA-256 match)")
        state = ckpt.read_state(path)
        check(state["epoch"] == 1 and state["best_pck"] is not None and state["best_val_loss"] is not None
              and state["epochs_without_improvement"] == 0,
              "state.json: epoch, best_val_loss, best_pck, epochs_without_improvement")
        rank = torch.load(path / "rng" / "rank_00000.pt", weights_only=True)
        check({"rng_state", "cuda_rng_state", "np_rng_state", "py_rng_state"} <= set(rank),
              "rng/rank_00000.pt: rng_state, cuda_rng_state, np_rng_state, py_rng_state")
        save_pth(ckpt.load_checkpoint(path), f"{tmp}/checkpoint_e001.pth")
        original = torch.load(f"{tmp}/checkpoint_e001.pth", weights_only=True)
        check(tuple(original) == ORIGINAL_KEYS and original["val_stats"]["pck"] == state["metrics"]["val_pck"],
              "cape-ray export --pth: the 14 fields, loading with weights_only=True")
        print("✓ All required checkpoint fields present and correct")


def test_resume_restores_full_state():
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train(root, "reference", epochs=2)
        crashed = train(root, "resumed", epochs=2, crash_after=6)  # mid-epoch 2, after its second step
        restore_point = ckpt.load_checkpoint(crashed.latest)
        check(restore_point.state["position"]["step"] == 2, "Crashed in the middle of epoch 2")
        resumed = train(root, "resumed", epochs=2, edge=LocalEdge.after(crashed))
        final, reference = ckpt.load_checkpoint(resumed.latest), ckpt.load_checkpoint(root / "reference" / Path(
            resumed.latest).name)
        check(all(torch.equal(final.model[k], reference.model[k]) for k in final.model)
              and all(torch.equal(v, reference.optimizer["state"][i][k])
                      for i, s in final.optimizer["state"].items() for k, v in s.items())
              and final.scheduler == reference.scheduler,
              "Model, optimizer, and scheduler restored correctly")

        # What the restore applies to this process's generators, then what the resumed run drew.
        random.seed(1), np.random.seed(1), torch.manual_seed(1)
        saved = restore_point.rank_states[0]
        rng.restore(saved)
        check(torch.equal(torch.get_rng_state(), saved["rng_state"]) and random.getstate() == saved["py_rng_state"]
              and np.random.get_state()[2] == saved["np_rng_state"][2],
              "RNG states (torch, NumPy, Python) restored from the checkpoint")
        mine, theirs = final.rank_states[0], reference.rank_states[0]
        check(torch.equal(mine["rng_state"], theirs["rng_state"]) and mine["np_rng_state"] == theirs["np_rng_state"]
              and mine["py_rng_state"] == theirs["py_rng_state"],
              "RNG states restored correctly for reproducibility")
        check(final.state["tracking"] == reference.state["tracking"] and final.state["history"] == reference.state[
            "history"], "Best metrics restored correctly (prevents checkpoint overwrite bug)")


def test_pck_based_best_model_saving():
    with tempfile.TemporaryDirectory() as tmp, \
            scripted_validation([(0.50, 0.50), (0.40, 0.60), (0.30, 0.55)]):
        run_dir = Path(tmp) / "pck"
        train(Path(tmp), "pck", epochs=2, checkpoint_every_steps=0)
        check(exports(run_dir, "pck") == ["checkpoint_best_pck_e002_pck0.6000_valloss0.4000"],
              "Best PCK checkpoint saved correctly when PCK improves")
        train(Path(tmp), "pck", epochs=3, checkpoint_every_steps=0,
              edge=LocalEdge(run_dir, latest=str(run_dir / "checkpoint_e002_lr3e-3_bs2_acc2_qpe2"),
                             registered={"checkpoint_e002_lr3e-3_bs2_acc2_qpe2"}, quiet=True))
        check(exports(run_dir, "loss") == ["checkpoint_best_loss_e003_valloss0.3000_pck0.5500"]
              and exports(run_dir, "pck") == ["checkpoint_best_pck_e002_pck0.6000_valloss0.4000"],
              "Best-loss and best-PCK tracked independently")
        check(ckpt.verify_checkpoint(run_dir / exports(run_dir, "pck")[0]) == [], "Exports are complete checkpoints")


def test_best_checkpoint_not_overwritten_after_resume():
    with tempfile.TemporaryDirectory() as tmp, scripted_validation(
            [(0.30, 0.5), (0.10, 0.6), (0.20, 0.55), (0.20, 0.55), (0.15, 0.58), (0.05, 0.62)]):
        root, run_dir = Path(tmp), Path(tmp) / "best"
        options = dict(checkpoint_every_steps=0, early_stopping_patience=20)
        crashed = train(root, "best", epochs=6, crash_after=4, **options)  # best loss at epoch 2, crash at 4
        check(exports(run_dir, "loss") == ["checkpoint_best_loss_e002_valloss0.1000_pck0.6000"]
              and ckpt.read_state(crashed.latest)["epochs_without_improvement"] == 2,
              "Before the crash: best_val_loss 0.1 at epoch 2, 2 epochs without improvement")
        resumed = LocalEdge.after(crashed, crash_after=1)  # stop after epoch 5
        train(root, "best", epochs=6, edge=resumed, **options)
        state = ckpt.read_state(resumed.latest)
        check(state["best_val_loss"] == 0.1 and exports(run_dir, "loss") == [
            "checkpoint_best_loss_e002_valloss0.1000_pck0.6000"],
              "Best checkpoint preserved after resume (epoch 5's 0.15 is not better than 0.1)")
        train(root, "best", epochs=6, edge=LocalEdge.after(resumed), **options)
        check(exports(run_dir, "loss") == ["checkpoint_best_loss_e006_valloss0.0500_pck0.6200"],
              "Resume allows saving better checkpoints (as expected)")


TESTS = [("Checkpoint Contains Expected Fields", test_checkpoint_contains_expected_fields),
         ("Resume Restores Full State", test_resume_restores_full_state),
         ("PCK-Based Best Model Saving", test_pck_based_best_model_saving),
         ("Best Checkpoint Not Overwritten After Resume", test_best_checkpoint_not_overwritten_after_resume)]


def main() -> int:
    torch.set_num_threads(1)
    print(RULE)
    print("CHECKPOINT SYSTEM TESTS")
    print(RULE)
    for number, (title, test) in enumerate(TESTS, start=1):
        print(f"\n[Test {number}] {title}")
        try:
            test()
        except AssertionError as exc:
            print(f"✗ {exc}\n\n{RULE}\nTEST FAILED: [Test {number}] {title}\n{RULE}")
            return 1
    print(f"\n{RULE}\nALL TESTS PASSED ✓\n{RULE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
