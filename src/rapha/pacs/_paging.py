"""Paged QIDO-RS searches that do not trust ``offset``.

Some servers ignore ``offset``; Orthanc 1.10 applies ``limit`` before ``offset`` when it
matches ModalitiesInStudy (its second page comes back empty although more studies match).
:func:`collect` de-duplicates results by UID and never relies on ``offset`` alone to know
it has everything.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

__all__ = ["collect"]

T = TypeVar("T")


def collect(
    fetch: Callable[[int, int], list[T]],
    key: Callable[[T], str | None],
    *,
    page: int,
    max_limit: int,
    after_page: Callable[[dict[str, T]], None] | None = None,
) -> tuple[dict[str, T], bool]:
    """Every distinct result of a paged search, and whether the answer is known complete.

    ``fetch(limit, offset)`` sends one request; ``key`` gives a result's UID (``None``
    skips it); ``after_page`` sees the results so far after every request (it may raise,
    for example at a cap). ``limit`` never exceeds ``max_limit``.

    Phase 1 pages with ``offset``. A short, non-empty page of new results (or an empty
    first page) ends the search. A later page that adds nothing (empty, or a repeat) is
    ambiguous: the end, or a server misusing ``offset``. Phase 2 then re-asks from offset
    0 with ``limit`` = results so far + ``page``, growing until an answer is short
    (complete) or adds nothing. An answer that adds nothing while full at ``max_limit``
    cannot prove the end: the result is then returned with ``complete`` false. Every
    request but the last of each phase adds a result, so a search makes at most twice as
    many requests as results, plus two.
    """
    seen: dict[str, T] = {}

    def take(rows: list[T]) -> int:
        added = 0
        for row in rows:
            uid = key(row)
            if uid is not None and uid not in seen:
                seen[uid] = row
                added += 1
        if after_page is not None:
            after_page(seen)
        return added

    limit = min(page, max_limit)
    offset = 0
    while True:
        rows = fetch(limit, offset)
        added = take(rows)
        if len(rows) < limit and added == len(rows) and (rows or offset == 0):
            return seen, True
        if added == 0:
            break
        offset += len(rows)
    while True:
        limit = min(len(seen) + page, max_limit)
        rows = fetch(limit, 0)
        added = take(rows)
        if len(rows) < limit:
            return seen, True
        if added == 0:
            return seen, limit < max_limit
