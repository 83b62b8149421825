"""The summary lines every benchmark ends its section with, read back by ``bench/run.py``.

A summary line is one HTML comment, invisible when the Markdown is rendered::

    <!-- bench-summary {"measure": ..., "rapha": ..., "peer": ..., "ratio": ...,
                        "machine": ..., "date": "YYYY-MM-DD HH:MM UTC"} -->

(on one line). The contract, with an example, is in ``bench/run.py``'s docstring. A
benchmark makes its lines with :func:`summary_line`, which fills in the machine and the
date; ``run.py`` reads them with :func:`parse_summaries`, from a fresh run's output and from
the sections of ``BENCHMARKS.md`` it keeps, so each row keeps its own machine and date.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Final

PREFIX: Final = "<!-- bench-summary "
SUFFIX: Final = " -->"
_LINE: Final = re.compile(r"^<!-- bench-summary (.*) -->$")
_OPENING: Final = re.compile(r"^\s*<!--\s*bench-summary\b")


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """The machine a benchmark ran on: CPU, core count and Python version."""
    return f"{cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def now() -> str:
    """The current time as summary lines state it: ``YYYY-MM-DD HH:MM UTC``."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


@dataclass(frozen=True)
class Summary:
    """One headline comparison of a benchmark: one row of the summary table."""

    measure: str  # what is compared, short
    rapha: str  # Rapha's figure, with its unit
    peer: str  # the named peer or baseline and its figure, with its unit
    ratio: str  # the ratio, saying which direction is better
    machine: str
    date: str  # YYYY-MM-DD HH:MM UTC

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"summary field {f.name!r} must be a non-empty string")
            if "-->" in value or "\n" in value:
                raise ValueError(f"summary field {f.name!r} may not contain '-->' or a newline")
        if not re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", self.date):
            raise ValueError(f"summary date {self.date!r} is not 'YYYY-MM-DD HH:MM UTC'")

    def line(self) -> str:
        return PREFIX + json.dumps(asdict(self), ensure_ascii=False) + SUFFIX


def summary_line(measure: str, *, rapha: str, peer: str, ratio: str) -> str:
    """The summary line of one comparison, measured on this machine, now.

    Raises :class:`ValueError` if a field is empty or would break the comment or the table.
    """
    return Summary(measure, rapha, peer, ratio, machine(), now()).line()


def parse_summaries(text: str) -> list[Summary]:
    """Every summary line of ``text``, in order.

    Raises :class:`ValueError`, naming the line, for a line that opens like a summary line
    but is not one (bad JSON, a missing or empty field, a malformed date).
    """
    found = []
    names = {f.name for f in fields(Summary)}
    for number, line in enumerate(text.splitlines(), start=1):
        if not _OPENING.match(line):
            continue
        match = _LINE.match(line.strip())
        try:
            if match is None:
                raise ValueError(f"not of the form {PREFIX}{{json}}{SUFFIX}")
            data = json.loads(match[1])
            if not isinstance(data, dict):
                raise ValueError("the JSON is not an object")
            missing = sorted(names - data.keys())
            if missing:
                raise ValueError(f"missing {', '.join(missing)}")
            found.append(Summary(**{name: data[name] for name in names}))
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"summary line {number}: {exc}") from exc
    return found
