"""Rapha: compute-to-data for medical imaging AI.

A model goes to the hospital; the hospital's DICOM never leaves. See DESIGN.md for the
parts and the trust boundaries between them.
"""

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("rapha")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
