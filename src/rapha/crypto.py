"""Keys, signatures, keyed hashes, digests and canonical JSON.

Everything Rapha signs or hashes goes through this module, so that there is one way to do
each thing:

* Ed25519 keys are stored as standard, unencrypted PKCS#8 PEM (private) and
  SubjectPublicKeyInfo PEM (public), the formats ``openssl genpkey -algorithm ed25519``
  writes, so operators can use their own tooling. Private key files are written 0600 and
  refused when any other user could read or write them.
* HMAC-SHA256 is the pseudonymisation primitive; secret key files (HMAC, split keys) use
  the same permission rules as signing keys.
* Digests stream files in fixed-size chunks, so memory use does not grow with file size.
* Canonical JSON is RFC 8785 (JSON Canonicalization Scheme): what is signed is exactly the
  bytes another party recomputes.
"""

from __future__ import annotations

import hashlib
import hmac as _hmac
import json
import os
import re
import stat
from pathlib import Path
from typing import Any, Final

import rfc8785
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from rapha.errors import DataError, KeyFileError, RaphaError, SignatureError

__all__ = [
    "CHUNK_SIZE",
    "SIGNATURE_SIZE",
    "Ed25519PrivateKey",
    "Ed25519PublicKey",
    "canonical_json",
    "check_private_file",
    "digest_bytes",
    "digest_file",
    "generate_private_key",
    "hmac_sha256",
    "load_private_key",
    "load_public_key",
    "load_public_key_pem",
    "load_secret",
    "load_secret_hex",
    "parse_json",
    "public_key_bytes",
    "public_key_from_bytes",
    "public_key_pem",
    "read_bounded",
    "save_private_key",
    "save_public_key",
    "sign",
    "verify",
    "write_private_atomic",
    "write_private_file",
    "write_secret",
]

CHUNK_SIZE: Final = 1 << 20
SIGNATURE_SIZE: Final = 64
_PRIVATE_MODE: Final = 0o600


# --- private files -----------------------------------------------------------------------


def check_private_file(path: Path) -> None:
    """Refuse ``path`` unless it is a regular file no other user can read or write.

    Raises :class:`KeyFileError` naming the fix (``chmod 600``) when group or other
    permission bits are set, and when the file is missing or not a regular file.
    """
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise KeyFileError(f"key file {path} does not exist") from exc
    except OSError as exc:
        raise KeyFileError(f"key file {path} cannot be read: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"key file {path} is not a regular file")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"key file {path} is accessible by other users (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run: chmod 600 {path}"
        )


def write_private_file(path: Path, data: bytes, *, overwrite: bool = False) -> None:
    """Write ``data`` to ``path`` with mode 0600 from the first byte.

    The file is created with ``O_EXCL`` so a secret is never briefly world-readable and an
    existing key is never silently replaced; pass ``overwrite=True`` to replace one.
    """
    if path.exists() and not overwrite:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key (remove it first)")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _PRIVATE_MODE)
    except OSError as exc:
        raise KeyFileError(f"cannot create {path}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _PRIVATE_MODE)  # in case a umask-free fs ignored the create mode
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_secret(path: Path, secret: bytes, *, overwrite: bool = False) -> None:
    """Write a raw secret (an HMAC or split key) as a 0600 file."""
    write_private_file(path, secret, overwrite=overwrite)


def load_secret(path: Path, *, length: int) -> bytes:
    """Read a raw secret key file of exactly ``length`` bytes, refusing loose permissions."""
    check_private_file(path)
    data = path.read_bytes()
    if len(data) != length:
        raise KeyFileError(
            f"key file {path} holds {len(data)} bytes; exactly {length} are required "
            f"(create one with `rapha node init`)"
        )
    return data


def write_private_atomic(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically and durably, readable only by its owner.

    Writes a sibling temporary file, fsyncs it, renames it over ``path`` and fsyncs the
    directory: a crash leaves the old file or the new one, never a mix.
    :class:`DataError` names the file when the disk refuses.
    """
    from rapha.errors import DataError

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # O_CREAT's mode does not apply to a leftover file
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot write {path}: {exc.strerror}") from exc


def load_secret_hex(path: Path, *, length: int, what: str = "key") -> bytes:
    """Read a secret written as hex text (``0x`` optional, e.g. a secp256k1 key) of
    ``length`` bytes, refusing loose permissions; :class:`KeyFileError` names the file."""
    check_private_file(path)
    try:
        text = path.read_text(encoding="ascii").strip().removeprefix("0x")
        data = bytes.fromhex(text)
    except (UnicodeDecodeError, ValueError):
        data = b""
    if len(data) != length:
        raise KeyFileError(f"{what} file {path} must hold {length} bytes written as hex")
    return data


# --- Ed25519 -----------------------------------------------------------------------------


def generate_private_key() -> Ed25519PrivateKey:
    """Return a fresh Ed25519 private key from the OS CSPRNG."""
    return Ed25519PrivateKey.generate()


def save_private_key(key: Ed25519PrivateKey, path: Path, *, overwrite: bool = False) -> None:
    """Save ``key`` as unencrypted PKCS#8 PEM, mode 0600."""
    pem = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
    write_private_file(path, pem, overwrite=overwrite)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load an Ed25519 PKCS#8 PEM private key, refusing files other users can access."""
    check_private_file(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(
            f"{path} is not an unencrypted PKCS#8 PEM private key "
            "(make one with `rapha keygen --out FILE` or `openssl genpkey -algorithm ed25519`)"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    """A public key as SubjectPublicKeyInfo PEM bytes."""
    return key.public_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PublicFormat.SubjectPublicKeyInfo,
    )


def save_public_key(key: Ed25519PublicKey, path: Path) -> None:
    """Save a public key as SubjectPublicKeyInfo PEM (mode 0644: public keys are public)."""
    path.write_bytes(public_key_pem(key))


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load an Ed25519 public key from SubjectPublicKeyInfo PEM."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise KeyFileError(f"public key file {path} does not exist") from exc
    return load_public_key_pem(data, what=str(path))


def load_public_key_pem(data: bytes, *, what: str = "the key") -> Ed25519PublicKey:
    """Parse an Ed25519 public key from SubjectPublicKeyInfo PEM bytes."""
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{what} is not a PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{what} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def public_key_bytes(key: Ed25519PublicKey) -> bytes:
    """Return the 32 raw bytes of an Ed25519 public key (RFC 8032)."""
    return key.public_bytes(
        encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw
    )


def public_key_from_bytes(raw: bytes) -> Ed25519PublicKey:
    """Rebuild a public key from its 32 raw bytes."""
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise KeyFileError("an Ed25519 public key is exactly 32 bytes") from exc


def sign(key: Ed25519PrivateKey, message: bytes) -> bytes:
    """Return the 64-byte Ed25519 signature of ``message``."""
    return key.sign(message)


def verify(key: Ed25519PublicKey, signature: bytes, message: bytes) -> None:
    """Verify an Ed25519 signature; raise :class:`SignatureError` if it does not hold."""
    if len(signature) != SIGNATURE_SIZE:
        raise SignatureError(
            f"an Ed25519 signature is {SIGNATURE_SIZE} bytes, not {len(signature)}"
        )
    try:
        key.verify(signature, message)
    except InvalidSignature as exc:
        raise SignatureError(
            "signature does not verify: the data or signature was changed"
        ) from exc


# --- keyed hashes and digests ------------------------------------------------------------


def hmac_sha256(key: bytes, message: bytes) -> bytes:
    """HMAC-SHA256 (RFC 2104) of ``message`` under ``key``; 32 bytes."""
    return _hmac.new(key, message, hashlib.sha256).digest()


def digest_bytes(data: bytes) -> str:
    """SHA-256 of ``data`` as lower-case hex."""
    return hashlib.sha256(data).hexdigest()


def read_bounded(
    path: Path, *, limit: int, what: str, error: type[RaphaError] = DataError
) -> bytes:
    """Read at most ``limit`` bytes of ``path``, refusing a longer file as ``error``."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(limit + 1)
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror}") from exc
    if len(raw) > limit:
        raise error(f"{what} is larger than {limit} bytes")
    return raw


def digest_file(path: Path, *, chunk_size: int = CHUNK_SIZE) -> str:
    """SHA-256 of a file's contents as lower-case hex, read in ``chunk_size`` pieces."""
    h = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            while chunk := fh.read(chunk_size):
                h.update(chunk)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from exc
    return h.hexdigest()


# --- canonical JSON ----------------------------------------------------------------------


def canonical_json(value: Any) -> bytes:
    """Serialise ``value`` as RFC 8785 canonical JSON (UTF-8 bytes).

    Raises :class:`DataError` for values JCS cannot represent exactly (NaN, infinities,
    integers beyond IEEE-754 double precision): callers must encode such numbers as strings.
    """
    try:
        return bytes(rfc8785.dumps(value))
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:
        raise DataError(f"value cannot be written as canonical JSON: {exc}") from exc


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def _nesting(text: str) -> int:
    """The deepest ``[``/``{`` nesting of JSON ``text`` (brackets inside strings ignored)."""
    depth = deepest = 0
    for char in _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)):
        depth += 1 if char in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw: bytes, *, what: str, max_depth: int = 32) -> Any:
    """Parse untrusted JSON strictly: UTF-8, no NaN/Infinity, no duplicate keys, bounded depth.

    The depth is checked before parsing, so deeply nested input cannot exhaust the stack.

    Raises:
        DataError: naming ``what``, when the input is not such JSON.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{what} is not UTF-8 text") from exc
    if _nesting(text) > max_depth:
        raise DataError(f"{what} is nested more than {max_depth} levels deep")
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise DataError(f"{what} is not valid JSON: {exc}") from exc
