"""Pseudonyms: keyed, domain-separated, valid UIDs, per-job record ids."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import pytest
from pydicom.uid import UID

from rapha.crypto import write_secret
from rapha.errors import DataError, KeyFileError, UsageError
from rapha.privacy import Domain, Pseudonymizer, record_id

KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))
UID_SHAPE = re.compile(r"2\.25\.(0|[1-9][0-9]*)")
HEX64 = re.compile(r"[0-9a-f]{64}")


def _random_uid(rng: random.Random, length: int) -> str:
    """A syntactically valid UID (PS3.5 9.1) of exactly ``length`` characters."""
    parts: list[str] = []
    while True:
        used = len(".".join(parts))
        left = length - used - (1 if parts else 0)
        if left <= 0:
            break
        size = min(left, rng.randint(1, 12))
        if left - size == 1:  # a lone dot would be left over: take it as a digit
            size += 1
        first = rng.choice("123456789") if size > 1 else rng.choice("0123456789")
        parts.append(first + "".join(rng.choice("0123456789") for _ in range(size - 1)))
    uid = ".".join(parts)
    assert len(uid) == length
    return uid


def _uids(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lengths = [64] * (count // 4) + [rng.randint(3, 64) for _ in range(count - count // 4)]
    return [_random_uid(rng, n) for n in lengths]


VALUES = [f"MRN{n:08d}" for n in range(500)] + _uids(500, seed=1)


def test_pseudonyms_are_stable_under_one_key() -> None:
    first, second = Pseudonymizer(KEY_A), Pseudonymizer(bytes(KEY_A))

    for domain in Domain:
        for value in VALUES[::25]:
            assert first.pseudonym(domain, value) == second.pseudonym(domain, value)
            assert first.uid(domain, value) == second.uid(domain, value)


def test_another_key_changes_every_pseudonym() -> None:
    a, b = Pseudonymizer(KEY_A), Pseudonymizer(KEY_B)

    under_a = {a.pseudonym(d, v) for d in Domain for v in VALUES}
    under_a |= {a.uid(d, v) for d in Domain for v in VALUES}
    under_b = {b.pseudonym(d, v) for d in Domain for v in VALUES}
    under_b |= {b.uid(d, v) for d in Domain for v in VALUES}

    assert len(under_a) == len(under_b) == 2 * len(Domain) * len(VALUES)
    assert not under_a & under_b


def test_domains_are_separated() -> None:
    p = Pseudonymizer(KEY_A)

    names = {p.pseudonym(d, "12345678") for d in Domain}
    uids = {p.uid(d, "1.2.3.4") for d in Domain}

    assert len(names) == len(uids) == len(Domain)


@pytest.mark.parametrize(
    ("left", "right"),
    [
        ("a|b", "a"),
        ("patient|12345", "12345"),
        ("12345\x00patient", "12345"),
    ],
)
def test_separator_tricks_do_not_collide(left: str, right: str) -> None:
    p = Pseudonymizer(KEY_A)

    left_all = {p.pseudonym(d, left) for d in Domain}
    right_all = {p.pseudonym(d, right) for d in Domain}

    assert not left_all & right_all


def test_padding_is_not_part_of_an_identifier() -> None:
    p = Pseudonymizer(KEY_A)

    assert p.pseudonym(Domain.PATIENT, "12345 ") == p.pseudonym(Domain.PATIENT, "12345")
    assert p.uid(Domain.STUDY, "1.2.3\x00") == p.uid(Domain.STUDY, "1.2.3")


def test_pseudonym_is_hex_and_hides_the_value() -> None:
    p = Pseudonymizer(KEY_A)

    out = p.pseudonym(Domain.PATIENT, "MRN00000042")

    assert HEX64.fullmatch(out)
    assert "00000042" not in out


def test_every_pseudonymous_uid_is_valid() -> None:
    p = Pseudonymizer(KEY_A)
    inputs = _uids(2000, seed=2)

    outputs = [p.uid(d, u) for u in inputs for d in (Domain.STUDY, Domain.SERIES)]

    for out in outputs:
        assert UID_SHAPE.fullmatch(out), out
        assert len(out) <= 64
        assert int(out[5:]) < 2**128
        assert UID(out).is_valid
    assert len(set(outputs)) == len(outputs)


def test_uid_mapping_keeps_study_structure() -> None:
    p = Pseudonymizer(KEY_A)
    study, series = "1.2.840.113619.2.1", ["1.2.840.113619.2.1.1", "1.2.840.113619.2.1.2"]

    instances = [(p.uid(Domain.STUDY, study), p.uid(Domain.SERIES, s)) for s in series * 3]

    assert len({study_uid for study_uid, _ in instances}) == 1
    assert len({series_uid for _, series_uid in instances}) == 2


def test_record_ids_differ_between_jobs() -> None:
    p = Pseudonymizer(KEY_A)
    stable = [p.pseudonym(Domain.PATIENT, v) for v in VALUES]
    job1, job2 = os.urandom(32), os.urandom(32)

    ids1 = [record_id(s, job1) for s in stable]
    ids2 = [record_id(s, job2) for s in stable]

    assert ids1 == [record_id(s, job1) for s in stable]  # stable within a job
    assert len(set(ids1)) == len(stable)
    assert not set(ids1) & set(ids2)
    assert not set(ids1) & set(stable)


def test_record_id_refuses_a_short_salt() -> None:
    with pytest.raises(UsageError, match="salt"):
        record_id("ab" * 32, b"short")


def test_empty_identifier_is_refused() -> None:
    with pytest.raises(DataError):
        Pseudonymizer(KEY_A).pseudonym(Domain.PATIENT, "  ")


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_key_of_wrong_length_is_refused(size: int) -> None:
    with pytest.raises(KeyFileError, match="32 bytes"):
        Pseudonymizer(b"k" * size)


def test_key_file_is_loaded(tmp_path: Path) -> None:
    path = tmp_path / "hmac.key"
    write_secret(path, KEY_A)

    p = Pseudonymizer.from_file(path)

    assert p.pseudonym(Domain.PATIENT, "x1234") == Pseudonymizer(KEY_A).pseudonym(
        Domain.PATIENT, "x1234"
    )
    assert "key" in repr(p)
    assert KEY_A.hex() not in repr(p)


@pytest.mark.parametrize("size", [16, 31, 33])
def test_key_file_of_wrong_length_is_refused(tmp_path: Path, size: int) -> None:
    path = tmp_path / "hmac.key"
    write_secret(path, b"k" * size)

    with pytest.raises(KeyFileError, match="32"):
        Pseudonymizer.from_file(path)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_key_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "hmac.key"
    write_secret(path, KEY_A)
    path.chmod(mode)

    with pytest.raises(KeyFileError, match="chmod 600"):
        Pseudonymizer.from_file(path)
