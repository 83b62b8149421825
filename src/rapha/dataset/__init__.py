"""The view: pixel decoding, labels, patient-level splits, the view format, profiles.

Node-side only. This package receives already pseudonymised record ids and allowlisted
metadata from the node pipeline; it never imports the PACS or privacy rooms.
"""

from rapha.dataset.labels import LabelTable, LabelValue
from rapha.dataset.pixels import PixelDType, PixelReason, dequantize, quantize, resample, to_display
from rapha.dataset.profile import profile
from rapha.dataset.splits import Split, assign_split, check_ratios
from rapha.dataset.view import ViewParams, ViewRecord, ViewSummary, ViewWriter, verify_view

__all__ = [
    "LabelTable",
    "LabelValue",
    "PixelDType",
    "PixelReason",
    "Split",
    "ViewParams",
    "ViewRecord",
    "ViewSummary",
    "ViewWriter",
    "assign_split",
    "check_ratios",
    "dequantize",
    "profile",
    "quantize",
    "resample",
    "to_display",
    "verify_view",
]
