"""The node's measurement: one digest over the code and the runtime that run jobs.

A measurement is an ordered **event log** of six components, always in this order
(:data:`COMPONENTS`):

1. ``rapha``: every file of Rapha's package directory (``rapha/``), found by walking it.
   This is the node's own code, with the default policies, templates and contracts
   shipped inside the package. The directory is walked, not read from a list, because an
   editable install's RECORD does not list the source files.
2. ``distributions``: every file that an installed distribution on the sandbox's Python
   paths (``Sandbox.profile()["python_paths"]``) lists in its RECORD (or
   ``installed-files.txt``), Rapha's own distribution included. The real bytes are hashed:
   a RECORD alone proves nothing about the files it lists. A listed file that is missing
   is entered as ``"missing"``, so a deleted file changes the digest. Each file is also
   checked against its RECORD sha256, and the ones that differ are reported
   (:attr:`Measurement.record_mismatches`). This is for information only. The digest
   changes anyway, because it covers the real bytes.
3. ``unlisted``: every other file below those paths, one that no distribution lists and
   that is not in Rapha's package. A module or ``.pth`` file dropped into site-packages
   changes the measurement.
4. ``interpreter``: the sandbox's Python binary (``Sandbox.python``), its path and SHA-256.
5. ``bwrap``: the bubblewrap binary the sandbox runs (``Sandbox.bwrap``), its path and
   SHA-256.
6. ``sandbox_profile``: the sandbox profile (``Sandbox.profile()``: bwrap arguments,
   seccomp filter digest, environment, limits, uids, Python paths).

**Not measured.**

* Generated files: ``__pycache__`` directories and ``*.pyc`` / ``*.pyo`` files.
* Every distribution's ``*.dist-info/RECORD`` itself. It is redundant, because each file
  it lists is hashed itself, and its lines for compiled files carry install-time hashes,
  so two identical installs would differ.
* The hospital's policies and scope. They live in the node's configuration directory,
  are hospital-owned and change often, and their digests go into every receipt instead.
  Only ``[sandbox]`` of ``node.toml`` reaches the measurement, through the profile.

Nothing is cached between runs. Every file is read and hashed again each time, because a
cache keyed on mtime could be fooled by resetting the mtime.

**Canonical form.** A file component's digest is the SHA-256 of the RFC 8785 canonical
JSON of its entries, sorted:

* ``rapha``: ``[path, sha256]``, with the path relative to the package directory;
* ``distributions``: ``[name, version, path, sha256]``, with the name normalised (PEP 503)
  and the path exactly as the RECORD gives it;
* ``unlisted``: ``[directory, path, sha256]``, with the path relative to that directory.

All paths are POSIX. ``sha256`` is lower-case hex, or ``"missing"`` for a listed file
that is absent, or ``"link:TARGET"`` for a symbolic link to a directory or to nothing.
``interpreter`` and ``bwrap`` hash ``{"path": …, "sha256": …}`` and ``sandbox_profile``
hashes the profile, both as canonical JSON.

**The overall digest** is a hash chain over the event log ``[{"component": name, "digest":
hex}, …]``::

    e_i    = SHA-256(canonical_json({"component": name_i, "digest": digest_i}))
    h_0    = 32 zero bytes
    h_i    = SHA-256(h_(i-1) ‖ e_i)
    digest = hex(h_n)

That is exactly the value of a SHA-256 PCR, reset to zeros, after extending ``e_1 … e_n``
in order. A TPM provider extends :func:`event_value` of each event, and a verifier
recomputes the digest from the event log alone with :func:`digest_of`, without touching
any file.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import rapha
from rapha.crypto import canonical_json, digest_bytes, digest_file
from rapha.errors import DataError, DependencyError

if TYPE_CHECKING:
    from rapha.runtime.sandbox import Sandbox

__all__ = [
    "COMPONENTS",
    "GENERATED_SUFFIXES",
    "MEASUREMENT_SCHEMA",
    "Measurement",
    "digest_of",
    "event_value",
    "is_generated",
    "measure",
]

COMPONENTS: Final = (
    "rapha",
    "distributions",
    "unlisted",
    "interpreter",
    "bwrap",
    "sandbox_profile",
)
"""The measured components, in event-log order."""
GENERATED_SUFFIXES: Final = (".pyc", ".pyo")
"""File suffixes that are generated (byte code) and never measured, like ``__pycache__``."""
MEASUREMENT_SCHEMA: Final = "rapha.measurement/1"
"""The schema tag of :meth:`Measurement.to_json`."""
_MISSING: Final = "missing"
_LINK: Final = "link:"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_BATCH: Final = 64
_MAX_WORKERS: Final = 8
_PYTHON: Final = f"python{sys.version_info.major}.{sys.version_info.minor}"

Progress = Callable[[int, int], None]
"""Called with (files hashed so far, files to hash) while a measurement runs."""


@dataclass(frozen=True)
class Measurement:
    """A node's measurement and its breakdown (see the module docstring).

    ``components`` maps each name of :data:`COMPONENTS` to its hex digest, and
    ``file_counts`` says how many files each one hashed. ``files`` is how many distinct
    files were read (a file that two distributions list counts once).
    ``binaries`` gives the path and SHA-256 of the interpreter and bwrap, and ``profile``
    the sandbox profile that was measured. ``missing`` lists the files a distribution
    lists that are absent (``name/path``). ``record_mismatches`` lists the files whose
    bytes differ from their RECORD hash. Both are information: the digest already
    reflects them.
    """

    digest: str
    components: Mapping[str, str]
    file_counts: Mapping[str, int]
    files: int
    binaries: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    profile: Mapping[str, Any] = field(default_factory=dict)
    missing: tuple[str, ...] = ()
    record_mismatches: tuple[str, ...] = ()

    def events(self) -> list[dict[str, str]]:
        """The event log, in :data:`COMPONENTS` order: ``[{"component", "digest"}, …]``."""
        return [{"component": name, "digest": self.components[name]} for name in COMPONENTS]

    def to_json(self) -> dict[str, Any]:
        """The measurement as plain JSON. It is the same bytes for the same installation."""
        return {
            "schema": MEASUREMENT_SCHEMA,
            "digest": self.digest,
            "files": self.files,
            "components": [
                {**event, "files": self.file_counts[event["component"]]} for event in self.events()
            ],
            "binaries": {name: dict(value) for name, value in self.binaries.items()},
            "sandbox_profile": dict(self.profile),
            "missing": list(self.missing),
            "record_mismatches": list(self.record_mismatches),
        }


def event_value(event: Mapping[str, str]) -> bytes:
    """The 32 bytes extended into the PCR for one event: ``SHA-256(canonical_json(event))``.

    Raises:
        DataError: the event is not ``{"component": non-empty str, "digest": hex SHA-256}``.
    """
    if set(event) != {"component", "digest"}:
        raise DataError("a measurement event has exactly the keys component and digest")
    component, digest = event["component"], event["digest"]
    if not isinstance(component, str) or not component:
        raise DataError("a measurement event's component must be a non-empty string")
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        raise DataError(
            f"the digest of measurement event {component!r} must be 64 lower-case hex digits"
        )
    return hashlib.sha256(canonical_json({"component": component, "digest": digest})).digest()


def digest_of(events: Iterable[Mapping[str, str]]) -> str:
    """The measurement digest of an event log, replayed as a SHA-256 PCR from zeros.

    This needs no file, so a verifier can check an event log against a quoted digest.

    Raises:
        DataError: an event is malformed (see :func:`event_value`).
    """
    pcr = bytes(32)
    for event in events:
        pcr = hashlib.sha256(pcr + event_value(event)).digest()
    return pcr.hex()


def is_generated(path: str) -> bool:
    """Whether a POSIX path names a generated file: in ``__pycache__``, or ``*.pyc``/``*.pyo``."""
    return "__pycache__" in path.split("/") or path.endswith(GENERATED_SUFFIXES)


def measure(
    sandbox: Sandbox,
    *,
    site_dirs: Sequence[Path] | None = None,
    package_dir: Path | None = None,
    progress: Progress | None = None,
) -> Measurement:
    """Measure this node: Rapha's code, the runtime that runs jobs, the sandbox profile.

    ``site_dirs`` are the directories whose distributions and files are measured. The
    default is the sandbox's Python paths, which are what the sandbox mounts.
    ``package_dir`` is Rapha's package directory, by default the one imported. Tests pass
    small copies of both. Files are hashed in a few threads (hashlib releases the GIL).

    Raises:
        DependencyError: the interpreter or bwrap binary is missing.
        DataError: a file cannot be read.
    """
    profile = sandbox.profile()
    binaries = {
        "interpreter": _binary(
            sandbox.python, "sandbox interpreter", f"install it (apt-get install {_PYTHON})"
        ),
        "bwrap": _binary(
            sandbox.bwrap,
            "bubblewrap binary",
            "install bubblewrap (apt-get install bubblewrap) or set [sandbox] bwrap in node.toml",
        ),
    }
    roots = _unique_real(site_dirs if site_dirs is not None else profile["python_paths"])
    package = os.path.realpath(package_dir or Path(rapha.__file__).parent)

    plan = _Plan(package)
    plan.add_distributions(roots)
    plan.add_unlisted(roots)
    digests = _hash_all(sorted(plan.to_hash), progress)

    rows = plan.rows(digests)
    components = {name: digest_bytes(canonical_json(rows[name])) for name in rows}
    counts = {name: sum(1 for row in rows[name] if _HEX64.fullmatch(row[-1])) for name in rows}
    for name, value in binaries.items():
        components[name] = digest_bytes(canonical_json(value))
        counts[name] = 1
    components["sandbox_profile"] = digest_bytes(canonical_json(profile))
    counts["sandbox_profile"] = 0

    ordered = {name: components[name] for name in COMPONENTS}
    events = [{"component": name, "digest": value} for name, value in ordered.items()]
    return Measurement(
        digest=digest_of(events),
        components=ordered,
        file_counts={name: counts[name] for name in COMPONENTS},
        files=len(digests) + len(binaries),
        binaries=binaries,
        profile=profile,
        missing=tuple(sorted(plan.missing)),
        record_mismatches=tuple(sorted(plan.record_mismatches(digests))),
    )


# --- planning: which files belong to which component -------------------------------------


@dataclass(frozen=True, slots=True)
class _Listed:
    """One file a distribution lists: where it is and the sha256 its RECORD gives, if any."""

    name: str
    version: str
    path: str
    location: str
    record_sha256: str | None


class _Plan:
    """The files of one measurement, grouped by component, before they are hashed."""

    def __init__(self, package: str) -> None:
        self.package = package
        self.to_hash: set[str] = set()
        self.missing: list[str] = []
        self.listed: list[_Listed] = []
        self.claimed: set[str] = set()
        self.package_rows: list[tuple[str, str]] = []  # (relative path, location or marker)
        self.unlisted_rows: list[tuple[str, str, str]] = []
        for location, marker in _walk(package, prune=frozenset()):
            self._enter(location, marker)
            self.package_rows.append((_relative(location, package), marker or location))

    def _enter(self, location: str, marker: str | None) -> None:
        """Hash a walked file later, unless it is a link (its marker is its entry)."""
        if marker is None:
            self.to_hash.add(location)

    def add_distributions(self, roots: Sequence[str]) -> None:
        """Every file each distribution below ``roots`` lists, but not those in Rapha's package."""
        for dist in metadata.distributions(path=list(roots)):
            files = _listed_files(dist)
            if files is None:
                continue  # no list of installed files: the walk of its directory covers it
            meta = dist.metadata  # parsed on every access: once per distribution
            name, version = _normalise(meta["Name"] or ""), meta["Version"] or ""
            for entry in files:
                path = str(entry)
                location = os.path.normpath(str(dist.locate_file(entry)))
                self.claimed.add(location)
                if is_generated(path) or _is_record(path) or self._in_package(location):
                    continue
                sha = entry.hash.value if entry.hash and entry.hash.mode == "sha256" else None
                self.listed.append(_Listed(name, version, path, location, sha))
                if os.path.isfile(location):
                    self.to_hash.add(location)
                else:
                    self.missing.append(f"{name}/{path}")

    def add_unlisted(self, roots: Sequence[str]) -> None:
        """Every file below ``roots`` that no distribution lists, outside Rapha's package."""
        for root in roots:
            for location, marker in _walk(root, prune=frozenset({self.package})):
                if location in self.claimed:
                    continue
                self._enter(location, marker)
                self.unlisted_rows.append((root, _relative(location, root), marker or location))

    def _in_package(self, location: str) -> bool:
        return location == self.package or location.startswith(self.package + os.sep)

    def rows(self, digests: Mapping[str, str]) -> dict[str, list[list[str]]]:
        """Each file component's sorted entries, with locations replaced by digests."""

        def value(location_or_marker: str) -> str:
            return digests.get(location_or_marker, location_or_marker)

        dists = [
            [f.name, f.version, f.path, digests.get(f.location, _MISSING)] for f in self.listed
        ]
        return {
            "rapha": sorted([path, value(loc)] for path, loc in self.package_rows),
            "distributions": sorted(dists),
            "unlisted": sorted([root, path, value(loc)] for root, path, loc in self.unlisted_rows),
        }

    def record_mismatches(self, digests: Mapping[str, str]) -> Iterator[str]:
        """``name/path`` of every present file whose bytes differ from its RECORD sha256."""
        for f in self.listed:
            actual = digests.get(f.location)
            if actual is None or f.record_sha256 is None:
                continue
            if _record_form(actual) != f.record_sha256:
                yield f"{f.name}/{f.path}"


def _listed_files(dist: metadata.Distribution) -> list[metadata.PackagePath] | None:
    """The files a distribution's installer recorded; ``None`` when it recorded none.

    A development ``*.egg-info`` has only ``SOURCES.txt``, whose paths are relative to the
    source tree, not to the directory: its files are left to the walk instead.
    """
    if dist.read_text("RECORD") is None and dist.read_text("installed-files.txt") is None:
        return None
    return list(dist.files or [])


def _walk(root: str, *, prune: frozenset[str]) -> Iterator[tuple[str, str | None]]:
    """``(location, marker)`` of every non-generated file below ``root``, in no fixed order.

    ``marker`` is ``None`` for a file to hash, or ``"link:TARGET"`` for a symbolic link to
    a directory or to nothing. Linked directories are not followed, and ``prune`` paths
    are skipped.
    """
    if os.path.isfile(root):  # a zip archive on the path is code too
        yield root, None
        return
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise DataError(
                f"cannot list {directory} to measure it: {exc.strerror}; run the measurement "
                "as the node's user"
            ) from exc
        for entry in entries:
            if entry.name == "__pycache__" or entry.path in prune:
                continue
            if entry.is_symlink() and not entry.is_file():
                yield entry.path, _LINK + os.readlink(entry.path)
            elif entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
            elif entry.is_file() and not entry.name.endswith(GENERATED_SUFFIXES):
                yield entry.path, None


def _hash_all(locations: list[str], progress: Progress | None) -> dict[str, str]:
    """SHA-256 of every file, hashed in batches over a few threads."""
    batches = [locations[i : i + _BATCH] for i in range(0, len(locations), _BATCH)]
    workers = max(1, min(_MAX_WORKERS, len(os.sched_getaffinity(0))))
    digests: dict[str, str] = {}
    if progress is not None:
        progress(0, len(locations))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rapha-measure") as pool:
        for batch, values in zip(batches, pool.map(_hash_batch, batches), strict=True):
            digests.update(zip(batch, values, strict=True))
            if progress is not None:
                progress(len(digests), len(locations))
    return digests


def _hash_batch(batch: list[str]) -> list[str]:
    return [digest_file(Path(location)) for location in batch]


def _binary(path: Path, what: str, fix: str) -> dict[str, str]:
    if not path.is_file():
        raise DependencyError(
            f"the {what} {path} is missing, so this node cannot be measured; {fix}"
        )
    return {"path": str(path), "sha256": digest_file(path)}


def _unique_real(paths: Iterable[Path | str]) -> list[str]:
    """The real paths of ``paths``, each once, in the order given."""
    out: list[str] = []
    for path in paths:
        real = os.path.realpath(path)
        if real not in out:
            out.append(real)
    return out


def _relative(location: str, root: str) -> str:
    return Path(os.path.relpath(location, root)).as_posix()


def _is_record(path: str) -> bool:
    parts = path.split("/")
    return parts[-1] == "RECORD" and len(parts) >= 2 and parts[-2].endswith(".dist-info")


def _normalise(name: str) -> str:
    """A distribution name as PEP 503 normalises it."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _record_form(hex_digest: str) -> str:
    """A hex SHA-256 as a RECORD writes it: urlsafe base64 without padding (PEP 376/627)."""
    return base64.urlsafe_b64encode(bytes.fromhex(hex_digest)).rstrip(b"=").decode("ascii")
