"""Real-speech evaluation: the heads and the classical baseline on an espeak-ng emotional corpus, all folds.

Why: synthetic corpora and random-weight models prove the plumbing, not that a
head learns from real speech features or beats the obvious baseline. This
harness makes (or reuses) the real-speech corpus of bench/speech_corpus.py,
extracts one cache per feature backend through `cli extract`, then runs
through the CLI, exactly as a user would:

- `cli baseline` (utterance mean+std + StandardScaler + logistic regression),
- `cli train-head --all-folds --pooling gap|sap|sr` for each variant of
  train-head options (`--variant NAME=OPTIONS`, e.g. `last=--layer 6`; the
  options after `--` go to every train-head run), and
- a reference computed here directly with opensmile + scikit-learn: the
  eGeMAPSv02 *functionals* (88 per utterance) + StandardScaler + linear SVM
  (class_weight="balanced"), on the same leave-one-speaker-out folds: the
  number a user of openSMILE would compare against.

It writes a markdown table (UA/WA mean and 95% CI over folds, the paired
per-fold difference against the baseline on the same cache, wall time and
load average per run, the machine) to bench/results/. What is not installed
(espeak-ng, opensmile, a --model folder) is skipped with a note in the table.

    python bench/real_speech.py [--work DIR] [--backend fbank --backend egemaps] [--model PATH ...]
        [--variant NAME=OPTIONS ...] [--heads gap,sap,sr] [--jobs N] [--out FILE] [-- TRAIN-HEAD OPTIONS]

Examples:
    python bench/real_speech.py                                   # fbank + egemaps, default heads
    python bench/real_speech.py --model /models/whisper-base --backend none \\
        --variant default= --variant last="--layer 6" -- --epochs 30
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# Run as a script, bench/ comes first on sys.path and bench/extract.py would shadow the `extract` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import numpy as np  # noqa: E402

from core.folds import plan_folds  # noqa: E402
from heads.evaluate.metrics import classification_metrics  # noqa: E402
from heads.evaluate.report import load_run, mean_ci, summarize  # noqa: E402

REPO = _HERE.parent
CLI = [sys.executable, str(REPO / "cli.py")]
HEADS = ("gap", "sap", "sr")
C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)


@dataclass
class Row:
    features: str
    method: str
    options: str = ""
    ua: dict | None = None
    wa: dict | None = None
    macro_f1: dict | None = None
    vs_baseline: dict | None = None  # paired per-fold UA difference, this run minus the baseline
    folds: int = 0
    seconds: float = float("nan")
    load: float = float("nan")  # 1-minute load average when the run started
    run: str = ""
    note: str = ""
    fold_ua: dict = field(default_factory=dict)  # fold -> UA, for the paired difference


# --- corpus and caches ----------------------------------------------------------------------


def make_corpus(work: Path, sessions: int, per_class: int, seed: int) -> Path:
    manifest = work / "corpus" / "manifest.csv"
    if manifest.is_file():
        check_corpus_options(work / "corpus", {"sessions": sessions, "per_class": per_class, "seed": seed})
        print(f"reusing the corpus {manifest}")
        return manifest
    if shutil.which("espeak-ng") is None:
        raise SystemExit(f"espeak-ng is not installed and {manifest} does not exist: cannot make the corpus "
                         "(Debian: apt-get install espeak-ng)")
    subprocess.run([sys.executable, str(_HERE / "speech_corpus.py"), str(work / "corpus"), "--sessions",
                    str(sessions), "--per-class", str(per_class), "--seed", str(seed)], check=True)
    return manifest


def check_corpus_options(corpus: Path, asked: dict[str, int]) -> None:
    """Refuse a corpus that bench/speech_corpus.py made with other options than these (its corpus.json).

    A corpus without corpus.json (made before it was written, or not by speech_corpus.py) is reused as is.
    """
    saved = corpus / "corpus.json"
    if not saved.is_file():
        return
    made = json.loads(saved.read_text())
    differ = [k for k in asked if made.get(k) != asked[k]]
    if differ:
        def options(values: dict) -> str:
            return " ".join(f"--{k.replace('_', '-')} {values.get(k)}" for k in differ)

        raise SystemExit(f"{corpus} was made with {options(made)}, not {options(asked)}: give another --work, "
                         f"or delete {corpus} to make it anew")


def backend_label(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model).name or model).strip("-") or "model"


def missing_backend(model: str) -> str:
    """Why `model` cannot be extracted here ("" when it can)."""
    if model == "egemaps" and importlib.util.find_spec("opensmile") is None:
        return "skipped: opensmile is not installed (pip install 'sapser[egemaps]')"
    if model not in ("fbank", "egemaps") and ("/" in model or model.startswith(".")) and not Path(model).exists():
        return f"skipped: no model folder {model}"
    return ""


def run_cli(args: list[str], log: Path) -> tuple[int, float, float]:
    """(exit code, wall seconds, 1-min load at start) of `python cli.py ARGS`, output into `log`."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with log.open("w") as fh:
        fh.write("$ cli " + shlex.join(args) + "\n")
        fh.flush()
        code = subprocess.run(CLI + args, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO).returncode
    return code, time.perf_counter() - start, load


def last_line(log: Path) -> str:
    lines = [x for x in log.read_text().splitlines() if x.strip()]
    return lines[-1][:200] if lines else ""


def extract(manifest: Path, model: str, work: Path, fresh: bool,
            options: list[str] | None = None) -> tuple[Path | None, Row]:
    label = backend_label(model)
    cache = work / "caches" / f"{label}.h5"
    row = Row(features=label, method="extract")
    why = missing_backend(model)
    if why:
        row.note = why
        return None, row
    if fresh and cache.exists():
        cache.unlink()
    code, row.seconds, row.load = run_cli(["extract", "--dataset", "manifest", "--root", str(manifest),
                                           "--model", model, "--out", str(cache), "--quiet", *(options or [])],
                                          work / "logs" / f"extract-{label}.log")
    if code != 0:
        row.note = f"failed (exit {code}): {last_line(work / 'logs' / f'extract-{label}.log')}"
        return None, row
    row.run = str(cache)
    return cache, row


# --- runs -------------------------------------------------------------------------------------


def summarize_into(row: Row, run: Path) -> Row:
    loaded = load_run(run)
    s = summarize(loaded)
    row.ua, row.wa, row.macro_f1, row.folds = s["ua"], s["wa"], s["macro_f1"], s["folds"]
    row.fold_ua = {m["fold"]: m["ua"] for m in loaded.folds}
    return row


def cli_run(args: list[str], run: Path, row: Row, work: Path, reuse: bool) -> Row:
    log = work / "logs" / f"{run.name}.log"
    if reuse and run.is_dir() and (run / "config.json").is_file():
        try:
            loaded = load_run(run)
            if not loaded.unfinished and len(loaded.folds) == len(loaded.config.get("folds", [])):
                row.note = "reused"
                row.run = str(run)
                return summarize_into(row, run)
        except Exception:  # noqa: BLE001 - anything unreadable is simply run again
            pass
    if run.exists():
        shutil.rmtree(run)  # never mix folds of an earlier run (other code, other options) into this one
    code, row.seconds, row.load = run_cli(args + ["--out", str(run), "--quiet"], log)
    row.run = str(run)
    if code != 0:
        row.note = f"failed (exit {code}): {last_line(log)}"
        return row
    return summarize_into(row, run)


def paired(row: Row, base: Row | None) -> None:
    if base is None or not base.fold_ua or not row.fold_ua:
        return
    common = sorted(set(row.fold_ua) & set(base.fold_ua))
    row.vs_baseline = mean_ci(row.fold_ua[k] - base.fold_ua[k] for k in common
                              if row.fold_ua[k] is not None and base.fold_ua[k] is not None)


# --- the openSMILE functionals reference ------------------------------------------------------


def functionals(manifest: Path, work: Path) -> tuple[list[dict], np.ndarray]:
    """Manifest rows and their (N, 88) eGeMAPSv02 functionals, cached in WORK/egemaps-functionals.npy."""
    import csv

    import opensmile

    with manifest.open() as fh:
        rows = list(csv.DictReader(fh))
    saved = work / "egemaps-functionals.npz"
    ids = np.array([r["utt_id"] for r in rows])
    if saved.is_file():
        data = np.load(saved, allow_pickle=False)
        if np.array_equal(data["ids"], ids):
            return rows, data["x"]
    smile = opensmile.Smile(feature_set=opensmile.FeatureSet.eGeMAPSv02,
                            feature_level=opensmile.FeatureLevel.Functionals)
    x = np.stack([smile.process_file(str(manifest.parent / r["path"])).to_numpy()[0] for r in rows])
    np.savez(saved, ids=ids, x=x)
    return rows, x


def reference_rows(manifest: Path, work: Path, classes: tuple[str, ...]) -> list[Row]:
    """eGeMAPS functionals + StandardScaler + linear SVM, leave-one-speaker-out on the heads' fold plan:
    C = 1 (scikit-learn's default, what a user runs first) and C chosen on the validation speaker."""
    if importlib.util.find_spec("opensmile") is None:
        return [Row("eGeMAPS functionals", "SVM (reference)", note="skipped: opensmile is not installed")]
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    load = os.getloadavg()[0]
    start = time.perf_counter()
    rows, x = functionals(manifest, work)
    speakers = np.array([r["speaker"] for r in rows])
    y = np.array([classes.index(r["emotion"]) for r in rows])
    folds = plan_folds({r["speaker"]: r.get("session") or r["speaker"] for r in rows})

    def svm(c: float):
        return make_pipeline(StandardScaler(), SVC(kernel="linear", C=c, class_weight="balanced"))

    out = []
    for label, choose in (("C = 1", False), ("C on the validation speaker", True)):
        uas, was, f1s = {}, [], []
        for f in folds:
            train, val, test = (np.isin(speakers, s) for s in (f.train_speakers, [f.val_speaker], [f.test_speaker]))
            c = 1.0
            if choose:  # the best validation UA; ties keep the smaller C
                scores = [classification_metrics(y[val], svm(c).fit(x[train], y[train]).predict(x[val]), classes)["ua"]
                          for c in C_GRID]
                c = C_GRID[int(np.argmax(scores))]
            m = classification_metrics(y[test], svm(c).fit(x[train], y[train]).predict(x[test]), classes)
            uas[f.fold] = m["ua"]
            was.append(m["wa"])
            f1s.append(m["macro_f1"])
        out.append(Row("eGeMAPS functionals", f"SVM (reference), {label}", "opensmile + scikit-learn",
                       ua=mean_ci(uas.values()), wa=mean_ci(was), macro_f1=mean_ci(f1s), folds=len(folds),
                       load=load, fold_ua=uas))
    out[-1].seconds = out[0].seconds = time.perf_counter() - start  # both rows: one feature pass
    return out


# --- the report -------------------------------------------------------------------------------


def pct(stat: dict | None, *, points: bool = False) -> str:
    if not stat or stat["mean"] is None:
        return "–"
    f = "{:+.1f}" if points else "{:.1f}"
    text = f.format(100 * stat["mean"])
    if stat["ci95"] is not None:
        text += " (" + ", ".join(f.format(100 * v) for v in stat["ci95"]) + ")"
    return text


def machine() -> str:
    import torch

    from bench.machine import cpu_name

    cpu = cpu_name()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}; Python {platform.python_version()}, torch {torch.__version__}"


def code_version() -> str:
    """The commit the runs used (from a git checkout), or "unknown"."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def write_report(path: Path, rows: list[Row], *, command: str, corpus: str, started: str, loads: tuple) -> None:
    lines = [
        "# Real speech: heads vs the classical baseline (bench/real_speech.py)",
        "",
        f"Command: `{command}` (code at commit {code_version()})",
        "",
        f"Corpus: {corpus}",
        "",
        f"Machine: {machine()}. Started {started}; load average (1, 5, 15 min) at the start "
        f"{loads[0][0]:.1f}, {loads[0][1]:.1f}, {loads[0][2]:.1f} and at the end {loads[1][0]:.1f}, "
        f"{loads[1][1]:.1f}, {loads[1][2]:.1f} (the machine may be shared: wall times are noisy).",
        "",
        "UA, WA, macro-F1: mean over the leave-one-speaker-out folds with the 95% CI (t-distribution), in % "
        "(UA = WA when every test speaker has the same number of utterances per class, as in this corpus). "
        "\"vs baseline\": this run's UA minus the baseline's (`cli baseline`, same cache) fold by fold, mean "
        "and 95% CI, in points. Load: 1-minute load average when the run started.",
        "",
        "| features | method | options | folds | UA % | WA % | macro-F1 % | vs baseline (UA points) "
        "| wall | load | note |",
        "|---|---|---|---:|---|---|---|---|---:|---:|---|",
    ]
    extractions = [r for r in rows if r.method == "extract"]
    for r in (r for r in rows if r.method != "extract"):
        wall = "–" if r.seconds != r.seconds else f"{r.seconds:.0f} s"
        load = "–" if r.load != r.load else f"{r.load:.1f}"
        lines.append(f"| {r.features} | {r.method} | {r.options or '(defaults)'} | {r.folds or '–'} | {pct(r.ua)} "
                     f"| {pct(r.wa)} | {pct(r.macro_f1)} | {pct(r.vs_baseline, points=True)} | {wall} | {load} "
                     f"| {r.note} |")
    lines += ["", "Extraction (`cli extract --dataset manifest --model M`, whole corpus):", "",
              "| features | wall | load | cache | note |", "|---|---:|---:|---|---|"]
    for r in extractions:
        wall = "–" if r.seconds != r.seconds else f"{r.seconds:.0f} s"
        load = "–" if r.load != r.load else f"{r.load:.1f}"
        lines.append(f"| {r.features} | {wall} | {load} | {Path(r.run).name if r.run else '–'} | {r.note} |")
    lines += ["", "Run folders and logs are under the work folder (`cli report RUN` for per-class recall "
              "and plots)."]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


# --- main -------------------------------------------------------------------------------------


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, options = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise SystemExit(f"--variant must be NAME=OPTIONS with a plain NAME (e.g. last='--layer 6'); got {text!r}")
    return name, shlex.split(options)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    given = list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/sapser-real-speech"),
                    help="corpus, caches, runs and logs (reused between invocations)")
    ap.add_argument("--sessions", type=int, default=5, help="corpus: sessions (2 speakers each)")
    ap.add_argument("--per-class", type=int, default=9, help="corpus: utterances per speaker and emotion")
    ap.add_argument("--seed", type=int, default=0, help="corpus seed")
    ap.add_argument("--backend", action="append", default=None,
                    help="fbank, egemaps (repeatable) [default: both]; 'none' for only --model")
    ap.add_argument("--model", action="append", default=[], help="also a Hugging Face id or local model folder")
    ap.add_argument("--heads", default="gap,sap,sr", help="pooling heads to train, comma-separated")
    ap.add_argument("--variant", action="append", default=None,
                    help="NAME=train-head options, repeatable [default: default= (no options)]")
    ap.add_argument("--baseline-options", default="", help="options for every `cli baseline` run")
    ap.add_argument("--jobs", type=int, default=1, help="train-head --jobs (folds in parallel processes)")
    ap.add_argument("--no-reference", action="store_true", help="skip the openSMILE functionals + SVM rows")
    ap.add_argument("--reuse-runs", action="store_true",
                    help="keep finished run folders from an earlier invocation instead of training again")
    ap.add_argument("--fresh", action="store_true", help="extract the caches again too")
    ap.add_argument("--extract-options", default="",
                    help="options for every `cli extract` run (e.g. '--amp none'); name the model folder "
                         "differently (a symlink) to keep caches made with other options apart")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "real-speech-cpu.md",
                    help="the markdown report")
    args = ap.parse_args(argv)
    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    if any(h not in HEADS for h in heads):
        raise SystemExit(f"--heads takes gap, sap, sr; got {args.heads!r}")
    variants = [parse_variant(v) for v in (args.variant or ["default="])]
    backends = [b for b in (args.backend or ["fbank", "egemaps"]) if b != "none"] + args.model

    work = args.work.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    (work / "runs").mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    load_start = os.getloadavg()
    manifest = make_corpus(work, args.sessions, args.per_class, args.seed)
    rows: list[Row] = []
    classes = ("angry", "happy", "neutral", "sad")
    if not args.no_reference:
        print("reference: eGeMAPS functionals + SVM")
        rows += reference_rows(manifest, work, classes)
    base_options = shlex.split(args.baseline_options)
    for model in backends:
        print(f"features: {model}")
        cache, ext = extract(manifest, model, work, args.fresh, shlex.split(args.extract_options))
        rows.append(ext)
        if cache is None:
            continue
        label = backend_label(model)
        base = cli_run(["baseline", "--cache", str(cache), *base_options], work / "runs" / f"{label}-baseline",
                       Row(label, "baseline", shlex.join(base_options)), work, args.reuse_runs)
        rows.append(base)
        for name, options in variants:
            for head in heads:
                opts = [*options, *extra]
                print(f"  {head} {name}: {shlex.join(opts)}")
                row = cli_run(["train-head", "--cache", str(cache), "--all-folds", "--pooling", head,
                               "--jobs", str(args.jobs), *opts],
                              work / "runs" / f"{label}-{head}-{name}", Row(label, head.upper(), shlex.join(opts)),
                              work, args.reuse_runs)
                paired(row, base)
                rows.append(row)
    command = ("python bench/real_speech.py " + shlex.join(given)).rstrip()
    corpus = (f"bench/speech_corpus.py, {args.sessions} sessions x 2 speakers, {args.per_class} utterances per "
              f"speaker and class (angry, happy, neutral, sad), seed {args.seed}: "
              f"{2 * args.sessions * 4 * args.per_class} utterances, {2 * args.sessions} leave-one-speaker-out "
              "folds (validation speaker = the session partner).")
    write_report(args.out, rows, command=command, corpus=corpus, started=started, loads=(load_start, os.getloadavg()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
