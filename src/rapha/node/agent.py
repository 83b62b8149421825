"""The node agent, ``rapha node run``: pulls jobs from the hub and runs them here.

The agent only connects out (``[hub]`` in node.toml: URL, CA bundle, proxy). At start it
measures this installation (:func:`rapha.attest.measure.measure`), attests to the hub
with that measurement (``dev`` or ``tpm2`` evidence over the hub's nonce and the node
key) and publishes the node's aggregate, suppressed dataset profile with its price. Then
it long-polls for jobs, re-attesting well inside the hub's freshness window, backing off
with jitter whenever the hub cannot be reached.

One job, under the lease the hub gave (every call carries its fencing token):

1. **details and bundle**: the job's company, kind, terms and bundle, downloaded and
   checked against the job's digests; the signer is *pinned* only if its key is one the
   hospital pinned for that company (``[policy] trusted_keys``), never because the hub
   says so;
2. **admission** (the hospital's Rego policy) before anything touches the PACS: pinned
   keys, organisations, kinds, custom code, DP, price, the epsilon budget;
3. **approval** by a person, when ``[hub] approvals = true`` (``rapha node approvals``);
4. **view**, built for this job from the PACS through the node's pipeline;
5. **run**: the runtime pipeline (:func:`rapha.node.job.run_job`): sandboxed train and
   predict, trusted evaluation, the output guard;
6. **receipt and delivery**: the receipt is signed with the node key and the hospital's
   settlement key, a fresh delivery quote binds it, and the outbox is uploaded.

Heartbeats carry the phase, the epoch counters and the audit-log head, never anything from
inside the sandbox. A failure is reported to the hub as a code only (``admission_rejected:
unpinned_signer``, ``sandbox_failed: timeout``, ``guard_denied: …``); the hub then fails
the job on chain so the payer can refund. The job's working directory (bundle, view, test
labels, sandbox state) is deleted afterwards unless ``[hub] keep_views`` opts in to
keeping the view, the node's evaluation (test labels and predictions) and a copy of the
outbox under the state directory (``views/``, ``evaluations/``, ``outboxes/``). Everything
is recorded in the node's audit log (``agent.*`` events).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import random
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from rapha import crypto
from rapha.attest import DevProvider, Event, delivery_nonce
from rapha.audit import AuditLog
from rapha.client import ConflictError, HubError, NodeClient
from rapha.errors import (
    ConfigError,
    IntegrityError,
    PolicyError,
    RaphaError,
    RemoteError,
    UsageError,
)
from rapha.node.job import JobError, JobRules, decide_admission, run_job, sandbox_from_settings
from rapha.node.settings import HubLinkSettings, NodeSettings
from rapha.runtime.progress import ProgressEvent

__all__ = ["NodeAgent", "failure_reason", "policy_digest"]

log = logging.getLogger("rapha.node.agent")

#: Largest bundle the agent downloads.
MAX_BUNDLE_BYTES: Final = 2 << 30
#: Re-attest after this long (the hub gives jobs only within an hour of an attestation).
REATTEST_SECONDS: Final = 1200.0
_APPROVAL_POLL: Final = 1.0
_CODE = re.compile(r"(?:^|; )([a-z][a-z0-9_]*):")


class _LeaseLostError(RaphaError):
    """The hub handed the job on (a stale fencing token): stop, report nothing."""


def failure_reason(kind: str, exc: BaseException) -> str:
    """The code-only reason sent to the hub: ``kind: code, code`` (no message text, so no
    value from the hospital's data can leave through it)."""
    if isinstance(exc, JobError):
        return f"{kind}: {exc.code}"
    message = str(exc)
    _, _, tail = message.partition(": ")
    codes = sorted(set(_CODE.findall(tail)))
    return f"{kind}: {', '.join(codes)}" if codes else f"{kind}: {type(exc).__name__}"


def _stage(phase: str, exc: BaseException) -> str:
    """What failed, for the hub: the admission, the sandbox, the guard, or the node."""
    if isinstance(exc, JobError):
        return "sandbox_failed"
    if isinstance(exc, PolicyError):
        return "guard_denied" if "output guard" in str(exc) else "admission_rejected"
    return "node_error"


def policy_digest(settings: NodeSettings) -> str:
    """SHA-256 of the hospital's rules: the ``[policy]`` values and both Rego policies."""
    from rapha.runtime.policy import default_policy_text

    policy = settings.policy
    admission = (
        policy.admission.read_text(encoding="utf-8")
        if policy.admission
        else default_policy_text("admission")
    )
    output = (
        policy.output.read_text(encoding="utf-8")
        if policy.output
        else default_policy_text("output")
    )
    texts = {"admission": crypto.digest_bytes(admission.encode()),
             "output": crypto.digest_bytes(output.encode())}  # fmt: skip
    return crypto.digest_bytes(crypto.canonical_json({**policy.policy_input(), **texts}))


class _EpsilonLedger:
    """The DP epsilon DP jobs spent on this node's dataset, in ``state/epsilon.json``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "epsilon.json"
        self._lock = state_dir / ".epsilon.lock"

    def spent(self) -> float:
        try:
            value = json.loads(self.path.read_text(encoding="utf-8"))["spent"]
        except FileNotFoundError:
            return 0.0
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"{self.path} is corrupt; the epsilon spent is unknown") from exc
        return float(value)

    def add(self, epsilon: float) -> float:
        with self._lock.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            total = self.spent() + epsilon
            crypto.write_private_atomic(self.path, json.dumps({"spent": total}).encode())
        return total


class _Heartbeat:
    """Heartbeats in a thread while a job runs: phase, epochs, audit head."""

    def __init__(
        self, client: NodeClient, job_id: str, token: int, audit: AuditLog, interval: float
    ) -> None:
        self.client, self.job_id, self.token, self.audit = client, job_id, token, audit
        self.interval = interval
        self.progress: dict[str, Any] = {"phase": "bundle"}
        #: The bundle's declared epochs, once known (0: no training).
        self.epochs = 0
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def start(self) -> None:
        self.beat()  # the first heartbeat moves the job to running
        self._thread.start()

    def phase(self, name: str) -> None:
        self.progress = {"phase": name}
        self.check()
        self.beat()

    def event(self, event: ProgressEvent) -> None:
        """Only the epoch counter reaches the hub, clamped to the bundle's declared epochs:
        step counters and losses are the sandbox's numbers and stay with the hospital."""
        if self.epochs and event.epoch is not None:
            self.progress = {"phase": "train", "epoch": min(max(event.epoch, 0), self.epochs),
                             "epochs": self.epochs}  # fmt: skip

    def check(self) -> None:
        if self.lost:
            raise _LeaseLostError(f"the hub handed job {self.job_id} on; this node stops it")

    def beat(self) -> None:
        try:
            self.client.heartbeat(self.job_id, self.token, self.audit.head(), self.progress)
        except ConflictError:
            self.lost = True
        except (RemoteError, HubError) as exc:  # the hub is down: the job goes on
            log.warning("heartbeat for %s failed (%s); retrying", self.job_id, exc)

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()


class NodeAgent:
    """The hospital side of the hub protocol (module docstring)."""

    def __init__(
        self,
        settings: NodeSettings,
        *,
        client: NodeClient | None = None,
        say: Callable[[str], None] | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        if settings.hub is None:
            raise ConfigError("node.toml has no [hub] table: rapha node run needs the hub's URL")
        self.settings = settings
        self.link: HubLinkSettings = settings.hub
        self.keys = settings.keys.load()
        self.link.load_settlement_key()  # refuse to start without a usable settlement key
        self.audit = AuditLog(settings.audit_log, self.keys.signing_key)
        self.client = client or NodeClient(
            self.link.url,
            self.link.node_id,
            self.keys.signing_key,
            verify=self.link.ca_bundle or True,
            proxy=self.link.proxy,
        )
        self.sandbox = sandbox_from_settings(settings.sandbox)
        self.say = say or (lambda text: log.info("%s", text))
        self.stopping = threading.Event()
        self._sleep = sleep or (lambda seconds: self.stopping.wait(seconds))
        self._random = random.Random()  # noqa: S311 - jitter, not secrets
        self._measurement: str | None = None
        self._events: list[Event] = []
        self._attested_at = 0.0
        self._assignment: dict[str, Any] = {}
        self._epsilon = _EpsilonLedger(settings.state_dir)
        self._slots = threading.BoundedSemaphore(self.link.concurrency)
        self._running: list[threading.Thread] = []

    # --- attestation and profile ---------------------------------------------------------

    def _provider(self) -> Any:
        if self.link.attestation == "dev":
            return DevProvider(self.keys.signing_key)
        from rapha.attest.tpm2 import Tpm2Provider

        assert self.link.tpm_tcti is not None  # the settings require it for tpm2
        return Tpm2Provider(self.link.tpm_tcti, pcr=self.link.tpm_pcr,
                            ak_handle=self.link.tpm_ak_handle)  # fmt: skip

    def measure(self) -> str:
        """Measure this installation once (a few seconds); the digest is what is attested."""
        if self._measurement is None:
            from rapha.attest.measure import measure

            measured = measure(self.sandbox)
            self._measurement = measured.digest
            self._events = [Event(e["component"], e["digest"]) for e in measured.events()]
            self.say(f"measurement {measured.digest}")
        return self._measurement

    def _evidence(self, nonce: bytes) -> dict[str, Any]:
        public = crypto.public_key_bytes(self.keys.signing_key.public_key())
        evidence = self._provider().evidence(
            node_id=self.link.node_id,
            node_public_key=public,
            nonce=nonce,
            measurement=self.measure(),
            events=self._events,
        )
        data: dict[str, Any] = evidence.to_json()
        return data

    def attest(self) -> dict[str, Any]:
        """Answer a fresh hub challenge; the hub then gives this node jobs for a while."""
        evidence = self._evidence(self.client.challenge())
        verdict = self.client.attest(evidence)
        self._assignment = {"assignment": evidence, "verdict": verdict}
        self._attested_at = time.monotonic()
        self.audit.append("agent.attested", {"measurement": verdict.get("measurement"),
                                             "kind": verdict.get("kind")})  # fmt: skip
        self.say(f"attested to the hub ({verdict.get('kind')})")
        return verdict

    def publish_profile(self) -> dict[str, Any]:
        """Publish the aggregate, suppressed profile of this node's scope, with its price."""
        from rapha.hub.profiles import PublishedProfile
        from rapha.node.preview import profile_node

        profile = profile_node(self.settings, k=self.settings.policy.k_anonymity)
        published = PublishedProfile.from_dataset_profile(
            profile, price_per_record=self.link.price_per_record
        )
        result = self.client.publish_profile(published.model_dump(mode="json"))
        self.audit.append("agent.profile", {"records": published.records,
                                            "labels": sorted(published.labels)})  # fmt: skip
        self.say(f"published the profile ({published.records} records)")
        return result

    # --- the loop ------------------------------------------------------------------------

    def start(self) -> None:
        """Measure, attest and publish, retrying with backoff while the hub is away.

        A refused attestation (this measurement is not allowlisted yet, the node not
        enrolled) is retried every ``backoff_max`` seconds, saying what the operator must
        do, so a node can be started before the hub operator has allowlisted it.
        """
        measurement = self.measure()
        while not self.stopping.is_set():
            try:
                self._retrying(self.attest)
                break
            except (HubError, UsageError) as exc:  # 400/401/403: refused, not unreachable
                self.say(f"the hub refused the attestation ({exc}): ask the hub operator to "
                         f"enrol {self.link.node_id} and allow measurement {measurement}; "
                         f"retrying in {self.link.backoff_max:g} s")  # fmt: skip
                self._sleep(self.link.backoff_max)
        if not self.stopping.is_set():
            self._retrying(self.publish_profile)

    def run(self, *, max_jobs: int | None = None) -> int:
        """Claim and run jobs until :attr:`stopping` is set (or ``max_jobs`` have ended);
        returns how many jobs it took."""
        self.start()
        taken = 0
        while not self.stopping.is_set() and (max_jobs is None or taken < max_jobs):
            if not self._slots.acquire(timeout=1.0):
                continue
            lease = self._claim()
            if lease is None:
                self._slots.release()
                continue
            taken += 1
            thread = threading.Thread(target=self._job_slot, args=(lease,), daemon=True)
            self._running = [t for t in self._running if t.is_alive()] + [thread]
            thread.start()
        for thread in self._running:
            thread.join()
        return taken

    def _job_slot(self, lease: Mapping[str, Any]) -> None:
        try:
            self.handle(lease)
        finally:
            self._slots.release()

    def _claim(self) -> dict[str, Any] | None:
        def claim() -> dict[str, Any] | None:
            if time.monotonic() - self._attested_at > REATTEST_SECONDS:
                self.attest()
            return self.client.claim(wait=self.link.poll_wait)

        lease: dict[str, Any] | None = self._retrying(claim)
        return lease

    def _retrying(self, call: Callable[[], Any]) -> Any:
        """``call()``, retried with exponential backoff and full jitter while the hub is
        unreachable or answers 5xx; other errors (a refusal) are raised."""
        pause = self.link.backoff_initial
        while True:
            try:
                return call()
            except (HubError, RemoteError) as exc:
                status = getattr(exc, "status", 503)
                if status < 500 and status != 429:
                    raise
                wait = self._random.uniform(0, pause)
                self.say(f"the hub is unavailable ({exc}); retrying in {wait:.1f} s")
                if self.stopping.is_set():
                    return None
                self._sleep(wait)
                pause = min(self.link.backoff_max, pause * 2)

    # --- one job -------------------------------------------------------------------------

    def handle(self, lease: Mapping[str, Any]) -> str:
        """Run one leased job to delivery or failure; returns ``delivered``, ``failed`` or
        ``lost`` (the lease was handed on)."""
        job_id, token = str(lease["job_id"]), int(lease["fencing_token"])
        work = self.settings.state_dir / "jobs" / job_id
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True, mode=0o700)
        beat = _Heartbeat(self.client, job_id, token, self.audit, self.link.heartbeat_seconds)
        try:
            beat.start()
            details = self.client.job(job_id, token)
            self.audit.append("agent.claimed", {
                "job_id": job_id, "org": details["company"], "kind": details["kind"],
                "bundle_digest": details["bundle_digest"],
                "price_per_record": self.link.price_per_record,
                "requirements": details["requirements"],
            })  # fmt: skip
            self.say(f"job {job_id} from {details['company']} ({details['kind']})")
            verified, pinned = self._bundle(job_id, token, details, work)
            train = verified.manifest.train
            beat.epochs = train.epochs if train is not None else 0
            beat.phase("admission")
            rules = JobRules.from_settings(self.settings.policy)
            facts = self._facts(details)
            job_meta = {"id": job_id, "job_id": job_id, "org": details["company"],
                        "kind": details["kind"],
                        "model_source": verified.manifest.model.source.value,
                        "bundle_digest": verified.digest, **facts}  # fmt: skip
            self._check_price(details)
            decide_admission(verified, rules, job_meta, pinned=pinned)
            if self.link.approvals:
                beat.phase("approval")
                self._await_approval(job_id, details, verified, pinned, beat)
            beat.phase("view")
            view, needles = self._view(job_id, verified, work)
            started = datetime.now(UTC)
            outcome = run_job(
                verified, job_id=job_id, org=details["company"], view=view.out,
                private_dir=work / "private", needles=needles, sandbox=self.sandbox,
                workdir=work / "job", outbox=work / "outbox", audit=self.audit,
                signer_pinned=pinned, rules=rules, quota=self._quota(),
                on_phase=beat.phase, on_event=beat.event, facts=facts,
            )  # fmt: skip
            if outcome.dp is not None:
                self._epsilon.add(outcome.dp.epsilon)
            beat.phase("receipt")
            delivery = self._receipt(job_id, details, verified, view.digest, outcome, started)
            beat.phase("deliver")
            self._deliver(job_id, token, delivery, work / "outbox")
            self.audit.append("agent.delivered", {
                "job_id": job_id, "receipt_hash": delivery["receipt"]["receipt_hash"],
                "files": [{"name": f.name, "size": f.size, "sha256": f.sha256}
                          for f in outcome.decision.files],
            })  # fmt: skip
            self.say(f"job {job_id} delivered")
            return "delivered"
        except _LeaseLostError:
            return self._lost(job_id)
        except ConflictError as exc:
            if exc.error == "StaleLeaseError":
                return self._lost(job_id)
            self._fail(job_id, token, failure_reason("node_error", exc))
            return "failed"
        except (RaphaError, OSError) as exc:
            self._fail(job_id, token, failure_reason(_stage(beat.progress["phase"], exc), exc))
            self.say(f"job {job_id} failed: {exc}")
            return "failed"
        finally:
            beat.stop()
            self._cleanup(job_id, work)

    def _lost(self, job_id: str) -> str:
        self.audit.append("agent.lost_lease", {"job_id": job_id})
        self.say(f"job {job_id}: the hub handed it on; this node stopped it")
        return "lost"

    def _bundle(
        self, job_id: str, token: int, details: Mapping[str, Any], work: Path
    ) -> tuple[Any, bool]:
        from rapha.runtime.bundle import key_fingerprint, verify_bundle

        tar = self.client.download_bundle(job_id, token, details["bundle_sha256"],
                                          work / "bundle.tar", limit=MAX_BUNDLE_BYTES)  # fmt: skip
        # Any valid signature verifies here; whether its key is pinned is the policy's call.
        verified = verify_bundle(tar, trusted_keys=None, workdir=work / "bundle")
        if verified.digest != details["bundle_digest"]:
            raise IntegrityError("the bundle's digest is not the one the job was submitted with")
        if verified.manifest.bundle.kind.value != details["kind"]:
            raise IntegrityError("the bundle's kind is not the job's kind")
        pinned_keys = self.settings.policy.pinned_keys(str(details["company"]))
        pinned = verified.signer_fingerprint in {key_fingerprint(k) for k in pinned_keys}
        return verified, pinned

    def _facts(self, details: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "hub_job_id": details["id"],
            "price_per_record": int(details["max_price_per_record"]),
            "epsilon_spent": self._epsilon.spent(),
        }

    def _check_price(self, details: Mapping[str, Any]) -> None:
        if self.link.price_per_record > int(details["max_price_per_record"]):
            raise PolicyError("the job was refused: price_too_low: the job pays less per "
                              "record than this node asks")  # fmt: skip

    def _quota(self) -> Any:
        from rapha.node.quota import EvaluationQuota

        return EvaluationQuota(self.settings.state_dir,
                               limit=self.settings.policy.evaluation_quota)  # fmt: skip

    def _await_approval(
        self, job_id: str, details: Mapping[str, Any], verified: Any, pinned: bool,
        beat: _Heartbeat,
    ) -> None:  # fmt: skip
        from rapha.node.approvals import ApprovalStore

        manifest = verified.manifest
        manifest_json = manifest.to_json()
        store = ApprovalStore(self.settings.state_dir)
        store.request(job_id, {
            "org": details["company"], "kind": details["kind"],
            "bundle_digest": verified.digest, "signer_fingerprint": verified.signer_fingerprint,
            "signer_pinned": pinned, "model": manifest_json["model"],
            "hparams": manifest_json.get("train") or {},
            "outputs": list(manifest.outputs.files),
            "dp": manifest_json.get("privacy") if manifest.privacy.dp else None,
            "price_per_record": self.link.price_per_record,
            "records": int(details["requirements"].get("min_records", 0)),
            "requirements": details["requirements"],
        })  # fmt: skip
        self.say(f"job {job_id} waits for approval: rapha node approvals show {job_id}")
        while True:
            approval = store.get(job_id)
            status = approval.status if approval is not None else "pending"
            if status == "approved":
                return
            if status == "rejected":
                raise PolicyError("the job was refused: rejected_by_hospital: a person at the "
                                  "hospital rejected it")  # fmt: skip
            beat.check()
            if self.stopping.is_set():
                raise _LeaseLostError("the node is stopping")
            self._sleep(_APPROVAL_POLL)

    def _view(self, job_id: str, verified: Any, work: Path) -> tuple[Any, tuple[str, ...]]:
        from rapha.node.pipeline import build_view
        from rapha.node.sources import open_source
        from rapha.node.synthetic import NeedleCollector

        collector = NeedleCollector()
        summary = build_view(
            self.settings,
            open_source(self.settings, self.keys),
            out=work / "view",
            private_dir=work / "private",
            job_id=job_id,
            job_salt=secrets.token_bytes(32),
            keys=self.keys,
            size=tuple(verified.manifest.input.size),
            on_instance=collector,
        )
        return summary, collector.needles

    def _receipt(
        self, job_id: str, details: Mapping[str, Any], verified: Any,
        view_digest: str, outcome: Any, started: datetime,
    ) -> dict[str, Any]:  # fmt: skip
        from rapha.receipt import SettlementTerms, build_receipt, sign_receipt

        chain = details.get("chain")
        if chain is None or details.get("chain_job_id") is None:
            raise IntegrityError("the hub sent no settlement terms for this job")
        terms = SettlementTerms(
            chain_id=int(chain["chain_id"]),
            vault=str(chain["vault"]),
            token=str(chain["token"]),
            chain_job_id=bytes.fromhex(str(details["chain_job_id"]).removeprefix("0x")),
            hospital_id=bytes.fromhex(self.link.hospital_id.removeprefix("0x")),
            payout=self.link.payout,
            budget=int(details["budget"]),
            price_per_record=self.link.price_per_record,
        )
        job_digest = crypto.digest_bytes(crypto.canonical_json({
            "id": job_id, "kind": details["kind"], "bundle_digest": verified.digest,
            "requirements": details["requirements"],
        }))  # fmt: skip
        dp = outcome.dp
        body = build_receipt(
            job_id=job_id,
            kind=str(details["kind"]),
            bundle_digest=verified.digest,
            policy_digests={"hospital": policy_digest(self.settings), "job": job_digest},
            view_digest=view_digest,
            records=int(outcome.records_billed),
            terms=terms,
            outbox=outcome.outbox,
            attestation=self._assignment,
            audit_head=self.audit.head(),
            node_id=self.link.node_id,
            hub_id=self.link.url,
            started=started,
            finished=datetime.now(UTC),
            dp={"epsilon": dp.epsilon, "delta": dp.delta} if dp is not None else None,
        )
        receipt = sign_receipt(body, node_key=self.keys.signing_key,
                               settlement_key=self.link.load_settlement_key())  # fmt: skip
        return {"body": body, "receipt": receipt}

    def _deliver(self, job_id: str, token: int, delivery: Mapping[str, Any], outbox: Path) -> None:
        files = {
            p.name: base64.b64encode(p.read_bytes()).decode()
            for p in sorted(outbox.iterdir())
            if p.name != "receipt.json"
        }

        def send() -> Any:
            nonce = self.client.delivery_nonce(job_id, token)
            quote = self._evidence(delivery_nonce(nonce, delivery["body"]))
            return self.client.deliver(job_id, {
                "fencing_token": token, "receipt": delivery["receipt"],
                "delivery_evidence": quote, "delivery_nonce": nonce.hex(), "files": files,
            })  # fmt: skip

        self._retrying(send)

    def _fail(self, job_id: str, token: int, reason: str) -> None:
        self.audit.append("agent.failed", {"job_id": job_id, "code": reason})
        with contextlib.suppress(ConflictError):  # the lease moved on: nobody expects it
            self._retrying(lambda: self.client.fail(job_id, token, reason[:512]))

    def _cleanup(self, job_id: str, work: Path) -> None:
        kept = []
        if self.link.keep_views:
            # The view, the node's evaluation (test labels, predictions) and a copy of what
            # left: the hospital's own evidence, never sent anywhere.
            for name, where in (("view", "views"), ("private", "evaluations"),
                                ("outbox", "outboxes")):  # fmt: skip
                if (work / name).exists():
                    keep = self.settings.state_dir / where / job_id
                    keep.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                    shutil.move(work / name, keep)
                    kept.append(name)
        removed = sorted(p.name for p in work.iterdir()) if work.exists() else []
        shutil.rmtree(work, ignore_errors=True)
        self.audit.append("agent.cleanup", {"job_id": job_id, "removed": removed, "kept": kept})
