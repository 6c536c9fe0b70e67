"""Peak memory of `cli extract` at 50, 400 and 4,000 utterances, and where it goes.

    python bench/extract_memory.py --before 4780abb                        # that commit vs this tree, every case
    python bench/extract_memory.py --sizes 50,400 --models tiny              # a quick look
    python bench/extract_memory.py --dry-run --results /tmp/x.md            # seconds (tests)

Each case is `python REPO/cli.py extract --dataset manifest --root CSV --model DIR --out F.h5
--quiet --json` in a fresh process, at its default settings (one utterance per forward on a
CPU), on the same synthetic corpus and the same saved model; `--before DIR` runs a second
checkout (`--before REV`: `git archive REV`, unpacked in the work folder) on the same files,
alternating, so both see the same machine. Reported: the extraction process's peak RSS (wait4), the peak of
the summed RSS of its process tree (sampled every 0.1 s: audio worker processes count there),
wall time and x real time.

Models (random weights; memory depends on the shapes, not the values):
- tiny: the tests' 2-layer, 32-wide WavLM (`extract.backends.tiny_wavlm`), conv front end
  32 channels wide;
- tiny-conv512: the same transformer behind WavLM's real conv front end (7 layers, 512
  channels, as in every WavLM / wav2vec2 / HuBERT checkpoint), where a real model's memory
  grows per distinct utterance length (oneDNN's primitive cache, see extract.backends).
Corpora: the synthetic corpus (extract/synthetic.py, seed 0), utterances of 0.8-1.8 s of
voice within 0.1-1 s of room noise on each side (~2.7 s each).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository ahead of bench/

SESSIONS = {50: 5, 400: 10, 4000: 20}  # speakers = 2 x sessions; utterances per speaker = n / speakers
MODELS = ("tiny", "tiny-conv512")


def corpus(work: Path, n: int) -> Path:
    from extract.synthetic import generate

    folder = work / f"corpus-{n}"
    if (folder / "manifest.csv").exists():
        return folder / "manifest.csv"
    sessions = SESSIONS.get(n, max(1, n // 20))
    return generate(folder, seed=0, n_sessions=sessions, utts_per_speaker=max(1, n // (2 * sessions)))


def model(work: Path, name: str) -> Path:
    import torch
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMModel

    from extract.backends import tiny_wavlm

    path = work / name
    if (path / "config.json").exists():
        return path
    if name == "tiny":
        return tiny_wavlm(path)
    config = WavLMConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         feat_extract_norm="layer", do_stable_layer_norm=True, num_conv_pos_embeddings=16,
                         num_conv_pos_embedding_groups=4, num_buckets=32, max_bucket_distance=64)  # conv_dim 512 x 7
    torch.manual_seed(0)
    WavLMModel(config).save_pretrained(path)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(path)
    return path


def tree_rss_mb(pid: int) -> float:
    """Summed RSS of `pid` and its descendants (from /proc), in MiB."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry.name))
            rss[int(entry.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo += children.get(p, [])
    return total / 2**20


def measure(repo: Path, csv_path: Path, model_dir: Path, out: Path, extra: list[str]) -> dict:
    """One `cli extract` in a fresh process: peak RSS (its own, and its process tree's), wall time."""
    for p in (out, out.with_suffix(".data"), out.with_suffix(".parts")):
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    cmd = [sys.executable, str(repo / "cli.py"), "extract", "--dataset", "manifest", "--root", str(csv_path),
           "--model", str(model_dir), "--out", str(out), "--quiet", "--json", *extra]
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}  # each repo's own default
    load = os.getloadavg()[0]
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, text=True, cwd=repo, env=env)
        tree_peak, done = [0.0], threading.Event()

        def sample() -> None:
            while not done.wait(0.1):
                tree_peak[0] = max(tree_peak[0], tree_rss_mb(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
        stdout.seek(0), stderr.seek(0)
        text, errors = stdout.read().strip(), stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{errors[-3000:]}")
    summary = json.loads(text)
    audio = summary["audio_hours"] * 3600
    return {"rss": usage.ru_maxrss / 1024, "tree": max(tree_peak[0], usage.ru_maxrss / 1024), "wall": wall,
            "x": audio / wall if wall else 0.0, "hours": summary["audio_hours"], "written": summary["written"],
            "load": load}


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()


def commit_of(rev: str) -> str:
    try:
        return git("rev-parse", "--short", rev)
    except (OSError, subprocess.CalledProcessError):
        return rev


def dirty() -> bool:
    try:
        return bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return False


def checkout(rev: str, work: Path) -> Path:
    """The tree of revision `rev` unpacked under `work` (no git worktree: nothing changes in .git)."""
    folder = work / f"before-{rev}"
    if not (folder / "cli.py").exists():
        folder.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="50,400,4000", help="utterance counts")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated: {', '.join(MODELS)}")
    ap.add_argument("--max-conv512", type=int, default=400, help="largest corpus for tiny-conv512 (its front end "
                                                                 "is ~50x the tiny model's work)")
    ap.add_argument("--before", help="a git revision to compare with (its cli.py is run on the same files)")
    ap.add_argument("--extra", default="", help="options added to every `cli extract` (e.g. '--workers 2')")
    ap.add_argument("--work", type=Path, help="keep corpora and models here between runs")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "extract-memory-cpu.md")
    ap.add_argument("--dry-run", action="store_true", help="20 utterances, the tiny model, one run: seconds")
    args = ap.parse_args()
    sizes = [20] if args.dry_run else [int(x) for x in args.sizes.split(",")]
    models = ["tiny"] if args.dry_run else [m.strip() for m in args.models.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="sapser-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    repos = {"after": ROOT} | ({"before": checkout(args.before, work)} if args.before else {})
    rows = []
    for name in models:
        model_dir = model(work, name)
        for n in sizes:
            if name == "tiny-conv512" and n > args.max_conv512:
                continue
            csv_path = corpus(work, n)
            row = {"model": name, "n": n}
            for label, repo in sorted(repos.items(), reverse=True):  # before, then after
                r = measure(repo, csv_path, model_dir, work / f"{label}.h5", args.extra.split())
                row[label] = r
                print(f"{name} {n} {label}: peak RSS {r['rss']:.0f} MiB (tree {r['tree']:.0f}), "
                      f"{r['wall']:.1f} s, {r['x']:.1f}x real time @ load {r['load']:.1f}", flush=True)
            rows.append(row)
    write_results(args, rows, repos)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def write_results(args: argparse.Namespace, rows: list[dict], repos: dict[str, Path]) -> None:
    labels = [label for label in ("before", "after") if label in repos]
    commits = ", ".join(f"{label} {commit_of(args.before if label == 'before' else 'HEAD')}"
                        + (" (+ uncommitted changes)" if label == "after" and dirty() else "") for label in labels)
    lines = [
        "# Extraction memory: peak RSS of `cli extract` by corpus size (cpu)",
        "",
        f"- Date: {datetime.date.today().isoformat()}",
        f"- Commit: {commits}",
        f"- Machine: {platform_line()}",
        f"- Command: `python bench/extract_memory.py {' '.join(sys.argv[1:])}`",
        "- Each case: `cli extract` at its defaults in a fresh process (one utterance per forward, "
        "audio in a thread, --buffer-mb 512 where the commit has it); RSS = the process's peak "
        "(wait4); tree = peak of the summed RSS of it and its children (sampled every 0.1 s).",
        "",
    ]
    head = ["model", "utterances", "audio h"]
    for label in labels:
        head += [f"{label}: peak RSS MiB", f"{label}: tree MiB", f"{label}: wall s (x real time)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        first = row[labels[0]]
        cells = [row["model"], f"{row['n']:,}", f"{first['hours']:.2f}"]
        for label in labels:
            r = row[label]
            cells += [f"{r['rss']:.0f}", f"{r['tree']:.0f}", f"{r['wall']:.1f} ({r['x']:.0f}x)"]
        lines.append("| " + " | ".join(cells) + " |")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.results}")


def platform_line() -> str:
    from bench.machine import cpu_name

    import torch

    return (f"{cpu_name()}, {os.cpu_count()} cores, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} "
            f"GiB RAM; Python {platform.python_version()}, torch {torch.__version__}; load average "
            f"{os.getloadavg()[0]:.1f} at the end (a shared machine: times are noisy, RSS is not)")


if __name__ == "__main__":
    main()
