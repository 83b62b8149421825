"""rapha.runtime.bundle: digest, signing, verification, weights and safe tar extraction."""

from __future__ import annotations

import io
import json
import struct
import tarfile
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from rapha import crypto
from rapha.crypto import Ed25519PrivateKey
from rapha.errors import (
    BundleError,
    BundleFileError,
    BundleSignatureError,
    ExitCode,
    ManifestError,
    SandboxError,
    SignatureError,
    UnsafeArchiveError,
    UsageError,
    WeightsFormatError,
)
from rapha.runtime.bundle import (
    DIGEST_DOMAIN,
    MAX_BUNDLE_FILES,
    bundle_digest,
    key_fingerprint,
    read_weights_spec,
    sign_bundle,
    verify_bundle,
)

ZOO_TOML = """
[bundle]
name = "test-bundle"
version = "0.1.0"
kind = "evaluate"
[model]
source = "zoo"
name = "rapha.SmallCNN"
[input]
size = [32, 32]
[labels]
names = ["effusion"]
"""

CUSTOM_TOML = """
[bundle]
name = "custom-bundle"
version = "0.1.0"
kind = "train"
[model]
source = "custom"
[input]
size = [32, 32]
[labels]
names = ["effusion"]
[train]
loop = "custom"
"""

MODEL_PY = (
    "def build_model(spec):\n    raise NotImplementedError\n\n\ndef train(m, d, h, c):\n    pass\n"
)


def _weights(path: Path) -> None:
    save_file(
        {
            "head.weight": np.zeros((1, 8), dtype=np.float32),
            "head.bias": np.zeros((1,), dtype=np.float32),
            "steps": np.zeros((), dtype=np.int64),
        },
        str(path),
    )


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return crypto.generate_private_key()


@pytest.fixture
def zoo_bundle(tmp_path: Path) -> Path:
    root = tmp_path / "zoo"
    root.mkdir()
    (root / "bundle.toml").write_text(ZOO_TOML, encoding="utf-8")
    _weights(root / "weights.safetensors")
    return root


@pytest.fixture
def signed(zoo_bundle: Path, key: Ed25519PrivateKey) -> Path:
    sign_bundle(zoo_bundle, key)
    return zoo_bundle


def _force_sign(root: Path, key: Ed25519PrivateKey) -> None:
    """Sign whatever is in ``root`` without the checks sign_bundle makes (a hostile signer)."""
    files = sorted(
        ({"path": p.name, "sha256": crypto.digest_file(p)} for p in root.iterdir()),
        key=lambda f: f["path"],
    )
    files = [f for f in files if f["path"] != "bundle.sig"]
    digest = crypto.digest_bytes(crypto.canonical_json({"v": DIGEST_DOMAIN, "files": files}))
    doc = {
        "v": 1,
        "files": files,
        "digest": digest,
        "public_key": crypto.public_key_bytes(key.public_key()).hex(),
        "signature": key.sign(bytes.fromhex(digest)).hex(),
    }
    (root / "bundle.sig").write_bytes(crypto.canonical_json(doc))


# --- sign and verify ---------------------------------------------------------------------


def test_sign_then_verify_returns_the_bundle(signed: Path, key: Ed25519PrivateKey) -> None:
    verified = verify_bundle(signed, trusted_keys=[key.public_key()])

    assert verified.root == signed
    assert verified.digest == bundle_digest(signed)
    assert verified.manifest.bundle.name == "test-bundle"
    assert verified.signer_fingerprint == key_fingerprint(key.public_key())
    assert set(verified.files) == {"bundle.toml", "weights.safetensors"}
    assert verified.weights["head.weight"] == ("F32", (1, 8))


def test_verify_with_workdir_checks_a_private_copy(
    signed: Path, key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    verified = verify_bundle(signed, trusted_keys=[key.public_key()], workdir=tmp_path / "w")

    assert verified.root == tmp_path / "w" / "bundle"
    assert sorted(p.name for p in verified.root.iterdir()) == [
        "bundle.sig",
        "bundle.toml",
        "weights.safetensors",
    ]


def test_signature_is_over_the_raw_digest_bytes(signed: Path, key: Ed25519PrivateKey) -> None:
    doc = json.loads((signed / "bundle.sig").read_bytes())

    crypto.verify(key.public_key(), bytes.fromhex(doc["signature"]), bytes.fromhex(doc["digest"]))
    assert doc["digest"] == bundle_digest(signed)


def test_digest_depends_on_names_and_contents(zoo_bundle: Path) -> None:
    before = bundle_digest(zoo_bundle)
    (zoo_bundle / "bundle.sig").write_text("ignored", encoding="utf-8")
    same = bundle_digest(zoo_bundle)
    (zoo_bundle / "bundle.toml").write_text(ZOO_TOML + "\n", encoding="utf-8")

    assert same == before
    assert bundle_digest(zoo_bundle) != before


@pytest.mark.parametrize(
    ("change", "kind", "path"),
    [
        (lambda r: (r / "bundle.toml").write_text(ZOO_TOML + "# x\n"), "changed", "bundle.toml"),
        (lambda r: (r / "weights.safetensors").unlink(), "missing", "weights.safetensors"),
        (lambda r: (r / "notes.txt").write_text("hi"), "extra", "notes.txt"),
        (lambda r: (r / "sub").mkdir(), "not-a-file", "sub"),
        (lambda r: (r / "link").symlink_to(r / "bundle.toml"), "not-a-file", "link"),
    ],
)
def test_file_changes_are_bundle_file_errors_of_their_kind(
    signed: Path,
    key: Ed25519PrivateKey,
    change: Callable[[Path], object],
    kind: str,
    path: str,
) -> None:
    change(signed)

    with pytest.raises(BundleFileError) as info:
        verify_bundle(signed, trusted_keys=[key.public_key()])

    assert (info.value.kind, info.value.path) == (kind, path)
    assert path in str(info.value)
    assert info.value.exit_code == ExitCode.INTEGRITY


def _edit_sig(root: Path, **changes: object) -> None:
    doc = json.loads((root / "bundle.sig").read_bytes())
    doc.update(changes)
    (root / "bundle.sig").write_bytes(json.dumps(doc).encode())


def test_a_tampered_signature_is_refused(signed: Path, key: Ed25519PrivateKey) -> None:
    doc = json.loads((signed / "bundle.sig").read_bytes())
    _edit_sig(
        signed, signature=("00" if doc["signature"][:2] != "00" else "11") + doc["signature"][2:]
    )

    with pytest.raises(BundleSignatureError, match="does not verify"):
        verify_bundle(signed, trusted_keys=[key.public_key()])


def test_a_signature_listing_edited_to_match_changed_files_is_refused(
    signed: Path, key: Ed25519PrivateKey
) -> None:
    (signed / "bundle.toml").write_text(ZOO_TOML + "# x\n", encoding="utf-8")
    _edit_sig(
        signed,
        files=[
            {"path": "bundle.toml", "sha256": crypto.digest_file(signed / "bundle.toml")},
            {
                "path": "weights.safetensors",
                "sha256": crypto.digest_file(signed / "weights.safetensors"),
            },
        ],
    )

    with pytest.raises(BundleSignatureError, match="altered"):
        verify_bundle(signed, trusted_keys=[key.public_key()])


def test_a_signature_with_another_public_key_is_refused(
    signed: Path, key: Ed25519PrivateKey
) -> None:
    other = crypto.generate_private_key().public_key()
    _edit_sig(signed, public_key=crypto.public_key_bytes(other).hex())

    with pytest.raises(BundleSignatureError, match="does not verify"):
        verify_bundle(signed, trusted_keys=[other, key.public_key()])


def test_an_untrusted_signer_is_refused_but_passes_a_dry_run(
    signed: Path, key: Ed25519PrivateKey
) -> None:
    pinned = crypto.generate_private_key().public_key()

    with pytest.raises(BundleSignatureError, match="not among the trusted") as info:
        verify_bundle(signed, trusted_keys=[pinned])

    assert key_fingerprint(key.public_key()) in str(info.value)
    assert isinstance(info.value, SignatureError)
    assert isinstance(info.value, BundleError)
    assert verify_bundle(signed, trusted_keys=None).signer_fingerprint == key_fingerprint(
        key.public_key()
    )


@pytest.mark.parametrize("content", [None, b"", b"not json", b'{"v": 2}', b"[1]"])
def test_a_missing_or_malformed_signature_is_refused(
    signed: Path, key: Ed25519PrivateKey, content: bytes | None
) -> None:
    if content is None:
        (signed / "bundle.sig").unlink()
    else:
        (signed / "bundle.sig").write_bytes(content)

    with pytest.raises(
        BundleSignatureError, match="not signed" if content is None else "malformed"
    ):
        verify_bundle(signed, trusted_keys=[key.public_key()])


# --- contents ----------------------------------------------------------------------------


def test_a_signed_bad_manifest_is_a_manifest_error(
    zoo_bundle: Path, key: Ed25519PrivateKey
) -> None:
    (zoo_bundle / "bundle.toml").write_text(ZOO_TOML.replace("[32, 32]", "[32]"), encoding="utf-8")
    _force_sign(zoo_bundle, key)

    with pytest.raises(ManifestError, match=r"input\.size"):
        verify_bundle(zoo_bundle, trusted_keys=[key.public_key()])
    with pytest.raises(ManifestError):
        sign_bundle(zoo_bundle, key)


def test_signing_refuses_what_a_node_would_refuse(zoo_bundle: Path, key: Ed25519PrivateKey) -> None:
    (zoo_bundle / "model.py").write_text(MODEL_PY, encoding="utf-8")

    with pytest.raises(BundleFileError, match="only allowed") as info:
        sign_bundle(zoo_bundle, key)

    assert info.value.kind == "extra"
    assert not (zoo_bundle / "bundle.sig").exists()


@pytest.fixture
def custom_bundle(tmp_path: Path) -> Path:
    root = tmp_path / "custom"
    root.mkdir()
    (root / "bundle.toml").write_text(CUSTOM_TOML, encoding="utf-8")
    (root / "model.py").write_text(MODEL_PY, encoding="utf-8")
    _weights(root / "weights.safetensors")
    return root


def test_a_custom_bundle_verifies_without_running_model_py(
    custom_bundle: Path, key: Ed25519PrivateKey
) -> None:
    sign_bundle(custom_bundle, key)

    verified = verify_bundle(custom_bundle, trusted_keys=[key.public_key()])

    assert set(verified.files) == {"bundle.toml", "model.py", "weights.safetensors"}


@pytest.mark.parametrize(
    ("source", "error", "match"),
    [
        (None, BundleFileError, "no model.py"),
        ("def train(m, d, h, c):\n    pass\n", ManifestError, "build_model"),
        ("def build_model(spec):\n    pass\n", ManifestError, "train"),
        ("def build_model(:\n", BundleFileError, "not valid"),
    ],
)
def test_custom_model_code_is_checked(
    custom_bundle: Path,
    key: Ed25519PrivateKey,
    source: str | None,
    error: type[Exception],
    match: str,
) -> None:
    if source is None:
        (custom_bundle / "model.py").unlink()
    else:
        (custom_bundle / "model.py").write_text(source, encoding="utf-8")
    _force_sign(custom_bundle, key)

    with pytest.raises(error, match=match):
        verify_bundle(custom_bundle, trusted_keys=[key.public_key()])


# --- weights -----------------------------------------------------------------------------


def _safetensors(header: dict[str, object], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _torch_pickle(path: Path) -> None:
    import torch

    torch.save({"w": torch.zeros(2)}, path)


def _truncated(path: Path) -> None:
    _weights(path)
    path.write_bytes(path.read_bytes()[:-3])


def _trailing(path: Path) -> None:
    _weights(path)
    path.write_bytes(path.read_bytes() + b"x")


WEIGHTS_CASES: dict[str, Callable[[Path], object]] = {
    "random-bytes": lambda p: p.write_bytes(np.random.default_rng(0).bytes(256)),
    "too-short": lambda p: p.write_bytes(b"\x01\x02"),
    "torch-pickle": _torch_pickle,
    "truncated": _truncated,
    "trailing-garbage": _trailing,
    "offsets-past-end": lambda p: p.write_bytes(
        _safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)
    ),
    "overlapping": lambda p: p.write_bytes(
        _safetensors(
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
        )
    ),
    "shape-mismatch": lambda p: p.write_bytes(
        _safetensors({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8)
    ),
    "unknown-dtype": lambda p: p.write_bytes(
        _safetensors({"w": {"dtype": "OBJ", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8)
    ),
    "header-not-object": lambda p: p.write_bytes(struct.pack("<Q", 2) + b"[]"),
}


@pytest.mark.parametrize("make", WEIGHTS_CASES.values(), ids=WEIGHTS_CASES.keys())
def test_weights_that_are_not_safetensors_are_refused(
    tmp_path: Path, make: Callable[[Path], object]
) -> None:
    path = tmp_path / "weights.safetensors"
    make(path)

    with pytest.raises(WeightsFormatError):
        read_weights_spec(path)


def test_signed_bad_weights_are_refused_by_verify(zoo_bundle: Path, key: Ed25519PrivateKey) -> None:
    _torch_pickle(zoo_bundle / "weights.safetensors")
    _force_sign(zoo_bundle, key)

    with pytest.raises(WeightsFormatError, match="not a safetensors file"):
        verify_bundle(zoo_bundle, trusted_keys=[key.public_key()])


def test_read_weights_spec_reads_names_dtypes_and_shapes(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    _weights(path)

    assert read_weights_spec(path) == {
        "head.weight": ("F32", (1, 8)),
        "head.bias": ("F32", (1,)),
        "steps": ("I64", ()),
    }


# --- tar ---------------------------------------------------------------------------------


def _tar(path: Path, members: Sequence[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


@pytest.mark.parametrize("prefix", ["", "./", "mybundle/"])
def test_a_signed_tar_verifies(
    signed: Path, key: Ed25519PrivateKey, tmp_path: Path, prefix: str
) -> None:
    members: list[tuple[tarfile.TarInfo, bytes | None]] = [
        _file(prefix + p.name, p.read_bytes()) for p in sorted(signed.iterdir())
    ]
    if prefix:
        members.insert(0, _special(prefix.rstrip("/"), tarfile.DIRTYPE))
    archive = _tar(tmp_path / "b.tar", members)

    verified = verify_bundle(archive, trusted_keys=[key.public_key()], workdir=tmp_path / "w")

    assert verified.digest == bundle_digest(signed)
    assert verified.root == tmp_path / "w" / "bundle"


def test_a_tar_needs_a_workdir(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "b.tar", [_file("bundle.toml", b"")])

    with pytest.raises(UsageError, match="workdir"):
        verify_bundle(archive, trusted_keys=None)


def _oversized(path: Path) -> Path:
    info = tarfile.TarInfo("weights.safetensors")
    info.size = 3 << 30  # declared only: no data follows, the header alone must be refused
    path.write_bytes(info.tobuf(format=tarfile.PAX_FORMAT))
    return path


TAR_CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "dot-dot": (lambda p: _tar(p, [_file("../evil.py", b"x")]), "'..'"),
    "absolute": (lambda p: _tar(p, [_file("/etc/evil", b"x")]), "absolute"),
    "symlink": (lambda p: _tar(p, [_special("model.py", tarfile.SYMTYPE, "/etc/passwd")]), "link"),
    "hardlink": (lambda p: _tar(p, [_special("model.py", tarfile.LNKTYPE, "bundle.toml")]), "link"),
    "device": (lambda p: _tar(p, [_special("dev", tarfile.CHRTYPE)]), "device"),
    "fifo": (lambda p: _tar(p, [_special("fifo", tarfile.FIFOTYPE)]), "FIFO"),
    "too-many": (
        lambda p: _tar(p, [_file(f"f{i}", b"") for i in range(MAX_BUNDLE_FILES + 1)]),
        "more than",
    ),
    "oversized": (_oversized, "declares"),
    "nested": (lambda p: _tar(p, [_file("a/b/bundle.toml", b"x")]), "sub-directories"),
    "two-roots": (lambda p: _tar(p, [_file("a/x", b"x"), _file("b/y", b"y")]), "sub-directories"),
    "duplicate": (lambda p: _tar(p, [_file("x", b"1"), _file("./x", b"2")]), "more than once"),
    "not-a-tar": (lambda p: (p.write_bytes(b"\x00garbage" * 200), p)[1], "not a readable tar"),
}


@pytest.mark.parametrize(("make", "match"), TAR_CASES.values(), ids=TAR_CASES.keys())
def test_unsafe_archives_are_refused(
    tmp_path: Path, make: Callable[[Path], Path], match: str
) -> None:
    archive = make(tmp_path / "b.tar")
    workdir = tmp_path / "w"

    with pytest.raises(UnsafeArchiveError, match=match):
        verify_bundle(archive, trusted_keys=None, workdir=workdir)

    assert not (tmp_path / "evil.py").exists()
    assert list((workdir / "bundle").iterdir()) == []


# --- custom code (what the in-sandbox harness calls) -------------------------------------


@pytest.mark.parametrize(
    ("source", "match"),
    [
        ("raise RuntimeError('secret text')\n", "raised RuntimeError while being imported"),
        ("def build_model(spec):\n    return 42\n", "not a torch.nn.Module"),
        ("def build_model(spec):\n    raise KeyError(spec)\n", "build_model raised KeyError"),
        ("build_model = None\n", "no callable build_model"),
    ],
)
def test_custom_code_failures_are_sandbox_errors(tmp_path: Path, source: str, match: str) -> None:
    from rapha.runtime._custom import build_custom_model, load_custom_module
    from rapha.runtime.manifest import parse_manifest

    path = tmp_path / "model.py"
    path.write_text(source, encoding="utf-8")
    manifest = parse_manifest(CUSTOM_TOML)

    with pytest.raises(SandboxError, match=match) as info:
        build_custom_model(load_custom_module(path), manifest)

    assert "secret text" not in str(info.value)


def test_the_custom_template_builds_a_module(tmp_path: Path) -> None:
    import torch

    from rapha.runtime._custom import build_custom_model, load_custom_module
    from rapha.runtime.manifest import parse_manifest

    template = resources.files("rapha.runtime").joinpath("templates", "custom", "model.py")
    with resources.as_file(template) as path:
        model = build_custom_model(load_custom_module(path), parse_manifest(CUSTOM_TOML))

    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 1)
