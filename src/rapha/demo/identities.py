"""Who and where: the synthetic patients, staff, devices and identifiers of one archive.

Everything here is a pure function of the archive seed and an index, so patient ``p`` and
study ``i`` are the same whatever the number of studies generated.

Identifiers are built to be *distinctive*: every value a de-identifier must remove is at
least 8 characters long (names, MRNs, accession numbers, serial numbers, dates) or a UID,
so a byte scan of an output cannot match one by chance. MRNs, accession numbers and the
other numeric identifiers are an affine map of the index modulo a power of ten with a
multiplier coprime to ten, which makes them unique within an archive without any global
state.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

import numpy as np

from rapha.errors import UsageError

__all__ = [
    "Device",
    "Hospital",
    "Patient",
    "accession_number",
    "make_hospital",
    "make_patient",
    "numeric_id",
    "random_uid",
    "studies_of_patient",
]

# Stream numbers keep the seeded generators of different purposes independent.
_HOSPITAL_STREAM = 0
_PATIENT_STREAM = 1

# Every name part is at least 8 characters long (see the module docstring).
_FAMILY_NAMES = (
    "ABERNATHY", "ARMSTRONG", "ASHCROFT", "BALLANTYNE", "BERKELEY", "BLACKWOOD", "BRADSHAW",
    "CARTWRIGHT", "CHAMBERLAIN", "CUNNINGHAM", "DELACROIX", "DRUMMOND", "DUNSMORE",
    "ELLSWORTH", "EVERHART", "FAIRWEATHER", "FARNSWORTH", "FITZPATRICK", "GALLAGHER",
    "GREENHALGH", "HARGREAVES", "HAWTHORNE", "HOLLOWAY", "INGLEWOOD", "JOHANSSON",
    "KINGSLEY", "KIRKPATRICK", "KOWALSKI", "LANCASTER", "LINDQVIST", "LOCKHART",
    "MACALLISTER", "MONTGOMERY", "NAKAMURA", "NIGHTINGALE", "PEMBERTON", "PETROVSKI",
    "PRESCOTT", "RADCLIFFE", "RASMUSSEN", "SATTERFIELD", "SCHNEIDER", "STANFIELD",
    "THORNBURY", "UNDERWOOD", "VANDERBILT", "VILLANUEVA", "WAINWRIGHT", "WESTBROOK",
    "WHITFIELD", "YOUNGBLOOD", "ZIMMERMANN",
)  # fmt: skip
_FEMALE_NAMES = (
    "Adelaide", "Annabelle", "Beatrice", "Cassandra", "Clementine", "Cordelia", "Dorothea",
    "Eleanora", "Evangeline", "Felicity", "Florentina", "Genevieve", "Georgiana",
    "Gwendolyn", "Henrietta", "Jacqueline", "Josephine", "Katharina", "Marguerite",
    "Millicent", "Philippa", "Penelope", "Rosalind", "Rosamund", "Seraphina", "Theodora",
    "Veronica", "Wilhelmina", "Winifred",
)  # fmt: skip
_MALE_NAMES = (
    "Aloysius", "Augustus", "Barnabas", "Benedict", "Bartholomew", "Christopher",
    "Clarence", "Cornelius", "Cuthbert", "Ebenezer", "Emmanuel", "Ferdinand", "Frederick",
    "Harrison", "Humphrey", "Ignatius", "Jonathan", "Lawrence", "Marcellus", "Maximilian",
    "Nathaniel", "Octavius", "Percival", "Peregrine", "Reginald", "Roderick", "Sebastian",
    "Thaddeus", "Theodore", "Valentine",
)  # fmt: skip
_STREETS = (
    "Fairmont Avenue",
    "Linden Boulevard",
    "Harborview Road",
    "Chestnut Parkway",
    "Meridian Street",
    "Kingsbridge Lane",
)
_CITIES = (
    ("Springfield", "IL 62704"), ("Riverton", "WY 82501"), ("Ashford", "CT 06278"),
    ("Brookhaven", "GA 30319"), ("Lakewood", "OH 44107"),
)  # fmt: skip

# (manufacturer, model, software version, detector type) per modality, PS3.3 C.7.5.1.
_VENDORS: dict[str, tuple[tuple[str, str, str, str], ...]] = {
    "DX": (
        ("Carestream Health", "DRX-Evolution Plus", "5.7.412", "SCINTILLATOR"),
        ("Philips Medical Systems", "DigitalDiagnost C90", "1.2.3", "SCINTILLATOR"),
        ("SIEMENS", "Ysio Max", "VF10F", "SCINTILLATOR"),
        ("GE Healthcare", "Definium 656 HD", "DM_Platform_Release_Version 7.1", "SCINTILLATOR"),
        ("FUJIFILM Corporation", "FDR D-EVO II", "V10.2", "DIRECT"),
    ),
    "CR": (
        ("Agfa", "CR 85-X", "NX 3.0.8900", "STORAGE"),
        ("FUJIFILM Corporation", "FCR Capsula XLII", "A08-10", "STORAGE"),
        ("KODAK", "CR 975", "5.4.0", "STORAGE"),
    ),
    "CT": (
        ("SIEMENS", "SOMATOM Definition AS", "syngo CT VA48A", ""),
        ("GE MEDICAL SYSTEMS", "Revolution CT", "revo_ct_22mw.36", ""),
        ("TOSHIBA", "Aquilion ONE", "V8.9", ""),
    ),
    "MR": (
        ("SIEMENS", "MAGNETOM Skyra", "syngo MR E11", ""),
        ("Philips Medical Systems", "Ingenia", "5.7.1", ""),
        ("GE MEDICAL SYSTEMS", "SIGNA Premier", "29_LX_MR", ""),
    ),
    "US": (
        ("GE Healthcare", "LOGIQ E10", "R3.1.2", ""),
        ("Philips Medical Systems", "EPIQ 7G", "7.0.5", ""),
    ),
    "OT": (("Agfa", "IMPAX Workstation", "6.7.0", ""),),
}
_DEVICES_PER_MODALITY = {"DX": 3, "CR": 2, "CT": 2, "MR": 2, "US": 2, "OT": 1}
_STATION_ROOM = {"DX": "XR", "CR": "CR", "CT": "CT", "MR": "MR", "US": "US", "OT": "WS"}

_STUDIES_PER_PATIENT = (1, 2, 3, 4)
_STUDIES_PER_PATIENT_P = (0.55, 0.25, 0.12, 0.08)
_FIRST_STUDY = dt.date(2016, 1, 4)
_STUDY_DAYS = 8 * 365  # studies fall between 2016 and 2023
_PATIENT_SPAN_DAYS = 700  # a patient's studies fall within about two years
_MIN_AGE, _MAX_AGE = 18, 95
_HOSPITAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 .,'&()-]{6,62}[A-Za-z0-9.)]")


@dataclass(frozen=True)
class Device:
    """One modality, its vendor, and where it stands (PS3.3 C.7.5.1 General Equipment)."""

    modality: str
    manufacturer: str
    model: str
    software_versions: str
    detector_type: str
    station_name: str
    serial_number: str


@dataclass(frozen=True)
class Hospital:
    """The institution and its staff and devices, shared by every study of an archive."""

    name: str
    address: str
    referring_physicians: tuple[str, ...]
    operators: tuple[str, ...]
    devices: tuple[Device, ...]

    def devices_for(self, modality: str) -> tuple[Device, ...]:
        """The devices of one modality (DX, CR, CT, MR, US, or OT for workstations)."""
        return tuple(d for d in self.devices if d.modality == modality)


@dataclass(frozen=True)
class Patient:
    """A synthetic patient; every string field is long and distinctive on purpose."""

    index: int
    family_name: str
    given_name: str
    sex: str
    birth_date: dt.date
    mrn: str
    national_id: str
    legacy_id: str
    study_dates: tuple[dt.date, ...]

    @property
    def name(self) -> str:
        """Patient's Name (0010,0010) in PN form, ``FAMILY^Given``."""
        return f"{self.family_name}^{self.given_name}"

    @property
    def display_name(self) -> str:
        """The name as a person or a burned-in annotation writes it."""
        return f"{self.family_name}, {self.given_name}"


def numeric_id(index: int, *, seed: int, salt: int, digits: int) -> str:
    """A ``digits``-digit identifier, unique per ``index`` for a given seed and salt."""
    modulus = 10**digits
    offset = int(np.random.default_rng([seed, 9, salt]).integers(modulus))
    multiplier = 6_180_339_887 + 10 * salt  # ends in 7, so coprime to 10**digits: a bijection
    return f"{(index * multiplier + offset) % modulus:0{digits}d}"


def accession_number(index: int, *, seed: int) -> str:
    """Accession Number (0008,0050) of study ``index``: 13 characters, unique per archive."""
    return "ACC" + numeric_id(index, seed=seed, salt=1, digits=10)


def random_uid(rng: np.random.Generator) -> str:
    """A UID under the ``2.25`` root (PS3.5 B.2) from 128 bits of ``rng``: deterministic."""
    return "2.25." + str(int.from_bytes(rng.bytes(16), "big"))


def _person(rng: np.random.Generator, prefix: str = "") -> str:
    family = str(rng.choice(_FAMILY_NAMES))
    given = str(rng.choice(_FEMALE_NAMES + _MALE_NAMES))
    return f"{family}^{given}^^{prefix}" if prefix else f"{family}^{given}"


def _initials(name: str) -> str:
    letters = "".join(word[0] for word in re.findall(r"[A-Za-z0-9]+", name)).upper()
    return letters[:4] or "HOSP"


def make_hospital(seed: int, name: str) -> Hospital:
    """The hospital of an archive: address, referring physicians, operators, devices.

    Raises:
        UsageError: ``name`` is not 8 to 64 printable characters (it is planted in
            Institution Name (0008,0080), LO, and must be distinctive, see the module
            docstring).
    """
    if not _HOSPITAL_NAME.fullmatch(name):
        raise UsageError(
            "the hospital name must be 8 to 64 characters: letters, digits, spaces and "
            ".,'&()- (for example 'Rapha General Hospital')"
        )
    rng = np.random.default_rng([seed, _HOSPITAL_STREAM])
    city, state_zip = _CITIES[int(rng.integers(len(_CITIES)))]
    address = f"{int(rng.integers(100, 9999))} {rng.choice(_STREETS)}, {city}, {state_zip}, USA"
    referring = tuple(_person(rng, "Dr") for _ in range(6))
    operators = tuple(_person(rng) for _ in range(5))
    code = _initials(name)
    devices: list[Device] = []
    for modality, count in _DEVICES_PER_MODALITY.items():
        pool = _VENDORS[modality]
        picks = rng.permutation(len(pool))[: min(count, len(pool))]
        for room, pick in enumerate(picks, start=1):
            manufacturer, model, software, detector = pool[int(pick)]
            devices.append(
                Device(
                    modality=modality,
                    manufacturer=manufacturer,
                    model=model,
                    software_versions=software,
                    detector_type=detector,
                    station_name=f"{code}-{_STATION_ROOM[modality]}ROOM{room:02d}",
                    serial_number=f"SN{int(rng.integers(10**7, 10**8)):08d}",
                )
            )
    return Hospital(
        name=name,
        address=address,
        referring_physicians=referring,
        operators=operators,
        devices=tuple(devices),
    )


def make_patient(seed: int, index: int) -> Patient:
    """Patient ``index`` of the archive with this seed: identity and study dates.

    Ages at every study are within 18..95 years. Sex is ``F`` or ``M``.
    """
    rng = np.random.default_rng([seed, _PATIENT_STREAM, index])
    sex = "F" if rng.random() < 0.5 else "M"
    given = str(rng.choice(_FEMALE_NAMES if sex == "F" else _MALE_NAMES))
    family = str(rng.choice(_FAMILY_NAMES))
    n_studies = int(rng.choice(_STUDIES_PER_PATIENT, p=_STUDIES_PER_PATIENT_P))
    first = _FIRST_STUDY + dt.timedelta(days=int(rng.integers(_STUDY_DAYS - _PATIENT_SPAN_DAYS)))
    offsets = np.sort(rng.choice(_PATIENT_SPAN_DAYS, size=n_studies, replace=False))
    offsets -= offsets[0]
    dates = tuple(first + dt.timedelta(days=int(o)) for o in offsets)
    # Age at the first study leaves room for two more years of studies below 96.
    age_days = int(rng.integers(_MIN_AGE * 366, (_MAX_AGE - 2) * 365))
    birth = first - dt.timedelta(days=age_days)
    return Patient(
        index=index,
        family_name=family,
        given_name=given,
        sex=sex,
        birth_date=birth,
        mrn="MRN" + numeric_id(index, seed=seed, salt=2, digits=8),
        national_id="NID" + numeric_id(index, seed=seed, salt=3, digits=9),
        legacy_id="LEG" + numeric_id(index, seed=seed, salt=4, digits=8),
        study_dates=dates,
    )


def studies_of_patient(seed: int, studies: int) -> list[tuple[int, int]]:
    """``(patient index, n-th study of that patient)`` for each of the first ``studies``.

    Patients take consecutive study indices, so study ``i`` belongs to the same patient
    whatever the total number of studies.
    """
    owners: list[tuple[int, int]] = []
    patient = 0
    while len(owners) < studies:
        n = len(make_patient(seed, patient).study_dates)
        owners.extend((patient, k) for k in range(n))
        patient += 1
    return owners[:studies]
