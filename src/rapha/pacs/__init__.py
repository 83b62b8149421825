"""PHI zone: the Source protocol, the folder and DICOMweb sources, and the hospital's Scope.

Empty room: the hospital data layer issue fills it (see DESIGN.md, "Parts").
"""

__all__: list[str] = []
