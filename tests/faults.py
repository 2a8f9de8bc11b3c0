"""Fault injection for the Ray tests: a train function that kills its own worker process once.

The kill is a real SIGKILL of the Ray worker process at a chosen training micro-batch, guarded by a
marker file so that the restarted worker group runs through. Every start logs the checkpoint Ray
handed to it, so a test can tell where training resumed; with `banner_log` in the plan, every
resume banner is appended to that file too.
"""

from __future__ import annotations

import os
import signal
import sys

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

    if "banner_log" in plan:  # the resume banner goes to the console relay or stdout: keep a copy
        from cape_ray import console

        banner = console.resume_banner

        def logged_banner(*args, **kwargs):
            text = banner(*args, **kwargs)
            with open(plan["banner_log"], "a") as log:
                log.write(f"rank={rank}\n{text}\n")
            return text

        console.resume_banner = logged_banner

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


def train_with_episode_log(config: dict) -> None:
    """Train, appending every (epoch, episode index) this rank trains, step by step, to a log file."""
    config = dict(config)
    log_path = config.pop("_episode_log")
    from cape_ray.data.episodes import TrainingBatches

    step = TrainingBatches.step

    def logged(self, epoch, first_episode):
        with open(log_path, "a") as log:
            log.write("".join(f"{epoch} {int(i)}\n" for i in self.step_indices(first_episode)))
        return step(self, epoch, first_episode)

    TrainingBatches.step = logged
    train_loop_per_worker(config)


def train_with_preemption_notice(config: dict) -> None:
    """Train while Ray reports an imminent preemption from the N-th check on (the boundary the
    loop polls); a real node drain cannot be made on one machine."""
    config = dict(config)
    from_call = config.pop("_notice_from_call")
    from ray.train import PreemptionInfo

    calls = 0

    def notice():
        nonlocal calls
        calls += 1
        if calls < from_call:
            return None
        return PreemptionInfo(deadline_ms=int(1e12), preempted_node_to_ranks={"node-a": [0]})

    ray.train.get_preemption_info = notice
    train_loop_per_worker(config)


def train_and_die_while_storing(config: dict) -> None:
    """Train; while rank 0's background writer uploads the checkpoint named in `_kill_in_store`
    (its first file written, the rest not), SIGKILL the worker process: once, guarded by a marker."""
    config = dict(config)
    plan = config.pop("_kill_in_store")
    from cape_ray import storage

    upload = storage.upload_checkpoint

    def upload_part_then_die(local_dir, fs, path):
        if path.rstrip("/").endswith(plan["checkpoint"]) and not os.path.exists(plan["marker"]):
            fs.create_dir(path, recursive=True)
            with open(os.path.join(local_dir, "model.pt"), "rb") as source, fs.open_output_stream(f"{path}/model.pt") as out:
                out.write(source.read())
            open(plan["marker"], "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        upload(local_dir, fs, path)

    storage.upload_checkpoint = upload_part_then_die
    train_loop_per_worker(config)


def train_and_kill_the_driver_at_a_new_best(config: dict) -> None:
    """Train; at the first report of a new best, after its checkpoint and exports are stored but
    before Ray hears of it, SIGKILL the driver (`_kill`: driver pid and a marker file, once)."""
    config = dict(config)
    plan = config.pop("_kill")
    from cape_ray.worker import RayEdge

    report = RayEdge.report

    def report_or_die(self, metrics, stored, name):
        if stored is not None and any(k.startswith("is_best_") and v for k, v in metrics.items()) \
                and not os.path.exists(plan["marker"]):
            open(plan["marker"], "w").close()
            os.kill(plan["driver_pid"], signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
        report(self, metrics, stored, name)

    RayEdge.report = report_or_die
    train_loop_per_worker(config)


def drive_and_die_at_a_new_best(argv: list[str]) -> None:
    """A driver (`python -c ...`) that the first new best kills: argv = [marker, config JSON]."""
    import json

    from ray import cloudpickle

    from cape_ray import job
    from cape_ray.config import TrainConfig

    marker, config = argv[0], TrainConfig.from_dict(json.loads(argv[1]))
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    job.run(config, train_fn=train_and_kill_the_driver_at_a_new_best,
            train_loop_config={**config.to_dict(), "_kill": {"driver_pid": os.getpid(), "marker": marker}})
