"""What a person reads of a run: the project's own lines (rank 0 only), in the original pipeline's words.

- the resume banner: one line per restored item, each marked restored (✓) or not (✗, with why);
- per epoch: one summary line (steps, losses, PCK, lr, speed, ETA, the checkpoint written), then
  either the confirmation of a new best export or the "No improvement" block with the bests;
- start-up notes: orphans removed, best exports repaired, world-size changes, early stop;
- on a terminal, a progress bar of the epoch.

Where the lines go. Ray forwards every worker's output to the driver through a log monitor per
node, with its own prefixes, and by default also its own per-report lines; nodes that share a
machine each forward the same files. So the driver starts a `ConsoleRelay` actor: workers and
controller callbacks send their lines to it, and the driver alone prints them, once each, without
prefixes (`DriverConsole`). Ray's own output reaches the driver only with --verbose. Without a relay
(a train function run outside `cape-ray train`), lines go to the process's real stdout; Ray Train
patches `print` and would show every worker line twice.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any, Callable, Optional, Sequence

from cape_ray import determinism

RELAY_PREFIX = "cape-ray-console:"
PROGRESS_EVERY_S = 0.5  # how often a worker sends the progress bar's state

RULE = "=" * 80


def _stdout_write(text: str) -> None:
    _write_to(sys.__stdout__, text)
    sys.__stdout__.flush()


class ConsoleRelay:
    """A Ray actor (made remote by DriverConsole) holding lines until the driver takes them."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.bar: Optional[str] = None
        self.failure: Optional[str] = None  # why the workers stopped the run, if they did

    def write(self, text: str) -> None:
        self.lines.append(text)

    def fail(self, message: str) -> None:
        self.failure = message

    def progress(self, bar: Optional[str]) -> None:
        self.bar = bar

    def take(self) -> tuple[list[str], Optional[str], Optional[str]]:
        lines, self.lines = self.lines, []
        return lines, self.bar, self.failure


class DriverConsole:
    """`with DriverConsole(run name):` on the driver, around `fit()`: prints every line sent to the
    run's relay, and on a terminal keeps the progress bar on the last line."""

    def __init__(self, run_name: str, stream=None, interval_s: float = 0.2):
        self.name, self.stream, self.interval_s = RELAY_PREFIX + run_name, stream or sys.stdout, interval_s
        self.actor: Any = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._bar: Optional[str] = None
        self._interactive = self.stream.isatty()
        self.failure: Optional[str] = None  # set when the workers stopped the run (StorageError)

    def __enter__(self) -> "DriverConsole":
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # On the driver's own node: a relay on a worker node would go down with that node (a spot
        # reclaim), and every line after it with it. The driver's node lasts as long as the driver.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        relay = ray.remote(num_cpus=0, max_restarts=0)(ConsoleRelay)
        self.actor = relay.options(name=self.name, lifetime="non_detached", scheduling_strategy=here).remote()
        self._thread = threading.Thread(target=self._pump, name="cape-ray-console", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        import ray

        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._print_pending(final=True)
        ray.kill(self.actor)

    def _pump(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._print_pending(final=False)

    def _print_pending(self, final: bool) -> None:
        import ray

        try:
            lines, bar, self.failure = ray.get(self.actor.take.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - a console hiccup must never stop training
            return
        out = self.stream
        if self._bar is not None and (lines or final or bar != self._bar):
            out.write("\r\033[K")  # clear the bar before lines are printed under it
        for text in lines:
            _write_to(out, text)
        self._bar = None if final or not self._interactive else bar
        if self._bar is not None:
            _write_to(out, self._bar, end="")
        out.flush()


def find_relay(run_name: str):
    """The run's ConsoleRelay actor, or None when the driver started none."""
    import ray

    if not ray.is_initialized():  # outside a Ray process: looking the actor up would start Ray
        return None
    try:
        return ray.get_actor(RELAY_PREFIX + run_name)
    except ValueError:
        return None


class RelayLogHandler(logging.Handler):
    """Warnings and errors of the cape_ray logger of this process, sent to the driver's console."""

    def __init__(self, write: Callable[[str], None]):
        super().__init__(logging.WARNING)
        self.write = write

    def emit(self, record: logging.LogRecord) -> None:
        self.write(f"{record.levelname}: {record.getMessage()}\n")


def _write_to(stream, text: str, end: str = "") -> None:
    try:
        stream.write(text + end)
    except UnicodeEncodeError:  # a terminal without UTF-8: keep the words, drop the marks
        stream.write((text + end).replace("✓", "+").replace("✗", "x").replace("→", "->"))


def mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def value(number: Optional[float]) -> str:
    return "n/a" if number is None else f"{number:.4f}"


def resume_banner(restored, state, resumed, world_size: int) -> str:
    """The banner printed when a run continues from a checkpoint (see docs/checkpointing.md)."""
    position, tracking = state.position, state.tracking
    source = ("Ray's latest checkpoint of this run (a restart or a rerun)" if restored.source == "ray"
              else "--resume")
    lines = [RULE, "RESUMING FROM CHECKPOINT", RULE, f"Checkpoint: {restored.name}  [{source}]"]
    if restored.fell_back_from:
        lines.append(f"  ! the latest checkpoint {restored.fell_back_from} does not verify: fell back to this one")
    if restored.resume_ignored:
        lines.append(f"  ! --resume {restored.resume_ignored} is not used: the run's own latest checkpoint takes "
                     f"precedence (start a new --name to begin from that path)")
    if restored.layout_note:
        lines.append(f"  ! {restored.layout_note}")
    comparison = restored.comparison
    for difference in comparison.math:
        lines.append(f"  ! --force: {difference.line()} (changes the run's math; recorded in its history)")
    for difference in comparison.other:
        lines.append(f"  ! {difference.line()} (does not change the run's math)")
    where = f"epoch {position.epoch + 1}"
    if position.mid_epoch:
        where += f", after step {position.step} of it"
    lines += [
        f"  {mark(True)} Model weights restored",
        f"  {mark(True)} Optimizer state restored",
        f"  {mark(True)} LR scheduler restored",
        device_line(restored.checkpoint.state.get("device", "cpu"), state.device),
        f"  {mark(True)} Will resume from {where} (global step {position.global_step})",
    ]
    for metric, tracker in in_original_order(tracking.best):
        label = {"val_loss": "Best validation loss", "val_pck": "Best PCK"}.get(metric, f"Best {metric}")
        at = "" if tracker.best_epoch is None else f" (epoch {tracker.best_epoch})"
        lines.append(f"  {mark(True)} {label} restored: {value(tracker.best)}{at}")
    lines.append(f"  {mark(True)} Epochs without improvement: {tracking.early_stopping.epochs_without_improvement}")
    if state.config.precision == "fp16":
        scaler = state.grad_scaler or {}
        lines.append(f"  {mark(bool(scaler))} fp16 gradient scaler restored: scale {scaler.get('scale', '?')}, "
                     f"{scaler.get('_growth_tracker', '?')} steps since it last changed")
    ranks = f"{world_size} rank{'s' * (world_size > 1)}, each its own"
    if resumed.rng is None:
        lines.append(f"  {mark(False)} {resumed.reseeded}")
    else:
        lines.append(f"  {mark(True)} Torch RNG state restored ({ranks})")
        cuda = resumed.rng.cuda
        lines.append(f"  {mark(cuda)} CUDA RNG state {'restored' if cuda else 'not restored'}"
                     + (f": {resumed.rng.cuda_note}" if resumed.rng.cuda_note else ""))
        lines.append(f"  {mark(True)} NumPy RNG state restored")
        lines.append(f"  {mark(True)} Python RNG state restored")
    lines.append(determinism_line(restored.checkpoint.state, state))
    lines.append(RULE)
    return "\n".join(lines)


def device_line(saved_device: str, device: str) -> str:
    """Where the checkpoint's tensors were and where they are now."""
    if saved_device == device:
        return f"  {mark(True)} Device: {device}, as when the checkpoint was written"
    return (f"  {mark(True)} Weights and optimizer state moved from {saved_device} to {device}: the run continues "
            f"from the checkpoint, but not bit for bit as it would have on {saved_device}")


def determinism_line(saved_state: dict, state) -> str:
    """What this run reproduces (see determinism.py), and whether the checkpoint's run did."""
    now = determinism.describe(state.device, state.deterministic)
    line = f"  {mark(state.device != 'cuda' or state.deterministic)} Reproducibility: {now}"
    if saved_state.get("device") == "cuda" and not saved_state.get("deterministic", False):
        line += ("; the checkpoint was written without deterministic mode, so the steps before it cannot be "
                 "reproduced bit for bit")
    return line


def best_label(metric: str) -> str:
    return {"val_pck": "PCK", "val_loss": "LOSS"}.get(metric, metric)


def in_original_order(best: dict) -> list:
    """Trackers with the original's order first: loss, then PCK, then the others."""
    rank = {"val_loss": 0, "val_pck": 1}
    return sorted(best.items(), key=lambda item: rank.get(item[0], 2))


class Console:
    """Rank 0's lines and progress: a progress bar on the driver's terminal, else a line per epoch."""

    def __init__(self, config, rank: int, steps_per_epoch: int, write: Optional[Callable[[str], None]] = None,
                 progress: Optional[Callable[[Optional[str]], None]] = None):
        self.enabled = rank == 0
        self.config, self.steps_per_epoch = config, steps_per_epoch
        self._write = write or _stdout_write
        self._progress = progress if config.progress == "bar" else None
        self._sent = 0.0
        self._epoch_started = 0.0
        self.epoch_times: list[float] = []

    def say(self, message: str) -> None:
        if self.enabled:
            self._write(message + "\n")

    def startup(self, restored, state, resumed, tidy, world_size: int, notes: Sequence[str] = ()) -> None:
        """The banner of a resumed run (a start line for a fresh one), `notes` (pretrained weights,
        the LR schedule of an extended run) and what the start-up tidying did."""
        if restored is not None:
            self.say(resume_banner(restored, state, resumed, world_size))
        else:
            model = state.model or {}
            self.say(f"training {model.get('builder', '?')} ({model.get('parameters', 0):,} parameters, "
                     f"{model.get('trainable_parameters', 0):,} trained, {state.config.precision}) on {state.device}, "
                     f"{world_size} worker{'s' * (world_size > 1)}: "
                     f"{determinism.describe(state.device, state.deterministic)}")
        for note in notes:
            self.say(note)
        if tidy.removed_orphans:
            self.say(f"removed {len(tidy.removed_orphans)} checkpoint dir(s) that Ray never registered (a report "
                     f"lost in a crash; redone now): {', '.join(tidy.removed_orphans)}")
        if tidy.stray:
            self.say(f"WARNING: {len(tidy.stray)} checkpoint dir(s) in the run directory are not registered with "
                     f"Ray and are not used: {', '.join(tidy.stray)}")
        for name in tidy.exported:
            self.say(f"best export {name} was missing (a crash came before it was made): exported now")
        for problem in tidy.problems:
            self.say(f"ERROR: {problem}")
        stopping = state.tracking.early_stopping
        if stopping.should_stop:
            self.say(f"early stopping already triggered at epoch {stopping.stopped_epoch}; nothing to train")
        elif state.position.epoch >= self.config.epochs:
            self.say(f"the run has completed {state.position.epoch} epoch(s) and --epochs is {self.config.epochs}: "
                     f"nothing left to train (a larger --epochs continues it)")

    def start_epoch(self, epoch: int, first_step: int) -> None:
        self._epoch_started, self._first_step = time.perf_counter(), first_step

    def step(self, epoch: int, step: int, losses) -> None:
        """The bar's state, at most every PROGRESS_EVERY_S (reading the loss waits for the device)."""
        now = time.perf_counter()
        if not (self.enabled and self._progress) or now - self._sent < PROGRESS_EVERY_S:
            return
        self._sent = now
        done = step / self.steps_per_epoch
        speed = (step - self._first_step) / max(now - self._epoch_started, 1e-9)
        filled = int(30 * done)
        self._progress(f"epoch {epoch + 1}/{self.config.epochs} [{'#' * filled}{'.' * (30 - filled)}] "
                       f"{step}/{self.steps_per_epoch} steps  loss {float(losses[-1]):.4f}  {speed:.1f} steps/s")

    def end_epoch(self, metrics: dict[str, Any], steps: int, train_seconds: float, epoch_seconds: float,
                  name: str, state, new_best: list[str]) -> None:
        if not self.enabled:
            return
        if self._progress:
            self._progress(None)
        self.epoch_times.append(epoch_seconds)
        remaining = (self.config.epochs - metrics["epoch"]) * (sum(self.epoch_times) / len(self.epoch_times))
        speed = steps / train_seconds if train_seconds > 0 else float("nan")
        lines = [f"epoch {metrics['epoch']:3d}/{self.config.epochs}  {steps} steps  "
                 f"train_loss {metrics['train_loss']:.4f}  val_loss {metrics['val_loss']:.4f}  "
                 f"val_pck {metrics['val_pck']:.4f}  lr {metrics['lr']:.2e}  {speed:.1f} steps/s  "
                 f"{epoch_seconds:.1f}s  ETA {duration(remaining)}  -> {name}"]
        tracking = state.tracking
        for metric in new_best:
            tracker = tracking.best[metric]
            lines.append(f"  {mark(True)} Saved BEST {best_label(metric)} model ({value(tracker.best)}): "
                         f"{tracker.export}")
        stopping = tracking.early_stopping
        if stopping.epochs_without_improvement:
            patience = f" (patience {stopping.patience})" if stopping.enabled else ""
            lines.append(f"  → No improvement in {stopping.metric} for {stopping.epochs_without_improvement} "
                         f"epoch(s){patience}")
            smoothed = tracking.pck_average.window > 1
            for metric, label, current in (("val_loss", "Best loss:", metrics["val_loss"]),
                                           ("val_pck", "Best PCK: ", metrics["val_pck"])):
                if metric not in tracking.best:
                    continue
                line = f"     {label} {value(tracking.best[metric].best)} | Current: {current:.4f}"
                if metric == "val_pck" and smoothed:
                    line += (f" (selection uses the mean of the last {tracking.pck_average.window}: "
                             f"{tracking.pck_average.mean:.4f})")
                lines.append(line)
        self.say("\n".join(lines))
