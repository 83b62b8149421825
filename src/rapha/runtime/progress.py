"""Progress events from the sandbox to the node: numbers only, rate-limited, one pipe.

An event is one line of JSON holding only these keys, every value a finite number::

    {"epoch": 2, "epochs": 5, "step": 120, "steps": 300, "loss": 0.412}

``loss`` carries 3 significant digits. The writer (inside the sandbox) sends at most one
event a second. The reader (the node) trusts nothing it reads: a line that is too long,
not JSON, has another key or a non-numeric value is dropped and counted, and it also drops
events that arrive less than a second apart, so model code that writes to the pipe itself
gains nothing. Nothing but these numbers ever crosses this pipe; errors go to stderr,
which only the hospital (and a company's own dry-run) sees.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

__all__ = [
    "EVENT_KEYS",
    "MAX_LINE",
    "MIN_INTERVAL",
    "ProgressEvent",
    "ProgressReader",
    "ProgressWriter",
    "round_sig",
]

EVENT_KEYS: Final = frozenset({"epoch", "epochs", "step", "steps", "loss"})
MAX_LINE: Final = 256
MIN_INTERVAL: Final = 1.0


def round_sig(value: float, digits: int = 3) -> float:
    """``value`` rounded to ``digits`` significant digits (0 stays 0)."""
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))


@dataclass(frozen=True)
class ProgressEvent:
    """One validated event. Missing numbers are ``None``."""

    epoch: int | None = None
    epochs: int | None = None
    step: int | None = None
    steps: int | None = None
    loss: float | None = None

    def to_json(self) -> dict[str, float | int]:
        return {k: v for k, v in vars(self).items() if v is not None}


class ProgressWriter:
    """Writes events to an inherited fd, at most one per :data:`MIN_INTERVAL` seconds."""

    def __init__(
        self,
        fd: int | None,
        *,
        min_interval: float = MIN_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fd = fd
        self._min = min_interval
        self._clock = clock
        self._last = -math.inf

    def emit(
        self,
        *,
        epoch: int,
        epochs: int,
        step: int,
        steps: int,
        loss: float | None = None,
        force: bool = False,
    ) -> bool:
        """Send an event unless one went out less than the interval ago; True if sent.

        ``force`` still respects the interval: it only says the caller would like this one
        (the end of an epoch) to go out; a later forced call is never suppressed twice.
        """
        now = self._clock()
        if self._fd is None or now - self._last < self._min:
            return False
        event: dict[str, float | int] = {
            "epoch": int(epoch),
            "epochs": int(epochs),
            "step": int(step),
            "steps": int(steps),
        }
        if loss is not None and math.isfinite(loss):
            event["loss"] = round_sig(float(loss))
        line = json.dumps(event, separators=(",", ":")).encode() + b"\n"
        try:
            os.write(self._fd, line)
        except OSError:
            self._fd = None  # the node stopped listening; training goes on
            return False
        self._last = now
        return True


class ProgressReader:
    """Parses the pipe's bytes into events, dropping anything malformed or too frequent."""

    def __init__(self, *, min_interval: float = MIN_INTERVAL) -> None:
        self._buffer = bytearray()
        self._min = min_interval
        self._last = -math.inf
        self.dropped = 0

    def feed(self, chunk: bytes, *, now: float) -> Iterator[ProgressEvent]:
        """The valid events completed by ``chunk``."""
        self._buffer += chunk
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_LINE:
                    self._buffer.clear()
                    self.dropped += 1
                return
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            event = _parse(line)
            if event is None or now - self._last < self._min:
                self.dropped += 1
                continue
            self._last = now
            yield event


def _parse(line: bytes) -> ProgressEvent | None:
    if len(line) > MAX_LINE:
        return None
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict) or not data or not set(data) <= EVENT_KEYS:
        return None
    values: dict[str, int | float] = {}
    for key, value in data.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        if not math.isfinite(value) or abs(value) > 1e12:
            return None
        if key == "loss":
            values[key] = round_sig(float(value))
        elif float(value).is_integer() and value >= 0:
            values[key] = int(value)
        else:
            return None
    return ProgressEvent(**values)  # type: ignore[arg-type]
