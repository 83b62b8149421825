"""HTTP routes a hospital node's agent uses besides the lease calls: attestation, its own
profile, the details and the bundle of a job it holds, and the hub's chain terms.

Every route here takes a request signed with the node's enrolled key
(:data:`rapha.hub.routes_jobs.NodeCaller`), and a job's details and bundle only under the
node's current fencing token, so a node whose lease was handed on cannot read on.
``GET /v1/chain`` is public: which chain, vault and token the hub settles on.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from rapha.attest import AttestationError, Reason
from rapha.hub.db import Org
from rapha.hub.jobs import JobService
from rapha.hub.profiles import ProfilePublic, ProfileService, PublishedProfile
from rapha.hub.routes_jobs import Jobs, NodeCaller, stream_artifact
from rapha.hub.services import ForbiddenError, Hub
from rapha.hub.settlement import NotConfiguredError, SettlementService

__all__ = ["ChainTerms", "NodeJob", "router"]

router = APIRouter()


class ChainTerms(BaseModel):
    """Where the hub settles: the chain id and the vault and token contracts."""

    chain_id: int
    vault: str
    token: str
    confirmations: int


class Challenge(BaseModel):
    """A single-use nonce (hex) the node's assignment quote binds, valid ``expires_in`` s."""

    nonce: str
    expires_in: float


class Attest(BaseModel):
    evidence: dict[str, Any]


class Attested(BaseModel):
    """The verifier's verdict (what the node's receipts carry beside the evidence)."""

    ok: bool
    node_id: str
    kind: str
    environment: Literal["demo", "production"]
    measurement: str
    nonce: str
    verified_at: str


class NodeJob(BaseModel):
    """What a node needs to run a job it holds: the bundle, the company, the terms."""

    id: str
    kind: str
    environment: str
    company: str = Field(description="The submitting organisation (its keys are pinned).")
    bundle_sha256: str
    bundle_digest: str
    bundle_size: int
    requirements: dict[str, Any]
    budget: int
    max_price_per_record: int
    chain_job_id: str | None
    fencing_token: int
    lease_expires_at: float | None
    chain: ChainTerms | None


def chain_terms(settlement: SettlementService | None) -> ChainTerms | None:
    if settlement is None:
        return None
    token = str(settlement.chain.call(settlement.vault.contract.functions.token()))
    return ChainTerms(
        chain_id=settlement.chain.chain_id,
        vault=settlement.vault.address,
        token=token,
        confirmations=settlement.chain.confirmations,
    )


def _settlement(request: Request) -> SettlementService | None:
    service: SettlementService | None = getattr(request.app.state, "settlement", None)
    return service


@router.get("/v1/chain", response_model=ChainTerms, tags=["public"])
def chain(request: Request) -> ChainTerms:
    """The chain, vault and token this hub settles on (public: deposits go there)."""
    terms = chain_terms(_settlement(request))
    if terms is None:
        raise NotConfiguredError("this hub runs without a chain: jobs cannot be funded")
    return terms


@router.post("/v1/node/attestation/challenge", response_model=Challenge, tags=["node"])
def challenge(request: Request, node: NodeCaller) -> Challenge:
    """A nonce for the node's next attestation (5 minutes, single use)."""
    hub: Hub = request.app.state.hub
    nonce = hub.verifier.challenge(node.id)
    return Challenge(nonce=nonce.hex(), expires_in=hub.verifier.nonce_ttl)


@router.post("/v1/node/attestation", response_model=Attested, tags=["node"])
def attest(body: Attest, request: Request, node: NodeCaller) -> Attested:
    """Verify the node's evidence; while it is fresh, the node is given jobs."""
    hub: Hub = request.app.state.hub
    if body.evidence.get("node_id") != node.id:
        raise AttestationError(Reason.NODE_UNKNOWN, "the evidence names another node")
    environment: Literal["demo", "production"] = (
        "demo" if node.environment == "demo" else "production"
    )
    verdict = hub.attest(body.evidence, environment=environment)
    return Attested.model_validate(verdict.to_json())


@router.put("/v1/node/me/profile", response_model=ProfilePublic, tags=["node"])
def publish_own_profile(
    body: PublishedProfile, request: Request, node: NodeCaller
) -> ProfilePublic:
    """The node publishes its own dataset profile (aggregate, suppressed), replacing the last."""
    profiles: ProfileService = request.app.state.profiles
    return profiles.publish_profile(node.id, body)


def _held(jobs: JobService, job_id: str, node_id: str, token: int) -> Any:
    job = jobs.check_lease(job_id, node_id, token)
    if job.state not in ("assigned", "running"):
        raise ForbiddenError(f"job {job_id} is {job.state}: its details are no longer served")
    return job


@router.get("/v1/node/jobs/{job_id}", response_model=NodeJob, tags=["node"])
def node_job(
    job_id: str, fencing_token: int, request: Request, node: NodeCaller, jobs: Jobs
) -> NodeJob:
    """The job's details, for the node holding its lease under ``fencing_token``."""
    hub: Hub = request.app.state.hub
    job = _held(jobs, job_id, node.id, fencing_token)
    with hub.db.session() as session:
        org = session.get(Org, job.org_id)
        company = org.name if org is not None else ""
    return NodeJob(
        id=job.id,
        kind=job.kind,
        environment=job.environment,
        company=company,
        bundle_sha256=job.bundle_sha256,
        bundle_digest=job.bundle_digest,
        bundle_size=request.app.state.artifacts.size(job.bundle_sha256),
        requirements=job.requirements,
        budget=int(job.budget),
        max_price_per_record=int(job.max_price_per_record),
        chain_job_id=job.chain_job_id,
        fencing_token=job.fencing_token,
        lease_expires_at=job.lease_expires_at,
        chain=chain_terms(_settlement(request)),
    )


@router.get("/v1/node/jobs/{job_id}/bundle", response_class=StreamingResponse, tags=["node"])
def node_bundle(
    job_id: str, fencing_token: int, request: Request, node: NodeCaller, jobs: Jobs
) -> StreamingResponse:
    """The job's bundle (.tar, content-addressed), for the node holding its lease."""
    job = _held(jobs, job_id, node.id, fencing_token)
    return stream_artifact(request.app.state.artifacts, job.bundle_sha256)
