"""``rapha job init`` and ``rapha job sign``: a scaffold a node accepts once signed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rapha import crypto
from rapha.cli import app
from rapha.errors import ExitCode
from rapha.runtime.bundle import key_fingerprint, read_weights_spec, verify_bundle

runner = CliRunner()


def _flat(output: str) -> str:
    """The output with Rich's line wrapping undone."""
    return " ".join(output.split())


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "company.key"
    crypto.save_private_key(crypto.generate_private_key(), path)
    return path


@pytest.mark.parametrize(
    ("args", "files"),
    [
        (
            ["--zoo", "rapha.SmallCNN", "--labels", "effusion,edema"],
            ["bundle.toml", "weights.safetensors"],
        ),
        (["--custom", "--size", "32"], ["bundle.toml", "model.py", "weights.safetensors"]),
        (
            ["--zoo", "rapha.SmallCNN", "--kind", "evaluate", "--channels", "3"],
            ["bundle.toml", "weights.safetensors"],
        ),
    ],
    ids=["zoo-train", "custom-train", "zoo-evaluate"],
)
def test_init_then_sign_gives_a_bundle_that_verifies(
    tmp_path: Path, key_file: Path, args: list[str], files: list[str]
) -> None:
    bundle = tmp_path / "my-bundle"

    init = runner.invoke(app, ["job", "init", str(bundle), *args, "--json"])
    signed = runner.invoke(app, ["job", "sign", str(bundle), "--key", str(key_file), "--json"])

    assert init.exit_code == 0, init.output
    assert json.loads(init.output)["files"] == files
    assert signed.exit_code == 0, signed.output
    result = json.loads(signed.output)
    key = crypto.load_private_key(key_file).public_key()
    verified = verify_bundle(bundle, trusted_keys=[key])
    assert result["digest"] == verified.digest
    assert result["fingerprint"] == key_fingerprint(key)
    assert verified.manifest.bundle.name == "my-bundle"
    assert read_weights_spec(bundle / "weights.safetensors")


def test_init_prints_next_steps_and_sign_prints_digest(tmp_path: Path, key_file: Path) -> None:
    bundle = tmp_path / "b"

    init = runner.invoke(app, ["job", "init", str(bundle), "--zoo", "rapha.SmallCNN"])
    signed = runner.invoke(app, ["job", "sign", str(bundle), "--key", str(key_file)])

    assert init.exit_code == 0, init.output
    assert "rapha job sign" in init.output
    assert "dry-run" in init.output
    assert signed.exit_code == 0, signed.output
    assert verify_bundle(bundle, trusted_keys=None).digest in signed.output


def test_init_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine", encoding="utf-8")

    result = runner.invoke(app, ["job", "init", str(tmp_path), "--zoo", "rapha.SmallCNN"])

    assert result.exit_code == ExitCode.CONFIG
    assert "not empty" in _flat(result.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_init_refuses_an_invalid_choice_before_writing(tmp_path: Path) -> None:
    bundle = tmp_path / "b"

    result = runner.invoke(app, ["job", "init", str(bundle), "--size", "16"])

    assert result.exit_code == ExitCode.INTEGRITY
    assert "input.size" in _flat(result.output)
    assert "Traceback" not in result.output
    assert not bundle.exists()


def test_sign_refuses_a_bundle_a_node_would_refuse(tmp_path: Path, key_file: Path) -> None:
    bundle = tmp_path / "b"
    runner.invoke(app, ["job", "init", str(bundle), "--zoo", "rapha.SmallCNN"])
    (bundle / "notes.txt").write_text("x", encoding="utf-8")

    result = runner.invoke(app, ["job", "sign", str(bundle), "--key", str(key_file)])

    assert result.exit_code == ExitCode.INTEGRITY
    assert "notes.txt" in _flat(result.output)
    assert not (bundle / "bundle.sig").exists()


def test_weights_rebuilds_the_initial_weights_after_the_model_changed(tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    runner.invoke(app, ["job", "init", str(bundle), "--zoo", "rapha.SmallCNN", "--size", "32"])
    before = read_weights_spec(bundle / "weights.safetensors")
    manifest = bundle / "bundle.toml"
    manifest.write_text(manifest.read_text().replace("kwargs = {}", "kwargs = { width = 8 }"))

    result = runner.invoke(app, ["job", "weights", str(bundle)])

    assert result.exit_code == 0, result.output
    after = read_weights_spec(bundle / "weights.safetensors")
    assert set(after) == set(before)
    assert after != before  # narrower convolutions
    assert "sign the bundle again" in " ".join(result.output.split())
