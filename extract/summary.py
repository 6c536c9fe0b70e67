"""What a corpus read gave: counts per class and speaker, the fold plan, the skips.

`summarize` is what `cli manifest` prints (as tables, or as JSON with `--json`).
"""

from __future__ import annotations

from collections import Counter

from extract.records import Corpus
from heads.folds import FoldError, plan_folds


def summarize(corpus: Corpus) -> dict:
    """A JSON-ready summary; fewer than 3 speakers give no folds and a `folds_note`, not an error."""
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
    try:
        folds = plan_folds(corpus.speaker_sessions())
    except FoldError as err:
        summary["folds_note"] = str(err)
        return summary
    summary["folds"] = [
        {"fold": f.fold, "test_speaker": f.test_speaker, "val_speaker": f.val_speaker, "n_test": speakers[f.test_speaker]}
        for f in folds
    ]
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
