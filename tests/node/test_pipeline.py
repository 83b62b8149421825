"""The view build on real sample files: pydicom's and pydicom-data's, plus a few made from them.

The sample folder holds real files of several modalities and transfer syntaxes, and five
made here from real ones to reach every exclusion path: a multi-frame MR, a colour CT, a
CT with a name burned into its pixels, an MR without a PatientID (pydicom's own
``emri_small.dcm``), and a file that is not DICOM. One patient (three CR and two CT
images) is on the opt-out list. The build runs once for the module, with logging at DEBUG,
and every test reads its outcome.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import secrets
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw, ImageFont
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from rapha.audit import verify_log
from rapha.crypto import load_public_key
from rapha.errors import ConfigError, ScopeError, UsageError
from rapha.node import (
    BuildProgress,
    BuildReason,
    InstanceOutcome,
    NodeSettings,
    build_view,
    init_node,
    load_node_settings,
    lookup_patient,
    open_source,
    with_overrides,
)
from rapha.node.optout import load_opt_out
from rapha.node.register import REGISTER_FILE
from rapha.node.settings import BasicAuth, DicomWebSource, FolderSource
from rapha.privacy import Exclusion, Pseudonymizer, find_leaks

SALT = bytes(range(32))
OPTED_OUT_ID = "77654033"
TEXT = ("DOE^JOHNATHAN", "MRN 55512345")

# Real sample files; emri_small.dcm has an empty PatientID. CT_small.dcm, MR_small.dcm
# and SC_rgb.dcm lack BodyPartExamined and are never in scope.
SAMPLES = (
    "77654033/CR1/6154",
    "77654033/CR2/6247",
    "77654033/CR3/6278",
    "77654033/CT2/17106",
    "77654033/CT2/17136",
    "emri_small.dcm",
    "JPEG2000.dcm",
    "CT_small.dcm",
    "MR_small.dcm",
    "SC_rgb.dcm",
    "bad_sequence.dcm",
    "explicit_VR-UN.dcm",
    "J2K_pixelrep_mismatch.dcm",
    "examples_overlay.dcm",
    "RG1_UNCI.dcm",
)
EXPECTED: dict[str, str | None] = {
    "77654033/CR1/6154": Exclusion.OPTED_OUT,
    "77654033/CR2/6247": Exclusion.OPTED_OUT,
    "77654033/CR3/6278": Exclusion.OPTED_OUT,
    "77654033/CT2/17106": Exclusion.OPTED_OUT,
    "77654033/CT2/17136": Exclusion.OPTED_OUT,
    "emri_small.dcm": BuildReason.MISSING_PATIENT_ID,
    "JPEG2000.dcm": Exclusion.MODALITY_US_SC_OT,  # a Secondary Capture SOP class
    "bad_sequence.dcm": None,
    "explicit_VR-UN.dcm": Exclusion.SC_DEVICE,
    "J2K_pixelrep_mismatch.dcm": None,
    "examples_overlay.dcm": Exclusion.IMAGE_TYPE_SECONDARY,
    "RG1_UNCI.dcm": None,
    "made/multiframe.dcm": Exclusion.MULTIFRAME,
    "made/colour.dcm": Exclusion.COLOUR,
    "made/text.dcm": Exclusion.OCR_TEXT,
}
SCOPE = """\
[scope]
modalities = ["CR", "CT", "MR", "NM"]
body_parts = ["CSPINE", "HEAD", "NECK", "PANCREAS", "WHOLE BODY", "ABDOMEN", "CHEST"]
date_from = 1990-01-01
date_to = 2030-12-31
max_studies = 50
"""
# Header attributes whose values may reach the view (the allowlist's sources) or are
# generic codes; every other string value of an in-scope file must not leak.
_ALLOWED_KEYWORDS = frozenset(
    {
        "Modality",
        "BodyPartExamined",
        "ViewPosition",
        "Laterality",
        "ImageLaterality",
        "PatientSex",
        "Manufacturer",
        "ManufacturerModelName",
        "PhotometricInterpretation",
        "SpecificCharacterSet",
        "SOPClassUID",
        "TransferSyntaxUID",
        "MediaStorageSOPClassUID",
        "ImplementationClassUID",
        "ImplementationVersionName",
        "ImageType",
    }
)
_IDENTIFYING_VRS = frozenset({"PN", "LO", "SH", "UI", "DA", "DT", "LT", "ST", "UT", "AE"})
_MIN_NEEDLE = 6


def _read(path: Path) -> Dataset:
    """pydicom alone, every value converted while its warnings are silenced (sample files
    hold values pydicom warns about on first access)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
        ds.walk(lambda _ds, _element: None)
        return ds


def _copy_with(name: str, target: Path, change: Any) -> None:
    path = get_testdata_file(name)
    assert path is not None
    ds = copy.deepcopy(_read(Path(path)))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    change(ds)
    target.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(target, enforce_file_format=True)


def _multiframe(ds: Dataset) -> None:
    ds.PatientID = "RAPHA-MULTIFRAME-01"


def _colour(ds: Dataset) -> None:
    ds.PatientID = "RAPHA-COLOUR-0001"
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(int(ds.Rows) * int(ds.Columns) * 3)


def _text(ds: Dataset) -> None:
    """A 256 x 256 CT with a name and an MRN burned in, white on a dark box in a corner as
    consoles draw them, without Burned In Annotation in the header."""
    ds.PatientID = "RAPHA-TEXT-000001"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ramp = np.linspace(200, 1200, 256, dtype=np.float32)
    pixels = np.add.outer(ramp, ramp[::-1] * 0.3).astype(np.uint16)
    text = Image.new("L", (256, 256), 0)
    draw = ImageDraw.Draw(text)
    font = ImageFont.load_default(size=24)
    for n, line in enumerate(TEXT):
        draw.text((8, 6 + n * 32), line, fill=255, font=font)
    pixels[:72, :] = 0
    pixels[np.asarray(text) >= 128] = 3000
    ds.Rows = ds.Columns = 256
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    ds.WindowCenter, ds.WindowWidth = 1500, 3000
    ds.PixelData = pixels.astype("<u2").tobytes()


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("samples") / "pacs"
    for name in SAMPLES:
        path = get_testdata_file(name)
        assert path is not None, f"pydicom sample {name} is missing"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, root / name)
    _copy_with("emri_small.dcm", root / "made/multiframe.dcm", _multiframe)
    _copy_with("77654033/CT2/17166", root / "made/colour.dcm", _colour)
    _copy_with("77654033/CT2/17196", root / "made/text.dcm", _text)
    (root / "made/not-dicom.dcm").write_bytes(b"this is not a DICOM file\n" * 8)
    return root


def _node(base: Path, samples: Path, extra: str = "") -> NodeSettings:
    init_node(base, name="sample-node", source=str(samples))
    config = base / "node.toml"
    text = config.read_text()
    text = re.sub(r"(?ms)^\[scope\].*?(?=^# --- keys)", SCOPE + "\n", text)
    text = text.replace("size = [224, 224]", "size = [32, 32]") + extra
    config.write_text(text)
    (base / "opt-out.txt").write_text(f"# test\n{OPTED_OUT_ID}\n")
    return load_node_settings(config, env={})


@dataclass(frozen=True)
class Built:
    settings: NodeSettings
    summary: Any
    outcomes: list[InstanceOutcome]
    progress: list[BuildProgress]
    by_file: dict[str, str | None]
    log_text: str


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def _build(settings: NodeSettings, out: Path, log: list[str] | None = None) -> Built:
    """Build the view; with ``log``, collect every log record emitted meanwhile (all
    loggers, DEBUG and up) into it."""
    keys = settings.keys.load()
    outcomes: list[InstanceOutcome] = []
    progress: list[BuildProgress] = []
    handler = _Collect()
    root = logging.getLogger()
    old_level = root.level
    if log is not None:
        root.addHandler(handler)
        root.setLevel(logging.DEBUG)
    try:
        summary = build_view(
            settings,
            open_source(settings, keys),
            out=out,
            private_dir=out.with_name(out.name + ".private"),
            job_id="sample-job",
            job_salt=SALT,
            keys=keys,
            progress=progress.append,
            on_instance=outcomes.append,
        )
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    if log is not None:
        log.extend(handler.lines)
    return Built(
        settings, summary, outcomes, progress, _by_file(settings, outcomes), "\n".join(log or [])
    )


def _by_file(settings: NodeSettings, outcomes: list[InstanceOutcome]) -> dict[str, str | None]:
    """Each outcome under the name of its sample file (found by SOP Instance UID)."""
    assert isinstance(settings.source, FolderSource)
    samples = settings.source.path
    sop_to_file = {}
    for path in sorted(p for p in samples.rglob("*") if p.is_file()):
        try:
            sop_to_file[str(_read(path).SOPInstanceUID)] = path.relative_to(samples).as_posix()
        except Exception:  # the file that is not DICOM
            continue
    return {sop_to_file[o.ref.sop_uid]: o.reason for o in outcomes if o.ref is not None}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, samples: Path) -> Built:
    base = tmp_path_factory.mktemp("node")
    return _build(_node(base / "node", samples), base / "view", log=[])


def _needles(samples: Path) -> list[str]:
    """Every identifying string value of every in-scope sample file (>= 6 characters),
    except values an allowlisted attribute of some file also holds (a model name that
    another file repeats in a free-text attribute is still a model name)."""
    found: set[str] = set()
    allowed: set[str] = set()

    def visit(ds: Dataset, element: Any) -> None:
        if element.VR not in _IDENTIFYING_VRS:
            return
        values = element.value if element.VM > 1 else [element.value]
        for value in values:
            text = str(value).strip(" \x00")
            if element.keyword in _ALLOWED_KEYWORDS:
                allowed.add(text)
            elif len(text) >= _MIN_NEEDLE:
                found.add(text)

    for name, reason in EXPECTED.items():
        if reason is None or reason == Exclusion.OPTED_OUT:
            ds = _read(samples / name)
            ds.walk(visit)
            ds.file_meta.walk(visit)
    return sorted(found - allowed)


# --- the outcome of every file -------------------------------------------------------------


def test_every_sample_has_the_expected_outcome(built: Built) -> None:
    assert built.by_file == EXPECTED


def test_one_record_per_kept_instance_and_every_exclusion_counted(built: Built) -> None:
    kept = sum(1 for reason in EXPECTED.values() if reason is None)
    expected_exclusions: dict[str, int] = {Exclusion.UNREADABLE.value: 1}  # not-dicom.dcm
    for reason in EXPECTED.values():
        if reason is not None:
            expected_exclusions[reason] = expected_exclusions.get(reason, 0) + 1

    assert built.summary.records == kept
    assert dict(built.summary.exclusions) == expected_exclusions
    assert built.progress[-1].studies_done == built.progress[-1].studies_total
    assert built.progress[-1].records == kept


def test_nothing_identifying_reaches_the_view_or_the_logs(built: Built, samples: Path) -> None:
    needles = _needles(samples)
    out = built.summary.out
    files = sorted(p for p in out.rglob("*") if p.is_file())

    leaks = find_leaks(out, [*needles, *sorted(built.summary.patients)])
    plain = [
        (path.name, needle)
        for path in files
        for needle in needles
        for encoding in ("utf-8", "utf-16-le")
        if needle.lower().encode(encoding) in path.read_bytes().lower()
    ]

    assert len(needles) > 40
    assert leaks == []
    assert plain == []
    assert [n for n in needles if n in built.log_text] == []


def test_records_carry_only_allowlisted_metadata(built: Built) -> None:
    view = json.loads((built.summary.out / "view.json").read_text())
    lines = [
        json.loads(line)
        for split in ("train", "val", "test")
        for line in (built.summary.out / split / "records.jsonl").read_text().splitlines()
    ]

    assert view["allowlist"] == [
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
    assert view["options"] == ["rtnDevIdOpt", "rtnPatCharsOpt"]
    assert view["params"]["job_salt_id"] == "sample-job"
    assert all(set(line["meta"]) <= set(view["allowlist"]) for line in lines)
    assert all(re.fullmatch(r"[0-9a-f]{32}", line["record_id"]) for line in lines)


def test_the_build_is_in_the_audit_log_and_the_register(built: Built) -> None:
    settings = built.settings
    public_key = load_public_key(settings.keys.signing_key.with_name("node.key.pub"))
    entries = [json.loads(line) for line in settings.audit_log.read_text().splitlines()]
    keys = settings.keys.load()
    pseudonymizer = Pseudonymizer(keys.hmac_key)
    opt_out = load_opt_out(settings.opt_out)

    verify_log(settings.audit_log, public_key)
    used = lookup_patient(settings.state_dir, pseudonymizer, opt_out, "9RG1")
    refused = lookup_patient(settings.state_dir, pseudonymizer, opt_out, OPTED_OUT_ID)
    unknown = lookup_patient(settings.state_dir, pseudonymizer, opt_out, "NOBODY-HERE-01")

    assert [e["event"] for e in entries][-2:] == ["pacs.scope", "view.build"]
    assert entries[-1]["data"]["digest"] == built.summary.digest
    assert entries[-1]["data"]["exclusions"] == dict(built.summary.exclusions)
    assert entries[-2]["data"]["source"] == "folder"
    assert [u.view_digest for u in used.uses] == [built.summary.digest]
    assert used.opted_out is False
    assert refused.uses == ()
    assert refused.opted_out is True
    assert unknown.uses == ()
    assert (settings.state_dir / REGISTER_FILE).stat().st_mode & 0o777 == 0o600


# --- settings that change the build ---------------------------------------------------------


def test_ocr_disabled_in_writing_lets_the_text_image_through(tmp_path: Path, samples: Path) -> None:
    extra = '\n[ocr.disabled]\nCT = "Our CT consoles never burn text in (DPO review 2025-01-15)."\n'
    _node(tmp_path / "node", samples)
    config = tmp_path / "node" / "node.toml"
    config_text = config.read_text().replace("[ocr.disabled]\n", "")
    config.write_text(config_text + extra)
    settings = load_node_settings(config, env={})

    result = _build(settings, tmp_path / "view")

    assert result.by_file["made/text.dcm"] is None
    assert Exclusion.OCR_TEXT not in result.summary.exclusions
    entries = [json.loads(line) for line in settings.audit_log.read_text().splitlines()]
    assert entries[-1]["data"]["ocr_disabled"] == ["CT"]


def test_a_scope_broader_than_the_cap_stops_the_build(tmp_path: Path, samples: Path) -> None:
    settings = _node(tmp_path / "node", samples)
    data = settings.model_dump()
    data["scope"]["max_studies"] = 1
    narrow = NodeSettings.model_validate(data)
    keys = narrow.keys.load()

    with pytest.raises(ScopeError):
        build_view(
            narrow,
            open_source(narrow, keys),
            out=tmp_path / "view",
            private_dir=tmp_path / "private",
            job_id="job",
            job_salt=SALT,
            keys=keys,
        )

    assert not (tmp_path / "view").exists()
    last = json.loads(narrow.audit_log.read_text().splitlines()[-1])
    assert last["event"] == "view.failed"
    assert last["data"] == {"job_id": "job", "source": "folder", "error": "ScopeError"}


def test_a_short_job_salt_is_refused_before_anything_is_read(tmp_path: Path, samples: Path) -> None:
    settings = _node(tmp_path / "node", samples)
    keys = settings.keys.load()

    with pytest.raises(UsageError):
        build_view(
            settings,
            open_source(settings, keys),
            out=tmp_path / "view",
            private_dir=tmp_path / "private",
            job_id="job",
            job_salt=secrets.token_bytes(8),
            keys=keys,
        )

    assert not (tmp_path / "view").exists()
    assert not (settings.state_dir / REGISTER_FILE).exists()


# --- command-line overrides -----------------------------------------------------------------


def test_overrides_replace_source_labels_and_key(tmp_path: Path, samples: Path) -> None:
    settings = _node(tmp_path / "node", samples)
    labels = tmp_path / "labels.csv"

    folder = with_overrides(settings, source=str(tmp_path / "elsewhere"), labels=labels)
    web = with_overrides(
        settings, source="http://127.0.0.1:8042/dicom-web", hmac_key=tmp_path / "other.key"
    )

    assert folder.source == FolderSource(kind="folder", path=tmp_path / "elsewhere")
    assert folder.labels == labels
    assert isinstance(web.source, DicomWebSource)
    assert web.source.url == "http://127.0.0.1:8042/dicom-web"
    assert web.keys.hmac_key == tmp_path / "other.key"
    assert web.keys.split_key == settings.keys.split_key


def test_a_url_override_keeps_the_configured_pacs_authentication(tmp_path: Path) -> None:
    base = tmp_path / "node"
    init_node(base, source="https://pacs.example.org/dicom-web")
    config = base / "node.toml"
    text = config.read_text().replace(
        'kind = "none"                     # "none", "basic", "bearer" or "tls"; see below',
        'kind = "basic"\nusername = "rapha"\npassword_file = "keys/pacs-password"',
    )
    config.write_text(text)
    settings = load_node_settings(config, env={})

    moved = with_overrides(settings, source="https://pacs2.example.org/dicom-web")

    assert isinstance(moved.source, DicomWebSource)
    assert moved.source.url == "https://pacs2.example.org/dicom-web"
    assert isinstance(moved.source.auth, BasicAuth)
    assert moved.source.auth.username == "rapha"


def test_an_unsafe_override_is_refused(tmp_path: Path, samples: Path) -> None:
    settings = _node(tmp_path / "node", samples)

    with pytest.raises(ConfigError, match="source"):
        with_overrides(settings, source="http://pacs.example.org/dicom-web")
