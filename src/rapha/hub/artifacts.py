"""The hub's artifact store: bundles and outboxes, content-addressed by SHA-256.

:class:`ArtifactStore` is the interface; :class:`FilesystemArtifactStore` the default
implementation. An upload is streamed through an :class:`ArtifactWriter`, which hashes and
counts every chunk as it arrives and never holds more than one chunk in memory. The bytes
become visible under their digest only if they hash to the digest the uploader announced
and stay within the size limit; otherwise nothing of them is kept. The sync
(:meth:`ArtifactStore.put_stream`: CLI, tests) and async
(:meth:`ArtifactStore.put_stream_async`: FastAPI's ``request.stream()``) entry points
share that one writer.

Every digest argument is validated as 64 lowercase hex digits before it is used, so a
digest can never name a path outside the store.

Errors (all from :mod:`rapha.errors`):

* :class:`~rapha.errors.UsageError`: a digest or limit argument is malformed;
* :class:`~rapha.errors.IntegrityError`: the bytes do not hash to the expected digest;
* :class:`~rapha.errors.PolicyError`: the upload exceeds ``max_bytes``;
* :class:`~rapha.errors.DataError`: no artifact has the digest asked for.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import tempfile
from collections.abc import AsyncIterable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from rapha.errors import DataError, IntegrityError, PolicyError, UsageError

__all__ = [
    "Artifact",
    "ArtifactStore",
    "ArtifactWriter",
    "FilesystemArtifactStore",
    "check_sha256",
]

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_READ_CHUNK = 1024 * 1024
_DIR_MODE = 0o700
_FILE_MODE = 0o600


def check_sha256(value: object) -> str:
    """``value`` if it is a SHA-256 hex digest (64 lowercase hex digits), else UsageError.

    Lowercase only, so one artifact has exactly one name (and one path).
    """
    if not isinstance(value, str) or not _SHA256_HEX.fullmatch(value):
        shown = repr(value)[:80]
        raise UsageError(
            f"not a SHA-256 digest: {shown}; give the 64 lowercase hex digits of the "
            "artifact's SHA-256"
        )
    return value


@dataclass(frozen=True)
class Artifact:
    """A stored artifact: its SHA-256 (hex), its size in bytes, and, where the store keeps
    it as a local file, that file's path."""

    sha256: str
    size: int
    path: Path | None = None


class ArtifactWriter(Protocol):
    """One upload in progress: :meth:`write` chunks, then :meth:`commit` or :meth:`abort`.

    Used as a context manager, it aborts unless it was committed.
    """

    @property
    def size(self) -> int:
        """Bytes written so far."""
        ...

    def write(self, chunk: bytes) -> None:
        """Hash and store ``chunk``; PolicyError (upload aborted) past ``max_bytes``."""
        ...

    def commit(self) -> Artifact:
        """Publish the bytes under their digest if it is the expected one.

        IntegrityError (upload aborted) otherwise. Committing a digest that is already
        stored succeeds and leaves the stored copy as it is.
        """
        ...

    def abort(self) -> None:
        """Discard everything written; safe to call more than once."""
        ...

    def __enter__(self) -> ArtifactWriter: ...

    def __exit__(self, *exc_info: object) -> None: ...


class ArtifactStore(Protocol):
    """Content-addressed storage of immutable blobs, named by their SHA-256 hex digest.

    Implementations provide :meth:`writer` and the read side; :meth:`put_stream` and
    :meth:`put_stream_async` are defined here once, on top of :meth:`writer`, for every
    implementation that subclasses this protocol.
    """

    def writer(self, *, expected_sha256: str, max_bytes: int) -> ArtifactWriter:
        """Start an upload announced as ``expected_sha256``, at most ``max_bytes`` long.

        Both arguments are validated here, before any byte is read from the uploader.
        """
        ...

    def open(self, sha256: str) -> BinaryIO:
        """The artifact's bytes, for reading (not re-verified: see :meth:`verify`)."""
        ...

    def exists(self, sha256: str) -> bool:
        """Whether an artifact with this digest is stored."""
        ...

    def size(self, sha256: str) -> int:
        """The stored artifact's size in bytes."""
        ...

    def delete(self, sha256: str) -> bool:
        """Remove the artifact; ``True`` if it was there."""
        ...

    def verify(self, sha256: str) -> bool:
        """Re-hash the stored bytes: ``True`` if they still match their name."""
        ...

    def put_stream(
        self, chunks: Iterable[bytes], *, expected_sha256: str, max_bytes: int
    ) -> Artifact:
        """Store the bytes of ``chunks`` (read one at a time) under ``expected_sha256``."""
        with self.writer(expected_sha256=expected_sha256, max_bytes=max_bytes) as writer:
            for chunk in chunks:
                writer.write(chunk)
            return writer.commit()

    async def put_stream_async(
        self, chunks: AsyncIterable[bytes], *, expected_sha256: str, max_bytes: int
    ) -> Artifact:
        """:meth:`put_stream` for an async source such as Starlette's ``request.stream()``.

        Chunk writes go to the page cache and run on the event loop; the commit, which
        waits for the disk (``fsync``), runs in a worker thread. Cancelled during the
        commit, the upload may still be published: only ever after its digest matched.
        """
        with self.writer(expected_sha256=expected_sha256, max_bytes=max_bytes) as writer:
            async for chunk in chunks:
                writer.write(chunk)
            return await asyncio.to_thread(writer.commit)


class _FileWriter:
    """:class:`ArtifactWriter` of :class:`FilesystemArtifactStore`: a temporary file in the
    store's ``tmp/`` directory (same filesystem, so publishing is a link, not a copy)."""

    def __init__(self, store: FilesystemArtifactStore, expected: str, max_bytes: int) -> None:
        self._store = store
        self._expected = expected
        self._max_bytes = max_bytes
        self._hash = hashlib.sha256()
        self._size = 0
        fd, name = tempfile.mkstemp(prefix="upload-", dir=store.tmp_dir)
        os.fchmod(fd, _FILE_MODE)
        self._temp = Path(name)
        self._file: BinaryIO | None = os.fdopen(fd, "wb")
        self._done = False

    @property
    def size(self) -> int:
        return self._size

    def _open_file(self) -> BinaryIO:
        if self._file is None:
            raise UsageError("this upload was already committed or aborted; start a new one")
        return self._file

    def write(self, chunk: bytes) -> None:
        file = self._open_file()
        if self._size + len(chunk) > self._max_bytes:
            self.abort()
            raise PolicyError(
                f"the upload is larger than the limit of {self._max_bytes} bytes and was "
                "discarded; upload a smaller artifact or ask the hub operator for a higher limit"
            )
        self._hash.update(chunk)
        file.write(chunk)
        self._size += len(chunk)

    def commit(self) -> Artifact:
        file = self._open_file()
        try:
            file.flush()
            os.fsync(file.fileno())
        finally:
            file.close()
            self._file = None
        actual = self._hash.hexdigest()
        if actual != self._expected:
            self.abort()
            raise IntegrityError(
                f"the upload's SHA-256 is {actual}, not the expected {self._expected}; it "
                "was discarded: check that the digest was computed over the exact bytes "
                "sent, and upload again"
            )
        target = self._store.path_of(actual)
        for directory in (target.parent.parent, target.parent):  # mkdir(parents=) ignores mode
            directory.mkdir(mode=_DIR_MODE, exist_ok=True)
        try:
            # A hard link publishes atomically and never replaces: when another upload of
            # the same bytes got there first, its file stays as it is.
            os.link(self._temp, target)
        except FileExistsError:
            pass
        else:
            _fsync_dir(target.parent)
        self.abort()  # only the temporary name goes; the published link stays
        self._done = True
        return Artifact(sha256=actual, size=self._size, path=target)

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._temp.unlink(missing_ok=True)

    def __enter__(self) -> _FileWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self._done:
            self.abort()


def _missing(sha256: str) -> DataError:
    return DataError(f"no artifact with SHA-256 {sha256} is stored; upload it first")


def _fsync_dir(directory: Path) -> None:
    """Make a new directory entry durable (the link survives a power cut)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FilesystemArtifactStore(ArtifactStore):
    """Artifacts as files ``root/ab/cd/<sha256>`` (``ab``, ``cd``: the first two bytes in
    hex, so no directory grows past 65 536 entries); uploads in progress in ``root/tmp/``.

    Directories are created 0700 (an existing ``root`` keeps its mode) and files 0600: only
    the hub's own user reads bundles and outboxes (other companies' models and results); a
    backup job runs as that user too.
    Several hub processes may share one ``root``: publishing is an atomic hard link that
    never overwrites, so concurrent uploads of the same bytes all succeed with one file.
    A crashed upload can leave a file in ``root/tmp/``, which nothing ever reads.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self.root.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        self.tmp_dir.mkdir(mode=_DIR_MODE, exist_ok=True)

    def path_of(self, sha256: str) -> Path:
        """Where the artifact ``sha256`` is (or would be) stored."""
        digest = check_sha256(sha256)
        return self.root / digest[:2] / digest[2:4] / digest

    def writer(self, *, expected_sha256: str, max_bytes: int) -> _FileWriter:
        check_sha256(expected_sha256)
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise UsageError(f"max_bytes must be a byte count (an int >= 0), not {max_bytes!r}")
        return _FileWriter(self, expected_sha256, max_bytes)

    def _existing(self, sha256: str) -> Path:
        path = self.path_of(sha256)
        if not path.is_file():
            raise _missing(sha256)
        return path

    def open(self, sha256: str) -> BinaryIO:
        path = self._existing(sha256)
        try:
            return path.open("rb")
        except FileNotFoundError as exc:  # deleted between the check and the open
            raise _missing(sha256) from exc

    def exists(self, sha256: str) -> bool:
        return self.path_of(sha256).is_file()

    def size(self, sha256: str) -> int:
        return self._existing(sha256).stat().st_size

    def delete(self, sha256: str) -> bool:
        try:
            self.path_of(sha256).unlink()
        except FileNotFoundError:
            return False
        return True

    def verify(self, sha256: str) -> bool:
        digest = hashlib.sha256()
        with self.open(sha256) as file:
            while chunk := file.read(_READ_CHUNK):
                digest.update(chunk)
        return digest.hexdigest() == sha256
