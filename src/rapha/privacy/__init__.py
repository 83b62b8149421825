"""The PHI boundary: pseudonyms, the attribute allowlist, burned-in screening, the egress scan.

Empty room: the hospital data layer issue fills it (see DESIGN.md, "Parts").
"""

__all__: list[str] = []
