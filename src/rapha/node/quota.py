"""Evaluation quotas: how often one organisation may evaluate against one test split.

Every evaluation publishes metrics computed on the hospital's test labels, and a model is
code its submitter controls, so repeated evaluations are a channel for probing those
labels adaptively. The node therefore counts evaluations per (organisation, test split
digest) and refuses more than ``limit``.

The counts live in one JSON file, ``evaluation-quota.json`` in the state directory, mode
0600. Every read-modify-write holds an exclusive ``fcntl`` lock on a sibling lock file
and replaces the JSON file atomically (write, fsync, rename, fsync the directory), so
concurrent charges never lose a count and a crash leaves either the old or the new file.
Callers charge *before* running the evaluation: a crash afterwards costs the submitter
one evaluation rather than granting a free one. A corrupt file is refused, never reset.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from rapha import crypto
from rapha.errors import DataError, PolicyError, UsageError

__all__ = [
    "DEFAULT_EVALUATION_LIMIT",
    "QUOTA_FILE",
    "EvaluationQuota",
]

DEFAULT_EVALUATION_LIMIT: Final = 20
QUOTA_FILE: Final = "evaluation-quota.json"
_LOCK_FILE: Final = ".evaluation-quota.lock"
_MODE: Final = 0o600
_SCHEMA: Final = 1
_ORG: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_DIGEST: Final = re.compile(r"[0-9a-f]{64}")


class EvaluationQuota:
    """Per-organisation evaluation counts against each test split, persisted on disk.

    ``state_dir`` is created (0700) if missing. ``limit`` (at least 1) is the number of
    evaluations each organisation may run against one split; lowering it later leaves
    organisations above the new limit with none left.
    """

    def __init__(self, state_dir: Path, *, limit: int = DEFAULT_EVALUATION_LIMIT) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise UsageError("the evaluation limit must be an integer of at least 1")
        self._dir = Path(state_dir)
        self._limit = limit

    @property
    def limit(self) -> int:
        """Evaluations allowed per organisation and test split."""
        return self._limit

    @property
    def path(self) -> Path:
        """The JSON file holding the counts."""
        return self._dir / QUOTA_FILE

    def charge(self, org: str, split_digest: str) -> int:
        """Record one evaluation by ``org`` against ``split_digest``; return how many remain.

        Raises :class:`PolicyError` (and records nothing) when the limit is already reached.
        """
        key = _key(org, split_digest)
        with self._locked():
            state = self._read()
            used = state.get(key[0], {}).get(key[1], 0)
            if used >= self._limit:
                raise PolicyError(
                    f"organisation {org} has used all {self._limit} evaluations allowed "
                    f"against test split {split_digest[:12]}; no more evaluations will run "
                    f"on it. Ask the hospital to raise the node's evaluation limit or to "
                    f"publish a new test split."
                )
            state.setdefault(key[0], {})[key[1]] = used + 1
            self._write(state)
        return self._limit - used - 1

    def used(self, org: str, split_digest: str) -> int:
        """How many evaluations ``org`` has run against ``split_digest``."""
        key = _key(org, split_digest)
        with self._locked():
            return self._read().get(key[0], {}).get(key[1], 0)

    def remaining(self, org: str, split_digest: str) -> int:
        """How many evaluations ``org`` may still run against ``split_digest``."""
        return max(0, self._limit - self.used(org, split_digest))

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self._dir / _LOCK_FILE, os.O_RDWR | os.O_CREAT, _MODE)
        except OSError as exc:
            raise DataError(f"cannot open the quota state in {self._dir}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _read(self) -> dict[str, dict[str, int]]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise DataError(f"cannot read {self.path}: {exc.strerror}") from exc
        try:
            doc: Any = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise DataError(_corrupt(self.path)) from exc
        if not isinstance(doc, dict) or doc.get("schema") != _SCHEMA:
            raise DataError(_corrupt(self.path))
        used = doc.get("used")
        if not isinstance(used, dict) or not all(
            isinstance(splits, dict)
            and all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in splits.values()
            )
            for splits in used.values()
        ):
            raise DataError(_corrupt(self.path))
        return used

    def _write(self, used: dict[str, dict[str, int]]) -> None:
        data = json.dumps({"schema": _SCHEMA, "used": used}, sort_keys=True).encode()
        crypto.write_private_atomic(self.path, data, mode=_MODE)


def _key(org: str, split_digest: str) -> tuple[str, str]:
    if not isinstance(org, str) or not _ORG.fullmatch(org):
        raise UsageError(
            "organisation must be 1-128 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    if not isinstance(split_digest, str) or not _DIGEST.fullmatch(split_digest):
        raise UsageError("split digest must be 64 lower-case hex digits (SHA-256)")
    return org, split_digest


def _corrupt(path: Path) -> str:
    return (
        f"{path} is not a valid evaluation quota file; restore it from a backup (it is "
        f"never reset automatically, since that would grant fresh evaluations)"
    )
