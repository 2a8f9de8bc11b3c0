"""Pictures of a run: training curves from metrics.jsonl, and predictions of a checkpoint.

`plot_curves(RUN_DIR)`: two panels per epoch, (1) train and val loss, (2) val PCK@0.2 and mPCK,
with the best-loss and best-PCK epochs starred and every restart drawn as a vertical dashed line
at the position it resumed from. Where several attempts reported the same epoch (work redone after
a restart), the last report of the epoch is the one plotted.

`show_predictions(CHECKPOINT)`: a grid, one row per episode (the first fixed episode of the first
categories of the split): the support image(s) with their keypoints and skeleton, then queries
with the ground truth (circles), the predictions (crosses, joined to their ground truth) and the
skeleton drawn through the predictions. Every keypoint has one colour across a row, so a support
keypoint and its query prediction match by colour. Each query's title gives its PCK@0.2.

Matplotlib runs with the Agg backend (no display needed). Sizes are fixed in pixels: see
`curves_size` and `grid_size`.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import numpy as np

from cape_ray import history
from cape_ray.checkpoint import position_from_name

DPI = 100
CURVES_INCHES = (12.0, 4.8)
PANEL_INCHES = 2.0  # one image panel of the prediction grid
GRID_TITLE_INCHES = 0.8  # room above the grid for the title
GRID_LEGEND_INCHES = 0.5  # room below it for the legend


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def curves_size(dpi: int = DPI) -> tuple[int, int]:
    """(width, height) in pixels of `plot_curves`' PNG."""
    return round(CURVES_INCHES[0] * dpi), round(CURVES_INCHES[1] * dpi)


def grid_size(episodes: int, columns: int, dpi: int = DPI) -> tuple[int, int]:
    """(width, height) in pixels of `show_predictions`' PNG for a grid of episodes x columns."""
    width, height = _grid_inches(episodes, columns)
    return round(width * dpi), round(height * dpi)


def _grid_inches(episodes: int, columns: int) -> tuple[float, float]:
    return columns * PANEL_INCHES, episodes * PANEL_INCHES + GRID_TITLE_INCHES + GRID_LEGEND_INCHES


# ----------------------------------------------------------------------------- training curves
def epoch_series(records: Sequence[dict]) -> dict[str, Any]:
    """From metrics.jsonl records: per-epoch values (last report of each epoch wins), mid-epoch
    running train losses, and restarts with the x position (in epochs) they resumed from."""
    reports = [r for r in records if r.get("event", "report") == "report"]
    steps_per_epoch = max([int(r["step"]) for r in reports if r.get("validated") and r.get("step")] or [0])

    def x_of(epoch: int, step: int) -> float:
        if steps_per_epoch <= 0 or step >= steps_per_epoch:
            return float(epoch)
        return epoch - 1 + step / steps_per_epoch

    by_epoch: dict[int, dict] = {}
    running = []
    for r in reports:
        if r.get("epoch") is None:
            continue
        if r.get("validated", 1):
            by_epoch[int(r["epoch"])] = r
        elif r.get("train_loss") is not None:
            running.append((x_of(int(r["epoch"]), int(r.get("step") or 0)), float(r["train_loss"])))
    epochs = sorted(by_epoch)

    def column(key: str) -> list[Optional[float]]:
        return [by_epoch[e].get(key) for e in epochs]

    restarts = []
    for index, record in enumerate(records):
        if record.get("event") != "restart":
            continue
        x = None
        position = position_from_name(record["resumed_from"]) if record.get("resumed_from") else None
        if record.get("resumed_from") is None:
            x = 0.0  # nothing to resume from: started over
        elif position is not None:
            x = x_of(position[0], position[1])
        else:  # an exported name: place it just before the attempt's first report
            following = [r for r in records[index + 1:] if r.get("event", "report") == "report" and r.get("epoch")]
            if following:
                x = x_of(int(following[0]["epoch"]), int(following[0].get("step") or 0))
        if x is not None:
            restarts.append({"x": x, "attempt": record.get("attempt"), "reason": record.get("reason", "")})
    return {"epochs": epochs, "train_loss": column("train_loss"), "val_loss": column("val_loss"),
            "val_pck": column("val_pck"), "mpck": column("mpck"), "running": running, "restarts": restarts,
            "attempts": max([int(r.get("attempt") or 1) for r in records] or [1])}


def _best(epochs: list[int], values: list[Optional[float]], mode: str) -> Optional[tuple[int, float]]:
    pairs = [(e, v) for e, v in zip(epochs, values) if v is not None]
    if not pairs:
        return None
    # the first epoch reaching the extreme, as the training's tracking (strictly better) counts it
    return min(pairs, key=lambda p: (p[1] if mode == "min" else -p[1], p[0]))


def plot_curves(run_dir: str, out: Optional[str] = None, dpi: int = DPI) -> str:
    """Write the loss / PCK curves of `run_dir` (local path or URI) to a PNG; returns its path."""
    records = history.read_history(run_dir)
    series = epoch_series(records)
    if not series["epochs"]:
        raise ValueError(f"{run_dir}: metrics.jsonl has no validated epoch yet")
    name = run_dir.rstrip("/").rsplit("/", 1)[-1]
    out = out or os.path.join(os.getcwd(), f"curves_{name}.png")
    plt = _pyplot()
    fig, (loss_ax, pck_ax) = plt.subplots(1, 2, figsize=CURVES_INCHES, dpi=dpi, layout="constrained")
    epochs = series["epochs"]

    def plot(ax, key, **style):
        xs = [e for e, v in zip(epochs, series[key]) if v is not None]
        ys = [v for v in series[key] if v is not None]
        if xs:
            ax.plot(xs, ys, **style)

    if series["running"]:
        xs, ys = zip(*series["running"])
        loss_ax.scatter(xs, ys, s=12, color="tab:blue", alpha=0.35, label="train loss (running, mid-epoch)")
    plot(loss_ax, "train_loss", color="tab:blue", marker="o", ms=4, label="train loss (epoch mean)")
    plot(loss_ax, "val_loss", color="tab:orange", marker="o", ms=4, label="val loss")
    plot(pck_ax, "val_pck", color="tab:green", marker="o", ms=4, label="val PCK@0.2")
    plot(pck_ax, "mpck", color="tab:olive", marker=".", ls="--", label="val mPCK (0.05-0.25)")

    best_loss = _best(epochs, series["val_loss"], "min")
    if best_loss:
        loss_ax.plot(*best_loss, marker="*", ms=16, color="crimson", ls="none", zorder=5,
                     label=f"best val loss {best_loss[1]:.4f} (epoch {best_loss[0]})")
    best_pck = _best(epochs, series["val_pck"], "max")
    if best_pck:
        pck_ax.plot(*best_pck, marker="*", ms=16, color="crimson", ls="none", zorder=5,
                    label=f"best val PCK@0.2 {best_pck[1]:.4f} (epoch {best_pck[0]})")

    for ax in (loss_ax, pck_ax):
        for i, restart in enumerate(series["restarts"]):
            ax.axvline(restart["x"], color="dimgray", ls="--", lw=1.2,
                       label="restart (resumed from here)" if i == 0 else None)
            ax.annotate(f"attempt {restart['attempt']}", xy=(restart["x"], 1.0), xycoords=("data", "axes fraction"),
                        xytext=(3, -12), textcoords="offset points", fontsize=8, color="dimgray")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.set_xlim(left=0, right=max(epochs) + 0.5)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(loc="best", fontsize=8)
    loss_ax.set_ylabel("loss")
    loss_ax.set_title("loss per epoch")
    pck_ax.set_ylabel("PCK")
    top = max([v for v in series["val_pck"] + series["mpck"] if v is not None] or [1.0])
    pck_ax.set_ylim(0, min(1.0, top * 1.25 + 0.02))  # room above the curves for the legend
    pck_ax.set_title("validation PCK per epoch (unseen categories)")
    restarts = len(series["restarts"])
    fig.suptitle(f"run {name}: {len(epochs)} epochs, {series['attempts']} attempt(s), {restarts} restart(s)",
                 fontsize=12)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------- predictions
def _keypoint_colours(count: int) -> np.ndarray:
    plt = _pyplot()
    cmap = plt.get_cmap("tab20" if count <= 20 else "hsv")
    return np.array([cmap(i % 20 if count <= 20 else i / count) for i in range(count)])


def _outline():
    import matplotlib.patheffects as effects

    return [effects.Stroke(linewidth=2.4, foreground="black", alpha=0.6), effects.Normal()]


def _draw_skeleton(ax, points: np.ndarray, edges: Sequence[tuple[int, int]], drawn: np.ndarray, **style) -> None:
    for a, b in edges:
        if a < len(drawn) and b < len(drawn) and drawn[a] and drawn[b]:
            ax.plot([points[a, 0], points[b, 0]], [points[a, 1], points[b, 1]], **style)


def show_predictions(checkpoint: str, out: Optional[str] = None, split: str = "val", *, episodes: int = 4,
                     queries: int = 4, num_shots: Optional[int] = None, data_root: Optional[str] = None,
                     mp100_split: Optional[int] = None, seed: Optional[int] = None, device: Optional[str] = None,
                     dpi: int = DPI, data: Optional[str] = None) -> str:
    """Write a grid of support / query images with ground truth and predictions; returns its path."""
    from cape_ray import evaluate
    from cape_ray.metrics import PCK_THRESHOLDS, pck_per_pair, pck_valid_mask

    ev = evaluate.setup(checkpoint, split, data_root=data_root, mp100_split=mp100_split, num_shots=num_shots,
                        episodes=1, queries=queries, seed=seed, device=device or "cpu", data=data)
    chosen = ev.episodes[:episodes]  # one fixed episode per category, the first categories
    batch, predictions = evaluate.predict(ev.model, ev.data, chosen)
    valid = pck_valid_mask(batch.query_visible, batch.support_visible, batch.keypoint_mask)
    pck = pck_per_pair(predictions, batch.query_keypoints, valid, batch.query_bbox, batch.query_to_original)
    at_020 = pck[..., list(PCK_THRESHOLDS).index(0.20)]  # [B, Q]

    shots = batch.support_images.shape[1]
    rows, columns = len(chosen), shots + queries
    out = out or os.path.join(os.getcwd(), f"predictions_{ev.checkpoint_name}_{split}.png")
    plt = _pyplot()
    fig = plt.figure(figsize=_grid_inches(rows, columns), dpi=dpi)
    width, height = _grid_inches(rows, columns)
    top = 1 - GRID_TITLE_INCHES / height
    bottom = GRID_LEGEND_INCHES / height
    axes = fig.subplots(rows, columns, squeeze=False,
                        gridspec_kw={"left": 0.01, "right": 0.99, "top": top, "bottom": bottom,
                                     "wspace": 0.06, "hspace": 0.22})
    to_numpy = lambda t: t.detach().cpu().numpy()  # noqa: E731
    outline = _outline()  # keeps light lines visible on light images
    for row, episode in enumerate(chosen):
        category = ev.data.categories[episode.category_id]
        k = category.num_keypoints
        colours = _keypoint_colours(k)
        edges = category.skeleton
        for shot in range(shots):
            ax = axes[row, shot]
            image = to_numpy(batch.support_images[row, shot].permute(1, 2, 0))
            points = to_numpy(batch.support_keypoints[row, shot, :k])
            seen = to_numpy(batch.support_visible[row, shot, :k])
            ax.imshow(image, extent=(0, 1, 1, 0), interpolation="bilinear")
            _draw_skeleton(ax, points, edges, seen, color="white", lw=1.4, path_effects=outline)
            ax.scatter(points[seen, 0], points[seen, 1], s=36, c=colours[seen], edgecolors="white", linewidths=0.8,
                       zorder=3)
            ax.set_title(f"support {shot + 1}: {category.name} (K={k})" if shot == 0 else f"support {shot + 1}",
                         fontsize=8, fontweight="bold" if shot == 0 else "normal")
        for query in range(queries):
            ax = axes[row, shots + query]
            image = to_numpy(batch.query_images[row, query].permute(1, 2, 0))
            gt = to_numpy(batch.query_keypoints[row, query, :k])
            gt_seen = to_numpy(batch.query_visible[row, query, :k])
            predicted = to_numpy(predictions[row, query, :k])
            scored = to_numpy(valid[row, query, :k])
            ax.imshow(image, extent=(0, 1, 1, 0), interpolation="bilinear")
            _draw_skeleton(ax, predicted, edges, np.ones(k, dtype=bool), color="yellow", lw=1.0, ls="--",
                           path_effects=outline)
            for i in np.flatnonzero(scored):
                ax.plot([gt[i, 0], predicted[i, 0]], [gt[i, 1], predicted[i, 1]], color=colours[i], lw=0.8, alpha=0.9)
            ax.scatter(gt[gt_seen, 0], gt[gt_seen, 1], s=40, facecolors="none", edgecolors=colours[gt_seen],
                       linewidths=1.5, zorder=3)
            ax.scatter(predicted[:, 0], predicted[:, 1], s=36, marker="x", c=colours, linewidths=1.6, zorder=4)
            ax.set_title(f"query {query + 1}: PCK@0.2 {float(at_020[row, query]):.2f}", fontsize=8)
        for ax in axes[row]:
            ax.set_xlim(0, 1)
            ax.set_ylim(1, 0)
            ax.set_xticks([])
            ax.set_yticks([])
    shown = float(at_020.mean())
    epoch = ev.state.get("position", {}).get("epoch")
    fig.suptitle(f"{ev.checkpoint_name}\n{split} split, {shots}-shot, epoch {epoch}: mean PCK@0.2 of the "
                 f"{rows * queries} pairs shown {shown:.2f}", fontsize=10, y=1 - 0.08 / height)
    from matplotlib.lines import Line2D

    legend = [
        Line2D([], [], marker="o", ls="none", color="gray", markeredgecolor="white", label="support keypoint"),
        Line2D([], [], marker="o", ls="none", markerfacecolor="none", color="gray", markeredgewidth=1.5,
               label="query ground truth"),
        Line2D([], [], marker="x", ls="none", color="gray", markeredgewidth=1.6, label="prediction"),
        Line2D([], [], color="gray", lw=0.8, label="prediction error"),
        Line2D([], [], color="white", lw=1.4, path_effects=outline, label="skeleton (support)"),
        Line2D([], [], color="yellow", lw=1.0, ls="--", path_effects=outline, label="skeleton through predictions"),
    ]
    fig.legend(handles=legend, loc="lower center", ncol=6 if columns >= 4 else 3, fontsize=7, frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out

