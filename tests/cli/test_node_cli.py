"""``rapha node init`` and ``rapha node audit verify``: files, modes, refusals, exit codes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rapha import crypto
from rapha.audit import verify_log
from rapha.cli import app
from rapha.dataset import verify_view
from rapha.errors import ExitCode
from rapha.node.optout import load_opt_out
from rapha.node.settings import DicomWebSource, FolderSource, load_node_settings
from rapha.runtime.policy import default_policy_text, evaluate_admission

runner = CliRunner()

KEYS = ("keys/hmac.key", "keys/split.key", "keys/node.key")


@pytest.fixture
def node_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "node"
    result = runner.invoke(app, ["node", "init", "--dir", str(directory), "--name", "test-node"])
    assert result.exit_code == 0, result.output
    return directory


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


# --- init --------------------------------------------------------------------------------


def test_init_writes_keys_0600_and_private_directories(node_dir: Path) -> None:
    for rel in (*KEYS, "opt-out.txt"):
        assert _mode(node_dir / rel) == 0o600, rel
    assert _mode(node_dir / "keys") == 0o700
    assert _mode(node_dir / "state") == 0o700
    assert len(crypto.load_secret(node_dir / "keys/hmac.key", length=32)) == 32
    assert crypto.load_secret(node_dir / "keys/hmac.key", length=32) != crypto.load_secret(
        node_dir / "keys/split.key", length=32
    )
    key = crypto.load_private_key(node_dir / "keys/node.key")
    pub = crypto.load_public_key(node_dir / "keys/node.key.pub")
    assert crypto.public_key_bytes(pub) == crypto.public_key_bytes(key.public_key())


def test_init_config_loads_into_node_settings(node_dir: Path) -> None:
    settings = load_node_settings(node_dir / "node.toml", env={})

    scope = settings.scope.to_scope()
    assert settings.name == "test-node"
    assert isinstance(settings.source, FolderSource)
    assert scope.modalities == frozenset({"DX", "CR"})
    assert scope.body_parts == frozenset({"CHEST"})
    assert scope.max_studies == 1000
    assert scope.date_from < scope.date_to
    assert settings.ocr_modalities() == frozenset({"DX", "CR"})
    assert settings.keys.load().hmac_key == (node_dir / "keys/hmac.key").read_bytes()
    assert len(load_opt_out(settings.opt_out)) == 0
    assert settings.audit_log == node_dir.resolve() / "state/audit.jsonl"


def test_init_explains_every_key_in_comments(node_dir: Path) -> None:
    lines = (node_dir / "node.toml").read_text().splitlines()

    unexplained = [
        line
        for i, line in enumerate(lines)
        if "=" in line
        and not line.lstrip().startswith("#")
        and "#" not in line
        and not lines[i - 1].lstrip().startswith(("#", "["))
    ]
    assert unexplained == []


def test_init_starts_an_audit_log_that_verifies(node_dir: Path) -> None:
    pub = crypto.load_public_key(node_dir / "keys/node.key.pub")

    verdict = verify_log(node_dir / "state/audit.jsonl", pub)

    events = [
        json.loads(line)["event"]
        for line in (node_dir / "state/audit.jsonl").read_text().splitlines()
    ]
    assert verdict.entries == 2
    assert events == ["audit.genesis", "node.init"]


def test_init_says_what_to_do_next(tmp_path: Path) -> None:
    result = runner.invoke(app, ["node", "init", "--dir", str(tmp_path / "n")])

    assert result.exit_code == 0, result.output
    assert "Next" in result.output
    assert "rapha node audit verify --config" in result.output


def test_init_with_a_dicomweb_url_writes_a_dicomweb_source(tmp_path: Path) -> None:
    directory = tmp_path / "n"

    result = runner.invoke(
        app, ["node", "init", "--dir", str(directory), "--source", "http://127.0.0.1:8042/dw"]
    )

    assert result.exit_code == 0, result.output
    source = load_node_settings(directory / "node.toml", env={}).source
    assert isinstance(source, DicomWebSource)
    assert source.url == "http://127.0.0.1:8042/dw"


def test_init_with_a_relative_folder_writes_an_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    result = runner.invoke(app, ["node", "init", "--dir", "n", "--source", "archive/dicom"])

    assert result.exit_code == 0, result.output
    source = load_node_settings(tmp_path / "n/node.toml", env={}).source
    assert source == FolderSource(kind="folder", path=tmp_path / "archive/dicom")


def test_init_writes_the_default_policies_and_points_the_config_at_them(node_dir: Path) -> None:
    settings = load_node_settings(node_dir / "node.toml", env={})

    assert settings.policy.admission == node_dir.resolve() / "policies/admission.rego"
    assert settings.policy.output == node_dir.resolve() / "policies/output.rego"
    assert settings.policy.admission.read_text() == default_policy_text("admission")
    assert settings.policy.output.read_text() == default_policy_text("output")
    assert _mode(node_dir / "policies") == 0o700
    assert settings.policy.k_anonymity == 10
    assert settings.policy.max_output_bytes == 512 << 20
    assert settings.policy.evaluation_quota == 20


def test_the_policies_init_writes_admit_a_plain_training_job(node_dir: Path) -> None:
    settings = load_node_settings(node_dir / "node.toml", env={})
    facts = {
        "bundle": {
            "kind": "train",
            "model": {"source": "zoo"},
            "hparams": {"epochs": 3, "batch_size": 16},
            "outputs": ["weights.safetensors"],
            "dp": None,
        },
        "signer": {"fingerprint": "00" * 32, "pinned": True},
        "job": {"id": "job-1"},
        "hospital": settings.policy.policy_input(),
    }

    decision = evaluate_admission(settings.policy.admission, facts)

    assert decision.allowed, decision.reasons


def test_init_force_keeps_a_policy_the_hospital_edited(node_dir: Path) -> None:
    edited = default_policy_text("output") + "\n# tightened by the DPO\n"
    (node_dir / "policies/output.rego").write_text(edited)
    (node_dir / "policies/admission.rego").unlink()

    result = runner.invoke(app, ["node", "init", "--dir", str(node_dir), "--force"])

    assert result.exit_code == 0, result.output
    assert (node_dir / "policies/output.rego").read_text() == edited
    assert (node_dir / "policies/admission.rego").read_text() == default_policy_text("admission")


def test_init_refuses_to_clobber_a_node(node_dir: Path) -> None:
    before = {rel: (node_dir / rel).read_bytes() for rel in (*KEYS, "node.toml")}

    result = runner.invoke(app, ["node", "init", "--dir", str(node_dir)])

    assert result.exit_code == ExitCode.KEY_FILE
    assert "refusing to overwrite" in result.output
    assert "Traceback" not in result.output
    assert {rel: (node_dir / rel).read_bytes() for rel in before} == before


def test_init_force_rewrites_the_config_and_keeps_keys(node_dir: Path) -> None:
    keys_before = {rel: (node_dir / rel).read_bytes() for rel in KEYS}
    (node_dir / "node.toml").write_text("broken = [")
    (node_dir / "keys/node.key.pub").unlink()

    result = runner.invoke(app, ["node", "init", "--dir", str(node_dir), "--force"])

    assert result.exit_code == 0, result.output
    assert {rel: (node_dir / rel).read_bytes() for rel in KEYS} == keys_before
    assert load_node_settings(node_dir / "node.toml", env={}).name == "rapha-node"
    pub = crypto.load_public_key(node_dir / "keys/node.key.pub")
    assert verify_log(node_dir / "state/audit.jsonl", pub).entries == 3


def test_init_force_refuses_an_audit_log_whose_key_is_gone(node_dir: Path) -> None:
    (node_dir / "keys/node.key").unlink()

    result = runner.invoke(app, ["node", "init", "--dir", str(node_dir), "--force"])

    assert result.exit_code == ExitCode.KEY_FILE
    assert not (node_dir / "keys/node.key").exists()


# --- audit verify ------------------------------------------------------------------------


def test_audit_verify_with_the_config(node_dir: Path) -> None:
    result = runner.invoke(
        app, ["node", "audit", "verify", "--config", str(node_dir / "node.toml")]
    )

    assert result.exit_code == 0, result.output
    assert "verifies" in result.output
    assert "entries: 2" in result.output


def test_audit_verify_json_with_log_and_public_key(node_dir: Path) -> None:
    log = node_dir / "state/audit.jsonl"
    pub = node_dir / "keys/node.key.pub"

    result = runner.invoke(
        app, ["node", "audit", "verify", "--log", str(log), "--public-key", str(pub), "--json"]
    )

    assert result.exit_code == 0, result.output
    verdict = json.loads(result.stdout)
    assert verdict["ok"] is True
    assert verdict["entries"] == 2
    assert verdict["head"] == verify_log(log, crypto.load_public_key(pub)).head


def test_audit_verify_exits_4_on_a_tampered_line(node_dir: Path) -> None:
    log = node_dir / "state/audit.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"node.init"', b'"node.tidy"')
    log.write_bytes(b"".join(lines))

    plain = runner.invoke(app, ["node", "audit", "verify", "--config", str(node_dir / "node.toml")])
    as_json = runner.invoke(
        app, ["node", "audit", "verify", "--config", str(node_dir / "node.toml"), "--json"]
    )

    assert plain.exit_code == ExitCode.INTEGRITY
    assert "line 2" in plain.output
    assert "Traceback" not in plain.output
    assert as_json.exit_code == ExitCode.INTEGRITY
    assert json.loads(as_json.stdout)["ok"] is False
    assert "line 2" in json.loads(as_json.stdout)["error"]


def test_audit_verify_exits_4_on_a_removed_tail_against_its_anchor(node_dir: Path) -> None:
    log = node_dir / "state/audit.jsonl"
    pub = crypto.load_public_key(node_dir / "keys/node.key.pub")
    anchor = verify_log(log, pub)
    log.write_bytes(log.read_bytes().splitlines(keepends=True)[0])
    config = str(node_dir / "node.toml")

    unanchored = runner.invoke(app, ["node", "audit", "verify", "--config", config])
    anchored = runner.invoke(
        app,
        ["node", "audit", "verify", "--config", config, "--head", anchor.head, "--count", "2"],
    )

    assert unanchored.exit_code == 0
    assert anchored.exit_code == ExitCode.INTEGRITY
    assert "removed" in anchored.output


def test_audit_verify_exits_4_under_another_public_key(node_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.pub"
    crypto.save_public_key(crypto.generate_private_key().public_key(), other)
    log = node_dir / "state/audit.jsonl"

    result = runner.invoke(
        app, ["node", "audit", "verify", "--log", str(log), "--public-key", str(other)]
    )

    assert result.exit_code == ExitCode.INTEGRITY
    assert "signature does not verify" in result.output


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--log", "audit.jsonl"],
        ["--config", "node.toml", "--log", "audit.jsonl"],
    ],
)
def test_audit_verify_needs_a_config_or_a_log_and_key(node_dir: Path, args: list[str]) -> None:
    result = runner.invoke(app, ["node", "audit", "verify", *args])

    assert result.exit_code == ExitCode.CONFIG
    assert "--config" in result.output


def test_audit_verify_exit_code_reaches_the_shell(node_dir: Path) -> None:
    log = node_dir / "state/audit.jsonl"
    log.write_bytes(log.read_bytes()[:-5])  # a torn last line
    rapha = Path(sys.executable).parent / "rapha"

    proc = subprocess.run(
        [str(rapha), "node", "audit", "verify", "--config", str(node_dir / "node.toml")],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "NO_COLOR": "1"},
    )

    assert proc.returncode == ExitCode.INTEGRITY
    assert "incomplete" in proc.stderr


# --- preview, profile, lookup on a synthetic archive --------------------------------------

ARCHIVE_STUDIES = 20  # 14 chest radiograph studies: enough records for a k = 10 profile
ARCHIVE_SIZE = 256  # OCR reads the archive's burned-in text at this size, not at 64


@pytest.fixture(scope="module")
def chest_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rapha.demo.archive import generate_archive

    root = tmp_path_factory.mktemp("cli-archive") / "archive"
    generate_archive(root, studies=ARCHIVE_STUDIES, seed=4, size_range=(ARCHIVE_SIZE, ARCHIVE_SIZE))
    return root


def _edit_for(directory: Path, archive: Path, *, labels: bool = True) -> Path:
    """What a hospital does after `rapha node init`: widen the date window to its archive
    (the generator's studies start in 2016) and name its label table."""
    config = directory / "node.toml"
    text = re.sub(r"(?m)^date_from = \S+", "date_from = 2015-01-01", config.read_text())
    if labels:
        text = text.replace('# labels = "labels.csv"', f'labels = "{archive / "labels.csv"}"')
    config.write_text(text)
    return config


def _init(directory: Path, source: Path | None) -> None:
    args = ["node", "init", "--dir", str(directory)]
    result = runner.invoke(app, [*args, "--source", str(source)] if source else args)
    assert result.exit_code == 0, result.output


def _record_ids(view: Path) -> set[str]:
    return {
        json.loads(line)["record_id"]
        for split in ("train", "val", "test")
        for line in (view / split / "records.jsonl").read_text().splitlines()
    }


def test_preview_builds_the_view_a_job_would_get(tmp_path: Path, chest_archive: Path) -> None:
    _init(tmp_path / "node", chest_archive / "dicom")
    config = _edit_for(tmp_path / "node", chest_archive)
    view = tmp_path / "view"

    first = runner.invoke(app, ["node", "preview", "--config", str(config), "--out", str(view)])
    again = runner.invoke(
        app,
        ["node", "preview", "--config", str(config), "--out", str(tmp_path / "again"), "--json"],
    )

    assert first.exit_code == 0, first.output
    digest = verify_view(view)
    for heading in ("records per split", "excluded, by reason", "labels (all splits)"):
        assert heading in first.output
    assert digest in first.output
    assert str(view) in first.output
    document = json.loads((view / "view.json").read_text())
    assert document["params"]["job_salt_id"] == "preview"
    assert document["label_names"] == ["effusion", "pneumothorax", "nodule"]
    private = sorted((tmp_path / "node/state/private").glob("preview-*/test-labels.json"))
    assert len(private) == 2
    assert not list(view.rglob("test-labels.json"))
    assert again.exit_code == 0, again.output
    summary = json.loads(again.stdout)
    assert summary["records"] == sum(document["counts"].values())
    assert summary["exclusions"] == document["exclusions"]
    assert _record_ids(view).isdisjoint(_record_ids(tmp_path / "again"))  # a fresh salt each time
    verdict = runner.invoke(app, ["node", "audit", "verify", "--config", str(config), "--json"])
    assert verdict.exit_code == 0, verdict.output


def test_preview_flags_override_the_config(tmp_path: Path, chest_archive: Path) -> None:
    _init(tmp_path / "node", None)  # the placeholder source /mnt/pacs, no labels
    config = _edit_for(tmp_path / "node", chest_archive, labels=False)
    other_key = tmp_path / "other-hmac.key"
    crypto.write_secret(other_key, bytes(range(32)))
    truth = json.loads((chest_archive / "truth.json").read_text())
    patients = {s["patient_id"] for s in truth["studies"] if s["chest_radiograph"]}

    result = runner.invoke(
        app,
        [
            "node",
            "preview",
            "--config",
            str(config),
            "--source",
            str(chest_archive / "dicom"),
            "--labels",
            str(chest_archive / "labels.csv"),
            "--hmac-key",
            str(other_key),
            "--out",
            str(tmp_path / "view"),
            "--json",
        ],
    )

    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["records"] > 10
    assert set(summary["prevalence"]) == {"effusion", "pneumothorax", "nodule"}
    # The register holds pseudonyms under the key the view was built with; the node's
    # own key cannot find those patients, so a lookup under it says none.
    lookups = [
        json.loads(
            runner.invoke(
                app, ["node", "lookup", "--config", str(config), "--patient-id", pid, "--json"]
            ).stdout
        )
        for pid in sorted(patients)
    ]
    assert all(answer["uses"] == [] for answer in lookups)


def test_preview_refuses_an_existing_view_unless_forced(
    tmp_path: Path, chest_archive: Path
) -> None:
    _init(tmp_path / "node", chest_archive / "dicom")
    config = _edit_for(tmp_path / "node", chest_archive)
    view = tmp_path / "view"
    view.mkdir()
    (view / "notes.txt").write_text("someone else's file")

    refused = runner.invoke(app, ["node", "preview", "--config", str(config), "--out", str(view)])

    assert refused.exit_code == ExitCode.CONFIG
    assert "not empty" in refused.output
    assert (view / "notes.txt").exists()


def test_lookup_answers_from_the_node_records(tmp_path: Path, chest_archive: Path) -> None:
    _init(tmp_path / "node", chest_archive / "dicom")
    config = _edit_for(tmp_path / "node", chest_archive)
    truth = json.loads((chest_archive / "truth.json").read_text())
    patient = next(s["patient_id"] for s in truth["studies"] if s["chest_radiograph"])
    opt_out = tmp_path / "node/opt-out.txt"
    opt_out.write_text(opt_out.read_text() + f"{patient}\n")
    other = next(
        s["patient_id"]
        for s in truth["studies"]
        if s["chest_radiograph"] and s["patient_id"] != patient and not s["burned_in"]
    )
    view = tmp_path / "view"
    built = runner.invoke(app, ["node", "preview", "--config", str(config), "--out", str(view)])
    assert built.exit_code == 0, built.output

    used = runner.invoke(app, ["node", "lookup", "--config", str(config), "--patient-id", other])
    opted = runner.invoke(app, ["node", "lookup", "--config", str(config), "--patient-id", patient])
    unknown = runner.invoke(
        app, ["node", "lookup", "--config", str(config), "--patient-id", "NOT-A-PATIENT-1"]
    )

    assert used.exit_code == 0, used.output
    assert "preview" in used.output
    assert verify_view(view)[:12] in used.output
    assert opted.exit_code == 0, opted.output
    assert "none" in opted.output
    assert "opt-out list" in opted.output
    assert unknown.exit_code == 0
    assert "none" in unknown.output
    assert "NOT-A-PATIENT-1" not in unknown.output


def test_profile_prints_rounded_suppressed_counts(tmp_path: Path, chest_archive: Path) -> None:
    _init(tmp_path / "node", chest_archive / "dicom")
    config = _edit_for(tmp_path / "node", chest_archive)
    before = verify_log(
        tmp_path / "node/state/audit.jsonl",
        crypto.load_public_key(tmp_path / "node/keys/node.key.pub"),
    )

    as_json = runner.invoke(app, ["node", "profile", "--config", str(config), "--json"])
    strict = runner.invoke(app, ["node", "profile", "--config", str(config), "--k", "1000"])

    assert as_json.exit_code == 0, as_json.output
    result = json.loads(as_json.stdout)
    assert result["k"] == 10
    assert result["total"] is not None
    assert result["total"] % 5 == 0
    assert set(result["dimensions"]) == {
        "modality",
        "body_part",
        "view",
        "manufacturer",
        "sex",
        "age_band",
    }
    cells = [c for d in result["dimensions"].values() for c in d["cells"].values()]
    assert all(c is None or (c >= 10 and c % 5 == 0) for c in cells)
    assert set(result["labels"]["positives"]) == {"effusion", "pneumothorax", "nodule"}
    assert strict.exit_code == 0, strict.output
    assert "total: withheld" in strict.output
    after = verify_log(
        tmp_path / "node/state/audit.jsonl",
        crypto.load_public_key(tmp_path / "node/keys/node.key.pub"),
    )
    assert after.entries > before.entries
    assert not (tmp_path / "node/state/lookup-register.jsonl").exists()  # nobody got a view
    assert not list((tmp_path / "node/state").glob(".profile-*"))
