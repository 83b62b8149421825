"""HTTP routes of the job lifecycle: companies submit and follow jobs, nodes lease them.

Company routes take an API key (``Authorization: Bearer rk_…``); node routes take a
request signed with the node's enrolled Ed25519 key (:mod:`rapha.hub.auth`). The rules
live in :class:`rapha.hub.jobs.JobService`; these routes only translate.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import random
import time
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from rapha import crypto
from rapha.errors import PolicyError, SignatureError, UsageError
from rapha.hub.app import Caller
from rapha.hub.artifacts import ArtifactStore
from rapha.hub.auth import verify_node_request
from rapha.hub.db import Node, Role
from rapha.hub.jobs import JobService, JobView
from rapha.hub.profiles import JobRequirements
from rapha.hub.services import AuthError, ForbiddenError, Hub
from rapha.hub.settlement import (
    MAX_OUTBOX_BYTES,
    NotConfiguredError,
    ResultRelease,
    SettlementService,
)

__all__ = ["NodeCaller", "router"]

router = APIRouter()

_HEX64 = r"^[0-9a-f]{64}$"


class SubmitJob(BaseModel):
    """Company: a job for a bundle already uploaded (its artifact SHA-256)."""

    kind: Literal["train", "evaluate"]
    bundle_sha256: str = Field(pattern=_HEX64)
    bundle_digest: str = Field(pattern=_HEX64)
    requirements: dict[str, Any]
    budget: int = Field(gt=0)
    max_price_per_record: int = Field(ge=0)
    client_job_id: str = Field(pattern=r"^0x[0-9a-f]{64}$")
    environment: Literal["demo", "production"] | None = Field(
        default=None, description="Must be the API key's environment when given."
    )


class LeaseOut(BaseModel):
    job_id: str
    fencing_token: int
    expires_at: float


class NodeProgress(BaseModel):
    """What a node says about a running job: its phase and counters, nothing else."""

    phase: Literal[
        "bundle", "approval", "view", "admission", "train", "predict", "evaluate", "guard",
        "receipt", "deliver",
    ]  # fmt: skip
    epoch: int | None = Field(default=None, ge=0, le=1_000_000)
    epochs: int | None = Field(default=None, ge=0, le=1_000_000)
    step: int | None = Field(default=None, ge=0, le=1 << 40)
    steps: int | None = Field(default=None, ge=0, le=1 << 40)


class Heartbeat(BaseModel):
    fencing_token: int
    audit_head: str | None = Field(default=None, pattern=_HEX64)
    progress: NodeProgress | None = None


class Failure(BaseModel):
    fencing_token: int
    reason: str = Field(max_length=512, pattern=r"^[a-z_]+(: .*)?$")


def _jobs(request: Request) -> JobService:
    service: JobService = request.app.state.jobs
    return service


async def _node(request: Request) -> Node:
    """The enrolled node that signed this request (401 otherwise)."""
    hub: Hub = request.app.state.hub
    node_id = request.headers.get("X-Rapha-Node", "")
    with hub.db.session() as session:
        node = session.get(Node, node_id)
    if node is None:
        raise AuthError("unknown node: enrol it with rapha hub admin enroll-node")
    body = await request.body()
    try:
        verify_node_request(
            crypto.public_key_from_bytes(node.public_key),
            dict(request.headers.items()),
            method=request.method,
            path=request.url.path,
            query=request.url.query,
            body=body,
            replay=request.app.state.replay,
        )
    except SignatureError as exc:
        raise AuthError(f"the node request signature does not verify: {exc}") from exc
    return node


Jobs = Annotated[JobService, Depends(_jobs)]
NodeCaller = Annotated[Node, Depends(_node)]


class Stored(BaseModel):
    sha256: str
    size: int


#: Largest bundle a company may upload (a .tar of code and initial weights).
MAX_BUNDLE_BYTES = 2 << 30


@router.put("/v1/artifacts/{sha256}", response_model=Stored, status_code=201, tags=["company"])
async def upload(sha256: str, request: Request, caller: Caller) -> Stored:
    """Stream a bundle into the content-addressed store; refused unless it hashes to
    ``sha256``. Only companies upload bundles (nodes upload outboxes with their delivery)."""
    if caller.role is not Role.COMPANY:
        raise ForbiddenError("only an AI company uploads bundles")
    store: ArtifactStore = request.app.state.artifacts
    stored = await store.put_stream_async(
        request.stream(), expected_sha256=sha256, max_bytes=MAX_BUNDLE_BYTES
    )
    return Stored(sha256=stored.sha256, size=stored.size)


@router.post("/v1/jobs", response_model=JobView, status_code=201, tags=["company"])
def submit(body: SubmitJob, request: Request, caller: Caller, jobs: Jobs) -> JobView:
    JobRequirements.parse(body.requirements)  # UsageError naming the bad field
    store: ArtifactStore = request.app.state.artifacts
    if not store.exists(body.bundle_sha256):
        raise UsageError(f"upload the bundle first: PUT /v1/artifacts/{body.bundle_sha256}")
    return jobs.submit(caller, **body.model_dump())


@router.get("/v1/jobs", response_model=list[JobView], tags=["company"])
def list_jobs(caller: Caller, jobs: Jobs) -> list[JobView]:
    return jobs.list_jobs(caller)


@router.get("/v1/jobs/{job_id}", response_model=JobView, tags=["company"])
def get_job(job_id: str, caller: Caller, jobs: Jobs) -> JobView:
    return jobs.get(caller, job_id)


@router.post("/v1/jobs/{job_id}/cancel", response_model=JobView, tags=["company"])
def cancel(job_id: str, caller: Caller, jobs: Jobs) -> JobView:
    return jobs.cancel(caller, job_id)


#: Longest a claim may wait for a job (a long poll), seconds; and how often it looks.
MAX_CLAIM_WAIT = 60.0
_CLAIM_POLL = 1.0


@router.post("/v1/node/claim", response_model=LeaseOut | None, tags=["node"])
async def claim(
    request: Request,
    node: NodeCaller,
    jobs: Jobs,
    wait: Annotated[float, Query(ge=0, le=MAX_CLAIM_WAIT)] = 0.0,
) -> LeaseOut | None:
    """Lease the oldest funded job this node may take; with ``wait``, hold the request
    up to that many seconds until one is there (a long poll), else answer ``null``."""
    hub: Hub = request.app.state.hub
    deadline = time.monotonic() + wait
    while True:
        lease = await run_in_threadpool(
            jobs.claim, node.id, node.environment, hub.eligible, now=time.time()
        )
        left = deadline - time.monotonic()
        if lease is not None or left <= 0 or await request.is_disconnected():
            break
        await asyncio.sleep(min(left, _CLAIM_POLL * random.uniform(0.8, 1.2)))  # noqa: S311
    if lease is None:
        return None
    return LeaseOut(job_id=lease.job_id, fencing_token=lease.fencing_token,
                    expires_at=lease.expires_at)  # fmt: skip


@router.post("/v1/node/jobs/{job_id}/heartbeat", response_model=LeaseOut, tags=["node"])
def heartbeat(job_id: str, body: Heartbeat, node: NodeCaller, jobs: Jobs) -> LeaseOut:
    progress = body.progress.model_dump(exclude_none=True) if body.progress else None
    lease = jobs.heartbeat(job_id, node.id, body.fencing_token, now=time.time(),
                           audit_head=body.audit_head, progress=progress)  # fmt: skip
    return LeaseOut(job_id=lease.job_id, fencing_token=lease.fencing_token,
                    expires_at=lease.expires_at)  # fmt: skip


@router.post("/v1/node/jobs/{job_id}/fail", response_model=JobView, tags=["node"])
def fail(job_id: str, body: Failure, node: NodeCaller, jobs: Jobs) -> JobView:
    return jobs.fail(job_id, body.reason, node_id=node.id, token=body.fencing_token)


# --- delivery, settlement and results (rapha.hub.settlement) ---------------------------------


def _settlement(request: Request) -> SettlementService:
    service: SettlementService | None = getattr(request.app.state, "settlement", None)
    if service is None:
        raise NotConfiguredError(
            "settlement is not configured: the hub operator starts the hub with a chain"
        )
    return service


Settlement = Annotated[SettlementService, Depends(_settlement)]


class LeaseToken(BaseModel):
    fencing_token: int


class DeliveryNonce(BaseModel):
    """A single-use nonce (hex) for the delivery quote, valid ``expires_in`` seconds."""

    nonce: str
    expires_in: float


class Delivery(BaseModel):
    """Node: a finished job's outbox files (base64), receipt and delivery quote.

    One JSON body of at most :data:`MAX_DELIVERY_BYTES`, sent with a ``Content-Length``.
    Large outboxes will move to a streamed upload of each file (a later version).
    """

    fencing_token: int
    receipt: dict[str, Any]
    delivery_evidence: dict[str, Any]
    delivery_nonce: str = Field(pattern=_HEX64)
    files: dict[str, str] = Field(description="outbox file name -> base64 of its bytes")


#: Largest delivery body: the outbox in base64, plus the receipt and the evidence.
MAX_DELIVERY_BYTES = MAX_OUTBOX_BYTES * 4 // 3 + (16 << 20)


def _bounded_delivery(request: Request) -> None:
    """Refuse a delivery over the cap from its ``Content-Length``, before it is read."""
    length = request.headers.get("content-length", "")
    if not length.isdigit():
        raise UsageError("send the delivery with a Content-Length header")
    if int(length) > MAX_DELIVERY_BYTES:
        raise PolicyError(
            f"the delivery is larger than {MAX_DELIVERY_BYTES} bytes; ask the hub operator "
            "about large outboxes"
        )


def _delivery(raw: bytes) -> tuple[Delivery, dict[str, bytes]]:
    try:
        body = Delivery.model_validate_json(raw)
        files = {name: base64.b64decode(data, validate=True) for name, data in body.files.items()}
    except (ValidationError, binascii.Error) as exc:
        raise UsageError(f"the delivery is not a delivery body: {exc}") from exc
    return body, files


@router.post("/v1/node/jobs/{job_id}/delivery-nonce", response_model=DeliveryNonce, tags=["node"])
def delivery_nonce(
    job_id: str, body: LeaseToken, node: NodeCaller, settlement: Settlement
) -> DeliveryNonce:
    """A nonce the node's delivery quote binds with the receipt body (lease holder only)."""
    nonce = settlement.delivery_nonce(job_id, node.id, body.fencing_token)
    return DeliveryNonce(nonce=nonce.hex(), expires_in=settlement.verifier.nonce_ttl)


@router.post(
    "/v1/node/jobs/{job_id}/deliver",
    response_model=JobView,
    tags=["node"],
    dependencies=[Depends(_bounded_delivery)],  # runs before the body is read
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": Delivery.model_json_schema()}},
        }
    },
)
async def deliver(
    job_id: str, request: Request, node: NodeCaller, settlement: Settlement
) -> JobView:
    """Deliver a running job's outbox and receipt; refused, with the failing check named,
    unless everything verifies (:mod:`rapha.hub.settlement`)."""
    body, files = _delivery(await request.body())
    return await run_in_threadpool(
        settlement.deliver,
        job_id,
        node.id,
        body.fencing_token,
        outbox=files,
        receipt=body.receipt,
        delivery_evidence=body.delivery_evidence,
        delivery_nonce=bytes.fromhex(body.delivery_nonce),
    )


@router.get("/v1/jobs/{job_id}/result", response_model=ResultRelease, tags=["company"])
def result(job_id: str, caller: Caller, settlement: Settlement) -> ResultRelease:
    """The countersigned receipt and the outbox's digest, once the job is settled."""
    return settlement.release(caller, job_id)


@router.get("/v1/jobs/{job_id}/outbox", response_class=StreamingResponse, tags=["company"])
def outbox(job_id: str, caller: Caller, settlement: Settlement) -> StreamingResponse:
    """The outbox as a tar of the receipt's files, once the job is settled."""
    released = settlement.release(caller, job_id)
    return stream_artifact(settlement.artifacts, released.outbox_sha256)


def stream_artifact(store: ArtifactStore, sha256: str) -> StreamingResponse:
    """An artifact (a tar) streamed in 1 MiB chunks, with its length and digest."""
    file = store.open(sha256)

    def chunks() -> Iterator[bytes]:
        with file:
            while chunk := file.read(1 << 20):
                yield chunk

    return StreamingResponse(
        chunks(),
        media_type="application/x-tar",
        headers={"Content-Length": str(store.size(sha256)), "X-Rapha-SHA256": sha256},
    )
