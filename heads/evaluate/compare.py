"""What a finished run prints: its mean UA/WA and, beside it, every classical baseline on the same folds.

`cli train-head --all-folds`, `cli ablate` and `cli baseline` end with these lines,
so a head that does not beat the obvious baseline is visible at once.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from core.errors import UserError
from heads.evaluate.report import ReportError, Run, as_run, load_run, mean_ci, method_label, summarize
from heads.runfolder import read_config


def _is_baseline_config(config: Any) -> bool:
    return isinstance(config, dict) and isinstance(config.get("settings"), dict) \
        and config["settings"].get("method") == "baseline"


def find_baselines(run: Run | str | Path) -> list[Run]:
    """Baseline runs (heads/train/baseline.py) beside RUN made from the same cache with the same fold plan.

    Looked for among RUN's sibling folders (`cli ablate` writes OUT/baseline
    beside OUT/sr; `cli baseline` and `cli train-head` default to
    runs/<cache stem>-baseline and runs/<cache stem>-<pooling>). Same cache =
    the same fingerprint and classes; same folds = the same fold plan.
    """
    run = as_run(run)
    key = ("fingerprint", "folds", "classes")
    found = []
    for d in sorted(run.path.resolve().parent.iterdir()):
        if not d.is_dir() or d == run.path.resolve():
            continue
        try:
            config = read_config(d)
        except UserError:
            continue
        if not _is_baseline_config(config) or any(config.get(k) != run.config.get(k) for k in key):
            continue
        try:
            found.append(load_run(d))
        except ReportError:
            continue  # a broken or empty sibling is not this run's business
    return found


def _stat_text(stat: dict, *, signed: bool = False) -> str:
    """A fraction's mean and 95% CI in percent: `75.57% (95% CI 72.25 to 78.89)`; a difference
    (`signed`) in points: `+1.20 points (95% CI -0.40 to +2.80)`."""
    if stat["mean"] is None:
        return "n/a"
    number = "{:+.2f}" if signed else "{:.2f}"
    text = number.format(100 * stat["mean"]) + (" points" if signed else "%")
    if stat["ci95"] is not None:
        lo, hi = (number.format(100 * x) for x in stat["ci95"])
        text += f" (95% CI {lo} to {hi})"
    return text


def _subset(run: Run, folds: set[int]) -> Run:
    keep = [(m, d) for m, d in zip(run.folds, run.fold_dirs) if m["fold"] in folds]
    return Run(run.path, run.config, run.labels, tuple(m for m, _ in keep), tuple(d for _, d in keep), run.unfinished)


def end_of_run_lines(run: Run | str | Path, *, baselines: bool = True) -> list[str]:
    """Mean UA/WA (95% CI) over the run's finished folds; with `baselines`, each baseline run of
    `find_baselines` on the same folds beside it and the paired per-fold difference."""
    run = as_run(run)
    s = summarize(run)
    lines = [f"{method_label(s)} ({run.path}), mean over {s['folds']} folds: UA {_stat_text(s['ua'])}, "
             f"WA {_stat_text(s['wa'])}"]
    if baselines:
        for base_line, diff_line in baseline_comparisons(run):
            lines += [base_line, diff_line]
    return lines


def baseline_comparisons(run: Run | str | Path) -> list[tuple[str, str]]:
    """(the baseline's mean over the folds both runs have, the paired difference) per baseline beside RUN."""
    run = as_run(run)
    label = method_label(summarize(run))
    ours = {m["fold"]: m for m in run.folds}
    out = []
    for base in find_baselines(run):
        common = set(ours) & {m["fold"] for m in base.folds}
        if not common:
            continue
        b = summarize(_subset(base, common))
        n = len(common)
        which = f"the same {n} folds" if n == len(ours) else f"the {n} fold{'s' if n > 1 else ''} in common"
        diffs = {k: mean_ci(_difference(ours[m["fold"]][k], m[k]) for m in base.folds if m["fold"] in common)
                 for k in ("ua", "wa")}
        out.append((f"{method_label(b)} ({base.path}), {which}: UA {_stat_text(b['ua'])}, WA {_stat_text(b['wa'])}",
                    f"{label} minus {method_label(b)}, paired over folds: UA {_stat_text(diffs['ua'], signed=True)}, "
                    f"WA {_stat_text(diffs['wa'], signed=True)}"))
    return out


def _difference(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
        return None
    return a - b
