"""The job lifecycle: a persistent state machine with leases and fencing tokens.

==============  ============================================================================
state           entered when
==============  ============================================================================
``submitted``   the company submits the job
``funded``      the escrow deposit is seen on chain, from the company's wallet, for the
                required amount (and again when a lost lease requeues the job)
``assigned``    the job is leased to an eligible node; every lease carries a new fencing
                token
``running``     the node's heartbeats arrive under the current token
``delivered``   the outbox and receipt were uploaded under the current token and verified
``settled``     the settlement is confirmed on chain
``failed``      admission, sandbox or guard refused, or leases ran out (payer refunds)
``cancelled``   the company cancelled it before it ran (payer refunds)
==============  ============================================================================

Every change goes through :func:`_transition`, which allows only the edges in
:data:`TRANSITIONS` and records a ``job_events`` row. Node calls carry the fencing token
of their lease; a call under an older token (the node lost its lease and the job was
requeued) is refused with :class:`StaleLeaseError`, so a late upload can never overwrite
the work of the node that holds the lease now. On PostgreSQL a claim locks the candidate
rows with ``SELECT … FOR UPDATE SKIP LOCKED``, so several hub processes can hand out
jobs side by side without giving one job to two nodes.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from pydantic import BaseModel, ConfigDict
from sqlalchemy import ForeignKey, Index, Integer, String, false, select, text, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from rapha.errors import RaphaError, UsageError
from rapha.hub.db import Base, Database, OperatorAction, Role, utcnow
from rapha.hub.services import ForbiddenError, Principal

__all__ = [
    "TRANSITIONS",
    "Job",
    "JobEvent",
    "JobService",
    "JobState",
    "JobView",
    "Lease",
    "StaleLeaseError",
    "TransitionError",
]

DEFAULT_LEASE_SECONDS: Final = 900.0
DEFAULT_MAX_ATTEMPTS: Final = 3


class JobState(enum.StrEnum):
    SUBMITTED = "submitted"
    FUNDED = "funded"
    ASSIGNED = "assigned"
    RUNNING = "running"
    DELIVERED = "delivered"
    SETTLED = "settled"
    FAILED = "failed"
    CANCELLED = "cancelled"


S = JobState
TRANSITIONS: Final[dict[JobState, frozenset[JobState]]] = {
    S.SUBMITTED: frozenset({S.FUNDED, S.FAILED, S.CANCELLED}),
    S.FUNDED: frozenset({S.ASSIGNED, S.FAILED, S.CANCELLED}),
    S.ASSIGNED: frozenset({S.RUNNING, S.FUNDED, S.FAILED}),
    S.RUNNING: frozenset({S.DELIVERED, S.FUNDED, S.FAILED}),
    S.DELIVERED: frozenset({S.SETTLED, S.FAILED}),
    S.SETTLED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}
"""Every allowed state change; anything else is a :class:`TransitionError`."""


class TransitionError(RaphaError):
    """The job is not in a state that allows this (HTTP 409)."""


class StaleLeaseError(RaphaError):
    """The caller's fencing token is not the job's current one (HTTP 409)."""


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_claim", "state", "environment", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id"), index=True)
    environment: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    kind: Mapped[str] = mapped_column(String(16))
    bundle_sha256: Mapped[str] = mapped_column(String(64))
    bundle_digest: Mapped[str] = mapped_column(String(64))
    requirements: Mapped[dict[str, Any]] = mapped_column()
    #: Token base units, as decimal strings (amounts exceed 64-bit integers in principle).
    budget: Mapped[str] = mapped_column(String(40))
    max_price_per_record: Mapped[str] = mapped_column(String(40))
    client_job_id: Mapped[str] = mapped_column(String(66))
    chain_job_id: Mapped[str | None] = mapped_column(String(66), default=None)
    node_id: Mapped[str | None] = mapped_column(String(128), default=None, index=True)
    fencing_token: Mapped[int] = mapped_column(Integer, default=0)
    lease_expires_at: Mapped[float | None] = mapped_column(default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=DEFAULT_MAX_ATTEMPTS)
    #: Nodes that lost a lease on this job: a requeue goes to another node.
    excluded_nodes: Mapped[dict[str, Any]] = mapped_column(default=dict)
    explanation: Mapped[str] = mapped_column(String(512), default="")
    failure: Mapped[str] = mapped_column(String(512), default="")
    receipt_hash: Mapped[str | None] = mapped_column(String(64), default=None)
    outbox_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    #: The node's last reported phase and epoch (never anything from inside the sandbox).
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default=text("'{}'"))
    #: A failed or cancelled job's escrow is marked failed in the vault: the payer refunds.
    refundable: Mapped[bool] = mapped_column(default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobEvent(Base):
    """Every transition of every job, in order: the job's own history."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    state: Mapped[str] = mapped_column(String(16))
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)


@dataclass(frozen=True, slots=True)
class Lease:
    """A job handed to a node: it must send ``fencing_token`` with every later call."""

    job_id: str
    node_id: str
    fencing_token: int
    expires_at: float


class JobView(BaseModel):
    """A job as its owner (or its node, or the operator) may see it; also the API schema."""

    model_config = ConfigDict(frozen=True)

    id: str
    state: JobState
    environment: str
    kind: str
    node_id: str | None
    attempts: int
    explanation: str
    failure: str
    client_job_id: str = ""
    chain_job_id: str | None
    receipt_hash: str | None
    progress: dict[str, Any] = {}
    refundable: bool = False

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _view(job: Job) -> JobView:
    return JobView(
        id=job.id,
        state=JobState(job.state),
        environment=job.environment,
        kind=job.kind,
        node_id=job.node_id,
        attempts=job.attempts,
        explanation=job.explanation,
        failure=job.failure,
        client_job_id=job.client_job_id,
        chain_job_id=job.chain_job_id,
        receipt_hash=job.receipt_hash,
        progress=dict(job.progress or {}),
        refundable=bool(job.refundable),
    )


def _transition(session: Session, job: Job, to: JobState, **detail: Any) -> None:
    current = JobState(job.state)
    if to not in TRANSITIONS[current]:
        raise TransitionError(f"job {job.id} is {current.value}; it cannot become {to.value}")
    job.state = to.value
    job.updated_at = utcnow()
    session.add(JobEvent(job_id=job.id, state=to.value, detail=detail))


#: Decides whether a node may take a job: ``(node_id, requirements) -> bool``. The hub
#: passes the matcher (profiles, price, attestation freshness); tests may pass their own.
Eligibility = Callable[[str, dict[str, Any]], bool]


class JobService:
    """The lifecycle over one database (see the module docstring)."""

    def __init__(
        self,
        db: Database,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        self.db = db
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts

    # --- company ------------------------------------------------------------------------

    def submit(
        self,
        principal: Principal,
        *,
        kind: str,
        bundle_sha256: str,
        bundle_digest: str,
        requirements: dict[str, Any],
        budget: int,
        max_price_per_record: int,
        client_job_id: str,
        environment: str | None = None,
    ) -> JobView:
        """Record a company's job (``submitted``), in the environment of its key; a job
        asking for another ``environment`` is refused (a demo key never makes a
        production job, nor the reverse)."""
        if principal.role is not Role.COMPANY:
            raise ForbiddenError("only an AI company submits jobs")
        if environment is not None and environment != principal.environment:
            raise ForbiddenError(
                f"a {principal.environment} API key cannot submit a {environment} job: use a "
                f"{environment} key from the hub operator"
            )
        if kind not in ("train", "evaluate"):
            raise UsageError("a job's kind is train or evaluate")
        if budget <= 0 or max_price_per_record < 0:
            raise UsageError("the budget must be positive and the maximum price not negative")
        with self.db.session() as session:
            job = Job(
                id=secrets.token_hex(8),
                org_id=principal.org_id,
                environment=principal.environment,
                state=JobState.SUBMITTED.value,
                kind=kind,
                bundle_sha256=bundle_sha256,
                bundle_digest=bundle_digest,
                requirements=requirements,
                budget=str(budget),
                max_price_per_record=str(max_price_per_record),
                client_job_id=client_job_id,
                max_attempts=self.max_attempts,
            )
            session.add(job)
            session.flush()  # fills the column defaults the view reads
            session.add(JobEvent(job_id=job.id, state=job.state, detail={}))
            return _view(job)

    def cancel(self, principal: Principal, job_id: str) -> JobView:
        """The owner cancels a job that is not yet running (then refunds on chain)."""
        with self.db.session() as session:
            job = self._owned(session, principal, job_id, lock=True)
            if JobState(job.state) is JobState.CANCELLED:
                return _view(job)  # idempotent
            if JobState(job.state) not in (JobState.SUBMITTED, JobState.FUNDED):
                raise TransitionError(f"job {job_id} is {job.state}; only a job not yet "
                                      "assigned can be cancelled")  # fmt: skip
            _transition(session, job, JobState.CANCELLED, by=principal.org_name)
            return _view(job)

    def get(self, principal: Principal, job_id: str) -> JobView:
        """A company sees its own jobs, a node only jobs leased to it, the operator all."""
        with self.db.session() as session:
            return _view(self._owned(session, principal, job_id))

    def list_jobs(self, principal: Principal) -> list[JobView]:
        """A company's own jobs; all jobs for the operator (an audited read)."""
        with self.db.session() as session:
            query = select(Job).order_by(Job.created_at)
            if principal.is_operator:
                session.add(OperatorAction(actor=f"{principal.org_name}/{principal.key_id}",
                                           action="list_jobs", target="*", detail={}))  # fmt: skip
            else:
                query = query.where(Job.org_id == principal.org_id)
            return [_view(j) for j in session.execute(query).scalars()]

    def _owned(
        self, session: Session, principal: Principal, job_id: str, *, lock: bool = False
    ) -> Job:
        job = session.get(Job, job_id, with_for_update=lock)
        if job is None or (not principal.is_operator and job.org_id != principal.org_id):
            # The same answer for "not yours" as for "does not exist": no tenant probing.
            raise UsageError(f"no job {job_id}")
        return job

    # --- the hub's chain watcher ----------------------------------------------------------

    def mark_funded(self, job_id: str, *, chain_job_id: str, payer: str, budget: int,
                    max_price_per_record: int, wallet: str | None) -> JobView:  # fmt: skip
        """``submitted`` → ``funded`` once the deposit seen on chain is right.

        The deposit must come from the company's registered ``wallet``, for at least the
        budget, committing the job's maximum price; otherwise the job stays ``submitted``
        with an explanation.
        """
        with self.db.session() as session:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None:
                raise UsageError(f"no job {job_id}")
            if JobState(job.state) is JobState.FUNDED and job.chain_job_id == chain_job_id:
                return _view(job)  # idempotent
            problems = []
            if wallet is None or payer.lower() != wallet.lower():
                problems.append("the deposit is not from the company's registered wallet")
            if budget < int(job.budget):
                problems.append(f"the deposit holds {budget}, the job needs {job.budget}")
            if max_price_per_record != int(job.max_price_per_record):
                problems.append("the deposit commits another maximum price per record")
            if problems:
                job.explanation = "; ".join(problems)
                return _view(job)
            job.chain_job_id = chain_job_id
            job.explanation = ""
            _transition(session, job, JobState.FUNDED, chain_job_id=chain_job_id)
            return _view(job)

    # --- nodes ---------------------------------------------------------------------------

    def claim(
        self, node_id: str, environment: str, eligible: Eligibility, *, now: float
    ) -> Lease | None:
        """Lease the oldest funded job this node may take, or ``None``.

        Candidate rows are locked with ``FOR UPDATE SKIP LOCKED`` (PostgreSQL; SQLite
        serialises writers), so two hub processes never lease one job twice.
        """
        with self.db.session() as session:
            candidates = session.execute(
                select(Job)
                .where(Job.state == JobState.FUNDED.value, Job.environment == environment)
                .order_by(Job.created_at)
                .limit(32)
                .with_for_update(skip_locked=True)
            ).scalars()
            for job in candidates:
                if node_id in job.excluded_nodes or not eligible(node_id, job.requirements):
                    continue
                token, expires = job.fencing_token + 1, now + self.lease_seconds
                # A conditional update: of two claims racing for this row (SQLite has no
                # row locks), only the one that still sees it funded wins.
                claimed = session.execute(
                    update(Job)
                    .where(
                        Job.id == job.id,
                        Job.state == JobState.FUNDED.value,
                        Job.fencing_token == job.fencing_token,
                    )
                    .values(
                        state=JobState.ASSIGNED.value,
                        node_id=node_id,
                        fencing_token=token,
                        attempts=Job.attempts + 1,
                        lease_expires_at=expires,
                        updated_at=utcnow(),
                    )
                    .execution_options(synchronize_session=False)
                )
                if getattr(claimed, "rowcount", 0) != 1:
                    continue
                session.add(
                    JobEvent(job_id=job.id, state=JobState.ASSIGNED.value,
                             detail={"node": node_id, "token": token})
                )  # fmt: skip
                return Lease(job.id, node_id, token, expires)
            return None

    def check_lease(self, job_id: str, node_id: str, token: int) -> Job:
        """The job's row (detached: read it, do not change it) if ``node_id`` holds its
        lease under ``token``; :class:`StaleLeaseError` or :class:`UsageError` otherwise.

        For checks that must pass before a node's call changes anything (a delivery is
        verified first, then recorded under the lease again).
        """
        with self.db.session() as session:
            return self._leased(session, job_id, node_id, token)

    def note(self, job_id: str, explanation: str) -> None:
        """Record why a job is not moving on (a deposit not seen, a settlement reverted);
        the owner sees it in :class:`JobView`. Written only when it changed."""
        with self.db.session() as session:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None:
                raise UsageError(f"no job {job_id}")
            if job.explanation != explanation[:512]:
                job.explanation = explanation[:512]
                job.updated_at = utcnow()

    def _leased(self, session: Session, job_id: str, node_id: str, token: int) -> Job:
        job = session.get(Job, job_id, with_for_update=True)
        if job is None:
            raise UsageError(f"no job {job_id}")
        if token != job.fencing_token:
            raise StaleLeaseError(
                f"fencing token {token} is stale (current {job.fencing_token}): this node's "
                "lease on the job ended and it was handed on"
            )
        if job.node_id != node_id:
            raise UsageError(f"job {job_id} is not leased to {node_id}")
        return job

    def heartbeat(self, job_id: str, node_id: str, token: int, *, now: float,
                  audit_head: str | None = None,
                  progress: Mapping[str, Any] | None = None) -> Lease:  # fmt: skip
        """Extend the lease; the first heartbeat moves ``assigned`` → ``running``.

        ``progress`` is the node's phase and epoch counters (:class:`NodeProgress`), shown
        to the job's owner; ``audit_head`` the node's audit-log head, kept in the job's
        events whenever it moves.
        """
        with self.db.session() as session:
            job = self._leased(session, job_id, node_id, token)
            state = JobState(job.state)
            if state is JobState.ASSIGNED:
                _transition(session, job, JobState.RUNNING, audit_head=audit_head)
            elif state is not JobState.RUNNING:
                raise TransitionError(f"job {job_id} is {state.value}; no heartbeat expected")
            if progress is not None:
                job.progress = {**dict(progress), "audit_head": audit_head}
            job.lease_expires_at = now + self.lease_seconds
            return Lease(job.id, node_id, token, job.lease_expires_at)

    def ids_in(self, state: JobState) -> list[str]:
        """Ids of the jobs in ``state``, oldest first (for the hub's background loop)."""
        with self.db.session() as session:
            return list(
                session.execute(
                    select(Job.id).where(Job.state == state.value).order_by(Job.created_at)
                ).scalars()
            )

    def waiting(self) -> list[tuple[str, dict[str, Any], str]]:
        """``(id, requirements, environment)`` of every funded job no node holds."""
        with self.db.session() as session:
            rows = session.execute(
                select(Job.id, Job.requirements, Job.environment)
                .where(Job.state == JobState.FUNDED.value)
                .order_by(Job.created_at)
            ).all()
        return [(row[0], dict(row[1]), row[2]) for row in rows]

    def awaiting_refund(self) -> list[str]:
        """Failed or cancelled jobs whose escrow is not yet released for refund."""
        ended = [JobState.FAILED.value, JobState.CANCELLED.value]
        with self.db.session() as session:
            return list(
                session.execute(
                    select(Job.id).where(Job.state.in_(ended), Job.refundable.is_(False))
                ).scalars()
            )

    def mark_refundable(self, job_id: str) -> None:
        with self.db.session() as session:
            job = session.get(Job, job_id, with_for_update=True)
            if job is not None and not job.refundable:
                job.refundable = True
                session.add(JobEvent(job_id=job.id, state=job.state, detail={"refundable": True}))

    def deliver(
        self,
        job_id: str,
        node_id: str,
        token: int,
        *,
        receipt_hash: str,
        outbox_sha256: str,
        detail: Mapping[str, Any] | None = None,
    ) -> JobView:
        """Record a verified delivery under the current lease (idempotent for the same one).

        ``detail`` is kept in the ``delivered`` event (the hub's countersigned receipt and
        delivery verdict: :mod:`rapha.hub.settlement`).
        """
        with self.db.session() as session:
            job = self._leased(session, job_id, node_id, token)
            if JobState(job.state) is JobState.DELIVERED and job.receipt_hash == receipt_hash:
                return _view(job)
            job.receipt_hash = receipt_hash
            job.outbox_sha256 = outbox_sha256
            job.lease_expires_at = None
            recorded = {**(detail or {}), "receipt_hash": receipt_hash}
            _transition(session, job, JobState.DELIVERED, **recorded)
            return _view(job)

    def fail(self, job_id: str, reason: str, *, node_id: str | None = None,
             token: int | None = None) -> JobView:  # fmt: skip
        """End a job as ``failed`` (a node reporting it must hold the current lease)."""
        with self.db.session() as session:
            if node_id is not None:
                job = self._leased(session, job_id, node_id, token or 0)
            else:
                found = session.get(Job, job_id, with_for_update=True)
                if found is None:
                    raise UsageError(f"no job {job_id}")
                job = found
            if JobState(job.state) is JobState.FAILED:
                return _view(job)
            job.failure = reason[:512]
            job.lease_expires_at = None
            _transition(session, job, JobState.FAILED, reason=reason[:512])
            return _view(job)

    def settle(self, job_id: str, *, tx_hash: str) -> JobView:
        """``delivered`` → ``settled`` once the settlement transaction is confirmed."""
        with self.db.session() as session:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None:
                raise UsageError(f"no job {job_id}")
            if JobState(job.state) is JobState.SETTLED:
                return _view(job)
            job.explanation = ""
            _transition(session, job, JobState.SETTLED, tx_hash=tx_hash)
            return _view(job)

    def expire_leases(self, *, now: float) -> list[JobView]:
        """Requeue every job whose lease ran out (to another node), or fail it when it has
        used its attempts. Returns the jobs it changed."""
        changed = []
        with self.db.session() as session:
            expired: Iterable[Job] = session.execute(
                select(Job)
                .where(
                    Job.state.in_([JobState.ASSIGNED.value, JobState.RUNNING.value]),
                    Job.lease_expires_at < now,
                )
                .with_for_update(skip_locked=True)
            ).scalars()
            for job in expired:
                lost = job.node_id or ""
                job.excluded_nodes = {**job.excluded_nodes, lost: job.fencing_token}
                job.node_id = None
                job.lease_expires_at = None
                if job.attempts >= job.max_attempts:
                    job.failure = f"the lease expired {job.attempts} times; no node finished"
                    _transition(session, job, JobState.FAILED, reason="leases exhausted")
                else:
                    _transition(session, job, JobState.FUNDED, requeued_from=lost)
                changed.append(_view(job))
        return changed

    def events(self, job_id: str) -> list[dict[str, Any]]:
        with self.db.session() as session:
            rows = session.execute(
                select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
            ).scalars()
            return [{"state": e.state, "detail": e.detail} for e in rows]
