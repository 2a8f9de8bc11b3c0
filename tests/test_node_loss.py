"""A whole node lost mid-epoch, on one machine: a head and two worker nodes on loopback.

Each node is its own `ray start --address ...` (tests/loopback.py); storage is a shared temp dir.
Two training workers, one per worker node. A spot node's loss takes its raylet, object store and
every worker on it at once, so the tests stop and kill every process of that node together
(SIGSTOP, then SIGKILL). The autoscaler's part, a replacement node, is played by the test.

- A node killed without notice: the run restarts (counted against --max_failures) and finishes.
- A node drained for preemption (`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`): the
  workers write a just-in-time checkpoint, the restart is not counted (the run has
  --max_failures 0) and starts from that checkpoint.

Both check the lineage that produced the final checkpoint: every episode of every epoch trained
exactly once (episodes after a restore point are legitimately redone by the next attempt), the
best-checkpoint bookkeeping, and that every checkpoint directory left in storage verifies and is
one retention keeps (no orphan). The driver is `python tests/node_loss_driver.py` (cape-ray train
with a logging, slowed train function), attached through RAY_ADDRESS like a cluster driver.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import pytest

from cape_ray import checkpoint as ckpt
from cape_ray.cli import build_parser, config_from_args
from loopback import LoopbackCluster, Node
from test_cluster import TINY_FLAGS

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
EPOCHS, EPISODES, PER_STEP = 3, 128, 8  # 2 workers x batch 2 x accumulation 2: 16 steps per epoch
FLAGS = [*TINY_FLAGS, "--num_workers", "2", "--epochs", str(EPOCHS), "--episodes_per_epoch", str(EPISODES),
         "--progress", "lines"]
STEP_DELAY_S = 0.2  # per micro-batch: about half a second per step


def config_of(flags: list[str]):
    parser = build_parser()
    return config_from_args(parser.parse_args(["train", *flags]), parser)


class Run:
    def __init__(self, cluster: LoopbackCluster, tmp_path: Path, name: str, flags: list[str]):
        self.cluster, self.name = cluster, name
        self.storage = tmp_path / "runs"
        self.run_dir = self.storage / name
        self.log_dir = tmp_path / "episodes"
        self.log_dir.mkdir()
        self.flags = [*flags, "--name", name, "--storage_path", str(self.storage)]
        self.config = config_of(self.flags)
        self.output = tmp_path / "driver.log"
        env = {**cluster.env, "RAY_ADDRESS": cluster.gcs, "HOME": str(tmp_path)}
        with open(self.output, "w") as out:
            self.driver = subprocess.Popen(
                [sys.executable, str(REPO / "tests" / "node_loss_driver.py"), str(self.log_dir), str(STEP_DELAY_S),
                 *self.flags], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)

    def tail(self) -> str:
        return self.output.read_text()[-6000:]

    def wait_for(self, condition: Callable[[], object], what: str, timeout: float = 300) -> object:
        deadline = time.time() + timeout
        while True:
            value = condition()
            if value:
                return value
            assert self.driver.poll() is None, f"the driver ended while waiting for {what}:\n{self.tail()}"
            assert time.time() < deadline, f"timed out waiting for {what}:\n{self.tail()}"
            time.sleep(0.2)

    def attempts(self) -> list[dict]:
        """Every worker-group attempt: its ranks' start records and the episodes they trained."""
        found: dict[str, dict] = {}
        for path in sorted(self.log_dir.glob("*_rank*.log")):
            lines = path.read_text().splitlines()
            if not lines:
                continue
            start = json.loads(lines[0])
            attempt = found.setdefault(start["start"], {"id": start["start"], "ranks": {}, "episodes": []})
            attempt["ranks"][start["rank"]] = start
            for line in lines[1:]:
                parts = line.split()
                if len(parts) == 3:  # a line being written is skipped until complete
                    attempt["episodes"].append((int(parts[0]), int(parts[1]), float(parts[2])))
        for attempt in found.values():
            first = next(iter(attempt["ranks"].values()))
            attempt.update(t=min(r["t"] for r in attempt["ranks"].values()), world=first["world"],
                           restored=first["restored"], restored_at=tuple(first["restored_at"]))
        return sorted(found.values(), key=lambda a: a["t"])

    def training_past(self, epoch: int, index: int) -> bool:
        attempts = self.attempts()
        return bool(attempts) and any((e, i) >= (epoch, index) for e, i, _ in attempts[-1]["episodes"])

    def node_of_rank(self, rank: int, nodes: list[Node]) -> Node:
        (attempt,) = self.attempts()
        (node,) = [n for n in nodes if n.node_id == attempt["ranks"][rank]["node"]]
        return node

    def finish(self, timeout: float = 600) -> str:
        try:
            code = self.driver.wait(timeout=timeout)
        finally:
            if self.driver.poll() is None:
                self.driver.kill()
                self.driver.wait()
        assert code == 0, self.tail()
        return self.output.read_text()


def check_lineage(attempts: list[dict]) -> dict:
    """The attempts form one lineage: each restarts from a checkpoint at or before where the one
    before it got to, and the episodes that count (from an attempt's restore point up to the next
    attempt's) cover every (epoch, index) of the run exactly once. Returns what was redone."""
    assert attempts[0]["restored"] == "-" and attempts[0]["restored_at"] == (0, 0)
    counted: Counter = Counter()
    redone = 0
    for attempt, following in zip(attempts, attempts[1:] + [None]):
        assert len(attempt["ranks"]) == attempt["world"], f"attempt {attempt['id']}: ranks {sorted(attempt['ranks'])}"
        end = following["restored_at"] if following else (EPOCHS, 0)
        trained = [(e, i) for e, i, _ in attempt["episodes"]]
        assert all(key >= attempt["restored_at"] for key in trained), "trained before its own restore point"
        kept = [key for key in trained if key < end]
        redone += len(trained) - len(kept)
        counted.update(kept)
        if following:
            assert following["restored_at"] >= attempt["restored_at"]
    expected = Counter((e, i) for e in range(EPOCHS) for i in range(EPISODES))
    missing, twice = expected - counted, counted - expected
    assert not missing and not twice, f"missing {sorted(missing)[:10]}..., trained twice {sorted(twice)[:10]}..."
    return {"redone_episodes": redone, "redone_steps": redone / PER_STEP}


def check_storage(run: Run) -> None:
    """Every checkpoint directory verifies, and storage holds exactly what retention keeps: the top
    --keep by val_pck, the latest and the two best exports, which are the right ones."""
    config, run_dir = run.config, run.run_dir
    final = ckpt.load_checkpoint(run_dir / ckpt.checkpoint_name(config, EPOCHS))
    history = final.state["history"]
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    assert final.state["position"]["global_step"] == EPOCHS * EPISODES // PER_STEP
    assert final.state["best_pck"] == max(h["val_pck"] for h in history)
    assert final.state["best_val_loss"] == min(h["val_loss"] for h in history)

    by_score = sorted(history, key=lambda h: (h["retention_score"], h["epoch"]))
    top = {ckpt.checkpoint_name(config, h["epoch"]) for h in by_score[-config.keep:]}
    latest = {ckpt.checkpoint_name(config, EPOCHS)}
    best_pck = max(history, key=lambda h: (h["val_pck"], -h["epoch"]))
    best_loss = min(history, key=lambda h: (h["val_loss"], h["epoch"]))
    exports = {ckpt.best_export_name("val_pck", best_pck["epoch"], best_pck),
               ckpt.best_export_name("val_loss", best_loss["epoch"], best_loss)}
    on_disk = {p.name for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_")}
    for name in on_disk:
        assert ckpt.verify_checkpoint(run_dir / name) == [], f"{name} does not verify"
    assert on_disk == top | latest | exports, f"orphans or losses: {sorted(on_disk ^ (top | latest | exports))}"
    assert json.loads((run_dir / "driver_lease.json").read_text())["released"]  # released, its count kept


@pytest.fixture
def cluster():
    # The Train preemption watcher polls every 0.5 s instead of 5 s: test speed only.
    cluster = LoopbackCluster(head_cpus=0, extra_env={"RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5"})
    try:
        yield cluster
    finally:
        cluster.close()


def test_a_worker_node_killed_mid_epoch(cluster, tmp_path):
    started = time.time()
    nodes = [cluster.add_worker("node-a"), cluster.add_worker("node-b")]
    run = Run(cluster, tmp_path, "nodeloss", [*FLAGS, "--checkpoint_every_steps", "4", "--max_failures", "1"])
    # Mid-epoch 2, after its mid-epoch checkpoints at steps 4 and 8.
    run.wait_for(lambda: run.training_past(1, 9 * PER_STEP), "training in the middle of epoch 2")
    victim = run.node_of_rank(0, nodes)  # rank 0 writes the checkpoints: the harder loss
    killed_at = time.time()
    killed = victim.kill()
    replacement = cluster.add_worker("node-c")  # what the autoscaler does
    replaced_at = time.time()
    output = run.finish()
    total = time.time() - started

    assert len(killed) >= 4  # ray start, raylet, agents, the training worker
    info = cluster.node_info(victim)
    assert not info["alive"] and info["death_reason"] == "UNEXPECTED_TERMINATION", info
    attempts = run.attempts()
    assert len(attempts) == 2, [(a["id"], a["restored"]) for a in attempts]
    before, after = attempts
    assert after["world"] == 2 and after["restored"].startswith("checkpoint_e002_")
    assert {r["node"] for r in after["ranks"].values()} == {n.node_id for n in nodes if n is not victim} | {
        replacement.node_id}
    assert "RESUMING FROM CHECKPOINT" in output and f"Checkpoint: {after['restored']}  [" in output
    # three nodes share this machine's log files, yet every line of the run is printed once, and
    # Ray's own per-report lines not at all (no --verbose)
    for epoch in range(1, EPOCHS + 1):
        assert len(re.findall(rf"^epoch +{epoch}/{EPOCHS} ", output, flags=re.M)) == 1, output[-4000:]
    assert output.count("RESUMING FROM CHECKPOINT") == 1
    assert "Reporting training result" not in output and "PreemptionWatcher" not in output
    lineage = check_lineage(attempts)
    check_storage(run)

    first_step_after = min(t for _, _, t in after["episodes"])
    report = {"test": "node SIGKILL", "kill_to_first_episode_s": round(first_step_after - killed_at, 1),
              "replacement_registered_after_s": round(replaced_at - killed_at, 1),
              "kill_to_restarted_group_s": round(after["t"] - killed_at, 1), "restored": after["restored"],
              **lineage, "test_seconds": round(total, 1)}
    print("NODE LOSS FIGURES", json.dumps(report))
    assert lineage["redone_steps"] >= 1  # the kill landed mid-work: something was lost and redone


def test_a_worker_node_drained_for_preemption(cluster, tmp_path):
    started = time.time()
    nodes = [cluster.add_worker("node-a"), cluster.add_worker("node-b")]
    run = Run(cluster, tmp_path, "preempted", [*FLAGS, "--checkpoint_every_steps", "0", "--preemption_check_steps", "1",
                                               "--max_failures", "0"])
    run.wait_for(lambda: run.training_past(1, 2 * PER_STEP), "training in epoch 2")
    victim = run.node_of_rank(1, nodes)
    deadline_s = 6
    drained_at = time.time()
    drain = cluster.ray("drain-node", "--address", cluster.gcs, "--node-id", victim.node_id,
                        "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim (test)",
                        "--deadline-remaining-seconds", str(deadline_s))
    assert drain.returncode == 0, drain.stdout + drain.stderr

    def just_in_time():
        for path in run.run_dir.glob("checkpoint_e*_s*"):
            if (path / "manifest.json").exists():
                state = ckpt.read_state(path)
                if state["metrics"].get("reason") == "preemption":
                    return path.name, state
        return None

    jit_name, jit_state = run.wait_for(just_in_time, "the just-in-time checkpoint", timeout=60)
    jit_at = time.time()
    # The reclaim itself, after the drain deadline (spot_watch.sh drains with a margin before it).
    time.sleep(max(0.0, drained_at + deadline_s + 4 - time.time()))
    victim.kill()
    replacement = cluster.add_worker("node-c")
    output = run.finish()
    total = time.time() - started

    assert jit_state["metrics"]["retention_score"] == -1.0 and jit_state["position"]["step"] > 0
    assert ckpt.verify_checkpoint(run.run_dir / jit_name) == [] or not (run.run_dir / jit_name).exists()
    assert "preemption notice for ranks [1]" in output
    info = cluster.node_info(victim)
    assert not info["alive"] and info["death_reason"] == "AUTOSCALER_DRAIN_PREEMPTED", info
    attempts = run.attempts()
    assert len(attempts) == 2, [(a["id"], a["restored"]) for a in attempts]
    before, after = attempts
    # --max_failures 0, yet it restarted and finished: the preemption was not counted as a failure.
    jit_position = (jit_state["position"]["epoch"], jit_state["position"]["episode"])
    assert after["restored_at"] >= jit_position, (after["restored"], jit_name)
    assert replacement.node_id in {r["node"] for r in after["ranks"].values()}
    lineage = check_lineage(attempts)
    check_storage(run)

    first_step_after = min(t for _, _, t in after["episodes"])
    report = {"test": "preemption drain", "drain_to_jit_checkpoint_s": round(jit_at - drained_at, 1),
              "jit_checkpoint": jit_name, "restored": after["restored"],
              "drain_deadline_to_first_episode_s": round(first_step_after - (drained_at + deadline_s), 1),
              **lineage, "test_seconds": round(total, 1)}
    print("NODE LOSS FIGURES", json.dumps(report))
