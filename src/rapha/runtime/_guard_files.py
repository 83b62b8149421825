"""Reading a sandbox's output directory without trusting anything in it.

The directory was written by untrusted code as another uid. Every entry is ``lstat``ed
relative to a directory descriptor opened ``O_NOFOLLOW``; only regular files with one link
are opened, again ``O_NOFOLLOW`` (and ``O_NONBLOCK``, so a FIFO swapped in cannot block
the node), and the open file is ``fstat``ed to be the same inode. Bytes are read from that
descriptor only; no path is ever reopened.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

__all__ = ["MAX_ENTRIES", "RESERVED_NAMES", "Listing", "read_output_dir"]

#: More entries than this and the directory is refused unread.
MAX_ENTRIES: Final = 256
#: Names only the node writes into an outbox; a sandbox file by these names is refused.
RESERVED_NAMES: Final = frozenset({"metrics.json", "receipt.json"})

_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_READ: Final = 8 << 20


@dataclass
class Listing:
    """What the directory held: every entry name, the allowed files' bytes, reason codes."""

    names: list[str] = field(default_factory=list)
    contents: dict[str, bytes] = field(default_factory=dict)
    codes: list[str] = field(default_factory=list)

    def deny(self, code: str) -> None:
        if code not in self.codes:
            self.codes.append(code)


def _kind_code(mode: int) -> str | None:
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "subdirectory"
    if not stat.S_ISREG(mode):
        return "special_file"
    return None


def _name_codes(name: str, allowed: frozenset[str]) -> list[str]:
    if name in RESERVED_NAMES:
        return ["reserved_name"]
    codes = ["dicom_name"] if name.casefold().endswith(".dcm") else []
    if name not in allowed:
        codes.append("unexpected_file")
    return codes


def _read(dir_fd: int, name: str, expected: os.stat_result) -> bytes | str:
    """The file's bytes, or a reason code when it is not the regular file we listed."""
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except PermissionError:
        return "output_unreadable"  # the sandbox's uid left it unreadable to the node
    except OSError:
        return "changed_during_guard"  # ELOOP: a link swapped in; ENOENT: removed
    try:
        st = os.fstat(fd)
        if (
            not stat.S_ISREG(st.st_mode)
            or st.st_nlink != 1
            or (st.st_dev, st.st_ino) != (expected.st_dev, expected.st_ino)
        ):
            return "changed_during_guard"
        chunks: list[bytes] = []
        left = st.st_size + 1  # one byte more than announced detects a file still growing
        while left > 0 and (chunk := os.read(fd, min(left, _READ))):
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        return data if len(data) == st.st_size else "changed_during_guard"
    finally:
        os.close(fd)


def read_output_dir(out_dir: Path, allowed: frozenset[str], max_bytes: int) -> Listing:
    """List ``out_dir`` and read the allowed files, or say why nothing may be read.

    An absent directory is an empty output. Reason codes: ``output_not_directory``,
    ``too_many_files``, ``symlink``, ``subdirectory``, ``special_file``, ``hard_link``,
    ``reserved_name``, ``dicom_name``, ``unexpected_file``, ``missing_file``, ``too_large``,
    ``changed_during_guard``, ``output_unreadable``. Bytes are read only when the listing
    raised none of them.
    """
    listing = Listing()
    try:
        top = os.lstat(out_dir)
    except FileNotFoundError:
        top = None
    except OSError:
        listing.deny("output_unreadable")
        return listing
    if top is not None and not stat.S_ISDIR(top.st_mode):
        listing.deny("output_not_directory")
        return listing
    if top is None:
        if allowed:
            listing.deny("missing_file")
        return listing
    try:
        dir_fd = os.open(out_dir, _DIR_FLAGS)
    except OSError:
        listing.deny("output_unreadable")
        return listing
    try:
        _list(listing, dir_fd, allowed, max_bytes)
    except OSError:
        listing.deny("output_unreadable")
    finally:
        os.close(dir_fd)
    return listing


def _list(listing: Listing, dir_fd: int, allowed: frozenset[str], max_bytes: int) -> None:
    names = os.listdir(dir_fd)
    if len(names) > MAX_ENTRIES:
        listing.deny("too_many_files")
        return
    listing.names = sorted(names)
    stats: dict[str, os.stat_result] = {}
    total = 0
    for name in listing.names:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        code = _kind_code(st.st_mode)
        if code is None and st.st_nlink != 1:
            code = "hard_link"
        if code is not None:
            listing.deny(code)
        else:
            total += st.st_size
            stats[name] = st
        for name_code in _name_codes(name, allowed):
            listing.deny(name_code)
    if allowed - set(listing.names):
        listing.deny("missing_file")
    if total > max_bytes:
        listing.deny("too_large")
    if listing.codes:
        return
    for name in sorted(allowed):
        data = _read(dir_fd, name, stats[name])
        if isinstance(data, str):
            listing.deny(data)
            listing.contents.clear()
            return
        listing.contents[name] = data
