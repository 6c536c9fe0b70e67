"""What a corpus read gave: counts per class and speaker, the fold plan, the skips.

`summarize` is what `cli manifest` prints (as tables, or as JSON with `--json`).
"""

from __future__ import annotations

from collections import Counter

from rich.table import Table

from core.folds import PROTOCOLS, FoldError, corpus_groups, plan
from core.records import SKIP_REASONS, Corpus


def summarize(corpus: Corpus, protocol: str = "speaker") -> dict:
    """A JSON-ready summary; a plan that cannot be made (e.g. < 3 speakers) gives no folds and a `folds_note`.

    Folds are listed as {fold, test_<group>, val_<group>, n_test} with <group> the
    protocol's (speaker, session or split); `protocol` names it.
    """
    speakers = corpus.speaker_counts()
    summary: dict = {
        "dataset": corpus.name,
        "root": corpus.root,
        "utterances": len(corpus.utterances),
        "classes": corpus.class_counts(),
        "speakers": speakers,
        "skipped": corpus.skip_counts(),
        "folds": [],
    }
    # Utterances with only dimensional labels (manifest corpora) have no class.
    no_class = sum(1 for u in corpus.utterances if u.emotion is None)
    if no_class:
        summary["no_emotion"] = no_class
    adjusted = getattr(corpus, "adjusted", {})
    if adjusted:
        summary["adjusted"] = dict(sorted(adjusted.items()))
    groups = corpus_groups(corpus)
    summary["protocol"] = protocol
    try:
        folds = plan(groups, protocol)
    except FoldError as err:
        summary["folds_note"] = str(err)
        return summary
    for f in folds:
        roles = f.roles(groups[f.column])
        summary["folds"].append({"fold": f.fold, f"test_{protocol}": f.test, f"val_{protocol}": f.val,
                                 "n_test": int((roles == "test").sum())})
        if protocol != "speaker":  # speaker folds keep their historical four keys
            summary["folds"][-1].update(n_val=int((roles == "val").sum()), n_train=int((roles == "train").sum()))
    return summary


def sessions_of(corpus: Corpus) -> dict[str, str]:
    """Speaker -> session, sorted by speaker (for the speaker table)."""
    return dict(sorted(corpus.speaker_sessions().items()))


def speaker_classes(corpus: Corpus) -> dict[str, dict[str, int]]:
    """Speaker -> {class: count}, every class present (zeros included)."""
    counts = Counter((u.speaker, u.emotion) for u in corpus.utterances)
    return {
        spk: {c: counts.get((spk, c), 0) for c in corpus.classes}
        for spk in sorted({u.speaker for u in corpus.utterances})
    }


def summary_tables(corpus: Corpus, summary: dict) -> list[Table]:
    """Rich tables for the console: per speaker x class, folds, skips by reason."""
    sessions = sessions_of(corpus)
    counts = Table(title=f"{summary['dataset']}: {summary['utterances']} utterances ({summary['root']})")
    counts.add_column("speaker")
    counts.add_column("session")
    for c in corpus.classes:
        counts.add_column(c, justify="right")
    counts.add_column("total", justify="right")
    for spk, per_class in speaker_classes(corpus).items():
        counts.add_row(spk, sessions[spk], *map(str, per_class.values()), str(summary["speakers"][spk]))
    counts.add_row("all", "", *map(str, summary["classes"].values()), str(summary["utterances"]), style="bold")

    protocol = summary.get("protocol", "speaker")
    folds = Table(title=PROTOCOLS.label(protocol))
    for name in ("fold", f"test {protocol}", f"validation {protocol}", "test utterances"):
        folds.add_column(name, justify="right" if name in ("fold", "test utterances") else "left")
    for f in summary["folds"]:
        folds.add_row(str(f["fold"]), f[f"test_{protocol}"], f[f"val_{protocol}"], str(f["n_test"]))
    if "folds_note" in summary:
        folds.caption = summary["folds_note"]

    skipped = Table(title="skipped items")
    skipped.add_column("reason")
    skipped.add_column("count", justify="right")
    skipped.add_column("meaning")
    for reason, n in summary["skipped"].items():
        skipped.add_row(reason, str(n), SKIP_REASONS[reason])
    notes = [f"{k.replace('_', ' ')}: {v} (into 1-5)" for k, v in summary.get("adjusted", {}).items()]
    if summary.get("no_emotion"):
        notes.append(f"{summary['no_emotion']} utterances have valence/arousal only (no emotion)")
    if notes:
        skipped.caption = "; ".join(notes)
    return [counts, folds, skipped]
