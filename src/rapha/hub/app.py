"""The hub's HTTP API (FastAPI): schemas by role, errors as JSON, health and metrics.

Routes only translate HTTP to :class:`rapha.hub.services.Hub` calls and back; the rules
about who may do what live in the service layer. ``/healthz`` and ``/metrics``
(Prometheus text format) need no key; the OpenAPI document is at ``/openapi.json``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Header, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field

from rapha import __version__
from rapha.attest.evidence import AttestationError
from rapha.errors import IntegrityError, PolicyError, RaphaError, UsageError
from rapha.hub.artifacts import ArtifactStore
from rapha.hub.auth import ReplayGuard
from rapha.hub.db import Role
from rapha.hub.jobs import JobService, StaleLeaseError, TransitionError
from rapha.hub.profiles import ProfilePublic, ProfileService, PublishProfile
from rapha.hub.services import AuthError, ForbiddenError, Hub, NodeView, Principal
from rapha.hub.settlement import NotConfiguredError, SettlementService

__all__ = ["create_app"]


# --- schemas -------------------------------------------------------------------------------


class Health(BaseModel):
    ok: bool
    version: str
    database: str


class WhoAmI(BaseModel):
    org: str
    role: Role
    environment: Literal["demo", "production"]
    key_id: str


class ErrorBody(BaseModel):
    error: str
    detail: str


class CreateOrg(BaseModel):
    """Operator: a new organisation."""

    name: str = Field(min_length=1, max_length=128)
    role: Role
    wallet: str | None = Field(default=None, pattern=r"^0x[0-9a-fA-F]{40}$")


class OrgCreated(BaseModel):
    id: str
    name: str


class CreateKey(BaseModel):
    """Operator: a new API key for an organisation."""

    org: str
    environment: Literal["demo", "production"]
    label: str = Field(default="", max_length=128)


class KeyCreated(BaseModel):
    key_id: str
    environment: Literal["demo", "production"]
    token: str = Field(description="Shown once; the hub stores only a keyed hash of it.")


class AllowMeasurement(BaseModel):
    environment: Literal["demo", "production"]
    measurement: str = Field(pattern=r"^[0-9a-f]{64}$")
    note: str = Field(default="", max_length=256)


# --- the app -------------------------------------------------------------------------------

_STATUS: dict[type[RaphaError], int] = {
    AuthError: 401,
    ForbiddenError: 403,
    UsageError: 400,
    TransitionError: 409,
    StaleLeaseError: 409,
    PolicyError: 413,
    IntegrityError: 400,
    AttestationError: 400,
    NotConfiguredError: 503,
}


def _principal(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> Principal:
    """The caller behind ``Authorization: Bearer rk_…`` (401 otherwise)."""
    token = None
    if authorization is not None and authorization.startswith("Bearer "):
        token = authorization.removeprefix("Bearer ").strip()
    hub: Hub = request.app.state.hub
    return hub.authenticate(token)


Caller = Annotated[Principal, Depends(_principal)]


def create_app(
    hub: Hub,
    *,
    artifacts: ArtifactStore,
    settlement: SettlementService | None = None,
    jobs: JobService | None = None,
) -> FastAPI:
    """The hub's ASGI app over ``hub`` (its database and verifier), ``artifacts``
    (bundles and outboxes) and ``settlement`` (delivery and results; without it those
    routes answer 503)."""
    app = FastAPI(
        title="Rapha hub",
        version=__version__,
        description="Routes model bundles to hospital nodes; see docs/operator.md.",
        responses={401: {"model": ErrorBody}, 403: {"model": ErrorBody}},
    )
    app.state.hub = hub
    app.state.jobs = jobs or JobService(hub.db)
    app.state.replay = ReplayGuard()
    app.state.artifacts = artifacts
    app.state.settlement = settlement
    registry = CollectorRegistry()
    requests = Counter(
        "rapha_hub_requests_total", "HTTP requests", ["method", "route", "status"],
        registry=registry,
    )  # fmt: skip
    latency = Histogram(
        "rapha_hub_request_seconds", "HTTP request latency", ["route"], registry=registry
    )

    @app.middleware("http")
    async def _measure(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        requests.labels(request.method, route, str(response.status_code)).inc()
        latency.labels(route).observe(time.perf_counter() - started)
        return response

    @app.exception_handler(RaphaError)
    async def _error(_request: Request, exc: RaphaError) -> JSONResponse:
        status = next((code for cls, code in _STATUS.items() if isinstance(exc, cls)), 500)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        body = {"error": type(exc).__name__, "detail": str(exc)}
        return JSONResponse(body, status_code=status, headers=headers)

    @app.get("/healthz", response_model=Health, tags=["ops"])
    def healthz() -> Health:
        return Health(ok=True, version=__version__, database=hub.db.dialect)

    @app.get("/metrics", tags=["ops"], response_class=Response)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/whoami", response_model=WhoAmI, tags=["any role"])
    def whoami(caller: Caller) -> WhoAmI:
        return WhoAmI(
            org=caller.org_name,
            role=caller.role,
            environment=caller.environment,
            key_id=caller.key_id,
        )

    @app.post("/v1/admin/orgs", response_model=OrgCreated, status_code=201, tags=["operator"])
    def create_org(body: CreateOrg, caller: Caller) -> OrgCreated:
        org_id = hub.create_org(caller, body.name, body.role, wallet=body.wallet)
        return OrgCreated(id=org_id, name=body.name)

    @app.post("/v1/admin/keys", response_model=KeyCreated, status_code=201, tags=["operator"])
    def create_key(body: CreateKey, caller: Caller) -> KeyCreated:
        key = hub.create_key(caller, body.org, body.environment, label=body.label)
        return KeyCreated(key_id=key.key_id, environment=key.environment, token=key.token)

    @app.delete("/v1/admin/keys/{key_id}", status_code=204, tags=["operator"])
    def revoke_key(key_id: str, caller: Caller) -> Response:
        hub.revoke_key(caller, key_id)
        return Response(status_code=204)

    @app.post("/v1/admin/measurements", status_code=204, tags=["operator"])
    def allow_measurement(body: AllowMeasurement, caller: Caller) -> Response:
        hub.allow_measurement(caller, body.environment, body.measurement, body.note)
        return Response(status_code=204)

    @app.get("/v1/admin/nodes", response_model=list[NodeView], tags=["operator"])
    def list_nodes(caller: Caller) -> list[NodeView]:
        return hub.list_nodes(caller)

    from rapha.hub.routes_jobs import router as job_routes
    from rapha.hub.routes_node import router as node_routes

    app.include_router(job_routes)
    app.include_router(node_routes)

    profiles = ProfileService(hub.db)
    app.state.profiles = profiles

    @app.post("/v1/node/profile", response_model=ProfilePublic, tags=["hospital"])
    def publish_profile(body: PublishProfile, caller: Caller) -> ProfilePublic:
        """A hospital publishes the dataset profile of one of its nodes, replacing the last."""
        return profiles.publish_with_key(caller, body.node_id, body.profile)

    return app
