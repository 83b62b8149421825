"""What each study of an archive is, decided in blocks of 20 so proportions hold at any size.

Studies are planned in blocks of :data:`BLOCK_SIZE` consecutive indices. Each block is a
seeded shuffle of a fixed mix, so every 20 studies hold exactly:

* 14 chest radiographs (DX or CR, decided per study) and 6 others: 2 CT, 2 MR, 1 US and
  1 Secondary Capture, i.e. 30 % of studies are not chest radiographs;
* among the chest radiographs, 4 with effusion, 3 with pneumothorax and 2 with a nodule
  (28.6 %, 21.4 % and 14.3 %; findings are placed independently of each other and of
  everything else about the study);
* of the 42 chest label cells (14 studies x 3 findings), 2 written as uncertain (``-1``)
  and 1 left empty in the CSV, drawn among the true negatives; the truth keeps the real
  state of every cell;
* exactly one study with burned-in text, rotating over blocks: a chest radiograph with
  Burned In Annotation ``YES``; a CR chest radiograph without the attribute; the
  ultrasound (``YES``); the Secondary Capture (attribute absent). That is 5 % of studies;
* exactly one extra, damaged file in one study, its kind rotating over blocks
  (see :class:`Damage`).

Block ``b`` depends only on the seed and ``b``, so study ``i`` is the same whatever the
number of studies.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from rapha.demo.phantom import FINDINGS

__all__ = [
    "BLOCK_SIZE",
    "Damage",
    "Kind",
    "StudyPlan",
    "plan_studies",
]

BLOCK_SIZE = 20
_BLOCK_STREAM = 2


class Kind(enum.StrEnum):
    """What a study is, as far as the plan cares."""

    CHEST = "chest"
    CT = "ct"
    MR = "mr"
    US = "us"
    SC = "sc"


class Damage(enum.StrEnum):
    """How a damaged file is broken (each seen in real exports)."""

    TRUNCATED_PIXEL_DATA = "truncated_pixel_data"  # cut off half-way through Pixel Data
    TRUNCATED_HEADER = "truncated_header"  # cut off inside the data set, before Pixel Data
    GARBAGE_AFTER_PREAMBLE = "garbage_after_preamble"  # preamble and DICM, then noise
    ZERO_LENGTH = "zero_length"  # an empty file


_MIX = (Kind.CHEST,) * 14 + (Kind.CT,) * 2 + (Kind.MR,) * 2 + (Kind.US, Kind.SC)
_POSITIVES = MappingProxyType({"effusion": 4, "pneumothorax": 3, "nodule": 2})
_UNCERTAIN_CELLS = 2
_EMPTY_CELLS = 1
_DAMAGES = tuple(Damage)


@dataclass(frozen=True)
class StudyPlan:
    """The plan of one study.

    Attributes:
        index: study index in the archive, from 0.
        kind: what the study is.
        findings: true state of each finding (chest radiographs only, else ``None``).
        labels: the CSV cell of each finding: ``1``, ``0``, ``-1`` (uncertain) or ``None``
            (empty); chest radiographs only, else ``None``.
        burned_in: whether the study's images carry the patient's name and MRN in pixels.
        burned_in_flagged: whether those images say so with Burned In Annotation ``YES``.
        force_cr: a chest radiograph that must be CR (the unflagged burned-in case: the DX
            IOD makes Burned In Annotation Type 1, PS3.3 C.8.11.7, so only CR can omit it).
        damage: the kind of one extra damaged file in the study, or ``None``.
    """

    index: int
    kind: Kind
    findings: Mapping[str, bool] | None
    labels: Mapping[str, int | None] | None
    burned_in: bool
    burned_in_flagged: bool
    force_cr: bool
    damage: Damage | None


def _block(seed: int, block: int) -> list[StudyPlan]:
    rng = np.random.default_rng([seed, _BLOCK_STREAM, block])
    kinds = [_MIX[int(k)] for k in rng.permutation(len(_MIX))]
    chest = [n for n, kind in enumerate(kinds) if kind is Kind.CHEST]

    findings: dict[int, dict[str, bool]] = {n: dict.fromkeys(FINDINGS, False) for n in chest}
    for name in FINDINGS:
        for pick in rng.choice(len(chest), size=_POSITIVES[name], replace=False):
            findings[chest[int(pick)]][name] = True
    labels: dict[int, dict[str, int | None]] = {
        n: {name: int(present) for name, present in f.items()} for n, f in findings.items()
    }
    # Uncertain and empty cells hide true negatives only, so the CSV's positive counts are
    # exactly the planted ones and the prevalence bounds hold for every seed.
    cells = [(n, name) for n in chest for name in FINDINGS if not findings[n][name]]
    odd = rng.choice(len(cells), size=_UNCERTAIN_CELLS + _EMPTY_CELLS, replace=False)
    for k, pick in enumerate(odd):
        n, name = cells[int(pick)]
        labels[n][name] = -1 if k < _UNCERTAIN_CELLS else None

    role = block % 4
    if role in (0, 1):
        burned = chest[int(rng.integers(len(chest)))]
    else:
        burned = kinds.index(Kind.US if role == 2 else Kind.SC)
    flagged = role in (0, 2)
    damaged = int(rng.integers(len(kinds)))
    damage = _DAMAGES[block % len(_DAMAGES)]

    return [
        StudyPlan(
            index=block * BLOCK_SIZE + n,
            kind=kind,
            findings=MappingProxyType(findings[n]) if n in findings else None,
            labels=MappingProxyType(labels[n]) if n in labels else None,
            burned_in=n == burned,
            burned_in_flagged=n == burned and flagged,
            force_cr=n == burned and role == 1,
            damage=damage if n == damaged else None,
        )
        for n, kind in enumerate(kinds)
    ]


def plan_studies(seed: int, studies: int) -> list[StudyPlan]:
    """The plans of studies ``0 .. studies-1`` of the archive with this seed."""
    plans: list[StudyPlan] = []
    block = 0
    while len(plans) < studies:
        plans.extend(_block(seed, block))
        block += 1
    return plans[:studies]
