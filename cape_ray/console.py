"""What a person reads of a run: the project's own lines (rank 0 only), in the original pipeline's words.

- the resume banner: one line per restored item, each marked restored (✓) or not (✗, with why);
- per epoch: one summary line (steps, losses, PCK, lr, speed, ETA, the checkpoint written), then
  either the confirmation of a new best export or the "No improvement" block with the bests;
- start-up notes: orphans removed, best exports repaired, world-size changes, early stop.

Lines go through `say`, which writes to the process's real stdout (Ray Train patches `print` and
would show every worker line twice).
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

RULE = "=" * 80


def _stdout_write(text: str) -> None:
    stream = sys.__stdout__
    try:
        stream.write(text)
    except UnicodeEncodeError:  # a terminal without UTF-8: keep the words, drop the marks
        stream.write(text.replace("✓", "+").replace("✗", "x").replace("→", "->"))
    stream.flush()


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
    where = f"epoch {position.epoch + 1}"
    if position.mid_epoch:
        where += f", after step {position.step} of it"
    lines += [
        f"  {mark(True)} Model weights restored",
        f"  {mark(True)} Optimizer state restored",
        f"  {mark(True)} LR scheduler restored",
        f"  {mark(True)} Will resume from {where} (global step {position.global_step})",
    ]
    for metric, tracker in in_original_order(tracking.best):
        label = {"val_loss": "Best validation loss", "val_pck": "Best PCK"}.get(metric, f"Best {metric}")
        at = "" if tracker.best_epoch is None else f" (epoch {tracker.best_epoch})"
        lines.append(f"  {mark(True)} {label} restored: {value(tracker.best)}{at}")
    lines.append(f"  {mark(True)} Epochs without improvement: {tracking.early_stopping.epochs_without_improvement}")
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
    lines.append(RULE)
    return "\n".join(lines)


def best_label(metric: str) -> str:
    return {"val_pck": "PCK", "val_loss": "LOSS"}.get(metric, metric)


def in_original_order(best: dict) -> list:
    """Trackers with the original's order first: loss, then PCK, then the others."""
    rank = {"val_loss": 0, "val_pck": 1}
    return sorted(best.items(), key=lambda item: rank.get(item[0], 2))


class Console:
    """Rank 0's lines and progress: a live bar on a terminal (drawn by the Ray driver), else a line
    per epoch."""

    def __init__(self, config, rank: int, steps_per_epoch: int, write: Callable[[str], None] = _stdout_write):
        self.enabled = rank == 0
        self.config, self.steps_per_epoch = config, steps_per_epoch
        self.use_bar = self.enabled and config.progress == "bar"
        self._write = write
        self.bar: Any = None
        self.epoch_times: list[float] = []

    def say(self, message: str) -> None:
        if self.enabled:
            self._write(message + "\n")

    def startup(self, restored, state, resumed, tidy, world_size: int) -> None:
        """The banner of a resumed run and what the start-up tidying did."""
        if restored is not None:
            self.say(resume_banner(restored, state, resumed, world_size))
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

    def start_epoch(self, epoch: int, first_step: int) -> None:
        if self.use_bar:
            from ray.experimental import tqdm_ray

            self.bar = tqdm_ray.tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{self.config.epochs}",
                                     unit="step")
            self.bar.update(first_step)

    def step(self, epoch: int, losses) -> None:
        if self.bar is not None:  # reading the loss synchronises with the device: only for the bar
            self.bar.set_description(f"epoch {epoch + 1}/{self.config.epochs} loss {float(losses[-1]):.4f}")
            self.bar.update(1)

    def end_epoch(self, metrics: dict[str, Any], steps: int, train_seconds: float, epoch_seconds: float,
                  name: str, state, new_best: list[str]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if not self.enabled:
            return
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
