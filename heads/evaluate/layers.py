"""UA per layer over folds (`cli layers`): the summary behind layers.json, its table.

The per-fold scores come from heads/train/layer_scan.py (a linear probe per
layer, and optionally a head per layer); here they are summarized like every
other score of a run (`report.mean_ci`: mean and t-interval over folds, absent
values left out) and rendered.
"""

from __future__ import annotations

from typing import Any, Sequence

from rich import box
from rich.table import Table

from heads.evaluate.report import mean_ci, pct

METHODS = ("probe", "head")


def layers_summary(per_fold: Sequence[dict[str, Any]], layers: Sequence[int], **about: Any) -> dict[str, Any]:
    """The JSON of `cli layers`: what was scanned (`about`), then per layer and method the UA and WA
    over folds, the best layer per method, and the per-fold numbers.

    `per_fold[i]["probe" | "head"][str(layer)]` holds {"ua", "wa", ...} (fractions or None).
    """
    methods = [m for m in METHODS if any(m in f for f in per_fold)]
    rows = []
    for layer in layers:
        row: dict[str, Any] = {"layer": int(layer)}
        for m in methods:
            for score in ("ua", "wa"):
                row[f"{m}_{score}"] = mean_ci(f.get(m, {}).get(str(layer), {}).get(score) for f in per_fold)
        rows.append(row)
    best = {}
    for m in methods:
        scored = [(r[f"{m}_ua"]["mean"], r["layer"]) for r in rows if r[f"{m}_ua"]["mean"] is not None]
        best[m] = max(scored)[1] if scored else None
    return {**about, "folds": len(per_fold), "layers": rows, "best": best, "per_fold": list(per_fold)}


def render_layers(summary: dict[str, Any], title: str | None = None) -> Table:
    """One row per layer: the probe's UA (and the head's) as mean (95% CI) over folds, in %; best marked."""
    methods = [m for m in METHODS if summary["layers"] and f"{m}_ua" in summary["layers"][0]]
    table = Table(title=title or f"UA per layer, mean over {summary['folds']} folds (95% CI)",
                  title_justify="left", box=box.SIMPLE_HEAD,
                  caption="probe: ridge classifier on the layer's utterance means; head: the head on that "
                          "layer alone; * best",
                  caption_justify="left")
    table.add_column("Layer", justify="right")
    for m in methods:
        table.add_column(f"{m.capitalize()} UA % (95% CI)", justify="right")
        table.add_column(f"{m.capitalize()} WA %", justify="right", no_wrap=True)
    for row in summary["layers"]:
        cells = [str(row["layer"])]
        for m in methods:
            star = " *" if summary["best"].get(m) == row["layer"] else "  "
            cells += [pct(row[f"{m}_ua"]) + star, pct(row[f"{m}_wa"], ci=False)]
        table.add_row(*cells)
    return table
