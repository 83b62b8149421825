"""Benchmark: the wall time of ``rapha demo`` on this machine, against its own compute.

Rapha: ``rapha demo`` with its defaults (two synthetic hospitals of 2,500 studies each,
the embedded chain, the hub, two node agents, Orthanc when installed, one job end to end),
as a newcomer runs it with ``make demo``. The target is at most 5 minutes on 2 cores.

Baseline: ``rapha job dry-run`` of the same example bundle (a small CNN at 32 px, 14
epochs) on a synthetic hospital of the same size: the generation, the view, the
sandboxed training and prediction and the evaluation, with no hub, chain, second hospital,
PACS or network in between. The ratio is what the marketplace around the job costs.

The demo's own per-step times come from its output. Prints one Markdown section.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _summary import summary_line  # bench/ is the script's directory

TARGET_S = 300.0
RAPHA = Path(sys.executable).with_name("rapha")
_STEP = re.compile(r"✓ (.+?) \((\d+) s\)")


def _run(argv: list[str], log: Path) -> float:
    env = {**os.environ, "COLUMNS": "160"}
    t0 = time.perf_counter()
    with log.open("wb") as out:
        code = subprocess.call(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    took = time.perf_counter() - t0
    if code != 0:
        sys.stderr.write(log.read_text(errors="replace")[-4000:])
        raise SystemExit(f"{argv[1:3]} failed with exit {code}")
    return took


def main() -> None:
    from rapha.demo.flow import BUNDLE_SIZE, DEFAULT_STUDIES, HOSPITALS

    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
        root = Path(tmp)
        demo_s = _run([str(RAPHA), "demo", "--workdir", str(root / "demo")], root / "demo.log")
        summary = json.loads((root / "demo" / "summary.json").read_text())
        steps = _STEP.findall((root / "demo.log").read_text(errors="replace"))
        bundle = root / "demo" / "company" / "bundle"
        dry_s = _run(
            [str(RAPHA), "job", "dry-run", str(bundle), "--synthetic", "--studies",
             str(DEFAULT_STUDIES), "--out", str(root / "dry-run")],
            root / "dry-run.log",
        )  # fmt: skip
    label = summary["metrics"]["labels"].get("effusion", {})
    sizes = [h.studies(DEFAULT_STUDIES) for h in HOSPITALS]
    print("## `rapha demo` wall time\n")
    print(
        f"`rapha demo` with its defaults: two hospitals of {sizes[0]:,} and {sizes[1]:,} studies, "
        f"the embedded chain, the hub, two node agents ({summary['hospitals'][1]['source']} "
        f"for the second), a {BUNDLE_SIZE} px small CNN trained on "
        f"{summary['records']['train']:,} records. Target: at most {TARGET_S / 60:.0f} "
        "minutes on 2 cores. Baseline: `rapha job dry-run` of the same bundle on one "
        f"synthetic hospital of {DEFAULT_STUDIES:,} studies (generation, view, sandboxed "
        "training and prediction, evaluation; no hub, chain, PACS or second hospital).\n"
    )
    print("| run | wall s |\n|---|---:|")
    print(f"| `rapha demo` | {demo_s:.1f} |")
    print(f"| baseline: `rapha job dry-run --synthetic` | {dry_s:.1f} |")
    print(
        f"\nRatio: **{demo_s / dry_s:.2f}x** the baseline; "
        f"{'within' if demo_s <= TARGET_S else 'OVER'} the {TARGET_S:.0f} s target. "
        f"The job settled: effusion AUROC {label.get('auroc', 'withheld')} "
        f"(95% CI {label.get('auroc_ci', 'n/a')}) on {summary['records']['test']:,} test "
        "records.\n"
    )
    print("| demo step | s |\n|---|---:|")
    for title, seconds in steps:
        print(f"| {title} | {seconds} |")
    print()
    print(
        summary_line(
            "wall time of `rapha demo` (defaults)",
            rapha=f"{demo_s:.0f} s (target ≤ {TARGET_S:.0f} s)",
            peer=f"`rapha job dry-run` of the same bundle, same size: {dry_s:.0f} s",
            ratio=f"{demo_s / dry_s:.2f}x the baseline (lower is better)",
        )
    )


if __name__ == "__main__":
    main()
