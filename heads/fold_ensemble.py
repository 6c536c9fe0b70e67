"""`--ensemble N|auto`: N heads per fold, trained alike but for the seed, their outputs averaged.

`auto` (the default) trains AUTO_HEADS heads on a fold whose training split has
fewer than AUTO_BELOW utterances and one head otherwise (`heads_for`). On the
real-speech corpora (288 and 576 training utterances per fold) the seed alone
moved a single head's UA by up to 3 points and three averaged heads were above
their seeds' mean for every cache and both corpora, while three heads of that
size cost far less than one head at paper scale (IEMOCAP: ~4,400 training
utterances per fold, one head, as in the paper). README, "Seeds and ensembles".

Member i (1-based) trains exactly as a run with `--seed SEED + i - 1` would
(same fold, same data, same settings; the fitted input statistics and probe
layer weights do not depend on the seed), so an ensemble's fold equals the
average of N single-head runs. Its test predictions are the mean of the
members' class probabilities and of their valence/arousal (corpus scale); the
emotion is the argmax of the mean, and the fold's metrics are scored on those
averages. On the real-speech corpora the seed alone moved a single head's UA
by up to 3 points; averaging the seeds removes that spread (README, "Where we
stand").

Files in RUN/fold-KK: member 1 writes what a single head writes
(head.safetensors, history.csv); member i > 1 adds head-i.safetensors and
history-i.csv. metrics.json["members"] lists each member's seed, files, best
epoch and own UA/WA; its top-level best_epoch / epochs_run are member 1's.
`cli predict` averages the members as the run's folds are averaged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from core.errors import UserError
from heads.metrics import fold_scores

if TYPE_CHECKING:
    from heads.trainer import FoldResult


AUTO = "auto"
AUTO_HEADS = 3  # heads per fold under `auto` when the training split is small
AUTO_BELOW = 2000  # training utterances per fold from which `auto` trains one head


def parse_ensemble(value: int | str) -> int | str:
    """`--ensemble`'s value: "auto" or a count of heads of at least 1; anything else is refused in one line."""
    text = str(value).strip().lower()
    if text == AUTO:
        return AUTO
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise UserError(f"--ensemble must be {AUTO} or a whole number of heads per fold of at least 1, not {value!r}")
    return int(text)


def heads_for(ensemble: int | str, n_train: int) -> int:
    """Heads trained on a fold with `n_train` training utterances under `--ensemble ensemble`."""
    n = parse_ensemble(ensemble)  # API callers may pass "AUTO" or "3" as the CLI does
    if n == AUTO:
        return AUTO_HEADS if n_train < AUTO_BELOW else 1
    return int(n)


def head_file(member: int) -> str:
    """The weights file of member `member` (1-based) in a fold folder."""
    return "head.safetensors" if member == 1 else f"head-{member}.safetensors"


def history_file(member: int) -> str:
    return "history.csv" if member == 1 else f"history-{member}.csv"


def member_files(metrics: dict[str, Any]) -> list[str]:
    """Every head file of a finished fold: one per entry of metrics.json["members"] (one without it)."""
    members = metrics.get("members")
    n = len(members) if isinstance(members, list) and members else 1
    return [head_file(i) for i in range(1, n + 1)]  # names from the count only, never paths read from the file


def combine(results: list[FoldResult], seeds: list[int], classes: tuple[str, ...]) -> FoldResult:
    """One FoldResult whose test outputs are the members' mean, scored again; member 1's training record."""
    from heads.trainer import FoldResult, Predictions

    first = results[0]
    if len(results) == 1:
        return first
    for r in results[1:]:
        if r.test.utt_id != first.test.utt_id:
            raise RuntimeError("the ensemble's members scored their test utterances in different orders")
    t = first.test
    probs = np.mean([r.test.probs for r in results], axis=0)  # (N, C)
    va = np.mean([r.test.va for r in results], axis=0)  # (N, 2)
    test = Predictions(utt_id=list(t.utt_id), probs=probs, va=va, emotion=t.emotion, va_true=t.va_true,
                       no_speech=t.no_speech, loss=float(np.mean([r.test.loss for r in results])))
    metrics = {**first.metrics, **fold_scores(t.emotion, probs, t.va_true, va, classes),
               "test_loss": test.loss,  # the members' mean
               "members": [{"seed": s, "head": head_file(i + 1), "history": history_file(i + 1),
                            "best_epoch": r.metrics["best_epoch"], "epochs_run": r.metrics["epochs_run"],
                            "ua": r.metrics.get("ua"), "wa": r.metrics.get("wa")}
                           for i, (s, r) in enumerate(zip(seeds, results))]}
    return FoldResult(metrics, first.history, test, first.extra)
