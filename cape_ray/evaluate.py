"""Evaluate a checkpoint on the unseen categories of a split with the MP-100 protocol.

Protocol: for every category of the split, E fixed episodes (MP-100: 200 for test, 100 for val) of
`num_shots` supports shared by Q = 15 queries, drawn by `EpisodeSampler.fixed_episodes` from the
checkpoint's `data_seed` (or --seed). On the val split with the training flags (`val_episodes`,
`val_queries_per_episode`) these are exactly the episodes training validated on.

Reported: PCK at 0.05 ... 0.25 and mPCK per category, then two means:
- mean over pairs: every support-query pair of the split counts once. This is MP-100's definition
  (per-pair PCK averaged over all pairs of the split) and the headline;
- mean over categories: each category's PCK averaged with equal weight.
Under this protocol every category has exactly E x Q pairs, so the two agree up to rounding; they
differ only when categories are evaluated with different episode counts.

Speed. Fixed episodes reuse instances heavily (200 episodes x 16 images drawn from a category's
~60-300 instances), and `CapeModel.encode` is per image (GroupNorm: no image sees another), so each
instance is encoded once into a feature bank and `CapeModel.decode` runs on batches of `batch_size`
episodes that read their features from it (engine.evaluate_episodes, the loop training validates
with too). Batches never mix categories, so no episode is padded to another category's keypoint
count.

Batch-size independence. Sums (PCK hits, pairs, loss) are added over batches and divided once; the
feature bank is encoded in blocks fixed by the category's instance list, not by the batch. What
remains is float32 rounding inside a batch: CPU element-wise kernels compute the vectorised body
and the scalar tail of a tensor slightly differently (e.g. sigmoid), so a coordinate can move by
~1e-7 between batch sizes. PCK changes only if a distance sits within that of a threshold.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from cape_ray import checkpoint as ckpt, engine, storage
from cape_ray.config import ConfigError, TrainConfig
from cape_ray.data.episodes import Episode, EpisodeSampler
from cape_ray.data.loading import load_split
from cape_ray.data.transforms import PreparedSplit
from cape_ray.metrics import PCK_THRESHOLDS
from cape_ray.model import ModelError, ModelSpec, build

log = logging.getLogger("cape_ray")

SPLITS = ("test", "val", "train")
DEFAULT_EPISODES = {"test": 200, "val": 100, "train": 100}  # per category, as MP-100
MP100_QUERIES = 15  # queries per episode, as MP-100
DEFAULT_CPU_BATCH = 4
PCK_KEYS = tuple(engine.pck_key(t) for t in PCK_THRESHOLDS)
HEADLINE = engine.pck_key(0.20)
MEAN_OVER_PAIRS = "mean over pairs (MP-100)"
MEAN_OVER_CATEGORIES = "mean over categories"


class EvaluationError(RuntimeError):
    """An evaluation that cannot run as asked (bad checkpoint, data or flags); one clear message."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_batch_size(device: torch.device | str) -> int:
    """Episodes per forward: small on a CPU, where a batch's feature maps should stay in cache
    (1-6 episodes ran equally fast on a 32 MB L3, 8 and more 40% slower), large on a GPU, where
    per-launch overhead dominates."""
    return 64 if torch.device(device).type == "cuda" else DEFAULT_CPU_BATCH


# ----------------------------------------------------------------------------- checkpoint and data
def expand_pattern(path: str) -> str:
    """A local checkpoint path with `*` (e.g. runs/demo/checkpoint_best_pck_*, where the best
    export's name holds its epoch and scores) that matches exactly one directory: that directory.
    A shell expands such a path itself, but not inside `--checkpoints 1=...`."""
    if "*" not in path or "://" in path or os.path.exists(path):
        return path
    import glob

    matches = sorted(glob.glob(os.path.expanduser(path)))
    if len(matches) != 1:
        raise EvaluationError(f"{path} matches {len(matches)} checkpoints{': ' + ', '.join(matches) if matches else ''}; "
                              f"name one")
    return matches[0]


def fetch_checkpoint(uri: str, scratch: str) -> str:
    """A verified local copy of the checkpoint at `uri` (local path or URI); raises EvaluationError
    naming every problem when its manifest does not verify."""
    uri = expand_pattern(uri)
    fs, path = storage.resolve(uri)
    if not storage.exists(fs, path):
        raise EvaluationError(f"no checkpoint at {uri}")
    local = storage.download(fs, path, scratch)
    problems = ckpt.verify_checkpoint(local)
    if problems:
        hint = ""
        inner = storage.list_dirs(fs, path)
        if inner:  # a run directory was given instead of one of its checkpoints
            hint = f"\n{uri} looks like a run directory; pass one of its checkpoints, e.g. {path}/{inner[-1]}"
        raise EvaluationError(f"checkpoint {uri} does not verify; refusing to evaluate it:\n  "
                              + "\n  ".join(problems) + hint)
    return local


def evaluation_config(saved: dict[str, Any], *, data_root: Optional[str] = None,
                      mp100_split: Optional[int] = None, num_shots: Optional[int] = None,
                      data: Optional[str] = None) -> TrainConfig:
    """The checkpoint's config with the data source, location and shot count overridden where given
    (`data`: builtin | builtin-hard | mp100; a data_root alone means MP-100 files there).

    Overrides go into the dict before validation: the saved data_root may not exist on this machine.
    """
    values = dict(saved)
    if data is not None:
        values["data"] = data
        if data != "mp100":
            values["data_root"] = None
    if data_root is not None:
        values["data_root"] = data_root
        values["data"] = "mp100" if data is None else data
    if mp100_split is not None:
        values["mp100_split"] = mp100_split
    if num_shots is not None:
        values["num_shots"] = num_shots
    try:
        return TrainConfig.from_dict(values)
    except ConfigError as exc:
        raise EvaluationError(f"the checkpoint's config does not work here: {exc}"
                              + (" (pass --data_root DIR)" if "data_root" in str(exc) else "")) from None


@dataclass
class EvalSetup:
    """Everything an evaluation (or a picture of one) needs, loaded once."""

    checkpoint: str  # as given (path or URI)
    checkpoint_name: str
    state: dict  # the checkpoint's state.json
    config: TrainConfig  # the checkpoint's, with the overrides
    model: nn.Module  # in eval mode, on `device`
    split_name: str
    data: PreparedSplit
    episodes: list[Episode]
    episodes_per_category: int
    queries: int
    seed: int
    device: torch.device

    @property
    def data_description(self) -> str:
        if self.config.data_root is not None:
            return f"MP-100 files {self.config.data_root} split {self.config.mp100_split}"
        kind = "hard built-in" if self.config.data == "builtin-hard" else "built-in"
        return f"{kind} categories (data_seed {self.config.data_seed})"


def setup(checkpoint: str, split: str = "test", *, data_root: Optional[str] = None,
          mp100_split: Optional[int] = None, num_shots: Optional[int] = None, episodes: Optional[int] = None,
          queries: int = MP100_QUERIES, seed: Optional[int] = None, device: Optional[str] = None,
          data: Optional[str] = None) -> EvalSetup:
    """Verify and load the checkpoint, build its model, prepare the split and its fixed episodes."""
    if split not in SPLITS:
        raise EvaluationError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    episodes = DEFAULT_EPISODES[split] if episodes is None else int(episodes)
    if episodes < 1 or queries < 1:
        raise EvaluationError(f"--episodes and --queries must be >= 1, got {episodes} and {queries}")
    target = torch.device(device or default_device())
    if target.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationError("--device cuda: no CUDA device is available here; use --device cpu")
    with tempfile.TemporaryDirectory(prefix="cape_ray_eval_") as scratch:
        local = fetch_checkpoint(checkpoint, scratch)
        loaded = ckpt.load_checkpoint(local, map_location="cpu", verified=True)  # fetch_checkpoint verified it
    config = evaluation_config(loaded.state["config"], data_root=data_root, mp100_split=mp100_split,
                               num_shots=num_shots, data=data)
    model = model_from_record(loaded.state, checkpoint)
    try:
        model.load_state_dict(loaded.model)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise EvaluationError(
            f"the weights of checkpoint {checkpoint} do not fit this cape-ray's model (written by cape-ray "
            f"{loaded.state.get('versions', {}).get('cape_ray', '?')} with another model definition?): "
            f"{first[:300]}") from None
    model.to(target).eval()
    try:
        data = load_split(config, split, queries)
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"cannot load the {split} split: {exc}") from None
    seed = config.data_seed if seed is None else int(seed)
    sampler = EpisodeSampler(data, config.num_shots, queries, seed=seed)
    return EvalSetup(checkpoint=checkpoint, checkpoint_name=checkpoint.rstrip("/").rsplit("/", 1)[-1],
                     state=loaded.state, config=config, model=model, split_name=split, data=data,
                     episodes=sampler.fixed_episodes(episodes), episodes_per_category=episodes,
                     queries=queries, seed=seed, device=target)


def model_from_record(state: dict, checkpoint: str) -> nn.Module:
    """The model a checkpoint records (builder and arguments, model/api.py), freshly built: every
    command rebuilds it from the checkpoint alone. A model of your own must be importable here."""
    record = state.get("model")
    if not record:
        raise EvaluationError(f"checkpoint {checkpoint} records no model (written by cape-ray "
                              f"{state.get('versions', {}).get('cape_ray', '?')}); use the cape-ray that wrote it")
    try:
        return build(ModelSpec.from_dict(record))
    except ModelError as exc:
        raise EvaluationError(f"cannot rebuild the model of checkpoint {checkpoint}: {exc}") from None


# ----------------------------------------------------------------------------- the evaluation
def predict(model: nn.Module, split: PreparedSplit, episodes: Sequence[Episode]):
    """(batch, final predictions [B, Q, K, 2] on the CPU) for a few episodes of one category."""
    batch, _, coords, _ = engine.predict_batch(model, split, episodes)
    return batch, coords[-1].float().cpu()


# ----------------------------------------------------------------------------- results
def metrics_of(sums: dict[str, float]) -> dict[str, float]:
    """Summed evaluation sums -> pairs, PCK per threshold, mPCK and loss (if computed)."""
    summary = engine.summarize(sums)
    metrics = {"pairs": int(sums.get("pairs", 0))}
    metrics.update({key: summary[key] for key in PCK_KEYS})
    metrics["mpck"] = summary["mpck"]
    if "loss_count" in sums:
        metrics["loss"] = summary["val_loss"]
    return metrics


def summarize(sums_by_category: dict[int, dict[str, float]], split: PreparedSplit) -> dict[str, Any]:
    """Per-category rows, the mean over all pairs (MP-100) and the mean over categories."""
    rows = []
    for category_id, sums in sums_by_category.items():
        category = split.categories[category_id]
        rows.append({"id": int(category_id), "name": category.name, "keypoints": category.num_keypoints,
                     "instances": len(split.rows_by_category[category_id]), "episodes": int(sums["episodes"]),
                     **metrics_of(sums)})
    total: dict[str, float] = {}
    for sums in sums_by_category.values():
        engine.add_sums(total, sums)
    over_pairs = metrics_of(total)
    keys = [k for k in (*PCK_KEYS, "mpck", "loss") if rows and k in rows[0]]
    over_categories = {"categories": len(rows), **{k: sum(r[k] for r in rows) / max(1, len(rows)) for k in keys}}
    return {"categories": rows, "mean_over_pairs": over_pairs, "mean_over_categories": over_categories}


def run(checkpoint: str, split: str = "test", *, data_root: Optional[str] = None, mp100_split: Optional[int] = None,
        num_shots: Optional[int] = None, episodes: Optional[int] = None, queries: int = MP100_QUERIES,
        seed: Optional[int] = None, batch_size: Optional[int] = None, device: Optional[str] = None,
        feature_cache: bool = True, with_loss: bool = False, verbose: bool = False,
        data: Optional[str] = None) -> dict[str, Any]:
    """Evaluate `checkpoint` on `split`; returns the JSON-ready report (see `format_report`)."""
    started = time.perf_counter()
    ev = setup(checkpoint, split, data_root=data_root, mp100_split=mp100_split, num_shots=num_shots,
               episodes=episodes, queries=queries, seed=seed, device=device, data=data)
    loaded_s = time.perf_counter() - started
    batch_size = default_batch_size(ev.device) if batch_size is None else int(batch_size)

    def progress(done: int, total: int, category_id: int) -> None:
        if verbose:
            print(f"  evaluated category {done}/{total} (id {category_id})", file=sys.stderr, flush=True)

    started = time.perf_counter()
    sums = engine.evaluate_episodes(ev.model, ev.data, ev.episodes, batch_size, feature_bank=feature_cache,
                                    with_loss=with_loss, progress=progress)
    seconds = time.perf_counter() - started
    position = ev.state.get("position", {})
    report = {
        "checkpoint": checkpoint,
        "checkpoint_epoch": position.get("epoch"),
        "checkpoint_global_step": position.get("global_step"),
        "split": split,
        "data": ev.data_description,
        "num_shots": ev.config.num_shots,
        "episodes_per_category": ev.episodes_per_category,
        "queries_per_episode": ev.queries,
        "seed": ev.seed,
        "batch_size": batch_size,
        "feature_cache": feature_cache,
        "device": str(ev.device),
        "thresholds": list(PCK_THRESHOLDS),
        "headline": {"metric": HEADLINE, "averaged_over": "pairs"},
        **summarize(sums, ev.data),
        "skipped_categories": {str(k): v for k, v in ev.data.skipped.items()},
        "load_seconds": round(loaded_s, 3),
        "eval_seconds": round(seconds, 3),
        "episodes_per_second": round(len(ev.episodes) / max(seconds, 1e-9), 2),
    }
    report["headline"]["value"] = report["mean_over_pairs"][HEADLINE]
    return report


def format_report(report: dict[str, Any]) -> str:
    """The per-category table and the two means, as printed by `cape-ray evaluate`."""
    rows = report["categories"]
    has_loss = bool(rows) and "loss" in rows[0]
    name_width = max([len(MEAN_OVER_PAIRS), len(MEAN_OVER_CATEGORIES)] + [len(r["name"]) for r in rows])
    columns = [f"PCK@{t:.2f}" for t in report["thresholds"]] + ["mPCK"] + (["loss"] if has_loss else [])
    header = f"{'id':>5}  {'category':<{name_width}}  {'pairs':>7}  " + "  ".join(f"{c:>8}" for c in columns)

    def values(metrics: dict[str, Any]) -> str:
        keys = [*PCK_KEYS, "mpck"] + (["loss"] if has_loss else [])
        return "  ".join(f"{metrics[k]:8.4f}" if k in metrics else f"{'':8}" for k in keys)

    pairs = report["mean_over_pairs"]["pairs"]
    lines = [
        f"{report['checkpoint']}",
        f"split {report['split']} of {report['data']}: {len(rows)} categories x "
        f"{report['episodes_per_category']} episodes x {report['queries_per_episode']} queries, "
        f"{report['num_shots']}-shot, seed {report['seed']}",
        "",
        header,
        "-" * len(header),
    ]
    for r in rows:
        lines.append(f"{r['id']:>5}  {r['name']:<{name_width}}  {r['pairs']:>7}  {values(r)}")
    lines.append("-" * len(header))
    lines.append(f"{'all':>5}  {MEAN_OVER_PAIRS:<{name_width}}  {pairs:>7}  {values(report['mean_over_pairs'])}")
    lines.append(f"{'all':>5}  {MEAN_OVER_CATEGORIES:<{name_width}}  {'':>7}  "
                 f"{values(report['mean_over_categories'])}")
    for category_id, why in report.get("skipped_categories", {}).items():
        lines.append(f"skipped category {category_id}: {why}")
    lines += [
        "",
        f"PCK@0.20 = {report['headline']['value']:.4f}  (mean over all {pairs} support-query pairs, as MP-100 "
        f"reports it; mean over categories {report['mean_over_categories'][HEADLINE]:.4f})",
        f"{report['episodes_per_second']:.1f} episodes/s on {report['device']} (batch {report['batch_size']}, "
        f"feature bank {'on' if report['feature_cache'] else 'off'})",
    ]
    return "\n".join(lines)


def default_output(split: str) -> str:
    return os.path.join(os.getcwd(), f"evaluation_{split}.json")


def write_report(report: dict[str, Any], path: str) -> str:
    import json

    target = Path(path)
    if target.parent != Path(""):
        target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, target)  # never a half-written report
    return str(target)
