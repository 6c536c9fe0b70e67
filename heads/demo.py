"""`cli demo`: the whole pipeline, offline, on CPU, in a few minutes.

synthetic corpus -> extraction (fbank, and an UNTRAINED tiny WavLM through the
real Hugging Face loading path) -> heads over all leave-one-speaker-out folds
-> the paper-style table, plots and files.

The numbers say the pipeline works, not how well emotions are recognized:
the corpus is synthetic and the tiny WavLM has random weights (its features
carry almost no emotion information, so its head stays near chance; the
fbank head is the one that visibly learns).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from core.errors import UserError

MARKER = ".sapser-demo"  # a folder holding it was made by `cli demo` and may be replaced by it

BACKENDS: dict[str, str] = {
    "fbank": "80-band log-mel filterbank (torch only): a classic baseline that needs no weights",
    "tiny-wavlm": "an UNTRAINED 2-layer WavLM (random weights) loaded with from_pretrained: "
    "exercises the real SSL code path; expect chance-level numbers",
}


@dataclass(frozen=True)
class DemoConfig:
    seed: int = 0
    n_sessions: int = 3  # 2 speakers each -> 2 x n_sessions folds
    utts_per_speaker: int = 24
    epochs: int = 10  # x3 by the step plan (heads/train/step_plan.py): ~100 training utterances per fold, 6 steps an epoch
    # The demo corpus has ~100 training utterances per fold: batch 64 would give 2 optimizer
    # steps per epoch and an under-trained head, so the demo uses 16 (real corpora keep 64).
    batch_size: int = 16
    # train-head's default: three heads per fold on folds this small, trained as one stacked computation
    # (~1.2x one head's time; bench/results/demo-cpu.md)
    ensemble: int | str = "auto"
    backends: tuple[str, ...] = ("fbank", "tiny-wavlm")
    ablation_backend: str = "fbank"  # the one run with GAP, SAP and SR; the others with SR only
    # Two single-threaded fold processes beat one two-threaded one on a small head
    # (measured: the same fold took half the CPU time with 1 thread as with 2).
    jobs: int = 2

    def validate(self) -> None:
        from heads.config import parse_ensemble

        parse_ensemble(self.ensemble)
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown or not self.backends:
            raise UserError(f"--backends takes a comma-separated subset of: {', '.join(BACKENDS)}")
        if self.n_sessions < 2:
            raise UserError("the demo needs at least 2 sessions (4 speakers) for leave-one-speaker-out folds")
        if self.utts_per_speaker < 4:
            raise UserError("the demo needs at least 4 utterances per speaker (one per class)")


def prepare_out(out: Path) -> None:
    """Refuse a non-empty folder that is not a previous demo; clear a previous demo."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise UserError(f"--out {out} is not empty and not a previous demo output; "
                            "choose an empty or new folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by `cli demo`; `cli demo` may replace this folder\n", encoding="utf-8")


def run_demo(out: str | Path, config: DemoConfig, console: Console | None = None) -> dict[str, Any]:
    """Run the demo into `out`; returns what it wrote to OUT/demo.json."""
    from extract.backends import tiny_wavlm
    from extract.config import ExtractConfig
    from extract.pipeline import run_extract
    from extract.synthetic import generate
    from heads.evaluate.plots import write_run_plots
    from heads.evaluate.report import load_run, render_tables, summarize_runs
    from heads.train.fold_loop import train_folds
    from heads.train.trainer import TrainConfig

    config.validate()
    console = console or Console(stderr=True)
    out = Path(out)
    prepare_out(out)
    start = time.perf_counter()
    console.rule("[bold]sapser demo[/bold]: synthetic corpus, offline, CPU")
    console.print("The numbers below check the pipeline; they are NOT emotion-recognition accuracy "
                  "(synthetic voices; the tiny WavLM is untrained).")

    console.print(f"[bold]1/4[/bold] synthesizing {config.n_sessions * 2} speakers "
                  f"x {config.utts_per_speaker} utterances (seed {config.seed})")
    manifest = generate(out / "corpus", seed=config.seed, n_sessions=config.n_sessions,
                        utts_per_speaker=config.utts_per_speaker)

    models = {"fbank": "fbank"}
    if "tiny-wavlm" in config.backends:
        models["tiny-wavlm"] = str(tiny_wavlm(out / "tiny-wavlm", seed=config.seed))
    caches: dict[str, Path] = {}
    for name in config.backends:
        console.print(f"[bold]2/4[/bold] extracting {name}: {BACKENDS[name]}")
        summary = run_extract("manifest", manifest, ExtractConfig(model=models[name], workers=0),
                              out=out / "features" / f"{name}.h5", progress=True)
        caches[name] = Path(summary["out"])

    train = TrainConfig(epochs=config.epochs, batch_size=config.batch_size, seed=config.seed, ensemble=config.ensemble)
    runs: list[Path] = []
    for name in config.backends:
        poolings = ("gap", "sap", "sr") if name == config.ablation_backend else ("sr",)
        for pooling in poolings:
            console.print(f"[bold]3/4[/bold] training {pooling.upper()} heads on {name}, all folds")
            run, _ = train_folds(caches[name], replace(train, pooling=pooling), out=out / "runs" / f"{name}-{pooling}",
                                 jobs=config.jobs, console=console)
            runs.append(run)

    console.print("[bold]4/4[/bold] report")
    plots = [str(p) for run in runs for p in write_run_plots(load_run(run))]
    summaries = summarize_runs(runs)
    stdout = Console()
    for table in render_tables(summaries, stdout.width, title="Demo: leave-one-speaker-out, mean over folds (95% CI)"):
        stdout.print(table)
    result = {
        "config": asdict(config),
        "backends": {name: BACKENDS[name] for name in config.backends},
        "caches": {name: str(path) for name, path in caches.items()},
        "runs": [str(r) for r in runs],
        "summaries": summaries,
        "plots": plots,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "demo.json").write_text(json.dumps(result, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    console.print(f"corpus: {out / 'corpus'}   caches: {out / 'features'}   runs: {out / 'runs'}")
    console.print(f"plots: {', '.join(plots)}")
    console.print(f"summary: {out / 'demo.json'}   ({result['seconds']:.0f} s)")
    console.print("Next: `cli report " + " ".join(str(r) for r in runs) + "` or the real workflow in README.md.")
    return result
