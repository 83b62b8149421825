"""Run every benchmark under ``bench/`` and rewrite ``BENCHMARKS.md``.

Each benchmark is a script ``bench/<name>.py`` that measures Rapha against a named peer or
baseline in the same run and prints one Markdown section to stdout. ``bench/run.py NAME …``
reruns only the named benchmarks and keeps the other sections of ``BENCHMARKS.md``. Each
runs in its own process, so one benchmark's memory or threads cannot skew another's. A
benchmark that fails is reported in the file and makes this script exit non-zero.

The contract of a benchmark
---------------------------
A benchmark is ``bench/<name>.py``; files starting with ``_`` are helpers and ``run.py`` is
this script, neither is run. ``run.py`` starts it as ``python bench/<name>.py`` with no
arguments, so ``bench/`` is first on its ``sys.path``. The script

1. measures Rapha and a named peer or baseline in the same run, on this machine;
2. prints one Markdown section to stdout, starting with a ``## Title`` heading; progress
   and anything a library prints go to stderr;
3. ends the section with one summary line per headline comparison (one or more)::

       from _summary import summary_line

       print()  # a blank line before the summary lines
       print(summary_line(
           "wall time of `rapha demo`",      # measure: what is compared, short
           rapha=f"{ours:.1f} s",            # Rapha's figure, with its unit
           peer=f"plain baseline: {base:.1f} s",  # the named peer or baseline, its figure
           ratio=f"{ours / base:.1f}x slower",    # which direction is better, in words
       ))

   Every figure is computed in the run, never a literal. :func:`_summary.summary_line`
   adds the machine and the date (``YYYY-MM-DD HH:MM UTC``) and returns
   ``<!-- bench-summary {json} -->``: an HTML comment, invisible when rendered, whose JSON
   object has the string fields ``measure``, ``rapha``, ``peer``, ``ratio``, ``machine``
   and ``date``;
4. exits 0 on success; any other exit status is a failure (its stderr's last lines are
   reported instead of the section).

What ``run.py`` writes
----------------------
A header, then ``## Summary``: one table row per summary line of each benchmark, in the
order of the benchmarks (``| benchmark | measure | Rapha | peer / baseline | ratio |
machine | date |``), then every benchmark's section behind a ``<!-- bench:<name> -->``
marker. Summary lines stay in their sections, so a section kept on a partial rerun keeps
its own rows, machine and date. Rows that are not a measurement say why: ``FAILED (exit
N)`` (the benchmark failed; the row keeps that run's date), ``no summary`` (the section has
no summary line), ``invalid summary line: …`` and ``not run yet`` (a new benchmark with
no section in the file, on a partial rerun).

Exit status: 0 when every benchmark run succeeded; 1 when one failed or printed an invalid
summary line (the file is still written); 2 when a named benchmark does not exist (nothing
is run or written).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from _summary import machine, now, parse_summaries, summary_line

BENCH_DIR = Path(__file__).resolve().parent
OUT = BENCH_DIR.parent / "BENCHMARKS.md"

_MARK = "<!-- bench:{} -->"
_TAIL_LINES = 15
_TABLE_HEAD = (
    "| benchmark | measure | Rapha | peer / baseline | ratio | machine | date |\n"
    "|---|---|---|---|---|---|---|\n"
)


def benchmarks(bench_dir: Path) -> list[Path]:
    """The benchmark scripts of ``bench_dir``, by name."""
    return sorted(
        p for p in bench_dir.glob("*.py") if p.name != "run.py" and not p.name.startswith("_")
    )


def _kept_sections(out: Path, stems: list[str]) -> dict[str, str]:
    """Sections of the current BENCHMARKS.md by benchmark, to keep those not rerun."""
    if not out.is_file():
        return {}
    text = out.read_text(encoding="utf-8")
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


def _run(script: Path) -> tuple[str, int]:
    """Run one benchmark: its section for the file and its exit status."""
    print(f"bench: {script.stem} …", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, check=False
    )
    took = time.perf_counter() - t0
    print(f"bench: {script.stem} done in {took:.0f} s", file=sys.stderr, flush=True)
    mark = _MARK.format(script.stem)
    if proc.returncode == 0:
        section = f"{mark}\n{proc.stdout.strip()}\n\n_(benchmark wall time {took:.0f} s)_\n"
        return section, 0
    said = proc.stderr.strip() or proc.stdout.strip()  # some say why on stdout
    tail = "\n".join(said.splitlines()[-_TAIL_LINES:])
    failed = f"FAILED (exit {proc.returncode})"
    line = summary_line(failed, rapha="-", peer="-", ratio="-")
    return f"{mark}\n## {script.stem}\n\n{failed}:\n\n```\n{tail}\n```\n\n{line}\n", 1


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _row(stem: str, *cells: str) -> str:
    padded = [*cells, *["-"] * (6 - len(cells))]
    return "| " + " | ".join(_cell(c) for c in [stem, *padded]) + " |\n"


def _summary_rows(stem: str, section: str | None, *, fresh: bool) -> tuple[str, bool]:
    """The summary table rows of one benchmark, and whether its summary lines are valid."""
    if section is None:
        return _row(stem, "not run yet"), True
    try:
        found = parse_summaries(section)
    except ValueError as exc:
        return _row(stem, f"invalid summary line: {exc}"), False
    if not found:
        return _row(stem, "no summary", *(["-"] * 3), *([machine(), now()] if fresh else [])), True
    return "".join(
        _row(stem, s.measure, s.rapha, s.peer, s.ratio, s.machine, s.date) for s in found
    ), True


def main(argv: Sequence[str] | None = None, *, bench_dir: Path = BENCH_DIR, out: Path = OUT) -> int:
    """Run the benchmarks ``argv`` names (all when it names none) and rewrite ``out``.

    ``argv`` defaults to ``sys.argv[1:]``; the exit status is as the module docstring says.
    """
    scripts = benchmarks(bench_dir)
    only = set(sys.argv[1:] if argv is None else argv)
    unknown = only - {p.stem for p in scripts}
    if unknown:
        known = ", ".join(p.stem for p in scripts)
        print(
            f"bench: no benchmark {', '.join(sorted(unknown))} (there are: {known})",
            file=sys.stderr,
        )
        return 2
    kept = _kept_sections(out, [p.stem for p in scripts]) if only else {}
    sections: list[str] = []
    rows: list[str] = []
    failed: list[str] = []
    for script in scripts:
        fresh = not only or script.stem in only
        section: str | None = kept.get(script.stem)  # not rerun: keep its last result
        if fresh:
            section, status = _run(script)
            if status != 0:
                failed.append(script.stem)
        row, valid = _summary_rows(script.stem, section, fresh=fresh)
        rows.append(row)
        if fresh and not valid:
            print(f"bench: {script.stem} printed an invalid summary line", file=sys.stderr)
            failed.append(script.stem)
        if section is not None:
            sections.append(section)

    header = (
        "# Benchmarks\n\n"
        "Written by `make bench` (`bench/run.py`); do not edit by hand. Each section compares "
        "Rapha with a named peer or baseline measured in the same run on the same machine.\n\n"
        f"- run: {now()}\n"
        f"- machine: {machine()}\n"
    )
    summary = (
        "## Summary\n\n"
        "The headline comparison of each benchmark, from the summary lines at the end of its "
        "section. Each row names the machine and date of the run that measured it: "
        "`bench/run.py NAME …` reruns some benchmarks and keeps the others' rows as they "
        "were.\n\n" + _TABLE_HEAD + "".join(rows)
    )
    out.write_text(header + "\n" + summary + "\n" + "\n".join(sections), encoding="utf-8")
    print(f"bench: wrote {out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
