"""Fault injection for the Ray tests: a train function that kills its own worker process once.

The kill is a real SIGKILL of the Ray worker process at a chosen training micro-batch, guarded by a
marker file so that the restarted worker group runs through. Every start logs the checkpoint Ray
handed to it, so a test can tell where training resumed.
"""

from __future__ import annotations

import os
import signal

import ray.train

from cape_ray import engine
from cape_ray.worker import train_loop_per_worker


def train_with_faults(config: dict) -> None:
    config = dict(config)
    plan = config.pop("_fault_plan")
    context = ray.train.get_context()
    rank = context.get_world_rank()
    restored = ray.train.get_checkpoint()
    with open(plan["log"], "a") as log:
        log.write(f"start rank={rank} checkpoint={restored.path.rsplit('/', 1)[-1] if restored else '-'}\n")

    if rank == plan["rank"] and not os.path.exists(plan["marker"]):
        calls = 0
        compute_loss = engine.compute_loss

        def compute_loss_then_die(model, batch):
            nonlocal calls
            calls += 1
            if calls == plan["kill_at_call"]:
                open(plan["marker"], "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
            return compute_loss(model, batch)

        engine.compute_loss = compute_loss_then_die
    train_loop_per_worker(config)
