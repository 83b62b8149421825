"""The node's view build: from the PACS, through the PHI boundary, to the view a job reads.

:func:`build_view` wires the rooms together (DESIGN.md, trust boundaries 1 and 2). A
**record is one DICOM instance** (one SOP Instance, one image): the view holds one
image per record, and a study with several images gives several records. Each instance
the source yields goes through these steps, in this order; the first that excludes it
counts it under one reason (:class:`rapha.privacy.Exclusion` values, plus the few of
:class:`BuildReason`) and nothing later sees it:

1. **unreadable**: the source could not read the object (``SourceItem.error``, and the
   folder source's :meth:`~rapha.pacs.Source.unreadable` files) → ``unreadable_file``;
2. **opt-out, first of all**: the raw PatientID (0010,0020) against the hospital's
   opt-out list → ``patient_opted_out`` (an instance without a PatientID cannot be
   checked and is ``missing_patient_id``);
3. **header screen, pseudonyms, allowlist** (:func:`rapha.node.deid.deidentify_header`):
   burned-in flag, US/SC/OT, secondary image types, SC devices and non-image objects are
   excluded (:func:`rapha.privacy.screen_header`); for the rest, the stable pseudonyms of
   patient and instance and the allowlisted facts, and nothing else of the header;
4. **labels**, joined on the raw AccessionNumber / StudyInstanceUID, on the node
   (:class:`rapha.dataset.LabelTable`): the table is keyed by raw identifiers, which never
   leave this process;
5. **pixels**: the display image (:func:`rapha.node.deid.display_image`); multi-frame →
   ``multi_frame``, colour → ``colour``, undecodable → ``undecodable_pixels``, no pixel
   data → ``non_image_object``; then resampled to the job's size
   (:func:`rapha.dataset.resample`);
6. **split and record id**: the split from the raw PatientID under the split key
   (:func:`rapha.dataset.assign_split`); the record id is the HMAC of the instance's
   stable pseudonym under the job salt (:func:`rapha.privacy.record_id`);
7. **OCR** (:class:`rapha.privacy.OcrScreen`) on the full-resolution display image (text
   too small to survive resampling is still text), for every modality unless
   ``[ocr.disabled]`` switches it off in writing → text found is ``text_found_by_ocr``,
   an OCR failure ``ocr_failed`` (never a pass);
8. the record goes to :class:`rapha.dataset.ViewWriter` (an instance met twice is
   ``duplicate_instance``).

Nothing aborts a build but a configuration or scope error (:class:`ConfigError`,
:class:`KeyFileError`, :class:`ScopeError`), a PACS that cannot be reached
(:class:`RemoteError`) or a missing OCR engine (:class:`DependencyError`); any other
trouble with one instance excludes that instance under a counted reason.

Determinism: records are keyed by record id and sorted by the writer, OCR runs in worker
threads but results are taken in order, so the same archive, keys and salt give a
byte-identical view and the same digest through either source. Exclusion counts may
differ between sources (a PACS refuses corrupt files at upload); they are in
``view.json`` and the audit log, not in the digest.

Every build appends to the audit log: ``pacs.scope`` (the scope it read under) at the
start, each DICOMweb study query as ``pacs.query`` (from :func:`open_source`), and
``view.build`` (job id, digest, counts, exclusions by reason) at the end. The lookup
register (:mod:`rapha.node.register`) records which stable patient pseudonyms each view
used, for data-subject requests.
"""

from __future__ import annotations

import enum
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
from numpy.typing import NDArray

from rapha.audit import AuditLog
from rapha.dataset import (
    LabelTable,
    PixelDType,
    PixelReason,
    ViewParams,
    ViewRecord,
    ViewSummary,
    ViewWriter,
    assign_split,
    resample,
)
from rapha.errors import DataError, RaphaError
from rapha.node.deid import deidentify_header, display_image, header_text
from rapha.node.optout import OptOutList
from rapha.node.register import LookupRegister
from rapha.node.settings import NodeKeys, NodeSettings
from rapha.node.sources import scope_summary, source_kind
from rapha.pacs import (
    InstanceRef,
    Scope,
    Source,
    SourceItem,
)
from rapha.privacy import ALLOWLIST, Exclusion, OcrScreen, Pseudonymizer, options_used, record_id

__all__ = ["BuildProgress", "BuildReason", "InstanceOutcome", "build_view"]

_PATIENT_NAME: Final = 0x00100010
_PATIENT_ID: Final = 0x00100020
_ACCESSION: Final = 0x00080050
_MODALITY: Final = 0x00080060
_IN_FLIGHT_PER_WORKER: Final = 2  # display images held at full size while OCR runs


class BuildReason(enum.StrEnum):
    """Exclusion reasons of the build itself, beside :class:`rapha.privacy.Exclusion`."""

    DUPLICATE_INSTANCE = "duplicate_instance"
    MISSING_PATIENT_ID = "missing_patient_id"
    OCR_FAILED = "ocr_failed"
    PROCESSING_ERROR = "processing_error"


_PIXEL_REASONS: Final[Mapping[str, str]] = {
    PixelReason.NO_PIXELS.value: Exclusion.NON_IMAGE_OBJECT.value,
    PixelReason.MULTIFRAME.value: Exclusion.MULTIFRAME.value,
    PixelReason.COLOUR.value: Exclusion.COLOUR.value,
    PixelReason.UNDECODABLE.value: Exclusion.UNDECODABLE.value,
}


@dataclass(frozen=True)
class BuildProgress:
    """Where a build is: studies listed and done, instances decided, records kept."""

    studies_total: int
    studies_done: int
    instances: int
    records: int
    excluded: int


@dataclass(frozen=True)
class InstanceOutcome:
    """What happened to one instance; node-internal (``ref`` holds raw UIDs: PHI).

    ``reason`` is the exclusion reason, or ``None`` when ``record`` went into the view.
    ``ref`` is ``None`` for objects the source could not read. ``identifiers`` (PHI) are
    the raw and pseudonymous identifiers of a record that went in: PatientID,
    PatientName, AccessionNumber, the stable instance pseudonym; the egress scan of a
    job's outputs looks for them (:func:`rapha.privacy.find_leaks`).
    """

    ref: InstanceRef | None
    reason: str | None
    record: ViewRecord | None = field(default=None, repr=False)
    identifiers: tuple[str, ...] = field(default=(), repr=False)


@dataclass
class _Candidate:
    """An instance that passed every step before OCR."""

    ref: InstanceRef
    record: ViewRecord
    display: NDArray[np.float32] = field(repr=False)
    modality: str
    identifiers: tuple[str, ...] = field(default=(), repr=False)


@dataclass
class _Context:
    settings: NodeSettings
    keys: NodeKeys
    job_salt: bytes
    opt_out: OptOutList
    labels: LabelTable | None
    pseudonymizer: Pseudonymizer
    ocr: OcrScreen
    size: tuple[int, int]


# --- one instance ----------------------------------------------------------------------


def _pixel_reason(exc: DataError) -> str:
    return _PIXEL_REASONS.get(str(exc), Exclusion.UNDECODABLE.value)


def _screen(item: SourceItem, ctx: _Context) -> _Candidate | str:
    """Steps 1 to 6 of the module docstring: a candidate for OCR, or an exclusion reason."""
    ds, ref = item.dataset, item.ref
    if item.error is not None or ds is None or ref is None:
        return Exclusion.UNREADABLE.value
    patient_id = header_text(ds, _PATIENT_ID)
    if patient_id is None:
        return BuildReason.MISSING_PATIENT_ID.value
    if ctx.opt_out.is_opted_out(patient_id):
        return Exclusion.OPTED_OUT.value
    header = deidentify_header(ds, ctx.pseudonymizer)
    if header.exclusion is not None:
        return header.exclusion.value
    if header.patient_pseudonym is None or header.sop_uid is None:
        return Exclusion.UNREADABLE.value
    labels: dict[str, int | None] = {}
    if ctx.labels is not None:
        labels = ctx.labels.lookup(accession=header_text(ds, _ACCESSION), study_uid=ref.study_uid)
    try:
        display = display_image(ds)
    except DataError as exc:
        return _pixel_reason(exc)
    split = assign_split(patient_id, ctx.keys.split_key, ctx.settings.view.ratios)
    record = ViewRecord(
        record_id=record_id(header.sop_uid, ctx.job_salt),
        split=split,
        pixels=resample(display, ctx.size),
        meta=dict(header.meta),
        labels=labels,
        patient_pseudonym=header.patient_pseudonym,
    )
    modality = header_text(ds, _MODALITY) or ""
    raw = (patient_id, header_text(ds, _PATIENT_NAME), header_text(ds, _ACCESSION))
    identifiers = tuple(dict.fromkeys(v for v in (*raw, header.sop_uid) if v))
    return _Candidate(
        ref=ref, record=record, display=display, modality=modality.upper(), identifiers=identifiers
    )


def _screen_safely(item: SourceItem, ctx: _Context) -> _Candidate | str:
    try:
        return _screen(item, ctx)
    except DataError:
        return Exclusion.UNREADABLE.value
    except RaphaError:
        raise  # configuration, keys, dependencies: the build cannot go on
    except Exception:  # foreign data must never crash a build; counted, never shown
        return BuildReason.PROCESSING_ERROR.value


def _ocr_reason(ocr: OcrScreen, candidate: _Candidate) -> str | None:
    """Step 7: ``None`` when no text was found (or OCR is off for the modality)."""
    try:
        found = ocr.has_text(candidate.display, candidate.modality)
    except DataError:
        return BuildReason.OCR_FAILED.value
    except RaphaError:
        raise  # Tesseract is gone: no image can be screened any more
    except Exception:  # any other failure is a failure to screen, never a pass
        return BuildReason.OCR_FAILED.value
    return Exclusion.OCR_TEXT.value if found else None


# --- the build -------------------------------------------------------------------------


def _items(source: Source, scope: Scope, studies: list[str]) -> Iterator[tuple[int, SourceItem]]:
    for number, study_uid in enumerate(studies, start=1):
        for item in source.instances(scope, study_uid):
            yield number, item


def _params(
    settings: NodeSettings,
    job_id: str,
    labels: LabelTable | None,
    size: tuple[int, int] | None,
    dtype: PixelDType | None,
) -> ViewParams:
    view = settings.view
    return ViewParams(
        size=size or view.size,
        dtype=dtype or PixelDType(view.dtype),
        findings=labels.findings if labels is not None else (),
        ratios=view.ratios,
        job_salt_id=job_id,
        allowlist=tuple(f.name for f in ALLOWLIST),
        options=tuple(options_used()),
    )


def build_view(
    settings: NodeSettings,
    source: Source,
    *,
    out: Path,
    private_dir: Path,
    job_id: str,
    job_salt: bytes,
    keys: NodeKeys,
    size: tuple[int, int] | None = None,
    dtype: PixelDType | None = None,
    overwrite: bool = False,
    register: bool = True,
    workers: int | None = None,
    progress: Callable[[BuildProgress], None] | None = None,
    on_instance: Callable[[InstanceOutcome], None] | None = None,
) -> ViewSummary:
    """Build the view of ``settings``' scope from ``source`` into ``out`` (module docstring).

    ``job_salt`` (at least 16 random bytes, fresh per job) makes the per-job record ids;
    ``job_id`` names the job in the view parameters, the audit log and the register.
    ``size`` and ``dtype`` override the ``[view]`` defaults for a job that asks for
    others. Test labels go to ``private_dir`` (never under ``out``). ``register=False``
    keeps the build out of the lookup register (for a view nobody is given, such as the
    one a profile is computed from). ``workers`` OCR threads run at once (default: the
    CPU count, at most 4). ``progress`` is called as the build advances and
    ``on_instance`` once per instance, in source order; both run in the calling thread.
    """
    started = time.monotonic()
    scope = settings.scope.to_scope()
    labels = LabelTable.from_csv(settings.labels) if settings.labels is not None else None
    params = _params(settings, job_id, labels, size, dtype)
    ctx = _Context(
        settings=settings,
        keys=keys,
        job_salt=job_salt,
        opt_out=OptOutList.from_file(settings.opt_out),
        labels=labels,
        pseudonymizer=Pseudonymizer(keys.hmac_key),
        ocr=OcrScreen(disabled=settings.ocr.disabled),
        size=params.size,
    )
    record_id("0", job_salt)  # refuses a short salt before anything is read
    log = AuditLog(settings.audit_log, keys.signing_key)
    kind = source_kind(source)
    log.append("pacs.scope", {"job_id": job_id, "source": kind, **scope_summary(scope)})

    try:
        studies = source.studies(scope)
        tally = _Tally(len(studies), progress, on_instance)
        with ViewWriter(out, private_dir, params, overwrite=overwrite) as writer:
            _read_all(source, scope, studies, ctx, writer, tally, workers)
            summary = writer.finish()
    except RaphaError as exc:
        # The failure's class, never its message: the log must not carry what it names.
        log.append("view.failed", {"job_id": job_id, "source": kind, "error": type(exc).__name__})
        raise
    tally.study(len(studies))

    log.append(
        "view.build",
        {
            "job_id": job_id,
            "source": kind,
            "digest": summary.digest,
            "records": summary.records,
            "counts": dict(summary.counts),
            "exclusions": dict(summary.exclusions),
            "studies": len(studies),
            "patients": len(summary.patients),
            "ocr_disabled": sorted(settings.ocr.disabled),
            "options": list(params.options),
            "seconds": round(time.monotonic() - started, 1),
        },
    )
    if register:
        LookupRegister(settings.state_dir).record(summary, job_id=job_id, private_dir=private_dir)
    return summary


def _read_all(
    source: Source,
    scope: Scope,
    studies: list[str],
    ctx: _Context,
    writer: ViewWriter,
    tally: _Tally,
    workers: int | None,
) -> None:
    """Screen every instance in source order; OCR runs in a few threads meanwhile."""
    pool_size = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="rapha-ocr") as pool:
        # Only the outcome and the UIDs wait for OCR, never the dataset and its pixels.
        pending: deque[tuple[_Candidate | str, Future[str | None] | None, InstanceRef | None]]
        pending = deque()
        for item in source.unreadable():
            tally.decide(writer, item.ref, Exclusion.UNREADABLE.value)
        for number, item in _items(source, scope, studies):
            outcome = _screen_safely(item, ctx)
            future = None
            if isinstance(outcome, _Candidate) and ctx.ocr.enabled_for(outcome.modality):
                future = pool.submit(_ocr_reason, ctx.ocr, outcome)
            pending.append((outcome, future, item.ref))
            while len(pending) > pool_size * _IN_FLIGHT_PER_WORKER:
                tally.settle(writer, *pending.popleft())
            tally.study(number - 1)  # the studies before this one are read in full
        while pending:
            tally.settle(writer, *pending.popleft())


class _Tally:
    """Counts and callbacks of one build; runs in the calling thread only."""

    def __init__(
        self,
        studies: int,
        progress: Callable[[BuildProgress], None] | None,
        on_instance: Callable[[InstanceOutcome], None] | None,
    ) -> None:
        self.studies = studies
        self.done = 0
        self.instances = 0
        self.records = 0
        self.excluded = 0
        self._progress = progress
        self._on_instance = on_instance
        self._seen: set[str] = set()

    def decide(self, writer: ViewWriter, ref: InstanceRef | None, reason: str) -> None:
        writer.exclude(reason)
        self.excluded += 1
        self._tell(InstanceOutcome(ref, reason))

    def settle(
        self,
        writer: ViewWriter,
        outcome: _Candidate | str,
        future: Future[str | None] | None,
        ref: InstanceRef | None,
    ) -> None:
        if isinstance(outcome, str):
            self.decide(writer, ref, outcome)
            return
        reason = future.result() if future is not None else None
        if reason is None and outcome.record.record_id in self._seen:
            reason = BuildReason.DUPLICATE_INSTANCE.value
        if reason is not None:
            self.decide(writer, ref, reason)
            return
        self._seen.add(outcome.record.record_id)
        writer.add(outcome.record)
        self.records += 1
        self._tell(InstanceOutcome(outcome.ref, None, outcome.record, outcome.identifiers))

    def study(self, done: int) -> None:
        if done != self.done:
            self.done = done
            self._report()

    def _tell(self, outcome: InstanceOutcome) -> None:
        self.instances += 1
        if self._on_instance is not None:
            self._on_instance(outcome)
        self._report()

    def _report(self) -> None:
        if self._progress is not None:
            self._progress(
                BuildProgress(self.studies, self.done, self.instances, self.records, self.excluded)
            )
