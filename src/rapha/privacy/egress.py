"""The egress scan: does any byte under a directory spell a known identifier?

:func:`find_leaks` is the last check on everything that crosses a trust boundary (a view
before model code reads it, an outbox before it leaves the hospital). It is given the
identifiers that must not appear (the *needles*) and reads every byte of every file under
a directory, and every file name, looking for each needle

* as raw bytes, ASCII letters in any case: UTF-8, and ISO 8859-1 (the usual DICOM
  Specific Character Set) when that differs;
* as UTF-16 in both byte orders (what Windows tools and some JSON writers produce) and
  UTF-32 in both (how numpy stores ``str`` arrays in ``.npy`` and ``.npz`` files);
* in the forms a DICOM person name takes (PS3.5 6.2, VR PN): ``^`` and space swapped,
  ``Family^Given`` as ``Given Family`` and ``Family, Given``; and a DA date
  ``YYYYMMDD`` as ``YYYY-MM-DD`` and ``YYYY/MM/DD``;
* inside compressed or packed containers, found by their magic bytes whatever the file is
  called: ZIP (and so ``.npz``), gzip, bzip2, xz and tar, nested up to
  :data:`MAX_DEPTH` deep.

A :class:`Leak` names the file, the needle's *index* and the encoding: never the needle,
which is PHI. Anything that cannot be scanned in full (an encrypted or corrupt container,
a special file, a container nested too deep or expanding past the byte budget) raises
:class:`~rapha.errors.DataError`: the scan fails closed.

Speed: each file is read once, in chunks, lower-cased with ``bytes.lower`` (ASCII only,
which is what makes the match case-insensitive), and every encoding of every needle is
searched in that one pass: a 64 Ki-entry table of first byte pairs picks candidate
offsets with numpy, a sorted array of 8-byte prefixes narrows them, and only the few
survivors are compared to whole patterns.
"""

from __future__ import annotations

import bz2
import datetime as dt
import gzip
import lzma
import os
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final, cast

import numpy as np
import numpy.typing as npt

from rapha.errors import DataError, UsageError

__all__ = ["MAX_DEPTH", "MIN_NEEDLE_CHARS", "Leak", "find_leaks"]

MIN_NEEDLE_CHARS: Final = 4
MAX_DEPTH: Final = 8
_DEFAULT_BUDGET: Final = 64 << 30  # decompressed bytes per top-level file
_CHUNK: Final = 8 << 20
_HEAD: Final = 512
_MAX_KEY: Final = 8
_DA: Final = re.compile(r"(\d{4})(\d{2})(\d{2})")
_BROKEN: Final = (
    OSError,
    EOFError,
    zlib.error,
    zipfile.BadZipFile,
    tarfile.TarError,
    lzma.LZMAError,
)


@dataclass(frozen=True, order=True)
class Leak:
    """One needle found in one file.

    Attributes:
        path: the file on disk.
        needle_index: position of the needle in the list given to :func:`find_leaks`.
        encoding: how it was written: ``utf-8``, ``latin-1``, ``utf-16-le``,
            ``utf-16-be``, ``utf-32-le`` or ``utf-32-be``, with ``+pn`` for a person-name
            form, ``+date`` for a date form, ``+name`` when it is in the file's name rather
            than its bytes.
        member: the path inside a container, one name per nesting level (``()`` for the
            file's own bytes; ``"<gzip>"`` etc. for single-stream compression).
    """

    path: Path
    needle_index: int
    encoding: str
    member: tuple[str, ...] = ()

    def __str__(self) -> str:
        inside = "".join(f" > {m}" for m in self.member)
        return f"{self.path}{inside}: needle #{self.needle_index} ({self.encoding})"


# --- needles -------------------------------------------------------------------------------


def _name_forms(needle: str) -> set[str]:
    forms = {needle.replace("^", " "), needle.rstrip("^")}
    if "^" in needle:
        parts = [p for p in needle.split("=", 1)[0].split("^") if p]
        if len(parts) >= 2:
            forms.add(" ".join(parts[1:] + parts[:1]))
            forms.add(f"{parts[0]}, {' '.join(parts[1:])}")
    elif ", " in needle:
        forms.add(needle.replace(", ", "^"))
    elif " " in needle:
        forms.add(needle.replace(" ", "^"))
    forms.discard(needle)
    return {" ".join(f.split()) for f in forms if f.strip()}


def _date_forms(needle: str) -> set[str]:
    match = _DA.fullmatch(needle)
    if match is None:
        return set()
    year, month, day = match.groups()
    try:
        dt.date(int(year), int(month), int(day))
    except ValueError:
        return set()
    return {f"{year}-{month}-{day}", f"{year}/{month}/{day}"}


def _encodings(text: str) -> dict[str, bytes]:
    out = {"utf-8": text.encode("utf-8")}
    try:
        latin = text.encode("latin-1")
    except UnicodeEncodeError:
        latin = out["utf-8"]
    if latin != out["utf-8"]:
        out["latin-1"] = latin
    out["utf-16-le"] = text.encode("utf-16-le")
    out["utf-16-be"] = text.encode("utf-16-be")
    out["utf-32-le"] = text.encode("utf-32-le")  # numpy's str arrays ("<U"), in .npy/.npz
    out["utf-32-be"] = text.encode("utf-32-be")
    return out


def _patterns(needles: Iterable[str]) -> dict[bytes, set[tuple[int, str]]]:
    """Every lower-cased byte pattern -> the (needle index, encoding) pairs it stands for."""
    patterns: dict[bytes, set[tuple[int, str]]] = {}
    for index, raw in enumerate(needles):
        if not isinstance(raw, str):
            raise UsageError(f"needle #{index} is not a string")
        needle = raw.strip()
        if len(needle) < MIN_NEEDLE_CHARS:
            raise UsageError(
                f"needle #{index} has fewer than {MIN_NEEDLE_CHARS} characters: "
                "too short to search for without matching everything"
            )
        forms = [(needle, "")]
        forms += [(f, "+pn") for f in sorted(_name_forms(needle))]
        forms += [(f, "+date") for f in sorted(_date_forms(needle))]
        for form, suffix in forms:
            for cased in {form.lower(), form.upper()}:
                for encoding, data in _encodings(cased).items():
                    patterns.setdefault(data.lower(), set()).add((index, encoding + suffix))
    return patterns


class _Matcher:
    """Finds which of many byte patterns occur in lower-cased buffers, in one pass each."""

    def __init__(self, patterns: Iterable[bytes]) -> None:
        pats = sorted(set(patterns))
        self.max_len = max((len(p) for p in pats), default=1)
        self.key_len = min([_MAX_KEY, *(len(p) for p in pats)])
        self._pairs = np.zeros(1 << 16, dtype=bool)
        groups: dict[int, dict[int, set[bytes]]] = {}
        for p in pats:
            self._pairs[p[0] | (p[1] << 8)] = True
            key = int.from_bytes(p[: self.key_len], "little")
            groups.setdefault(key, {}).setdefault(len(p), set()).add(p)
        self._groups = groups
        self._keys = np.array(sorted(groups), dtype=np.uint64)

    def _key(self, arr: npt.NDArray[np.uint8], at: npt.NDArray[np.intp]) -> npt.NDArray[np.uint64]:
        key = np.zeros(at.shape, dtype=np.uint64)
        for i in range(self.key_len):
            key |= arr[at + i].astype(np.uint64) << np.uint64(8 * i)
        return key

    def scan(self, buf: bytes) -> set[bytes]:
        """The patterns occurring in ``buf`` (already lower-cased)."""
        if not self._groups or len(buf) < self.key_len:
            return set()
        arr = np.frombuffer(buf, dtype=np.uint8)
        last = len(arr) - self.key_len  # last offset a whole key fits at
        pairs = arr[: last + 1].astype(np.uint16) | (arr[1 : last + 2].astype(np.uint16) << 8)
        at = np.flatnonzero(self._pairs[pairs])
        if at.size == 0:
            return set()
        keys = self._key(arr, at)
        slot = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
        hit = self._keys[slot] == keys
        found: set[bytes] = set()
        for pos, key in zip(at[hit].tolist(), keys[hit].tolist(), strict=True):
            for length, group in self._groups[key].items():
                window = buf[pos : pos + length]
                if window in group:
                    found.add(window)
        return found


# --- files and containers --------------------------------------------------------------


class _Scan:
    def __init__(self, matcher: _Matcher, budget: int) -> None:
        self.matcher = matcher
        self.budget = budget
        self.found: dict[tuple[Path, tuple[str, ...]], set[bytes]] = {}
        self.names: set[bytes] = set()

    def _note(self, path: Path, member: tuple[str, ...], hits: set[bytes]) -> None:
        if hits:
            self.found.setdefault((path, member), set()).update(hits)

    def _spend(self, size: int) -> None:
        self.budget -= size
        if self.budget < 0:
            raise DataError("a file expands past the egress scan's byte budget (a zip bomb?)")

    def name(self, text: str) -> None:
        self.names |= self.matcher.scan(text.encode("utf-8", "surrogateescape").lower())

    def stream(self, path: Path, member: tuple[str, ...], fh: IO[bytes], depth: int) -> None:
        """Scan ``fh`` from its start, then whatever container it turns out to be."""
        head = b""
        tail = b""
        keep = self.matcher.max_len - 1
        hits: set[bytes] = set()
        while chunk := fh.read(_CHUNK):
            self._spend(len(chunk))
            if len(head) < _HEAD:
                head += chunk[: _HEAD - len(head)]
            buf = tail + chunk.lower()
            hits |= self.matcher.scan(buf)
            tail = buf[-keep:] if keep else b""
        self._note(path, member, hits)
        kind = _kind(head)
        if kind is None and not member and _zip_at_end(fh):
            # Data with a ZIP appended (self-extracting archives, polyglots). Found only by
            # its end record, which random bytes can imitate, so a failure to open it is
            # not an error: the raw bytes were scanned above either way.
            try:
                fh.seek(0)
                self._open("zip", path, member, fh, depth + 1)
            except (*_BROKEN, RuntimeError, NotImplementedError):
                pass
            return
        if kind is None:
            return
        if depth >= MAX_DEPTH:
            raise DataError(f"containers nested more than {MAX_DEPTH} deep in {path}")
        fh.seek(0)
        try:
            self._open(kind, path, member, fh, depth + 1)
        except _BROKEN as exc:
            raise DataError(f"a {kind} container in {path} cannot be read in full") from exc
        except (RuntimeError, NotImplementedError) as exc:  # encrypted or exotic ZIP members
            raise DataError(f"a {kind} container in {path} cannot be scanned") from exc

    def _open(
        self, kind: str, path: Path, member: tuple[str, ...], fh: IO[bytes], depth: int
    ) -> None:
        if kind == "zip":
            with zipfile.ZipFile(fh) as zf:
                for info in zf.infolist():
                    if not info.is_dir():
                        with zf.open(info) as inner:
                            self.stream(path, (*member, info.filename), inner, depth)
        elif kind == "tar":
            with tarfile.open(fileobj=fh, mode="r:") as tf:
                for entry in tf:
                    inner_tar = tf.extractfile(entry) if entry.isfile() else None
                    if inner_tar is not None:
                        with inner_tar:
                            self.stream(path, (*member, entry.name), inner_tar, depth)
        else:
            with _decompress(kind, fh) as stream:
                self.stream(path, (*member, f"<{kind}>"), stream, depth)


def _decompress(kind: str, fh: IO[bytes]) -> IO[bytes]:
    if kind == "gzip":
        return cast(IO[bytes], gzip.GzipFile(fileobj=fh, mode="rb"))
    if kind == "bzip2":
        return cast(IO[bytes], bz2.BZ2File(fh, mode="rb"))
    return cast(IO[bytes], lzma.LZMAFile(fh, mode="rb"))


def _kind(head: bytes) -> str | None:
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"BZh"):
        return "bzip2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head[257:262] == b"ustar":
        return "tar"
    return None


def _zip_at_end(fh: IO[bytes]) -> bool:
    try:
        return fh.seekable() and zipfile.is_zipfile(fh)
    except OSError:
        return False


def _walk(root: Path) -> Iterable[Path]:
    """Every file under ``root`` (following links, each directory once), sorted."""
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        here = stack.pop()
        st = here.stat()
        if stat.S_ISDIR(st.st_mode):
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            stack.extend(sorted(here.iterdir(), reverse=True))
        elif stat.S_ISREG(st.st_mode):
            yield here
        else:
            raise DataError(f"{here} is not a regular file or directory; it cannot be scanned")


def find_leaks(
    root: Path, needles: Iterable[str], *, max_expanded_bytes: int = _DEFAULT_BUDGET
) -> list[Leak]:
    """Every place under ``root`` (a directory or one file) where a needle occurs.

    Args:
        root: what to scan; file names below it are scanned too.
        needles: the identifiers that must not appear, each at least
            :data:`MIN_NEEDLE_CHARS` characters (after stripping spaces).
        max_expanded_bytes: how many bytes one file may expand to, containers included.

    Returns:
        The leaks, sorted and without duplicates; ``[]`` when nothing was found.

    Raises:
        UsageError: a needle is too short or not a string.
        DataError: something cannot be scanned in full (see the module docstring).
    """
    patterns = _patterns(needles)
    matcher = _Matcher(patterns)
    leaks: set[Leak] = set()
    try:
        for path in _walk(root):
            scan = _Scan(matcher, max_expanded_bytes)
            if path != root:
                scan.name(os.fspath(path.relative_to(root)))
            with path.open("rb") as fh:
                scan.stream(path, (), fh, 0)
            for hit in scan.names:
                leaks.update(Leak(path, i, enc + "+name") for i, enc in patterns[hit])
            for (where, member), hits in scan.found.items():
                for hit in hits:
                    leaks.update(Leak(where, i, enc, member) for i, enc in patterns[hit])
    except FileNotFoundError as exc:
        raise DataError(f"{root} does not exist or changed during the egress scan") from exc
    except PermissionError as exc:
        raise DataError(f"the egress scan cannot read everything under {root}") from exc
    return sorted(leaks)
