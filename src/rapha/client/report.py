"""The results report: one self-contained HTML page for a fetched job result.

``rapha job fetch JOB --out DIR`` leaves the guarded outbox (``metrics.json``, weights …)
and ``receipt.json`` in DIR. :func:`render_report` turns DIR into one HTML page: the ROC
curves, the reliability diagrams and the training curve as inline SVG, the metrics with
their 95% CIs, the subgroup table with suppressed cells marked, the receipt, the
settlement and the verification checks. The page loads nothing: no script, no style
sheet, no font, no image, and its Content-Security-Policy forbids them anyway.
:func:`write_report` writes it, never into DIR (an extra file there fails
``rapha job verify``).

``metrics.json`` and ``receipt.json`` come from other parties. Every string from them is
HTML-escaped, and a field that is missing, null, not finite or of the wrong type shows as
"n/a" instead of failing the page. :func:`summarise` is the presentation-free reading of
the metrics document (:mod:`rapha.runtime.evaluate` and the node's additions) that the
page, and a terminal summary, are drawn from.

The ``settlement`` mapping :func:`render_report` takes describes the settling
transaction; every key is optional and anything else is ignored:

* ``tx_hash``: the settlement transaction's hash (``0x`` and 64 hex digits);
* ``block``: the block it was mined in;
* ``chain_id``: the chain's id (default: the one the receipt names);
* ``hospital_share_bps``: the vault's hospital share in basis points
  (``ClearingVault.hospital_share_bps()``), to show the hospital/treasury split;
* ``balances``: ``[{"who", "address", "before", "after"}]``, token base units.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, TypeVar

from rapha import crypto
from rapha.errors import DataError, UsageError
from rapha.receipt import RECEIPT_FILE, Check, load_receipt

__all__ = [
    "MAX_METRICS_BYTES",
    "MAX_POINTS",
    "CalibrationBin",
    "CellMetric",
    "LabelRow",
    "MetricsSummary",
    "OverallRow",
    "Status",
    "SubgroupRow",
    "TrainingPoint",
    "render_report",
    "summarise",
    "write_report",
]

METRICS_FILE: Final = "metrics.json"
#: Largest metrics.json read; the node's is tens of kilobytes.
MAX_METRICS_BYTES: Final = 8 * 1024 * 1024
#: Most points kept of one curve (ROC vertices, training events); longer ones are thinned.
MAX_POINTS: Final = 1000
_MAX_BINS: Final = 100
_T = TypeVar("_T")


class Status(StrEnum):
    """Whether a figure was published, and if not, which disclosure rule hid it."""

    PUBLISHED = "published"
    #: A label with fewer than ``k`` positives or negatives (in the test set or a cell).
    WITHHELD = "withheld"
    #: A subgroup cell with fewer than ``k`` records, or hidden so one cannot be solved for.
    SUPPRESSED = "suppressed"


@dataclass(frozen=True, slots=True)
class CalibrationBin:
    """One reliability-diagram bin; a suppressed bin has no count and no values."""

    low: float | None
    high: float | None
    count: int | None
    mean_predicted: float | None
    observed: float | None
    suppressed: bool


@dataclass(frozen=True, slots=True)
class LabelRow:
    """One label on the whole test split; a withheld label has only its name."""

    label: str
    status: Status
    n_pos: int | None = None
    n_neg: int | None = None
    auroc: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    ci_resamples: int | None = None
    sensitivity: float | None = None
    specificity: float | None = None
    ece: float | None = None
    threshold: float | None = None
    #: ROC vertices ``(fpr, tpr)`` on test, at most :data:`MAX_POINTS`.
    roc: tuple[tuple[float, float], ...] = ()
    calibration: tuple[CalibrationBin, ...] = ()


@dataclass(frozen=True, slots=True)
class OverallRow:
    """The macro average over the published labels named in ``labels``."""

    labels: tuple[str, ...]
    auroc: float | None
    ci_low: float | None
    ci_high: float | None
    sensitivity: float | None
    specificity: float | None
    ece: float | None


@dataclass(frozen=True, slots=True)
class CellMetric:
    """One label's AUROC in one subgroup cell (``None`` values when not published)."""

    label: str
    status: Status
    n_pos: int | None = None
    n_neg: int | None = None
    auroc: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None


@dataclass(frozen=True, slots=True)
class SubgroupRow:
    """One cell of a subgroup field (``sex`` = ``F`` …); a suppressed cell has no figures."""

    field: str
    cell: str
    status: Status
    n: int | None
    labels: tuple[CellMetric, ...]


@dataclass(frozen=True, slots=True)
class TrainingPoint:
    """One progress event of the training run (numbers only, as the sandbox sent them)."""

    step: int | None
    steps: int | None
    epoch: int | None
    epochs: int | None
    loss: float | None


@dataclass(frozen=True, slots=True)
class MetricsSummary:
    """What a metrics document says, read defensively into plain typed values.

    ``labels`` keep the document's order. ``withheld_fields`` are subgroup fields whose
    every cell is suppressed. ``training`` is ``None`` when the job trained nothing (an
    evaluate job) and empty when a training run reported no event.
    """

    k: int | None
    n: int | None
    n_val: int | None
    kind: str | None
    labels: tuple[LabelRow, ...]
    overall: OverallRow | None
    subgroups: tuple[SubgroupRow, ...]
    withheld_fields: tuple[str, ...]
    training: tuple[TrainingPoint, ...] | None

    @property
    def published(self) -> tuple[LabelRow, ...]:
        """The labels whose figures were published."""
        return tuple(row for row in self.labels if row.status is Status.PUBLISHED)


# --- reading the metrics document ----------------------------------------------------------


def summarise(metrics: Mapping[str, Any]) -> MetricsSummary:
    """Read a metrics document (``metrics.json``) into a :class:`MetricsSummary`.

    Never raises on content: a missing, null, non-finite or mistyped value becomes
    ``None`` (or is left out of a curve), ``{"suppressed": true}`` becomes
    :attr:`Status.WITHHELD` for a label and :attr:`Status.SUPPRESSED` for a subgroup
    cell, and curves longer than :data:`MAX_POINTS` are thinned evenly (the last point
    kept).
    """
    labels = _mapping(metrics.get("labels"))
    rows = tuple(_label_row(str(name), block) for name, block in labels.items())
    order = [row.label for row in rows]
    subgroups: list[SubgroupRow] = []
    withheld: list[str] = []
    for field, cells in _mapping(metrics.get("subgroups")).items():
        field_rows = [
            _subgroup_row(str(field), str(cell), value, order)
            for cell, value in _mapping(cells).items()
        ]
        if field_rows and all(r.status is Status.SUPPRESSED for r in field_rows):
            withheld.append(str(field))
        subgroups += field_rows
    return MetricsSummary(
        k=_count(metrics.get("k")),
        n=_count(metrics.get("n")),
        n_val=_count(metrics.get("n_val")),
        kind=_text(_mapping(metrics.get("job")).get("kind")),
        labels=rows,
        overall=_overall(metrics.get("overall")),
        subgroups=tuple(subgroups),
        withheld_fields=tuple(withheld),
        training=_training(metrics.get("training")),
    )


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _count(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _suppressed(block: Mapping[str, Any]) -> bool:
    return block.get("suppressed") is True


def _interval(value: object) -> tuple[float | None, float | None]:
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        low, high = _number(value[0]), _number(value[1])
        if low is not None and high is not None:
            return low, high
    return None, None


def _thin(items: Sequence[_T], limit: int) -> list[_T]:
    if len(items) <= limit:
        return list(items)
    return [items[round(i * (len(items) - 1) / (limit - 1))] for i in range(limit)]


def _label_row(name: str, value: object) -> LabelRow:
    block = _mapping(value)
    if _suppressed(block):
        return LabelRow(name, Status.WITHHELD)
    low, high = _interval(block.get("auroc_ci"))
    return LabelRow(
        label=name,
        status=Status.PUBLISHED,
        n_pos=_count(block.get("n_pos")),
        n_neg=_count(block.get("n_neg")),
        auroc=_number(block.get("auroc")),
        ci_low=low,
        ci_high=high,
        ci_resamples=_count(block.get("ci_resamples")),
        sensitivity=_number(block.get("sensitivity")),
        specificity=_number(block.get("specificity")),
        ece=_number(block.get("ece")),
        threshold=_number(block.get("threshold")),
        roc=_roc(block.get("roc")),
        calibration=_calibration(block.get("calibration")),
    )


def _roc(value: object) -> tuple[tuple[float, float], ...]:
    roc = _mapping(value)
    fpr, tpr = roc.get("fpr"), roc.get("tpr")
    if not (isinstance(fpr, list) and isinstance(tpr, list)):
        return ()
    pairs = [(_number(x), _number(y)) for x, y in zip(fpr, tpr, strict=False)]
    points = [(x, y) for x, y in pairs if x is not None and y is not None]
    return tuple(_thin(points, MAX_POINTS))


def _calibration(value: object) -> tuple[CalibrationBin, ...]:
    if not isinstance(value, list):
        return ()
    bins = []
    for entry in value[:_MAX_BINS]:
        block = _mapping(entry)
        low, high = _interval(block.get("bin"))
        if _suppressed(block):
            bins.append(CalibrationBin(low, high, None, None, None, suppressed=True))
            continue
        bins.append(
            CalibrationBin(
                low,
                high,
                _count(block.get("count")),
                _number(block.get("mean_predicted")),
                _number(block.get("observed")),
                suppressed=False,
            )
        )
    return tuple(bins)


def _overall(value: object) -> OverallRow | None:
    block = _mapping(value)
    if not block:
        return None
    names = block.get("labels")
    low, high = _interval(block.get("auroc_ci"))
    return OverallRow(
        labels=tuple(str(n) for n in names) if isinstance(names, list) else (),
        auroc=_number(block.get("auroc")),
        ci_low=low,
        ci_high=high,
        sensitivity=_number(block.get("sensitivity")),
        specificity=_number(block.get("specificity")),
        ece=_number(block.get("ece")),
    )


def _subgroup_row(field: str, cell: str, value: object, order: Sequence[str]) -> SubgroupRow:
    block = _mapping(value)
    if _suppressed(block):
        return SubgroupRow(field, cell, Status.SUPPRESSED, None, ())
    labels = _mapping(block.get("labels"))
    metrics = []
    for name in [*order, *(str(n) for n in labels if str(n) not in order)]:
        entry = _mapping(labels.get(name))
        if _suppressed(entry):
            metrics.append(CellMetric(name, Status.WITHHELD))
            continue
        low, high = _interval(entry.get("auroc_ci"))
        metrics.append(
            CellMetric(
                name,
                Status.PUBLISHED,
                n_pos=_count(entry.get("n_pos")),
                n_neg=_count(entry.get("n_neg")),
                auroc=_number(entry.get("auroc")),
                ci_low=low,
                ci_high=high,
            )
        )
    return SubgroupRow(field, cell, Status.PUBLISHED, _count(block.get("n")), tuple(metrics))


def _training(value: object) -> tuple[TrainingPoint, ...] | None:
    if value is None:
        return None
    progress = _mapping(value).get("progress")
    if not isinstance(progress, list):
        return ()
    points = [
        TrainingPoint(
            step=_count(event.get("step")),
            steps=_count(event.get("steps")),
            epoch=_count(event.get("epoch")),
            epochs=_count(event.get("epochs")),
            loss=_number(event.get("loss")),
        )
        for event in progress
        if isinstance(event, Mapping)
    ]
    return tuple(_thin(points, MAX_POINTS))


# --- the page ------------------------------------------------------------------------------


def render_report(
    result_dir: Path,
    *,
    settlement: Mapping[str, Any] | None = None,
    checks: Sequence[Check] | None = None,
) -> str:
    """The HTML page for ``result_dir`` (as ``rapha job fetch`` wrote it).

    ``settlement`` describes the settling transaction (keys: module docstring); ``checks``
    are :func:`rapha.receipt.verify_result`'s, shown as they are (``None``: not run).

    Raises:
        UsageError: ``result_dir`` is not a directory.
        DataError: its ``metrics.json`` or ``receipt.json`` is missing, too large or not
            a JSON object.
    """
    from rapha.client._report_html import render  # it reads this module's dataclasses

    if not result_dir.is_dir():
        raise UsageError(f"{result_dir} is not a directory; pass a job's result directory")
    metrics = _load_metrics(result_dir / METRICS_FILE)
    receipt = _load_receipt(result_dir / RECEIPT_FILE)
    return render(
        summarise(metrics),
        receipt,
        settlement=settlement,
        checks=checks,
        source=str(result_dir),
    )


def write_report(
    result_dir: Path,
    out: Path,
    *,
    settlement: Mapping[str, Any] | None = None,
    checks: Sequence[Check] | None = None,
) -> Path:
    """Render the page (as :func:`render_report`) and write it to ``out``.

    The file is written beside ``out`` under a temporary name and renamed into place, so
    ``out`` is never half-written. Returns ``out``.

    Raises:
        UsageError: ``out`` lies inside ``result_dir`` (an extra file there fails
            ``rapha job verify``), or is a directory.
        DataError: as :func:`render_report`, or the file cannot be written.
    """
    if out.resolve().is_relative_to(result_dir.resolve()):
        raise UsageError(
            f"{out} is inside {result_dir}: an extra file there fails `rapha job verify`; "
            "write the report elsewhere, e.g. --out report.html"
        )
    if out.is_dir():
        raise UsageError(f"{out} is a directory; give a file name such as report.html")
    text = render_report(result_dir, settlement=settlement, checks=checks)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot write the report to {out}: {exc.strerror}") from exc
    return out


_REFETCH: Final = "fetch the result again with `rapha job fetch JOB --out DIR`"


def _load_metrics(path: Path) -> Mapping[str, Any]:
    if not path.is_file():
        raise DataError(f"{path.parent} has no {METRICS_FILE}; it is not a job result: {_REFETCH}")
    raw = crypto.read_bounded(path, limit=MAX_METRICS_BYTES, what=str(path))
    try:
        value = crypto.parse_json(raw, what=str(path))
    except DataError as exc:
        raise DataError(f"{exc}; {_REFETCH}") from exc
    if not isinstance(value, dict):
        raise DataError(f"{path} holds JSON but not an object; {_REFETCH}")
    return value


def _load_receipt(path: Path) -> Mapping[str, Any]:
    if not path.is_file():
        raise DataError(f"{path.parent} has no {RECEIPT_FILE}; it is not a job result: {_REFETCH}")
    try:
        return load_receipt(path)
    except DataError as exc:
        raise DataError(f"{exc}; {_REFETCH}") from exc
