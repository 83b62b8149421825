"""Latency of the hub's matcher over 10,000 node profiles, against a naive Python scan.

The matcher (:meth:`rapha.hub.profiles.ProfileService.match`) is one indexed SQL statement.
The baseline, measured in the same run on the same database, is what a hub without it
would do per request: load every node, profile and label count of the environment and
filter, sort and cut in Python. Both answer the same varied requirements (a cohort, one to
three labels with minimum positives, a minimum of records, a maximum price half the time),
and the script checks that they return the same nodes in the same order.

SQLite (a file, as one machine runs the hub) always; PostgreSQL too when the server
binaries and psycopg are installed (the tests' throwaway cluster, ``tests/support``). The
data is ``support.hub.register_synthetic_nodes``: 10,000 nodes over 20 cohorts, 3 to 8
labels each, bulk-inserted and then ``ANALYZE``d, as PostgreSQL's autovacuum does after a
bulk load (before it, PostgreSQL plans the label join for near-empty tables and the matcher
is some 20 times slower). The target is a matcher p99 of at most 20 ms.
"""

from __future__ import annotations

import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from sqlalchemy import select, text

from _summary import summary_line  # bench/ is the script's directory
from rapha.hub.db import Database, Node, open_database
from rapha.hub.profiles import (
    JobRequirements,
    LabelNeed,
    NodeLabelCount,
    NodeProfile,
    ProfileService,
)
from support.hub import BODY_PARTS, FINDINGS, MODALITIES, register_synthetic_nodes
from support.postgres import postgres_bindir, start_postgres

NODES = 10_000
REQUESTS = 400  # matcher requests timed per database
BASELINE_REQUESTS = 40  # the naive scan is slow: fewer, from the same requirement list
TARGET_P99_MS = 20.0
ENVIRONMENT = "production"
NOW = datetime.now(UTC)
FRESH_AFTER = NOW - timedelta(hours=1)


def _requirements(count: int, seed: int = 11) -> list[JobRequirements]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        labels = rng.sample(FINDINGS, rng.randrange(1, 4))
        out.append(
            JobRequirements(
                modality=rng.choice(MODALITIES),
                body_part=rng.choice(BODY_PARTS),
                labels=[LabelNeed(name=n, min_positives=rng.randrange(10, 500)) for n in labels],
                min_records=rng.randrange(100, 5_000),
                max_price_per_record=rng.choice([None, rng.randrange(10_000, 90_000)]),
            )
        )
    return out


def naive_match(db: Database, req: JobRequirements, limit: int = 50) -> list[str]:
    """The baseline: every profile of the environment loaded, then filtered in Python."""
    with db.session() as session:
        rows = session.execute(
            select(
                Node.id,
                Node.activated,
                Node.last_attested_at,
                NodeProfile.modality,
                NodeProfile.body_part,
                NodeProfile.records,
                NodeProfile.price_per_record,
            )
            .join(NodeProfile, NodeProfile.node_id == Node.id)
            .where(Node.environment == ENVIRONMENT)
        ).all()
        positives: dict[tuple[str, str], int] = {
            (node_id, label): count
            for node_id, label, count in session.execute(
                select(NodeLabelCount.node_id, NodeLabelCount.label, NodeLabelCount.positives)
            )
        }
    fresh = FRESH_AFTER.replace(tzinfo=None)
    eligible = []
    for node_id, activated, attested, modality, body_part, records, price in rows:
        if not activated or attested is None or attested.replace(tzinfo=None) < fresh:
            continue
        if (modality, body_part) != (req.modality, req.body_part) or records < req.min_records:
            continue
        if req.max_price_per_record is not None and price > req.max_price_per_record:
            continue
        if all(positives.get((node_id, n.name), -1) >= n.min_positives for n in req.labels):
            eligible.append((price, -records, node_id))
    return [node_id for *_, node_id in sorted(eligible)[:limit]]


def _percentiles(samples: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return statistics.median(samples) * 1000, cuts[98] * 1000


def _timed(call: Callable[[], object], repeat: int) -> list[float]:
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    return seconds


def _measure(url: str) -> dict[str, Any]:
    db = open_database(url)
    try:
        started = time.perf_counter()
        register_synthetic_nodes(db, NODES, now=NOW)
        loaded = time.perf_counter() - started
        with db.engine.begin() as connection:  # what autovacuum does after a bulk load
            connection.execute(text("ANALYZE"))
        service = ProfileService(db)
        requests = _requirements(REQUESTS)

        def ours(req: JobRequirements) -> list[str]:
            found = service.match(req, environment=ENVIRONMENT, fresh_after=FRESH_AFTER)
            return [m.node_id for m in found]

        matched = 0
        for req in requests[:BASELINE_REQUESTS]:  # warm caches; check both agree
            expected = naive_match(db, req)
            if ours(req) != expected:
                raise AssertionError(f"matcher and naive scan disagree on {req}")
            matched += bool(expected)
        it = iter(requests * 2)
        fast = _timed(lambda: ours(next(it)), REQUESTS)
        it_naive = iter(requests)
        slow = _timed(lambda: naive_match(db, next(it_naive)), BASELINE_REQUESTS)
        return {
            "ours": _percentiles(fast),
            "naive": _percentiles(slow),
            "load_s": loaded,
            "matched": matched,
        }
    finally:
        db.close()


@contextmanager
def _databases(workdir: Path) -> Iterator[list[tuple[str, str]]]:
    urls = [("SQLite (file)", f"sqlite:///{workdir / 'hub.db'}")]
    bindir = postgres_bindir()
    try:
        import psycopg  # noqa: F401
    except ImportError:
        bindir = None
    if bindir is None:
        yield urls
        return
    with start_postgres(bindir, workdir) as server:
        yield [*urls, ("PostgreSQL (loopback)", server.url)]


def main() -> None:
    with (
        tempfile.TemporaryDirectory(prefix="rapha-bench-match-") as tmp,
        _databases(Path(tmp)) as databases,
    ):
        results = [(name, _measure(url)) for name, url in databases]
    print("## Hub matching\n")
    print(
        f"Latency of `ProfileService.match` (one indexed SQL statement) over {NODES:,} node "
        "profiles (20 cohorts, 3-8 labels each; bulk-inserted, then `ANALYZE`), against the "
        "naive baseline in the same run: "
        "load every profile and label count of the environment and filter in Python. "
        f"{REQUESTS} varied requirements (a cohort, 1-3 labels with minimum positives, "
        "minimum records, a maximum price half the time) for the matcher, the first "
        f"{BASELINE_REQUESTS} of them for the baseline; both return the same nodes in the "
        "same order (checked)."
        + ("" if len(results) > 1 else " PostgreSQL was not available on this machine.")
        + "\n"
    )
    print("| database | matcher p50 (ms) | matcher p99 (ms) | naive p50 (ms) | naive p99 (ms) "
          "| speed-up at p50 |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results:
        (p50, p99), (n50, n99) = r["ours"], r["naive"]
        print(f"| {name} | {p50:.2f} | {p99:.2f} | {n50:.1f} | {n99:.1f} | {n50 / p50:.0f}x |")
    worst = max(r["ours"][1] for _, r in results)
    verdict = "met" if worst <= TARGET_P99_MS else "NOT met"
    loads = ", ".join(f"{name} {r['load_s']:.1f} s" for name, r in results)
    print(
        f"\nTarget matcher p99 <= {TARGET_P99_MS:g} ms: {verdict} (worst {worst:.2f} ms). "
        f"Loading the {NODES:,} nodes with bulk inserts took {loads}; "
        f"{results[0][1]['matched']} of the {BASELINE_REQUESTS} checked requirements "
        "matched at least one node."
    )
    print()
    for name, r in results:
        (p50, p99), (n50, n99) = r["ours"], r["naive"]
        print(
            summary_line(
                f"matcher latency over {NODES:,} node profiles, {name}",
                rapha=f"`ProfileService.match`: p50 {p50:.2f} ms, p99 {p99:.2f} ms",
                peer=f"naive scan in Python: p50 {n50:.1f} ms, p99 {n99:.1f} ms",
                ratio=f"{n50 / p50:.0f}x faster at p50",
            )
        )


if __name__ == "__main__":
    main()
