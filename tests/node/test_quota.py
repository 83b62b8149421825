"""rapha.node.quota: evaluation counts per organisation and test split, on disk."""

from __future__ import annotations

import json
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rapha.errors import DataError, PolicyError, UsageError
from rapha.node.quota import DEFAULT_EVALUATION_LIMIT, QUOTA_FILE, EvaluationQuota

_SPLIT = "a" * 64
_OTHER_SPLIT = "b" * 64


def test_charge_counts_and_returns_what_is_left(tmp_path: Path) -> None:
    quota = EvaluationQuota(tmp_path, limit=3)

    left = [quota.charge("acme", _SPLIT) for _ in range(3)]

    assert left == [2, 1, 0]
    assert quota.used("acme", _SPLIT) == 3
    assert quota.remaining("acme", _SPLIT) == 0


def test_reaching_the_limit_raises_and_records_nothing(tmp_path: Path) -> None:
    quota = EvaluationQuota(tmp_path, limit=2)
    quota.charge("acme", _SPLIT)
    quota.charge("acme", _SPLIT)

    with pytest.raises(PolicyError, match="used all 2 evaluations") as info:
        quota.charge("acme", _SPLIT)

    assert "raise the node's evaluation limit" in str(info.value)
    assert quota.used("acme", _SPLIT) == 2


def test_counts_persist_across_instances(tmp_path: Path) -> None:
    EvaluationQuota(tmp_path, limit=5).charge("acme", _SPLIT)
    EvaluationQuota(tmp_path, limit=5).charge("acme", _SPLIT)

    assert EvaluationQuota(tmp_path, limit=5).used("acme", _SPLIT) == 2


def test_orgs_and_splits_are_counted_separately(tmp_path: Path) -> None:
    quota = EvaluationQuota(tmp_path, limit=1)
    quota.charge("acme", _SPLIT)

    assert quota.charge("acme", _OTHER_SPLIT) == 0
    assert quota.charge("globex", _SPLIT) == 0
    assert quota.used("initech", _SPLIT) == 0
    with pytest.raises(PolicyError):
        quota.charge("acme", _SPLIT)


def test_state_file_is_private_json(tmp_path: Path) -> None:
    state = tmp_path / "state"
    EvaluationQuota(state).charge("acme", _SPLIT)

    path = state / QUOTA_FILE

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"schema": 1, "used": {"acme": {_SPLIT: 1}}}
    assert not list(state.glob(f".{QUOTA_FILE}.tmp-*"))


def test_default_limit_is_twenty(tmp_path: Path) -> None:
    quota = EvaluationQuota(tmp_path)

    assert DEFAULT_EVALUATION_LIMIT == 20
    assert quota.charge("acme", _SPLIT) == 19


def test_lowering_the_limit_leaves_none(tmp_path: Path) -> None:
    for _ in range(3):
        EvaluationQuota(tmp_path, limit=5).charge("acme", _SPLIT)

    lowered = EvaluationQuota(tmp_path, limit=2)

    assert lowered.remaining("acme", _SPLIT) == 0
    with pytest.raises(PolicyError):
        lowered.charge("acme", _SPLIT)


@pytest.mark.parametrize(
    ("org", "digest", "match"),
    [
        ("../etc", _SPLIT, "organisation"),
        ("", _SPLIT, "organisation"),
        ("acme/x", _SPLIT, "organisation"),
        ("a" * 129, _SPLIT, "organisation"),
        ("acme", "A" * 64, "split digest"),
        ("acme", "a" * 63, "split digest"),
        ("acme", "../" + "a" * 61, "split digest"),
    ],
)
def test_rejects_unsafe_names(tmp_path: Path, org: str, digest: str, match: str) -> None:
    quota = EvaluationQuota(tmp_path)

    with pytest.raises(UsageError, match=match):
        quota.charge(org, digest)

    assert not (tmp_path / QUOTA_FILE).exists()


@pytest.mark.parametrize("limit", [0, -1, True])
def test_rejects_bad_limits(tmp_path: Path, limit: int) -> None:
    with pytest.raises(UsageError, match="limit"):
        EvaluationQuota(tmp_path, limit=limit)


@pytest.mark.parametrize(
    "content", [b"not json", b"[]", b'{"schema": 1, "used": {"acme": {"x": -1}}}']
)
def test_corrupt_state_is_refused_not_reset(tmp_path: Path, content: bytes) -> None:
    (tmp_path / QUOTA_FILE).write_bytes(content)
    quota = EvaluationQuota(tmp_path)

    with pytest.raises(DataError, match="restore it from a backup"):
        quota.charge("acme", _SPLIT)

    assert (tmp_path / QUOTA_FILE).read_bytes() == content


def test_concurrent_charges_lose_no_count(tmp_path: Path) -> None:
    quota = EvaluationQuota(tmp_path, limit=20)

    with ThreadPoolExecutor(max_workers=4) as pool:
        left = list(pool.map(lambda _: quota.charge("acme", _SPLIT), range(20)))

    assert sorted(left) == list(range(20))
    assert EvaluationQuota(tmp_path, limit=20).used("acme", _SPLIT) == 20
