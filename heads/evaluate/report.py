"""Read run folders and summarize them over folds: the paper's Table 1, for one run or several.

A run folder (DESIGN.md) holds `config.json` and one `fold-KK/metrics.json`
per finished fold. Every score is summarized over folds as a mean and a 95%
confidence interval from the t-distribution,

    mean ± t_{0.975, n-1} · s / √n,   s = sample standard deviation (ddof=1),

the usual interval for a mean over cross-validation folds (the paper's
Tables 1 and 3). Absent values (a class missing from a fold's test speaker,
valence on a corpus without it) are left out, so n may differ per score.
With n = 1 the interval is undefined and reported as null; with n = 0 the
mean is null too. JSON holds fractions in [0, 1]; tables print percent.

Per-class recall exists in two forms that differ on unbalanced folds, and
every output names which one it shows: `recall` is the mean over folds of each
fold's recall (what UA, the mean over folds of per-fold UA, is built from; the
tables show it), `recall_pooled` is the recall of the confusion counts summed
over folds (what confusion.png shows on its diagonal). `heads_per_fold` lists
how many heads were averaged per fold (`--ensemble`; [1]: one head, [1, 3]:
`auto` gave some folds one and others three); labels read "SR x3" then.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
from rich import box
from rich.console import Console
from rich.table import Table
from scipy import stats

from core.errors import UserError
from heads.config import POOLINGS
from heads.evaluate.metrics import SCORES, Score
from heads.runfolder import (
    CONFIG_FILE,
    CONFUSION_PLOT,
    HISTORY_COLUMNS,
    METRICS_FILE,
    fold_dirs,
    fold_number,
    history_file,
)


class ReportError(UserError):
    """A run folder that cannot be reported; the message names the folder or file."""


METHOD_LABELS = {"baseline": "Baseline"}  # runs that are not a pooling head (heads/train/baseline.py)


@dataclass(frozen=True)
class Run:
    path: Path
    config: dict
    labels: tuple[str, ...]  # class order of recall and confusion, the same in every fold
    folds: tuple[dict, ...]  # metrics.json contents, by fold number
    fold_dirs: tuple[Path, ...]
    unfinished: tuple[str, ...]  # fold folders without metrics.json (still running or crashed)

    @property
    def name(self) -> str:
        return self.path.resolve().name


# --- reading -----------------------------------------------------------------------------


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_metrics(m: Any, file: Path) -> None:
    """Raise ReportError naming `file` unless `m` follows the metrics.json contract."""

    def bad(why: str) -> ReportError:
        return ReportError(f"{file} is not a valid fold metrics file: {why}")

    if not isinstance(m, dict):
        raise bad("expected a JSON object")
    required = ("fold", "test_speaker", "val_speaker", "labels", *SCORES, "recall", "confusion",
                "best_epoch", "no_speech", "n_test")
    missing = [k for k in required if k not in m]
    if missing:
        raise bad(f"missing {', '.join(missing)}")
    labels = m["labels"]
    if not (isinstance(labels, list) and labels and all(isinstance(c, str) for c in labels)):
        raise bad("labels must be a non-empty list of class names")
    for key in ("fold", "no_speech", "n_test"):
        if not isinstance(m[key], int) or isinstance(m[key], bool) or m[key] < 0:
            raise bad(f"{key} must be a non-negative integer")
    if m["best_epoch"] is not None and not isinstance(m["best_epoch"], int):
        raise bad("best_epoch must be an integer")
    for key, score in SCORES.items():
        if score.kind == "fraction":
            _check_fraction(m[key], key, bad)
        elif m[key] is not None and not _is_number(m[key]):
            raise bad(f"{key} must be a number or null")
    if not isinstance(m["recall"], dict) or set(m["recall"]) != set(labels):
        raise bad("recall must map every class in labels to a value")
    for c, r in m["recall"].items():
        _check_fraction(r, f"recall[{c}]", bad)
    cm = m["confusion"]
    n = len(labels)
    if not (isinstance(cm, list) and len(cm) == n
            and all(isinstance(row, list) and len(row) == n for row in cm)
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for row in cm for x in row)):
        raise bad(f"confusion must be a {n}x{n} matrix of counts")


def _check_fraction(v: Any, key: str, bad) -> None:
    # null (or NaN, which Python's json reads) means "not defined in this fold".
    if v is None or (_is_number(v) and math.isnan(v)):
        return
    if not _is_number(v) or not 0.0 <= v <= 1.0:
        raise bad(f"{key} = {v!r} is not a fraction in [0, 1]")


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"cannot read {file}: {err}") from None
    except json.JSONDecodeError as err:
        raise ReportError(f"{file} is not valid JSON ({err})") from None


def load_run(path: str | Path) -> Run:
    """Read config.json and every finished fold's metrics.json of a run folder."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"no such run folder: {path}")
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        hint = " (this is a fold folder; pass its parent)" if fold_number(path.resolve()) is not None else ""
        raise ReportError(f"{path} is not a run folder: it has no {CONFIG_FILE}{hint}")
    config = _read_json(config_file)
    if not isinstance(config, dict):
        raise ReportError(f"{config_file} is not a valid run config: expected a JSON object")
    numbered = fold_dirs(path)
    done = [(k, d) for k, d in numbered if (d / METRICS_FILE).is_file()]
    unfinished = tuple(d.name for k, d in numbered if not (d / METRICS_FILE).is_file())
    if not done:
        raise ReportError(f"{path} has no finished folds (no fold-KK/{METRICS_FILE} yet)")
    folds = []
    for _, d in done:
        m = _read_json(d / METRICS_FILE)
        _check_metrics(m, d / METRICS_FILE)
        folds.append(m)
    labels = tuple(folds[0]["labels"])
    for m, (_, d) in zip(folds, done):
        if tuple(m["labels"]) != labels:
            raise ReportError(f"{d / METRICS_FILE} has labels {m['labels']} but {done[0][1].name} has {list(labels)}")
    return Run(path=path, config=config, labels=labels, folds=tuple(folds),
               fold_dirs=tuple(d for _, d in done), unfinished=unfinished)


def as_run(run: Run | str | Path) -> Run:
    return run if isinstance(run, Run) else load_run(run)


def load_histories(run: Run) -> list[tuple[int, pd.DataFrame, int | None]]:
    """(fold, history, best_epoch) for each finished fold that has a history.csv."""
    out = []
    for m, d in zip(run.folds, run.fold_dirs):
        file = d / history_file(1)
        if not file.is_file():
            continue
        try:
            hist = pd.read_csv(file)
        except (OSError, ValueError, pd.errors.ParserError) as err:
            raise ReportError(f"{file} is not a readable training history ({err})") from None
        missing = [c for c in HISTORY_COLUMNS if c not in hist.columns]
        if missing:
            raise ReportError(f"{file} is not a valid training history: missing column(s) {', '.join(missing)}")
        out.append((m["fold"], hist, m["best_epoch"]))
    return out


# --- summarizing -------------------------------------------------------------------------


def mean_ci(values: Iterable[float | None], confidence: float = 0.95) -> dict:
    """{"mean", "ci95": [lo, hi]} over the finite values; ci95 null for n < 2, mean null for n = 0."""
    x = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if x.size == 0:
        return {"mean": None, "ci95": None}
    mean = float(x.mean())
    if x.size == 1:
        return {"mean": mean, "ci95": None}
    half = float(stats.t.ppf(0.5 + confidence / 2, df=x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return {"mean": mean, "ci95": [mean - half, mean + half]}


def _find(config: Any, key: str) -> Any:
    """The first value stored under `key` anywhere in a nested config."""
    if isinstance(config, dict):
        if key in config:
            return config[key]
        for v in config.values():
            found = _find(v, key)
            if found is not None:
                return found
    return None


def summarize(run: Run | str | Path) -> dict:
    """The run over its folds, JSON-ready (None for absent values); see the module docstring."""
    run = as_run(run)
    folds = run.folds
    summary: dict[str, Any] = {"run": run.name, "folds": len(folds), "labels": list(run.labels)}
    for key in SCORES:
        summary[key] = mean_ci(m[key] for m in folds)
    summary["recall"] = {c: mean_ci(m["recall"][c] for m in folds) for c in run.labels}
    summary["no_speech"] = sum(m["no_speech"] for m in folds)
    summary["confusion"] = np.sum([m["confusion"] for m in folds], axis=0).astype(int).tolist()
    summary["recall_pooled"] = pooled_recall(summary["confusion"], run.labels)
    summary["pooling"] = _find(run.config, "pooling")
    # heads/train/fold_loop.py nests the training options under "settings"; an older or hand-made
    # config without that key is taken whole.
    settings = run.config.get("settings")
    summary["settings"] = settings if isinstance(settings, dict) else run.config
    summary["method"] = summary["settings"].get("method")  # "baseline" for heads/train/baseline.py runs
    summary["recipe"] = summary["settings"].get("recipe", "default")  # --recipe (runs before it: default)
    summary["cross_corpus"] = cross_corpus_line(run.config)
    summary["heads_per_fold"] = sorted({_heads(m) for m in folds})  # [1]; [3] under --ensemble 3 or auto on small folds
    return summary


def cross_corpus_line(config: dict) -> str | None:
    """'A + B -> C' (trained on A and B, tested on C), or 'leave one corpus out of A, B, C'; None for one corpus."""
    sides = (config.get("fingerprint") or {}).get("cross_corpus") if isinstance(config, dict) else None
    if not isinstance(sides, dict):
        return None
    train, test = sides.get("train") or [], sides.get("test") or []
    if test:
        return f"{' + '.join(train)} -> {', '.join(test)}"
    return f"leave one corpus out of {', '.join(train)}"


def _heads(fold_metrics: dict) -> int:
    members = fold_metrics.get("members")  # written by --ensemble folds of more than one head
    return len(members) if isinstance(members, list) and members else 1


def pooled_recall(confusion: Sequence[Sequence[int]], labels: Sequence[str]) -> dict[str, float | None]:
    """Recall of counts summed over folds ({CONFUSION_PLOT}'s diagonal); None for a class never in any test set."""
    cm = np.asarray(confusion, dtype=np.int64)  # (C, C) rows = true class
    totals = cm.sum(axis=1)
    return {c: (float(cm[i, i] / totals[i]) if totals[i] else None) for i, c in enumerate(labels)}


def pooled_recall_line(summary: dict) -> str:
    """The other form of per-class recall, for the text report (the tables show the mean over folds)."""
    parts = ", ".join(f"{c} {'–' if r is None else f'{100 * r:.2f}'}" for c, r in summary["recall_pooled"].items())
    return f"{summary['run']}: per-class recall pooled over folds ({CONFUSION_PLOT}'s diagonal), %: {parts}"


def summarize_runs(run_dirs: Sequence[str | Path | Run]) -> list[dict]:
    """summarize() of each run, in the given order."""
    return [summarize(r) for r in run_dirs]


# --- rendering ---------------------------------------------------------------------------


def pct(stat: dict, *, ci: bool = True) -> str:
    """{"mean", "ci95"} as percent: '75.57 (72.25, 78.89)'; '–' when absent."""
    if stat["mean"] is None:
        return "–"
    text = f"{100 * stat['mean']:.2f}"
    if ci and stat["ci95"] is not None:
        lo, hi = stat["ci95"]
        text += f" ({100 * lo:.2f}, {100 * hi:.2f})"
    return text


def num(stat: dict) -> str:
    """MAE (on the targets' scale) and CCC (in [-1, 1]) are not fractions: 3 decimals, no percent."""
    return "–" if stat["mean"] is None else f"{stat['mean']:.3f}"


def method_label(summary: dict) -> str:
    method = summary.get("method")
    if method in METHOD_LABELS:
        return METHOD_LABELS[method]
    pooling = summary.get("pooling")
    label = POOLINGS.label(str(pooling).lower()) if pooling is not None else "?"
    n = summary.get("heads_per_fold") or [1]  # --ensemble: heads averaged per fold
    label = label if max(n) == 1 else f"{label} x{n[0]}" if len(n) == 1 else f"{label} x{min(n)}-{max(n)}"
    recipe = summary.get("recipe")
    return label if recipe in (None, "default") else f"{label} ({recipe})"


CAPTION = ("UA, WA, macro-F1, recall in %. Per-class recall: mean over folds of each fold's recall "
           f"({CONFUSION_PLOT} pools the folds' counts instead). V/A = valence/arousal: MAE on the label scale, "
           "CCC in [-1, 1].")


def _columns(summaries: Sequence[dict], parts: Sequence[str]) -> list[tuple[str, Callable[[dict], str]]]:
    """(header, cell) pairs: "main" = the paper's Table 1 + macro-F1, "recall" per class, "dims" the rest."""
    labels: list[str] = []
    for s in summaries:
        labels += [c for c in s["labels"] if c not in labels]
    cols: list[tuple[str, Callable[[dict], str]]] = [("Method", method_label), ("Run", lambda s: s["run"])]
    if "main" in parts:
        cols += [("Folds", lambda s: str(s["folds"])), *_score_columns("main")]
    if "recall" in parts:
        cols += [(c, lambda s, c=c: pct(s["recall"][c], ci=False) if c in s["recall"] else "–") for c in labels]
    if "dims" in parts:
        cols += [*_score_columns("dims"), ("No speech", lambda s: str(s["no_speech"]))]
    return cols


def _score_columns(part: str) -> list[tuple[str, Callable[[dict], str]]]:
    """(header, cell) of each score of heads.evaluate.metrics.SCORES shown in `part`."""
    def cell(key: str, score: Score) -> Callable[[dict], str]:
        return (lambda s: pct(s[key], ci=score.ci)) if score.kind == "fraction" else (lambda s: num(s[key]))

    return [(score.label, cell(key, score)) for key, score in SCORES.items() if score.part == part]


ALL_PARTS = ("main", "recall", "dims")
PART_TITLES = {("recall", "dims"): "Per-class recall (%) and valence/arousal: mean over folds (not pooled)",
               ("recall",): "Per-class recall (%): mean over folds (not pooled)",
               ("dims",): "Valence (V) and arousal (A): mean over folds"}


PLAN_TITLES = {"speaker": "Leave-one-speaker-out cross-validation", "session": "Leave-one-session-out cross-validation",
               "split": "The official split"}  # core/folds.py's protocols


def plan_title(summaries: Sequence[dict]) -> str:
    """The table's title: the fold plan the runs were made with (`--protocol`; runs made before it: speaker)."""
    plans = {str(s["settings"].get("protocol", "speaker")) for s in summaries}
    name = PLAN_TITLES.get(next(iter(plans)), "Cross-validation") if len(plans) == 1 else \
        "Cross-validation on different fold plans"
    return f"{name}: mean over folds (95% CI)"


def render_table(summaries: Sequence[dict], title: str | None = None,
                 *, parts: Sequence[str] = ALL_PARTS, caption: bool = True) -> Table:
    """Rows = runs; columns = the paper's Table 1 (UA, WA mean and 95% CI) plus macro-F1,
    per-class recall, valence/arousal MAE and CCC, and the no-speech count.

    The full table is about 170 characters wide; `render_tables` splits it for narrow consoles.
    """
    table = Table(title=title or plan_title(summaries),
                  title_justify="left", box=box.SIMPLE_HEAD,
                  caption=CAPTION if caption else None, caption_justify="left")
    for header, _ in _columns(summaries, parts):
        if header in ("Method", "Run"):
            table.add_column(header, overflow="fold")
        elif header.endswith("(95% CI)"):  # may wrap at a space: the CI moves under its mean
            table.add_column(header, justify="right")
        else:  # a number must never be folded into two misleading halves
            table.add_column(header, justify="right", no_wrap=True)
    for s in summaries:
        table.add_row(*(cell(s) for _, cell in _columns(summaries, parts)))
    return table


def render_tables(summaries: Sequence[dict], width: int, title: str | None = None) -> list[Table]:
    """The full table if it fits in `width` characters, else it split in two, else in three."""
    for split in ([ALL_PARTS], [("main",), ("recall", "dims")], [("main",), ("recall",), ("dims",)]):
        tables = [render_table(summaries, title if p == ("main",) or len(split) == 1 else PART_TITLES[p],
                               parts=p, caption=i == len(split) - 1)
                  for i, p in enumerate(split)]
        if all(table_width(t) <= width for t in tables):
            return tables
    return tables


def table_width(table: Table) -> int:
    """The width `table` needs to print without cutting or wrapping any cell."""
    return Console(width=100_000).measure(table).maximum


def render_runs(run_dirs: Sequence[str | Path | Run], title: str | None = None) -> Table:
    """The side-by-side table of several runs (what `cli report` and `cli ablate` print)."""
    return render_table(summarize_runs(run_dirs), title=title)


def render_folds(run: Run | str | Path) -> Table:
    """One row per fold: who was tested, the fold's scores, the epoch kept."""
    run = as_run(run)
    table = Table(title=f"{run.name}: per fold", title_justify="left", box=box.SIMPLE_HEAD)
    shown = [(k, score) for k, score in SCORES.items() if score.kind == "fraction"]  # the per-fold percentages
    for name in ("Fold", "Test", "Val", "N", *(f"{score.short} %" for _, score in shown), "Best epoch", "No speech"):
        table.add_column(name, justify="left" if name in ("Test", "Val") else "right")
    for m in run.folds:
        scores = [pct({"mean": m[k] if m[k] is None or math.isfinite(m[k]) else None, "ci95": None})
                  for k, _ in shown]
        table.add_row(str(m["fold"]), m["test_speaker"], m["val_speaker"], str(m["n_test"]), *scores,
                      "–" if m["best_epoch"] is None else str(m["best_epoch"]), str(m["no_speech"]))
    return table
