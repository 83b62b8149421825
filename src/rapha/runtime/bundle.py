"""Bundles: their files, digest and signature, and how the node verifies one.

A bundle (DESIGN.md, "Formats: Bundle") is a flat directory, or an uncompressed ``.tar`` of
one, holding exactly:

* ``bundle.toml`` (required): the manifest, :mod:`rapha.runtime.manifest`;
* ``weights.safetensors`` (required): initial weights for a train job, trained weights for
  an evaluate job; their names, shapes and dtypes are the only weights allowed back out;
* ``model.py``: required when ``[model] source = "custom"``, refused for zoo models;
* ``bundle.sig``: the signature.

Anything else is an *extra* file; sub-directories, symlinks and special files are refused.

**Digest.** ``digest = SHA-256(canonical_json({"v": "rapha-bundle-v1", "files": [...]}))``
where ``files`` lists ``{"path", "sha256"}`` for every file except ``bundle.sig``, sorted
by path, and canonical JSON is RFC 8785 (:func:`rapha.crypto.canonical_json`).

**bundle.sig** is canonical JSON::

    {"v": 1, "files": [{"path": ..., "sha256": ...}, ...], "digest": "<64 hex>",
     "public_key": "<64 hex: raw Ed25519 key>", "signature": "<128 hex>"}

The Ed25519 signature is over the **32 raw digest bytes** (``bytes.fromhex(digest)``); the
domain string inside the digest keeps it from being valid for anything else. The listing
lets verification say *which* file was changed, is missing or is extra.

A key's *fingerprint* (:func:`key_fingerprint`) is the first 32 hex digits of the SHA-256
of its 32 raw bytes; hospitals pin the full public key, the fingerprint is for people.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from rapha import crypto
from rapha.crypto import Ed25519PrivateKey, Ed25519PublicKey
from rapha.errors import (
    BundleFileError,
    BundleSignatureError,
    KeyFileError,
    SignatureError,
    UsageError,
)
from rapha.runtime._archive import extract_tar
from rapha.runtime._custom import check_model_source
from rapha.runtime._safetensors import WeightsSpec, read_weights_spec
from rapha.runtime.manifest import (
    MANIFEST_NAME,
    BundleManifest,
    ModelSource,
    TrainLoop,
    load_manifest,
)

__all__ = [
    "DIGEST_DOMAIN",
    "MAX_BUNDLE_BYTES",
    "MAX_BUNDLE_FILES",
    "MODEL_NAME",
    "SIGNATURE_NAME",
    "WEIGHTS_NAME",
    "VerifiedBundle",
    "bundle_digest",
    "key_fingerprint",
    "read_weights_spec",
    "sign_bundle",
    "verify_bundle",
]

DIGEST_DOMAIN: Final = "rapha-bundle-v1"
SIGNATURE_NAME: Final = "bundle.sig"
WEIGHTS_NAME: Final = "weights.safetensors"
MODEL_NAME: Final = "model.py"
MAX_BUNDLE_BYTES: Final = 2 << 30
"""Cap on the total size of a bundle's files (and of any one file)."""
MAX_BUNDLE_FILES: Final = 64
"""Cap on directory entries or archive members looked at before refusing."""
_MAX_SIG_BYTES: Final = 64 * 1024
_SIG_VERSION: Final = 1
_BUNDLE_FILES: Final = frozenset({MANIFEST_NAME, WEIGHTS_NAME, MODEL_NAME})


@dataclass(frozen=True, slots=True)
class VerifiedBundle:
    """A bundle whose signature, files, manifest and weights all checked out.

    ``root`` is the directory the checks ran on: inside ``workdir`` when one was given, so
    later changes to the submitted copy cannot reach it. ``files`` maps each signed file to
    its SHA-256; ``weights`` is the weight spec (name → dtype, shape) outputs must match.
    """

    root: Path
    manifest: BundleManifest
    digest: str
    signer: Ed25519PublicKey
    signer_fingerprint: str
    files: Mapping[str, str]
    weights: WeightsSpec


def key_fingerprint(key: Ed25519PublicKey) -> str:
    """First 32 hex digits of SHA-256 over the key's 32 raw bytes."""
    return crypto.digest_bytes(crypto.public_key_bytes(key))[:32]


def bundle_digest(root: Path) -> str:
    """The digest of the bundle directory ``root`` (every file but ``bundle.sig``)."""
    return _digest(_listing(root))


def sign_bundle(root: Path, key: Ed25519PrivateKey) -> str:
    """Check the bundle in ``root`` as a node would, write ``bundle.sig``, return the digest.

    Refuses (with the error verification would give) a bundle the node would refuse, so a
    company never ships something that cannot run. An existing ``bundle.sig`` is replaced.
    """
    listing = _listing(root)
    _check_contents(root, listing)
    digest = _digest(listing)
    document = {
        "v": _SIG_VERSION,
        "files": [{"path": p, "sha256": h} for p, h in sorted(listing.items())],
        "digest": digest,
        "public_key": crypto.public_key_bytes(key.public_key()).hex(),
        "signature": crypto.sign(key, bytes.fromhex(digest)).hex(),
    }
    (root / SIGNATURE_NAME).write_bytes(crypto.canonical_json(document))
    return digest


def verify_bundle(
    path: Path,
    *,
    trusted_keys: Sequence[Ed25519PublicKey] | None,
    workdir: Path | None = None,
) -> VerifiedBundle:
    """Verify a bundle directory or ``.tar``; return what the node may then use.

    Checks, in order: safe extraction of a ``.tar`` (:class:`UnsafeArchiveError`); plain
    files only, within the caps (:class:`BundleFileError`); ``bundle.sig`` present,
    well-formed, verifying, and from a key in ``trusted_keys``
    (:class:`BundleSignatureError`); every signed file present and unchanged and no file
    extra (:class:`BundleFileError` with kind ``missing`` / ``changed`` / ``extra``);
    ``bundle.toml`` (:class:`ManifestError`); ``weights.safetensors``
    (:class:`WeightsFormatError`); ``model.py`` present exactly for custom models, parsed
    but never run.

    ``trusted_keys=None`` accepts any signer whose signature verifies: for a dry run on the
    company's own machine only; a node always passes the keys its hospital pinned.
    ``workdir`` (required for a ``.tar``) is where the archive is extracted, or a directory
    copied, into a fresh ``bundle`` sub-directory.
    """
    root = _materialise(path, workdir)
    listing = _listing(root)
    signer, signed = _check_signature(root, trusted_keys)
    _compare(listing, signed)
    manifest = _check_contents(root, listing)
    return VerifiedBundle(
        root=root,
        manifest=manifest,
        digest=_digest(listing),
        signer=signer,
        signer_fingerprint=key_fingerprint(signer),
        files=dict(sorted(listing.items())),
        weights=read_weights_spec(root / WEIGHTS_NAME),
    )


# --- steps -------------------------------------------------------------------------------


def _digest(listing: Mapping[str, str]) -> str:
    files = [{"path": p, "sha256": h} for p, h in sorted(listing.items())]
    return crypto.digest_bytes(crypto.canonical_json({"v": DIGEST_DOMAIN, "files": files}))


def _materialise(path: Path, workdir: Path | None) -> Path:
    if path.is_dir():
        if workdir is None:
            return path
        target = _fresh(workdir)
        for name in _plain_files(path):
            shutil.copyfile(path / name, target / name, follow_symlinks=False)
        return target
    if not path.is_file():
        raise BundleFileError(
            f"bundle {path} is neither a directory nor a .tar file", kind="missing", path=str(path)
        )
    if workdir is None:
        raise UsageError("verifying a bundle .tar needs a workdir to extract it into")
    target = _fresh(workdir)
    extract_tar(
        path,
        target,
        max_members=MAX_BUNDLE_FILES,
        max_file_bytes=MAX_BUNDLE_BYTES,
        max_total_bytes=MAX_BUNDLE_BYTES,
    )
    return target


def _fresh(workdir: Path) -> Path:
    target = workdir / "bundle"
    if target.exists():
        raise UsageError(f"{target} already exists; give an empty workdir")
    target.mkdir(parents=True)
    return target


def _plain_files(root: Path) -> list[str]:
    """Names of the files in ``root``; refuse anything but regular files, and the caps."""
    names: list[str] = []
    total = 0
    try:
        with os.scandir(root) as entries:
            for count, entry in enumerate(entries, start=1):
                if count > MAX_BUNDLE_FILES:
                    raise BundleFileError(
                        f"bundle holds more than {MAX_BUNDLE_FILES} entries",
                        kind="extra",
                        path=entry.name,
                    )
                st = entry.stat(follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):
                    what = "a directory" if stat.S_ISDIR(st.st_mode) else "a link or special file"
                    raise BundleFileError(
                        f"bundle entry {entry.name} is {what}; a bundle holds plain files only",
                        kind="not-a-file",
                        path=entry.name,
                    )
                total += st.st_size
                if total > MAX_BUNDLE_BYTES:
                    raise BundleFileError(
                        f"bundle is larger than {MAX_BUNDLE_BYTES} bytes",
                        kind="too-large",
                        path=entry.name,
                    )
                names.append(entry.name)
    except OSError as exc:
        raise BundleFileError(
            f"cannot read bundle directory {root}: {exc.strerror}", kind="missing", path="."
        ) from exc
    return sorted(names)


def _listing(root: Path) -> dict[str, str]:
    return {
        name: crypto.digest_file(root / name)
        for name in _plain_files(root)
        if name != SIGNATURE_NAME
    }


def _check_signature(
    root: Path, trusted_keys: Sequence[Ed25519PublicKey] | None
) -> tuple[Ed25519PublicKey, dict[str, str]]:
    sig_path = root / SIGNATURE_NAME
    if not sig_path.is_file():
        raise BundleSignatureError(
            f"the bundle is not signed ({SIGNATURE_NAME} is missing); "
            "sign it with `rapha job sign DIR --key KEY`"
        )
    raw = sig_path.read_bytes()
    document = _parse_signature(raw)
    signed = {f["path"]: f["sha256"] for f in document["files"]}
    if _digest(signed) != document["digest"]:
        raise BundleSignatureError(
            f"{SIGNATURE_NAME} was altered: its file listing does not match its digest"
        )
    try:
        signer = crypto.public_key_from_bytes(bytes.fromhex(document["public_key"]))
        crypto.verify(
            signer, bytes.fromhex(document["signature"]), bytes.fromhex(document["digest"])
        )
    except (KeyFileError, SignatureError, ValueError) as exc:
        raise BundleSignatureError(
            f"{SIGNATURE_NAME} does not verify: the bundle or its signature was changed; "
            "sign the bundle again"
        ) from exc
    if trusted_keys is not None:
        raw_signer = crypto.public_key_bytes(signer)
        if all(crypto.public_key_bytes(k) != raw_signer for k in trusted_keys):
            raise BundleSignatureError(
                f"the bundle is signed by key {key_fingerprint(signer)}, which is not among "
                "the trusted company keys; ask the hospital to pin it, or sign with a pinned key"
            )
    return signer, signed


def _parse_signature(raw: bytes) -> dict[str, Any]:
    bad = BundleSignatureError(
        f"{SIGNATURE_NAME} is malformed; sign the bundle again with `rapha job sign`"
    )
    if len(raw) > _MAX_SIG_BYTES:
        raise bad
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise bad from exc
    if not isinstance(document, dict) or document.get("v") != _SIG_VERSION:
        raise bad
    if set(document) != {"v", "files", "digest", "public_key", "signature"}:
        raise bad
    files = document["files"]
    if not isinstance(files, list) or not all(
        isinstance(f, dict)
        and set(f) == {"path", "sha256"}
        and isinstance(f["path"], str)
        and isinstance(f["sha256"], str)
        for f in files
    ):
        raise bad
    if len({f["path"] for f in files}) != len(files) or not all(
        isinstance(document[k], str) for k in ("digest", "public_key", "signature")
    ):
        raise bad
    return document


def _compare(actual: Mapping[str, str], signed: Mapping[str, str]) -> None:
    missing = sorted(set(signed) - set(actual))
    changed = sorted(p for p in set(signed) & set(actual) if signed[p] != actual[p])
    extra = sorted(set(actual) - set(signed))
    for kind, paths, what in (
        ("missing", missing, "is missing (it was signed)"),
        ("changed", changed, "was changed after signing"),
        ("extra", extra, "was added after signing"),
    ):
        if paths:
            raise BundleFileError(
                f"bundle file {', '.join(paths)} {what}; rebuild the bundle or sign it again",
                kind=kind,
                path=paths[0],
            )


def _check_contents(root: Path, listing: Mapping[str, str]) -> BundleManifest:
    """The rules about which files a bundle holds, its manifest, weights and model code."""
    extras = sorted(set(listing) - _BUNDLE_FILES)
    if extras:
        raise BundleFileError(
            f"{', '.join(extras)} is not a bundle file; a bundle holds only {MANIFEST_NAME}, "
            f"{WEIGHTS_NAME}, {MODEL_NAME} (custom models) and {SIGNATURE_NAME}",
            kind="extra",
            path=extras[0],
        )
    for required in (MANIFEST_NAME, WEIGHTS_NAME):
        if required not in listing:
            raise BundleFileError(
                f"the bundle has no {required}; every bundle needs one",
                kind="missing",
                path=required,
            )
    manifest = load_manifest(root / MANIFEST_NAME)
    custom = manifest.model.source is ModelSource.CUSTOM
    if custom and MODEL_NAME not in listing:
        raise BundleFileError(
            f'model.source = "custom" but the bundle has no {MODEL_NAME}',
            kind="missing",
            path=MODEL_NAME,
        )
    if not custom and MODEL_NAME in listing:
        raise BundleFileError(
            f'{MODEL_NAME} is only allowed with model.source = "custom"; remove it for a zoo model',
            kind="extra",
            path=MODEL_NAME,
        )
    read_weights_spec(root / WEIGHTS_NAME)
    if custom:
        loop = manifest.train.loop if manifest.train is not None else None
        check_model_source(root / MODEL_NAME, needs_train=loop is TrainLoop.CUSTOM)
    return manifest
