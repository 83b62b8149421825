"""rapha.audit: the hash-chained, signed audit log, and every way of tampering with it."""

from __future__ import annotations

import itertools
import json
import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from rapha import crypto
from rapha.audit import AuditLog, AuditVerdict, verify_log
from rapha.errors import IntegrityError, SignatureError, UsageError


class FixedClock:
    """A clock that advances one second per call, so entries have known times."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        moment = self.now
        self.now += timedelta(seconds=1)
        return moment


@pytest.fixture
def key() -> crypto.Ed25519PrivateKey:
    return crypto.generate_private_key()


def _log_with(path: Path, key: crypto.Ed25519PrivateKey, n: int) -> AuditLog:
    log = AuditLog.create(path, key)
    for i in range(n):
        log.append("view.build", {"records": i, "excluded": {"ocr_text": i % 3}})
    return log


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


# --- appending and verifying -------------------------------------------------------------


def test_new_log_has_a_genesis_entry_naming_the_public_key(
    tmp_path: Path, key: crypto.Ed25519PrivateKey
) -> None:
    path = tmp_path / "audit.jsonl"

    log = AuditLog.create(path, key)

    entries = [json.loads(line) for line in _lines(path)]
    assert len(entries) == 1
    assert entries[0]["event"] == "audit.genesis"
    assert entries[0]["seq"] == 0
    assert entries[0]["prev"] == "0" * 64
    assert entries[0]["data"]["public_key"] == crypto.public_key_bytes(key.public_key()).hex()
    assert log.head() == entries[0]["hash"]
    assert verify_log(path, key.public_key()) == AuditVerdict(entries=1, head=log.head())


def test_appended_entries_chain_and_verify(tmp_path: Path, key: crypto.Ed25519PrivateKey) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog.create(path, key)

    hashes = [log.append("pacs.query", {"modality": "DX", "limit": 100}) for _ in range(3)]

    entries = [json.loads(line) for line in _lines(path)]
    assert [e["seq"] for e in entries] == [0, 1, 2, 3]
    assert [e["hash"] for e in entries[1:]] == hashes
    assert all(e["prev"] == p["hash"] for p, e in itertools.pairwise(entries))
    assert log.anchor() == AuditVerdict(entries=4, head=hashes[-1])
    assert verify_log(path, key.public_key()) == AuditVerdict(entries=4, head=hashes[-1])


def test_every_line_is_canonical_json(tmp_path: Path, key: crypto.Ed25519PrivateKey) -> None:
    path = tmp_path / "audit.jsonl"
    _log_with(path, key, 3)

    for line in _lines(path):
        assert line.endswith(b"\n")
        assert crypto.canonical_json(json.loads(line)) + b"\n" == line


def test_the_injected_clock_sets_utc_times(tmp_path: Path, key: crypto.Ed25519PrivateKey) -> None:
    path = tmp_path / "audit.jsonl"
    plus_two = timezone(timedelta(hours=2))
    clock = FixedClock(datetime(2025, 3, 1, 14, 0, 0, tzinfo=plus_two))

    log = AuditLog.create(path, key, clock=clock)
    log.append("view.build", {"records": 1})

    times = [json.loads(line)["time"] for line in _lines(path)]
    assert times == ["2025-03-01T12:00:00.000000Z", "2025-03-01T12:00:01.000000Z"]


def test_a_naive_clock_is_refused(tmp_path: Path, key: crypto.Ed25519PrivateKey) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog.create(path, key)
    naive = AuditLog(path, key, clock=lambda: datetime(2025, 1, 1))

    with pytest.raises(UsageError, match="naive"):
        naive.append("view.build", {"records": 1})

    assert log.anchor().entries == 1


def test_a_reopened_log_continues_the_chain(tmp_path: Path, key: crypto.Ed25519PrivateKey) -> None:
    path = tmp_path / "audit.jsonl"
    first = _log_with(path, key, 2)
    head_before = first.head()

    reopened = AuditLog(path, key)
    new_head = reopened.append("view.build", {"records": 9})

    last = json.loads(_lines(path)[-1])
    assert reopened.anchor() == AuditVerdict(entries=4, head=new_head)
    assert last["seq"] == 3
    assert last["prev"] == head_before
    assert verify_log(path, key.public_key()).head == new_head


def test_two_writers_on_one_file_extend_one_chain(
    tmp_path: Path, key: crypto.Ed25519PrivateKey
) -> None:
    path = tmp_path / "audit.jsonl"
    AuditLog.create(path, key)
    writers = [AuditLog(path, key) for _ in range(4)]

    def work(log: AuditLog, n: int) -> None:
        for i in range(25):
            log.append("pacs.query", {"writer": n, "i": i})

    threads = [threading.Thread(target=work, args=(w, n)) for n, w in enumerate(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert verify_log(path, key.public_key()).entries == 1 + 4 * 25
    assert {w.head() for w in writers} == {verify_log(path, key.public_key()).head}


def test_create_refuses_an_existing_log(tmp_path: Path, key: crypto.Ed25519PrivateKey) -> None:
    path = tmp_path / "audit.jsonl"
    _log_with(path, key, 1)
    before = path.read_bytes()

    with pytest.raises(IntegrityError, match="already exists"):
        AuditLog.create(path, key)

    assert path.read_bytes() == before


def test_opening_a_missing_log_is_refused(tmp_path: Path, key: crypto.Ed25519PrivateKey) -> None:
    with pytest.raises(IntegrityError, match="does not exist"):
        AuditLog(tmp_path / "nope.jsonl", key)


# --- what append refuses -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"patient": "DOE^JANE"}, "person name"),
        ({"study": "1.2.840.113619.2.55.3.604688119"}, "UID"),
        ({"uids": ["2.25.329800735698586629295641978511506172918"]}, "UID"),
        ({"nested": {"deeper": "1.2.3.4"}}, "UID"),
        ({"comment": "x" * 300}, "free text"),
        ({"bad key!": 1}, "short identifier"),
        ({"when": datetime(2025, 1, 1, tzinfo=UTC)}, "not a JSON value"),
        ({"ratio": float("nan")}, "canonical JSON"),
    ],
)
def test_append_refuses_phi_like_or_non_json_data(
    tmp_path: Path, key: crypto.Ed25519PrivateKey, data: dict[str, object], match: str
) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog.create(path, key)
    before = path.read_bytes()

    with pytest.raises(UsageError, match=match) as info:
        log.append("pacs.query", data)

    assert path.read_bytes() == before
    assert "DOE" not in str(info.value)
    assert "113619" not in str(info.value)


def test_append_accepts_digests_versions_and_counts(
    tmp_path: Path, key: crypto.Ed25519PrivateKey
) -> None:
    log = AuditLog.create(tmp_path / "audit.jsonl", key)

    log.append(
        "view.build",
        {"digest": "ab" * 32, "rapha": "0.1.0", "ratios": (0.7, 0.15, 0.15), "ok": True},
    )

    assert verify_log(tmp_path / "audit.jsonl", key.public_key()).entries == 2


@pytest.mark.parametrize("event", ["", "View.Build", "view build", "audit.genesis", "a" * 65])
def test_append_refuses_bad_event_names(
    tmp_path: Path, key: crypto.Ed25519PrivateKey, event: str
) -> None:
    log = AuditLog.create(tmp_path / "audit.jsonl", key)

    with pytest.raises(UsageError):
        log.append(event, {})


# --- tampering ---------------------------------------------------------------------------


def test_editing_one_byte_of_data_is_detected_with_its_line(
    tmp_path: Path, key: crypto.Ed25519PrivateKey
) -> None:
    path = tmp_path / "audit.jsonl"
    _log_with(path, key, 5)
    lines = _lines(path)
    assert b'"records":3' in lines[4]
    lines[4] = lines[4].replace(b'"records":3', b'"records":4')
    _write_lines(path, lines)

    with pytest.raises(IntegrityError, match=r"line 5 was edited"):
        verify_log(path, key.public_key())


def test_editing_prev_is_detected(tmp_path: Path, key: crypto.Ed25519PrivateKey) -> None:
    path = tmp_path / "audit.jsonl"
    _log_with(path, key, 4)
    lines = _lines(path)
    entry = json.loads(lines[2])
    lines[2] = lines[2].replace(entry["prev"].encode(), b"f" * 64)
    _write_lines(path, lines)

    with pytest.raises(IntegrityError, match=r"line 3 "):
        verify_log(path, key.public_key())


def test_a_line_rewritten_with_a_correct_hash_fails_its_signature(
    tmp_path: Path, key: crypto.Ed25519PrivateKey
) -> None:
    path = tmp_path / "audit.jsonl"
    _log_with(path, key, 3)
    lines = _lines(path)
    entry = json.loads(lines[2])
    entry["data"]["records"] = 1000
    body = {k: v for k, v in entry.items() if k not in ("hash", "sig")}
    entry["hash"] = crypto.digest_bytes(crypto.canonical_json(body))
    lines[2] = crypto.canonical_json(entry) + b"\n"
    _write_lines(path, lines)

    with pytest.raises(SignatureError, match=r"line 3: the signature does not verify"):
        verify_log(path, key.public_key())


def test_reformatted_json_is_detected(tmp_path: Path, key: crypto.Ed25519PrivateKey) -> None:
    path = tmp_path / "audit.jsonl"
    _log_with(path, key, 2)
    lines = _lines(path)
    lines[1] = json.dumps(json.loads(lines[1]), indent=None).encode() + b"\n"
    _write_lines(path, lines)

    with pytest.raises(IntegrityError, match=r"line 2 is not in the canonical form"):
        verify_log(path, key.public_key())


def test_removing_a_middle_line_is_detected(tmp_path: Path, key: crypto.Ed25519PrivateKey) -> None:
    path = tmp_path / "audit.jsonl"
    _log_with(path, key, 5)
    lines = _lines(path)
    del lines[2]
    _write_lines(path, lines)

    with pytest.raises(IntegrityError, match=r"line 3 has sequence number 3, expected 2"):
        verify_log(path, key.public_key())


def test_swapping_two_lines_is_detected(tmp_path: Path, key: crypto.Ed25519PrivateKey) -> None:
    path = tmp_path / "audit.jsonl"
    _log_with(path, key, 5)
    lines = _lines(path)
    lines[2], lines[3] = lines[3], lines[2]
    _write_lines(path, lines)

    with pytest.raises(IntegrityError, match=r"line 3 .*reordered"):
        verify_log(path, key.public_key())


def test_duplicating_a_line_is_detected(tmp_path: Path, key: crypto.Ed25519PrivateKey) -> None:
    path = tmp_path / "audit.jsonl"
    _log_with(path, key, 3)
    lines = _lines(path)
    lines.insert(2, lines[1])
    _write_lines(path, lines)

    with pytest.raises(IntegrityError, match=r"line 3 .*duplicated"):
        verify_log(path, key.public_key())


def test_removing_the_genesis_line_is_detected(
    tmp_path: Path, key: crypto.Ed25519PrivateKey
) -> None:
    path = tmp_path / "audit.jsonl"
    _log_with(path, key, 2)
    _write_lines(path, _lines(path)[1:])

    with pytest.raises(IntegrityError, match=r"line 1 "):
        verify_log(path, key.public_key())


def test_removing_the_last_line_is_caught_only_against_an_anchor(
    tmp_path: Path, key: crypto.Ed25519PrivateKey
) -> None:
    path = tmp_path / "audit.jsonl"
    anchor = _log_with(path, key, 4).anchor()
    _write_lines(path, _lines(path)[:-1])

    unanchored = verify_log(path, key.public_key())
    with pytest.raises(IntegrityError, match="not an entry of this log"):
        verify_log(path, key.public_key(), expected_head=anchor.head)
    with pytest.raises(IntegrityError, match="removed from its end"):
        verify_log(path, key.public_key(), expected_count=anchor.entries)
    with pytest.raises(IntegrityError, match="removed from its end"):
        verify_log(path, key.public_key(), expected_head=anchor.head, expected_count=anchor.entries)

    assert unanchored.entries == anchor.entries - 1  # a chain alone cannot see a lost tail


def test_an_anchor_still_verifies_after_the_log_grew(
    tmp_path: Path, key: crypto.Ed25519PrivateKey
) -> None:
    path = tmp_path / "audit.jsonl"
    log = _log_with(path, key, 2)
    anchor = log.anchor()
    log.append("view.build", {"records": 7})

    verdict = verify_log(
        path, key.public_key(), expected_head=anchor.head, expected_count=anchor.entries
    )

    assert verdict.entries == anchor.entries + 1


def test_an_anchor_with_the_wrong_head_for_its_count_is_detected(
    tmp_path: Path, key: crypto.Ed25519PrivateKey
) -> None:
    path = tmp_path / "audit.jsonl"
    log = _log_with(path, key, 3)
    head = log.head()

    with pytest.raises(IntegrityError, match=r"line 2 has hash .* rewritten"):
        verify_log(path, key.public_key(), expected_head=head, expected_count=2)


def test_a_wrong_public_key_is_detected_and_named(
    tmp_path: Path, key: crypto.Ed25519PrivateKey
) -> None:
    path = tmp_path / "audit.jsonl"
    _log_with(path, key, 2)
    other = crypto.generate_private_key().public_key()

    with pytest.raises(SignatureError, match=r"line 1: .*started by key"):
        verify_log(path, other)


def test_an_empty_log_is_refused(tmp_path: Path, key: crypto.Ed25519PrivateKey) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"")

    with pytest.raises(IntegrityError, match="genesis"):
        verify_log(path, key.public_key())
    with pytest.raises(IntegrityError, match="genesis"):
        AuditLog(path, key)


# --- a torn or corrupt tail --------------------------------------------------------------


def test_a_torn_last_line_refuses_append_and_fails_verify(
    tmp_path: Path, key: crypto.Ed25519PrivateKey
) -> None:
    path = tmp_path / "audit.jsonl"
    log = _log_with(path, key, 3)
    with path.open("ab") as fh:
        fh.write(b'{"data":{"records":')  # a crash mid-write
    before = path.read_bytes()

    with pytest.raises(IntegrityError, match=r"torn.*rapha node audit verify"):
        log.append("view.build", {"records": 1})
    with pytest.raises(IntegrityError, match=r"torn.*rapha node audit verify"):
        AuditLog(path, key)
    with pytest.raises(IntegrityError, match=r"line 5 is incomplete"):
        verify_log(path, key.public_key())

    assert path.read_bytes() == before


def test_a_corrupt_last_line_refuses_append(tmp_path: Path, key: crypto.Ed25519PrivateKey) -> None:
    path = tmp_path / "audit.jsonl"
    log = _log_with(path, key, 3)
    lines = _lines(path)
    lines[-1] = lines[-1].replace(b'"records":2', b'"records":5')
    _write_lines(path, lines)

    with pytest.raises(IntegrityError, match=r"last line .*edited.*refusing to append"):
        log.append("view.build", {"records": 1})


def test_a_log_of_another_key_refuses_append(tmp_path: Path, key: crypto.Ed25519PrivateKey) -> None:
    path = tmp_path / "audit.jsonl"
    _log_with(path, key, 1)

    with pytest.raises(SignatureError, match="refusing to append"):
        AuditLog(path, crypto.generate_private_key())


def test_a_long_log_tail_is_found(tmp_path: Path, key: crypto.Ed25519PrivateKey) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog.create(path, key)
    for i in range(40):
        log.append("view.build", {"chunk": ["a" * 250] * 10, "i": i})  # lines > 2 KiB

    reopened = AuditLog(path, key)

    assert reopened.anchor() == verify_log(path, key.public_key())
