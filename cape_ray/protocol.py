"""`cape-ray evaluate --protocol mp100`: the MP-100 papers' table.

One checkpoint per split, each evaluated on its own split's test categories, 1-shot and 5-shot, by
the loop every evaluation uses (`evaluate.run` -> `engine.evaluate_episodes`, the model rebuilt from
the checkpoint alone); PCK@0.2 in percent per split and the mean of the five splits, beside the
published numbers of published_mp100.py. A checkpoint trained 1-shot is evaluated 5-shot as well:
the model's decode takes any number of supports (their tokens are averaged).

Episodes as the papers' public evaluation code draws them. POMNet (luminxu/Pose-for-Everything
@22045e1, pomnet/datasets/datasets/mp100/transformer_dataset.py, `TransformerPoseDataset` in test
mode), CapeFormer (flyinglynx/CapeFormer @4ead46b, capeformer/datasets/datasets/mp100/test_dataset.py)
and Pose Anything (orhir/PoseAnything @5dab59f, models/datasets/datasets/mp100/test_dataset.py,
`TestPoseDataset`) share one `make_paired_samples`: after `random.seed(1)`, for every test category
in id order, `num_episodes` = 200 episodes (every split's test config, 1- and 5-shot), each
`random.sample(instances, num_shots + num_queries)` with num_queries = 15: the first num_shots are
the supports, the other 15 the queries. An episode never repeats an instance; episodes may share
instances. Every (supports, query) pair is scored and PCK is the mean over all pairs of the split
(test_base_dataset.py `_report_metric`: bbox max(w, h), keypoints visible in the query and in every
support), which is `mean_over_pairs` of evaluate.py.

cape-ray draws the same structure with `EpisodeSampler.fixed_episodes`: per category 200 episodes,
episode e a permutation of the category's instances from `np.random.default_rng([seed, category_id,
e])`, its first num_shots the supports and the next 15 the queries, seed 1 by default (the value the
reference seeds with). Where they differ:
- the generator: the reference draws all categories from one Python `random` stream, so the
  episodes cannot be bitwise the same; here a category's episodes do not depend on the others;
- a category with fewer than num_shots + 15 instances: `random.sample` raises in the reference;
  here its queries repeat (cycling through the non-support instances) and the table names it;
  with fewer than num_shots + 1 instances it is skipped and named.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from cape_ray import checkpoint as ckpt, evaluate, storage
from cape_ray.evaluate import EvaluationError
from cape_ray.published_mp100 import PUBLISHED

SPLITS = (1, 2, 3, 4, 5)
SHOTS = (1, 5)
EPISODES = 200  # per test category, every split, as the papers' test configs
QUERIES = 15  # per episode
SEED = 1  # the seed the reference code gives Python's random before drawing the test episodes
CAPE_RAY = "cape-ray"
COMPUTED = "computed here from the five splits"


def setting_name(shots: int) -> str:
    return f"{shots}-shot"


# ----------------------------------------------------------------------------- inputs
def parse_checkpoints(items: Sequence[str]) -> dict[int, str]:
    """`S1=PATH 3=PATH split5=PATH` -> {1: PATH, 3: PATH, 5: PATH}; raises with one line per mistake."""
    checkpoints: dict[int, str] = {}
    for item in items:
        key, sep, path = item.partition("=")
        match = re.fullmatch(r"(?:s|split)?([1-5])", key.strip().lower())
        if not sep or not path.strip() or match is None:
            raise EvaluationError(f"--checkpoints: expected SPLIT=CHECKPOINT with SPLIT S1..S5, got {item!r} "
                                  "(e.g. --checkpoints S1=runs/s1/checkpoint_best_pck_e200 S2=...)")
        split = int(match.group(1))
        if split in checkpoints:
            raise EvaluationError(f"--checkpoints: split {split} is given twice; give one checkpoint per split")
        checkpoints[split] = evaluate.expand_pattern(path.strip())
    if not checkpoints:
        raise EvaluationError("--checkpoints: give at least one SPLIT=CHECKPOINT")
    return dict(sorted(checkpoints.items()))


def saved_config(checkpoint: str) -> dict:
    """The config in the checkpoint's state.json, read without fetching its weights; {} when it
    cannot be read (the evaluation then says why)."""
    fs, path = storage.resolve(checkpoint)
    try:
        with fs.open_input_stream(f"{path.rstrip('/')}/{ckpt.STATE}") as stream:
            return json.loads(stream.read()).get("config") or {}
    except (OSError, ValueError):
        return {}


def training_description(config: dict) -> str:
    if not config:
        return "unknown (state.json unreadable)"
    model = f"{config.get('model')} ({config.get('backbone')}, {config.get('num_shots')}-shot training)"
    if config.get("data_root"):
        return f"{model} on MP-100 split {config.get('mp100_split')} of {config['data_root']}"
    return f"{model} on the built-in {config.get('data', 'builtin')} categories"


def check_checkpoint(split: int, checkpoint: str, config: dict, data_root: Optional[str]) -> None:
    """Refuse what would not be the papers' protocol: no MP-100 files, or another split's model."""
    if data_root is None and config and not config.get("data_root"):
        raise EvaluationError(f"checkpoint {checkpoint} was trained on built-in data and names no MP-100 files: "
                              "pass --data_root DIR (DIR/annotations/mp100_split{N}_test.json)")
    trained_split = config.get("mp100_split")
    if config.get("data_root") and trained_split is not None and trained_split != split:
        raise EvaluationError(
            f"S{split}={checkpoint}: that checkpoint was trained on MP-100 split {trained_split}, whose training "
            f"categories overlap split {split}'s test categories; give S{split} a checkpoint trained with "
            f"--split_id {split}")


# ----------------------------------------------------------------------------- the table
def _setting(splits: list[Optional[float]], mean: Optional[float], source: str, note: str = "") -> dict[str, Any]:
    """One setting of a row; the mean is computed from the splits when all five are known and the
    source states none."""
    mean_from = "source" if mean is not None else None
    if mean is None and all(v is not None for v in splits):
        mean, mean_from = sum(splits) / len(splits), COMPUTED
    return {"splits": list(splits), "mean": mean, "mean_from": mean_from, "source": source, "note": note}


def published_rows() -> list[dict[str, Any]]:
    rows = []
    for entry in PUBLISHED:
        row = {key: entry[key] for key in ("method", "backbone", "paper", "venue", "year")}
        for shots in SHOTS:
            given = entry[setting_name(shots)]
            row[setting_name(shots)] = _setting(given["splits"], given["mean"], given["source"], given.get("note", ""))
        rows.append(row)
    return rows


def cape_ray_row(evaluations: dict[str, dict], shots: Sequence[int], configs: dict[int, dict]) -> dict[str, Any]:
    models = sorted({f"{c.get('model')}/{c.get('backbone')}" for c in configs.values() if c}) or ["?"]
    row = {"method": CAPE_RAY, "backbone": ", ".join(models), "paper": "this evaluation", "venue": "", "year": None}
    for k in SHOTS:
        name = setting_name(k)
        splits = [100.0 * evaluations[str(s)][name]["headline"]["value"]
                  if str(s) in evaluations and name in evaluations[str(s)] else None for s in SPLITS]
        row[name] = _setting(splits, None, "this evaluation", "" if k in shots else "not evaluated")
        given = [v for v in splits if v is not None]
        row[name]["mean_of_given_splits"] = sum(given) / len(given) if given else None
    return row


def protocol_notes(report: dict[str, Any]) -> list[str]:
    """Everything that makes this table differ from the papers' protocol, or needs saying."""
    p = report["protocol"]
    notes = []
    if report["splits_missing"]:
        notes.append(f"splits not given: {', '.join(f'S{s}' for s in report['splits_missing'])}; cape-ray's mean is "
                     "left empty (the papers average all five splits)")
    for name, value, papers in (("episodes per category", p["episodes_per_category"], EPISODES),
                                ("queries per episode", p["queries_per_episode"], QUERIES)):
        if value != papers:
            notes.append(f"{name}: {value} instead of the papers' {papers}; cape-ray's numbers are not comparable "
                         "with the published ones")
    if p["seed"] != SEED:
        notes.append(f"episode seed {p['seed']} instead of {SEED}")
    notes += [f"{k}-shot not evaluated (--num_shots {p['shots'][0]})" for k in SHOTS if k not in p["shots"]]
    for split, evaluation in report["evaluations"].items():
        for name, result in evaluation.items():
            if not isinstance(result, dict) or "categories" not in result:
                continue
            shots = int(name.split("-")[0])
            for category_id, why in result["skipped_categories"].items():
                notes.append(f"S{split} {name}: category {category_id} skipped ({why})")
            few = [f"{r['name']} ({r['instances']})" for r in result["categories"]
                   if r["instances"] < shots + p["queries_per_episode"]]
            if few:
                notes.append(f"S{split} {name}: queries repeat within an episode in {', '.join(few)}: fewer than "
                             f"{shots} + {p['queries_per_episode']} instances (the reference code cannot sample these)")
    return notes


def run(checkpoints: dict[int, str], data_root: Optional[str] = None, *, shots: Sequence[int] = SHOTS,
        episodes: int = EPISODES, queries: int = QUERIES, seed: int = SEED, batch_size: Optional[int] = None,
        device: Optional[str] = None, feature_cache: bool = True, verbose: bool = False) -> dict[str, Any]:
    """Evaluate each split's checkpoint on that split's test categories for every setting in `shots`;
    the JSON-ready report with the table's rows (cape-ray first, then the published methods)."""
    unknown = sorted(set(checkpoints) - set(SPLITS))
    if unknown:
        raise EvaluationError(f"--checkpoints: MP-100 has splits 1..5, got {unknown}")
    if not shots or any(k not in SHOTS for k in shots):
        raise EvaluationError(f"--num_shots: the MP-100 table has 1-shot and 5-shot columns, got {list(shots)}")
    configs = {split: saved_config(path) for split, path in checkpoints.items()}
    for split, path in checkpoints.items():  # before any long evaluation
        check_checkpoint(split, path, configs[split], data_root)
    evaluations: dict[str, dict] = {}
    for split, path in checkpoints.items():
        evaluation = evaluations.setdefault(str(split), {"checkpoint": path,
                                                         "trained_on": training_description(configs[split])})
        for k in shots:
            if verbose:
                print(f"split {split}, {k}-shot: {path}", file=sys.stderr, flush=True)
            evaluation[setting_name(k)] = evaluate.run(
                path, "test", data_root=data_root, mp100_split=split, num_shots=k, episodes=episodes,
                queries=queries, seed=seed, batch_size=batch_size, device=device, feature_cache=feature_cache,
                verbose=verbose)
    report = {
        "protocol": {"name": "mp100", "split": "test", "episodes_per_category": episodes,
                     "queries_per_episode": queries, "seed": seed, "shots": list(shots),
                     "metric": "PCK@0.2 in percent: mean over all support-query pairs of the split's test categories",
                     "sampling": "cape_ray/protocol.py (docstring): the papers' make_paired_samples, cape-ray's "
                                 "generator"},
        "data_root": data_root,
        "splits_given": sorted(checkpoints),
        "splits_missing": [s for s in SPLITS if s not in checkpoints],
        "rows": [cape_ray_row(evaluations, shots, configs)] + published_rows(),
        "evaluations": evaluations,
    }
    report["notes"] = protocol_notes(report)
    return report


# ----------------------------------------------------------------------------- output
def _cell(value: Optional[float], computed: bool = False) -> str:
    return "-" if value is None else f"{value:.2f}" + ("*" if computed else "")


def table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows of cells): method, backbone, venue, then per setting five splits and the mean."""
    header = ["method", "backbone", "venue"]
    for k in SHOTS:
        header += [f"{k}-shot S{s}" for s in SPLITS] + [f"{k}-shot mean"]
    rows = []
    for row in report["rows"]:
        cells = [row["method"], row["backbone"], f"{row['venue']} {row['year']}" if row["year"] else ""]
        for k in SHOTS:
            setting = row[setting_name(k)]
            cells += [_cell(v) for v in setting["splits"]] + [_cell(setting["mean"], setting["mean_from"] == COMPUTED)]
        rows.append(cells)
    return header, rows


def _sources(report: dict[str, Any]) -> list[str]:
    """Per published row: the paper, then where each setting's numbers were read."""
    lines = []
    for row in report["rows"][1:]:
        lines.append(f"{row['method']} ({row['backbone']}): {row['paper']}, {row['venue']} {row['year']}")
        for k in SHOTS:
            setting = row[setting_name(k)]
            text = setting["source"] or "no numbers"
            lines.append(f"  {k}-shot: {text}" + (f"; {setting['note']}" if setting["note"] else ""))
    return lines


def _title(report: dict[str, Any]) -> str:
    p = report["protocol"]
    return (f"MP-100 test PCK@0.2 (%): {p['episodes_per_category']} episodes x {p['queries_per_episode']} queries per "
            f"category, seed {p['seed']}, mean over all pairs of each split")


def format_text(report: dict[str, Any]) -> str:
    header, rows = table(report)
    first = 3  # method, backbone, venue; then S1..S5 and mean under a title per setting
    short = header[:first] + [h.split(" ", 1)[1] for h in header[first:]]
    widths = [max(len(r[i]) for r in [short, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        left = "  ".join(c.ljust(w) for c, w in zip(cells[:first], widths[:first]))
        blocks = [cells[first + i * 6:first + (i + 1) * 6] for i in range(len(SHOTS))]
        block_widths = [widths[first + i * 6:first + (i + 1) * 6] for i in range(len(SHOTS))]
        right = " | ".join("  ".join(c.rjust(w) for c, w in zip(b, bw)) for b, bw in zip(blocks, block_widths))
        return f"{left} | {right}"

    rule = "-" * len(line(short))
    left = len(line(short).split(" | ")[0])
    spans = [len(b) for b in line(short).split(" | ")[1:]]
    titles = " " * left + " | " + " | ".join(f"{k}-shot".center(n) for k, n in zip(SHOTS, spans))
    lines = [_title(report), "", titles, line(short), rule]
    lines += [line(rows[0]), rule]
    lines += [line(r) for r in rows[1:]]
    lines += ["", f"* mean {COMPUTED}", ""]
    for split, evaluation in report["evaluations"].items():
        lines.append(f"S{split}: {evaluation['checkpoint']} (trained: {evaluation['trained_on']})")
    lines += ["", "Published numbers (sources):"] + [f"  {s}" for s in _sources(report)]
    if report["notes"]:
        lines += ["", "Notes:"] + [f"  {n}" for n in report["notes"]]
    return "\n".join(lines)


def format_markdown(report: dict[str, Any]) -> str:
    header, rows = table(report)
    lines = [f"# {_title(report)}", "",
             "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", f"\\* mean {COMPUTED}.", "", "## Checkpoints", ""]
    lines += [f"- S{split}: `{e['checkpoint']}` (trained: {e['trained_on']})"
              for split, e in report["evaluations"].items()]
    lines += ["", "## Sources of the published numbers", ""]
    lines += [f"  - {s.strip()}" if s.startswith("  ") else f"- {s}" for s in _sources(report)]
    p = report["protocol"]
    lines += ["", "## Protocol", "",
              f"Per test category, {p['episodes_per_category']} fixed episodes of K supports shared by "
              f"{p['queries_per_episode']} queries (K = 1 or 5), distinct instances per episode, "
              f"seed {p['seed']}; PCK@0.2 normalised by the query's bounding box, averaged over all "
              "pairs of a split. Sampling follows the papers' `make_paired_samples` with cape-ray's generator "
              "(cape_ray/protocol.py)."]
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def default_prefix() -> str:
    return os.path.join(os.getcwd(), "mp100_protocol")


def write(report: dict[str, Any], prefix: str) -> tuple[str, str]:
    """PREFIX.json and PREFIX.md side by side (a given .json / .md ending is dropped first)."""
    base = re.sub(r"\.(json|md)$", "", prefix)
    paths = (f"{base}.json", f"{base}.md")
    Path(paths[0]).parent.mkdir(parents=True, exist_ok=True)
    for path, text in zip(paths, (json.dumps(report, indent=1) + "\n", format_markdown(report))):
        tmp = f"{path}.tmp"
        Path(tmp).write_text(text)
        os.replace(tmp, path)  # never a half-written file
    return paths
