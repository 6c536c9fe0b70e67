"""`--ensemble N|auto`: N heads per fold, trained alike but for the seed, their outputs averaged.

How many heads a fold trains is heads.config's rule (`heads_for`: `auto` trains
three on small folds, one at paper scale).

Member i (1-based) trains exactly as a run with `--seed SEED + i - 1` would
(same fold, same data, same settings; the fitted input statistics and probe
layer weights do not depend on the seed), so an ensemble's fold equals the
average of N single-head runs. Its test predictions are the mean of the
members' class probabilities and of their valence/arousal (corpus scale); the
emotion is the argmax of the mean, and the fold's metrics are scored on those
averages. On the real-speech corpora the seed alone moved a single head's UA
by up to 3 points; averaging the seeds removes that spread.

Files in RUN/fold-KK: member 1 writes what a single head writes
(head.safetensors, history.csv); member i > 1 adds head-i.safetensors and
history-i.csv. metrics.json["members"] lists each member's seed, files, best
epoch and own UA/WA; its top-level best_epoch / epochs_run are member 1's.
`cli predict` averages the members as the run's folds are averaged.
"""

from __future__ import annotations

import numpy as np

from heads.evaluate.metrics import fold_scores
from heads.runfolder import Predictions, head_file, history_file
from heads.train.trainer import FoldResult


def combine(results: list[FoldResult], seeds: list[int], classes: tuple[str, ...]) -> FoldResult:
    """One FoldResult whose test outputs are the members' mean, scored again; member 1's training record."""
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
