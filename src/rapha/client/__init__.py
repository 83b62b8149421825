"""Python SDK for the hub API.

Empty room: the hub/node issue fills it (see DESIGN.md, "Parts").
"""

__all__: list[str] = []
