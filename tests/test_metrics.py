import json
import math

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    recall_score,
)

from heads.evaluate.metrics import ccc, classification_metrics, regression_metrics, ua_wa
from heads.runfolder import json_safe

CLASSES = ("angry", "happy", "neutral", "sad")


def random_labels(seed: int, n: int = 200, true_classes=(0, 1, 2, 3), pred_classes=(0, 1, 2, 3)):
    rng = np.random.default_rng(seed)
    y_true = rng.choice(true_classes, size=n)
    # Mostly right, so the scores are far from chance and from each other.
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.choice(pred_classes, size=n))
    y_pred = np.where(np.isin(y_pred, pred_classes), y_pred, pred_classes[0])
    return y_true, y_pred


def assert_matches_sklearn(y_true, y_pred):
    m = classification_metrics(y_true, y_pred, CLASSES)
    assert ua_wa(np.asarray(y_true), np.asarray(y_pred), 4) == pytest.approx((m["ua"], m["wa"]), abs=1e-12)
    assert m["ua"] == pytest.approx(balanced_accuracy_score(y_true, y_pred), abs=1e-12)
    assert m["wa"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0), abs=1e-12)
    assert m["confusion"] == confusion_matrix(y_true, y_pred, labels=range(4)).tolist()
    present = np.unique(y_true)
    per_class = recall_score(y_true, y_pred, labels=present, average=None)
    for k, c in enumerate(CLASSES):
        if k in present:
            assert m["recall"][c] == pytest.approx(per_class[list(present).index(k)], abs=1e-12)
        else:
            assert math.isnan(m["recall"][c])
    return m


@pytest.mark.parametrize("seed", range(5))
def test_all_classes_match_sklearn(seed):
    assert_matches_sklearn(*random_labels(seed))


@pytest.mark.parametrize("seed", range(3))
def test_class_never_predicted_matches_sklearn(seed):
    y_true, y_pred = random_labels(seed, pred_classes=(0, 1, 3))
    assert 2 in y_true and 2 not in y_pred
    m = assert_matches_sklearn(y_true, y_pred)
    assert m["recall"]["neutral"] == 0.0


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("seed", range(3))
def test_class_absent_from_test_set_is_left_out_of_ua(seed):
    y_true, y_pred = random_labels(seed, true_classes=(0, 1, 3))
    assert 2 not in y_true and 2 in y_pred  # predicted but never true: F1 0, no recall
    m = assert_matches_sklearn(y_true, y_pred)
    assert math.isnan(m["recall"]["neutral"])
    recalls = [m["recall"][c] for c in ("angry", "happy", "sad")]
    assert m["ua"] == pytest.approx(np.mean(recalls))


def test_names_and_indices_agree_and_unlabelled_are_dropped():
    y_true, y_pred = random_labels(7, n=60)
    by_index = classification_metrics(y_true, y_pred, CLASSES)
    names = [CLASSES[i] for i in y_true]
    preds = [CLASSES[i] for i in y_pred]
    assert classification_metrics(names, preds, CLASSES) == by_index
    # Unlabelled utterances (-1 from the collate, None in a table) must not count.
    with_gaps = classification_metrics(np.r_[y_true, -1, -1], np.r_[y_pred, 0, 3], CLASSES)
    assert with_gaps == by_index
    assert classification_metrics(names + [None], preds + ["sad"], CLASSES) == by_index


def test_hand_counted_example():
    y_true = ["angry", "angry", "angry", "angry", "happy", "happy", "sad"]
    y_pred = ["angry", "angry", "angry", "happy", "happy", "angry", "angry"]
    m = classification_metrics(y_true, y_pred, CLASSES)
    assert m["recall"]["angry"] == 0.75 and m["recall"]["happy"] == 0.5 and m["recall"]["sad"] == 0.0
    assert math.isnan(m["recall"]["neutral"])
    assert m["ua"] == pytest.approx((0.75 + 0.5 + 0.0) / 3)
    assert m["wa"] == pytest.approx(4 / 7)
    # F1: angry 2*3/(6+2+1)=2/3, happy 2*1/(2+1+1)=1/2, sad 0; neutral occurs nowhere.
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert m["confusion"] == [[3, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]


def test_no_labelled_utterance_gives_nan_scores():
    m = classification_metrics([-1, -1], [0, 1], CLASSES)
    assert math.isnan(m["ua"]) and math.isnan(m["wa"]) and math.isnan(m["macro_f1"])
    assert m["confusion"] == [[0] * 4] * 4


def test_bad_labels_are_refused():
    with pytest.raises(ValueError, match="not in classes"):
        classification_metrics(["angry", "bored"], ["angry", "angry"], CLASSES)
    with pytest.raises(ValueError, match="out of range"):
        classification_metrics([0, 4], [0, 0], CLASSES)
    with pytest.raises(ValueError, match="has 2 labels but"):
        classification_metrics([0, 1], [0], CLASSES)


def numpy_ccc(x, y):
    x, y = np.asarray(x, float), np.asarray(y, float)
    r = np.corrcoef(x, y)[0, 1]
    sx, sy = x.std(), y.std()
    return 2 * r * sx * sy / (sx**2 + sy**2 + (x.mean() - y.mean()) ** 2)


def test_ccc_known_cases():
    rng = np.random.default_rng(0)
    x = rng.normal(3, 1, 100)
    assert ccc(x, x) == pytest.approx(1.0)
    centred = x - x.mean()  # negation is only perfectly discordant around a zero mean
    assert ccc(centred, -centred) == pytest.approx(-1.0)
    shifted = ccc(x, x + 0.5)
    assert shifted < 1.0
    assert shifted == pytest.approx(2 / (2 + 0.25 / x.var()))  # cov = var x, both vars equal
    assert ccc(x, x + 1.0) < shifted  # a larger shift lowers it further
    assert ccc(x, 2 * x) < 1.0  # perfectly correlated but not concordant (scale)


@pytest.mark.parametrize("seed", range(3))
def test_ccc_matches_numpy_formula(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=50)
    y = 0.7 * x + rng.normal(scale=0.5, size=50) + 0.3
    assert ccc(x, y) == pytest.approx(numpy_ccc(x, y), abs=1e-12)
    assert ccc(x, y) == pytest.approx(ccc(y, x))
    assert ccc(x, y) < np.corrcoef(x, y)[0, 1]  # population variances + mean shift penalize


def test_ccc_degenerate_inputs():
    assert math.isnan(ccc([], []))
    assert math.isnan(ccc([2.0, 2.0], [2.0, 2.0]))
    assert ccc([1.0, 1.0], [2.0, 2.0]) == 0.0


def test_regression_metrics_ignore_missing_targets():
    true = np.array([1.0, np.nan, 3.0, 5.0, np.nan])
    pred = np.array([2.0, 100.0, 3.0, 4.0, -7.0])
    m = regression_metrics(true, pred)
    assert m["mae"] == pytest.approx((1 + 0 + 1) / 3)
    assert m["ccc"] == pytest.approx(numpy_ccc([1, 3, 5], [2, 3, 4]))
    none = regression_metrics([np.nan, np.nan], [1.0, 2.0])
    assert math.isnan(none["mae"]) and math.isnan(none["ccc"])


def test_json_safe_writes_strict_json():
    m = classification_metrics([0, 1, 1], [0, 1, 0], CLASSES)
    text = json.dumps(json_safe({**m, "mae": np.float32(0.5), "n": np.int64(3)}), allow_nan=False)
    back = json.loads(text)
    assert back["recall"]["neutral"] is None and back["recall"]["happy"] == 0.5
    assert back["mae"] == 0.5 and back["n"] == 3


def test_the_fast_validation_scores_drop_unlabelled_rows_and_handle_none():
    assert ua_wa(np.array([0, 0, -1, 2]), np.array([0, 1, 3, 2]), 4) == pytest.approx((0.75, 2 / 3))
    assert all(math.isnan(x) for x in ua_wa(np.array([-1, -1]), np.array([0, 1]), 4))
