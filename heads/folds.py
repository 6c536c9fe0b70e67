"""Leave-one-speaker-out folds, as in the paper.

Fold K (from 1) tests the K-th speaker in sorted order and validates on the
other speaker of the test speaker's session; the rest train. A session with
one speaker, or more than two (manifest corpora without session pairs), has
no natural partner: the validation speaker is then the next speaker in
sorted order (cyclically) that is not the test speaker. The rule is in the
README.
"""

from __future__ import annotations

from dataclasses import dataclass

from extract.errors import UserError


class FoldError(UserError):
    """A fold that cannot be built; the message is one sentence for the user."""


@dataclass(frozen=True)
class Fold:
    fold: int  # from 1
    test_speaker: str
    val_speaker: str
    train_speakers: tuple[str, ...]


def plan_folds(speaker_sessions: dict[str, str]) -> list[Fold]:
    """All folds for speakers mapped to their sessions, one per speaker."""
    speakers = sorted(speaker_sessions)
    if len(speakers) < 3:
        raise FoldError(
            f"leave-one-speaker-out needs at least 3 speakers (test, validation, training); found {len(speakers)}"
        )
    by_session: dict[str, list[str]] = {}
    for spk in speakers:
        by_session.setdefault(speaker_sessions[spk], []).append(spk)
    folds = []
    for k, test in enumerate(speakers, start=1):
        mates = [s for s in by_session[speaker_sessions[test]] if s != test]
        if len(mates) == 1:
            val = mates[0]
        else:
            val = speakers[k % len(speakers)]
        train = tuple(s for s in speakers if s not in (test, val))
        folds.append(Fold(fold=k, test_speaker=test, val_speaker=val, train_speakers=train))
    return folds


def get_fold(speaker_sessions: dict[str, str], k: int) -> Fold:
    folds = plan_folds(speaker_sessions)
    if not 1 <= k <= len(folds):
        raise FoldError(f"fold {k} is out of range: this corpus has folds 1 to {len(folds)} (one per speaker)")
    return folds[k - 1]
