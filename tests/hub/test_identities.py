"""The hub's foundation on SQLite and on a real PostgreSQL: API keys, roles,
the operator's audit trail, and the attestation store in the database (issue 7)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from rapha import crypto
from rapha.attest.dev import DevProvider
from rapha.attest.evidence import AttestationError, Event, Reason
from rapha.attest.measure import digest_of
from rapha.config import load_settings
from rapha.errors import ConfigError, SignatureError
from rapha.hub.auth import ReplayGuard, sign_node_request, verify_node_request
from rapha.hub.db import ApiKey, Role, open_database
from rapha.hub.services import SYSTEM, Hub
from rapha.hub.settings import HubSettings
from rapha.hub.stores import DatabaseAllowlist
from support.hub import PEPPER, served
from support.orthanc import free_port

EVENTS = (Event("rapha", "aa" * 32), Event("sandbox_profile", "bb" * 32))
MEASUREMENT = digest_of([e.to_json() for e in EVENTS])


class Tenants:
    """An operator, two companies and a hospital, each with a key; one revoked key."""

    def __init__(self, hub: Hub) -> None:
        hub.create_org(SYSTEM, "ops", Role.OPERATOR)
        hub.create_org(SYSTEM, "acme-ai", Role.COMPANY)
        hub.create_org(SYSTEM, "other-ai", Role.COMPANY)
        hub.create_org(SYSTEM, "st-mary", Role.HOSPITAL)
        self.operator = hub.create_key(SYSTEM, "ops", "production").token
        self.company = hub.create_key(SYSTEM, "acme-ai", "demo").token
        self.other_company = hub.create_key(SYSTEM, "other-ai", "production").token
        self.hospital = hub.create_key(SYSTEM, "st-mary", "production").token
        revoked = hub.create_key(SYSTEM, "ops", "production")
        hub.revoke_key(SYSTEM, revoked.key_id)
        self.revoked = revoked.token


@pytest.fixture
def tenants(hub: Hub) -> Tenants:
    return Tenants(hub)


def test_api_keys_are_stored_only_as_a_keyed_hash(hub: Hub, tenants: Tenants) -> None:
    with hub.db.session() as session:
        rows = session.query(ApiKey).all()
    secret = tenants.company.rsplit("_", 1)[1]

    assert rows
    for row in rows:
        assert secret.encode() not in row.secret_hmac
        assert len(row.secret_hmac) == 32
    assert hub.authenticate(tenants.company).org_name == "acme-ai"


@pytest.mark.parametrize(
    "token",
    [None, "", "rk_demo_nothex_xxx", "Bearer x", "rk_demo_0123456789abcdef_" + "A" * 43],
)
def test_missing_malformed_and_unknown_keys_are_refused(hub: Hub, token: str | None) -> None:
    from rapha.hub.services import AuthError

    with pytest.raises(AuthError):
        hub.authenticate(token)


def test_a_key_is_bound_to_its_environment_and_revocable(hub: Hub, tenants: Tenants) -> None:
    from rapha.hub.services import AuthError

    parts = tenants.company.split("_")
    relabelled = "_".join([parts[0], "production", *parts[2:]])
    with pytest.raises(AuthError):
        hub.authenticate(relabelled)
    with pytest.raises(AuthError, match="revoked"):
        hub.authenticate(tenants.revoked)
    assert hub.authenticate(tenants.company).environment == "demo"


ADMIN_ROUTES = [
    ("POST", "/v1/admin/orgs", {"name": "new-org", "role": "company"}),
    ("POST", "/v1/admin/keys", {"org": "acme-ai", "environment": "demo"}),
    ("POST", "/v1/admin/measurements", {"environment": "production", "measurement": "c" * 64}),
    ("GET", "/v1/admin/nodes", None),
    ("DELETE", "/v1/admin/keys/0123456789abcdef", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES)
@pytest.mark.parametrize(
    ("who", "status"),
    [
        ("operator", None),
        ("company", 403),
        ("other_company", 403),
        ("hospital", 403),
        ("revoked", 401),
        ("nobody", 401),
    ],
)
def test_only_the_operator_reaches_admin_routes(
    hub: Hub,
    tenants: Tenants,
    method: str,
    path: str,
    body: dict[str, str] | None,
    who: str,
    status: int | None,
) -> None:
    headers = {} if who == "nobody" else {"Authorization": f"Bearer {getattr(tenants, who)}"}
    before = len(hub.operator_actions())

    with served(hub) as client:
        response = client.request(method, path, json=body, headers=headers)

    if status is None:  # the operator: allowed (an unknown key id to revoke is a 400)
        assert response.status_code in (200, 201, 204, 400), response.text
        assert len(hub.operator_actions()) == before + 1
    else:
        assert response.status_code == status, response.text
        assert response.json()["error"] in ("AuthError", "ForbiddenError")
        assert len(hub.operator_actions()) == before  # nothing done, nothing recorded


def test_every_operator_action_is_in_the_audit_trail(hub: Hub, tenants: Tenants) -> None:
    auth = {"Authorization": f"Bearer {tenants.operator}"}

    with served(hub) as client:
        client.post("/v1/admin/orgs", json={"name": "new-co", "role": "company"}, headers=auth)
        created = client.post(
            "/v1/admin/keys", json={"org": "new-co", "environment": "demo"}, headers=auth
        ).json()
        client.delete(f"/v1/admin/keys/{created['key_id']}", headers=auth)

    actions = hub.operator_actions()
    tail = [(a["action"], a["target"]) for a in actions[-3:]]
    assert tail == [
        ("create_org", "new-co"),
        ("create_key", "new-co"),
        ("revoke_key", created["key_id"]),
    ]
    assert actions[-1]["actor"].startswith("ops/")
    assert all(created["token"] not in str(a) for a in actions)  # the token is never logged


def test_whoami_health_metrics_and_openapi(hub: Hub, tenants: Tenants) -> None:
    with served(hub) as client:
        me = client.get("/v1/whoami", headers={"Authorization": f"Bearer {tenants.company}"})
        health = client.get("/healthz")
        spec = client.get("/openapi.json")
        metrics = client.get("/metrics")

    assert me.json() == {
        "org": "acme-ai",
        "role": "company",
        "environment": "demo",
        "key_id": tenants.company.split("_")[2],
    }
    assert health.json()["ok"] is True
    assert health.json()["database"] == hub.db.dialect
    assert "/v1/admin/orgs" in spec.json()["paths"]
    assert 'rapha_hub_requests_total{method="GET",route="/v1/whoami",status="200"}' in (
        metrics.text
    )


def test_settings_refuse_a_default_pepper(tmp_path: Path) -> None:
    config = tmp_path / "hub.toml"
    config.write_text('api_key_pepper = "changeme"\nsigning_key = "hub.key"\n')

    with pytest.raises(ConfigError, match="api_key_pepper"):
        load_settings(HubSettings, config, env={})


def test_dev_node_enrolled_in_the_database_attests_once_per_nonce(
    hub: Hub, tenants: Tenants, db_url: str
) -> None:
    node_key = crypto.generate_private_key()
    pem = crypto.public_key_pem(node_key.public_key())
    hub.enroll_node(
        SYSTEM,
        node_id="st-mary-1",
        org_name="st-mary",
        public_key_pem=pem,
        environment="demo",
        kind="dev",
    )
    hub.allow_measurement(SYSTEM, "demo", MEASUREMENT)
    nonce = hub.verifier.challenge("st-mary-1")
    evidence = DevProvider(node_key).evidence(
        node_id="st-mary-1",
        node_public_key=crypto.public_key_bytes(node_key.public_key()),
        nonce=nonce,
        measurement=MEASUREMENT,
        events=EVENTS,
    )
    # A second hub process on the same database: the nonce is consumed exactly once.
    other = Hub(open_database(db_url), pepper=PEPPER)
    outcomes: list[str] = []

    def attempt(h: Hub) -> None:
        try:
            h.verifier.verify(evidence, environment="demo")
            outcomes.append("ok")
        except AttestationError as exc:
            outcomes.append(exc.reason.value)

    threads = [threading.Thread(target=attempt, args=(h,)) for h in (hub, other, hub, other)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    other.db.close()

    assert sorted(outcomes) == sorted(["ok", *[Reason.NONCE_REPLAYED.value] * 3])
    assert [n.id for n in hub.list_nodes(SYSTEM)] == ["st-mary-1"]
    assert DatabaseAllowlist(hub.db).is_allowed("demo", MEASUREMENT)
    assert not DatabaseAllowlist(hub.db).is_allowed("production", MEASUREMENT)


def test_node_requests_are_signed_fresh_and_single_use() -> None:
    key = crypto.generate_private_key()
    guard = ReplayGuard()
    body = b'{"status": "running"}'
    headers = sign_node_request(key, node_id="n1", method="POST", path="/v1/node/heartbeat",
                                body=body)  # fmt: skip
    check = {"method": "POST", "path": "/v1/node/heartbeat", "query": "", "replay": guard}

    verify_node_request(key.public_key(), headers, body=body, **check)  # type: ignore[arg-type]
    with pytest.raises(SignatureError, match="replayed"):
        verify_node_request(key.public_key(), headers, body=body, **check)  # type: ignore[arg-type]
    fresh = sign_node_request(key, node_id="n1", method="POST", path="/v1/node/heartbeat",
                              body=body)  # fmt: skip
    with pytest.raises(SignatureError):
        verify_node_request(key.public_key(), fresh, body=b"{}", **check)  # type: ignore[arg-type]
    stale = sign_node_request(key, node_id="n1", method="POST", path="/v1/node/heartbeat",
                              body=body, now=time.time() - 3600)  # fmt: skip
    with pytest.raises(SignatureError, match="clock"):
        verify_node_request(key.public_key(), stale, body=body, **check)  # type: ignore[arg-type]


def test_rapha_hub_serve_answers_on_loopback(tmp_path: Path) -> None:
    rapha = str(Path(sys.executable).with_name("rapha"))
    subprocess.run([rapha, "hub", "init", str(tmp_path / "hub")], check=True, capture_output=True)
    port = free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:  # a file, not a pipe: reading it never blocks
        proc = subprocess.Popen(
            [rapha, "hub", "serve", "--config", str(tmp_path / "hub" / "hub.toml"),
             "--port", str(port), "--db", f"sqlite:///{tmp_path / 'hub.db'}"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "NO_COLOR": "1"},
        )  # fmt: skip
    try:
        # Start-up migrates the database and deploys the embedded chain's contracts:
        # seconds on an idle machine, more while the rest of the suite runs beside it.
        deadline = time.monotonic() + 120
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except httpx.TransportError as exc:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(log_path.read_text()) from exc
                time.sleep(0.2)
        assert health.json()["ok"] is True
        assert httpx.get(f"http://127.0.0.1:{port}/v1/whoami").status_code == 401
        chain = httpx.get(f"http://127.0.0.1:{port}/v1/chain").json()
        assert chain["vault"].startswith("0x")
        assert chain["vault"] in log_path.read_text()  # serve prints where it settles
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
            raise AssertionError("rapha hub serve did not stop on SIGTERM") from None


def test_only_a_freshly_attested_node_with_a_matching_profile_is_eligible(hub: Hub) -> None:
    from rapha.hub.profiles import ProfileService, PublishedProfile

    hub.create_org(SYSTEM, "st-mary", Role.HOSPITAL)
    node_key = crypto.generate_private_key()
    public = crypto.public_key_bytes(node_key.public_key())
    hub.enroll_node(SYSTEM, node_id="st-mary-1", org_name="st-mary", environment="demo",
                    public_key_pem=crypto.public_key_pem(node_key.public_key()),
                    kind="dev")  # fmt: skip
    hub.allow_measurement(SYSTEM, "demo", MEASUREMENT)
    needs = {"modality": "DX", "body_part": "CHEST", "labels": [], "min_records": 10}
    profile = {
        "format": "rapha.profile/1", "modality": "DX", "body_part": "CHEST", "records": 500,
        "price_per_record": 100, "k": 10, "labels": {},
    }  # fmt: skip
    ProfileService(hub.db).publish_profile("st-mary-1", PublishedProfile.model_validate(profile))

    assert not hub.eligible("st-mary-1", needs)  # never attested
    evidence = DevProvider(node_key).evidence(
        node_id="st-mary-1", node_public_key=public, nonce=hub.verifier.challenge("st-mary-1"),
        measurement=MEASUREMENT, events=EVENTS,
    )  # fmt: skip
    verdict = hub.attest(evidence, environment="demo")

    assert verdict.measurement == MEASUREMENT
    assert hub.eligible("st-mary-1", needs)
    assert not hub.eligible("st-mary-1", {**needs, "min_records": 501})
    stale = Hub(hub.db, pepper=PEPPER, attestation_freshness=0.0)
    time.sleep(0.01)
    assert not stale.eligible("st-mary-1", needs)
