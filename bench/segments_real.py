"""`cli predict --segments` on real speech: one speaker's corpus files joined into a long recording, scored.

    python bench/segments_real.py --manifest /data/espeak-A/manifest.csv --out /tmp/seg-real \\
        --speaker Ses01F --run runs/espeak-A-fbank-sr/fold-01 --speaker Ses01M --run runs/espeak-A-fbank-sr/fold-02

Per `--speaker` (with its `--run`), into OUT/<speaker>/: recording.wav (the speaker's files in manifest order, each followed by a pause of
`--pause` seconds drawn uniformly, filled with low room noise), OUT/truth.csv (start, end, utt_id,
emotion of each file in the recording), then `write_segments` (what `cli predict --segments`
runs: segments.csv, timeline.png) at the default rule, and matches each segment to the file it overlaps most. Give the fold whose TEST
speaker is `--speaker`: no file of the recording was in its training split (its validation
speaker's never are either), so the emotions it predicts are honest. Prints, and writes to
`--results`, the segment counts, how well segments line up with the files, the accuracy of the
segments' emotions against their files' labels beside the fold's accuracy on the same files
predicted whole (`predict_one`), the first rows of the first speaker's segments.csv, and with
`--sweep` the segments' UA under other pads and merge gaps.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository ahead of bench/

NOISE_DBFS = -60.0  # the pauses: white noise this far below full scale (digital silence is not a room)


def make_recording(manifest: Path, speaker: str, out: Path, pause: tuple[float, float], seed: int) -> list[dict]:
    """OUT/recording.wav and OUT/truth.csv, written file by file; returns the truth rows."""
    import numpy as np
    import soundfile as sf

    from extract.audio import load_audio, to_int16

    rng = np.random.default_rng(seed)
    with manifest.open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["speaker"] == speaker]
    if not rows:
        raise SystemExit(f"{manifest} has no utterance of speaker {speaker}")
    truth, pos = [], 0
    with sf.SoundFile(str(out / "recording.wav"), "w", samplerate=16_000, channels=1, subtype="PCM_16") as fh:
        for r in rows:
            x = load_audio(manifest.parent / r["path"]).samples
            fh.write(to_int16(x))
            truth.append({"start": pos / 16_000, "end": (pos + len(x)) / 16_000, "utt_id": r["utt_id"],
                          "emotion": r["emotion"]})
            pos += len(x)
            gap = round(rng.uniform(*pause) * 16_000)
            fh.write(to_int16(rng.normal(0, 10 ** (NOISE_DBFS / 20), gap)))
            pos += gap
    with (out / "truth.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(truth[0]))
        writer.writeheader()
        writer.writerows({**t, "start": f"{t['start']:.3f}", "end": f"{t['end']:.3f}"} for t in truth)
    return truth


def score(seg: "pd.DataFrame", truth: "pd.DataFrame", classes: list[str]) -> dict:
    """Match each segment to the file it overlaps most; counts and the segments' accuracy against the files' labels."""
    import numpy as np

    overlap = np.clip(np.minimum(seg["end"].to_numpy()[:, None], truth["end"].to_numpy()[None])
                      - np.maximum(seg["start"].to_numpy()[:, None], truth["start"].to_numpy()[None]), 0, None)
    match = overlap.argmax(1)
    seg["utt_id"] = truth["utt_id"].to_numpy()[match]
    seg["true"] = truth["emotion"].to_numpy()[match]
    per_file = np.bincount(match, minlength=len(truth))
    correct = seg["emotion"] == seg["true"]
    return {"segments": len(seg), "one": int((per_file == 1).sum()), "none": int((per_file == 0).sum()),
            "inside": int((overlap.max(1) / (seg["end"] - seg["start"]) >= 0.95).sum()),
            "wa": float(correct.mean()), "ua": ua_of(correct, seg["true"], classes)}


def ua_of(correct: "pd.Series", true: "pd.Series", classes: list[str]) -> float:
    import numpy as np

    return float(np.mean([correct[true == c].mean() for c in classes if (true == c).any()]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--speaker", action="append", required=True, help="a speaker (repeat with --run)")
    parser.add_argument("--run", type=Path, action="append", required=True,
                        help="the fold whose test speaker is the --speaker at the same place")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pause", default="0.6,2.0", help="pause after each file, seconds: low,high")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sweep", default="", help="pad/merge-gap pairs to score as well, e.g. 0.1/0.3,0.3/0.6")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "segments-real-speech.md")
    parser.add_argument("--rows", type=int, default=8, help="segments.csv rows to show")
    args = parser.parse_args()
    if len(args.speaker) != len(args.run):
        raise SystemExit("give one --run per --speaker")
    import pandas as pd

    from bench.machine import cpu_name
    from extract.segments import SegmentRule
    from heads.predict import load_predictor, write_segments

    lo, hi = (float(v) for v in args.pause.split(","))
    with args.manifest.open() as fh:
        paths = {r["utt_id"]: args.manifest.parent / r["path"] for r in csv.DictReader(fh)}
    rows, sweep, shown = [], [], None
    for speaker, run in zip(args.speaker, args.run):
        out = args.out / speaker
        out.mkdir(parents=True, exist_ok=True)
        truth = pd.DataFrame(make_recording(args.manifest, speaker, out, (lo, hi), args.seed))
        predictor = load_predictor(run)
        classes = list(predictor.classes)
        start = time.perf_counter()
        done = write_segments(predictor, out / "recording.wav", out)
        wall = time.perf_counter() - start
        seg = pd.read_csv(out / "segments.csv")
        scores = score(seg, truth, classes)
        # the same files predicted whole (`cli predict FILE`): what the fold scores on them as utterances
        whole = pd.Series([predictor.predict_one(paths[u]).emotion == e for u, e in zip(truth["utt_id"],
                                                                                       truth["emotion"])])
        rows.append({"speaker": speaker, "run": run, "files": len(truth), "seconds": done["seconds"], "wall": wall,
                     **scores, "whole_ua": ua_of(whole, truth["emotion"], classes)})
        if shown is None:
            shown = seg.head(args.rows)[["start", "end", "emotion", *[f"prob_{c}" for c in classes], "speech_ratio",
                                         "utt_id", "true"]]
        for pair in filter(None, args.sweep.split(",")):
            pad, merge = (float(v) for v in pair.split("/"))
            found = [{"start": s.start, "end": s.end, "emotion": s.prediction.emotion}
                     for s in predictor.predict_segments(out / "recording.wav", SegmentRule(pad=pad, merge_gap=merge))]
            sweep.append({"speaker": speaker, "pad": pad, "merge": merge,
                          **score(pd.DataFrame(found), truth, classes)})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    rule = SegmentRule()
    lines = [
        "# `cli predict --segments` on real speech: espeak-ng speakers' files joined into long recordings", "",
        f"- Date: {datetime.date.today().isoformat()}",
        f"- Commit: {commit}",
        f"- Machine: {cpu_name()}, {os.cpu_count()} cores; Python {platform.python_version()}; "
        f"load average {os.getloadavg()[0]:.1f}",
        f"- Command: `python bench/segments_real.py {' '.join(sys.argv[1:])}`",
        f"- Recordings: each speaker's files in manifest order, each followed by {lo:g}-{hi:g} s of noise at "
        f"{NOISE_DBFS:g} dBFS; predicted by the fold whose test speaker it is, at the default rule (min "
        f"{rule.min_segment:g} s, max {rule.max_segment:g} s, merge gap {rule.merge_gap:g} s, pad {rule.pad:g} s)",
        "- A segment belongs to the file it overlaps most; UA/WA of segments = their predicted emotion against "
        "that file's label; \"whole\" = the same fold on the same files, each predicted as a file (`cli predict`)", "",
        "| speaker | fold | recording | files | segments | files with one segment | files with none | "
        "segments >= 95 % inside one file | segments: WA % | segments: UA % | files whole: UA % | wall s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {r['speaker']} | `{r['run']}` | {r['seconds'] / 60:.1f} min | {r['files']} | {r['segments']} | "
          f"{r['one']} | {r['none']} | {r['inside']} | {100 * r['wa']:.1f} | {100 * r['ua']:.1f} | "
          f"{100 * r['whole_ua']:.1f} | {r['wall']:.1f} |" for r in rows],
    ]
    if sweep:
        lines += ["", "Other pads and merge gaps on the same recordings (UA of the segments, %):", "",
                  "| speaker | pad s | merge gap s | segments | segments: UA % |", "|---|---:|---:|---:|---:|",
                  *[f"| {r['speaker']} | {r['pad']:g} | {r['merge']:g} | {r['segments']} | {100 * r['ua']:.1f} |"
                    for r in sweep]]
    lines += ["", f"The first rows of {args.speaker[0]}'s segments.csv, with the file each segment overlaps most "
              "(`utt_id`, its label `true`):", "",
              "| " + " | ".join(shown.columns) + " |", "|" + "---|" * len(shown.columns),
              *["| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r) + " |"
                for r in shown.itertuples(index=False)]]
    args.results.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
