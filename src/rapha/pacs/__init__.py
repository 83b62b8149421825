"""PHI zone: the Source protocol, the folder and DICOMweb sources, and the hospital's Scope.

Everything here handles raw DICOM headers and identifiers; nothing it returns may leave
the node process unless the privacy layer has turned it into a view (DESIGN.md, trust
boundary 1). The scope gate (:func:`check_query`) refuses any study query that is not
bounded by the hospital's scope before it is sent.
"""

from rapha.pacs.auth import BasicAuth, BearerToken, ClientCert, PacsAuth
from rapha.pacs.dicomweb import DicomWebSource
from rapha.pacs.folder import FolderSource, ScanReport
from rapha.pacs.scope import Scope, ScopeSettings, StudyQuery, check_query, queries_for
from rapha.pacs.source import InstanceRef, Source, SourceItem, StudyFacts

__all__ = [
    "BasicAuth",
    "BearerToken",
    "ClientCert",
    "DicomWebSource",
    "FolderSource",
    "InstanceRef",
    "PacsAuth",
    "ScanReport",
    "Scope",
    "ScopeSettings",
    "Source",
    "SourceItem",
    "StudyFacts",
    "StudyQuery",
    "check_query",
    "queries_for",
]
