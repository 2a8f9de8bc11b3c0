"""What Ray Train and checkpointing cost, measured side by side in one run.

Prints four figures for the default config (1 worker, built-in data):
  1. steady-state steps/s of the Ray job vs the same optimizer step in a plain loop (goal >= 0.95x);
  2. share of training time spent checkpointing at the default cadence (goal <= 2%);
  3. checkpoint write speed vs a raw torch.save of the same tensors (goal >= 0.8x);
  4. worker SIGKILL -> first optimizer step after Ray's restart, in seconds, and steps of work lost;
and what the run history costs per report on an object store (no Ray needed; `--only history`):
  5. bytes read and written, and time, at report 10 and report 1,000 of a 1,000-report run, for
     the history (metrics.jsonl) and TensorBoard, the old layout (one file, read and rewritten per
     report; the event file uploaded whole) beside the new one (segments; rolled event files).
     The object store is in memory and counts every byte through pyarrow (it cannot append, like S3).

    python bench/ray_overhead.py [--epochs 2] [--checkpoint_every_steps N] [--only history]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pyarrow as pa  # noqa: E402
import pyarrow.fs as pafs  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from ray import cloudpickle  # noqa: E402
from ray.train import RunConfig  # noqa: E402

from cape_ray import checkpoint as ckpt, engine, history, rng, timeline, trackers  # noqa: E402
from cape_ray.config import TrainConfig  # noqa: E402
from cape_ray.data.episodes import TrainingBatches  # noqa: E402
from cape_ray.data.loading import load_split  # noqa: E402
from cape_ray.job import build_trainer  # noqa: E402
from cape_ray.model import build_model  # noqa: E402
from cape_ray.state import TrainState  # noqa: E402


def plain_loop_steps_per_second(config: TrainConfig, steps: int, warmup: int = 5) -> float:
    """The worker's own batches and optimizer step (engine.train_step), in this process, without Ray."""
    torch.set_num_threads(config.num_threads)
    split = load_split(config, "train", config.num_queries_per_episode)
    batches = TrainingBatches(split, config, 0, 1, torch.device("cpu"))
    rng.seed_everything(config.seed)
    model = build_model(config)
    optimizer = engine.build_optimizer(model, config)
    scheduler = engine.build_scheduler(optimizer, config, config.steps_per_epoch * config.epochs)
    model.train()
    per_epoch, episodes_per_step = config.steps_per_epoch, config.batch_size * config.accumulation_steps
    elapsed = 0.0
    for i in range(warmup + steps):
        start = time.perf_counter()
        engine.train_step(model, optimizer, scheduler, batches.step(i // per_epoch, (i % per_epoch) * episodes_per_step),
                          config.grad_clip)
        if i >= warmup:
            elapsed += time.perf_counter() - start
    return steps / elapsed


def checkpoint_write_ratio(config: TrainConfig, repeats: int = 7) -> tuple[float, float, int]:
    """(checkpoint MB/s, raw torch.save MB/s, checkpoint bytes) for the real model + optimizer."""
    model = build_model(config)
    optimizer = engine.build_optimizer(model, config)
    scheduler = engine.build_scheduler(optimizer, config, 100)
    model(*_dummy_inputs(config)).sum().backward()
    optimizer.step()  # materialise the Adam moments
    rank_blob = ckpt.serialize({**rng.capture(), "loss_sum": 0.0, "loss_count": 0})
    state = TrainState.fresh(config, 1).state_dict()
    raw_times, checkpoint_times = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            start = time.perf_counter()
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict()}, Path(tmp, f"raw{i}.pt"))
            raw_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            ckpt.write_checkpoint(Path(tmp, f"ck{i}"), model=model.state_dict(), optimizer=optimizer.state_dict(),
                                  scheduler=scheduler.state_dict(), state=state, rank_states={0: rank_blob})
            checkpoint_times.append(time.perf_counter() - start)
        raw_bytes = Path(tmp, "raw0.pt").stat().st_size
        checkpoint_bytes = sum(p.stat().st_size for p in Path(tmp, "ck0").rglob("*") if p.is_file())
    return (checkpoint_bytes / statistics.median(checkpoint_times) / 1e6,
            raw_bytes / statistics.median(raw_times) / 1e6, checkpoint_bytes)


def _dummy_inputs(config: TrainConfig):
    s, k, q = config.image_size, 6, 1
    return (torch.rand(1, config.num_shots, 3, s, s), torch.rand(1, config.num_shots, k, 2),
            torch.ones(1, config.num_shots, k, dtype=torch.bool), torch.rand(1, q, 3, s, s),
            torch.ones(1, k, dtype=torch.bool), torch.zeros(1, k, k))


def kill_once_then_train(loop_config: dict) -> None:
    """Train; on the first attempt, SIGKILL this worker after `kill_after_steps` optimizer steps."""
    loop_config = dict(loop_config)
    plan = loop_config.pop("_kill_plan")
    from cape_ray import worker as worker_module

    step_fn = engine.train_step
    first_attempt = not os.path.exists(plan["marker"])
    steps_done = 0

    def timed_step(*args, **kwargs):
        nonlocal steps_done
        result = step_fn(*args, **kwargs)
        steps_done += 1
        if first_attempt and steps_done == plan["kill_after_steps"]:
            Path(plan["marker"]).write_text(json.dumps({"killed_at": time.time()}))
            os.kill(os.getpid(), signal.SIGKILL)
        if not first_attempt and steps_done == 1:
            Path(plan["restart"]).write_text(json.dumps({"first_step_at": time.time()}))
        return result

    engine.train_step = timed_step
    if not first_attempt:
        restored = ray.train.get_checkpoint()  # read now: retention may delete it later
        with restored.as_directory() as local:
            global_step = ckpt.read_state(local)["position"]["global_step"]
        Path(plan["restored"]).write_text(json.dumps({"name": restored.path.rstrip("/").rsplit("/", 1)[-1],
                                                      "global_step": global_step}))
    worker_module.train_loop_per_worker(loop_config)


def bare_job(loop_config: dict) -> None:
    """The smallest Ray Train job that restarts like cape-ray: 1 worker, a linear model, a checkpoint
    every `every` steps of `step_s` seconds; SIGKILLed once after `kill_after_steps` steps. What
    Ray itself costs from a kill to the first step after the restart."""
    plan = loop_config["_kill_plan"]
    first_attempt = not os.path.exists(plan["marker"])
    model = torch.nn.Linear(16, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    start = 0
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as local:
            saved = torch.load(os.path.join(local, "state.pt"), weights_only=True)
        model.load_state_dict(saved["model"])
        start = int(saved["step"])
    for step in range(start, loop_config["steps"]):
        loss = model(torch.randn(8, 16)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        time.sleep(loop_config["step_s"])
        if not first_attempt and step == start:
            Path(plan["restart"]).write_text(json.dumps({"first_step_at": time.time()}))
        if first_attempt and step + 1 == plan["kill_after_steps"]:
            Path(plan["marker"]).write_text(json.dumps({"killed_at": time.time()}))
            os.kill(os.getpid(), signal.SIGKILL)
        if (step + 1) % loop_config["every"] == 0:
            with tempfile.TemporaryDirectory() as local:
                torch.save({"model": model.state_dict(), "step": step + 1}, os.path.join(local, "state.pt"))
                ray.train.report({"step": step + 1}, checkpoint=ray.train.Checkpoint.from_directory(local))


def restart_seconds(work: Path, name: str, train_fn, loop_config: dict, trainer_config: TrainConfig) -> float:
    """Kill -> first step after Ray's restart, for `train_fn` run by a trainer built from `trainer_config`."""
    plan = {key: str(work / f"{name}_{key}.json") for key in ("marker", "restart", "restored")}
    plan["kill_after_steps"] = loop_config.pop("_kill_after_steps")
    build_trainer(trainer_config.replace(name=name), train_fn, {**loop_config, "_kill_plan": plan}).fit()
    killed_at = json.loads(Path(plan["marker"]).read_text())["killed_at"]
    return json.loads(Path(plan["restart"]).read_text())["first_step_at"] - killed_at


# ----------------------------------------------------------------------------- the history's cost
class CountingStore(pafs.FileSystemHandler):
    """An in-memory object store (no append, like S3) that counts the bytes each path prefix moves."""

    def __init__(self) -> None:
        self.inner = pafs._MockFileSystem()
        self.read: dict[str, int] = {}
        self.written: dict[str, int] = {}

    @staticmethod
    def kind(path: str) -> str:
        return "tensorboard" if f"/{trackers.TENSORBOARD_DIR}/" in path else "history"

    def _count(self, table: dict, path: str, size: int) -> None:
        table[self.kind(path)] = table.get(self.kind(path), 0) + size

    def get_type_name(self) -> str:
        return "counting"

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        return self.inner.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.inner.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.inner.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.inner.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.inner.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.inner.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path):
        self.inner.delete_file(path)

    def move(self, src, dest):
        self.inner.move(src, dest)

    def copy_file(self, src, dest):
        self.inner.copy_file(src, dest)

    def open_input_stream(self, path):
        with self.inner.open_input_stream(path) as stream:
            data = stream.read()
        self._count(self.read, path, len(data))
        return pa.BufferReader(data)

    def open_input_file(self, path):
        return self.open_input_stream(path)

    def open_output_stream(self, path, metadata):
        store = self

        class Upload(io.BytesIO):  # one PUT of the whole object when closed
            def close(self) -> None:
                if not self.closed:
                    with store.inner.open_output_stream(path) as out:
                        out.write(self.getvalue())
                    store._count(store.written, path, len(self.getvalue()))
                super().close()

        return pa.PythonFile(Upload(), mode="w")

    def open_append_stream(self, path, metadata):
        raise NotImplementedError("object stores cannot append")


class RewriteWriter(history.HistoryWriter):
    """The old object-store layout: metrics.jsonl read whole and written back with each report."""

    def write(self, records: list[dict]) -> None:
        path = f"{self.run_dir}/{history.METRICS_FILE}"
        self.fs.create_dir(self.run_dir, recursive=True)
        existing = history._read_bytes(self.fs, path)
        data = "".join(json.dumps(history._json_value(r)) + "\n" for r in records).encode()
        with self.fs.open_output_stream(path) as stream:
            stream.write(existing + data)


class OldHistory(history.RunHistory):
    writer_class = RewriteWriter


def _report(index: int, steps_per_epoch: int = 10) -> dict:
    """A report as the worker makes it: a validated epoch end every `steps_per_epoch` reports."""
    validated = index % steps_per_epoch == 0
    metrics = {"epoch": index // steps_per_epoch + 1, "step": index % steps_per_epoch or steps_per_epoch,
               "global_step": index, "validated": int(validated), "reason": "scheduled", "lr": 1e-3 / index,
               "train_loss": 1.0 / index, "retention_score": -1.0}
    if validated:
        metrics.update({"val_loss": 0.5, "val_pck": 0.4, "mpck": 0.3, "is_best_pck": 1, "is_best_loss": 0,
                        **{f"pck@{t:.2f}": t for t in (0.05, 0.1, 0.15, 0.2, 0.25)}, "best_val_pck": 0.4,
                        "best_val_loss": 0.5, "val_pck_selected": 0.4, "epochs_without_improvement": 0,
                        "early_stopped": 0, "epoch_time_s": 61.2, "train_time_total_s": 600.0 + index,
                        "checkpoint_time_total_s": 3.0 + index / 100})
    return metrics


def _timed(writer_class: type) -> type:
    """`writer_class` that also records how long each history write takes."""

    class Timed(writer_class):
        seconds: list[float] = []

        def write(self, records: list[dict]) -> None:
            started = time.perf_counter()
            super().write(records)
            Timed.seconds.append(time.perf_counter() - started)

    return Timed


def history_cost(reports: int = 1000, at: tuple[int, ...] = (10, 1000)) -> list[dict]:
    """Per layout and report in `at`: bytes read / written by that report (history, TensorBoard)
    and the median seconds of the history write and of the whole report over the 10 reports up to
    it; then what reading the whole history back costs."""
    rows = []
    for layout, callback_class, roll in (("old", OldHistory, None), ("new", history.RunHistory, trackers.ROLL_REPORTS)):
        store = CountingStore()
        fs = pafs.PyFileSystem(store)
        context = SimpleNamespace(run_config=RunConfig(name="bench", storage_path="bucket/runs", storage_filesystem=fs))
        writer = _timed(callback_class.writer_class)
        timed_class = type(f"Timed{callback_class.__name__}", (callback_class,), {"writer_class": writer})
        callback = timed_class(trackers=[trackers.TensorBoardTracker(roll_reports=roll)])
        seconds = []
        for index in range(1, reports + 1):
            read, written = dict(store.read), dict(store.written)
            metrics = _report(index)
            suffix = "" if metrics["validated"] else f"_s{metrics['step']:06d}"
            checkpoint = SimpleNamespace(path=f"bucket/runs/bench/checkpoint_e{metrics['epoch']:03d}_x{suffix}")
            started = time.perf_counter()
            callback.after_report(context, [metrics], checkpoint)
            seconds.append(time.perf_counter() - started)
            if index in at:
                rows.append({"layout": layout, "report": index, "seconds": statistics.median(seconds[-10:]),
                             "history_seconds": statistics.median(writer.seconds[-10:]),
                             **{f"{kind}_{what}": table.get(kind, 0) - before.get(kind, 0)
                                for what, table, before in (("read", store.read, read), ("written", store.written, written))
                                for kind in ("history", "tensorboard")}})
        callback.trackers.guards[0].tracker.close()
        before = store.read.get("history", 0)
        records = history.read_records(fs, "bucket/runs/bench")
        assert sum(r["event"] == "report" for r in records) == reports
        rows.append({"layout": layout, "report": "read back", "history_read": store.read["history"] - before,
                     "objects": len(history.segment_paths(fs, "bucket/runs/bench")) or 1,
                     "total_history_seconds": sum(writer.seconds), "total_seconds": sum(seconds)})
    return rows


def print_history_cost(rows: list[dict]) -> None:
    if not rows:
        return
    print()
    print("run history on an object store (in memory, counting bytes), per report:")
    print(f"{'layout':7s} {'report':>7s} {'history read':>13s} {'history written':>16s} {'TensorBoard written':>20s} "
          f"{'history ms':>11s} {'report ms':>10s}")
    for row in rows:
        if row["report"] != "read back":
            print(f"{row['layout']:7s} {row['report']:>7} {row['history_read']:>13,d} {row['history_written']:>16,d} "
                  f"{row['tensorboard_written']:>20,d} {1000 * row['history_seconds']:>11.3f} "
                  f"{1000 * row['seconds']:>10.2f}")
    for row in rows:
        if row["report"] == "read back":
            print(f"{row['layout']:7s} all reports: history writes {row['total_history_seconds']:.2f} s, reports "
                  f"{row['total_seconds']:.2f} s; read_history: {row['history_read']:,d} bytes in "
                  f"{row['objects']} object(s)")
    print("(report ms includes TensorBoard's local writes and flushes; on S3 every byte above also crosses the "
          "network)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--checkpoint_every_steps", type=int, default=None,
                        help="default: the config default")
    parser.add_argument("--only", choices=["history", "restart"], default=None,
                        help="history: only the run history's cost per report (no Ray, seconds); restart: only "
                             "kill -> first step, cape-ray beside a bare Ray Train job")
    parser.add_argument("--reports", type=int, default=1000, help="reports of the history benchmark")
    args = parser.parse_args()
    history_rows = history_cost(args.reports, (10, args.reports)) if args.only != "restart" else []
    if args.only == "history":
        print_history_cost(history_rows)
        return
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")  # Ray's default poll interval
    work = Path(tempfile.mkdtemp(prefix="cape_ray_bench_"))
    changes = {"epochs": args.epochs, "storage_path": str(work), "num_workers": "1", "max_failures": 1}
    if args.checkpoint_every_steps is not None:
        changes["checkpoint_every_steps"] = args.checkpoint_every_steps
    config = TrainConfig(**changes)
    print(f"config: {config.steps_per_epoch} steps/epoch x {config.epochs} epochs, batch {config.batch_size}, "
          f"checkpoint every {config.checkpoint_every_steps or 'epoch only'} steps, {config.num_threads} thread(s)")

    os.environ[timeline.ENV] = str(work / "timeline.jsonl")  # before Ray starts: its workers inherit it
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        if args.only != "restart":
            # 1 + 2: the Ray job, timed inside the worker with the same timer as the plain loop.
            result = build_trainer(config.replace(name="overhead")).fit()
            metrics = result.metrics
            ray_train_s, ray_ckpt_s = metrics["train_time_total_s"], metrics["checkpoint_time_total_s"]
            ray_steps = metrics["global_step"]
            # The last epoch-end report is not in its own totals: count the ones before it only.
            ray_rate = ray_steps / (ray_train_s + ray_ckpt_s)
            plain_rate = plain_loop_steps_per_second(config, steps=min(ray_steps, 150))

            # 3: checkpoint writes vs raw torch.save
            ck_mbs, raw_mbs, ck_bytes = checkpoint_write_ratio(config)
        else:
            ray_train_s, ray_steps = 0.3, 1  # the bare job's step time: cape-ray's default step on 2 cores

        # 4: kill -> restart, cape-ray's job (with its start-up timeline) and a bare Ray Train job
        cloudpickle.register_pickle_by_value(__import__(__name__))
        timeline_file = work / "timeline.jsonl"
        kill_after = config.steps_per_epoch + max(1, config.steps_per_epoch // 2)  # mid-epoch 2
        kill_config = config.replace(epochs=2)
        cape_restart = restart_seconds(work, "kill", kill_once_then_train,
                                       {**kill_config.to_dict(), "_kill_after_steps": kill_after}, kill_config)
        restored = json.loads((work / "kill_restored.json").read_text())
        restored_name, steps_lost = restored["name"], kill_after - restored["global_step"]
        marks = [json.loads(line) for line in timeline_file.read_text().splitlines()][-1]["marks"]
        killed_at = json.loads((work / "kill_marker.json").read_text())["killed_at"]
        step_s = ray_train_s / max(1, ray_steps)  # the bare job's steps last as long as cape-ray's
        bare_restart = restart_seconds(work, "bare", bare_job, {"steps": 2 * kill_after, "step_s": step_s,
                                                                "every": max(1, config.checkpoint_every_steps or 10),
                                                                "_kill_after_steps": kill_after}, kill_config)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'measure':58s} {'value':>14s}  goal")
    if args.only != "restart":  # --only restart measures the restarts alone
        print(f"{'Ray job (1 worker) steps/s incl. checkpoint stalls':58s} {ray_rate:14.2f}")
        print(f"{'plain loop steps/s (same train_step, no Ray)':58s} {plain_rate:14.2f}")
        print(f"{'  ratio Ray / plain':58s} {ray_rate / plain_rate:13.3f}x  >= 0.95x")
        print(f"{'share of training time spent checkpointing':58s} "
              f"{100 * ray_ckpt_s / (ray_train_s + ray_ckpt_s):13.2f}%  <= 2%")
        print(f"{'checkpoint write MB/s (manifest + SHA-256 included)':58s} {ck_mbs:14.1f}")
        print(f"{'raw torch.save MB/s (same tensors)':58s} {raw_mbs:14.1f}")
        print(f"{'  ratio checkpoint / raw':58s} {ck_mbs / raw_mbs:13.3f}x  >= 0.8x")
        print(f"{'checkpoint size (bytes)':58s} {ck_bytes:14d}")
    print(f"{'worker SIGKILL -> first step after restart (s): cape-ray':58s} {cape_restart:14.1f}")
    print(f"{'  the same for a bare Ray Train job (1 worker, linear model)':58s} {bare_restart:14.1f}")
    print(f"{'  ratio cape-ray / bare':58s} {cape_restart / bare_restart:13.2f}x  <= 1.2x")
    previous = killed_at
    for mark, at in marks.items():
        label = {"process": "Ray: failure seen, workers restarted (kill -> process start)"}.get(mark, f"  -> {mark}")
        print(f"{'    ' + label:58s} {at - previous:14.2f}")
        previous = at
    print(f"{'steps of work lost (resumed from ' + restored_name[:24] + '...)':58s} {steps_lost:14d}")
    print_history_cost(history_rows)


if __name__ == "__main__":
    main()
