"""The hospital's label table (rapha.dataset.labels)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rapha.dataset.labels import ACCESSION_NUMBER, STUDY_INSTANCE_UID, LabelTable
from rapha.demo.archive import generate_archive
from rapha.errors import DataError

KEY = "ACC0042917"


def _csv(tmp_path: Path, text: str, *, encoding: str = "utf-8") -> Path:
    path = tmp_path / "labels.csv"
    path.write_text(text, encoding=encoding)
    return path


def test_values_map_to_one_zero_minus_one_and_none(tmp_path: Path) -> None:
    # Prepare
    path = _csv(tmp_path, f"AccessionNumber,effusion,nodule,edema,mass\n{KEY},1,0,-1,\n")

    # Execute
    table = LabelTable.from_csv(path)

    # Assert
    assert table.key_column == ACCESSION_NUMBER
    assert table.findings == ("effusion", "nodule", "edema", "mass")
    assert table.lookup(accession=KEY) == {"effusion": 1, "nodule": 0, "edema": -1, "mass": None}


def test_pandas_style_floats_and_padding_are_accepted(tmp_path: Path) -> None:
    # Prepare
    path = _csv(tmp_path, f"accession_number,effusion,nodule\n {KEY} ,1.0, -1.0 \n")

    # Execute
    table = LabelTable.from_csv(path)

    # Assert: DICOM pads SH values with a space; the lookup ignores it.
    assert table.lookup(accession=KEY + " ") == {"effusion": 1, "nodule": -1}


def test_study_uid_key_is_chosen_by_the_header(tmp_path: Path) -> None:
    # Prepare
    uid = "1.2.826.0.1.3680043.8.498.1"
    path = _csv(tmp_path, f"StudyInstanceUID,effusion\n{uid},1\n")

    # Execute
    table = LabelTable.from_csv(path)

    # Assert
    assert table.key_column == STUDY_INSTANCE_UID
    assert table.lookup(accession=KEY, study_uid=uid) == {"effusion": 1}
    assert table.contains(study_uid=uid)


def test_with_both_key_columns_the_study_uid_is_the_key(tmp_path: Path) -> None:
    # Prepare
    uid = "1.2.826.0.1.3680043.8.498.2"
    path = _csv(tmp_path, f"AccessionNumber,StudyInstanceUID,effusion\n{KEY},{uid},0\n")

    # Execute
    table = LabelTable.from_csv(path)

    # Assert
    assert table.key_column == STUDY_INSTANCE_UID
    assert table.findings == ("effusion",)
    assert table.lookup(study_uid=uid) == {"effusion": 0}


def test_a_study_without_a_row_has_all_labels_none(tmp_path: Path) -> None:
    # Prepare
    table = LabelTable.from_csv(_csv(tmp_path, f"AccessionNumber,effusion\n{KEY},1\n"))

    # Execute
    labels = table.lookup(accession="ACC-UNKNOWN")

    # Assert
    assert labels == {"effusion": None}
    assert not table.contains(accession="ACC-UNKNOWN")
    assert not table.contains()


def test_requested_findings_are_kept_in_their_order(tmp_path: Path) -> None:
    # Prepare
    path = _csv(tmp_path, f"AccessionNumber,a,b,c\n{KEY},1,0,-1\n")

    # Execute
    table = LabelTable.from_csv(path, findings=["c", "a"])

    # Assert
    assert table.findings == ("c", "a")
    assert table.lookup(accession=KEY) == {"c": -1, "a": 1}


def test_excel_byte_order_mark_is_ignored(tmp_path: Path) -> None:
    # Prepare
    path = _csv(tmp_path, f"AccessionNumber,effusion\n{KEY},1\n", encoding="utf-8-sig")

    # Execute
    table = LabelTable.from_csv(path)

    # Assert
    assert table.key_column == ACCESSION_NUMBER


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (f"AccessionNumber,effusion,nodule\nA1,1,0\n{KEY},1,yes\n", "line 3, column 'nodule'"),
        (f"AccessionNumber,effusion\n{KEY},2\n", "line 2, column 'effusion'"),
        (f"AccessionNumber,effusion\n{KEY},1\n{KEY},0\n", "line 3"),
        (f"AccessionNumber,effusion\n{KEY},1,0\n", "line 2"),
        ("AccessionNumber,effusion\n,1\n", "line 2"),
        (f"AccessionNumber,effusion\n\n\n{KEY},x\n", "line 4"),
    ],
    ids=["bad-value", "out-of-range", "duplicate-key", "extra-field", "empty-key", "blank-lines"],
)
def test_malformed_rows_name_line_and_column_but_never_the_key(
    tmp_path: Path, text: str, where: str
) -> None:
    # Prepare
    path = _csv(tmp_path, text)

    # Execute
    with pytest.raises(DataError) as caught:
        LabelTable.from_csv(path)

    # Assert
    assert where in str(caught.value)
    assert KEY not in str(caught.value)


@pytest.mark.parametrize(
    "text",
    ["", "PatientID,effusion\nP1,1\n", "AccessionNumber,effusion,effusion\nA,1,1\n"],
    ids=["empty", "no-key-column", "repeated-column"],
)
def test_unusable_headers_are_refused(tmp_path: Path, text: str) -> None:
    # Prepare
    path = _csv(tmp_path, text)

    # Execute / Assert
    with pytest.raises(DataError, match=r"line 1|empty"):
        LabelTable.from_csv(path)


def test_a_requested_finding_missing_from_the_header_is_refused(tmp_path: Path) -> None:
    # Prepare
    path = _csv(tmp_path, f"AccessionNumber,effusion\n{KEY},1\n")

    # Execute / Assert
    with pytest.raises(DataError, match="no column 'nodule'"):
        LabelTable.from_csv(path, findings=["effusion", "nodule"])


def test_unreadable_or_binary_files_are_data_errors(tmp_path: Path) -> None:
    # Prepare
    binary = tmp_path / "labels.csv"
    binary.write_bytes(b"\xff\xfe\x00\x81garbage")

    # Execute / Assert
    with pytest.raises(DataError, match="not UTF-8"):
        LabelTable.from_csv(binary)
    with pytest.raises(DataError, match="cannot read"):
        LabelTable.from_csv(tmp_path / "missing.csv")


def test_repr_shows_counts_never_keys(tmp_path: Path) -> None:
    # Prepare
    table = LabelTable.from_csv(_csv(tmp_path, f"AccessionNumber,effusion\n{KEY},1\n"))

    # Execute
    text = repr(table)

    # Assert
    assert KEY not in text
    assert "rows=1" in text
    assert len(table) == 1


def test_synthetic_archive_labels_match_its_truth(tmp_path: Path) -> None:
    # Prepare
    summary = generate_archive(tmp_path / "archive", studies=20, seed=11)
    truth = json.loads(summary.truth_json.read_text())

    # Execute
    table = LabelTable.from_csv(summary.labels_csv)

    # Assert
    assert table.findings == tuple(truth["findings"])
    labelled = [s for s in truth["studies"] if s["labels"] is not None]
    assert len(table) == len(labelled) > 0
    for study in truth["studies"]:
        expected = study["labels"] or dict.fromkeys(table.findings)
        assert table.lookup(accession=study["accession"]) == expected
