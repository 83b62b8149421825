"""Extract a bundle ``.tar`` without trusting a single header in it.

A bundle archive is an uncompressed tar whose regular files sit at the top level, or inside
one top-level directory (what ``tar -cf b.tar mybundle/`` writes); ``./`` prefixes are
ignored. Everything else is refused with :class:`UnsafeArchiveError` *before* a byte is
written: symbolic and hard links, devices, FIFOs, sparse files, absolute paths, ``..``,
deeper directories, repeated names, more than ``max_members`` members, and sizes over the
per-file or total caps as declared in the headers. Each member is then also passed through
:func:`tarfile.data_filter` (PEP 706), and its bytes are counted while they are copied, so
a header that under-states a size cannot smuggle more data in.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path, PurePosixPath
from typing import Final

from rapha.crypto import CHUNK_SIZE
from rapha.errors import UnsafeArchiveError

__all__ = ["extract_tar"]

_FILE_MODE: Final = 0o644


def _member_parts(member: tarfile.TarInfo) -> tuple[str, ...]:
    name = member.name
    if not name or name.startswith("/") or "\\" in name or "\x00" in name:
        raise UnsafeArchiveError(
            f"archive member {name!r} has an absolute or unusable path; "
            "archive the bundle with relative paths (tar -C DIR -cf bundle.tar .)"
        )
    parts = tuple(p for p in PurePosixPath(name).parts if p != ".")
    if ".." in parts:
        raise UnsafeArchiveError(f"archive member {name!r} climbs out with '..'")
    return parts


def _check_kind(member: tarfile.TarInfo) -> None:
    if member.issym() or member.islnk():
        raise UnsafeArchiveError(f"archive member {member.name!r} is a link; links are refused")
    if member.ischr() or member.isblk() or member.isfifo():
        raise UnsafeArchiveError(f"archive member {member.name!r} is a device or FIFO")
    if member.issparse() or not (member.isreg() or member.isdir()):
        raise UnsafeArchiveError(f"archive member {member.name!r} is not a regular file")


def extract_tar(
    archive: Path,
    dest: Path,
    *,
    max_members: int,
    max_file_bytes: int,
    max_total_bytes: int,
) -> list[str]:
    """Extract the regular files of ``archive`` flat into ``dest``; return their names.

    ``dest`` must not exist or be empty. On any refusal nothing usable is left behind
    (files already written are removed).
    """
    if dest.exists() and any(dest.iterdir()):
        raise UnsafeArchiveError(f"extraction directory {dest} is not empty")
    dest.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    try:
        with tarfile.open(archive, mode="r:") as tf:
            files = _plan(tf, dest, max_members, max_file_bytes, max_total_bytes)
            for name, member in files:
                _copy(tf, member, dest / name, max_file_bytes)
                written.append(name)
    except (tarfile.TarError, OSError) as exc:
        _cleanup(dest)
        if isinstance(exc, tarfile.FilterError):
            raise UnsafeArchiveError(f"archive refused by the data filter: {exc}") from exc
        raise UnsafeArchiveError(f"{archive.name} is not a readable tar archive: {exc}") from exc
    except UnsafeArchiveError:
        _cleanup(dest)
        raise
    return written


def _plan(
    tf: tarfile.TarFile, dest: Path, max_members: int, max_file_bytes: int, max_total_bytes: int
) -> list[tuple[str, tarfile.TarInfo]]:
    """Read every header (stopping at the caps) and decide what to write, or refuse."""
    entries: list[tuple[tuple[str, ...], tarfile.TarInfo]] = []
    total = 0
    for count, member in enumerate(tf, start=1):
        if count > max_members:
            raise UnsafeArchiveError(f"archive holds more than {max_members} members")
        _check_kind(member)
        parts = _member_parts(member)
        if member.isreg():
            if member.size > max_file_bytes:
                raise UnsafeArchiveError(
                    f"archive member {member.name!r} declares {member.size} bytes "
                    f"(at most {max_file_bytes} per file)"
                )
            total += member.size
            if total > max_total_bytes:
                raise UnsafeArchiveError(f"archive declares more than {max_total_bytes} bytes")
        tarfile.data_filter(member, str(dest))
        entries.append((parts, member))
    dirs = {parts for parts, m in entries if m.isdir() and parts}
    files = [(parts, m) for parts, m in entries if m.isreg()]
    prefixes = {parts[:-1] for parts, _ in files} | dirs
    if len(prefixes) > 1 or any(len(p) > 1 for p in prefixes):
        raise UnsafeArchiveError(
            "archive holds sub-directories; a bundle is flat (files at the top level, or in "
            "one top-level directory)"
        )
    planned: dict[str, tarfile.TarInfo] = {}
    for parts, member in files:
        if not parts:
            raise UnsafeArchiveError(f"archive member {member.name!r} has no file name")
        if parts[-1] in planned:
            raise UnsafeArchiveError(f"archive holds {parts[-1]!r} more than once")
        planned[parts[-1]] = member
    return list(planned.items())


def _copy(tf: tarfile.TarFile, member: tarfile.TarInfo, target: Path, max_file_bytes: int) -> None:
    source = tf.extractfile(member)
    if source is None:
        raise UnsafeArchiveError(f"archive member {member.name!r} has no data")
    limit = min(member.size, max_file_bytes)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, _FILE_MODE)
    copied = 0
    with source, os.fdopen(fd, "wb") as out:
        while chunk := source.read(CHUNK_SIZE):
            copied += len(chunk)
            if copied > limit:
                raise UnsafeArchiveError(f"archive member {member.name!r} is longer than declared")
            out.write(chunk)
    if copied != member.size:
        raise UnsafeArchiveError(f"archive member {member.name!r} is truncated")


def _cleanup(dest: Path) -> None:
    """Remove what was written; ``dest`` was empty before extraction began."""
    for leftover in dest.iterdir():
        if leftover.is_file() and not leftover.is_symlink():
            leftover.unlink()
