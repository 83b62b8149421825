"""A whole synthetic hospital on disk, and the view a job would get there.

``rapha job dry-run --synthetic`` uses it so that a company can run the exact node pipeline
without hospital data: the synthetic archive generator (:mod:`rapha.demo`) writes a PACS
folder with planted PHI, a node is laid out beside it (:func:`rapha.node.init_node`), and
the view is built by the node's own pipeline (:func:`rapha.node.build_view`) through the
folder source, so the pseudonyms, the allowlist, the splits and the exclusions are the
real ones. The identifiers the egress scan must look for are collected on the way.

The archive depends only on its studies, seed and image side, so a run may reuse one from
a cache directory (``cache``, or ``RAPHA_SYNTHETIC_CACHE``): it is written once under an
exclusive lock, renamed into place whole, and only read afterwards. The node, its keys,
the view and the test labels are always fresh.

OCR is switched off for the radiograph modalities, with the written justification the
node's settings demand: the archive is synthetic, and the header screen still excludes
every image it flags as carrying burned-in text.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from rapha.dataset import ViewSummary
from rapha.node.bootstrap import init_node
from rapha.node.pipeline import BuildProgress, InstanceOutcome, build_view
from rapha.node.settings import NodeSettings, load_node_settings
from rapha.node.sources import open_source

__all__ = ["PreparedView", "cohort_needles", "prepare_synthetic_view"]

CACHE_ENV: Final = "RAPHA_SYNTHETIC_CACHE"
_OCR_OFF: Final = "synthetic archive generated for a dry-run; no real text is burned in"


@dataclass(frozen=True)
class PreparedView:
    """A built view and what the node knows about it (``needles`` are PHI: node only)."""

    view: Path
    private_dir: Path
    node_dir: Path
    archive: Path
    settings: NodeSettings
    summary: ViewSummary
    needles: tuple[str, ...]


class NeedleCollector:
    """``on_instance`` callback of a build: every identifier of the records that went in."""

    def __init__(self) -> None:
        self._found: dict[str, None] = {}

    def __call__(self, outcome: InstanceOutcome) -> None:
        if outcome.record is None:
            return
        values: list[str] = [outcome.record.record_id, outcome.record.patient_pseudonym]
        if outcome.ref is not None:
            values += [outcome.ref.study_uid, outcome.ref.series_uid, outcome.ref.sop_uid]
        values += outcome.identifiers
        for value in values:
            self._found.setdefault(value, None)

    @property
    def needles(self) -> tuple[str, ...]:
        return cohort_needles(self._found)


def cohort_needles(values: Sequence[str] | dict[str, None]) -> tuple[str, ...]:
    """The identifiers long enough to scan for (shorter ones would match any byte stream)."""
    from rapha.privacy import MIN_NEEDLE_CHARS

    return tuple(sorted(v for v in values if len(v.replace(" ", "")) >= MIN_NEEDLE_CHARS))


def _configure(node_dir: Path, archive: Path, size: tuple[int, int]) -> Path:
    config = node_dir / "node.toml"
    text = config.read_text(encoding="utf-8")
    text = text.replace('# labels = "labels.csv"', f'labels = "{archive / "labels.csv"}"')
    text = re.sub(r"(?m)^date_from = \S+", "date_from = 2000-01-01", text)
    text = re.sub(r"(?m)^size = \[\d+, \d+\]", f"size = [{size[0]}, {size[1]}]", text)
    text = text.replace(
        "[ocr.disabled]", f'[ocr.disabled]\nDX = "{_OCR_OFF}"\nCR = "{_OCR_OFF}"', 1
    )
    text = re.sub(r"(?m)^max_studies = \d+", "max_studies = 100000", text)
    config.write_text(text, encoding="utf-8")
    return config


def _generate(
    archive: Path, studies: int, seed: int, side: int, report: Callable[[int, int], None] | None
) -> None:
    from rapha.demo.archive import generate_archive

    generate_archive(archive, studies=studies, seed=seed, size_range=(side, side), progress=report)


def _cached_archive(
    cache: Path, studies: int, seed: int, side: int, report: Callable[[int, int], None] | None
) -> Path:
    """The cached archive for these parameters, generated first if no run made it yet."""
    cache.mkdir(parents=True, exist_ok=True, mode=0o700)
    archive = cache / f"archive-{studies}-{seed}-{side}"
    with (cache / f".{archive.name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run writing it: wait, then reuse
        if not archive.is_dir():
            partial = cache / f".{archive.name}.partial"
            shutil.rmtree(partial, ignore_errors=True)  # left by a run that died
            _generate(partial, studies, seed, side, report)
            partial.rename(archive)
    return archive


def prepare_synthetic_view(
    workdir: Path,
    *,
    studies: int,
    seed: int,
    size: tuple[int, int],
    job_id: str,
    progress: Callable[[str, int, int], None] | None = None,
    cache: Path | None = None,
) -> PreparedView:
    """Generate an archive of ``studies`` studies under ``workdir`` and build its view.

    ``progress(phase, done, total)`` is called as the archive is written and the view
    built. The node's keys, audit log and test labels stay under ``workdir``. With a
    ``cache`` directory (default: ``$RAPHA_SYNTHETIC_CACHE`` if set), the archive is taken
    from there, or written there once for later runs.
    """
    workdir = Path(workdir)
    side = max(64, *size)  # the generator's JPEG 2000 encoder needs 64 px or more
    if cache is None and os.environ.get(CACHE_ENV):
        cache = Path(os.environ[CACHE_ENV])
    report = (lambda d, t: progress("archive", d, t)) if progress else None
    if cache is None:
        archive = workdir / "archive"
        _generate(archive, studies, seed, side, report)
    else:
        archive = _cached_archive(Path(cache), studies, seed, side, report)
    node_dir = workdir / "node"
    init_node(node_dir, name="dry-run-node", source=str(archive / "dicom"))
    settings = load_node_settings(_configure(node_dir, archive, size), env={})
    keys = settings.keys.load()
    collector = NeedleCollector()

    def on_build(state: BuildProgress) -> None:
        if progress is not None:
            progress("view", state.studies_done, state.studies_total)

    summary = build_view(
        settings,
        open_source(settings, keys),
        out=workdir / "view",
        private_dir=workdir / "private",
        job_id=job_id,
        job_salt=secrets.token_bytes(32),
        keys=keys,
        workers=min(2, os.cpu_count() or 1),
        progress=on_build,
        on_instance=collector,
    )
    return PreparedView(
        view=summary.out,
        private_dir=workdir / "private",
        node_dir=node_dir,
        archive=archive,
        settings=settings,
        summary=summary,
        needles=collector.needles,
    )
