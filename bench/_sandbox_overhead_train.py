"""Child processes of ``bench/sandbox_overhead.py`` (not a benchmark of its own).

``plain SPEC``: the plain-PyTorch variant. A fresh interpreter that imports torch, builds
the bundle's model, loads its initial weights, trains with the node's trusted loop
(:func:`rapha.runtime.train.train_trusted`, the same ``RaphaDataset`` / ``RaphaDataLoader``)
and saves the weights: the harness's ``train`` mode minus the sandbox. ``SPEC`` has the
harness's job-spec format, with host paths.

``sandbox ARGS.json``: the sandboxed variant, run from a fresh node-side process so that
the ``RUSAGE_CHILDREN`` fallback of :attr:`SandboxResult.peak_memory_bytes` (and the
maximum RSS reported next to it) covers that one sandbox run only. It does what
``rapha.node.job``'s train step does (stage the bundle and the view's train and val
splits, mount the scratch space, write ``/job/spec.json``, ``Workspace.run_harness``, read
the weights back) and prints one JSON line with the timings and memory figures.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any


def _plain(spec_path: Path) -> int:
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    import torch
    from safetensors.torch import load_file, save_file

    from rapha.runtime.loader import RaphaDataset
    from rapha.runtime.manifest import BundleManifest
    from rapha.runtime.progress import ProgressWriter
    from rapha.runtime.train import train_trusted
    from rapha.runtime.zoo import build_model

    torch.set_num_threads(int(spec["threads"]))
    manifest = BundleManifest.from_json(spec["manifest"])
    model = build_model(manifest)
    model.load_state_dict(load_file(spec["weights"]), strict=True)
    labels = manifest.labels
    train, val = (
        RaphaDataset(
            Path(spec[key]),
            names=labels.names,
            uncertain=labels.uncertain.value,
            missing=labels.missing.value,
            channels=manifest.input.channels,
        )
        for key in ("train_dir", "val_dir")
    )
    train_trusted(model, train, val, manifest.to_json()["train"], ProgressWriter(None))
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(Path(spec["out"]) / "weights.safetensors"))
    return 0


class _HighWater(threading.Thread):
    """Polls ``/proc`` for the processes of one uid; keeps their largest ``VmHWM``.

    ``VmHWM`` is a process's peak RSS (what ``ru_maxrss`` reports for the plain variant);
    it only grows, so a sample taken within a second of the end is the peak.
    """

    def __init__(self, uid: int, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.uid = uid
        self.interval = interval
        self.peak_bytes = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if int(fields.get("Uid", "-1 ").split()[0]) != self.uid or "VmHWM" not in fields:
                continue
            hwm = int(fields["VmHWM"].split()[0]) * 1024
            self.peak_bytes = max(self.peak_bytes, hwm)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def _peak_source(memory: int, processes: int) -> str:
    """Where ``SandboxResult.peak_memory_bytes`` will come from on this host."""
    from rapha.runtime import _cgroup

    probe = _cgroup.create(memory, processes)
    if probe is None or probe.memory_dir is None:
        if probe is not None:
            probe.destroy()
        return "`getrusage(RUSAGE_CHILDREN).ru_maxrss` (no memory cgroup here)"
    probe.destroy()
    if probe.v2:
        return "the run's cgroup v2 `memory.peak`"
    return "the run's cgroup v1 `memory.max_usage_in_bytes`"


def _sandbox(args_path: Path) -> int:
    from rapha.runtime.bundle import verify_bundle
    from rapha.runtime.sandbox import Bind, Sandbox

    args = json.loads(args_path.read_text(encoding="utf-8"))
    bundle = verify_bundle(Path(args["bundle"]), trusted_keys=None)
    view = Path(args["view"])
    sandbox = Sandbox(threads=int(args["threads"]), uid=int(args["uid"]))
    sandbox.ensure_available()  # once per node process; run_job's call is then cached
    peak_source = _peak_source(sandbox.limits.memory, sandbox.limits.processes)
    events = 0

    def on_event(_event: Any) -> None:
        nonlocal events
        events += 1

    t0 = time.perf_counter()
    with sandbox.workspace() as ws:
        # What rapha.node.job.run_job and its _run do for the train step, in that order.
        ws.stage(bundle.root, "bundle")
        train_out = ws.scratch("train-out", sandbox.limits.output_bytes)
        spec: dict[str, Any] = {
            "mode": "train",
            "train_dir": "/view/train",
            "val_dir": "/view/val",
            "weights": "/bundle/weights.safetensors",
            "dp": None,
        }
        binds = [
            Bind(ws.stage(view / "train", "train"), "/view/train"),
            Bind(ws.stage(view / "val", "val"), "/view/val"),
            Bind(train_out, "/out", writable=True),
        ]
        job_dir = ws.path("train-job")
        full = {**spec, "manifest": bundle.manifest.to_json(), "bundle": "/bundle", "out": "/out"}
        full["threads"] = sandbox.threads
        (job_dir / "spec.json").write_text(json.dumps(full), encoding="utf-8")
        (job_dir / "spec.json").chmod(0o644)
        all_binds = [
            Bind(ws.root / "bundle", "/bundle"),
            Bind(job_dir, "/job"),
            Bind(ws.scratch("train-tmp", sandbox.limits.tmp_bytes), "/tmp", writable=True),
            *binds,
        ]
        watcher = _HighWater(ws.uid)
        watcher.start()
        try:
            result = ws.run_harness(
                ["--spec", "/job/spec.json"], binds=all_binds, on_event=on_event
            )
        finally:
            watcher.stop()
        ws_uid = ws.uid
        weights = ws.path("weights") / "weights.safetensors"
        raw = b""
        if result.ok:
            raw = (train_out / "weights.safetensors").read_bytes()
            weights.write_bytes(raw)
    wall = time.perf_counter() - t0
    if result.ok:  # for the caller's bit-identity check, outside the timed part
        (Path(args["weights_out"]) / "weights.safetensors").write_bytes(raw)
    report = {
        "ok": result.ok,
        "returncode": result.returncode,
        "timed_out": result.timed_out,
        "wall_seconds": wall,
        "sandbox_wall_seconds": result.wall_seconds,
        "peak_memory_bytes": result.peak_memory_bytes,
        "peak_source": peak_source,
        "tree_vmhwm_bytes": watcher.peak_bytes or None,
        "events": events,
        "uid": ws_uid,
        "leftover_processes": result.leftover_processes,
        "stderr_tail": result.stderr[-4000:],
    }
    print(json.dumps(report))
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("plain", "sandbox"):
        print("usage: _sandbox_overhead_train.py plain SPEC | sandbox ARGS", file=sys.stderr)
        return 2
    path = Path(argv[1])
    return _plain(path) if argv[0] == "plain" else _sandbox(path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
