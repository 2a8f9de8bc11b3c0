"""The train function of the node-loss tests: the real loop, logging what it trains, a bit slower.

Every worker-group attempt gets one id (drawn by rank 0, broadcast to the others). Each rank logs
the attempt's start (its node, pid, and the position of the checkpoint it restored, read from that
checkpoint's state.json) and, step by step as they are trained, every (epoch, episode index) with
wall times, and sleeps `step_delay_s` per micro-batch so that an epoch lasts long enough for a node
to be lost in it.
"""

from __future__ import annotations

import json
import os
import time
import uuid

import ray
import ray.train

from cape_ray.worker import train_loop_per_worker


def _attempt_id(world_size: int) -> str:
    attempt = uuid.uuid4().hex[:10]
    if world_size > 1:
        import torch.distributed as dist

        box = [attempt]
        dist.broadcast_object_list(box, src=0)
        attempt = box[0]
    return attempt


def _restored() -> tuple[str, int, int]:
    """(name, epoch, episode) of the checkpoint Ray hands this attempt; ('-', 0, 0) for none."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return "-", 0, 0
    with checkpoint.as_directory() as directory:
        with open(os.path.join(directory, "state.json")) as handle:
            position = json.load(handle)["position"]
    return checkpoint.path.rstrip("/").rsplit("/", 1)[-1], int(position["epoch"]), int(position["episode"])


def train_logged(config: dict) -> None:
    config = dict(config)
    plan = config.pop("_node_plan")
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    attempt = _attempt_id(world_size)
    name, epoch, episode = _restored()
    log_path = os.path.join(plan["log_dir"], f"{attempt}_rank{rank}.log")
    with open(log_path, "a") as log:
        log.write(json.dumps({"start": attempt, "rank": rank, "world": world_size, "pid": os.getpid(),
                              "node": ray.get_runtime_context().get_node_id(), "restored": name,
                              "restored_at": [epoch, episode], "t": time.time()}) + "\n")

    from cape_ray.data.episodes import TrainingBatches

    step = TrainingBatches.step
    delay = float(plan["step_delay_s"])

    def logged(self, epoch, first_episode):
        time.sleep(delay * self.accumulation)  # step_delay_s per micro-batch
        now = time.time()
        with open(log_path, "a") as log:
            log.write("".join(f"{epoch} {int(i)} {now:.3f}\n" for i in self.step_indices(first_episode)))
        return step(self, epoch, first_episode)

    TrainingBatches.step = logged
    train_loop_per_worker(config)
