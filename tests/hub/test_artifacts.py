"""The hub's content-addressed artifact store (:mod:`rapha.hub.artifacts`).

Every test runs against each implementation of :class:`ArtifactStore` (the ``store``
fixture); the filesystem store is the only one so far.
"""

from __future__ import annotations

import asyncio
import hashlib
import stat
import threading
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from rapha.errors import DataError, IntegrityError, PolicyError, UsageError
from rapha.hub.artifacts import Artifact, ArtifactStore, FilesystemArtifactStore

CONTENT = b"bundle bytes " * 1000
DIGEST = hashlib.sha256(CONTENT).hexdigest()
OTHER_DIGEST = hashlib.sha256(b"something else").hexdigest()
LIMIT = 1024 * 1024


@pytest.fixture(params=["filesystem"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    assert request.param == "filesystem"
    return FilesystemArtifactStore(tmp_path / "artifacts")


def _chunks(data: bytes, size: int = 4096) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def _stored_files(store: ArtifactStore) -> list[Path]:
    """Every regular file the store holds, uploads in progress included."""
    assert isinstance(store, FilesystemArtifactStore)
    return sorted(p for p in store.root.rglob("*") if p.is_file())


def test_put_then_read_back(store: ArtifactStore) -> None:
    artifact = store.put_stream(_chunks(CONTENT), expected_sha256=DIGEST, max_bytes=LIMIT)

    with store.open(DIGEST) as file:
        read_back = file.read()

    assert artifact.sha256 == DIGEST
    assert artifact.size == len(CONTENT)
    assert read_back == CONTENT
    assert store.exists(DIGEST)
    assert store.size(DIGEST) == len(CONTENT)
    assert store.verify(DIGEST)


def test_filesystem_layout_and_modes(tmp_path: Path) -> None:
    store = FilesystemArtifactStore(tmp_path / "artifacts")

    artifact = store.put_stream([CONTENT], expected_sha256=DIGEST, max_bytes=LIMIT)

    expected = tmp_path / "artifacts" / DIGEST[:2] / DIGEST[2:4] / DIGEST
    assert artifact.path == expected
    assert _stored_files(store) == [expected]
    assert stat.S_IMODE(expected.stat().st_mode) == 0o600
    for directory in (expected.parent, expected.parent.parent, store.tmp_dir, store.root):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_putting_a_stored_digest_again_keeps_the_stored_file(store: ArtifactStore) -> None:
    first = store.put_stream([CONTENT], expected_sha256=DIGEST, max_bytes=LIMIT)
    assert first.path is not None
    inode = first.path.stat().st_ino

    second = store.put_stream(_chunks(CONTENT, 7), expected_sha256=DIGEST, max_bytes=LIMIT)

    assert second == first
    assert first.path.stat().st_ino == inode
    assert len(_stored_files(store)) == 1


def test_an_empty_artifact_is_an_artifact(store: ArtifactStore) -> None:
    empty = hashlib.sha256(b"").hexdigest()

    artifact = store.put_stream([], expected_sha256=empty, max_bytes=0)

    assert artifact.size == 0
    assert store.verify(empty)


def test_wrong_digest_is_refused_and_nothing_is_left(store: ArtifactStore) -> None:
    with pytest.raises(IntegrityError) as caught:
        store.put_stream(_chunks(CONTENT), expected_sha256=OTHER_DIGEST, max_bytes=LIMIT)

    assert DIGEST in str(caught.value)
    assert OTHER_DIGEST in str(caught.value)
    assert not store.exists(OTHER_DIGEST)
    assert not store.exists(DIGEST)
    assert _stored_files(store) == []


def test_too_large_is_refused_mid_stream(store: ArtifactStore) -> None:
    consumed: list[bytes] = []

    def source() -> Iterator[bytes]:
        for chunk in _chunks(CONTENT, 1000):
            consumed.append(chunk)
            yield chunk

    with pytest.raises(PolicyError, match="larger than the limit of 2500 bytes"):
        store.put_stream(source(), expected_sha256=DIGEST, max_bytes=2500)

    assert len(consumed) == 3  # refused on the chunk that crossed the limit, not at the end
    assert not store.exists(DIGEST)
    assert _stored_files(store) == []


def test_exactly_max_bytes_is_accepted(store: ArtifactStore) -> None:
    artifact = store.put_stream(_chunks(CONTENT), expected_sha256=DIGEST, max_bytes=len(CONTENT))

    assert artifact.size == len(CONTENT)


def test_a_failing_source_leaves_nothing(store: ArtifactStore) -> None:
    def source() -> Iterator[bytes]:
        yield CONTENT[:100]
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        store.put_stream(source(), expected_sha256=DIGEST, max_bytes=LIMIT)

    assert _stored_files(store) == []


BAD_DIGESTS = [
    "../x",
    "../" + "a" * 61,
    "/etc/passwd",
    DIGEST.upper(),
    DIGEST[:63],
    DIGEST + "0",
    DIGEST + "\n",
    "g" * 64,
    "",
]


@pytest.mark.parametrize("digest", BAD_DIGESTS)
@pytest.mark.parametrize(
    "use",
    [
        lambda s, d: s.put_stream([CONTENT], expected_sha256=d, max_bytes=LIMIT),
        lambda s, d: s.open(d),
        lambda s, d: s.exists(d),
        lambda s, d: s.size(d),
        lambda s, d: s.delete(d),
        lambda s, d: s.verify(d),
    ],
    ids=["put_stream", "open", "exists", "size", "delete", "verify"],
)
def test_malformed_digests_are_refused_everywhere(
    store: ArtifactStore, digest: str, use: Callable[[ArtifactStore, str], object]
) -> None:
    with pytest.raises(UsageError, match="not a SHA-256 digest"):
        use(store, digest)

    assert _stored_files(store) == []


@pytest.mark.parametrize("max_bytes", [-1, True, 1.5])
def test_a_malformed_limit_is_refused(store: ArtifactStore, max_bytes: int) -> None:
    with pytest.raises(UsageError, match="max_bytes"):
        store.writer(expected_sha256=DIGEST, max_bytes=max_bytes)


def test_a_missing_artifact_is_a_data_error(store: ArtifactStore) -> None:
    assert not store.exists(DIGEST)
    assert store.delete(DIGEST) is False
    for read in (store.open, store.size, store.verify):
        with pytest.raises(DataError, match="no artifact with SHA-256"):
            read(DIGEST)


def test_delete_removes_the_artifact(store: ArtifactStore) -> None:
    store.put_stream([CONTENT], expected_sha256=DIGEST, max_bytes=LIMIT)

    assert store.delete(DIGEST) is True

    assert not store.exists(DIGEST)


def test_verify_detects_bytes_changed_on_disk(tmp_path: Path) -> None:
    store = FilesystemArtifactStore(tmp_path / "artifacts")
    artifact = store.put_stream([CONTENT], expected_sha256=DIGEST, max_bytes=LIMIT)
    assert artifact.path is not None
    artifact.path.write_bytes(CONTENT[:-1] + b"!")

    assert store.verify(DIGEST) is False


def test_a_committed_writer_takes_no_more_bytes(store: ArtifactStore) -> None:
    with store.writer(expected_sha256=DIGEST, max_bytes=LIMIT) as writer:
        writer.write(CONTENT)
        writer.commit()

        with pytest.raises(UsageError, match="already committed"):
            writer.write(b"more")


def test_concurrent_puts_of_the_same_bytes_both_succeed(store: ArtifactStore) -> None:
    both_started = threading.Barrier(2, timeout=10)
    results: list[Artifact] = []
    errors: list[BaseException] = []

    def source() -> Iterator[bytes]:
        chunks = _chunks(CONTENT, 1000)
        yield next(chunks)
        both_started.wait()  # both uploads are open before either commits
        yield from chunks

    def upload() -> None:
        try:
            results.append(store.put_stream(source(), expected_sha256=DIGEST, max_bytes=LIMIT))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=upload) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert errors == []
    assert len(results) == 2
    assert results[0] == results[1]
    assert len(_stored_files(store)) == 1
    assert store.verify(DIGEST)


def test_async_put_from_an_async_generator(store: ArtifactStore) -> None:
    async def request_stream() -> AsyncIterator[bytes]:
        for chunk in _chunks(CONTENT, 1000):
            await asyncio.sleep(0)
            yield chunk
        yield b""  # Starlette's request.stream() ends with an empty chunk

    artifact = asyncio.run(
        store.put_stream_async(request_stream(), expected_sha256=DIGEST, max_bytes=LIMIT)
    )

    assert artifact.sha256 == DIGEST
    assert store.verify(DIGEST)


def test_async_put_with_a_wrong_digest_leaves_nothing(store: ArtifactStore) -> None:
    async def request_stream() -> AsyncIterator[bytes]:
        yield CONTENT

    with pytest.raises(IntegrityError):
        asyncio.run(
            store.put_stream_async(request_stream(), expected_sha256=OTHER_DIGEST, max_bytes=LIMIT)
        )

    assert _stored_files(store) == []


def test_a_50_mb_upload_is_streamed_not_held_in_memory(store: ArtifactStore) -> None:
    chunk = bytes(range(256)) * 256  # 64 KiB, yielded again and again: no new allocations
    count = 800  # 50 MiB
    expected = hashlib.sha256()
    for _ in range(count):
        expected.update(chunk)

    tracemalloc.start()
    try:
        artifact = store.put_stream(
            (chunk for _ in range(count)),
            expected_sha256=expected.hexdigest(),
            max_bytes=count * len(chunk),
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert artifact.size == 50 * 1024 * 1024
    assert peak < 8 * 1024 * 1024
