"""Trusted evaluation: the node, not the model, computes a model's metrics.

A sandboxed model writes scores for the validation and test records; this module, running
as node code outside the sandbox, turns them into a small JSON *metrics document*. The
scores never leave the node; only the document does (DESIGN.md, trust boundary 4).

Rules (each is recorded in the document's ``"rules"``):

* **AUROC** is the exact Mann-Whitney statistic, a tied positive/negative pair counting one
  half (the value ``sklearn.metrics.roc_auc_score`` gives). Its 95% CI is the percentile
  bootstrap: the test records are resampled with replacement ``bootstrap`` times from a
  ``numpy`` Generator seeded with ``seed``; resamples holding one class only are skipped
  and ``"ci_resamples"`` says how many were used. The macro CI uses the same resamples and
  skips one where any label in the macro mean is undefined.
* **Threshold** is chosen on *validation*, never on test: the validation score maximising
  Youden's J (sensitivity + specificity - 1), predicting positive when ``score >=
  threshold``; among equal J the highest threshold wins. Sensitivity and specificity are
  then measured on test at that threshold.
* **ECE** uses 10 equal-width bins on [0, 1] (the top bin closed). When any score, val or
  test, lies outside [0, 1] the scores are taken to be logits and a logistic sigmoid is
  applied to all of them first (for calibration only; the threshold and AUROC are
  invariant under it).
* **Curves** (for the HTML report) are computed on test: ROC vertices and calibration bins.

Disclosure control, because a model is code its submitter wrote and can steer which
records land where:

* **Cells**: a subgroup cell with fewer than ``k`` records is published as
  ``{"suppressed": true}``. The test ``n`` is published, so within a field more cells are
  suppressed, the smallest first, until no hidden cell can be pinned from the published
  ones: two or more hidden, not all ones, and (when all were primary) not each ``k - 1``,
  the rule :mod:`rapha.dataset.profile` uses. A field that cannot be unpinned is withheld.
* **Labels**: a label, in the whole test set or in a cell, is published only when it has
  at least ``k`` positives *and* ``k`` negatives. With fewer, sensitivity or specificity
  is a statement about fewer than ``k`` patients, and zero of a class says every scored
  patient in the cell shares a finding. Sensitivity times ``n_pos`` is a count, so when
  within a field exactly one cell's label is hidden the next-smallest is hidden too. The
  macro ``"overall"`` averages published labels only, so it cannot be solved for a hidden
  one.
* **Curves**: each ROC segment spans at least ``max(k, n/100)`` records (so ≤ 101 points,
  and no vertex isolates one record); a calibration bin with 1 to ``k - 1`` records is
  suppressed, with the same complementary rule.

Floats are rounded to ``digits`` decimal places; NaN and infinities never appear (null).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from rapha.crypto import canonical_json, digest_bytes
from rapha.errors import DataError, UsageError

__all__ = [
    "CALIBRATION_BINS",
    "METRICS_SCHEMA",
    "ROC_MAX_POINTS",
    "SUBGROUP_FIELDS",
    "UNKNOWN",
    "choose_threshold",
    "evaluate",
    "write_metrics",
]

METRICS_SCHEMA: Final = 1
CALIBRATION_BINS: Final = 10
ROC_MAX_POINTS: Final = 101
SUBGROUP_FIELDS: Final[tuple[str, ...]] = ("sex", "age_band", "manufacturer", "view_position")
UNKNOWN: Final = "unknown"
_SUPPRESSED: Final[Mapping[str, bool]] = {"suppressed": True}
# Resample weights held in memory at once (resamples x records), bounding memory use.
_BATCH_CELLS: Final = 2_000_000
_MAX_DIGITS: Final = 12

_Floats = NDArray[np.float64]
_Bools = NDArray[np.bool_]


def evaluate(
    *,
    findings: Sequence[str],
    val_scores: NDArray[Any],
    val_labels: NDArray[Any],
    test_scores: NDArray[Any],
    test_labels: NDArray[Any],
    test_meta: Sequence[Mapping[str, Any]],
    k: int = 10,
    bootstrap: int = 1000,
    seed: int = 0,
    subgroup_fields: Sequence[str] = SUBGROUP_FIELDS,
    digits: int = 4,
) -> dict[str, Any]:
    """Compute the metrics document for one model on one split (rules: module docstring).

    ``*_scores`` are ``(records, len(findings))`` finite reals; ``*_labels`` the same shape
    in {0, 1, NaN}, NaN meaning "not scored for this finding" (the caller has applied the
    bundle's uncertain/missing policy). ``test_meta`` holds one mapping per test record;
    a missing or ``None`` subgroup value falls in the ``"unknown"`` cell.

    Returns a JSON-able dict: ``schema, k, bootstrap, seed, digits, rules, n, n_val,
    labels, overall, subgroups``. Raises :class:`UsageError` for bad options and
    :class:`DataError` for unusable arrays; messages never contain scores or labels.
    """
    names = _names("findings", findings, required=True)
    k = _int_option("k", k, 1)
    bootstrap = _int_option("bootstrap", bootstrap, 0)
    seed = _int_option("seed", seed, 0)
    digits = _int_option("digits", digits, 0, _MAX_DIGITS)
    fields = _names("subgroup_fields", subgroup_fields, required=False)
    vs = _matrix("val_scores", val_scores, len(names), labels=False)
    vl = _matrix("val_labels", val_labels, len(names), labels=True)
    ts = _matrix("test_scores", test_scores, len(names), labels=False)
    tl = _matrix("test_labels", test_labels, len(names), labels=True)
    if vs.shape != vl.shape or ts.shape != tl.shape:
        raise DataError("scores and labels must have the same number of records")
    if isinstance(test_meta, (str, bytes)) or len(test_meta) != ts.shape[0]:
        raise DataError(f"test_meta must hold one mapping per test record ({ts.shape[0]})")
    if not all(isinstance(m, Mapping) for m in test_meta):
        raise DataError("every test_meta entry must be a mapping")

    logits = bool(np.any((vs < 0) | (vs > 1)) or np.any((ts < 0) | (ts > 1)))
    probs = _sigmoid(ts) if logits else ts
    thresholds = [_youden(vs[:, j], vl[:, j]) for j in range(len(names))]
    scope = _Scope(ts, tl, probs, thresholds, k, bootstrap)

    blocks, boots = scope.blocks(np.random.default_rng(seed), curves=True)
    published = [j for j, b in enumerate(blocks) if b is not None]
    doc: dict[str, Any] = {
        "schema": METRICS_SCHEMA,
        "k": k,
        "bootstrap": bootstrap,
        "seed": seed,
        "digits": digits,
        "rules": {
            "auroc_ci": "percentile_95_bootstrap_test_records",
            "threshold": "youden_j_on_val_score_ge",
            "calibration_bins": CALIBRATION_BINS,
            "calibration_transform": "sigmoid" if logits else "identity",
        },
        "n": int(ts.shape[0]),
        "n_val": int(vs.shape[0]),
        "labels": {
            name: dict(_SUPPRESSED) if b is None else {**b, "threshold": thresholds[j]}
            for j, (name, b) in enumerate(zip(names, blocks, strict=True))
        },
        "overall": _macro(
            [names[j] for j in published],
            [blocks[j] for j in published],
            [boots[j] for j in published],
        ),
        "subgroups": {f: _field(scope, names, f, seed, test_meta) for f in fields},
    }
    cleaned: dict[str, Any] = _clean(doc, digits)
    return cleaned


def choose_threshold(scores: NDArray[Any], labels: NDArray[Any]) -> float:
    """The score maximising Youden's J on (validation) ``scores`` and ``labels``.

    Records predict positive when ``score >= threshold``; among equal J the highest
    threshold wins. Labels are 0, 1 or NaN (NaN records are ignored). Raises
    :class:`DataError` when the labelled records lack a positive or a negative.
    """
    s = _matrix("scores", np.asarray(scores).reshape(-1, 1), 1, labels=False)[:, 0]
    y = _matrix("labels", np.asarray(labels).reshape(-1, 1), 1, labels=True)[:, 0]
    if s.shape != y.shape:
        raise DataError("scores and labels must have the same number of records")
    threshold = _youden(s, y)
    if threshold is None:
        raise DataError("a threshold needs at least one positive and one negative record")
    return threshold


def write_metrics(path: Path, doc: Mapping[str, Any]) -> str:
    """Write ``doc`` to ``path`` as RFC 8785 canonical JSON, atomically; return its SHA-256.

    The digest is of the exact bytes written, the value a receipt commits to. Raises
    :class:`DataError` when ``doc`` holds a value JSON cannot carry or the write fails.
    """
    data = canonical_json(doc)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot write metrics to {path}: {exc.strerror}") from exc
    return digest_bytes(data)


# --- one scope: the test set or one subgroup cell -----------------------------------------


@dataclass(frozen=True)
class _Ranked:
    """One label's scored records, sorted by score, with the start of each tie group."""

    order: NDArray[np.intp]
    starts: NDArray[np.intp]
    pos: _Floats


@dataclass(frozen=True)
class _Scope:
    scores: _Floats
    labels: _Floats
    probs: _Floats
    thresholds: list[float | None]
    k: int
    bootstrap: int

    def subset(self, rows: NDArray[np.intp]) -> _Scope:
        return replace(
            self, scores=self.scores[rows], labels=self.labels[rows], probs=self.probs[rows]
        )

    def publishable(self, j: int) -> bool:
        y = self.labels[:, j]
        return int(np.sum(y == 1)) >= self.k and int(np.sum(y == 0)) >= self.k

    def blocks(
        self, rng: np.random.Generator, *, curves: bool
    ) -> tuple[list[dict[str, Any] | None], list[_Floats]]:
        """Per-label blocks (``None`` when not publishable) and their bootstrap AUROCs."""
        keep = [j for j in range(self.scores.shape[1]) if self.publishable(j)]
        valid = {j: ~np.isnan(self.labels[:, j]) for j in keep}
        ranked = {j: _rank(self.scores[valid[j], j], self.labels[valid[j], j]) for j in keep}
        boots = _bootstrap(ranked, valid, self.scores.shape[0], self.bootstrap, rng)
        blocks: list[dict[str, Any] | None] = [None] * self.scores.shape[1]
        for j in keep:
            v = valid[j]
            s, y, p = self.scores[v, j], self.labels[v, j], self.probs[v, j]
            auc = float(_auc(ranked[j], np.ones((1, s.size)))[0])
            block: dict[str, Any] = {
                "n": int(s.size),
                "n_pos": int(np.sum(y == 1)),
                "n_neg": int(np.sum(y == 0)),
                "auroc": auc,
                **_ci(boots[j]),
                **_at_threshold(s, y, self.thresholds[j]),
            }
            ece, bins = _calibration(p, y, self.k)
            block["ece"] = ece
            if curves:
                block["roc"] = _roc(s, y, self.k)
                block["calibration"] = bins
            blocks[j] = block
        return blocks, [boots.get(j, np.empty(0)) for j in range(self.scores.shape[1])]


def _field(
    scope: _Scope, names: list[str], field: str, seed: int, meta: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    keys = [_cell_key(m.get(field)) for m in meta]
    cells = sorted(set(keys))
    key_array = np.array(keys, dtype=object)
    rows = {c: np.flatnonzero(key_array == c) for c in cells}
    sizes = {c: int(rows[c].size) for c in cells}
    hidden = _suppress(sizes, {c for c in cells if sizes[c] < scope.k}, scope.k, _pinned_cells)
    out: dict[str, Any] = {}
    label_hidden: list[set[str]] = [set(hidden) for _ in names]
    blocks: dict[str, list[dict[str, Any] | None]] = {}
    for c in cells:
        if c in hidden:
            continue
        rng = np.random.default_rng(np.random.SeedSequence([seed, *_words(field, c)]))
        blocks[c] = scope.subset(rows[c]).blocks(rng, curves=False)[0]
        for j, b in enumerate(blocks[c]):
            if b is None:
                label_hidden[j].add(c)
    for j in range(len(names)):
        label_sizes = {c: int(np.sum(~np.isnan(scope.labels[rows[c], j]))) for c in cells}
        label_hidden[j] = _suppress(label_sizes, label_hidden[j], scope.k, _pinned_one)
    for c in cells:
        if c in hidden:
            out[c] = dict(_SUPPRESSED)
            continue
        out[c] = {
            "n": sizes[c],
            "labels": {
                name: dict(_SUPPRESSED) if c in label_hidden[j] else blocks[c][j]
                for j, name in enumerate(names)
            },
        }
    return out


def _suppress(
    sizes: Mapping[str, int],
    primary: set[str],
    k: int,
    pinned: Callable[[Mapping[str, int], set[str], set[str], int], bool],
) -> set[str]:
    """Add cells to ``primary``, smallest first, until ``pinned`` is false (or all hidden)."""
    hidden = set(primary)
    others = sorted(
        (c for c in sizes if c not in hidden and sizes[c] > 0), key=lambda c: (sizes[c], c)
    )
    while hidden and pinned(sizes, hidden, primary, k):
        if not others:
            return set(sizes)
        hidden.add(others.pop(0))
    return hidden


def _pinned_cells(sizes: Mapping[str, int], hidden: set[str], primary: set[str], k: int) -> bool:
    total = sum(sizes[c] for c in hidden)
    m = len(hidden)
    return m == 1 or total == m or (hidden <= primary and total == m * (k - 1))


def _pinned_one(sizes: Mapping[str, int], hidden: set[str], primary: set[str], k: int) -> bool:
    return len([c for c in hidden if sizes[c] > 0]) == 1


# --- statistics -----------------------------------------------------------------------------


def _rank(scores: _Floats, labels: _Floats) -> _Ranked:
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    return _Ranked(order, starts, (labels[order] == 1).astype(np.float64))


def _auc(r: _Ranked, weights: _Floats) -> _Floats:
    """AUROC for each row of record ``weights`` (sorted order), NaN where one class is absent.

    Per tie group: positives weigh against negatives strictly below plus half of those tied.
    """
    wp = weights * r.pos
    p = np.add.reduceat(wp, r.starts, axis=1)
    q = np.add.reduceat(weights - wp, r.starts, axis=1)
    below = np.cumsum(q, axis=1) - q
    num = np.sum(p * (below + 0.5 * q), axis=1)
    den = np.sum(p, axis=1) * np.sum(q, axis=1)
    out = np.full(weights.shape[0], np.nan)
    ok = den > 0
    out[ok] = num[ok] / den[ok]
    return out


def _bootstrap(
    ranked: Mapping[int, _Ranked],
    valid: Mapping[int, _Bools],
    n: int,
    resamples: int,
    rng: np.random.Generator,
) -> dict[int, _Floats]:
    """Bootstrap AUROCs per label; every label sees the same resampled records."""
    chunks: dict[int, list[_Floats]] = {j: [] for j in ranked}
    batch = max(1, _BATCH_CELLS // n)
    done = 0
    while ranked and done < resamples:
        b = min(batch, resamples - done)
        idx = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
        counts = np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)
        for j, r in ranked.items():
            chunks[j].append(_auc(r, counts[:, valid[j]][:, r.order]))
        done += b
    return {j: np.concatenate(c) if c else np.empty(0) for j, c in chunks.items()}


def _ci(boot: _Floats) -> dict[str, Any]:
    used = boot[~np.isnan(boot)]
    if used.size == 0:
        return {"auroc_ci": None, "ci_resamples": 0}
    lo, hi = np.percentile(used, [2.5, 97.5])
    return {"auroc_ci": [float(lo), float(hi)], "ci_resamples": int(used.size)}


def _youden(scores: _Floats, labels: _Floats) -> float | None:
    v = ~np.isnan(labels)
    s, pos = scores[v], labels[v] == 1
    n_pos = int(pos.sum())
    n_neg = int(pos.size) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(-s, kind="stable")
    s, pos = s[order], pos[order]
    last = np.flatnonzero(np.r_[s[1:] != s[:-1], True])  # end of each tie group, descending
    j = np.cumsum(pos)[last] / n_pos - np.cumsum(~pos)[last] / n_neg
    return float(s[last[int(np.argmax(j))]])


def _at_threshold(s: _Floats, y: _Floats, threshold: float | None) -> dict[str, Any]:
    if threshold is None:
        return {"sensitivity": None, "specificity": None}
    pred = s >= threshold
    return {
        "sensitivity": float(np.mean(pred[y == 1])),
        "specificity": float(np.mean(~pred[y == 0])),
    }


def _calibration(p: _Floats, y: _Floats, k: int) -> tuple[float, list[dict[str, Any]]]:
    idx = np.minimum((p * CALIBRATION_BINS).astype(np.intp), CALIBRATION_BINS - 1)
    count = np.bincount(idx, minlength=CALIBRATION_BINS)
    sum_p = np.bincount(idx, weights=p, minlength=CALIBRATION_BINS)
    sum_y = np.bincount(idx, weights=y, minlength=CALIBRATION_BINS)
    ece = float(np.sum(np.abs(sum_p - sum_y)) / p.size)
    sizes = {str(b): int(count[b]) for b in range(CALIBRATION_BINS)}
    hidden = _suppress(sizes, {b for b, c in sizes.items() if 0 < c < k}, k, _pinned_one)
    bins: list[dict[str, Any]] = []
    for b in range(CALIBRATION_BINS):
        edges = [b / CALIBRATION_BINS, (b + 1) / CALIBRATION_BINS]
        if str(b) in hidden:
            bins.append({"bin": edges, "suppressed": True})
            continue
        n = int(count[b])
        mean, observed = (float(sum_p[b] / n), float(sum_y[b] / n)) if n else (None, None)
        bins.append({"bin": edges, "count": n, "mean_predicted": mean, "observed": observed})
    return ece, bins


def _roc(s: _Floats, y: _Floats, k: int) -> dict[str, list[float]]:
    """ROC vertices on test, each segment spanning at least ``max(k, n/100)`` records."""
    order = np.argsort(-s, kind="stable")
    sd, pos = s[order], y[order] == 1
    ends = np.flatnonzero(np.r_[sd[1:] != sd[:-1], True]) + 1  # records above each cut
    tp, fp = np.cumsum(pos), np.cumsum(~pos)
    n_pos, n_neg, n = float(tp[-1]), float(fp[-1]), int(sd.size)
    step = max(k, math.ceil(n / (ROC_MAX_POINTS - 1)))
    fpr, tpr, prev = [0.0], [0.0], 0
    for c in ends.tolist():
        if c - prev >= step and n - c >= step:
            fpr.append(float(fp[c - 1]) / n_neg)
            tpr.append(float(tp[c - 1]) / n_pos)
            prev = c
    return {"fpr": [*fpr, 1.0], "tpr": [*tpr, 1.0]}


def _macro(names: list[str], blocks: list[Any], boots: list[_Floats]) -> dict[str, Any]:
    def mean(key: str) -> float | None:
        vals = [b[key] for b in blocks if b[key] is not None]
        return float(np.mean(vals)) if vals else None

    ci: dict[str, Any] = {"auroc_ci": None, "ci_resamples": 0}
    if boots and all(b.size for b in boots):
        ci = _ci(np.mean(np.vstack(boots), axis=0))  # NaN where any label was undefined
    return {
        "labels": names,
        "auroc": mean("auroc"),
        **ci,
        "sensitivity": mean("sensitivity"),
        "specificity": mean("specificity"),
        "ece": mean("ece"),
    }


def _sigmoid(x: _Floats) -> _Floats:
    with np.errstate(over="ignore"):
        out: _Floats = 1.0 / (1.0 + np.exp(-x))
    return out


# --- validation and output -------------------------------------------------------------------


def _names(what: str, value: Sequence[str], *, required: bool) -> list[str]:
    if isinstance(value, (str, bytes)):
        raise UsageError(f"{what} must be a sequence of names, not one string")
    names = list(value)
    if (required and not names) or not all(isinstance(f, str) and f for f in names):
        raise UsageError(f"{what} must be a sequence of non-empty strings")
    if len(set(names)) != len(names):
        raise UsageError(f"{what} must not repeat a name")
    return names


def _int_option(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{name} must be an integer")
    if value < low or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise UsageError(f"{name} must be {bounds}; got {value}")
    return value


def _matrix(name: str, value: object, columns: int, *, labels: bool) -> _Floats:
    raw = np.asarray(value)
    if raw.dtype.kind not in "biuf":
        raise DataError(f"{name} must be a numeric array")
    arr = raw.astype(np.float64)
    if arr.ndim != 2 or arr.shape[1] != columns or arr.shape[0] == 0:
        raise DataError(f"{name} has shape {arr.shape}; expected (records >= 1, {columns})")
    if labels:
        bad = int(np.sum(~(np.isnan(arr) | (arr == 0) | (arr == 1))))
        if bad:
            raise DataError(
                f"{name} holds {bad} values other than 0, 1 or NaN; map uncertain and "
                f"missing labels per the bundle's policy before evaluating"
            )
    elif bad := int(np.sum(~np.isfinite(arr))):
        raise DataError(
            f"{name} holds {bad} non-finite values (NaN or infinity); the model must "
            f"score every record with a finite number"
        )
    return arr


def _cell_key(value: object) -> str:
    return UNKNOWN if value is None or value == "" else str(value)


def _words(field: str, cell: str) -> list[int]:
    """Stable seed words for one cell, so its CI does not depend on which fields ran."""
    h = hashlib.sha256(f"{field}\x00{cell}".encode()).digest()
    return [int.from_bytes(h[i : i + 4], "big") for i in range(0, 16, 4)]


def _clean(value: Any, digits: int) -> Any:
    if isinstance(value, Mapping):
        return {str(key): _clean(v, digits) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v, digits) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        return round(f, digits) + 0.0 if math.isfinite(f) else None
    return value
