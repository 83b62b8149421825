"""Synthetic hospital data for the one-machine demo and the tests.

:func:`generate_archive` writes a PACS-export-like folder of DICOM files with planted PHI,
burned-in text, damaged files, a labels CSV and a ``truth.json`` describing all of it
(schema in :mod:`rapha.demo.archive`). :func:`render_radiograph` draws one synthetic chest
radiograph with chosen :data:`FINDINGS`.
"""

from __future__ import annotations

from rapha.demo.archive import ArchiveSummary, generate_archive, is_archive
from rapha.demo.phantom import FINDINGS, render_radiograph

__all__ = ["FINDINGS", "ArchiveSummary", "generate_archive", "is_archive", "render_radiograph"]
