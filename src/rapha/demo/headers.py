"""The header modules every object of the archive shares, with their planted PHI.

:func:`base_dataset` fills the modules common to all the image IODs the archive writes
(PS3.3 A.2 CR, A.3 CT, A.4 MR, A.6 US, A.8.1 SC, A.26.1 DX):

* Patient (C.7.1.1), with Other Patient IDs Sequence and the retired Other Patient IDs;
* General Study (C.7.2.1) and Patient Study (C.7.2.2);
* General Series (C.7.3.1), with a Request Attributes Sequence (C.7.3.1, Request
  Attributes Macro, Table 10-9) that nests a second copy of the accession number;
* General Equipment (C.7.5.1);
* General Image (C.7.6.1) and General Acquisition (C.7.10.1), the parts all IODs share;
* SOP Common (C.12.1);
* a private block (PS3.5 7.8.1) in group 0011 that repeats the MRN and the name, as PACS
  exports often do.

Free text (Study/Series Description, Protocol Name, Image Comments) contains the patient's
name, the way technologists type it.

Attribute paths
    :data:`PHI_ATTRIBUTES` and :data:`QUASI_ATTRIBUTES` name attributes by *path*: keywords
    joined by ``.``, a sequence item as ``Keyword[i]``, and a private element by its
    8-hex-digit tag (its creator is at ``(0011,0010)``). :func:`resolve` turns a path into
    the attribute's value as a string.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID

from rapha.demo.identities import Device, Hospital, Patient

__all__ = [
    "PHI_ATTRIBUTES",
    "PRIVATE_CREATOR",
    "QUASI_ATTRIBUTES",
    "SeriesInfo",
    "StudyInfo",
    "base_dataset",
    "planted",
    "resolve",
]

PRIVATE_CREATOR = "MEDIVIEW PACS 3.1"
_PRIVATE_GROUP = 0x0011

#: Where identifiers are planted. Each value found there goes into ``must_not_leak``.
PHI_ATTRIBUTES: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "OtherPatientIDs",
    "OtherPatientIDsSequence[0].PatientID",
    "OtherPatientIDsSequence[1].PatientID",
    "AccessionNumber",
    "StudyID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    "InstanceCreationDate",
    "AcquisitionDateTime",
    "DateOfSecondaryCapture",
    "ReferringPhysicianName",
    "OperatorsName",
    "InstitutionName",
    "InstitutionAddress",
    "StationName",
    "DeviceSerialNumber",
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
    "ImageComments",
    "RequestAttributesSequence[0].RequestedProcedureID",
    "RequestAttributesSequence[0].ScheduledProcedureStepID",
    "RequestAttributesSequence[0].AccessionNumber",
    "RequestAttributesSequence[0].RequestedProcedureDescription",
    "00111010",
    "00111011",
    "00111012",
)

#: Quasi-identifiers a de-identified view may keep (they go into
#: ``allowed_quasi_identifiers``).
QUASI_ATTRIBUTES: tuple[str, ...] = (
    "PatientSex",
    "PatientAge",
    "Manufacturer",
    "ManufacturerModelName",
    "SoftwareVersions",
)


@dataclass(frozen=True)
class StudyInfo:
    """Everything study-level that goes into the headers."""

    hospital: Hospital
    patient: Patient
    device: Device
    modality: str
    body_part: str
    accession: str
    study_uid: str
    study_id: str
    requested_procedure_id: str
    scheduled_step_id: str
    date: dt.date
    time: str
    description: str
    referring_physician: str
    operator: str

    @property
    def age(self) -> str:
        """Patient's Age (0010,1010) at the study, AS form ``nnnY`` (PS3.5 6.2)."""
        born, on = self.patient.birth_date, self.date
        years = on.year - born.year - ((on.month, on.day) < (born.month, born.day))
        return f"{years:03d}Y"


@dataclass(frozen=True)
class SeriesInfo:
    """Series-level header values."""

    uid: str
    number: int
    description: str
    protocol: str
    time: str
    frame_of_reference_uid: str | None = None


def _da(date: dt.date) -> str:
    return date.strftime("%Y%m%d")


def base_dataset(
    study: StudyInfo,
    series: SeriesInfo,
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    instance_number: int,
    content_time: str,
    image_comments: str,
) -> Dataset:
    """A dataset with the modules every IOD of the archive shares (see module docstring).

    The caller adds the IOD-specific modules and the pixel data, and sets the transfer
    syntax in ``file_meta``.
    """
    patient, hospital, device = study.patient, study.hospital, study.device
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)

    # SOP Common, C.12.1
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.InstanceCreationDate = _da(study.date)
    ds.InstanceCreationTime = content_time
    ds.SOPClassUID = UID(sop_class_uid)
    ds.SOPInstanceUID = UID(sop_instance_uid)

    # General Study, C.7.2.1
    ds.StudyDate = _da(study.date)
    ds.SeriesDate = _da(study.date)
    ds.AcquisitionDate = _da(study.date)
    ds.ContentDate = _da(study.date)
    ds.StudyTime = study.time
    ds.SeriesTime = series.time
    ds.AcquisitionTime = content_time
    ds.ContentTime = content_time
    ds.AccessionNumber = study.accession
    ds.Modality = study.modality
    ds.Manufacturer = device.manufacturer
    ds.InstitutionName = hospital.name
    ds.InstitutionAddress = hospital.address
    ds.ReferringPhysicianName = study.referring_physician
    ds.StationName = device.station_name
    ds.StudyDescription = study.description
    ds.SeriesDescription = series.description
    ds.InstitutionalDepartmentName = "Radiology"
    ds.OperatorsName = study.operator
    ds.ManufacturerModelName = device.model

    # Patient, C.7.1.1
    ds.PatientName = patient.name
    ds.PatientID = patient.mrn
    ds.IssuerOfPatientID = "HIS"
    ds.PatientBirthDate = _da(patient.birth_date)
    ds.PatientSex = patient.sex
    # Other Patient IDs (0010,1000) is retired (PS3.6) but legacy exports still carry it.
    ds.OtherPatientIDs = patient.legacy_id
    ds.OtherPatientIDsSequence = Sequence(
        [
            _other_id(patient.national_id, "NATIONAL-REGISTRY"),
            _other_id(patient.legacy_id, "LEGACY-HIS"),
        ]
    )
    # Patient Study, C.7.2.2
    ds.PatientAge = study.age

    ds.DeviceSerialNumber = device.serial_number
    ds.SoftwareVersions = device.software_versions
    ds.ProtocolName = series.protocol
    ds.BodyPartExamined = study.body_part

    ds.StudyInstanceUID = UID(study.study_uid)
    ds.SeriesInstanceUID = UID(series.uid)
    ds.StudyID = study.study_id
    ds.SeriesNumber = series.number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance_number
    if series.frame_of_reference_uid is not None:
        ds.FrameOfReferenceUID = UID(series.frame_of_reference_uid)
        ds.PositionReferenceIndicator = ""
    ds.ImageComments = image_comments

    # Request Attributes Sequence (General Series, C.7.3.1): identifiers nested one level.
    request = Dataset()
    request.AccessionNumber = study.accession
    request.RequestedProcedureDescription = study.description
    request.RequestedProcedureID = study.requested_procedure_id
    request.ScheduledProcedureStepDescription = series.protocol
    request.ScheduledProcedureStepID = study.scheduled_step_id
    ds.RequestAttributesSequence = Sequence([request])

    block = ds.private_block(_PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x10, "LO", patient.mrn)
    block.add_new(0x11, "PN", patient.name)
    block.add_new(0x12, "LO", study.accession)
    return ds


def _other_id(value: str, issuer: str) -> Dataset:
    item = Dataset()
    item.PatientID = value
    item.IssuerOfPatientID = issuer
    item.TypeOfPatientID = "TEXT"
    return item


def resolve(ds: Dataset, path: str) -> str | None:
    """The value at an attribute path (see the module docstring) as a string, or ``None``
    when the attribute is absent or empty."""
    node: Dataset = ds
    parts = path.split(".")
    for n, part in enumerate(parts):
        index: int | None = None
        if part.endswith("]"):
            part, _, rest = part.partition("[")
            index = int(rest[:-1])
        tag: int | str = int(part, 16) if _is_tag(part) else part
        if tag not in node:
            return None
        value = node[tag].value
        if index is not None:
            if index >= len(value):
                return None
            value = value[index]
        if n == len(parts) - 1:
            text = str(value) if value is not None else ""
            return text or None
        node = value
    return None


def _is_tag(part: str) -> bool:
    return len(part) == 8 and all(c in "0123456789abcdefABCDEF" for c in part)


def planted(ds: Dataset, paths: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    """``(path, value)`` for each of ``paths`` present in ``ds``."""
    for path in paths:
        value = resolve(ds, path)
        if value is not None:
            yield path, value
