"""The PACS source a node's settings name, wired to the audit log.

:func:`open_source` turns the ``[source]`` table into a :class:`rapha.pacs.FolderSource`
(with its header index in the state directory) or a :class:`rapha.pacs.DicomWebSource`
(with the PACS credentials read from their 0600 files). A DICOMweb source appends a
``pacs.query`` entry to the audit log right before each study query is sent: the query's
scope (modality, date range, limit, offset, which allow-list keys), never its results.
"""

from __future__ import annotations

from typing import Any, Final

from rapha.audit import AuditLog
from rapha.node import settings as node_settings
from rapha.node.settings import NodeKeys, NodeSettings
from rapha.pacs import (
    BasicAuth,
    BearerToken,
    ClientCert,
    DicomWebSource,
    FolderSource,
    PacsAuth,
    Scope,
    Source,
)

__all__ = ["FOLDER_INDEX", "open_source", "scope_summary", "source_kind"]

#: The folder source's header index, in the node's state directory (it holds UIDs: 0600).
FOLDER_INDEX: Final = "folder-index.json"


def _pacs_auth(auth: object) -> PacsAuth | None:
    if isinstance(auth, node_settings.BasicAuth):
        return BasicAuth(auth.username, auth.password())
    if isinstance(auth, node_settings.BearerAuth):
        return BearerToken(auth.token())
    if isinstance(auth, node_settings.TlsAuth):
        return ClientCert(auth.cert, auth.key, auth.ca)
    return None


def open_source(settings: NodeSettings, keys: NodeKeys) -> Source:
    """The PACS source ``settings`` names. Every DICOMweb study query is written to the
    audit log (its PHI-free scope, never its results) right before it is sent."""
    config = settings.source
    if isinstance(config, node_settings.FolderSource):
        return FolderSource(config.path, cache=settings.state_dir / FOLDER_INDEX)
    log = AuditLog(settings.audit_log, keys.signing_key)

    def on_query(description: dict[str, str | list[str]]) -> None:
        log.append("pacs.query", {"source": "dicomweb", **description})

    return DicomWebSource(
        config.url, auth=_pacs_auth(config.auth), timeout=config.timeout, on_query=on_query
    )


def source_kind(source: Source) -> str:
    """``folder``, ``dicomweb`` or ``other``: how the audit log names a source."""
    if isinstance(source, FolderSource):
        return "folder"
    return "dicomweb" if isinstance(source, DicomWebSource) else "other"


def scope_summary(scope: Scope) -> dict[str, Any]:
    """The scope's bounds for the audit log: codes, dates and the cap, never the
    allow-lists' values (which name studies)."""
    return {
        "modalities": sorted(scope.modalities),
        "body_parts": sorted(scope.body_parts),
        "date_from": scope.date_from.isoformat(),
        "date_to": scope.date_to.isoformat(),
        "max_studies": scope.max_studies,
        "study_allow_list": scope.study_uids is not None,
        "accession_allow_list": scope.accessions is not None,
    }
