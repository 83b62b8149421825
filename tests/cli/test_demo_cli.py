"""``rapha demo``: the archive command, the plain demo, and how they report to people."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from typer.testing import CliRunner, Result

from rapha.cli import demo
from rapha.errors import ExitCode

runner = CliRunner()

SMALL = ["--min-size", "48", "--max-size", "64"]


def _text(result: Result) -> str:
    """The output with Rich's line wrapping undone."""
    return " ".join(result.output.split())


def test_archive_with_200_studies_and_seed_1_writes_at_least_200_studies(tmp_path: Path) -> None:
    out = tmp_path / "archive"

    result = runner.invoke(
        demo.app, ["archive", "--out", str(out), "--studies", "200", "--seed", "1", *SMALL]
    )

    assert result.exit_code == 0, result.output
    assert len(list((out / "dicom").glob("PAT*/STU*"))) >= 200
    truth = json.loads((out / "truth.json").read_text(encoding="utf-8"))
    assert truth["study_count"] == 200
    assert truth["seed"] == 1
    with (out / "labels.csv").open(newline="", encoding="utf-8") as fh:
        assert next(csv.reader(fh)) == ["AccessionNumber", "effusion", "pneumothorax", "nodule"]
    assert "200 studies" in _text(result)
    assert "labels.csv" in _text(result)
    assert "truth.json" in _text(result)


def test_archive_summary_names_modalities_transfer_syntaxes_and_labels(tmp_path: Path) -> None:
    result = runner.invoke(
        demo.app, ["archive", "--out", str(tmp_path / "a"), "--studies", "40", *SMALL]
    )

    assert result.exit_code == 0, result.output
    for text in ("DX", "CR", "CT", "Explicit VR Little Endian", "RLE Lossless", "effusion"):
        assert text in _text(result)
    assert "deliberately corrupt" in _text(result)
    assert "burned-in" in _text(result)


def test_archive_json_output_is_machine_readable(tmp_path: Path) -> None:
    out = tmp_path / "a"

    result = runner.invoke(
        demo.app,
        ["archive", "--out", str(out), "--studies", "20", "--seed", "3", "--json", *SMALL],
    )

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["studies"] == 20
    assert data["truth_json"] == str(out / "truth.json")
    assert sum(data["by_modality"].values()) == data["files"] - data["corrupt_files"]
    assert set(data["labels"]) == {"effusion", "pneumothorax", "nodule"}


def test_archive_hospital_name_goes_into_the_headers(tmp_path: Path) -> None:
    out = tmp_path / "a"

    result = runner.invoke(
        demo.app,
        [
            "archive",
            "--out",
            str(out),
            "--studies",
            "3",
            "--hospital",
            "St Elsewhere Clinic",
            *SMALL,
        ],
    )

    assert result.exit_code == 0, result.output
    truth = json.loads((out / "truth.json").read_text(encoding="utf-8"))
    assert truth["hospital"] == "St Elsewhere Clinic"
    assert "St Elsewhere Clinic" in truth["must_not_leak"]


def test_the_whole_demo_refuses_too_few_studies_before_it_starts_anything(
    tmp_path: Path,
) -> None:
    workdir = tmp_path / "demo"

    result = runner.invoke(demo.app, ["--workdir", str(workdir), "--studies", "4", "--seed", "2"])

    assert result.exit_code == 2, result.output
    assert "--studies" in _text(result)
    assert not workdir.exists()


def test_refuses_a_non_empty_directory_that_is_not_an_archive(tmp_path: Path) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "thesis.docx").write_bytes(b"precious")

    result = runner.invoke(demo.app, ["archive", "--out", str(out), "--studies", "2", *SMALL])

    assert result.exit_code == ExitCode.CONFIG
    assert "not empty" in _text(result)
    assert "choose a new or empty directory" in _text(result)
    assert "Traceback" not in _text(result)
    assert (out / "thesis.docx").read_bytes() == b"precious"


def test_replaces_a_previous_archive_in_place(tmp_path: Path) -> None:
    out = tmp_path / "a"
    first = runner.invoke(demo.app, ["archive", "--out", str(out), "--studies", "5", *SMALL])

    second = runner.invoke(demo.app, ["archive", "--out", str(out), "--studies", "3", *SMALL])

    assert first.exit_code == 0, first.output
    assert second.exit_code == 0, second.output
    assert len(list((out / "dicom").glob("PAT*/STU*"))) == 3


def test_bad_arguments_exit_with_the_usage_code_and_a_hint(tmp_path: Path) -> None:
    result = runner.invoke(
        demo.app,
        ["archive", "--out", str(tmp_path / "a"), "--studies", "2", "--hospital", "X", *SMALL],
    )

    assert result.exit_code == ExitCode.CONFIG
    assert "hospital name must be 8 to 64 characters" in _text(result)
    assert not (tmp_path / "a").exists()
