"""The allowlist against DICOM PS3.15 Table E.1-1, and what extract_meta lets through."""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from rapha.privacy import ALLOWLIST, AllowedField, ProfileOption, age_band, extract_meta
from rapha.privacy import options_used as options_used_fn

from ._support import SAMPLES, Archive, Sample, make_ds

TABLE_PATH = Path(__file__).parent / "data" / "ps3.15-table-e1-1.json"
TABLE_SHA256 = "a99a35d1278e2bace8d90ff791b11aea2d45f1e3e1230388eb5224c9dbcd29e6"
NAMES = [f.name for f in ALLOWLIST]


def _table() -> list[dict[str, str]]:
    rows: list[dict[str, str]] = json.loads(TABLE_PATH.read_bytes())
    return rows


def _matches(pattern: str, tag: str) -> bool:
    """Whether a Table E.1-1 tag cell (with XX wildcards, or the odd-group rule) covers ``tag``."""
    group = int(tag[1:5], 16)
    if "WHERE GGGG IS ODD" in pattern:
        return group % 2 == 1
    regex = re.escape(pattern).replace("XX", "[0-9A-F]{2}")
    return re.fullmatch(regex, tag.upper()) is not None


def _rows_for(tag: str) -> list[dict[str, str]]:
    return [row for row in _table() if _matches(row["tag"], tag)]


def test_table_is_the_reference_copy() -> None:
    data = TABLE_PATH.read_bytes()

    assert hashlib.sha256(data).hexdigest() == TABLE_SHA256
    assert len(json.loads(data)) == 621


def test_table_wildcards_are_understood() -> None:
    assert _rows_for("(6000,3000)")[0]["name"] == "Overlay Data"
    assert _rows_for("(0011,1010)")[0]["name"] == "Private Attributes"
    assert _rows_for("(0010,0010)")[0]["basicProfile"] == "Z"


@pytest.mark.parametrize("field", ALLOWLIST, ids=NAMES)
def test_each_source_is_absent_from_the_table_or_kept_under_the_declared_option(
    field: AllowedField,
) -> None:
    for tag in field.source_tags:
        rows = _rows_for(tag)

        if field.option is None:
            assert not rows, f"{field.name}: {tag} is in Table E.1-1 but no option is named"
        for row in rows:
            # An absent option key means the option leaves the basic action in force.
            assert field.option is not None
            assert row.get(field.option.value) == "K", (
                f"{field.name}: {tag} ({row['name']}) is not kept under {field.option.value}"
            )


@pytest.mark.parametrize("field", ALLOWLIST, ids=NAMES)
def test_tags_are_well_formed_and_known(field: AllowedField) -> None:
    for tag in (*field.source_tags, *field.derived_from):
        assert re.fullmatch(r"\([0-9A-F]{4},[0-9A-F]{4}\)", tag)
        assert int(tag[1:5], 16) % 2 == 0  # never a private attribute
    assert field.why
    assert not set(field.derived_from) & set(field.source_tags)


def test_free_text_and_dates_are_not_allowlisted() -> None:
    sources = {Tag(int(t[1:5], 16), int(t[6:10], 16)) for f in ALLOWLIST for t in f.source_tags}
    never = [
        "StudyDescription",
        "SeriesDescription",
        "ProtocolName",
        "ImageComments",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "StudyDate",
        "AcquisitionDate",
        "InstitutionName",
        "StationName",
        "DeviceSerialNumber",
    ]

    assert not sources & {Tag(k) for k in never}


def test_allowlist_has_the_fields_the_issue_names() -> None:
    assert NAMES == [
        "modality",
        "body_part",
        "view_position",
        "laterality",
        "sex",
        "age_band",
        "manufacturer",
        "model",
        "pixel_spacing",
        "rows",
        "columns",
        "photometric_interpretation",
    ]


def test_options_used_are_the_declared_ones_and_exist_in_the_table() -> None:
    used = options_used_fn()
    columns = {key for row in _table() for key in row}

    assert used == ["rtnDevIdOpt", "rtnPatCharsOpt"]
    assert set(used) <= columns
    assert ProfileOption(used[0]).code == "113109"
    assert ProfileOption(used[1]).label == "Retain Patient Characteristics Option"


# --- extract_meta on real and synthetic files ----------------------------------------------


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _removable() -> tuple[set[str], list[str]]:
    """Table E.1-1 rows our options do not keep: exact tags, and wildcard patterns."""
    kept_by_us = {f.option.value for f in ALLOWLIST if f.option is not None}
    rows = [
        r["tag"]
        for r in _table()
        if r["basicProfile"] != "K" and not any(r.get(o) == "K" for o in kept_by_us)
    ]
    return {t for t in rows if "X" not in t and "WHERE" not in t}, [t for t in rows if "XX" in t]


REMOVABLE_TAGS, REMOVABLE_PATTERNS = _removable()


def _text_values(ds: Dataset, tags: set[str] | None) -> set[str]:
    """Text values (stripped, not numbers, 3+ characters) of standard attributes of ``ds``,
    at any depth: those Table E.1-1 removes when ``tags`` is None, else those in ``tags``.
    Private attributes are left out: the profile drops them wholesale because their meaning
    is unknown, and vendors repeat their model names there."""
    out: set[str] = set()
    with warnings.catch_warnings():
        # Converting malformed values of some sample files warns; reading PHI here is test
        # set-up, not the code under test.
        warnings.simplefilter("ignore")
        for elem in ds.iterall():
            if elem.VR == "SQ" or elem.tag.is_private:
                continue
            tag = f"({elem.tag.group:04X},{elem.tag.element:04X})"
            if tags is not None and tag not in tags:
                continue
            removable = tag in REMOVABLE_TAGS or any(_matches(p, tag) for p in REMOVABLE_PATTERNS)
            if tags is None and not removable:
                continue
            values = elem.value if elem.VM > 1 else [elem.value]
            out |= {str(v).strip() for v in values if v is not None}
    return {v for v in out if len(v) >= 3 and not _is_number(v)}


@pytest.mark.parametrize("sample", SAMPLES, ids=[s.name for s in SAMPLES])
def test_extract_meta_on_sample_files(sample: Sample) -> None:
    phi = _text_values(sample.ds, None)

    meta = extract_meta(sample.ds)

    assert list(meta) == NAMES
    for field in ALLOWLIST:
        value = meta[field.name]
        assert value is None or isinstance(value, str | int | float), field.name
        if str(value) in phi:
            # A coincidence (a manufacturer that is also the institution, "ECG" as both
            # modality and a device description) is allowed only when the value really is
            # what the field's own attribute holds.
            own = {v.upper() for v in _text_values(sample.ds, set(field.source_tags))}
            assert str(value).upper() in own, f"{field.name} repeats a removable value"


def test_extract_meta_on_a_known_file() -> None:
    sample = next(s for s in SAMPLES if s.name == "RG1_UNCR.dcm")

    meta = extract_meta(sample.ds)

    assert meta["modality"] == "CR"
    assert meta["sex"] == "F"
    assert meta["photometric_interpretation"] == "MONOCHROME1"
    assert meta["rows"] == 1955
    assert isinstance(meta["manufacturer"], str)


def test_extract_meta_on_the_synthetic_archive(small_archive: Archive) -> None:
    needles = small_archive.truth["must_not_leak"]
    allowed = set(small_archive.truth["allowed_quasi_identifiers"])
    seen: dict[str, set[Any]] = {name: set() for name in NAMES}

    for _, ds in small_archive.readable():
        meta = extract_meta(ds)

        assert list(meta) == NAMES
        for name, value in meta.items():
            seen[name].add(value)
            text = str(value)
            assert text not in needles
            assert not any(n in text for n in needles), f"{name} contains a planted value"

    assert {"CR", "DX", "CT", "MR"} <= seen["modality"]
    assert seen["manufacturer"] - {None} <= allowed
    assert seen["model"] - {None} <= allowed
    assert seen["age_band"] - {None}
    assert seen["sex"] - {None} <= {"M", "F", "O"}


# --- normalisation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attrs", "field", "expected"),
    [
        ({"Modality": "ct"}, "modality", "CT"),
        ({"Modality": " CR "}, "modality", "CR"),
        ({"Modality": "C/T"}, "modality", None),
        ({"Modality": ["CT", "MR"]}, "modality", None),
        ({"BodyPartExamined": "chest"}, "body_part", "CHEST"),
        ({"BodyPartExamined": "A" * 17}, "body_part", None),
        ({"BodyPartExamined": "JOHN^DOE"}, "body_part", None),
        ({"ViewPosition": "PA"}, "view_position", "PA"),
        ({"ImageLaterality": "L", "Laterality": "R"}, "laterality", "L"),
        ({"Laterality": "R"}, "laterality", "R"),
        ({"ImageLaterality": "X"}, "laterality", None),
        ({"PatientSex": "f"}, "sex", "F"),
        ({"PatientSex": "Female"}, "sex", None),
        ({"Manufacturer": "  ACME\x07 Imaging\t Inc  "}, "manufacturer", "ACME Imaging Inc"),
        ({"Manufacturer": "X" * 100}, "manufacturer", "X" * 64),
        ({"ManufacturerModelName": ""}, "model", None),
        ({"PixelSpacing": ["0.1", "0.2"]}, "pixel_spacing", 0.15),
        ({"PixelSpacing": ["0.14300001", "0.14300001"]}, "pixel_spacing", 0.143),
        ({"ImagerPixelSpacing": ["0.2", "0.2"]}, "pixel_spacing", 0.2),
        (
            {"PixelSpacing": ["0", "0.2"], "ImagerPixelSpacing": ["0.2", "0.2"]},
            "pixel_spacing",
            0.2,
        ),
        ({"PixelSpacing": ["0.2"]}, "pixel_spacing", None),
        ({"Rows": 512, "Columns": 256}, "rows", 512),
        ({"Rows": 512, "Columns": 256}, "columns", 256),
        ({"Rows": 0}, "rows", None),
        ({"PhotometricInterpretation": "monochrome1"}, "photometric_interpretation", "MONOCHROME1"),
        (
            {"PhotometricInterpretation": "PALETTE COLOR"},
            "photometric_interpretation",
            "PALETTE COLOR",
        ),
        ({"PhotometricInterpretation": "GREY"}, "photometric_interpretation", None),
    ],
)
def test_values_are_normalised(attrs: dict[str, Any], field: str, expected: object) -> None:
    assert extract_meta(make_ds(**attrs))[field] == expected


def test_missing_everything_is_all_none() -> None:
    assert extract_meta(Dataset()) == dict.fromkeys(NAMES)


@pytest.mark.parametrize(
    ("attrs", "band"),
    [
        ({"PatientAge": "045Y"}, "45-49"),
        ({"PatientAge": "044Y"}, "40-44"),
        ({"PatientAge": "000D"}, "00-04"),
        ({"PatientAge": "018M"}, "00-04"),
        ({"PatientAge": "060M"}, "05-09"),
        ({"PatientAge": "520W"}, "05-09"),
        ({"PatientAge": "089Y"}, "85-89"),
        ({"PatientAge": "090Y"}, "90+"),
        ({"PatientAge": "104Y"}, "90+"),
        ({"PatientAge": "131Y"}, None),
        ({"PatientAge": "45Y"}, None),
        ({"PatientAge": "045X"}, None),
        ({"PatientBirthDate": "19800615", "StudyDate": "20250614"}, "40-44"),
        ({"PatientBirthDate": "19800615", "StudyDate": "20250615"}, "45-49"),
        ({"PatientBirthDate": "1930.01.01", "StudyDate": "2024.06.01"}, "90+"),
        ({"PatientBirthDate": "20250101", "StudyDate": "20240101"}, None),
        ({"PatientBirthDate": "18000101", "StudyDate": "20240101"}, None),
        ({"PatientBirthDate": "20231301", "StudyDate": "20240101"}, None),
        ({"PatientBirthDate": "19800615"}, None),
        ({"PatientAge": "bad", "PatientBirthDate": "19800615", "StudyDate": "20250615"}, "45-49"),
        ({}, None),
    ],
)
def test_age_band(attrs: dict[str, str], band: str | None) -> None:
    ds = make_ds(**attrs)

    assert age_band(ds) == band
    assert extract_meta(ds)["age_band"] == band


def test_age_band_never_exposes_the_dates() -> None:
    ds = make_ds(PatientBirthDate="19800615", StudyDate="20250615", PatientAge="045Y")

    meta = extract_meta(ds)

    for value in meta.values():
        assert not any(d in str(value) for d in ("1980", "2025", "0615", "045"))
