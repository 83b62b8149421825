"""Aggregate dataset profile with small-cell suppression (rapha.dataset.profile)."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

import pytest

from rapha.dataset.profile import DIMENSIONS, MISSING, profile
from rapha.errors import UsageError


def _record(
    modality: str = "DX",
    *,
    manufacturer: str | None = "Acme",
    labels: dict[str, int | None] | None = None,
    patient: str | None = None,
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "modality": modality,
        "body_part": "CHEST",
        "view_position": "PA",
        "manufacturer": manufacturer,
        "sex": "F",
        "age_band": "40-44",
        "labels": labels or {},
    }
    if patient is not None:
        record["patient"] = patient
    return record


def _published_numbers(value: Any) -> Iterator[int]:
    """Every number anywhere in the profile (k itself included)."""
    if isinstance(value, bool | int | float):
        yield int(value)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _published_numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _published_numbers(item)


def _pinned_cells(result: dict[str, Any], true_counts: dict[str, dict[str, int]]) -> list[str]:
    """Suppressed cells an observer can recompute from the total and the published cells.

    With ``round_to=1`` the published numbers are exact, so total - published = the sum of
    the suppressed cells. A cell is pinned when it is the only suppressed one, or when
    every suppressed cell is forced to 1 (their sum equals their number).
    """
    pinned: list[str] = []
    for name, dimension in result["dimensions"].items():
        suppressed = dimension["suppressed"]
        if dimension["status"] == "withheld" or not suppressed:
            continue
        residual = result["total"] - sum(v for v in dimension["cells"].values() if v is not None)
        assert residual == sum(true_counts[name][c] for c in suppressed)
        if len(suppressed) == 1 or residual == len(suppressed):
            pinned.extend(f"{name}:{c}" for c in suppressed)
    return pinned


def test_counts_are_rounded_and_small_cells_suppressed() -> None:
    # Prepare
    records = [_record("DX") for _ in range(42)] + [_record("CR") for _ in range(23)]
    records += [_record("MR") for _ in range(3)]

    # Execute
    result = profile(records, k=10, round_to=5)

    # Assert
    modality = result["dimensions"]["modality"]
    assert result["total"] == 70
    assert modality["cells"] == {"CR": None, "DX": 40, "MR": None}
    assert modality["suppressed"] == ["CR", "MR"]


def test_a_lone_small_cell_takes_the_smallest_other_with_it() -> None:
    # Prepare
    records = [_record("DX") for _ in range(50)] + [_record("CR") for _ in range(20)]
    records += [_record("MR") for _ in range(4)]

    # Execute
    result = profile(records, k=10, round_to=1)

    # Assert
    modality = result["dimensions"]["modality"]
    assert modality["suppressed"] == ["CR", "MR"]
    assert modality["cells"] == {"CR": None, "DX": 50, "MR": None}


def test_no_published_number_is_below_k() -> None:
    # Prepare
    rng = random.Random(4)
    records = [
        _record(rng.choice(["DX", "CR", "MR", "CT"]), labels={"effusion": rng.choice([1, 0])})
        for _ in range(57)
    ]

    # Execute
    result = profile(records, k=12, round_to=5)

    # Assert
    assert all(n >= 12 for n in _published_numbers(result))


@pytest.mark.parametrize("seed", range(40))
def test_no_suppressed_cell_can_be_recomputed_from_the_total(seed: int) -> None:
    # Prepare: skewed categories, so that every dimension has small and large cells.
    rng = random.Random(seed)
    size = rng.randint(20, 400)
    manufacturers = [f"Vendor{n}" for n in range(rng.randint(1, 9))]
    weights = [rng.random() ** 3 for _ in manufacturers]
    modalities = ["DX", "CR", "CT", "MR", "MG"]
    records = [
        _record(
            rng.choices(modalities, weights=[50, 20, 5, 2, 1])[0],
            manufacturer=rng.choices([*manufacturers, None], weights=[*weights, 0.05])[0],
        )
        for _ in range(size)
    ]
    true_counts: dict[str, dict[str, int]] = {name: {} for name in DIMENSIONS}
    for record in records:
        for name, fields in DIMENSIONS.items():
            cell = record[fields[0]] or MISSING
            true_counts[name][cell] = true_counts[name].get(cell, 0) + 1

    # Execute
    result = profile(records, k=10, round_to=1)

    # Assert
    assert _pinned_cells(result, true_counts) == []
    assert all(n >= 10 for n in _published_numbers(result))
    for name, dimension in result["dimensions"].items():
        if dimension["status"] == "withheld":
            continue
        for cell, count in true_counts[name].items():
            published = dimension["cells"][cell]
            assert (published is None) == (cell in dimension["suppressed"])
            assert published is None or published == count


def test_a_dimension_of_single_records_is_withheld() -> None:
    # Prepare: 12 records from 12 makers: all cells are 1 and would be pinned.
    records = [_record(manufacturer=f"Maker{n}") for n in range(12)]

    # Execute
    result = profile(records, k=10, round_to=1)

    # Assert
    manufacturer = result["dimensions"]["manufacturer"]
    assert manufacturer == {"cells": {}, "suppressed": [], "status": "withheld"}
    assert result["dimensions"]["modality"]["cells"] == {"DX": 12}


def test_missing_values_form_their_own_cell() -> None:
    # Prepare
    records = [_record(manufacturer=None) for _ in range(15)] + [_record() for _ in range(15)]

    # Execute
    result = profile(records, k=10, round_to=5)

    # Assert
    assert result["dimensions"]["manufacturer"]["cells"] == {MISSING: 15, "Acme": 15}


def test_cells_from_few_patients_are_suppressed() -> None:
    # Prepare: 40 CR images from only 2 patients.
    records = [_record("DX", patient=f"p{n}") for n in range(60)]
    records += [_record("CR", patient=f"q{n % 2}") for n in range(40)]
    records += [_record("MR", patient=f"r{n}") for n in range(30)]

    # Execute
    result = profile(records, k=10, round_to=5)

    # Assert
    modality = result["dimensions"]["modality"]
    assert modality["cells"]["CR"] is None
    assert "CR" in modality["suppressed"]
    assert len(modality["suppressed"]) >= 2
    assert "p0" not in json.dumps(result)


def test_label_positives_are_counted_and_small_ones_suppressed() -> None:
    # Prepare
    records = [_record(labels={"effusion": 1, "nodule": 0, "mass": 1}) for _ in range(30)]
    records += [_record(labels={"effusion": 0, "nodule": 1, "mass": 1}) for _ in range(3)]
    records += [_record(labels={"effusion": -1, "nodule": None, "mass": None}) for _ in range(20)]

    # Execute
    result = profile(records, k=10, round_to=5)

    # Assert
    positives = result["labels"]["positives"]
    assert positives["effusion"] == 30
    assert positives["nodule"] is None  # 3 positives
    assert positives["mass"] == 35
    assert result["labels"]["suppressed"] == ["nodule"]


def test_positives_that_leave_a_small_remainder_are_suppressed() -> None:
    # Prepare: 48 of 50 positive: the published total would reveal the 2 others.
    records = [_record(labels={"effusion": 1}) for _ in range(48)]
    records += [_record(labels={"effusion": 0}) for _ in range(2)]

    # Execute
    result = profile(records, k=10, round_to=1)

    # Assert
    assert result["labels"]["positives"]["effusion"] is None


def test_fewer_records_than_k_publish_nothing() -> None:
    # Execute
    result = profile([_record() for _ in range(7)], k=10)

    # Assert
    assert result["total"] is None
    assert all(d["status"] == "withheld" for d in result["dimensions"].values())


def test_the_profile_is_json_and_accepts_nested_meta() -> None:
    # Prepare
    records = [{"meta": _record(), "labels": {"effusion": 1}} for _ in range(25)]

    # Execute
    result = profile(records)

    # Assert
    assert json.loads(json.dumps(result)) == result
    assert result["dimensions"]["view"]["cells"] == {"PA": 25}
    assert result["labels"]["positives"] == {"effusion": 25}


@pytest.mark.parametrize(("k", "round_to"), [(0, 5), (10, 0), (10, 2.5)])
def test_invalid_parameters_are_refused(k: int, round_to: Any) -> None:
    # Execute / Assert
    with pytest.raises(UsageError):
        profile([], k=k, round_to=round_to)
