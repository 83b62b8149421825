"""The lookup register: which views and jobs used which patients, for data-subject requests.

Every view build the node hands out (a job's view, a preview) appends one line to
``<state_dir>/lookup-register.jsonl``::

    {"v": 1, "time": "2025-01-31T12:00:00Z", "job_id": "preview", "view_digest": "…",
     "view": "/srv/views/job-42", "private_dir": "…", "records": 812,
     "patients": ["<stable patient pseudonym>", …]}

The patients are the *stable* pseudonyms (HMAC-SHA256 of the PatientID under the node's
key, :class:`rapha.privacy.Pseudonymizer`): they never leave the node, and without the key
nobody can tell whose they are. :func:`lookup_patient` answers "which views and jobs used
this patient" by computing the pseudonym of the ID it is given and reading the register,
so only the node, which holds the key, can answer it. The register names no patient in
clear, but it links pseudonyms to views, so it is node-private: created 0600 in the state
directory and refused when other users can read it. Appends are one ``O_APPEND`` write
under an exclusive ``flock``, so concurrent builds do not interleave lines.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from rapha.crypto import canonical_json
from rapha.dataset import ViewSummary
from rapha.errors import ConfigError, DataError
from rapha.node.optout import OptOutList
from rapha.privacy import Domain, Pseudonymizer

__all__ = ["REGISTER_FILE", "LookupRegister", "LookupResult", "RegisterUse", "lookup_patient"]

REGISTER_FILE: Final = "lookup-register.jsonl"
_FORMAT: Final = 1
_MODE: Final = 0o600


@dataclass(frozen=True)
class RegisterUse:
    """One view (and the job it was built for) that used a patient."""

    time: str
    job_id: str
    view_digest: str
    view: str
    private_dir: str
    records: int

    def to_json(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "job_id": self.job_id,
            "view_digest": self.view_digest,
            "view": self.view,
            "private_dir": self.private_dir,
            "records": self.records,
        }


@dataclass(frozen=True)
class LookupResult:
    """The answer to a data-subject request about one patient."""

    opted_out: bool
    uses: tuple[RegisterUse, ...]


class LookupRegister:
    """The register in ``state_dir`` (see the module docstring)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / REGISTER_FILE

    def record(self, summary: ViewSummary, *, job_id: str, private_dir: Path) -> None:
        """Append the build ``summary`` (its stable patient pseudonyms) to the register."""
        entry = {
            "v": _FORMAT,
            "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "job_id": job_id,
            "view_digest": summary.digest,
            "view": str(summary.out),
            "private_dir": str(Path(private_dir).resolve()),
            "records": summary.records,
            "patients": sorted(summary.patients),
        }
        line = canonical_json(entry) + b"\n"
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, _MODE)
        try:
            self._check_mode(os.fstat(fd))
            fcntl.flock(fd, fcntl.LOCK_EX)
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    def uses(self, patient_pseudonym: str) -> list[RegisterUse]:
        """Every recorded view that used the patient with this stable pseudonym, oldest first."""
        return [
            RegisterUse(
                time=entry["time"],
                job_id=entry["job_id"],
                view_digest=entry["view_digest"],
                view=entry["view"],
                private_dir=entry["private_dir"],
                records=entry["records"],
            )
            for entry in self._entries()
            if patient_pseudonym in entry["patients"]
        ]

    def _entries(self) -> Iterator[dict[str, Any]]:
        try:
            fh = self.path.open("rb")
        except FileNotFoundError:
            return  # no view was built yet: nobody was used
        except OSError as exc:
            raise DataError(f"lookup register {self.path} cannot be read: {exc.strerror}") from exc
        with fh:
            self._check_mode(os.fstat(fh.fileno()))
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH)
            for lineno, raw in enumerate(fh, start=1):
                try:
                    entry = json.loads(raw)
                    if entry.get("v") != _FORMAT or not isinstance(entry.get("patients"), list):
                        raise ValueError
                    entry["patients"] = frozenset(entry["patients"])
                except ValueError as exc:
                    raise DataError(
                        f"lookup register {self.path} line {lineno} is not a register entry; "
                        "restore it from backup"
                    ) from exc
                yield entry

    def _check_mode(self, st: os.stat_result) -> None:
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"lookup register {self.path} is accessible by other users "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {self.path}"
            )


def lookup_patient(
    state_dir: Path, pseudonymizer: Pseudonymizer, opt_out: OptOutList, patient_id: str
) -> LookupResult:
    """Which views and jobs used the patient with this raw PatientID, and whether the
    patient is on the opt-out list now. The ID is only hashed, never stored or shown."""
    pseudonym = pseudonymizer.pseudonym(Domain.PATIENT, patient_id)
    uses = LookupRegister(state_dir).uses(pseudonym)
    return LookupResult(opted_out=opt_out.is_opted_out(patient_id), uses=tuple(uses))
