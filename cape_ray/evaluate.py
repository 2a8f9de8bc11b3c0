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
~60-300 instances), and the backbone is per image (GroupNorm: no image sees another), so the
backbone runs once per instance into a feature bank and the rest of the model runs on batches of
`batch_size` episodes whose backbone call reads from the bank. Batches never mix categories, so no
episode is padded to another category's keypoint count.

Batch-size independence. Sums (PCK hits, pairs, loss) are added over batches and divided once; the
feature bank is encoded in blocks fixed by the category's instance list, not by the batch. What
remains is float32 rounding inside a batch: CPU element-wise kernels compute the vectorised body
and the scalar tail of a tensor slightly differently (e.g. sigmoid), so a coordinate can move by
~1e-7 between batch sizes. PCK changes only if a distance sits within that of a threshold.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from cape_ray import checkpoint as ckpt, engine, storage
from cape_ray.config import ConfigError, TrainConfig
from cape_ray.data.episodes import Episode, EpisodeSampler, collate
from cape_ray.data.loading import load_split
from cape_ray.data.transforms import PreparedSplit
from cape_ray.metrics import PCK_THRESHOLDS
from cape_ray.model.cape import build_model

log = logging.getLogger("cape_ray")

SPLITS = ("test", "val", "train")
DEFAULT_EPISODES = {"test": 200, "val": 100, "train": 100}  # per category, as MP-100
MP100_QUERIES = 15  # queries per episode, as MP-100
ENCODE_BLOCK = 64  # images per backbone call when filling the feature bank
FEATURE_BANK_BYTES = 4 << 30  # a category whose bank would be larger is evaluated without one
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
def fetch_checkpoint(uri: str, scratch: str) -> str:
    """A verified local copy of the checkpoint at `uri` (local path or URI); raises EvaluationError
    naming every problem when its manifest does not verify."""
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
                      mp100_split: Optional[int] = None, num_shots: Optional[int] = None) -> TrainConfig:
    """The checkpoint's config with the data location and shot count overridden where given.

    Overrides go into the dict before validation: the saved data_root may not exist on this machine.
    """
    values = dict(saved)
    if data_root is not None:
        values["data_root"] = data_root
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
        return f"built-in categories (data_seed {self.config.data_seed})"


def setup(checkpoint: str, split: str = "test", *, data_root: Optional[str] = None,
          mp100_split: Optional[int] = None, num_shots: Optional[int] = None, episodes: Optional[int] = None,
          queries: int = MP100_QUERIES, seed: Optional[int] = None, device: Optional[str] = None) -> EvalSetup:
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
        loaded = ckpt.load_checkpoint(local, map_location="cpu")
    config = evaluation_config(loaded.state["config"], data_root=data_root, mp100_split=mp100_split,
                               num_shots=num_shots)
    model = build_model(config)
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


# ----------------------------------------------------------------------------- batching
def category_batches(episodes: Sequence[Episode], batch_size: int) -> list[list[Episode]]:
    """Consecutive episodes in batches of at most `batch_size`, never mixing categories."""
    if batch_size < 1:
        raise EvaluationError(f"--batch_size must be >= 1, got {batch_size}")
    batches: list[list[Episode]] = []
    for episode in episodes:
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and last[-1].category_id == episode.category_id:
            last.append(episode)
        else:
            batches.append([episode])
    return batches


def _by_category(episodes: Sequence[Episode]) -> Iterator[tuple[int, list[Episode]]]:
    """Runs of consecutive episodes of one category (fixed_episodes lists them category by category)."""
    run: list[Episode] = []
    for episode in episodes:
        if run and run[-1].category_id != episode.category_id:
            yield run[0].category_id, run
            run = []
        run.append(episode)
    if run:
        yield run[0].category_id, run


def backbone_rows(episodes: Sequence[Episode]) -> np.ndarray:
    """Split rows in the order the model's backbone sees a batch's images: every episode's supports,
    then every episode's queries (CapeModel.forward concatenates the flattened supports and queries)."""
    return np.concatenate([e.support_rows for e in episodes] + [e.query_rows for e in episodes])


def image_free(split: PreparedSplit) -> PreparedSplit:
    """The split with 1x1 placeholder images: `collate` then builds everything but the pixels, which
    the feature bank replaces."""
    return dataclasses.replace(split, images=torch.zeros((len(split), 3, 1, 1), dtype=torch.uint8))


# ----------------------------------------------------------------------------- feature bank
class FeatureBank(nn.Module):
    """Stands in for the model's backbone: returns precomputed features of the rows it is told.

    `rows` is set before every forward to the split rows of the images the model will pass (see
    `backbone_rows`); the placeholder images themselves are ignored, only their count is checked.
    Features are kept channels-last ([M, h, w, D] in memory) and returned as a [n, D, h, w] view of
    that layout: the model's per-pixel normalisation over D then reads contiguous memory, which on a
    CPU is ~10x faster than over the strided channel axis of the backbone's own layout.
    """

    def __init__(self, features: torch.Tensor, slot_of_row: torch.Tensor):
        super().__init__()
        self.features = features.permute(0, 2, 3, 1).contiguous()  # [M, h, w, D]
        self.slot_of_row = slot_of_row  # int64 [N]: row of the split -> index into features, -1 = absent
        self.rows: Optional[torch.Tensor] = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        rows, self.rows = self.rows, None
        if rows is None or rows.numel() != images.shape[0]:
            raise RuntimeError("the feature bank was asked for images it was not told about: the model's "
                               "backbone call no longer matches evaluate.backbone_rows; evaluate with "
                               "--no_feature_cache")
        slots = self.slot_of_row.index_select(0, rows)
        if bool((slots < 0).any()):
            raise RuntimeError("the feature bank lacks some rows of this batch")
        return self.features.index_select(0, slots).permute(0, 3, 1, 2)


def bank_for(model: nn.Module, split: PreparedSplit, category_id: int, episodes: Sequence[Episode],
             device: torch.device, max_bytes: int = FEATURE_BANK_BYTES) -> Optional[FeatureBank]:
    """A FeatureBank holding every row that `episodes` use; None when it would not save backbone
    work (it encodes more instances than the episodes hold images: few episodes per category) or
    would exceed `max_bytes`.

    The backbone encodes blocks of ENCODE_BLOCK consecutive rows of the category (those blocks that
    hold a used row). Blocks are fixed by the category's row list, so a row's features never depend
    on which episodes, or which batch size, asked for it.
    """
    category_rows = split.rows_by_category[category_id]
    used = np.unique(np.concatenate([backbone_rows([e]) for e in episodes]))
    blocks = [category_rows[b * ENCODE_BLOCK:(b + 1) * ENCODE_BLOCK]
              for b in np.unique(np.searchsorted(category_rows, used) // ENCODE_BLOCK)]
    rows_needed = sum(len(block) for block in blocks)
    if rows_needed > sum(len(e.support_rows) + len(e.query_rows) for e in episodes):
        return None
    parts = []
    with torch.inference_mode():
        for block in blocks:
            images = split.images.index_select(0, torch.from_numpy(block))
            parts.append(model.backbone(images.to(device).float().div_(255.0)))  # as collate prepares them
            per_row = parts[0][0].numel() * parts[0].element_size()
            if rows_needed * per_row > max_bytes:
                log.warning("category %d: a feature bank of %d instances would need %.1f GB; evaluating "
                            "it without one", category_id, rows_needed, rows_needed * per_row / 1e9)
                return None
    rows = torch.from_numpy(np.concatenate(blocks))
    slot_of_row = torch.full((len(split),), -1, dtype=torch.int64)
    slot_of_row[rows] = torch.arange(len(rows))
    return FeatureBank(torch.cat(parts), slot_of_row.to(device))


class _SwappedBackbone:
    """`with _SwappedBackbone(model, bank):` the model's backbone is the bank inside, restored after."""

    def __init__(self, model: nn.Module, bank: FeatureBank):
        self.model, self.bank, self.original = model, bank, None

    def __enter__(self) -> FeatureBank:
        self.original = self.model.backbone
        self.model.backbone = self.bank
        return self.bank

    def __exit__(self, *exc) -> None:
        self.model.backbone = self.original


# ----------------------------------------------------------------------------- the evaluation loop
def batch_sums(model: nn.Module, batch, with_loss: bool = False) -> dict[str, float]:
    """PCK sums (and loss sums) of one batch; same keys as engine.evaluation_sums."""
    if with_loss:
        return engine.evaluation_sums(model, batch)
    with torch.inference_mode():
        tensors = engine.batch_tensors(batch, engine.model_device(model))
        coords = model(*(tensors[name] for name in engine.MODEL_INPUTS))
    return engine.pck_sums(coords[-1], tensors)


def predict(model: nn.Module, split: PreparedSplit, episodes: Sequence[Episode]):
    """(batch, final predictions [B, Q, K, 2] on the CPU) for a few episodes: the plain forward."""
    batch = collate(split, episodes)
    with torch.no_grad():
        tensors = engine.batch_tensors(batch, engine.model_device(model))
        coords = model(*(tensors[name] for name in engine.MODEL_INPUTS))
    return batch, coords[-1].cpu()


def check_bank(model: nn.Module, split: PreparedSplit, light: PreparedSplit, episodes: Sequence[Episode],
               bank: FeatureBank) -> None:
    """The bank path must predict what the plain forward predicts (up to rounding); a model whose
    backbone call changed shape or order would make it silently wrong, so compare once."""
    _, plain = predict(model, split, episodes)
    with _SwappedBackbone(model, bank):
        bank.rows = torch.from_numpy(backbone_rows(episodes)).to(bank.slot_of_row.device)
        _, banked = predict(model, light, episodes)
    close = ((plain - banked).abs() < 1e-3).float().mean().item()
    if close < 0.95:
        raise EvaluationError(f"feature-bank predictions disagree with the model's own forward "
                              f"({100 * (1 - close):.1f}% of coordinates differ): the model changed how it "
                              f"calls its backbone; evaluate with --no_feature_cache")


def evaluate_episodes(model: nn.Module, split: PreparedSplit, episodes: Sequence[Episode],
                      batch_size: int = DEFAULT_CPU_BATCH, *, feature_cache: bool = True, with_loss: bool = False,
                      progress: Optional[Callable[[int, int, int], None]] = None) -> dict[int, dict[str, float]]:
    """Sums per category (engine.evaluation_sums keys plus `episodes`) over fixed episodes.

    `progress(done_categories, total_categories, category_id)` is called after each category.
    """
    device = engine.model_device(model)
    model.eval()
    feature_cache = feature_cache and isinstance(getattr(model, "backbone", None), nn.Module)
    light = image_free(split) if feature_cache else None
    runs = list(_by_category(episodes))
    sums: dict[int, dict[str, float]] = {}
    checked = False
    for done, (category_id, category_episodes) in enumerate(runs, start=1):
        total = sums.setdefault(category_id, {"episodes": 0.0})
        batches = category_batches(category_episodes, batch_size)
        bank = bank_for(model, split, category_id, category_episodes, device) if feature_cache else None
        if bank is not None and not checked:
            check_bank(model, split, light, batches[0][:1], bank)
            checked = True
        for batch_episodes in batches:
            if bank is None:
                batch = collate(split, batch_episodes)
                engine.add_sums(total, batch_sums(model, batch, with_loss))
            else:
                batch = collate(light, batch_episodes)
                with _SwappedBackbone(model, bank):
                    bank.rows = torch.from_numpy(backbone_rows(batch_episodes)).to(device)
                    engine.add_sums(total, batch_sums(model, batch, with_loss))
            total["episodes"] += len(batch_episodes)
        del bank
        if progress is not None:
            progress(done, len(runs), category_id)
    return sums


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
                     "episodes": int(sums["episodes"]), **metrics_of(sums)})
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
        feature_cache: bool = True, with_loss: bool = False, verbose: bool = False) -> dict[str, Any]:
    """Evaluate `checkpoint` on `split`; returns the JSON-ready report (see `format_report`)."""
    started = time.perf_counter()
    ev = setup(checkpoint, split, data_root=data_root, mp100_split=mp100_split, num_shots=num_shots,
               episodes=episodes, queries=queries, seed=seed, device=device)
    loaded_s = time.perf_counter() - started
    batch_size = default_batch_size(ev.device) if batch_size is None else int(batch_size)

    def progress(done: int, total: int, category_id: int) -> None:
        if verbose:
            print(f"  evaluated category {done}/{total} (id {category_id})", file=sys.stderr, flush=True)

    started = time.perf_counter()
    sums = evaluate_episodes(ev.model, ev.data, ev.episodes, batch_size, feature_cache=feature_cache,
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
