"""Dataset profiles that nodes publish, and the matcher that finds nodes for a job.

**What a node publishes** (:class:`PublishedProfile`, format ``rapha.profile/1``): the
aggregate, suppressed profile of the view a job would get (``rapha node profile``, built
by :func:`rapha.dataset.profile`), narrowed to the one cohort the node serves, with its
price::

    {"format": "rapha.profile/1", "unit": "images", "k": 10,
     "modality": "DX", "body_part": "CHEST", "records": 1200,
     "price_per_record": 10000,
     "labels": {"effusion": {"records": 1200, "positives": 150},
                "nodule": {"records": 1200, "positives": null}}}

Counts are aggregate only. A count below ``k`` is never published: it is ``null``
(suppressed), as the dataset profile's small-cell rules decide; a published count below
``k`` is refused. ``price_per_record`` is in the settlement token's base units (USDC:
10⁻⁶). :meth:`PublishedProfile.from_dataset_profile` turns the ``--json`` output of
``rapha node profile`` into this form.

**What the hub stores** (tables ``node_profiles`` and ``node_label_counts``, migration
0002): one profile row per node and one row per label. *A suppressed count is stored as
0*, so it can never satisfy a minimum of one or more: the hub does not know it, so it
cannot promise it to a company. The published JSON is kept as it came.

**What a job asks** (:class:`JobRequirements`): a modality and body part, a minimum of
records, a minimum of positives per required label, optionally a maximum price.

**Matching** (:meth:`ProfileService.match`) is one SQL statement whatever the number of
nodes, served by the indexes below: nodes of the job's environment, activated, attested
since ``fresh_after``, with the cohort, enough records, an acceptable price, and, for the
required labels, a ``GROUP BY node HAVING COUNT(*) =`` number of labels over the label rows
that meet their minimum. :meth:`ProfileService.explain_no_match` says, in two counting
statements, which constraint left no candidate: the explanation a company is shown.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    ForeignKey,
    Index,
    Integer,
    Select,
    String,
    and_,
    case,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    true,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from rapha.errors import UsageError
from rapha.hub.db import Base, Database, Node, Role, utcnow
from rapha.hub.services import ForbiddenError, Principal

__all__ = [
    "FORMAT",
    "MAX_LABELS",
    "JobRequirements",
    "LabelCount",
    "LabelNeed",
    "Match",
    "NodeFit",
    "NodeLabelCount",
    "NodeProfile",
    "ProfilePublic",
    "ProfileService",
    "PublishProfile",
    "PublishedProfile",
]

FORMAT: Final = "rapha.profile/1"
MAX_LABELS: Final = 64
#: Largest count a profile may carry (a node with a billion images is not a real node).
MAX_COUNT: Final = 10**9
_MAX_PRICE: Final = 2**63 - 1  # BIGINT
#: The dataset profile's cell for a missing value (rapha.dataset.profile.MISSING; not
#: imported, so the hub does not load the dataset package and its pixel decoders).
_MISSING: Final = "(missing)"

#: Modality (0008,0060) and Body Part Examined (0018,0015) are CS values: upper-case
#: letters, digits, space and underscore, at most 16 characters (PS3.5 6.2).
Code = Annotated[str, StringConstraints(pattern=r"^[A-Z0-9_]([A-Z0-9_ ]{0,14}[A-Z0-9_])?$")]
#: The label names a bundle may declare (``[labels] names`` in rapha.runtime.manifest).
LabelName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")]
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
Price = Annotated[int, Field(ge=0, le=_MAX_PRICE)]

_M = TypeVar("_M", bound=BaseModel)
_STRICT = ConfigDict(strict=True, extra="forbid", frozen=True)


# --- tables ----------------------------------------------------------------------------


class NodeProfile(Base):
    """A node's published cohort and price; suppressed counts are stored as 0."""

    __tablename__ = "node_profiles"
    __table_args__ = (
        # The matcher: equality on the cohort, a price range, then ordered by price.
        Index("ix_node_profiles_cohort_price", "modality", "body_part", "price_per_record"),
        Index("ix_node_profiles_cohort_records", "modality", "body_part", "records"),
    )

    node_id: Mapped[str] = mapped_column(String(128), ForeignKey("nodes.id"), primary_key=True)
    modality: Mapped[str] = mapped_column(String(16))
    body_part: Mapped[str] = mapped_column(String(16))
    records: Mapped[int] = mapped_column(Integer)
    price_per_record: Mapped[int] = mapped_column(BigInteger)
    published_at: Mapped[datetime] = mapped_column(default=utcnow)
    profile: Mapped[dict[str, Any]] = mapped_column()


class NodeLabelCount(Base):
    """Records and positives of one label at one node; suppressed counts are stored as 0."""

    __tablename__ = "node_label_counts"
    __table_args__ = (
        # Nodes by label and positives: the planner's way in when a required label is
        # rarer than the cohort. The primary key (node_id, label) serves the other way.
        Index("ix_node_label_counts_label", "label", "positives", "node_id"),
    )

    node_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("node_profiles.node_id"), primary_key=True
    )
    label: Mapped[str] = mapped_column(String(128), primary_key=True)
    records: Mapped[int] = mapped_column(Integer)
    positives: Mapped[int] = mapped_column(Integer)


# --- schemas ---------------------------------------------------------------------------


class LabelCount(BaseModel):
    """One label of a published profile: ``None`` is a suppressed count."""

    model_config = _STRICT

    records: Count | None
    positives: Count | None


class PublishedProfile(BaseModel):
    """What a node publishes (format in the module docstring); validated strictly."""

    model_config = _STRICT

    format: Literal["rapha.profile/1"] = FORMAT
    unit: Literal["images"] = "images"
    k: int = Field(ge=2, le=1000, description="Counts below k are published as null.")
    modality: Code
    body_part: Code
    records: Count | None
    price_per_record: Price = Field(description="In the settlement token's base units.")
    labels: dict[LabelName, LabelCount] = Field(default_factory=dict, max_length=MAX_LABELS)

    @model_validator(mode="after")
    def _suppressed_and_consistent(self) -> PublishedProfile:
        counts = [("records", self.records)]
        pairs: list[tuple[str, int | None, int | None]] = []
        for name, label in self.labels.items():
            counts += [(f"labels.{name}.records", label.records)]
            counts += [(f"labels.{name}.positives", label.positives)]
            pairs += [(f"labels.{name}: positives exceed its records", label.positives,
                       label.records),
                      (f"labels.{name}: records exceed the profile's records", label.records,
                       self.records)]  # fmt: skip
        for where, count in counts:
            if count is not None and count < self.k:
                raise ValueError(
                    f"{where} is {count}, below k = {self.k}: publish it as null (suppressed)"
                )
        for what, part, whole in pairs:
            if part is not None and whole is not None and part > whole:
                raise ValueError(what)
        return self

    @classmethod
    def from_dataset_profile(
        cls, profile: Mapping[str, Any], *, price_per_record: int
    ) -> PublishedProfile:
        """The published form of ``rapha node profile --json`` output.

        The cohort is the profile's one named modality cell and one named body-part cell
        (a ``"(missing)"`` cell is not a cohort); every label's records are the profile's
        total, the denominator its suppression rules use.

        Raises:
            UsageError: the profile is withheld (fewer than k records) or covers several
                modalities or body parts; a node publishes one cohort.
        """
        if profile.get("total") is None:
            raise UsageError(
                "the profile is withheld (fewer than k records): there is nothing to publish"
            )
        cohort = [_one_cell(profile, "modality"), _one_cell(profile, "body_part")]
        total = profile["total"]
        positives: Mapping[str, int | None] = profile.get("labels", {}).get("positives", {})
        return _validated(
            cls,
            {
                "k": profile.get("k"),
                "modality": cohort[0],
                "body_part": cohort[1],
                "records": total,
                "price_per_record": price_per_record,
                "labels": {n: {"records": total, "positives": c} for n, c in positives.items()},
            },
        )


def _one_cell(profile: Mapping[str, Any], dimension: str) -> str:
    found = profile.get("dimensions", {}).get(dimension, {})
    names = sorted(c for c in found.get("cells", {}) if c != _MISSING)
    if found.get("status") != "published" or len(names) != 1:
        shown = ", ".join(names) or "none published"
        raise UsageError(
            f"a node publishes one {dimension.replace('_', ' ')} and the profile has "
            f"{shown}: narrow [scope] in node.toml to one, then profile again"
        )
    name: str = names[0]
    return name


class LabelNeed(BaseModel):
    """A label a job requires, with the fewest positives it needs."""

    model_config = _STRICT

    name: LabelName
    min_positives: int = Field(ge=0, le=MAX_COUNT)


class JobRequirements(BaseModel):
    """What a job needs of a node's data; labels are all required, each named once."""

    model_config = _STRICT

    modality: Code
    body_part: Code
    labels: list[LabelNeed] = Field(default_factory=list, max_length=MAX_LABELS)
    min_records: int = Field(ge=1, le=MAX_COUNT)
    max_price_per_record: Price | None = None

    @model_validator(mode="after")
    def _unique_labels(self) -> JobRequirements:
        names = [need.name for need in self.labels]
        if len(set(names)) != len(names):
            raise ValueError("each required label is named once")
        return self

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> JobRequirements:
        """Validate plain JSON data; :class:`UsageError` names the first bad field."""
        return _validated(cls, data)


def _validated(model: type[_M], data: Mapping[str, Any]) -> _M:
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or model.__name__
        raise UsageError(f"{model.__name__}: {where}: {first['msg']}") from None


class PublishProfile(BaseModel):
    """``POST /v1/node/profile``: a hospital publishes the profile of one of its nodes."""

    model_config = ConfigDict(extra="forbid")

    node_id: str = Field(min_length=1, max_length=128)
    profile: PublishedProfile


class ProfilePublic(BaseModel):
    """A stored profile as the hub shows it to the node's hospital."""

    model_config = ConfigDict(frozen=True)

    node_id: str
    modality: str
    body_part: str
    records: int = Field(description="0 when the node published it suppressed.")
    price_per_record: int
    label_count: int
    published_at: datetime


class Match(BaseModel):
    """An eligible node: its price, records and the positives of each required label."""

    model_config = ConfigDict(frozen=True)

    node_id: str
    price_per_record: int
    records: int
    positives: dict[str, int]


# --- the service -----------------------------------------------------------------------


class ProfileService:
    """Publishing profiles and matching jobs to nodes, over one database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def publish_with_key(
        self, principal: Principal, node_id: str, profile: PublishedProfile
    ) -> ProfilePublic:
        """A hospital's API key publishes for one of its own nodes, in the key's
        environment (until node request signatures authenticate the node itself).

        Raises:
            ForbiddenError: the caller is not a hospital, or the node is not one of its
                nodes in this environment (an unknown node gets the same answer).
        """
        if principal.role is not Role.HOSPITAL:
            raise ForbiddenError("only the hospital that owns a node publishes its profile")
        with self.db.session() as session:
            node = session.get(Node, node_id)
            if (
                node is None
                or node.org_id != principal.org_id
                or node.environment != principal.environment
            ):
                raise ForbiddenError(
                    f"node {node_id!r} is not one of your {principal.environment} nodes: "
                    "use a key of the hospital and environment it was enrolled for"
                )
        return self.publish_profile(node_id, profile)

    def publish_profile(self, node_id: str, profile: PublishedProfile) -> ProfilePublic:
        """Store ``profile`` as ``node_id``'s, replacing what it published before.

        The caller has authenticated the node (or its hospital, :meth:`publish_with_key`).
        Publishes of one node are serialised on its ``nodes`` row.

        Raises:
            UsageError: no node ``node_id`` is enrolled.
        """
        with self.db.session() as session:
            node = session.get(Node, node_id, with_for_update=True)
            if node is None:
                raise UsageError(
                    f"no enrolled node {node_id!r}: enrol it first (rapha hub admin enroll-node)"
                )
            session.execute(delete(NodeLabelCount).where(NodeLabelCount.node_id == node_id))
            stored = session.get(NodeProfile, node_id) or NodeProfile(node_id=node_id)
            stored.modality = profile.modality
            stored.body_part = profile.body_part
            stored.records = profile.records or 0
            stored.price_per_record = profile.price_per_record
            stored.published_at = utcnow()
            stored.profile = profile.model_dump(mode="json")
            session.add(stored)
            session.flush()
            if profile.labels:
                rows = [
                    {
                        "node_id": node_id,
                        "label": name,
                        "records": count.records or 0,
                        "positives": count.positives or 0,
                    }
                    for name, count in profile.labels.items()
                ]
                session.execute(insert(NodeLabelCount), rows)
            return ProfilePublic(
                node_id=node_id,
                modality=stored.modality,
                body_part=stored.body_part,
                records=stored.records,
                price_per_record=stored.price_per_record,
                label_count=len(profile.labels),
                published_at=stored.published_at,
            )

    def match(
        self,
        requirements: JobRequirements,
        *,
        environment: str,
        fresh_after: datetime,
        limit: int = 50,
    ) -> list[Match]:
        """Eligible nodes, cheapest first, then most records, then by id (module docstring).

        One SQL statement, whatever the number of nodes. ``fresh_after`` is the oldest
        attestation time still fresh (timezone-aware).
        """
        if not 1 <= limit <= 1000:
            raise UsageError("a match returns 1 to 1000 nodes: pass a limit in that range")
        eligible = (
            _eligible(requirements, environment, _utc(fresh_after))
            .order_by(*_ORDER)
            .limit(limit)
            .subquery("eligible")
        )
        names = [need.name for need in requirements.labels]
        lc = NodeLabelCount
        query: Select[Any] = select(
            eligible.c.node_id, eligible.c.price_per_record, eligible.c.records
        )
        if names:
            query = query.add_columns(lc.label, lc.positives).outerjoin(
                lc, and_(lc.node_id == eligible.c.node_id, lc.label.in_(names))
            )
        query = query.order_by(
            eligible.c.price_per_record, eligible.c.records.desc(), eligible.c.node_id
        )
        found: dict[str, tuple[int, int, dict[str, int]]] = {}
        with self.db.session() as session:
            for row in session.execute(query):
                positives = found.setdefault(row[0], (row[1], row[2], {}))[2]
                if names and row[3] is not None:
                    positives[row[3]] = row[4]
        return [
            Match(node_id=node_id, price_per_record=price, records=records, positives=positives)
            for node_id, (price, records, positives) in found.items()
        ]

    def is_eligible(
        self,
        node_id: str,
        requirements: JobRequirements | Mapping[str, Any],
        *,
        environment: str,
        fresh_after: datetime,
    ) -> bool:
        """Whether ``node_id`` meets ``requirements`` now (the same rules as :meth:`match`);
        what the job lifecycle asks before it leases a job to a node."""
        if not isinstance(requirements, JobRequirements):
            requirements = JobRequirements.parse(requirements)
        query = _eligible(requirements, environment, _utc(fresh_after)).where(
            NodeProfile.node_id == node_id
        )
        with self.db.session() as session:
            return session.execute(query.limit(1)).first() is not None

    def explain_no_match(
        self, requirements: JobRequirements, *, environment: str, fresh_after: datetime
    ) -> str:
        """Which constraint left no candidate, for the company: two counting statements.

        For example ``"3 nodes have DX CHEST; none with at least 50 positives of
        effusion"``. When some node matches, says how many do. The first statement counts
        the environment's nodes through activation, freshness and cohort; the second,
        only over the cohort's candidates, through records, price and each label.
        """
        stages = _stages(requirements, environment, _utc(fresh_after))
        outer, inner = stages[:_COHORT], stages[_COHORT:]
        with self.db.session() as session:
            counts = _funnel(session, [Node.environment == environment], outer)
            if counts[-1]:
                counts += _funnel(session, [c for _, c in outer], inner)
            else:
                counts += [0] * len(inner)
        return _explain(requirements, environment, _utc(fresh_after), stages, counts)

    def route_table(
        self, requirements: JobRequirements, *, environment: str, fresh_after: datetime
    ) -> list[NodeFit]:
        """Every node of ``environment`` with a profile, and the first requirement of the
        job it fails (``None``: it is eligible), in the order :meth:`match` ranks; the
        operator's and the demo's answer to "why this node".

        Uses the matcher's own conditions, one statement for all nodes.
        """
        stages = _stages(requirements, environment, _utc(fresh_after))
        flags = [case((condition, 1), else_=0) for _, condition in stages]
        query = (
            select(NodeProfile.node_id, NodeProfile.modality, NodeProfile.body_part,
                   NodeProfile.records, NodeProfile.price_per_record, *flags)
            .join(Node, Node.id == NodeProfile.node_id)
            .where(Node.environment == environment)
            .order_by(*_ORDER)
        )  # fmt: skip
        fits = []
        with self.db.session() as session:
            for node_id, modality, body_part, records, price, *met in session.execute(query):
                failed = next((name for (name, _), ok in zip(stages, met, strict=True)
                               if not ok), None)  # fmt: skip
                fits.append(NodeFit(node_id=node_id, modality=modality, body_part=body_part,
                                    records=records, price_per_record=price,
                                    failed=failed))  # fmt: skip
        return fits


class NodeFit(BaseModel):
    """One node against one job (:meth:`ProfileService.route_table`): its published
    cohort, records and price, and ``failed``, the first requirement it does not meet
    (``environment``, ``activated``, ``fresh``, ``cohort``, ``records``, ``price`` or
    ``label:NAME``), or ``None`` when it is eligible."""

    model_config = ConfigDict(frozen=True)

    node_id: str
    modality: str
    body_part: str
    records: int
    price_per_record: int
    failed: str | None


#: The stages up to and including the cohort (:func:`_stages`).
_COHORT: Final = 4


def _funnel(
    session: Session,
    where: Sequence[ColumnElement[bool]],
    stages: Sequence[tuple[str, ColumnElement[bool]]],
) -> list[int]:
    """How many profiles meet each stage and all stages before it, in one statement."""
    columns: list[ColumnElement[Any]] = []
    so_far: list[ColumnElement[bool]] = []
    for _, condition in stages:
        so_far.append(condition)
        columns.append(func.coalesce(func.sum(case((and_(*so_far), 1), else_=0)), 0))
    query = (
        select(*columns)
        .select_from(NodeProfile)
        .join(Node, Node.id == NodeProfile.node_id)
        .where(*where)
    )
    return [int(count) for count in session.execute(query).one()]


_ORDER: Final = (
    NodeProfile.price_per_record,
    NodeProfile.records.desc(),
    NodeProfile.node_id,
)


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise UsageError("fresh_after must be timezone-aware (UTC): naive times are ambiguous")
    return moment.astimezone(UTC)


def _base(environment: str, fresh_after: datetime) -> list[ColumnElement[bool]]:
    return [
        Node.environment == environment,
        Node.activated == true(),
        Node.last_attested_at >= fresh_after,
    ]


def _data(requirements: JobRequirements) -> list[ColumnElement[bool]]:
    conditions = [
        NodeProfile.modality == requirements.modality,
        NodeProfile.body_part == requirements.body_part,
        NodeProfile.records >= requirements.min_records,
    ]
    if requirements.max_price_per_record is not None:
        conditions.append(NodeProfile.price_per_record <= requirements.max_price_per_record)
    return conditions


def _eligible(
    requirements: JobRequirements, environment: str, fresh_after: datetime
) -> Select[str, int, int]:
    """Nodes meeting every requirement: the matcher's one statement, before ordering.

    The required labels join as ``GROUP BY node HAVING COUNT(*) =`` their number, over the
    label rows that meet their minimum, joined to the cohort's candidates (so the planner
    starts from the smaller side: a cohort's profiles by index, each node's labels by its
    primary key).
    """
    query = (
        select(NodeProfile.node_id, NodeProfile.price_per_record, NodeProfile.records)
        .join(Node, Node.id == NodeProfile.node_id)
        .where(*_base(environment, fresh_after), *_data(requirements))
    )
    if not requirements.labels:
        return query
    lc = NodeLabelCount
    meeting = or_(
        *(
            and_(lc.label == need.name, lc.positives >= need.min_positives)
            for need in requirements.labels
        )
    )
    return (
        query.join(lc, and_(lc.node_id == NodeProfile.node_id, meeting))
        .group_by(NodeProfile.node_id, NodeProfile.price_per_record, NodeProfile.records)
        .having(func.count() == len(requirements.labels))
    )


def _stages(
    requirements: JobRequirements, environment: str, fresh_after: datetime
) -> list[tuple[str, ColumnElement[bool]]]:
    """Each constraint in the order a company reads them, named for :func:`_explain`."""
    env, activated, fresh = _base(environment, fresh_after)
    modality, body_part, records, *price = _data(requirements)
    stages = [
        ("environment", env),
        ("activated", activated),
        ("fresh", fresh),
        ("cohort", and_(modality, body_part)),
        ("records", records),
    ]
    stages += [("price", condition) for condition in price]
    lc = NodeLabelCount
    for need in requirements.labels:
        has = exists().where(
            lc.node_id == NodeProfile.node_id,
            lc.label == need.name,
            lc.positives >= need.min_positives,
        )
        stages.append((f"label:{need.name}", has))
    return stages


def _nodes(count: int, singular: str, plural: str) -> str:
    """``"1 node has"`` or ``"3 nodes have"``."""
    return f"1 node {singular}" if count == 1 else f"{count} nodes {plural}"


def _explain(
    requirements: JobRequirements,
    environment: str,
    fresh_after: datetime,
    stages: Sequence[tuple[str, ColumnElement[bool]]],
    counts: Sequence[int],
) -> str:
    """The sentence for the first stage that left no node (``counts`` are cumulative)."""
    if counts[-1] > 0:
        return f"{_nodes(counts[-1], 'matches', 'match')} this job"
    cohort = f"{requirements.modality} {requirements.body_part}"
    since = fresh_after.strftime("%Y-%m-%d %H:%M:%S UTC")
    needs = {f"label:{need.name}": need for need in requirements.labels}
    qualifiers: list[str] = []
    before = 0
    for (stage, _), count in zip(stages, counts, strict=True):
        if stage == "records":
            qualifier = f"with at least {requirements.min_records} records"
        elif stage == "price":
            qualifier = f"priced at most {requirements.max_price_per_record} per record"
        elif stage in needs:
            need = needs[stage]
            qualifier = (
                f"with at least {need.min_positives} positives of {need.name}"
                if need.min_positives
                else f"labelled for {need.name}"
            )
        else:
            qualifier = ""
        if count == 0:
            if stage == "environment":
                return f"no node in the {environment} environment has published a profile"
            if stage == "activated":
                return (
                    f"{_nodes(before, 'has', 'have')} published a profile in the {environment} "
                    "environment; none is activated (its attestation enrolment is not complete)"
                )
            if stage == "fresh":
                return f"{_nodes(before, 'is', 'are')} activated; none has attested since {since}"
            if stage == "cohort":
                return f"{_nodes(before, 'has', 'have')} attested since {since}; none has {cohort}"
            having = " ".join([f"{_nodes(before, 'has', 'have')} {cohort}", ", ".join(qualifiers)])
            return f"{having.strip()}; none {qualifier}"
        if qualifier and count < before:  # only the constraints that narrowed the field
            qualifiers.append(qualifier)
        before = count
    raise AssertionError("unreachable: the last stage counted no node")  # pragma: no cover
