"""The PHI boundary: pseudonyms, the attribute allowlist, burned-in screening, the egress scan.

What crosses from the node to model code is decided here (DESIGN.md, trust boundary 2):

* :mod:`~rapha.privacy.pseudonym`: keyed HMAC pseudonyms and valid ``2.25`` UIDs that stay in
  the node, and per-job record ids that reach the view;
* :mod:`~rapha.privacy.allowlist`: the only header facts a view may carry, checked against
  DICOM PS3.15 Table E.1-1;
* :mod:`~rapha.privacy.screen`: excluding instances that may carry burned-in text, from the
  header and with OCR, fail closed;
* :mod:`~rapha.privacy.egress`: proving that no identifier is in any byte of a directory.

This package depends on nothing in Rapha but :mod:`rapha.crypto` and :mod:`rapha.errors`.
"""

from rapha.privacy.allowlist import (
    ALLOWLIST,
    AllowedField,
    MetaValue,
    ProfileOption,
    age_band,
    extract_meta,
    options_used,
)
from rapha.privacy.egress import MIN_NEEDLE_CHARS, Leak, find_leaks
from rapha.privacy.pseudonym import Domain, Pseudonymizer, record_id
from rapha.privacy.screen import MIN_JUSTIFICATION_CHARS, Exclusion, OcrScreen, screen_header

__all__ = [
    "ALLOWLIST",
    "MIN_JUSTIFICATION_CHARS",
    "MIN_NEEDLE_CHARS",
    "AllowedField",
    "Domain",
    "Exclusion",
    "Leak",
    "MetaValue",
    "OcrScreen",
    "ProfileOption",
    "Pseudonymizer",
    "age_band",
    "extract_meta",
    "find_leaks",
    "options_used",
    "record_id",
    "screen_header",
]
