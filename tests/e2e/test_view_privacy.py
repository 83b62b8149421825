"""The whole PHI boundary on a synthetic hospital archive, through both sources.

One archive (60 studies, 256 x 256 pixels, seed 3) and one node are set up for the module.
The archive is read four times: through the folder source (job ``job-a``), through a real
Orthanc on loopback with the same archive uploaded (``job-a``, same salt), through the
folder source again for a second job (``job-b``, another salt, a narrower scope), and by
``rapha node lookup``. What the module proves:

* nothing the truth file lists as must-not-leak, and no stable pseudonym, is in any byte
  under either view (``find_leaks`` and an independent ``bytes.find`` loop);
* every burned-in image is excluded; the unflagged ones only OCR can catch are caught
  by OCR (the catch rate and false positives are printed);
* corrupt files are counted and skipped; opted-out patients are absent and counted;
* both sources give the same view: same digest, byte-identical images and records;
  ``view.json`` differs at most in the unreadable count, by the files Orthanc refused;
* two jobs share no record id, while each patient keeps its split;
* the audit log verifies, holds the scope, the queries and the builds, no PHI, and an
  edit is detected; ``rapha node lookup`` finds a patient and says none for an opted-out one.

The archive is 256 pixels square, not 64: the synthetic text is drawn at 5 % of the
image height, and at 64 pixels (8-pixel glyphs) Tesseract reads none of it (measured:
0 of 12 burned-in images of a 200-study archive), so OCR could not be shown to work.
"""

from __future__ import annotations

import datetime
import json
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from rapha import crypto
from rapha.audit import verify_log
from rapha.cli import app
from rapha.dataset import ViewSummary, verify_view
from rapha.errors import IntegrityError
from rapha.node import (
    BuildProgress,
    InstanceOutcome,
    NodeSettings,
    build_view,
    init_node,
    load_node_settings,
    open_source,
    with_overrides,
)
from rapha.node.register import LookupRegister
from rapha.pacs.source import read_dataset
from rapha.privacy import Domain, Exclusion, Pseudonymizer, find_leaks, record_id, screen_header
from support.orthanc import OrthancServer, orthanc_or_skip, upload_folder

STUDIES = 60
SEED = 3
SIZE = 256
SALT_A = bytes(range(32))
SALT_B = bytes(range(100, 132))
OPTED_OUT = 2  # patients put on the opt-out list
JOB_B_STUDIES = 8
SPLITS = ("train", "val", "test")

runner = CliRunner()


@dataclass(frozen=True)
class Build:
    summary: ViewSummary
    outcomes: list[InstanceOutcome]
    private_dir: Path
    seconds: float
    last_progress: BuildProgress | None

    def reason_by_sop(self) -> dict[str, str | None]:
        return {o.ref.sop_uid: o.reason for o in self.outcomes if o.ref is not None}

    def record_ids(self) -> set[str]:
        ids: set[str] = set()
        for split in SPLITS:
            lines = (self.summary.out / split / "records.jsonl").read_text().splitlines()
            ids.update(json.loads(line)["record_id"] for line in lines)
        return ids


@dataclass(frozen=True)
class Node:
    root: Path
    config: Path
    settings: NodeSettings
    archive: Path
    truth: dict[str, Any]
    opted_out: tuple[str, ...]


# --- set-up -------------------------------------------------------------------------------


def configure(node_dir: Path, archive: Path, *, size: int = 64) -> Path:
    """Edit the node.toml ``rapha node init`` wrote so its scope covers the archive
    (every modality and body part; the generator's study dates start in 2016)."""
    config = node_dir / "node.toml"
    text = config.read_text()
    text = text.replace(
        'modalities = ["DX", "CR"]', 'modalities = ["CR", "DX", "CT", "MR", "US", "OT"]'
    )
    text = text.replace(
        'body_parts = ["CHEST"]', 'body_parts = ["CHEST", "ABDOMEN", "HEAD", "KNEE", "LSPINE"]'
    )
    text = re.sub(r"(?m)^date_from = \S+", "date_from = 2010-01-01", text)
    text = text.replace('# labels = "labels.csv"', f'labels = "{archive / "labels.csv"}"')
    text = text.replace("size = [224, 224]", f"size = [{size}, {size}]")
    config.write_text(text)
    return config


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Node:
    from rapha.demo.archive import generate_archive

    base = tmp_path_factory.mktemp("e2e")
    archive = base / "archive"
    generate_archive(archive, studies=STUDIES, seed=SEED, size_range=(SIZE, SIZE))
    truth = json.loads((archive / "truth.json").read_text())
    init_node(base / "node", name="e2e-node", source=str(archive / "dicom"))
    config = configure(base / "node", archive)
    # Opt out patients of plain chest studies (no burned-in text, no damaged file).
    chosen: list[str] = []
    for study in truth["studies"]:
        files_ok = all(f["corrupt"] is None for f in study["files"])
        plain = study["chest_radiograph"] and not study["burned_in"] and files_ok
        if plain and study["patient_id"] not in chosen:
            chosen.append(study["patient_id"])
        if len(chosen) == OPTED_OUT:
            break
    opt_out = base / "node" / "opt-out.txt"
    opt_out.write_text(opt_out.read_text() + "".join(f"{pid}\n" for pid in chosen))
    settings = load_node_settings(config, env={})
    return Node(base / "node", config, settings, archive, truth, tuple(chosen))


def run_build(
    settings: NodeSettings, out: Path, *, job_id: str, salt: bytes, scope: Any = None
) -> Build:
    if scope is not None:
        data = settings.model_dump()
        data["scope"] = scope
        settings = NodeSettings.model_validate(data)
    keys = settings.keys.load()
    outcomes: list[InstanceOutcome] = []
    progress: list[BuildProgress] = []
    private_dir = out.with_name(out.name + ".private")
    started = time.monotonic()
    summary = build_view(
        settings,
        open_source(settings, keys),
        out=out,
        private_dir=private_dir,
        job_id=job_id,
        job_salt=salt,
        keys=keys,
        progress=progress.append,
        on_instance=outcomes.append,
    )
    seconds = time.monotonic() - started
    return Build(summary, outcomes, private_dir, seconds, progress[-1] if progress else None)


@pytest.fixture(scope="module")
def folder_view(node: Node) -> Build:
    build = run_build(node.settings, node.root.parent / "view-folder", job_id="job-a", salt=SALT_A)
    print(f"\nfolder build: {build.summary.records} records in {build.seconds:.1f} s")
    return build


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    with orthanc_or_skip(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@dataclass(frozen=True)
class WebBuild:
    build: Build
    files: int
    stored: int


@pytest.fixture(scope="module")
def dicomweb_view(node: Node, orthanc: OrthancServer) -> WebBuild:
    stored = upload_folder(orthanc, node.archive / "dicom")
    files = sum(1 for p in (node.archive / "dicom").rglob("*") if p.is_file())
    settings = with_overrides(node.settings, source=orthanc.dicomweb_url)
    build = run_build(settings, node.root.parent / "view-dicomweb", job_id="job-a", salt=SALT_A)
    print(f"\nDICOMweb build: {build.summary.records} records in {build.seconds:.1f} s")
    return WebBuild(build, files, stored)


@pytest.fixture(scope="module")
def second_job(node: Node) -> Build:
    """Another job on a few plain chest studies (an accession allow-list), another salt."""
    opted = set(node.opted_out)
    accessions = [
        s["accession"]
        for s in node.truth["studies"]
        if s["chest_radiograph"] and s["patient_id"] not in opted
    ][:JOB_B_STUDIES]
    scope = {**node.settings.scope.model_dump(), "accessions": accessions}
    return run_build(
        node.settings, node.root.parent / "view-job-b", job_id="job-b", salt=SALT_B, scope=scope
    )


# --- helpers ------------------------------------------------------------------------------


def files_under(*roots: Path) -> list[Path]:
    return sorted(p for root in roots for p in root.rglob("*") if p.is_file())


def plain_find(paths: list[Path], needles: list[str]) -> list[tuple[str, int]]:
    """An independent search: each needle, lower-cased, as UTF-8 and UTF-16-LE bytes."""
    hits = []
    for path in paths:
        data = path.read_bytes().lower()
        for index, needle in enumerate(needles):
            for encoding in ("utf-8", "utf-16-le"):
                if data.find(needle.lower().encode(encoding)) != -1:
                    hits.append((path.name, index))
    return hits


def archive_file(node: Node, rel: str) -> Path:
    return node.archive / rel


def burned_in_refs(node: Node) -> dict[str, dict[str, Any]]:
    return {b["sop_instance_uid"]: b for b in node.truth["burned_in"]}


# --- nothing leaks ------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["folder", "dicomweb"])
def test_nothing_from_the_truth_file_leaks_into_the_view(
    request: pytest.FixtureRequest, node: Node, which: str
) -> None:
    build: Build = (
        request.getfixturevalue("folder_view")
        if which == "folder"
        else request.getfixturevalue("dicomweb_view").build
    )
    needles = sorted(set(node.truth["must_not_leak"]) | set(node.opted_out))
    pseudonymizer = Pseudonymizer(node.settings.keys.load().hmac_key)
    pseudonymous_uids = {
        pseudonymizer.uid(domain, uid)
        for study in node.truth["studies"]
        for f in study["files"]
        for domain, uid in (
            (Domain.STUDY, study["study_uid"]),
            (Domain.SERIES, f["series_instance_uid"]),
            (Domain.INSTANCE, f["sop_instance_uid"]),
        )
    }
    # Stable pseudonyms stay in the node: the patients' and the 2.25 UIDs of every object.
    stable = sorted(build.summary.patients | pseudonymous_uids)

    leaks = find_leaks(build.summary.out, needles + stable)
    private_leaks = find_leaks(build.private_dir, needles + stable)
    independent = plain_find(files_under(build.summary.out, build.private_dir), needles + stable)

    assert build.summary.records > 50
    assert leaks == []
    assert private_leaks == []
    assert independent == []
    assert verify_view(build.summary.out, build.private_dir) == build.summary.digest


def test_the_view_holds_only_the_files_of_the_view_format(folder_view: Build) -> None:
    names = {
        p.relative_to(folder_view.summary.out).as_posix()
        for p in files_under(folder_view.summary.out)
    }

    assert names == {"view.json"} | {
        f"{s}/{f}" for s in SPLITS for f in ("images.npy", "records.jsonl")
    }


# --- burned-in text -----------------------------------------------------------------------


def test_every_burned_in_image_is_excluded_and_ocr_catches_the_unflagged(
    node: Node, folder_view: Build
) -> None:
    reasons = folder_view.reason_by_sop()
    burned = burned_in_refs(node)
    # Which burned-in images the header rules cannot see: decided here from the file
    # alone, independently of the pipeline.
    needs_ocr = {
        uid
        for uid, entry in burned.items()
        if screen_header(read_dataset(str(archive_file(node, entry["path"])))) is None
    }

    caught_by_ocr = {uid for uid in needs_ocr if reasons.get(uid) == Exclusion.OCR_TEXT}
    false_positives = {
        uid for uid, reason in reasons.items() if reason == Exclusion.OCR_TEXT and uid not in burned
    }
    by_reason: dict[str, int] = {}
    for uid in burned:
        by_reason[str(reasons.get(uid))] = by_reason.get(str(reasons.get(uid)), 0) + 1
    ocr_runs = sum(
        1 for o in folder_view.outcomes if o.reason in (None, Exclusion.OCR_TEXT, "ocr_failed")
    )
    print(
        f"\nburned-in images: {len(burned)} (unflagged, only OCR can see: {len(needs_ocr)}); "
        f"excluded by reason: {by_reason}; OCR catch rate {len(caught_by_ocr)}/{len(needs_ocr)}; "
        f"OCR false positives {len(false_positives)} of {ocr_runs - len(caught_by_ocr)} clean "
        f"images screened"
    )

    assert set(burned) <= set(reasons), "every burned-in image of the archive is in scope"
    assert all(reasons[uid] is not None for uid in burned)
    assert needs_ocr, "the archive must hold burned-in text only OCR can find"
    assert caught_by_ocr == needs_ocr
    assert false_positives == set()
    assert folder_view.summary.exclusions[Exclusion.OCR_TEXT] == len(caught_by_ocr)


# --- corrupt files and opt-out ------------------------------------------------------------


def test_corrupt_files_are_counted_and_skipped(node: Node, folder_view: Build) -> None:
    corrupt = node.truth["corrupt_files"]
    exclusions = folder_view.summary.exclusions
    unusable = exclusions.get(Exclusion.UNREADABLE, 0) + exclusions.get(Exclusion.UNDECODABLE, 0)

    assert corrupt
    assert unusable >= len(corrupt)
    assert folder_view.last_progress is not None
    assert folder_view.last_progress.studies_done == folder_view.last_progress.studies_total


def test_opted_out_patients_never_reach_the_view(node: Node, folder_view: Build) -> None:
    keys = node.settings.keys.load()
    pseudonymizer = Pseudonymizer(keys.hmac_key)
    opted = set(node.opted_out)
    their_files = [
        f
        for s in node.truth["studies"]
        if s["patient_id"] in opted
        for f in s["files"]
        if f["corrupt"] is None
    ]
    reasons = folder_view.reason_by_sop()
    their_record_ids = {
        record_id(pseudonymizer.uid(Domain.INSTANCE, f["sop_instance_uid"]), SALT_A)
        for f in their_files
    }
    their_pseudonyms = {pseudonymizer.pseudonym(Domain.PATIENT, pid) for pid in opted}

    assert their_files
    assert all(reasons[f["sop_instance_uid"]] == Exclusion.OPTED_OUT for f in their_files)
    assert folder_view.summary.exclusions[Exclusion.OPTED_OUT] == len(their_files)
    assert their_pseudonyms.isdisjoint(folder_view.summary.patients)
    assert their_record_ids.isdisjoint(folder_view.record_ids())
    register = LookupRegister(node.settings.state_dir)
    assert all(register.uses(p) == [] for p in their_pseudonyms)


# --- both sources -------------------------------------------------------------------------


def test_folder_and_dicomweb_give_the_same_view(
    folder_view: Build, dicomweb_view: WebBuild
) -> None:
    folder, web = folder_view.summary, dicomweb_view.build.summary
    refused = dicomweb_view.files - dicomweb_view.stored
    folder_doc = json.loads((folder.out / "view.json").read_bytes())
    web_doc = json.loads((web.out / "view.json").read_bytes())
    folder_exclusions = folder_doc.pop("exclusions")
    web_exclusions = web_doc.pop("exclusions")
    unreadable = Exclusion.UNREADABLE.value
    print(f"\nOrthanc refused {refused} of {dicomweb_view.files} files at upload")

    assert folder.digest == web.digest
    for split in SPLITS:
        for name in ("images.npy", "records.jsonl"):
            assert (folder.out / split / name).read_bytes() == (web.out / split / name).read_bytes()
    assert folder_doc == web_doc
    assert {k: v for k, v in folder_exclusions.items() if k != unreadable} == {
        k: v for k, v in web_exclusions.items() if k != unreadable
    }
    assert folder_exclusions.get(unreadable, 0) - web_exclusions.get(unreadable, 0) == refused
    assert folder.patients == web.patients


# --- jobs ---------------------------------------------------------------------------------


def test_two_jobs_share_no_record_id_and_patients_keep_their_split(
    folder_view: Build, second_job: Build
) -> None:
    a_ids, b_ids = folder_view.record_ids(), second_job.record_ids()
    a_split = {o.ref.sop_uid: o.record.split for o in folder_view.outcomes if o.ref and o.record}
    b_split = {o.ref.sop_uid: o.record.split for o in second_job.outcomes if o.ref and o.record}

    assert len(b_ids) >= JOB_B_STUDIES
    assert a_ids.isdisjoint(b_ids)
    assert set(b_split) <= set(a_split)
    assert all(a_split[uid] == split for uid, split in b_split.items())
    assert second_job.summary.patients <= folder_view.summary.patients
    assert second_job.summary.digest != folder_view.summary.digest


# --- audit log and lookup -----------------------------------------------------------------


def test_the_audit_log_verifies_and_records_queries_and_builds(
    node: Node, folder_view: Build, dicomweb_view: WebBuild, second_job: Build, tmp_path: Path
) -> None:
    log = node.settings.audit_log
    public_key = crypto.load_public_key(node.root / "keys/node.key.pub")
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    builds = [e["data"] for e in entries if e["event"] == "view.build"]
    queries = [e["data"] for e in entries if e["event"] == "pacs.query"]
    scopes = [e["data"] for e in entries if e["event"] == "pacs.scope"]

    verdict = verify_log(log, public_key)

    assert verdict.entries == len(entries)
    digests = {b["digest"] for b in builds}
    assert {folder_view.summary.digest, second_job.summary.digest} <= digests
    folder_entry = next(b for b in builds if b["source"] == "folder" and b["job_id"] == "job-a")
    assert folder_entry["exclusions"] == dict(folder_view.summary.exclusions)
    assert folder_entry["counts"] == dict(folder_view.summary.counts)
    assert len(queries) >= len(node.settings.scope.modalities)
    assert {q["modality"] for q in queries} == set(node.settings.scope.modalities)
    assert all(q["source"] == "dicomweb" for q in queries)
    assert {s["source"] for s in scopes} == {"folder", "dicomweb"}
    assert find_leaks(log, node.truth["must_not_leak"]) == []
    assert plain_find([log], sorted(folder_view.summary.patients)) == []

    tampered = tmp_path / "audit.jsonl"
    shutil.copyfile(log, tampered)
    text = tampered.read_text().replace(folder_view.summary.digest, "0" * 64, 1)
    tampered.write_text(text)
    with pytest.raises(IntegrityError):
        verify_log(tampered, public_key)


def test_lookup_finds_a_used_patient_and_none_for_an_opted_out_one(
    node: Node, folder_view: Build, second_job: Build
) -> None:
    keys = node.settings.keys.load()
    pseudonymizer = Pseudonymizer(keys.hmac_key)
    used = next(
        s["patient_id"]
        for s in node.truth["studies"]
        if pseudonymizer.pseudonym(Domain.PATIENT, s["patient_id"]) in second_job.summary.patients
    )

    found = runner.invoke(
        app, ["node", "lookup", "--config", str(node.config), "--patient-id", used, "--json"]
    )
    refused = runner.invoke(
        app, ["node", "lookup", "--config", str(node.config), "--patient-id", node.opted_out[0]]
    )

    assert found.exit_code == 0, found.output
    answer = json.loads(found.stdout)
    assert answer["opted_out"] is False
    assert {u["job_id"] for u in answer["uses"]} >= {"job-a", "job-b"}
    assert folder_view.summary.digest in {u["view_digest"] for u in answer["uses"]}
    assert refused.exit_code == 0, refused.output
    assert "none" in refused.output
    assert "opt-out list" in refused.output
    register = node.settings.state_dir / "lookup-register.jsonl"
    assert register.stat().st_mode & 0o777 == 0o600
    assert used not in register.read_text()


def test_the_archive_dates_are_inside_the_configured_window(node: Node) -> None:
    dates = [datetime.datetime.strptime(s["date"], "%Y%m%d").date() for s in node.truth["studies"]]
    scope = node.settings.scope

    assert scope.date_from <= min(dates)
    assert max(dates) <= scope.date_to
