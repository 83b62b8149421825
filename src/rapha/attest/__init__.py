"""Attestation evidence (TPM 2.0 quote, SGX DCAP, dev) and its verification.

Empty room: the attestation issue fills it (see DESIGN.md, "Parts").
"""

__all__: list[str] = []
