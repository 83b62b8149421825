"""Run every benchmark under ``bench/`` and rewrite ``BENCHMARKS.md``.

Each benchmark is a script ``bench/<name>.py`` that measures Rapha against a named peer or
baseline in the same run and prints one Markdown section to stdout. ``bench/run.py NAME …``
reruns only the named benchmarks and keeps the other sections of ``BENCHMARKS.md``. Each
runs in its own process, so one benchmark's memory or threads cannot skew another's. A
benchmark that fails is reported in the file and makes this script exit non-zero.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
OUT = BENCH_DIR.parent / "BENCHMARKS.md"


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


_MARK = "<!-- bench:{} -->"


def _kept_sections(stems: list[str]) -> dict[str, str]:
    """Sections of the current BENCHMARKS.md by benchmark, to keep those not rerun."""
    if not OUT.is_file():
        return {}
    text = OUT.read_text(encoding="utf-8")
    kept: dict[str, str] = {}
    for stem in stems:
        start = text.find(_MARK.format(stem))
        if start < 0:
            continue
        end = min(
            (i for other in stems if (i := text.find(_MARK.format(other), start + 1)) > start),
            default=len(text),
        )
        kept[stem] = text[start:end].strip() + "\n"
    return kept


def main() -> int:
    scripts = sorted(
        p for p in BENCH_DIR.glob("*.py") if p.name != "run.py" and not p.name.startswith("_")
    )
    only = set(sys.argv[1:])
    kept = _kept_sections([p.stem for p in scripts]) if only else {}
    sections: list[str] = []
    failed: list[str] = []
    for script in scripts:
        if only and script.stem not in only:
            if script.stem in kept:  # not rerun: keep its last result
                sections.append(kept[script.stem])
            continue
        print(f"bench: {script.stem} …", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, check=False
        )
        took = time.perf_counter() - t0
        if proc.returncode != 0:
            failed.append(script.stem)
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            sections.append(
                f"{_MARK.format(script.stem)}\n## {script.stem}\n\n"
                f"FAILED (exit {proc.returncode}):\n\n```\n{tail}\n```\n"
            )
        else:
            sections.append(
                f"{_MARK.format(script.stem)}\n{proc.stdout.strip()}"
                f"\n\n_(benchmark wall time {took:.0f} s)_\n"
            )
        print(f"bench: {script.stem} done in {took:.0f} s", file=sys.stderr, flush=True)

    header = (
        "# Benchmarks\n\n"
        "Written by `make bench` (`bench/run.py`); do not edit by hand. Each section compares "
        "Rapha with a named peer or baseline measured in the same run on the same machine.\n\n"
        f"- run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
        f"- machine: {_machine()}\n"
    )
    OUT.write_text(header + "\n" + "\n".join(sections), encoding="utf-8")
    print(f"bench: wrote {OUT}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
