"""Untrusted code: bundles, the sandbox, the in-sandbox harness, trusted evaluation and
the output guard.

Empty room: the sandbox issue fills it (see DESIGN.md, "Parts").
"""

__all__: list[str] = []
