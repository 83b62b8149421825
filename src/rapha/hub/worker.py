"""The hub's background loop: funding from the chain, expired leases, settlement, refunds.

One :meth:`HubWorker.tick` does, in order:

1. fund every ``submitted`` job whose deposit the vault holds (:meth:`observe_deposits`);
2. requeue (or fail) every job whose lease ran out (:meth:`JobService.expire_leases`),
   and say for every funded job why no node took it yet (which constraint leaves none);
3. settle every ``delivered`` job on chain (a revert leaves it ``delivered``, with the
   reason, for the next tick);
4. mark every ``failed`` or ``cancelled`` job failed in the vault, so its payer can
   refund, and remember that it did.

Every step is idempotent, so several hub processes may run the loop side by side and a
hub that restarts picks up where it stopped: all the state is in the database and on
chain. A step that raises is logged and retried on the next tick; it never stops the loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from rapha.errors import RaphaError
from rapha.hub.jobs import JobService, JobState
from rapha.hub.settlement import SettlementService

__all__ = ["HubWorker", "Tick"]

log = logging.getLogger("rapha.hub.worker")
T = TypeVar("T")


@dataclass
class Tick:
    """What one tick changed (job ids), and the errors it logged."""

    funded: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    settled: list[str] = field(default_factory=list)
    refundable: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class HubWorker:
    """Runs :meth:`tick` every ``interval`` seconds in a daemon thread (:meth:`start`)."""

    def __init__(
        self,
        jobs: JobService,
        settlement: SettlementService | None,
        *,
        interval: float = 2.0,
        clock: Callable[[], float] = time.time,
        explain: Callable[[dict[str, Any], str], str] | None = None,
    ) -> None:
        self._explain = explain
        self.jobs = jobs
        self.settlement = settlement
        self.interval = interval
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> Tick:
        tick = Tick()
        settlement = self.settlement
        if settlement is not None:
            funded = self._step(tick, "funding", settlement.observe_deposits)
            tick.funded += [view.id for view in funded or []]
        for view in self._step(tick, "leases", self.jobs.expire_leases, now=self._clock()) or []:
            (tick.failed if view.state is JobState.FAILED else tick.requeued).append(view.id)
        if self._explain is not None:
            for job_id, requirements, environment in self.jobs.waiting():
                why = self._step(tick, f"explain {job_id}", self._explain, requirements,
                                 environment)  # fmt: skip
                if why is not None:
                    self.jobs.note(job_id, f"waiting for a node: {why}")
        if settlement is None:
            return tick
        for job_id in self.jobs.ids_in(JobState.DELIVERED):
            if self._step(tick, f"settle {job_id}", settlement.settle, job_id) is not None:
                tick.settled.append(job_id)
        for job_id in self.jobs.awaiting_refund():
            if self._step(tick, f"refund {job_id}", settlement.fail_on_chain, job_id) is not None:
                self.jobs.mark_refundable(job_id)
                tick.refundable.append(job_id)
        return tick

    @staticmethod
    def _step(tick: Tick, what: str, step: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """``step(*args, **kwargs)``, or ``None`` after logging what it raised."""
        try:
            return step(*args, **kwargs)
        except RaphaError as exc:
            tick.errors.append(f"{what}: {exc}")
            log.warning("hub loop, %s: %s (retried on the next tick)", what, exc)
        except Exception as exc:  # the loop must outlive any one failure
            tick.errors.append(f"{what}: {type(exc).__name__}")
            log.exception("hub loop, %s failed (retried on the next tick)", what)
        return None

    # --- the thread ----------------------------------------------------------------------

    def start(self) -> None:
        """Run the loop in a daemon thread until :meth:`stop`."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rapha-hub-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.tick()
            self._stop.wait(self.interval)
