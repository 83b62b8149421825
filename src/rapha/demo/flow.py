"""``rapha demo``: the whole promise on one machine, with real parts.

Two hospitals, each with its own synthetic archive, HMAC key and scope:

* **St Mary's** (``st-mary``) holds DX chest radiographs labelled for effusion,
  pneumothorax and nodule; its node reads the archive folder (a PACS export);
* **St Luke's** (``st-luke``) holds CR chest radiographs labelled only for pneumothorax and
  nodule, and asks less per record; its node reads a real Orthanc over DICOMweb when
  Orthanc is installed, else the folder, with a note.

Then the embedded EVM (MockUSDC and the clearing vault), the hub on a loopback port with
SQLite and its background loop, and one ``rapha node run`` process per hospital with
``dev`` attestation in the demo environment. The operator registers both hospitals in the
vault (through its timelock), enrols both nodes and allowlists the measurement each one
printed. An AI company scaffolds, signs and dry-runs the example bundle (a small CNN for
effusion), submits it with a budget, watches it, fetches the result and verifies it.
Matching must send it to St Mary's: St Luke's is cheaper, but has no DX and no effusion
labels.

Everything lands under the work directory (:data:`LAYOUT`), so what left each hospital
and what did not can be checked byte for byte afterwards. :class:`Demo` owns every
process it starts and stops them all on :meth:`Demo.close`, on an exception and on
Ctrl-C; children die with the demo even when it is killed outright
(:mod:`rapha.demo.processes`).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

from rapha import crypto
from rapha.demo.market import HospitalSite, LocalHub, agent_command, configure_node, log_to_file
from rapha.demo.processes import (
    Child,
    free_port,
    free_port_pair,
    orthanc_plugin,
    start_orthanc,
    wait_for_port,
)
from rapha.errors import RaphaError, UsageError

__all__ = [
    "DEFAULT_STUDIES",
    "LAYOUT",
    "MIN_STUDIES",
    "Demo",
    "DemoError",
    "DemoOptions",
    "DemoUI",
    "Hospital",
]

DEFAULT_STUDIES: Final = 2500
MIN_STUDIES: Final = 100
_MARKER: Final = ".rapha-demo"
#: Where things are under the work directory.
LAYOUT: Final = {
    "archives": "archives/<hospital>  (DICOM, labels.csv, truth.json: stays at the hospital)",
    "nodes": "nodes/<hospital>  (node.toml, keys, audit log, state: the hospital's node)",
    "hub": "hub  (hub.db, artifacts: the hub's database and artifact store)",
    "logs": "logs  (hub.log, <hospital>.log, orthanc.log, company.log)",
    "company": "company  (keys, bundle, dry-run, progress.jsonl, result)",
    "chain": "chain/events.json  (every event the vault and the token emitted)",
    "summary": "summary.json, report.html",
}
COMPANY: Final = "acme-radiology-ai"
USDC: Final = 10**6
BUDGET: Final = 50 * USDC
MAX_PRICE: Final = 50_000  # 0.05 USDC per record
K_ANONYMITY: Final = 5  # the shipped default is 10; the demo's cohorts are small
RATIOS: Final = (0.6, 0.15, 0.25)
#: The example bundle: a small CNN at 32 px learns effusion from about a thousand
#: training images in 14 epochs (tests/runtime/test_dry_run.py); with fewer it stays near
#: chance, and the confidence interval says so.
EPOCHS: Final = 14
BUNDLE_SIZE: Final = 32
_JOB_TIMEOUT: Final = 900.0
_START_TIMEOUT: Final = 180.0
_OCR_NOTE: Final = (
    "synthetic demo archive: its burned-in text is drawn too small for OCR at this size"
)


@dataclass(frozen=True)
class Hospital:
    """One demo hospital: its archive and the node's scope and terms."""

    slug: str
    #: How the demo names it; ``institution`` is what its DICOM says (and must not leave).
    name: str
    institution: str
    modality: str
    cr_share: float
    labels: tuple[str, ...]
    price_per_record: int
    seed_offset: int
    wants_orthanc: bool
    uid: int
    #: Its archive's size, as a share of ``--studies``.
    share: float = 1.0

    @property
    def node_id(self) -> str:
        return f"{self.slug}-1"

    def studies(self, requested: int) -> int:
        """The studies in this hospital's archive when the demo is asked for ``requested``."""
        return max(MIN_STUDIES, round(requested * self.share))


HOSPITALS: Final = (
    Hospital(
        "st-mary",
        "St Mary's",
        "St Mary's Teaching Hospital",
        "DX",
        0.0,
        ("effusion", "pneumothorax", "nodule"),
        20_000,
        0,
        False,
        62400,
    ),
    Hospital(
        "st-luke",
        "St Luke's",
        "St Luke's Community Hospital",
        "CR",
        1.0,
        ("pneumothorax", "nodule"),
        10_000,
        1000,
        True,
        62500,
        0.2,  # a smaller hospital: a fifth of the studies
    ),
)

REQUIREMENTS: Final = {
    "modality": "DX",
    "body_part": "CHEST",
    "labels": [{"name": "effusion", "min_positives": 10}],
    "min_records": 40,
}


class DemoError(RaphaError):
    """The demo could not finish a step; the message names the log to read."""


class DemoUI(Protocol):
    """What the demo tells the person watching."""

    def step(self, title: str) -> None:
        """A new step begins."""

    def progress(self, done: int, total: int, what: str = "") -> None:
        """The current step advanced."""

    def note(self, text: str) -> None:
        """Something worth knowing (a fallback, a choice)."""


class _QuietUI:
    def step(self, title: str) -> None:
        pass

    def progress(self, done: int, total: int, what: str = "") -> None:
        pass

    def note(self, text: str) -> None:
        pass


@dataclass(frozen=True)
class DemoOptions:
    workdir: Path
    studies: int = DEFAULT_STUDIES
    seed: int = 1
    orthanc: bool = True
    #: Attest with a software TPM when swtpm is installed (else ``dev`` evidence).
    tpm: bool = True
    #: The longer side of the archive's images, in pixels.
    image_size: int = 64


@dataclass
class _Node:
    hospital: Hospital
    root: Path
    config: Path
    site: HospitalSite
    source: str
    agent: Child | None = None


@dataclass
class Demo:
    """The demo's parts; use as a context manager so every process is stopped."""

    options: DemoOptions
    ui: DemoUI = field(default_factory=_QuietUI)
    notes: list[str] = field(default_factory=list)
    hub: LocalHub | None = None
    nodes: dict[str, _Node] = field(default_factory=dict)
    children: list[Child] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    _allowed: set[str] = field(default_factory=set)
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def __post_init__(self) -> None:
        if self.options.studies < MIN_STUDIES:
            raise UsageError(
                f"the demo needs at least {MIN_STUDIES} studies per hospital "
                f"(a smaller archive has no cohort to match); got "
                f"{self.options.studies}"
            )
        self.root = self.options.workdir.absolute()

    def __enter__(self) -> Demo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def say(self, text: str) -> None:
        self.notes.append(text)
        self.ui.note(text)

    # --- the whole run -------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Every step, in order; returns the summary (also written to summary.json)."""
        started = time.monotonic()
        self._prepare()
        self._archives()
        self._chain_and_hub()
        self._hospitals()
        self._start_agents()
        bundle = self._company_bundle()  # while the agents attest and publish
        self._await_agents()
        job = self._submit_and_watch(bundle)
        self._finish(job, started)
        return self.summary

    def close(self) -> None:
        """Stop every agent, Orthanc and the hub (idempotent)."""
        for child in self.children:  # ask all first: each finishes its long poll
            child.signal(15)
        for child in reversed(self.children):
            child.stop(timeout=15)
        self.children.clear()
        if self.hub is not None:
            self.hub.stop()
            self.hub = None
        self._stack.close()

    # --- steps ----------------------------------------------------------------------------

    def _prepare(self) -> None:
        root = self.root
        if root.exists() and not root.is_dir():
            raise UsageError(f"{root} is not a directory; choose another --workdir")
        if root.is_dir() and any(root.iterdir()):
            if not (root / _MARKER).exists():
                raise UsageError(
                    f"{root} is not empty and holds no earlier demo; choose a new or empty "
                    "--workdir (the demo replaces only its own earlier runs)"
                )
            try:
                for entry in root.iterdir():
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
            except OSError as exc:
                raise UsageError(
                    f"cannot clear the earlier demo in {root}: {exc}; is another demo still "
                    "running there?"
                ) from exc
        root.mkdir(parents=True, exist_ok=True)
        (root / _MARKER).write_text(json.dumps({"format": "rapha-demo", "version": 1}) + "\n")
        for name in ("logs", "company", "chain", "nodes"):
            self.path(name).mkdir()

    def _archives(self) -> None:
        from rapha.demo import generate_archive

        size = self.options.image_size
        for h in HOSPITALS:
            studies = h.studies(self.options.studies)
            self.ui.step(f"{h.name}: writing a synthetic archive of {studies} studies")
            out = self.path("archives", h.slug)
            generate_archive(
                out,
                studies=studies,
                seed=self.options.seed + h.seed_offset,
                hospital=h.institution,
                size_range=(size, size),
                cr_share=h.cr_share,
                progress=lambda done, total: self.ui.progress(done, total, "studies"),
            )
            _keep_label_columns(out / "labels.csv", h.labels)

    def _chain_and_hub(self) -> None:
        from rapha.ledger import ClearingVault, EmbeddedChain

        self.ui.step("starting the embedded chain (MockUSDC, clearing vault) and the hub")
        self.chain = EmbeddedChain.start(accounts=3, registry_delay=60)
        self.vault = ClearingVault(self.chain, self.chain.vault)
        self.payer, *payouts = self.chain.accounts
        self.payouts = dict(zip((h.slug for h in HOSPITALS), payouts, strict=True))
        self._stack.enter_context(log_to_file(self.path("logs", "hub.log")))
        self._start_tpms()
        ek_roots = sorted({str(m.root_ca) for m in self.tpms.values()})
        issuers = sorted({str(m.issuer_ca) for m in self.tpms.values()})
        self.hub = LocalHub(
            self.path("hub"),
            chain=self.chain,
            vault=self.vault,
            port=free_port(),
            lease_seconds=60,
            log=self.path("logs", "hub.log"),
            ek_ca_certificates=[Path(p) for p in ek_roots],
            ek_intermediates=[Path(p) for p in issuers],
        )
        self.balances_before = self._balances()

    def _hospitals(self) -> None:
        from eth_account import Account
        from eth_utils.crypto import keccak

        from rapha.hub.db import Role
        from rapha.hub.services import SYSTEM

        hub = self._hub()
        self.ui.step("the operator registers both hospitals and the company")
        company = self.path("company")
        crypto.save_private_key(crypto.generate_private_key(), company / "company.key")
        crypto.save_public_key(
            crypto.load_private_key(company / "company.key").public_key(), company / "company.pub"
        )
        hub.create_org(SYSTEM, COMPANY, Role.COMPANY, wallet=self.payer.address)
        self.api_key = hub.create_key(SYSTEM, COMPANY, "demo").token
        for h in HOSPITALS:
            payout = self.payouts[h.slug]
            signer = Account.create()
            hospital_id = keccak(text=h.slug)
            hub.create_org(SYSTEM, h.slug, Role.HOSPITAL, wallet=payout.address)
            self.vault.propose_hospital(
                self.chain.owner, hospital_id, payout=payout.address, signer=signer.address
            )
            site = HospitalSite(
                h.node_id, hospital_id, payout.address, bytes(signer.key), h.price_per_record
            )
            source = self._source(h)
            root = self.path("nodes", h.slug)
            config = configure_node(
                root,
                site=site,
                hub_url=self._local().url,
                source=source,
                labels=self.path("archives", h.slug, "labels.csv"),
                modality=h.modality,
                uid=h.uid,
                trusted={COMPANY: company / "company.pub"},
                ocr_disabled=_OCR_NOTE if self.options.image_size < 128 else None,
                policy={"k_anonymity": K_ANONYMITY},
                ratios=RATIOS,
                keep_views=True,
                max_studies=h.studies(self.options.studies),
                link=self._tpm_link(h),
            )
            self._enroll(h, crypto.load_private_key(root / "keys" / "node.key"))
            self.nodes[h.slug] = _Node(h, root, config, site, source)
        self.chain.time_travel(61)  # the vault's registry timelock (60 s in the demo)

    def _start_tpms(self) -> None:
        """One software TPM per hospital when swtpm is installed (else dev attestation)."""
        from rapha.demo.tpm import manufacture_tpm, missing_tpm, swtpm_command

        self.tpms: dict[str, Any] = {}
        self.tpm_ports: dict[str, int] = {}
        why = missing_tpm() if self.options.tpm else "--no-tpm"
        if why is not None:
            self.say(f"attestation: dev evidence in the demo environment ({why}); a "
                     "production job needs a TPM quote (docs/attestation.md)")  # fmt: skip
            return
        self.ui.step("manufacturing a software TPM (swtpm) for each hospital's node")
        for h in HOSPITALS:
            made = manufacture_tpm(self.path("tpm", h.slug), ca_dir=self.path("tpm", "ca"))
            port = free_port_pair()
            child = Child(f"swtpm-{h.slug}", swtpm_command(made, port),
                          log=self.path("logs", f"swtpm-{h.slug}.log"))  # fmt: skip
            self.children.append(child)
            self.tpms[h.slug], self.tpm_ports[h.slug] = made, port
        for h in HOSPITALS:
            wait_for_port(self.tpm_ports[h.slug] + 1, what=f"swtpm for {h.name}")
        self.say("attestation: TPM 2.0 quotes from a software TPM (swtpm), which proves "
                 "nothing about hardware; the demo environment accepts them")  # fmt: skip

    def _tpm_link(self, h: Hospital) -> dict[str, Any] | None:
        if h.slug not in self.tpms:
            return None
        return {"attestation": "tpm2", "tpm_tcti": self._tcti(h)}

    def _tcti(self, h: Hospital) -> str:
        return f"swtpm:host=127.0.0.1,port={self.tpm_ports[h.slug]}"

    def _enroll(self, h: Hospital, node_key: Any) -> None:
        """The operator enrols the node: dev, or its TPM (EK certificate, AK, and the
        credential it must activate)."""
        from rapha.hub.services import SYSTEM

        hub = self._hub()
        pem = crypto.public_key_pem(node_key.public_key())
        if h.slug not in self.tpms:
            hub.enroll_node(SYSTEM, node_id=h.node_id, org_name=h.slug, public_key_pem=pem,
                            environment="demo", kind="dev")  # fmt: skip
            return
        from rapha.attest.tpm2 import Tpm2Provider

        provider = Tpm2Provider(self._tcti(h))
        challenge = hub.enroll_node(SYSTEM, node_id=h.node_id, org_name=h.slug,
                                    public_key_pem=pem, environment="demo", kind="tpm2",
                                    tpm=provider.enrollment())  # fmt: skip
        assert challenge is not None  # tpm2 enrolment always challenges
        hub.complete_tpm2(h.node_id, provider.activate_credential(*challenge))

    def _source(self, h: Hospital) -> str:
        folder = str(self.path("archives", h.slug, "dicom"))
        if not (h.wants_orthanc and self.options.orthanc):
            return folder
        if orthanc_plugin() is None:
            self.say(
                f"{h.name}: Orthanc is not installed, so its node reads the archive "
                "folder instead of a PACS over DICOMweb (apt-get install orthanc "
                "orthanc-dicomweb for the PACS path)"
            )
            return folder
        from rapha.demo.processes import upload_to_orthanc

        self.ui.step(f"{h.name}: starting Orthanc and storing the archive in it")
        child, url = start_orthanc(
            self.path("orthanc", h.slug), log=self.path("logs", "orthanc.log")
        )
        self.children.append(child)
        stored = upload_to_orthanc(url, Path(folder))
        self.say(f"{h.name}: its node queries Orthanc over DICOMweb ({stored} instances)")
        return f"{url}/dicom-web"

    def _start_agents(self) -> None:
        """Start both agents and allowlist the measurement each one prints."""
        self.ui.step("starting both node agents; the operator allowlists their measurements")
        env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
        for slug, node in self.nodes.items():
            node.agent = Child(
                slug, agent_command(node.config), log=self.path("logs", f"{slug}.log"), env=env
            )
            self.children.append(node.agent)
        self._await_nodes(lambda log: self._allow(log), "allowlisted")

    def _await_agents(self) -> None:
        self.ui.step("both nodes attest and publish their dataset profiles")
        self._await_nodes(lambda log: "published the profile" in log, "published")

    def _allow(self, log: str) -> bool:
        from rapha.hub.services import SYSTEM

        found = re.search(r"measurement ([0-9a-f]{64})", log)
        if found is None:
            return False
        if found.group(1) not in self._allowed:
            self._hub().allow_measurement(SYSTEM, "demo", found.group(1), note="demo node")
            self._allowed.add(found.group(1))
        return True

    def _await_nodes(self, ready: Callable[[str], bool], what: str) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            done = 0
            for slug, node in self.nodes.items():
                assert node.agent is not None
                if not node.agent.running:
                    raise DemoError(f"the {slug} agent stopped; see {node.agent.log_path}")
                done += ready(node.agent.log)
            self.ui.progress(done, len(self.nodes), f"nodes {what}")
            if done == len(self.nodes):
                return
            if time.monotonic() > deadline:
                raise DemoError(
                    f"the node agents were not {what} within {_START_TIMEOUT:g} s; see "
                    f"{self.path('logs')}"
                )
            time.sleep(0.25)

    def _company_bundle(self) -> Path:
        company = self.path("company")
        bundle = company / "bundle"
        self.ui.step("the AI company scaffolds and signs the example bundle")
        size = str(BUNDLE_SIZE)
        self._cli(
            "job",
            "init",
            str(bundle),
            "--zoo",
            "rapha.SmallCNN",
            "--size",
            size,
            "--labels",
            "effusion",
            "--name",
            "effusion-smallcnn",
        )
        manifest = bundle / "bundle.toml"
        text = manifest.read_text(encoding="utf-8")
        for name, value in {"epochs": EPOCHS, "batch_size": 32, "learning_rate": 0.002}.items():
            text = re.sub(rf"(?m)^{name} = \S+", f"{name} = {value}", text, count=1)
        manifest.write_text(text, encoding="utf-8")
        self._cli("job", "sign", str(bundle), "--key", str(company / "company.key"))
        self.ui.step("the AI company dry-runs it on a synthetic hospital of its own")
        self._cli(
            "job",
            "dry-run",
            str(bundle),
            "--synthetic",
            "--studies",
            "100",
            "--seed",
            str(self.options.seed),
            "--key",
            str(company / "company.pub"),
            "--out",
            str(company / "dry-run"),
        )
        return bundle

    def _submit_and_watch(self, bundle: Path) -> dict[str, Any]:
        from rapha.client import RaphaClient
        from rapha.client.escrow import submit_job

        self.ui.step(f"the AI company submits the job with a {BUDGET / USDC:g} USDC budget")
        client = RaphaClient(self._local().url, self.api_key, timeout=60)
        self._stack.callback(client.close)
        self.client = client
        job = submit_job(
            client,
            bundle,
            requirements=REQUIREMENTS,
            budget=BUDGET,
            max_price_per_record=MAX_PRICE,
            wallet=self.payer,
            chain=self.chain,
        )
        self.job_id = str(job["id"])
        self.ui.step(f"job {self.job_id}: waiting for the hub to route it and a node to run it")
        seen: list[str] = []
        deadline = time.monotonic() + _JOB_TIMEOUT
        with self.path("company", "progress.jsonl").open("a", encoding="utf-8") as log:
            while True:
                view = client.job(self.job_id)
                line = json.dumps(view, sort_keys=True)
                if not seen or seen[-1] != line:
                    seen.append(line)
                    log.write(line + "\n")
                    log.flush()
                self._show(view)
                if view["state"] in ("settled", "failed", "cancelled"):
                    break
                if time.monotonic() > deadline:
                    raise DemoError(
                        f"job {self.job_id} did not finish within "
                        f"{_JOB_TIMEOUT:g} s; see {self.path('logs')}"
                    )
                time.sleep(0.5)
        if view["state"] != "settled":
            raise DemoError(
                f"job {self.job_id} ended {view['state']}: {view.get('failure')}; "
                f"see {self.path('logs')}"
            )
        return view

    def _show(self, view: Mapping[str, Any]) -> None:
        progress = view.get("progress") or {}
        epoch, epochs = progress.get("epoch"), progress.get("epochs")
        phase = progress.get("phase") or view["state"]
        if isinstance(epoch, int) and isinstance(epochs, int) and epochs > 0:
            self.ui.progress(epoch, epochs, f"{view['state']}: {phase} (epochs)")
        else:
            self.ui.progress(0, 0, f"{view['state']}: {phase}")

    def _finish(self, job: Mapping[str, Any], started: float) -> None:
        from rapha.demo.summary import collect

        self.ui.step("the AI company fetches and verifies the result; the summary")
        result = self.path("company", "result")
        self.client.fetch(self.job_id, result)
        self.summary = collect(self, job, result)
        self.summary["wall_seconds"] = round(time.monotonic() - started, 1)
        self.path("summary.json").write_text(
            json.dumps(self.summary, indent=2) + "\n", encoding="utf-8"
        )

    # --- helpers --------------------------------------------------------------------------

    def _local(self) -> LocalHub:
        if self.hub is None:
            raise DemoError("the hub is not running")
        return self.hub

    def _hub(self) -> Any:
        return self._local().parts.hub

    def _balances(self) -> dict[str, dict[str, int]]:
        token = self.chain.token
        parties = {
            "company (payer)": self.payer.address,
            **{h.name: self.payouts[h.slug].address for h in HOSPITALS},
            "protocol treasury": self.chain.treasury.address,
        }
        return {
            who: {
                "wallet": int(self.chain.call(token.functions.balanceOf(address))),
                "vault_credit": self.vault.credit(address),
            }
            for who, address in parties.items()
        }

    def _cli(self, *args: str) -> None:
        """``rapha ARGS`` as the company would type it; output to logs/company.log."""
        import subprocess

        log = self.path("logs", "company.log")
        with log.open("a", encoding="utf-8") as out:
            out.write(f"$ rapha {' '.join(args)}\n")
            out.flush()
            code = subprocess.call(  # noqa: S603 - our own CLI
                [str(Path(sys.executable).with_name("rapha")), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "COLUMNS": "200"},
            )
        if code != 0:
            raise DemoError(f"`rapha {args[0]} {args[1]}` failed (exit {code}); see {log}")


def _keep_label_columns(labels_csv: Path, keep: tuple[str, ...]) -> None:
    """Rewrite ``labels.csv`` with only the ``keep`` findings (a hospital labels what it
    labels)."""
    with labels_csv.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    columns = ["AccessionNumber", *keep]
    with labels_csv.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


@contextlib.contextmanager
def interrupts_as_keyboard() -> Iterator[None]:
    """SIGTERM (and SIGHUP) raise :class:`KeyboardInterrupt` in the main thread, so the
    demo's clean-up runs as it does on Ctrl-C."""
    import signal

    def stop(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
