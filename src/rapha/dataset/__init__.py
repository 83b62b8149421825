"""The view: pixel decoding, labels, patient-level splits, the view format, profiles.

Empty room: the hospital data layer issue fills it (see DESIGN.md, "Parts").
"""

__all__: list[str] = []
