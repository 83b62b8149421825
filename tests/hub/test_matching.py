"""Dataset profiles and the matcher on SQLite and PostgreSQL (issue 7, part 3).

A node is returned only if it is in the job's environment, activated, freshly attested,
publishes the cohort with enough records at an acceptable price, and meets every required
label's minimum; suppressed counts never meet a minimum. The matcher is one statement
whatever the number of nodes, and the explanation names the constraint that bound.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import event, func, select

from rapha import crypto
from rapha.dataset import profile as dataset_profile
from rapha.errors import UsageError
from rapha.hub.db import Node, Role
from rapha.hub.profiles import (
    MAX_LABELS,
    JobRequirements,
    LabelCount,
    NodeLabelCount,
    NodeProfile,
    ProfileService,
    PublishedProfile,
)
from rapha.hub.services import SYSTEM, Hub
from support.hub import register_synthetic_nodes, served

NOW = datetime.now(UTC)
FRESH_AFTER = NOW - timedelta(hours=1)


def published(
    *,
    records: int | None = 1000,
    price: int = 100,
    modality: str = "DX",
    body_part: str = "CHEST",
    **labels: tuple[int | None, int | None],
) -> PublishedProfile:
    """A profile of ``records`` images; ``labels`` maps a finding to (records, positives)."""
    return PublishedProfile(
        k=10,
        modality=modality,
        body_part=body_part,
        records=records,
        price_per_record=price,
        labels={name: LabelCount(records=r, positives=p) for name, (r, p) in labels.items()},
    )


def needs(*labels: tuple[str, int], min_records: int = 100, **extra: Any) -> JobRequirements:
    return JobRequirements.parse(
        {
            "modality": "DX",
            "body_part": "CHEST",
            "labels": [{"name": n, "min_positives": p} for n, p in labels],
            "min_records": min_records,
            **extra,
        }
    )


class Market:
    """A hub with one hospital (``st-mary``) whose nodes are added straight into ``nodes``."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.org_id = hub.create_org(SYSTEM, "st-mary", Role.HOSPITAL)
        self.profiles = ProfileService(hub.db)

    def node(
        self,
        node_id: str,
        *,
        environment: str = "production",
        activated: bool = True,
        attested: datetime | None = NOW - timedelta(minutes=10),
        profile: PublishedProfile | None = None,
    ) -> str:
        with self.hub.db.session() as session:
            session.add(
                Node(
                    id=node_id,
                    org_id=self.org_id,
                    public_key=hashlib.sha256(node_id.encode()).digest(),
                    environment=environment,
                    kind="dev",
                    activated=activated,
                    last_attested_at=attested,
                )
            )
        if profile is not None:
            self.profiles.publish_profile(node_id, profile)
        return node_id

    def match(self, requirements: JobRequirements, environment: str = "production") -> list[str]:
        found = self.profiles.match(requirements, environment=environment, fresh_after=FRESH_AFTER)
        return [m.node_id for m in found]

    def explain(self, requirements: JobRequirements, environment: str = "production") -> str:
        return self.profiles.explain_no_match(
            requirements, environment=environment, fresh_after=FRESH_AFTER
        )


@pytest.fixture
def market(hub: Hub) -> Market:
    return Market(hub)


GOOD = published(effusion=(1000, 200), nodule=(1000, 60))


def test_a_node_with_too_few_positives_is_not_returned(market: Market) -> None:
    market.node("enough", profile=GOOD)
    market.node("too-few", profile=published(effusion=(1000, 40)))

    assert market.match(needs(("effusion", 50))) == ["enough"]


@pytest.mark.parametrize(("max_price", "expected"), [(150, ["cheap"]), (None, ["cheap", "dear"])])
def test_a_price_above_the_maximum_is_not_returned(
    market: Market, max_price: int | None, expected: list[str]
) -> None:
    market.node("cheap", profile=published(price=150, effusion=(1000, 200)))
    market.node("dear", profile=published(price=151, effusion=(1000, 200)))

    assert market.match(needs(("effusion", 50), max_price_per_record=max_price)) == expected


def test_nodes_of_another_environment_stale_or_unactivated_are_not_returned(
    market: Market,
) -> None:
    market.node("ok", profile=GOOD)
    market.node("demo", environment="demo", profile=GOOD)
    market.node("stale", attested=NOW - timedelta(days=2), profile=GOOD)
    market.node("never-attested", attested=None, profile=GOOD)
    market.node("unactivated", activated=False, profile=GOOD)

    assert market.match(needs(("effusion", 50))) == ["ok"]
    assert market.match(needs(("effusion", 50)), environment="demo") == ["demo"]


def test_a_node_without_a_profile_or_of_another_cohort_is_not_returned(market: Market) -> None:
    market.node("no-profile")
    market.node("ct", profile=published(modality="CT", effusion=(1000, 200)))
    market.node("abdomen", profile=published(body_part="ABDOMEN", effusion=(1000, 200)))
    market.node("small", profile=published(records=90, effusion=(90, 20)))

    assert market.match(needs(("effusion", 10))) == []


def test_every_required_label_must_meet_its_minimum(market: Market) -> None:
    market.node("both", profile=GOOD)
    market.node("effusion-only", profile=published(effusion=(1000, 200)))
    market.node("nodule-short", profile=published(effusion=(1000, 200), nodule=(1000, 40)))
    market.node("extra-labels", profile=published(effusion=(1000, 90), nodule=(1000, 90),
                                                  mass=(1000, 10)))  # fmt: skip

    found = market.profiles.match(
        needs(("effusion", 50), ("nodule", 50)), environment="production", fresh_after=FRESH_AFTER
    )

    assert [m.node_id for m in found] == ["both", "extra-labels"]
    assert found[0].positives == {"effusion": 200, "nodule": 60}
    assert found[1].positives == {"effusion": 90, "nodule": 90}


def test_matches_are_ordered_by_price_then_records_then_id(market: Market) -> None:
    market.node("c-mid", profile=published(price=200, records=500, effusion=(500, 100)))
    market.node("b-big", profile=published(price=200, records=900, effusion=(900, 100)))
    market.node("z-cheap", profile=published(price=50, records=200, effusion=(200, 100)))
    market.node("a-mid", profile=published(price=200, records=500, effusion=(500, 100)))

    found = market.profiles.match(
        needs(("effusion", 10)), environment="production", fresh_after=FRESH_AFTER, limit=3
    )

    assert [(m.node_id, m.price_per_record, m.records) for m in found] == [
        ("z-cheap", 50, 200),
        ("b-big", 200, 900),
        ("a-mid", 200, 500),
    ]


def test_suppressed_counts_never_satisfy_a_minimum(market: Market) -> None:
    market.node("suppressed-positives", profile=published(effusion=(1000, None)))
    market.node("suppressed-records", profile=published(records=None, effusion=(None, None)))
    with market.hub.db.session() as session:
        stored = session.get(NodeProfile, "suppressed-records")
        label = session.get(NodeLabelCount, ("suppressed-positives", "effusion"))
        assert stored is not None
        assert label is not None
        assert (stored.records, label.positives) == (0, 0)  # suppressed is stored as 0

    assert market.match(needs(("effusion", 1))) == []
    assert market.match(needs(min_records=1)) == ["suppressed-positives"]
    # A label at a node with no minimum asked of it is matched by its presence alone.
    assert market.match(needs(("effusion", 0))) == ["suppressed-positives"]


def test_publishing_twice_replaces_the_profile_and_its_labels(market: Market) -> None:
    market.node("st-mary-1", profile=GOOD)
    market.profiles.publish_profile(
        "st-mary-1", published(price=300, records=2000, mass=(2000, 500))
    )

    with market.hub.db.session() as session:
        rows = session.execute(select(NodeLabelCount.label)).scalars().all()
        count = session.execute(select(func.count()).select_from(NodeProfile)).scalar_one()
    found = market.profiles.match(
        needs(("mass", 100)), environment="production", fresh_after=FRESH_AFTER
    )

    assert (count, rows) == (1, ["mass"])
    assert [(m.price_per_record, m.records) for m in found] == [(300, 2000)]
    assert market.match(needs(("effusion", 50))) == []


def test_is_eligible_applies_the_same_rules_to_one_node(market: Market) -> None:
    market.node("ok", profile=GOOD)
    market.node("stale", attested=NOW - timedelta(days=2), profile=GOOD)
    plain = needs(("effusion", 50)).model_dump()

    def eligible(node_id: str) -> bool:
        return market.profiles.is_eligible(
            node_id, plain, environment="production", fresh_after=FRESH_AFTER
        )

    assert [eligible(n) for n in ("ok", "stale", "unknown")] == [True, False, False]


# --- explanations ------------------------------------------------------------------------


CROWD = [(100, 500, 40), (200, 800, 30), (300, 1000, 20)]


def _crowd(market: Market) -> None:
    """Three attested DX CHEST nodes: (price, records, effusion positives), nodule 90."""
    for i, (price, records, effusion) in enumerate(CROWD):
        profile = published(
            price=price, records=records, effusion=(records, effusion), nodule=(records, 90)
        )
        market.node(f"n{i}", profile=profile)


@pytest.mark.parametrize(
    ("requirements", "explanation"),
    [
        (
            needs(("effusion", 50)),
            "3 nodes have DX CHEST; none with at least 50 positives of effusion",
        ),
        (
            needs(("nodule", 50), ("effusion", 45), max_price_per_record=150),
            "1 node has DX CHEST priced at most 150 per record; none with at least 45 positives "
            "of effusion",
        ),
        (
            needs(("nodule", 95), min_records=600),
            "2 nodes have DX CHEST with at least 600 records; none with at least 95 positives "
            "of nodule",
        ),
        (
            needs(("effusion", 35), ("nodule", 10), max_price_per_record=250, min_records=600),
            "1 node has DX CHEST with at least 600 records, priced at most 250 per record; none "
            "with at least 35 positives of effusion",
        ),
        (needs(min_records=5000), "3 nodes have DX CHEST; none with at least 5000 records"),
        (
            needs(max_price_per_record=50),
            "3 nodes have DX CHEST; none priced at most 50 per record",
        ),
        (needs(("pneumothorax", 0)), "3 nodes have DX CHEST; none labelled for pneumothorax"),
        (
            JobRequirements.parse({"modality": "CT", "body_part": "HEAD", "min_records": 1}),
            f"3 nodes have attested since {FRESH_AFTER:%Y-%m-%d %H:%M:%S} UTC; none has CT HEAD",
        ),
        (needs(("effusion", 30)), "2 nodes match this job"),
    ],
    # Fixed ids: an id holding FRESH_AFTER (a clock reading) would differ between xdist
    # workers, and xdist refuses workers that collected different tests.
    ids=lambda value: None if isinstance(value, JobRequirements) else "",
)
def test_the_explanation_names_the_binding_constraint(
    market: Market, requirements: JobRequirements, explanation: str
) -> None:
    _crowd(market)

    assert market.explain(requirements) == explanation
    assert (market.match(requirements) == []) == ("match this job" not in explanation)


def test_the_explanation_names_attestation_and_activation(market: Market) -> None:
    assert market.explain(needs()) == (
        "no node in the production environment has published a profile"
    )
    market.node("unactivated", activated=False, profile=GOOD)
    assert market.explain(needs()) == (
        "1 node has published a profile in the production environment; none is activated "
        "(its attestation enrolment is not complete)"
    )
    market.node("stale", attested=NOW - timedelta(days=2), profile=GOOD)
    assert market.explain(needs()) == (
        f"1 node is activated; none has attested since {FRESH_AFTER:%Y-%m-%d %H:%M:%S} UTC"
    )


# --- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"records": 9}, "below k = 10: publish it as null"),
        ({"records": -1}, "greater than or equal to 0"),
        ({"records": True}, "valid integer"),
        ({"records": "100"}, "valid integer"),
        ({"labels": {"effusion": {"records": 100, "positives": 5}}}, "below k"),
        ({"labels": {"effusion": {"records": 100, "positives": 200}}}, "positives exceed"),
        ({"labels": {"effusion": {"records": 2000, "positives": 20}}}, "records exceed"),
        ({"labels": {"bad name; drop": {"records": 100, "positives": 20}}}, "pattern"),
        ({"modality": "dx"}, "pattern"),
        ({"k": 1}, "greater than or equal to 2"),
        ({"price_per_record": -5}, "greater than or equal to 0"),
        ({"patients": 12}, "Extra inputs"),
        (
            {"labels": {f"f{i}": {"records": 100, "positives": 20} for i in range(65)}},
            f"at most {MAX_LABELS}",
        ),
    ],
)
def test_a_published_profile_is_validated_strictly(change: dict[str, Any], message: str) -> None:
    body = {**GOOD.model_dump(), **change}

    with pytest.raises(ValidationError, match=message):
        PublishedProfile.model_validate(body)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"min_records": 0}, "min_records"),
        ({"labels": [{"name": "a", "min_positives": 1}] * 2}, "named once"),
        ({"labels": [{"name": "a", "min_positives": -1}]}, "min_positives"),
        ({"max_price_per_record": -1}, "max_price_per_record"),
        ({"body_part": "CHEST'--"}, "body_part"),
    ],
)
def test_job_requirements_are_validated_with_the_field_named(
    change: dict[str, Any], message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        JobRequirements.parse({**needs().model_dump(), **change})


def _records(modalities: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    for i in range(120):
        meta = {"modality": modalities[i % len(modalities)], "body_part_examined": "CHEST"}
        yield {"meta": meta, "labels": {"effusion": int(i % 4 == 0), "mass": int(i < 3)},
               "patient": f"p{i}"}  # fmt: skip


def test_the_published_form_of_a_node_profile() -> None:
    computed = dataset_profile(_records(("DX",)), k=10)

    converted = PublishedProfile.from_dataset_profile(computed, price_per_record=2500)

    assert converted.model_dump() == {
        "format": "rapha.profile/1",
        "unit": "images",
        "k": 10,
        "modality": "DX",
        "body_part": "CHEST",
        "records": 120,
        "price_per_record": 2500,
        "labels": {
            "effusion": {"records": 120, "positives": 30},
            "mass": {"records": 120, "positives": None},  # 3 positives: suppressed
        },
    }


def test_a_node_profile_of_several_cohorts_or_withheld_is_not_published() -> None:
    several = dataset_profile(_records(("DX", "CR")), k=10)
    withheld = dataset_profile(list(_records(("DX",)))[:5], k=10)

    with pytest.raises(UsageError, match="one modality and the profile has CR, DX"):
        PublishedProfile.from_dataset_profile(several, price_per_record=1)
    with pytest.raises(UsageError, match="withheld"):
        PublishedProfile.from_dataset_profile(withheld, price_per_record=1)


# --- the route -----------------------------------------------------------------------------


def test_only_the_owning_hospital_publishes_through_the_api(market: Market) -> None:
    hub = market.hub
    hub.create_org(SYSTEM, "other-hospital", Role.HOSPITAL)
    hub.create_org(SYSTEM, "acme-ai", Role.COMPANY)
    pem = crypto.public_key_pem(crypto.generate_private_key().public_key())
    hub.enroll_node(SYSTEM, node_id="st-mary-1", org_name="st-mary", public_key_pem=pem,
                    environment="demo", kind="dev")  # fmt: skip
    keys = {
        "owner": hub.create_key(SYSTEM, "st-mary", "demo").token,
        "owner-production": hub.create_key(SYSTEM, "st-mary", "production").token,
        "other": hub.create_key(SYSTEM, "other-hospital", "demo").token,
        "company": hub.create_key(SYSTEM, "acme-ai", "demo").token,
    }
    body: dict[str, Any] = {"node_id": "st-mary-1", "profile": GOOD.model_dump()}

    def post(who: str, payload: dict[str, Any] = body) -> tuple[int, Any]:
        response = client.post(
            "/v1/node/profile", json=payload, headers={"Authorization": f"Bearer {keys[who]}"}
        )
        return response.status_code, response.json()

    with served(hub) as client:
        refused = {who: post(who)[0] for who in ("other", "company", "owner-production")}
        unknown = post("owner", {**body, "node_id": "st-mary-9"})
        invalid = [
            post("owner", {**body, "profile": {**body["profile"], **change}})[0]
            for change in ({"records": 3}, {"records": "1000"}, {"price_per_record": True})
        ]
        status, stored = post("owner")

    assert refused == {"other": 403, "company": 403, "owner-production": 403}
    assert unknown == (403, {"error": "ForbiddenError", "detail": unknown[1]["detail"]})
    assert invalid == [422, 422, 422]
    assert status == 200
    assert (stored["node_id"], stored["records"], stored["label_count"]) == ("st-mary-1", 1000, 2)


# --- scale ---------------------------------------------------------------------------------


def test_matching_ten_thousand_nodes_is_a_constant_number_of_statements(hub: Hub) -> None:
    register_synthetic_nodes(hub.db, 10_000, now=NOW)
    service = ProfileService(hub.db)
    heavy = needs(("effusion", 100), ("nodule", 50), min_records=1000, max_price_per_record=50_000)
    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(args[2])

    event.listen(hub.db.engine, "before_cursor_execute", count)
    try:
        found = service.match(heavy, environment="production", fresh_after=FRESH_AFTER)
        matched = len(statements)
        explained = service.explain_no_match(
            needs(("hernia", 10**6)), environment="production", fresh_after=FRESH_AFTER
        )
        all_told = len(statements)
    finally:
        event.remove(hub.db.engine, "before_cursor_execute", count)

    assert 0 < len(found) <= 50
    assert matched == 1
    assert all_told - matched == 2
    assert explained.endswith("none with at least 1000000 positives of hernia")
    assert [m.price_per_record for m in found] == sorted(m.price_per_record for m in found)
    assert all(m.positives["effusion"] >= 100 and m.positives["nodule"] >= 50 for m in found)
