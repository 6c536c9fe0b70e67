"""PNG figures of a run: the confusion matrix (the paper's Figure 2) and training curves.

Figures are built on matplotlib's object API with an Agg canvas, never
pyplot: no global backend state, no display needed, safe in worker processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from core.errors import UserError
from heads.evaluate.report import Run, load_histories, summarize
from heads.runfolder import CONFUSION_PLOT, CURVES_PLOT


class PlotError(UserError):
    """A figure that could not be written (e.g. a read-only run folder)."""


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    try:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    except OSError as err:
        raise PlotError(f"cannot write {path}: {err.strerror or err}") from None
    return path


def row_labels(labels: Sequence[str], totals: Sequence[int],
               fold_mean_recall: Sequence[float | None] | None = None) -> list[str]:
    """Y tick labels: class and test count, and (when given) the class's recall as a mean over folds,
    so the figure shows both forms of per-class recall and says which is which."""
    out = []
    for i, (c, t) in enumerate(zip(labels, totals)):
        text = f"{c}\n(n={int(t)})"
        if fold_mean_recall is not None:
            r = fold_mean_recall[i]
            text += "\nfold mean: " + ("–" if r is None else f"{100 * r:.1f}%")
        out.append(text)
    return out


def confusion_png(confusion: Sequence[Sequence[int]], labels: Sequence[str], path: str | Path,
                  *, title: str = "", fold_mean_recall: Sequence[float | None] | None = None) -> Path:
    """Row-normalized percentages with the counts under them; rows = true class, columns = predicted.

    The diagonal is the recall of the counts as given (summed over folds: pooled
    recall); `fold_mean_recall` adds each class's mean-over-folds recall (the
    report table's number) to its row label.
    """
    cm = np.asarray(confusion, dtype=np.int64)  # (C, C)
    totals = cm.sum(axis=1, keepdims=True)  # (C, 1) test utterances per true class
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(totals > 0, 100.0 * cm / totals, np.nan)  # (C, C) percent of the row
    n = len(labels)
    fig = Figure(figsize=(1.2 * n + 2.2, 1.1 * n + 1.6))
    ax = fig.add_subplot()
    image = ax.imshow(np.nan_to_num(share), cmap="Blues", vmin=0, vmax=100)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="% of true class")
    for i in range(n):
        for j in range(n):
            text = "–" if np.isnan(share[i, j]) else f"{share[i, j]:.1f}%\n({cm[i, j]})"
            # White on dark cells, black on light ones, so every number stays legible.
            dark = not np.isnan(share[i, j]) and share[i, j] > 55
            ax.text(j, i, text, ha="center", va="center", fontsize=9, color="white" if dark else "black")
    ax.set_xticks(range(n), labels=list(labels))
    ax.set_yticks(range(n), labels=row_labels(labels, totals[:, 0], fold_mean_recall))
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True (cells: % of the row's pooled count)")
    ax.set_title(title or f"Confusion matrix, summed over folds (N={int(cm.sum())})")
    return _save(fig, Path(path))


def curves_png(histories: Sequence[tuple[int, pd.DataFrame, int | None]], path: str | Path,
               *, title: str = "") -> Path:
    """Train/val loss and validation UA per fold against epoch; a ring marks each fold's best epoch.

    `histories` is (fold, history.csv frame, best_epoch) as `report.load_histories` returns it.
    """
    fig = Figure(figsize=(11, 4.2))
    loss_ax, ua_ax = fig.subplots(1, 2)
    colours = _fold_colours(len(histories))
    for (fold, hist, best), colour in zip(histories, colours):
        loss_ax.plot(hist["epoch"], hist["train_loss"], color=colour, lw=1.2, alpha=0.8)
        loss_ax.plot(hist["epoch"], hist["val_loss"], color=colour, lw=1.2, ls="--", alpha=0.8)
        ua_ax.plot(hist["epoch"], 100 * hist["val_ua"], color=colour, lw=1.2, alpha=0.8, label=f"fold {fold}")
        kept = hist[hist["epoch"] == best]
        if len(kept):
            loss_ax.plot(kept["epoch"], kept["val_loss"], "o", mfc="none", mec=colour, ms=8, mew=1.5)
            ua_ax.plot(kept["epoch"], 100 * kept["val_ua"], "o", mfc="none", mec=colour, ms=8, mew=1.5)
    # Style legend (solid/dashed/ring) on the loss plot, fold colours on the UA plot.
    loss_ax.plot([], [], color="grey", label="train loss")
    loss_ax.plot([], [], color="grey", ls="--", label="validation loss")
    loss_ax.plot([], [], "o", mfc="none", mec="grey", label="best epoch (kept)")
    loss_ax.legend(fontsize=8)
    loss_ax.set(xlabel="epoch", ylabel="loss", title="Loss")
    ua_ax.set(xlabel="epoch", ylabel="validation UA (%)", title="Validation UA")
    if len(histories) <= 12:  # 40 KEMDy19 folds would bury the curves under their legend
        ua_ax.legend(fontsize=8, ncol=2)
    for ax in (loss_ax, ua_ax):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, Path(path))


def _fold_colours(n: int) -> list:
    cmap = colormaps["tab10" if n <= 10 else "viridis"]
    return [cmap(i if n <= 10 else i / max(n - 1, 1)) for i in range(n)]


def write_run_plots(run: Run) -> list[Path]:
    """The confusion matrix (summed over folds) and, when folds logged a history, the training curves, into RUN."""
    total = np.sum([m["confusion"] for m in run.folds], axis=0)  # (C, C)
    fold_mean = [summarize(run)["recall"][c]["mean"] for c in run.labels]
    written = [confusion_png(total, run.labels, run.path / CONFUSION_PLOT, fold_mean_recall=fold_mean,
                             title=f"{run.name}: counts summed over {len(run.folds)} folds (N={int(total.sum())});\n"
                                   "diagonal = pooled recall, row label = recall as mean over folds")]
    histories = load_histories(run)
    if histories:
        written.append(curves_png(histories, run.path / CURVES_PLOT, title=f"{run.name}: training curves"))
    return written


def layers_png(summary: dict, path: str | Path, *, title: str = "") -> Path:
    """UA per layer (`cli layers`): the probe's mean over folds with its 95% CI as error bars, and the
    head's beside it when it was trained; a dashed line at chance (1 / classes present)."""
    rows = summary["layers"]
    layers = np.array([r["layer"] for r in rows])
    fig = Figure(figsize=(max(5.0, 0.35 * len(layers) + 3.0), 4.0))
    ax = fig.add_subplot()
    styles = {"probe": ("tab:blue", "o", -0.08), "head": ("tab:orange", "s", 0.08)}
    shown = [m for m in styles if rows and f"{m}_ua" in rows[0]]
    for method in shown:
        colour, marker, shift = styles[method]
        shift = shift if len(shown) > 1 else 0.0  # side by side, so the error bars do not hide each other
        key = f"{method}_ua"
        mean = np.array([np.nan if r[key]["mean"] is None else 100 * r[key]["mean"] for r in rows])
        ci = [r[key]["ci95"] for r in rows]
        lo = np.array([np.nan if c is None else 100 * c[0] for c in ci])
        hi = np.array([np.nan if c is None else 100 * c[1] for c in ci])
        err = np.nan_to_num(np.vstack([mean - lo, hi - mean]))  # (2, L); no interval (one fold): no bar
        label = {"probe": "linear probe", "head": "head on the layer alone"}[method]
        ax.errorbar(layers + shift, mean, yerr=err, color=colour, marker=marker, capsize=3, lw=1.4, label=label)
    classes = summary.get("classes")
    if classes:
        ax.axhline(100 / len(classes), color="grey", ls="--", lw=1, label="chance")
    ax.set_xticks(layers)
    ax.set(xlabel="layer", ylabel="test UA (%)",
           title=title or f"UA per layer: mean and 95% CI over {summary['folds']} folds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, Path(path))


def timeline_png(table: str | Path | pd.DataFrame, classes: Sequence[str], outputs: Sequence[str], seconds: float,
                 path: str | Path, *, title: str = "") -> Path:
    """A long recording's segments over time (`cli predict --segments`): a bar per segment in its emotion's
    lane (darker = more probable), and valence/arousal per segment when the head learned them.

    `table` is segments.csv (or its frame): start, end, emotion, prob_<class>..., valence, arousal.
    """
    rows = table if isinstance(table, pd.DataFrame) else pd.read_csv(table)
    panels = (["emotion"] if "emotion" in outputs else []) + (["dims"] if {"valence", "arousal"} & set(outputs)
                                                                  else [])
    panels = panels or ["emotion"]
    fig = Figure(figsize=(12, 1.2 + 0.45 * len(classes) + (2.2 if "dims" in panels else 0)))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False,
                        gridspec_kw={"height_ratios": [0.45 * len(classes) + 0.6 if p == "emotion" else 2.2
                                                       for p in panels]})[:, 0]
    colours = colormaps["tab10"]
    for ax, panel in zip(axes, panels):
        if panel == "emotion":
            for i, c in enumerate(classes):
                mine = rows[rows["emotion"] == c] if "emotion" in rows else rows.iloc[:0]
                if len(mine):
                    shade = [(*colours(i)[:3], 0.35 + 0.65 * float(p)) for p in mine[f"prob_{c}"]]
                    ax.broken_barh(list(zip(mine["start"], mine["end"] - mine["start"])), (i - 0.4, 0.8),
                                   facecolors=shade, edgecolor="white", linewidth=0.6)  # parts of a split run show
            ax.set_yticks(range(len(classes)), labels=list(classes))
            ax.set_ylim(-0.6, len(classes) - 0.4)
            ax.set_ylabel("emotion")
            ax.grid(axis="x", alpha=0.3)
        else:
            for d, colour in (("valence", "tab:green"), ("arousal", "tab:red")):
                if d in outputs and d in rows:
                    ax.hlines(rows[d], rows["start"], rows["end"], color=colour, lw=2.5, label=d)  # no line across pauses
            ax.set_ylabel("label scale")
            ax.legend(fontsize=8, loc="upper right")
            ax.grid(alpha=0.3)
    last = axes[-1]
    last.set_xlim(0, max(seconds, float(rows["end"].max()) if len(rows) else 0.0, 1e-3))
    if seconds > 120:  # minutes:seconds reads better than thousands of seconds
        last.xaxis.set_major_formatter(lambda x, _: f"{int(x // 60)}:{int(x % 60):02d}")
        last.set_xlabel("time (min:s)")
    else:
        last.set_xlabel("time (s)")
    axes[0].set_title(title or f"{len(rows)} speech segments")
    return _save(fig, Path(path))
