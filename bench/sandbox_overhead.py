"""Benchmark: one training run through the sandboxed runtime against plain PyTorch.

Rapha: the train step of a node job (:mod:`rapha.node.job`): a workspace with the bundle
and the view's train and val splits staged, size-capped scratch ``/out`` and ``/tmp``,
``/job/spec.json``, and :meth:`rapha.runtime.sandbox.Workspace.run_harness` (bubblewrap,
namespaces, seccomp, limits, a fresh interpreter running ``rapha.runtime.harness``), then
the weights read back. Timed from opening the workspace to closing it.

Baseline: a fresh ``python`` subprocess doing the same work without the sandbox (import
torch, build the zoo model, load the initial weights, train with the node's trusted loop
and ``RaphaDataLoader``, save the weights; ``bench/_sandbox_overhead_train.py``). Timed
around the whole subprocess, so process start and the torch import count on both sides.

Same view, bundle, seed, epochs, batch size and thread count on both sides; runs are
interleaved (plain, sandbox, plain, sandbox, ...) and each variant's median is reported.

Prints one Markdown section to stdout (collected by ``bench/run.py``); progress goes to
stderr. Needs root (the sandbox drops to its own uid).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from _summary import cpu_name, summary_line  # bench/ is the script's directory

STUDIES: Final = 1000
EPOCHS: Final = 35  # a plain run of >= 60 s on a quiet 2-core machine (the target needs it)
RUNS: Final = 3
SEED: Final = 1
SIZE: Final = (64, 64)
THREADS: Final = 2
UID: Final = 62000
"""First uid of the sandbox's uid pool here. Not the default 61000: other checkouts on this
shared host may run sandboxes at the same time, and an older runtime reaps every process
of uid 61000 when its run ends."""
TARGET: Final = 1.10
ZOO: Final = "rapha.SmallCNN"
HELPER: Final = Path(__file__).resolve().parent / "_sandbox_overhead_train.py"
MB: Final = 1024 * 1024


@dataclass(frozen=True)
class Run:
    wall: float
    peak_bytes: int | None
    weights_sha256: str
    extra: dict[str, Any]


def _log(message: str) -> None:
    print(f"sandbox_overhead: {message}", file=sys.stderr, flush=True)


def _unavailable(why: str) -> int:
    print("## Sandbox overhead\n")
    print(f"Not measured: {why}")
    return 1


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _make_bundle(directory: Path, epochs: int) -> Any:
    from rapha.crypto import generate_private_key
    from rapha.runtime.bundle import sign_bundle, verify_bundle

    cli = Path(sys.executable).with_name("rapha")
    command = [str(cli)] if cli.is_file() else [shutil.which("rapha") or "rapha"]
    subprocess.run(
        [*command, "job", "init", str(directory), "--zoo", ZOO, "--size", str(SIZE[0])],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    manifest = directory / "bundle.toml"
    text, n = re.subn(
        r"(?m)^epochs = \d+", f"epochs = {epochs}", manifest.read_text(encoding="utf-8")
    )
    if n != 1:
        raise RuntimeError("bundle.toml from `rapha job init` has no single epochs line")
    manifest.write_text(text, encoding="utf-8")
    sign_bundle(directory, generate_private_key())
    return verify_bundle(directory, trusted_keys=None)


def _plain(spec: dict[str, Any], out: Path, root: Path) -> Run:
    out.mkdir()
    spec_path = root / "plain-spec.json"
    spec_path.write_text(json.dumps({**spec, "out": str(out)}), encoding="utf-8")
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(THREADS)  # what the sandbox sets
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(HELPER), "plain", str(spec_path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        env=env,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"the plain training subprocess failed (exit {proc.returncode})")
    weights = out / "weights.safetensors"
    run = Run(wall, usage.ru_maxrss * 1024, _sha256(weights), {})
    shutil.rmtree(out)
    return run


def _sandboxed(args: dict[str, Any], out: Path, root: Path) -> Run:
    out.mkdir()
    args_path = root / "sandbox-args.json"
    args_path.write_text(json.dumps({**args, "weights_out": str(out)}), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(HELPER), "sandbox", str(args_path)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise RuntimeError(f"the sandbox driver failed (exit {done.returncode})")
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if not report["ok"]:
        sys.stderr.write(report["stderr_tail"])
        raise RuntimeError(
            f"the sandboxed training failed (exit {report['returncode']}, "
            f"timed out: {report['timed_out']})"
        )
    run = Run(
        report["wall_seconds"],
        report["peak_memory_bytes"],
        _sha256(out / "weights.safetensors"),
        report,
    )
    shutil.rmtree(out)
    return run


def _mb(value: int | None) -> str:
    return "n/a" if value is None else f"{value / MB:.0f}"


def _median_peak(runs: list[Run]) -> int | None:
    values = [r.peak_bytes for r in runs if r.peak_bytes is not None]
    return int(statistics.median(values)) if values else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--studies", type=int, default=STUDIES)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--runs", type=int, default=RUNS)
    options = parser.parse_args()

    if os.geteuid() != 0:
        return _unavailable(
            "this benchmark must run as root (the sandbox drops to its own uid and mounts "
            "size-capped scratch space)."
        )
    from rapha.errors import DependencyError
    from rapha.node.synthetic import prepare_synthetic_view
    from rapha.runtime.sandbox import Sandbox

    try:
        probe = Sandbox(threads=THREADS, uid=UID)
        probe.ensure_available()
    except DependencyError as exc:
        return _unavailable(f"no usable sandbox on this machine ({exc}).")
    sandbox_python = probe.python

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="rapha-bench-") as tmp:
        root = Path(tmp)
        _log(f"building a synthetic view of {options.studies} studies …")
        prepared = prepare_synthetic_view(
            root / "synthetic", studies=options.studies, seed=SEED, size=SIZE, job_id="bench"
        )
        view = prepared.view
        counts = json.loads((view / "view.json").read_text(encoding="utf-8"))["counts"]
        _log(f"view: {counts}; making and signing the bundle …")
        bundle = _make_bundle(root / "bundle", options.epochs)
        hp = bundle.manifest.to_json()["train"]
        plain_spec = {
            "mode": "train",
            "manifest": bundle.manifest.to_json(),
            "weights": str(bundle.root / "weights.safetensors"),
            "train_dir": str(view / "train"),
            "val_dir": str(view / "val"),
            "threads": THREADS,
        }
        sandbox_args = {
            "bundle": str(bundle.root),
            "view": str(view),
            "threads": THREADS,
            "uid": UID,
        }

        plain: list[Run] = []
        boxed: list[Run] = []
        for i in range(1, options.runs + 1):
            _log(f"run {i}/{options.runs}: plain …")
            plain.append(_plain(plain_spec, root / f"plain-{i}", root))
            _log(f"run {i}/{options.runs}: plain {plain[-1].wall:.1f} s; sandbox …")
            boxed.append(_sandboxed(sandbox_args, root / f"sandbox-{i}", root))
            _log(f"run {i}/{options.runs}: sandbox {boxed[-1].wall:.1f} s")

    load_after = os.getloadavg()[0]
    plain_s = statistics.median(r.wall for r in plain)
    boxed_s = statistics.median(r.wall for r in boxed)
    ratio = boxed_s / plain_s
    long_enough = plain_s >= 60.0
    if not long_enough:
        verdict = f"not applicable, the plain run took only {plain_s:.1f} s"
    else:
        verdict = "met" if ratio <= TARGET else "NOT met"
    identical = len({r.weights_sha256 for r in plain + boxed}) == 1
    first = boxed[0].extra
    peak_source = first.get("peak_source", "unknown")
    tree_rss = _median_peak([Run(r.wall, r.extra.get("tree_vmhwm_bytes"), "", {}) for r in boxed])
    harness_s = statistics.median(float(r.extra["sandbox_wall_seconds"]) for r in boxed)

    print("## Sandbox overhead\n")
    print(
        f"One training run of the zoo model `{ZOO}` on a synthetic view "
        f"({options.studies} studies, seed {SEED}, {SIZE[0]}x{SIZE[1]} px: "
        f"{counts['train']} training and {counts['val']} validation records), "
        f"{hp['epochs']} epochs, batch size {hp['batch_size']}, optimizer {hp['optimizer']}, "
        f"seed {hp['seed']}, {THREADS} threads (`torch.set_num_threads` and "
        "`OMP`/`MKL`/`OPENBLAS_NUM_THREADS`) on both sides. **plain**: a fresh "
        f"`python` subprocess (`{sys.executable}`, Python {platform.python_version()}) that "
        "imports torch, builds the model, loads the bundle's initial weights, trains with "
        "the node's trusted loop (`train_trusted`, `RaphaDataset` / `RaphaDataLoader`) and "
        "saves the weights; wall time around the whole subprocess. **sandbox**: the train "
        "step of a node job, from opening `Sandbox.workspace()` to closing it: staging the "
        "bundle and the train and val splits, size-capped tmpfs `/out` and `/tmp`, "
        "`/job/spec.json`, `Workspace.run_harness` (bubblewrap with user/PID/net namespaces, "
        f"seccomp, rlimits, a cgroup where the host allows one, a leased uid, a fresh "
        f"`{sandbox_python}` running `rapha.runtime.harness`) and reading the weights "
        "back; the node process's own start, the bundle verification and the one-off "
        f"sandbox probe are not counted. The sandbox's uid pool starts at {UID} instead "
        "of the default 61000, to keep clear of sandboxes other work on this shared host "
        "runs at the same time. "
        f"Runs interleaved, plain first, {options.runs} of each. Machine: {cpu_name()}, "
        f"{os.cpu_count()} cores shared with other work (1-minute load average "
        f"{load_before:.1f} before, {load_after:.1f} after), so expect some noise.\n"
    )
    print(f"| variant | wall s (median of {options.runs}) | runs | peak RSS MB |")
    print("|---|---:|---|---:|")
    for name, runs, median in (
        ("plain PyTorch subprocess", plain, plain_s),
        ("Rapha sandboxed runtime", boxed, boxed_s),
    ):
        walls = ", ".join(f"{r.wall:.1f}" for r in runs)
        print(f"| {name} | {median:.1f} | {walls} | {_mb(_median_peak(runs))} |")
    print(
        f"\nRatio, sandbox wall time / plain wall time: **{ratio:.3f}** "
        f"(target ≤ {TARGET:.2f} for a training run of ≥ 60 s: "
        f"{verdict}). Of the sandbox's "
        f"time, {harness_s:.1f} s (median) is `run_harness` itself, the rest staging and "
        f"scratch set-up and tear-down. Weights of all {2 * options.runs} runs are "
        f"{'bit-identical' if identical else 'NOT bit-identical'}.\n"
    )
    print(
        "Peak RSS sources: plain is `ru_maxrss` of the training subprocess (`os.wait4` on "
        "its pid). Sandbox is `SandboxResult.peak_memory_bytes`, here from "
        f"{peak_source}; "
        + (
            "a cgroup figure counts the page cache the run touched (the view's images, "
            "torch's libraries) as well as anonymous memory, so it is not directly "
            "comparable. Like for like: the largest `VmHWM` (peak RSS, what `ru_maxrss` "
            "reports) among the sandbox uid's processes, polled from `/proc` once a second "
            f"during the run, is {_mb(tree_rss)} MB (median)."
            if "cgroup" in peak_source
            else "the sandbox falls back to `RUSAGE_CHILDREN` when it cannot make a cgroup; "
            "each sandbox ran from a fresh node-side driver process, so the figure covers "
            "that one run. The largest `VmHWM` among the sandbox uid's processes, polled "
            f"from `/proc` once a second, is {_mb(tree_rss)} MB (median)."
        )
    )
    print()
    print(
        summary_line(
            f"one training run ({ZOO}, {hp['epochs']} epochs, {counts['train']} records), "
            "wall time",
            rapha=f"sandboxed runtime: {boxed_s:.1f} s (median of {options.runs})",
            peer=f"plain PyTorch subprocess: {plain_s:.1f} s (median of {options.runs})",
            ratio=f"{ratio:.3f}x the time (lower is better; target <= {TARGET:.2f}: "
            f"{verdict if long_enough else 'n/a, the plain run is under 60 s'})",
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
