"""The hospital's opt-out list: patients who said no never reach a view (issue 3, point 6).

The list is a UTF-8 text file the hospital maintains, one PatientID (0010,0020) per line::

    # patients who withdrew consent; one PatientID per line
    12345678
    AB-0042

Blank lines and lines whose first non-blank character is ``#`` are ignored. Leading and
trailing spaces are not significant, as in the LO value representation PatientID uses
(PS3.5 §6.2), so IDs are compared stripped.

**The list is PHI.** It is never logged, never put in an exception message (errors name
line numbers only) and never shown by ``repr``; the file must not be readable by every
user of the machine.

Failing closed: a line holding text after a ``#`` (``12345 # asked 2024-05-01``) opts out
both the whole line and the part before the ``#``, since a PatientID may itself contain
``#``; an ID that is missing or empty counts as opted out, because it cannot be checked.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from pathlib import Path

from rapha.errors import ConfigError, DataError

__all__ = ["OptOutList", "load_opt_out"]


def _normalise(patient_id: str) -> str:
    return patient_id.strip(" \t")


class OptOutList:
    """An immutable set of opted-out patient IDs."""

    __slots__ = ("_ids",)

    def __init__(self, patient_ids: Iterable[str] = ()) -> None:
        ids = {_normalise(pid) for pid in patient_ids}
        ids.discard("")
        self._ids = frozenset(ids)

    @classmethod
    def from_file(cls, path: Path) -> OptOutList:
        """Read the list at ``path``; see the module docstring for the format.

        Raises :class:`ConfigError` when the file is missing or readable by every user,
        and :class:`DataError` when it is not UTF-8 text or holds control characters.
        """
        try:
            st = path.stat()
        except FileNotFoundError as exc:
            raise ConfigError(
                f"opt-out list {path} does not exist; the node does not run without one "
                "(an empty file means nobody opted out; `rapha node init` writes one)"
            ) from exc
        except OSError as exc:
            raise ConfigError(f"opt-out list {path} cannot be read: {exc.strerror}") from exc
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"opt-out list {path} is not a regular file")
        if st.st_mode & stat.S_IRWXO:
            raise ConfigError(
                f"opt-out list {path} is accessible by every user of this machine "
                f"(mode {stat.S_IMODE(st.st_mode):04o}) and it names patients; "
                f"run: chmod o-rwx {path}"
            )
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DataError(f"opt-out list {path} is not UTF-8 text") from exc
        except OSError as exc:
            raise ConfigError(f"opt-out list {path} cannot be read: {exc.strerror}") from exc
        return cls(_parse(text, path))

    def is_opted_out(self, patient_id: str | None) -> bool:
        """Whether the patient opted out; ``None`` or an empty ID counts as opted out."""
        if patient_id is None:
            return True
        pid = _normalise(patient_id)
        return not pid or pid in self._ids

    def __contains__(self, patient_id: object) -> bool:
        return isinstance(patient_id, str) and self.is_opted_out(patient_id)

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return f"OptOutList(<{len(self._ids)} patients>)"


def _parse(text: str, path: Path) -> list[str]:
    ids: list[str] = []
    # Split on "\n" only: str.splitlines would also split on control characters we refuse.
    for lineno, raw in enumerate(text.split("\n"), start=1):
        line = raw.removesuffix("\r")
        if any(ord(ch) < 32 and ch != "\t" for ch in line) or "\x7f" in line:
            raise DataError(f"opt-out list {path} line {lineno} holds control characters")
        entry = _normalise(line)
        if not entry or entry.startswith("#"):
            continue
        ids.append(entry)
        if "#" in entry:
            ids.append(entry.split("#", 1)[0])
    return ids


def load_opt_out(path: Path) -> OptOutList:
    """Read the opt-out list at ``path`` (see :meth:`OptOutList.from_file`)."""
    return OptOutList.from_file(path)
