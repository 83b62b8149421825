"""The hub: FastAPI app, database, routing and job services.

Empty room: the hub/node issue fills it (see DESIGN.md, "Parts").
"""

__all__: list[str] = []
