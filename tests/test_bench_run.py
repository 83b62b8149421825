"""bench/run.py: the summary table of BENCHMARKS.md, partial reruns and the exit status."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"

SUMMARY = {
    "measure": "wall time of the fast thing",
    "rapha": "1.5 s",
    "peer": "the slow thing: 3.0 s",
    "ratio": "2.00x faster",
    "machine": "Test CPU, 2 cores, Python 3.11.0",
    "date": "2020-01-02 03:04 UTC",
}


def _load(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Import ``bench/<name>.py`` (bench is not a package; its scripts import each other
    from their own directory)."""
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run_main(monkeypatch: pytest.MonkeyPatch) -> Callable[..., int]:
    main: Callable[..., int] = _load("run", monkeypatch).main
    return main


def _script(
    bench_dir: Path, name: str, *, summaries: Sequence[dict[str, str]] = (), exit_code: int = 0
) -> None:
    """A fake benchmark: a section with ``summaries`` on stdout, a line on stderr."""
    lines = [f"## {name}", "", f"{name} measured."]
    lines += [""] + [f"<!-- bench-summary {json.dumps(s)} -->" for s in summaries]
    body = "\n".join(lines)
    (bench_dir / f"{name}.py").write_text(
        f"import sys\nprint({body!r})\nprint('trace: it broke', file=sys.stderr)\n"
        f"sys.exit({exit_code})\n"
    )


def _rows(out: Path) -> dict[str, list[list[str]]]:
    """The summary table's cells (less the benchmark's name) by benchmark."""
    text = out.read_text(encoding="utf-8")
    table = text.split("## Summary", 1)[1].split("<!-- bench:", 1)[0]
    rows: dict[str, list[list[str]]] = {}
    for line in table.splitlines():
        if line.startswith("| ") and not line.startswith("| benchmark |"):
            name, *cells = (c.strip() for c in line.strip("|").split(" | "))
            rows.setdefault(name, []).append(cells)
    return rows


@pytest.fixture
def bench_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "bench"
    directory.mkdir()
    _script(directory, "alpha", summaries=[SUMMARY, {**SUMMARY, "measure": "second"}])
    _script(directory, "broken", exit_code=3)
    _script(directory, "silent")
    (directory / "_helper.py").write_text("raise SystemExit(9)\n")  # a helper: not run
    return directory


def test_a_full_run_writes_a_row_per_summary_line(
    run_main: Callable[..., int], bench_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "BENCHMARKS.md"

    status = run_main([], bench_dir=bench_dir, out=out)

    rows = _rows(out)
    assert status == 1  # broken failed
    assert list(rows) == ["alpha", "broken", "silent"]
    assert rows["alpha"] == [
        [SUMMARY[k] for k in ("measure", "rapha", "peer", "ratio", "machine", "date")],
        ["second", *(SUMMARY[k] for k in ("rapha", "peer", "ratio", "machine", "date"))],
    ]
    assert rows["broken"][0][0] == "FAILED (exit 3)"
    assert rows["silent"][0][0] == "no summary"
    text = out.read_text(encoding="utf-8")
    assert "alpha measured." in text
    assert "silent measured." in text
    assert "trace: it broke" in text


def test_a_partial_rerun_keeps_the_other_rows_with_their_own_date(
    run_main: Callable[..., int], bench_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "BENCHMARKS.md"
    run_main([], bench_dir=bench_dir, out=out)
    broken_before = _rows(out)["broken"]
    _script(bench_dir, "alpha", summaries=[{**SUMMARY, "date": "2030-01-01 00:00 UTC"}])
    _script(bench_dir, "silent", summaries=[{**SUMMARY, "measure": "now summarised"}])

    status = run_main(["silent"], bench_dir=bench_dir, out=out)

    rows = _rows(out)
    assert status == 0  # broken was not rerun
    assert [r[5] for r in rows["alpha"]] == [SUMMARY["date"]] * 2  # its own, not rerun
    assert rows["broken"] == broken_before
    assert rows["silent"][0][0] == "now summarised"
    assert "alpha measured." in out.read_text(encoding="utf-8")


def test_exit_status_is_zero_when_every_benchmark_run_succeeds(
    run_main: Callable[..., int], bench_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "BENCHMARKS.md"

    assert run_main(["alpha", "silent"], bench_dir=bench_dir, out=out) == 0
    assert _rows(out)["broken"] == [["not run yet", "-", "-", "-", "-", "-"]]


def test_an_invalid_summary_line_fails_the_run(
    run_main: Callable[..., int], bench_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "BENCHMARKS.md"
    _script(bench_dir, "alpha", summaries=[{"measure": "no figures"}])

    status = run_main(["alpha"], bench_dir=bench_dir, out=out)

    assert status == 1
    assert re.match(r"invalid summary line: summary line \d+: missing date, machine, peer",
                    _rows(out)["alpha"][0][0])  # fmt: skip


def test_an_unknown_benchmark_runs_nothing(
    run_main: Callable[..., int], bench_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "BENCHMARKS.md"

    assert run_main(["alhpa"], bench_dir=bench_dir, out=out) == 2
    assert not out.exists()


def test_summary_line_round_trips(monkeypatch: pytest.MonkeyPatch) -> None:
    summary = _load("_summary", monkeypatch)

    line = summary.summary_line("m", rapha="1 s", peer="p: 2 s", ratio="2x faster")

    (parsed,) = summary.parse_summaries(f"## x\n\ntext\n\n{line}\n")
    assert (parsed.measure, parsed.rapha, parsed.peer, parsed.ratio) == (
        "m",
        "1 s",
        "p: 2 s",
        "2x faster",
    )
    assert parsed.machine == summary.machine()
    assert parsed.date.endswith(" UTC")
    with pytest.raises(ValueError, match="may not contain"):
        summary.summary_line("m", rapha="1 s", peer="-->", ratio="2x")
