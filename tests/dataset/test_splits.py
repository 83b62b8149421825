"""Patient-level split assignment (rapha.dataset.splits)."""

from __future__ import annotations

import inspect
import math
from collections import Counter

import pytest

from rapha.dataset.splits import DEFAULT_RATIOS, Split, assign_split, check_ratios
from rapha.errors import ConfigError, DataError, KeyFileError

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
PATIENTS = [f"MRN{n:07d}" for n in range(10_000)]


def _within_four_sigma(observed: int, total: int, ratio: float) -> bool:
    sigma = math.sqrt(total * ratio * (1 - ratio))
    return abs(observed - total * ratio) <= 4 * sigma


@pytest.mark.parametrize("ratios", [DEFAULT_RATIOS, (0.8, 0.1, 0.1), (0.5, 0.2, 0.3)])
def test_ratios_hold_over_ten_thousand_patients(ratios: tuple[float, float, float]) -> None:
    # Execute
    counts = Counter(assign_split(p, KEY, ratios) for p in PATIENTS)

    # Assert
    for split, ratio in zip(Split, ratios, strict=True):
        assert _within_four_sigma(counts[split], len(PATIENTS), ratio), (split, counts)


def test_the_split_is_a_function_of_key_patient_and_ratios_only() -> None:
    # Prepare: no job, salt or arrival order is an input, so every job sees the same split.
    parameters = list(inspect.signature(assign_split).parameters)

    # Execute
    first = [assign_split(p, KEY) for p in PATIENTS[:500]]
    again = [assign_split(p, KEY) for p in reversed(PATIENTS[:500])][::-1]

    # Assert
    assert parameters == ["patient_id", "split_key", "ratios"]
    assert first == again


def test_dicom_padding_does_not_move_a_patient() -> None:
    # Execute / Assert
    assert all(assign_split(p + " ", KEY) is assign_split(p, KEY) for p in PATIENTS[:200])


def test_another_split_key_reshuffles_patients() -> None:
    # Execute
    moved = sum(assign_split(p, KEY) is not assign_split(p, OTHER_KEY) for p in PATIENTS[:2000])

    # Assert: with 70/15/15 about 1 - (0.49 + 0.0225 + 0.0225) = 46.5 % change split.
    assert 0.40 * 2000 < moved < 0.53 * 2000


def test_changing_train_and_val_ratios_never_moves_test_patients() -> None:
    # Execute
    before = {p for p in PATIENTS if assign_split(p, KEY, (0.7, 0.15, 0.15)) is Split.TEST}
    after = {p for p in PATIENTS if assign_split(p, KEY, (0.55, 0.3, 0.15)) is Split.TEST}

    # Assert
    assert before == after


@pytest.mark.parametrize(
    "ratios",
    [(0.7, 0.3), (0.7, 0.3, 0.0), (0.8, 0.3, -0.1), (0.5, 0.2, 0.2), (math.nan, 0.5, 0.5)],
    ids=["two", "zero", "negative", "sum-below-one", "nan"],
)
def test_invalid_ratios_are_refused(ratios: tuple[float, ...]) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError):
        check_ratios(ratios)
    with pytest.raises(ConfigError):
        assign_split("MRN1", KEY, ratios)


def test_ratios_may_miss_one_by_rounding_only() -> None:
    # Execute
    accepted = check_ratios((0.7, 0.15, 0.15 + 5e-10))

    # Assert
    assert accepted == pytest.approx(DEFAULT_RATIOS)
    with pytest.raises(ConfigError):
        check_ratios((0.7, 0.15, 0.15 + 1e-8))


def test_a_split_key_of_the_wrong_length_is_refused() -> None:
    # Execute / Assert
    with pytest.raises(KeyFileError):
        assign_split("MRN1", KEY[:16])


def test_a_patient_without_an_id_cannot_be_placed() -> None:
    # Execute / Assert
    with pytest.raises(DataError) as caught:
        assign_split("   ", KEY)
    assert "PatientID" in str(caught.value)
