"""rapha.runtime.evaluate: node-side metrics, their rules, and their disclosure control."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from sklearn.metrics import roc_auc_score

from rapha.crypto import canonical_json, digest_bytes
from rapha.errors import DataError, UsageError
from rapha.runtime.evaluate import choose_threshold, evaluate, write_metrics

_SUPPRESSED = {"suppressed": True}


def _column(values: Sequence[float]) -> NDArray[np.float64]:
    return np.asarray(values, dtype=np.float64).reshape(-1, 1)


def _random(n: int, findings: int, seed: int) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Tied integer-ish scores with signal, and 0/1 labels with some NaN."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, findings)) < 0.4).astype(np.float64)
    scores = np.round(labels + rng.normal(size=(n, findings)), 0)
    labels[rng.random((n, findings)) < 0.1] = np.nan
    return scores, labels


def _run(
    scores: NDArray[np.float64],
    labels: NDArray[np.float64],
    meta: Sequence[Mapping[str, Any]] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Evaluate with val = test unless overridden; no subgroups unless ``meta`` is given."""
    kwargs: dict[str, Any] = {
        "findings": [f"f{j}" for j in range(scores.shape[1])],
        "val_scores": scores,
        "val_labels": labels,
        "test_scores": scores,
        "test_labels": labels,
        "test_meta": meta if meta is not None else [{}] * scores.shape[0],
        "subgroup_fields": () if meta is None else ("sex",),
        "bootstrap": 0,
        "k": 1,
    }
    kwargs.update(options)
    return evaluate(**kwargs)


def _floats(value: Any) -> list[float]:
    if isinstance(value, Mapping):
        return [f for v in value.values() for f in _floats(v)]
    if isinstance(value, list):
        return [f for v in value for f in _floats(v)]
    return [value] if isinstance(value, float) else []


# --- AUROC and its CI ---------------------------------------------------------------------


def test_auroc_equals_sklearn_with_ties_and_missing_labels() -> None:
    scores, labels = _random(400, 3, seed=7)

    doc = _run(scores, labels, digits=12)

    for j in range(3):
        valid = ~np.isnan(labels[:, j])
        expected = roc_auc_score(labels[valid, j], scores[valid, j])
        assert doc["labels"][f"f{j}"]["auroc"] == pytest.approx(expected, abs=1e-10)
        assert doc["labels"][f"f{j}"]["n"] == int(valid.sum())
    assert doc["overall"]["auroc"] == pytest.approx(
        np.mean([doc["labels"][f"f{j}"]["auroc"] for j in range(3)]), abs=1e-10
    )


def test_ci_contains_the_estimate_and_narrows_with_more_records() -> None:
    small_s, small_l = _random(100, 1, seed=1)
    large_s, large_l = _random(2000, 1, seed=1)

    small = _run(small_s, small_l, bootstrap=300)["labels"]["f0"]
    large = _run(large_s, large_l, bootstrap=300)["labels"]["f0"]

    for block in (small, large):
        lo, hi = block["auroc_ci"]
        assert lo <= block["auroc"] <= hi
        assert block["ci_resamples"] == 300
    assert large["auroc_ci"][1] - large["auroc_ci"][0] < small["auroc_ci"][1] - small["auroc_ci"][0]


def test_same_seed_same_document_other_seed_other_ci() -> None:
    scores, labels = _random(300, 2, seed=3)
    meta = [{"sex": "F" if i % 2 else "M"} for i in range(300)]

    first = _run(scores, labels, meta, bootstrap=200, seed=5)
    again = _run(scores, labels, meta, bootstrap=200, seed=5)
    other = _run(scores, labels, meta, bootstrap=200, seed=6)

    assert canonical_json(first) == canonical_json(again)
    assert first["labels"]["f0"]["auroc_ci"] != other["labels"]["f0"]["auroc_ci"]
    assert first["labels"]["f0"]["auroc"] == other["labels"]["f0"]["auroc"]


# --- threshold, sensitivity, specificity -------------------------------------------------------

_VAL_S = [0.1, 0.2, 0.3, 0.6, 0.7, 0.8]
_VAL_L = [0, 0, 0, 1, 1, 1]


def test_threshold_is_chosen_on_val_not_test() -> None:
    test_s, test_l = [0.1, 0.2, 0.3, 0.4, 0.45, 0.5], [0, 0, 0, 1, 1, 1]

    doc = _run(
        _column(test_s),
        _column(test_l),
        val_scores=_column(_VAL_S),
        val_labels=_column(_VAL_L),
        k=2,
    )

    block = doc["labels"]["f0"]
    assert choose_threshold(np.array(test_s), np.array(test_l)) == 0.4  # what test would pick
    assert block["threshold"] == 0.6
    assert block["sensitivity"] == 0.0
    assert block["specificity"] == 1.0


def test_sensitivity_and_specificity_at_the_val_threshold_by_hand() -> None:
    # Threshold 0.6 from val; a test score equal to it predicts positive.
    pos = [0.9, 0.65, 0.6, 0.2]  # 3 of 4 at or above 0.6
    neg = [0.1, 0.3, 0.61, 0.7, 0.05]  # 3 of 5 below 0.6
    test_s, test_l = pos + neg, [1] * 4 + [0] * 5

    doc = _run(
        _column(test_s),
        _column(test_l),
        val_scores=_column(_VAL_S),
        val_labels=_column(_VAL_L),
        k=2,
    )

    assert doc["labels"]["f0"]["sensitivity"] == 0.75
    assert doc["labels"]["f0"]["specificity"] == 0.6


def test_choose_threshold_maximises_youden_and_prefers_the_highest_tie() -> None:
    # t=.9: J = 1/2 - 0; t=.7: J = 1 - 1/2; equal J, the higher wins. The NaN record is ignored.
    scores = np.array([0.95, 0.9, 0.8, 0.7, 0.6])
    labels = np.array([np.nan, 1, 0, 1, 0])

    assert choose_threshold(scores, labels) == 0.9
    assert choose_threshold(np.array([0.9, 0.8, 0.4, 0.3]), np.array([1.0, 1, 0, 1])) == 0.8


def test_choose_threshold_needs_both_classes() -> None:
    with pytest.raises(DataError, match="one positive and one negative"):
        choose_threshold(np.array([0.1, 0.2]), np.array([1.0, np.nan]))


# --- calibration and curves -------------------------------------------------------------------


def test_ece_and_calibration_bins_by_hand() -> None:
    # Bins: [0, .1): .05 y0 -> .05; [.1, .2): .15 y1, .15 y0 -> |.3 - 1| = .7; [.9, 1]: .95 y1
    # -> .05. ECE = (.05 + .7 + .05) / 4 = 0.2.
    doc = _run(_column([0.05, 0.15, 0.15, 0.95]), _column([0, 1, 0, 1]))

    block = doc["labels"]["f0"]
    assert doc["rules"]["calibration_transform"] == "identity"
    assert block["ece"] == 0.2
    assert block["calibration"][1] == {
        "bin": [0.1, 0.2],
        "count": 2,
        "mean_predicted": 0.15,
        "observed": 0.5,
    }
    assert block["calibration"][5] == {
        "bin": [0.5, 0.6],
        "count": 0,
        "mean_predicted": None,
        "observed": None,
    }


def test_scores_outside_unit_interval_are_treated_as_logits() -> None:
    # sigmoid(0) = .5 for one positive and one negative; +-40 are ~1 and ~0: ECE ~ 0.
    doc = _run(_column([0.0, 0.0, 40.0, -40.0]), _column([1, 0, 1, 0]))

    assert doc["rules"]["calibration_transform"] == "sigmoid"
    assert doc["labels"]["f0"]["ece"] == 0.0
    assert doc["labels"]["f0"]["calibration"][5]["mean_predicted"] == 0.5


def test_small_calibration_bins_are_suppressed_with_a_complement() -> None:
    scores = [0.25] * 20 + [0.75] * 20 + [0.95] * 2
    labels = [0, 1] * 21

    bins = _run(_column(scores), _column(labels), k=5)["labels"]["f0"]["calibration"]

    assert bins[9] == {"bin": [0.9, 1.0], "suppressed": True}
    assert bins[2] == {"bin": [0.2, 0.3], "suppressed": True}  # the complement
    assert bins[7]["count"] == 20


def test_roc_curve_is_small_monotone_and_coarse() -> None:
    scores, labels = _random(3000, 1, seed=2)
    scores = scores + np.random.default_rng(0).random(scores.shape)  # mostly untied

    roc = _run(scores, labels, k=10)["labels"]["f0"]["roc"]
    coarse = _run(scores[:200], labels[:200], k=25)["labels"]["f0"]["roc"]

    assert len(roc["fpr"]) == len(roc["tpr"]) <= 101
    assert (roc["fpr"][0], roc["tpr"][0], roc["fpr"][-1], roc["tpr"][-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(roc["fpr"]) >= 0)
    assert np.all(np.diff(roc["tpr"]) >= 0)
    assert len(coarse["fpr"]) <= 200 // 25 + 1


# --- disclosure control -----------------------------------------------------------------------


def _cells(sizes: Mapping[str, int]) -> tuple[NDArray[np.float64], list[dict[str, Any]]]:
    meta = [
        {"sex": None if cell == "unknown" else cell} for cell, n in sizes.items() for _ in range(n)
    ]
    labels = _column([i % 2 for i in range(len(meta))])
    return labels, meta


def test_small_cell_and_its_complement_are_suppressed() -> None:
    labels, meta = _cells({"F": 30, "M": 40, "unknown": 3})

    cells = _run(labels + 0.5, labels, meta, k=10)["subgroups"]["sex"]

    assert cells["unknown"] == _SUPPRESSED
    assert cells["F"] == _SUPPRESSED  # the lone hidden cell would be n minus the others
    assert cells["M"]["n"] == 40
    assert cells["M"]["labels"]["f0"]["n_pos"] == 20


def test_two_small_cells_need_no_complement() -> None:
    labels, meta = _cells({"F": 30, "M": 40, "O": 3, "X": 4})

    cells = _run(labels + 0.5, labels, meta, k=10)["subgroups"]["sex"]

    assert cells["O"] == cells["X"] == _SUPPRESSED
    assert (cells["F"]["n"], cells["M"]["n"]) == (30, 40)


def test_label_with_few_positives_in_a_cell_is_suppressed_with_a_complement() -> None:
    a = [1, 0] * 20  # 20 positives
    b = [1] * 3 + [0] * 37  # 3 positives
    c = [1, 0] * 30
    labels = np.column_stack([a + b + c, [1, 0] * 70]).astype(np.float64)
    meta = [{"sex": s} for s in ["A"] * 40 + ["B"] * 40 + ["C"] * 60]

    cells = _run(labels + 0.5, labels, meta, k=10)["subgroups"]["sex"]

    assert cells["B"]["labels"]["f0"] == _SUPPRESSED
    assert cells["A"]["labels"]["f0"] == _SUPPRESSED  # next-smallest, by that label's n
    assert cells["C"]["labels"]["f0"]["n_pos"] == 30
    assert all(cells[c]["labels"]["f1"]["n"] == cells[c]["n"] for c in "ABC")


def test_label_with_few_positives_is_suppressed_and_left_out_of_the_macro_mean() -> None:
    labels = np.column_stack([[1, 0] * 20, [1] * 3 + [0] * 37]).astype(np.float64)

    doc = _run(labels + 0.5, labels, k=10)

    assert doc["labels"]["f1"] == _SUPPRESSED
    assert doc["overall"]["labels"] == ["f0"]
    assert doc["overall"]["auroc"] == doc["labels"]["f0"]["auroc"]


def test_document_has_no_nan_and_is_canonical_json() -> None:
    scores, labels = _random(200, 3, seed=4)
    val_labels = labels.copy()
    val_labels[:, 2] = np.nan  # no threshold for f2
    meta = [{"sex": ["F", "M", None][i % 3]} for i in range(200)]

    doc = _run(scores, labels, meta, val_labels=val_labels, bootstrap=50, k=5)

    assert all(math.isfinite(f) for f in _floats(doc))
    json.dumps(doc, allow_nan=False)
    assert doc["labels"]["f2"]["threshold"] is None
    assert doc["labels"]["f2"]["sensitivity"] is None
    assert set(doc["subgroups"]["sex"]) == {"F", "M", "unknown"}
    assert (doc["schema"], doc["k"], doc["bootstrap"]) == (1, 5, 50)


def test_write_metrics_writes_canonical_json_and_returns_its_digest(tmp_path: Path) -> None:
    scores, labels = _random(50, 1, seed=5)
    doc = _run(scores, labels)
    path = tmp_path / "metrics.json"

    digest = write_metrics(path, doc)

    assert path.read_bytes() == canonical_json(doc)
    assert digest == digest_bytes(path.read_bytes())


# --- refusals ---------------------------------------------------------------------------------

_S, _L = _random(20, 2, seed=9)
_L = np.nan_to_num(_L)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"k": 0}, UsageError, "k must be"),
        ({"bootstrap": -1}, UsageError, "bootstrap must be"),
        ({"k": True}, UsageError, "k must be an integer"),
        ({"findings": ["f0", "f0"]}, UsageError, "repeat"),
        ({"findings": "f0"}, UsageError, "not one string"),
        ({"test_scores": np.where(np.eye(20, 2) > 0, np.nan, _S)}, DataError, "non-finite"),
        ({"val_scores": np.full((20, 2), np.inf)}, DataError, "non-finite"),
        ({"test_labels": np.full((20, 2), 7.25)}, DataError, "other than 0, 1 or NaN"),
        ({"test_scores": _S[:, :1]}, DataError, "shape"),
        ({"test_scores": _S.ravel()}, DataError, "shape"),
        ({"val_labels": _L[:10]}, DataError, "same number of records"),
        ({"test_meta": [{}] * 19}, DataError, "one mapping per test record"),
        ({"test_scores": np.array([["a", "b"]] * 20)}, DataError, "numeric"),
    ],
)
def test_rejects_bad_input(options: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match) as info:
        _run(_S, _L, **options)

    assert "7.25" not in str(info.value)
