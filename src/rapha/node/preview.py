"""What ``rapha node preview`` and ``rapha node profile`` do, apart from printing.

:func:`preview_view` builds exactly the view a job would get (job id ``preview``, a fresh
random salt each time, so its record ids match no job's), for a data-protection officer to
inspect. The test labels, which no sandbox is ever given, go to a private directory in
the node's state directory, ``<state_dir>/private/preview-<random>``, never beside the
view. The build is recorded in the audit log and the lookup register like any other.

:func:`profile_node` builds the same view in a temporary directory under the state
directory, aggregates it with :func:`rapha.dataset.profile` (small cells suppressed,
counts rounded) and deletes it: the profile describes what a job would be given, after
every exclusion. That view is handed to nobody, so it is not in the lookup register.

:func:`with_overrides` applies command-line flags over ``node.toml``, re-validating the
whole configuration.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from pydantic import ValidationError

from rapha.audit import AuditLog
from rapha.dataset import ViewSummary, profile
from rapha.errors import ConfigError
from rapha.node.pipeline import BuildProgress, InstanceOutcome, build_view
from rapha.node.settings import DicomWebSource, NodeKeys, NodeSettings
from rapha.node.sources import open_source
from rapha.pacs import DicomWebSource as DicomWebClientSource
from rapha.pacs import Source

__all__ = [
    "PREVIEW_JOB_ID",
    "PROFILE_JOB_ID",
    "PreviewResult",
    "preview_view",
    "profile_node",
    "with_overrides",
]

PREVIEW_JOB_ID: Final = "preview"
PROFILE_JOB_ID: Final = "profile"
_SALT_BYTES: Final = 32


@dataclass(frozen=True)
class PreviewResult:
    """A preview build: its summary, where the test labels went, what it took."""

    summary: ViewSummary
    private_dir: Path
    seconds: float
    #: finding -> {"positive", "negative", "uncertain", "missing"} -> records, all splits
    prevalence: dict[str, dict[str, int]] = field(default_factory=dict)


def with_overrides(
    settings: NodeSettings,
    *,
    source: str | None = None,
    labels: Path | None = None,
    hmac_key: Path | None = None,
) -> NodeSettings:
    """``settings`` with command-line flags applied: ``source`` is a folder or a DICOMweb
    URL (a URL keeps the configured authentication when the config names a DICOMweb PACS
    too), ``labels`` a label CSV, ``hmac_key`` a pseudonym key file. Relative paths are
    taken from the working directory. Raises :class:`ConfigError` like the config file."""
    data = settings.model_dump()
    if source is not None:
        if source.startswith(("http://", "https://")):
            if isinstance(settings.source, DicomWebSource):
                data["source"] = {**data["source"], "url": source}
            else:
                data["source"] = {"kind": "dicomweb", "url": source}
        else:
            data["source"] = {"kind": "folder", "path": Path(source).expanduser().absolute()}
    if labels is not None:
        data["labels"] = labels.expanduser().absolute()
    if hmac_key is not None:
        data["keys"]["hmac_key"] = hmac_key.expanduser().absolute()
    try:
        return NodeSettings.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
            for err in exc.errors(include_input=False, include_url=False)
        )
        raise ConfigError(f"invalid command-line override: {problems}") from exc


@contextmanager
def _opened(settings: NodeSettings, keys: NodeKeys) -> Iterator[Source]:
    """The configured source, closed (its HTTP session, if any) after use."""
    source = open_source(settings, keys)
    try:
        yield source
    finally:
        if isinstance(source, DicomWebClientSource):
            source.close()


def _prevalence(outcomes: list[InstanceOutcome]) -> dict[str, dict[str, int]]:
    names = {1: "positive", 0: "negative", -1: "uncertain", None: "missing"}
    tallies: dict[str, Counter[str]] = {}
    for outcome in outcomes:
        if outcome.record is None:
            continue
        for finding, value in outcome.record.labels.items():
            tallies.setdefault(finding, Counter())[names[value]] += 1
    return {
        finding: {name: tally[name] for name in names.values()}
        for finding, tally in sorted(tallies.items())
    }


def preview_view(
    settings: NodeSettings,
    *,
    out: Path,
    overwrite: bool = False,
    progress: Callable[[BuildProgress], None] | None = None,
) -> PreviewResult:
    """Build the view a job would get into ``out`` (see the module docstring)."""
    started = time.monotonic()
    keys = settings.keys.load()
    private_dir = settings.state_dir / "private" / f"{PREVIEW_JOB_ID}-{secrets.token_hex(8)}"
    outcomes: list[InstanceOutcome] = []
    with _opened(settings, keys) as source:
        summary = build_view(
            settings,
            source,
            out=out.expanduser().absolute(),
            private_dir=private_dir,
            job_id=PREVIEW_JOB_ID,
            job_salt=secrets.token_bytes(_SALT_BYTES),
            keys=keys,
            overwrite=overwrite,
            progress=progress,
            on_instance=outcomes.append,
        )
    return PreviewResult(
        summary=summary,
        private_dir=private_dir,
        seconds=time.monotonic() - started,
        prevalence=_prevalence(outcomes),
    )


def profile_node(
    settings: NodeSettings,
    *,
    k: int = 10,
    round_to: int = 5,
    progress: Callable[[BuildProgress], None] | None = None,
) -> dict[str, Any]:
    """The aggregate, suppressed profile of the view a job would get (module docstring)."""
    keys = settings.keys.load()
    records: list[dict[str, Any]] = []

    def collect(outcome: InstanceOutcome) -> None:
        if outcome.record is not None:
            record = outcome.record
            records.append(
                {
                    "meta": dict(record.meta),
                    "labels": dict(record.labels),
                    "patient": record.patient_pseudonym,
                }
            )

    settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    work = Path(tempfile.mkdtemp(prefix=".profile-", dir=settings.state_dir))
    try:
        with _opened(settings, keys) as source:
            summary = build_view(
                settings,
                source,
                out=work / "view",
                private_dir=work / "private",
                job_id=PROFILE_JOB_ID,
                job_salt=secrets.token_bytes(_SALT_BYTES),
                keys=keys,
                register=False,
                progress=progress,
                on_instance=collect,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = profile(records, k=k, round_to=round_to)
    AuditLog(settings.audit_log, keys.signing_key).append(
        "profile.compute",
        {"view_digest": summary.digest, "k": k, "round_to": round_to, "total": result["total"]},
    )
    return result
