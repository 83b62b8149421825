"""rapha.node.optout: the opt-out list, its format, and that it never shows its contents."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rapha import crypto
from rapha.errors import ConfigError, DataError
from rapha.node.optout import OptOutList, load_opt_out


def _write(path: Path, text: str | bytes) -> Path:
    crypto.write_private_file(path, text.encode() if isinstance(text, str) else text)
    return path


def test_ids_comments_and_blank_lines(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "opt-out.txt",
        "# withdrawn consent\n\n  PAT-0001  \n\t# indented comment\nPAT-0002\r\n98765",
    )

    opt_out = load_opt_out(path)

    assert len(opt_out) == 3
    assert opt_out.is_opted_out("PAT-0001")
    assert opt_out.is_opted_out("PAT-0002")
    assert opt_out.is_opted_out("98765")
    assert not opt_out.is_opted_out("PAT-0003")
    assert not opt_out.is_opted_out("# withdrawn consent")


def test_ids_compare_without_lo_padding(tmp_path: Path) -> None:
    opt_out = load_opt_out(_write(tmp_path / "o.txt", "PAT-0001\n"))

    assert opt_out.is_opted_out(" PAT-0001 ")
    assert "PAT-0001 " in opt_out
    assert not opt_out.is_opted_out("pat-0001")  # IDs are case-sensitive


def test_an_inline_comment_opts_out_both_readings(tmp_path: Path) -> None:
    opt_out = load_opt_out(_write(tmp_path / "o.txt", "PAT-0001 # asked 2024-05-01\n"))

    assert opt_out.is_opted_out("PAT-0001")
    assert opt_out.is_opted_out("PAT-0001 # asked 2024-05-01")


@pytest.mark.parametrize("patient_id", [None, "", "   "])
def test_a_missing_id_counts_as_opted_out(tmp_path: Path, patient_id: str | None) -> None:
    opt_out = load_opt_out(_write(tmp_path / "o.txt", ""))

    assert opt_out.is_opted_out(patient_id)


def test_an_empty_list_opts_nobody_out(tmp_path: Path) -> None:
    opt_out = load_opt_out(_write(tmp_path / "o.txt", "# nobody yet\n"))

    assert len(opt_out) == 0
    assert not opt_out.is_opted_out("PAT-0001")


def test_a_utf8_bom_is_ignored(tmp_path: Path) -> None:
    opt_out = load_opt_out(_write(tmp_path / "o.txt", "\ufeffPAT-0001\n".encode()))

    assert opt_out.is_opted_out("PAT-0001")


def test_repr_and_errors_never_show_ids(tmp_path: Path) -> None:
    path = _write(tmp_path / "o.txt", "SECRET-PAT-77\nBAD\x01LINE\n")

    with pytest.raises(DataError, match="line 2") as info:
        load_opt_out(path)

    assert "SECRET" not in str(info.value)
    assert "BAD" not in str(info.value)
    assert "SECRET" not in repr(OptOutList(["SECRET-PAT-77"]))


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_opt_out(tmp_path / "missing.txt")


def test_a_world_readable_file_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "o.txt", "PAT-0001\n")
    os.chmod(path, 0o644)

    with pytest.raises(ConfigError, match="chmod o-rwx"):
        load_opt_out(path)


def test_a_group_readable_file_is_accepted(tmp_path: Path) -> None:
    path = _write(tmp_path / "o.txt", "PAT-0001\n")
    os.chmod(path, 0o640)

    assert load_opt_out(path).is_opted_out("PAT-0001")


def test_a_non_utf8_file_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "o.txt", b"M\xfcller\n")

    with pytest.raises(DataError, match="not UTF-8"):
        load_opt_out(path)
