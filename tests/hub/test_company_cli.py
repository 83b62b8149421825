"""``rapha job list | status | cancel`` against a real hub on loopback (issue 7)."""

from __future__ import annotations

import hashlib
import json

import pytest
from typer.testing import CliRunner

from rapha.cli import app
from rapha.hub.db import Role
from rapha.hub.services import SYSTEM, Hub
from support.hub import served

JOB = {
    "kind": "evaluate",
    "bundle_digest": "22" * 32,
    "requirements": {"modality": "DX", "body_part": "CHEST", "min_records": 10},
    "budget": 10,
    "max_price_per_record": 1,
    "client_job_id": "0x" + "33" * 32,
}


def test_a_company_lists_follows_and_cancels_its_job(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.create_org(SYSTEM, "acme-ai", Role.COMPANY)
    token = hub.create_key(SYSTEM, "acme-ai", "demo").token
    runner = CliRunner()
    with served(hub) as client:
        auth = {"Authorization": f"Bearer {token}"}
        digest = hashlib.sha256(b"bundle").hexdigest()
        client.put(f"/v1/artifacts/{digest}", content=b"bundle", headers=auth)
        job = client.post("/v1/jobs", json={**JOB, "bundle_sha256": digest}, headers=auth).json()
        monkeypatch.setenv("RAPHA_HUB_URL", str(client.base_url))
        monkeypatch.setenv("RAPHA_API_KEY", token)

        listed = runner.invoke(app, ["job", "list", "--json"])
        shown = runner.invoke(app, ["job", "status", job["id"]])
        cancelled = runner.invoke(app, ["job", "cancel", job["id"]])
        again = runner.invoke(app, ["job", "status", job["id"], "--json"])
        missing = runner.invoke(app, ["job", "status", "0123456789abcdef"])

    assert listed.exit_code == 0, listed.output
    assert [j["id"] for j in json.loads(listed.output)] == [job["id"]]
    assert shown.exit_code == 0
    assert "submitted" in shown.output
    assert cancelled.exit_code == 0
    assert json.loads(again.output)["state"] == "cancelled"
    assert missing.exit_code == 2  # a usage error: no such job of yours
    assert "no job" in missing.output


def test_without_hub_or_key_the_cli_says_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAPHA_HUB_URL", raising=False)
    monkeypatch.delenv("RAPHA_API_KEY", raising=False)
    runner = CliRunner()

    no_hub = runner.invoke(app, ["job", "list"])
    no_key = runner.invoke(app, ["job", "list", "--hub", "http://127.0.0.1:9"])

    assert no_hub.exit_code == 2
    assert "RAPHA_HUB_URL" in no_hub.output
    assert no_key.exit_code == 2
    assert "RAPHA_API_KEY" in no_key.output
