"""Escrow contract sources (Vyper), the chain client and settlement.

Empty room: the escrow issue fills it (see DESIGN.md, "Parts").
"""

__all__: list[str] = []
