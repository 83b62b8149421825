"""``rapha keygen``: make an Ed25519 signing key pair."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from rapha import crypto

__all__ = ["keygen"]

console = Console()


def keygen(
    out: Annotated[
        Path, typer.Option("--out", help="Private key file to write (PKCS#8 PEM, 0600).")
    ],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key file.")] = False,
) -> None:
    """Create an Ed25519 key: OUT holds the private key (0600), OUT.pub the public key."""
    key = crypto.generate_private_key()
    pub_path = out.with_name(out.name + ".pub")
    crypto.save_private_key(key, out, overwrite=force)
    crypto.save_public_key(key.public_key(), pub_path)
    raw = crypto.public_key_bytes(key.public_key())
    console.print(f"private key: {out} (mode 0600)")
    console.print(f"public key:  {pub_path}")
    console.print(f"public key (hex): {raw.hex()}")
