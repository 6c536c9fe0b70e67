"""Fold plans: leave-one-speaker-out (the paper), leave-one-session-out (SUPERB-ER, EmoBox) and official splits.

A fold holds out groups of one column of the metadata (`Fold.column`):

- `speaker` (default, the paper): fold K (from 1) tests the K-th speaker in
  sorted order and validates on the other speaker of the test speaker's
  session; the rest train. A session with one speaker, or more than two
  (manifest corpora without session pairs), has no natural partner: the
  validation speaker is then the next speaker in sorted order (cyclically)
  that is not the test speaker.
- `session`: fold K tests the K-th session in sorted order (IEMOCAP: 5 folds)
  and validates on the next session (cyclically); the other sessions train.
  SUPERB-ER instead validates on a random 20 % of the training sessions'
  utterances, so it trains on 4 sessions where this plan trains on 3 and
  validates on unseen speakers: expect numbers slightly below theirs.
- `corpus` (cross-corpus, several caches read as one, cache/corpus_set.py): fold K
  tests corpus K, all of it, and trains on the other training corpora; the
  validation speakers are each training corpus's last session in sorted order
  (`cross_corpus_groups`: its utterances are group "NAME#val", the rest "NAME"). With
  test-only corpora (`--test-cache`) the folds are one per test corpus and
  every other corpus trains; without them, leave-one-corpus-out.
- `split`: one fold from the manifest's `split` column: `train`, `val` (also
  `valid`, `validation`, `dev`, `development`) and `test`, case-insensitive.
  Utterances with an empty split take no part; any other value is refused,
  naming it (MSP-Podcast's Test1/Test2: write `test` for the one to use).

Every utterance of the held-out groups is in test (or validation), none in
training: folds are disjoint by construction and tested so. The plan is
recorded in RUN/config.json ("protocol", "folds").
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

from core.choices import Choice, Choices
from core.errors import UserError

if TYPE_CHECKING:  # pandas is imported by the callers that hand tables in; `cli --help` needs none
    import pandas as pd

    from core.records import Corpus

SPLIT_ALIASES: dict[str, str] = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val",
                                 "development": "val", "test": "test"}
ROLES: tuple[str, ...] = ("train", "val", "test")


class FoldError(UserError):
    """A fold that cannot be built; the message is one sentence for the user."""


@dataclass(frozen=True)
class Fold:
    fold: int  # from 1
    test: str  # the held-out group: a speaker, a session, or the split "test"
    val: str
    train: tuple[str, ...]
    protocol: str = "speaker"

    @property
    def column(self) -> str:
        """The metadata column whose values the groups are."""
        return "corpus_group" if self.protocol == "corpus" else self.protocol

    # The held-out group under its historical names: metrics.json, reports and
    # older code call it the test/validation "speaker" whatever the protocol.
    @property
    def test_speaker(self) -> str:
        return self.test

    @property
    def val_speaker(self) -> str:
        return self.val

    @property
    def train_speakers(self) -> tuple[str, ...]:
        return self.train

    def role(self, group: str) -> str:
        """"train", "val", "test", or "" for a group that takes no part."""
        if self.protocol == "corpus":  # "NAME" or "NAME#val" (a training corpus's validation speakers)
            name, _, val = group.partition("#")
            return "test" if name == self.test else ("val" if val else "train") if name in self.train else ""
        group = split_name(group) if self.protocol == "split" else group
        if group == self.test:
            return "test"
        if group == self.val:
            return "val"
        return "train" if group in self.train else ""

    def roles(self, groups: pd.Series) -> pd.Series:
        """The role of each utterance, from its value of `column` (same index)."""
        return groups.astype(str).map(self.role)


def plan_folds(speaker_sessions: dict[str, str]) -> list[Fold]:
    """Leave-one-speaker-out: one fold per speaker, for speakers mapped to their sessions."""
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
        folds.append(Fold(fold=k, test=test, val=val, train=train))
    return folds


def plan_session_folds(sessions: Iterable[str]) -> list[Fold]:
    """Leave-one-session-out: fold K tests session K (sorted) and validates on the next one."""
    names = sorted(set(str(s) for s in sessions))
    if len(names) < 3:
        raise FoldError(f"leave-one-session-out needs at least 3 sessions (test, validation, training); "
                        f"found {len(names)}")
    folds = []
    for k, test in enumerate(names, start=1):
        val = names[k % len(names)]
        folds.append(Fold(fold=k, test=test, val=val, train=tuple(s for s in names if s not in (test, val)),
                          protocol="session"))
    return folds


def split_name(value: str) -> str:
    """A split cell -> train / val / test, "" for empty; unknown names pass through (plan_split_fold refuses them)."""
    v = str(value).strip().lower()
    return SPLIT_ALIASES.get(v, v)


def plan_split_fold(splits: Iterable[str]) -> list[Fold]:
    """The one fold of an official split."""
    counts = Counter(split_name(s) for s in splits)
    counts.pop("", None)
    unknown = sorted(k for k in counts if k not in ROLES)
    if unknown:
        raise FoldError(f"the split column holds {', '.join(repr(u) for u in unknown)}; use train, val (or dev) and "
                        "test, and leave the cell empty for utterances that take no part")
    missing = [r for r in ROLES if not counts.get(r)]
    if missing:
        raise FoldError(f"--protocol split needs utterances in train, val and test; none in {', '.join(missing)} "
                        "(the manifest's split column, carried into the cache by `cli extract`)")
    return [Fold(fold=1, test="test", val="val", train=("train",), protocol="split")]


def _plan_speakers(meta: pd.DataFrame) -> list[Fold]:
    return plan_folds({str(s): str(x) for s, x in zip(meta["speaker"], meta["session"])})


def _plan_sessions(meta: pd.DataFrame) -> list[Fold]:
    return plan_session_folds(meta["session"])


def _plan_split(meta: pd.DataFrame) -> list[Fold]:
    if "split" not in meta.columns or not meta["split"].astype(str).str.strip().any():
        raise FoldError("--protocol split needs a split column (train/val/test) in the manifest; this corpus or "
                        "cache has none (a cache made before sapser recorded splits: extract it again)")
    return plan_split_fold(meta["split"])


VAL_MARK = "#val"
CORPUS_VAL = "last sessions"  # what a cross-corpus fold's validation group is called in its metrics and lines


def cross_corpus_groups(meta: pd.DataFrame) -> pd.Series:
    """Each utterance's group under `--protocol corpus`: its corpus's name, with "#val" for the speakers of
    the corpus's last session (sorted): those validate when the corpus trains. meta: columns corpus, session."""
    last = {name: max(str(x) for x in sessions) for name, sessions in meta.groupby("corpus")["session"]}
    is_val = [str(x) == last[c] for c, x in zip(meta["corpus"], meta["session"])]
    return meta["corpus"].astype(str) + [VAL_MARK if v else "" for v in is_val]


def _plan_corpora(meta: pd.DataFrame) -> list[Fold]:
    if "corpus_role" not in meta.columns:
        raise FoldError("--protocol corpus needs several caches: train on some (--cache A.h5 --cache B.h5) and test "
                        "on another (--test-cache C.h5), or leave one corpus out of several")
    roles = dict(zip(meta["corpus"].astype(str), meta["corpus_role"].astype(str)))
    names = sorted(roles)
    tests = [n for n in names if roles[n] == "test"]
    train = [n for n in names if roles[n] == "train"]
    if not train or (not tests and len(train) < 2):
        raise FoldError("cross-corpus folds need a corpus to train on and another to test on")
    if tests:
        return [Fold(fold=k, test=t, val=CORPUS_VAL, train=tuple(train), protocol="corpus")
                for k, t in enumerate(tests, start=1)]
    return [Fold(fold=k, test=t, val=CORPUS_VAL, train=tuple(n for n in train if n != t), protocol="corpus")
            for k, t in enumerate(train, start=1)]


@dataclass(frozen=True)
class Protocol(Choice):
    """A fold plan: `plan(meta)` makes its folds; `label` titles the manifest's fold table."""

    folds: str = ""  # what the folds are, for "fold K is out of range (...)"
    plan: Callable[[pd.DataFrame], list[Fold]] | None = None


# The one list of fold plans: --protocol's help and check, the manifest's table title, the planner.
PROTOCOLS: Choices[Protocol] = Choices("--protocol", {
    "speaker": Protocol("leave-one-speaker-out, the paper", "leave-one-speaker-out folds", "one per speaker",
                        _plan_speakers),
    "session": Protocol("leave-one-session-out, SUPERB/EmoBox", "leave-one-session-out folds", "one per session",
                        _plan_sessions),
    "split": Protocol("the manifest's train/val/test column", "the official split", "the official split",
                      _plan_split),
    "corpus": Protocol("cross-corpus: train on some caches, test on another", "cross-corpus folds",
                       "one per test corpus", _plan_corpora),
}, error=FoldError)


def plan(meta: pd.DataFrame, protocol: str = "speaker") -> list[Fold]:
    """The folds of a metadata table (columns speaker, session and, for `split`, split) under a protocol."""
    return PROTOCOLS[PROTOCOLS.check(protocol)].plan(meta)


def pick(folds: list[Fold], k: int) -> Fold:
    if not 1 <= k <= len(folds):
        what = PROTOCOLS[folds[0].protocol if folds else "speaker"].folds
        raise FoldError(f"fold {k} is out of range: this corpus has folds 1 to {len(folds)} ({what})")
    return folds[k - 1]


def get_fold(speaker_sessions: dict[str, str], k: int) -> Fold:
    return pick(plan_folds(speaker_sessions), k)


def folds_from_config(cfg: dict[str, Any]) -> list[Fold]:
    """The plan a run recorded in config.json (also the pre-protocol format: test_speaker, val_speaker, ...)."""
    protocol = cfg.get("settings", {}).get("protocol", "speaker")
    out = []
    for f in cfg.get("folds", []):
        if "test" in f:
            out.append(Fold(int(f["fold"]), str(f["test"]), str(f["val"]), tuple(f["train"]),
                            f.get("protocol", protocol)))
        else:
            out.append(Fold(int(f["fold"]), str(f["test_speaker"]), str(f["val_speaker"]),
                            tuple(f.get("train_speakers", ())), "speaker"))
    return out


def corpus_groups(corpus: Corpus) -> pd.DataFrame:
    """speaker, session, split per utterance of a corpus (index utt_id): what the fold plans group by."""
    import pandas as pd

    return pd.DataFrame({"speaker": [u.speaker for u in corpus.utterances],
                         "session": [u.session for u in corpus.utterances],
                         "split": [u.split for u in corpus.utterances]},
                        index=pd.Index([u.utt_id for u in corpus.utterances], name="utt_id"))
