"""The job lifecycle on SQLite and PostgreSQL: states, leases, fencing, requeues (issue 7).

Chain and matcher are outside this layer: funding is reported with the figures a chain
watcher reads from the vault, and eligibility is a plain function of the node.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from rapha.errors import UsageError
from rapha.hub.db import Role, open_database
from rapha.hub.jobs import (
    TRANSITIONS,
    JobService,
    JobState,
    StaleLeaseError,
    TransitionError,
)
from rapha.hub.services import SYSTEM, Hub, Principal

PEPPER = "test-pepper-" + "y" * 40
WALLET = "0x" + "ab" * 20
BUDGET, PRICE = 5_000_000, 2_500
REQUIREMENTS = {"modality": "DX", "body_part": "CHEST", "labels": [], "min_records": 10}


class World:
    """A hub database with two companies, and a job service with short leases."""

    def __init__(self, url: str) -> None:
        self.db = open_database(url)
        self.hub = Hub(self.db, pepper=PEPPER)
        self.hub.create_org(SYSTEM, "acme-ai", Role.COMPANY, wallet=WALLET)
        self.hub.create_org(SYSTEM, "other-ai", Role.COMPANY)
        self.acme = self.hub.authenticate(self.hub.create_key(SYSTEM, "acme-ai", "demo").token)
        self.other = self.hub.authenticate(self.hub.create_key(SYSTEM, "other-ai", "demo").token)
        self.jobs = JobService(self.db, lease_seconds=60, max_attempts=2)

    def submit(self, principal: Principal | None = None) -> str:
        view = self.jobs.submit(
            principal or self.acme,
            kind="train",
            bundle_sha256="11" * 32,
            bundle_digest="22" * 32,
            requirements=REQUIREMENTS,
            budget=BUDGET,
            max_price_per_record=PRICE,
            client_job_id="0x" + "33" * 32,
        )
        return view.id

    def funded(self) -> str:
        job_id = self.submit()
        self.jobs.mark_funded(job_id, chain_job_id="0x" + "44" * 32, payer=WALLET,
                              budget=BUDGET, max_price_per_record=PRICE, wallet=WALLET)  # fmt: skip
        return job_id


@pytest.fixture
def world(db_url: str) -> Iterator[World]:
    w = World(db_url)
    yield w
    w.db.close()


def anyone(_node: str, _requirements: object) -> bool:
    return True


def test_the_happy_path_walks_every_state_in_order(world: World) -> None:
    job_id = world.funded()
    lease = world.jobs.claim("node-a", "demo", anyone, now=1000.0)
    assert lease is not None
    world.jobs.heartbeat(job_id, "node-a", lease.fencing_token, now=1010.0, audit_head="ab" * 32)
    world.jobs.deliver(job_id, "node-a", lease.fencing_token, receipt_hash="55" * 32,
                       outbox_sha256="66" * 32)  # fmt: skip
    settled = world.jobs.settle(job_id, tx_hash="0x" + "77" * 32)

    assert settled.state is JobState.SETTLED
    assert [e["state"] for e in world.jobs.events(job_id)] == [
        "submitted", "funded", "assigned", "running", "delivered", "settled",
    ]  # fmt: skip


def test_funding_must_come_from_the_registered_wallet_for_the_full_budget(
    world: World,
) -> None:
    job_id = world.submit()

    wrong = world.jobs.mark_funded(job_id, chain_job_id="0x" + "44" * 32, payer="0x" + "cd" * 20,
                                   budget=BUDGET - 1, max_price_per_record=PRICE,
                                   wallet=WALLET)  # fmt: skip

    assert wrong.state is JobState.SUBMITTED
    assert "registered wallet" in wrong.explanation
    assert "needs 5000000" in wrong.explanation


def test_a_stale_fencing_token_is_refused_after_a_requeue(world: World) -> None:
    job_id = world.funded()
    first = world.jobs.claim("node-a", "demo", anyone, now=1000.0)
    assert first is not None
    world.jobs.heartbeat(job_id, "node-a", first.fencing_token, now=1001.0)

    requeued = world.jobs.expire_leases(now=1000.0 + 120)
    second = world.jobs.claim("node-b", "demo", anyone, now=1200.0)

    assert [v.state for v in requeued] == [JobState.FUNDED]
    assert second is not None
    assert second.node_id == "node-b"
    assert second.fencing_token == first.fencing_token + 1
    # The first node comes back late: its heartbeat and its upload are both refused.
    with pytest.raises(StaleLeaseError, match="stale"):
        world.jobs.heartbeat(job_id, "node-a", first.fencing_token, now=1201.0)
    with pytest.raises(StaleLeaseError, match="stale"):
        world.jobs.deliver(job_id, "node-a", first.fencing_token, receipt_hash="55" * 32,
                           outbox_sha256="66" * 32)  # fmt: skip
    with pytest.raises(UsageError, match="not leased to node-a"):
        world.jobs.deliver(job_id, "node-a", second.fencing_token, receipt_hash="55" * 32,
                           outbox_sha256="66" * 32)  # fmt: skip
    assert world.jobs.get(SYSTEM, job_id).node_id == "node-b"


def test_a_requeued_job_goes_to_another_node_and_fails_when_attempts_run_out(
    world: World,
) -> None:
    job_id = world.funded()
    assert world.jobs.claim("node-a", "demo", anyone, now=0.0) is not None
    world.jobs.expire_leases(now=100.0)

    assert world.jobs.claim("node-a", "demo", anyone, now=100.0) is None  # not the same node
    assert world.jobs.claim("node-b", "demo", anyone, now=100.0) is not None
    failed = world.jobs.expire_leases(now=300.0)

    assert [v.state for v in failed] == [JobState.FAILED]
    assert "lease expired 2 times" in world.jobs.get(SYSTEM, job_id).failure


def test_only_eligible_nodes_in_the_same_environment_claim(world: World) -> None:
    world.funded()

    assert world.jobs.claim("node-p", "production", anyone, now=0.0) is None
    assert world.jobs.claim("node-x", "demo", lambda node, _r: node == "node-y", now=0.0) is None
    assert world.jobs.claim("node-y", "demo", lambda node, _r: node == "node-y", now=0.0)


def test_two_claims_racing_lease_a_job_once(world: World, db_url: str) -> None:
    world.funded()
    other = JobService(open_database(db_url), lease_seconds=60)
    leases: list[object] = []

    def claim(service: JobService, node: str) -> None:
        leases.append(service.claim(node, "demo", anyone, now=0.0))

    threads = [
        threading.Thread(target=claim, args=(s, n))
        for s, n in ((world.jobs, "node-a"), (other, "node-b"))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    other.db.close()

    assert sorted(lease is None for lease in leases) == [False, True]


def test_cancel_only_before_assignment_and_only_by_the_owner(world: World) -> None:
    job_id = world.funded()
    with pytest.raises(UsageError, match=f"no job {job_id}"):
        world.jobs.cancel(world.other, job_id)

    cancelled = world.jobs.cancel(world.acme, job_id)
    again = world.jobs.cancel(world.acme, job_id)  # idempotent

    assert cancelled.state is again.state is JobState.CANCELLED
    running = world.funded()
    assert world.jobs.claim("node-a", "demo", anyone, now=0.0) is not None
    with pytest.raises(TransitionError, match="not yet assigned"):
        world.jobs.cancel(world.acme, running)


def test_a_company_sees_only_its_own_jobs(world: World) -> None:
    mine, theirs = world.submit(), world.submit(world.other)

    assert [j.id for j in world.jobs.list_jobs(world.acme)] == [mine]
    with pytest.raises(UsageError, match=f"no job {theirs}"):
        world.jobs.get(world.acme, theirs)
    assert {j.id for j in world.jobs.list_jobs(SYSTEM)} == {mine, theirs}


def test_failure_is_final_and_transitions_are_idempotent(world: World) -> None:
    job_id = world.funded()
    lease = world.jobs.claim("node-a", "demo", anyone, now=0.0)
    assert lease is not None

    world.jobs.fail(job_id, "guard_denied: extra tensor", node_id="node-a",
                    token=lease.fencing_token)  # fmt: skip
    again = world.jobs.fail(job_id, "guard_denied: extra tensor")

    assert again.state is JobState.FAILED
    with pytest.raises(TransitionError):
        world.jobs.settle(job_id, tx_hash="0x00")


def test_state_survives_a_hub_restart(world: World, db_url: str) -> None:
    job_id = world.funded()
    lease = world.jobs.claim("node-a", "demo", anyone, now=0.0)
    assert lease is not None
    world.db.close()

    restarted = JobService(open_database(db_url), lease_seconds=60)
    view = restarted.get(SYSTEM, job_id)
    restarted.heartbeat(job_id, "node-a", lease.fencing_token, now=10.0)
    restarted.db.close()

    assert (view.state, view.node_id) == (JobState.ASSIGNED, "node-a")


def test_the_transition_table_has_no_way_out_of_a_final_state() -> None:
    for final in (JobState.SETTLED, JobState.FAILED, JobState.CANCELLED):
        assert TRANSITIONS[final] == frozenset()
    assert set(TRANSITIONS) == set(JobState)
