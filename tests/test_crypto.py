"""rapha.crypto: keys, signatures, HMAC, digests, canonical JSON — including tamper cases."""

from __future__ import annotations

import hashlib
import hmac
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from rapha import crypto
from rapha.errors import DataError, KeyFileError, SignatureError


def test_saved_private_key_is_0600_and_round_trips(tmp_path: Path) -> None:
    key = crypto.generate_private_key()
    path = tmp_path / "node.key"

    crypto.save_private_key(key, path)
    loaded = crypto.load_private_key(path)

    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert crypto.public_key_bytes(loaded.public_key()) == crypto.public_key_bytes(key.public_key())


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o602])
def test_private_key_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "node.key"
    crypto.save_private_key(crypto.generate_private_key(), path)
    os.chmod(path, mode)

    with pytest.raises(KeyFileError, match="chmod 600"):
        crypto.load_private_key(path)


def test_existing_key_is_not_overwritten_without_force(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    first = crypto.generate_private_key()
    crypto.save_private_key(first, path)

    with pytest.raises(KeyFileError, match="already exists"):
        crypto.save_private_key(crypto.generate_private_key(), path)

    loaded = crypto.load_private_key(path)
    assert crypto.public_key_bytes(loaded.public_key()) == crypto.public_key_bytes(
        first.public_key()
    )


def test_missing_and_malformed_key_files_raise_key_file_error(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        crypto.load_private_key(tmp_path / "nope.key")
    bad = tmp_path / "bad.key"
    crypto.write_private_file(bad, b"not a pem")
    with pytest.raises(KeyFileError, match="PKCS#8"):
        crypto.load_private_key(bad)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl binary not installed")
def test_openssl_generated_key_loads_and_signs(tmp_path: Path) -> None:
    path = tmp_path / "openssl.key"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(path)], check=True)
    os.chmod(path, 0o600)

    key = crypto.load_private_key(path)
    sig = crypto.sign(key, b"hello")

    crypto.verify(key.public_key(), sig, b"hello")


def test_openssl_rsa_key_is_refused_as_not_ed25519(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl binary not installed")
    path = tmp_path / "rsa.key"
    subprocess.run(
        [
            "openssl",
            "genpkey",
            "-algorithm",
            "rsa",
            "-pkeyopt",
            "rsa_keygen_bits:1024",
            "-out",
            str(path),
        ],
        check=True,
        capture_output=True,
    )
    os.chmod(path, 0o600)

    with pytest.raises(KeyFileError, match="not an Ed25519 key"):
        crypto.load_private_key(path)


def test_public_key_pem_round_trips(tmp_path: Path) -> None:
    key = crypto.generate_private_key()
    path = tmp_path / "node.pub"

    crypto.save_public_key(key.public_key(), path)

    assert crypto.public_key_bytes(crypto.load_public_key(path)) == crypto.public_key_bytes(
        key.public_key()
    )


def test_signature_verifies_for_the_signed_message() -> None:
    key = crypto.generate_private_key()
    message = b"bundle digest 1234"

    signature = crypto.sign(key, message)

    assert len(signature) == crypto.SIGNATURE_SIZE
    crypto.verify(key.public_key(), signature, message)


def test_any_changed_byte_of_the_message_fails_verification() -> None:
    key = crypto.generate_private_key()
    message = b"receipt body with several bytes"
    signature = crypto.sign(key, message)

    for i in range(len(message)):
        tampered = bytearray(message)
        tampered[i] ^= 0x01
        with pytest.raises(SignatureError):
            crypto.verify(key.public_key(), signature, bytes(tampered))


def test_any_changed_byte_of_the_signature_fails_verification() -> None:
    key = crypto.generate_private_key()
    message = b"payload"
    signature = crypto.sign(key, message)

    for i in range(len(signature)):
        tampered = bytearray(signature)
        tampered[i] ^= 0x80
        with pytest.raises(SignatureError):
            crypto.verify(key.public_key(), bytes(tampered), message)


def test_signature_under_another_key_fails() -> None:
    message = b"payload"
    signature = crypto.sign(crypto.generate_private_key(), message)

    with pytest.raises(SignatureError):
        crypto.verify(crypto.generate_private_key().public_key(), signature, message)


def test_truncated_signature_fails() -> None:
    key = crypto.generate_private_key()
    signature = crypto.sign(key, b"m")

    with pytest.raises(SignatureError, match="64 bytes"):
        crypto.verify(key.public_key(), signature[:-1], b"m")


def test_public_key_from_wrong_length_bytes_is_refused() -> None:
    with pytest.raises(KeyFileError):
        crypto.public_key_from_bytes(b"\x00" * 31)


def test_hmac_matches_rfc4231_case_2() -> None:
    # RFC 4231, test case 2.
    mac = crypto.hmac_sha256(b"Jefe", b"what do ya want for nothing?")

    assert mac.hex() == "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"


def test_hmac_changes_with_key_and_message() -> None:
    base = crypto.hmac_sha256(b"k" * 32, b"patient")

    assert crypto.hmac_sha256(b"K" + b"k" * 31, b"patient") != base
    assert crypto.hmac_sha256(b"k" * 32, b"patienT") != base
    assert base == hmac.new(b"k" * 32, b"patient", hashlib.sha256).digest()


def test_secret_file_must_have_exact_length_and_private_mode(tmp_path: Path) -> None:
    path = tmp_path / "hmac.key"
    crypto.write_secret(path, b"x" * 32)
    assert crypto.load_secret(path, length=32) == b"x" * 32

    short = tmp_path / "short.key"
    crypto.write_secret(short, b"x" * 31)
    with pytest.raises(KeyFileError, match="exactly 32"):
        crypto.load_secret(short, length=32)

    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="other users"):
        crypto.load_secret(path, length=32)


def test_streaming_digest_equals_one_shot_sha256(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 + 17)
    path = tmp_path / "blob"
    path.write_bytes(data)

    assert crypto.digest_file(path, chunk_size=1000) == hashlib.sha256(data).hexdigest()
    assert crypto.digest_bytes(data) == hashlib.sha256(data).hexdigest()


def test_file_digest_changes_when_one_byte_changes(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"a" * 4096)
    before = crypto.digest_file(path)

    with path.open("r+b") as fh:
        fh.seek(2048)
        fh.write(b"b")

    assert crypto.digest_file(path) != before


def test_digest_of_missing_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError):
        crypto.digest_file(tmp_path / "missing")


def test_canonical_json_follows_rfc8785() -> None:
    # RFC 8785 section 3.2.3: keys sorted by UTF-16 code units, numbers in ES6 form.
    value = {"numbers": [333333333.33333329, 1e30, 4.50, 2e-3, 1e-27], "a": "\u20ac", "b": True}

    out = crypto.canonical_json(value)

    assert out == (
        b'{"a":"\xe2\x82\xac","b":true,"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27]}'
    )


def test_canonical_json_is_independent_of_key_order() -> None:
    assert crypto.canonical_json({"b": 1, "a": {"d": 2, "c": 3}}) == crypto.canonical_json(
        {"a": {"c": 3, "d": 2}, "b": 1}
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 2**60])
def test_canonical_json_refuses_values_it_cannot_represent(bad: float) -> None:
    with pytest.raises(DataError):
        crypto.canonical_json({"x": bad})
