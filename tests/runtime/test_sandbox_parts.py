"""The sandbox's parts on their own: seccomp program, progress pipe, loader, DP plan, leases."""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from rapha.errors import DependencyError, PolicyError, UsageError
from rapha.runtime.dp import plan_dp
from rapha.runtime.loader import RaphaDataLoader, RaphaDataset, encode_labels, masked_bce
from rapha.runtime.progress import MAX_LINE, ProgressReader, ProgressWriter, round_sig
from rapha.runtime.sandbox import Bind, Sandbox
from rapha.runtime.seccomp import DENIED_SYSCALLS, build_filter

# --- seccomp ---------------------------------------------------------------------------------


def _instructions(program: bytes) -> list[tuple[int, int, int, int]]:
    return [struct.unpack("<HBBI", program[i : i + 8]) for i in range(0, len(program), 8)]


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_the_filter_checks_the_architecture_first_and_names_every_denied_call(arch: str) -> None:
    program = build_filter(arch).program
    code = _instructions(program)

    assert code[0] == (0x20, 0, 0, 4)  # load seccomp_data.arch
    assert code[1][0] == 0x15
    assert code[1][1:3] == (1, 0)
    assert code[2] == (0x06, 0, 0, 0x80000000)  # foreign ABI: kill the process
    compared = {k for op, _, _, k in code if op == 0x15}
    assert len(compared) >= len(DENIED_SYSCALLS)
    for at, (op, jt, jf, _) in enumerate(code):
        if op in (0x15, 0x45):
            assert at + 1 + max(jt, jf) < len(code), "a jump leaves the program"
    assert code[-1][0] == 0x06  # every path ends in a return


def test_the_filter_is_deterministic_and_refuses_unknown_architectures() -> None:
    assert build_filter("x86_64").digest == build_filter("x86_64").digest
    assert build_filter("x86_64").digest != build_filter("aarch64").digest
    with pytest.raises(DependencyError, match="no seccomp filter"):
        build_filter("riscv64")


# --- progress ---------------------------------------------------------------------------------


def test_progress_events_are_numbers_only_and_rate_limited() -> None:
    read, write = os.pipe()
    now = [0.0]
    writer = ProgressWriter(write, clock=lambda: now[0])

    sent = [writer.emit(epoch=1, epochs=2, step=1, steps=10, loss=0.123456)]
    sent.append(writer.emit(epoch=1, epochs=2, step=2, steps=10, loss=0.2))  # too soon
    now[0] = 1.5
    sent.append(writer.emit(epoch=2, epochs=2, step=3, steps=10, loss=float("nan")))
    os.close(write)
    data = os.read(read, 4096)
    os.close(read)

    assert sent == [True, False, True]
    lines = [json.loads(line) for line in data.splitlines()]
    assert lines[0] == {"epoch": 1, "epochs": 2, "step": 1, "steps": 10, "loss": 0.123}
    assert "loss" not in lines[1]


def test_the_reader_drops_anything_but_numbers_and_floods() -> None:
    reader = ProgressReader()
    chunk = b"".join(
        [
            b'{"epoch": 1, "loss": 0.5}\n',
            b'{"epoch": 1, "note": "PATIENT^NAME"}\n',
            b'{"loss": "0.1"}\n',
            b'{"step": -1}\n',
            b'{"loss": true}\n',
            b"not json\n",
            b"x" * (MAX_LINE + 10) + b"\n",
        ]
    )
    events = list(reader.feed(chunk, now=10.0))
    later = list(reader.feed(b'{"epoch": 2}\n{"epoch": 3}\n', now=11.5))

    assert [e.to_json() for e in events] == [{"epoch": 1, "loss": 0.5}]
    assert [e.epoch for e in later] == [2]  # the second came less than a second later
    assert reader.dropped == 7


def test_round_sig() -> None:
    assert round_sig(0.0123456) == 0.0123
    assert round_sig(1234.5) == 1230
    assert round_sig(0.0) == 0.0


# --- loader ----------------------------------------------------------------------------------


def test_label_policies() -> None:
    rows: list[dict[str, int | None] | None] = [{"a": 1, "b": 0}, {"a": -1, "b": None}, None]

    ignore = encode_labels(rows, ["a", "b"])
    strict = encode_labels(rows, ["a", "b"], uncertain="positive", missing="negative")

    assert ignore[0].tolist() == [1.0, 0.0]
    assert np.isnan(ignore[1]).all()
    assert np.isnan(ignore[2]).all()
    assert strict.tolist() == [[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]]


def test_masked_bce_ignores_nan_labels() -> None:
    logits = torch.tensor([[0.0, 5.0], [0.0, 0.0]])
    targets = torch.tensor([[1.0, float("nan")], [0.0, float("nan")]])

    loss = masked_bce(logits, targets)

    assert float(loss) == pytest.approx(math.log(2))


def test_the_dataset_reads_batches_from_the_memory_map(tmp_path: Path) -> None:
    images = np.arange(5 * 4 * 4, dtype=np.uint8).reshape(5, 4, 4)
    np.save(tmp_path / "images.npy", images)
    with (tmp_path / "records.jsonl").open("w") as fh:
        for i in range(5):
            fh.write(json.dumps({"index": i, "labels": {"e": i % 2}}) + "\n")
    dataset = RaphaDataset(tmp_path, names=["e"], channels=3, normalize="none")
    standard = RaphaDataset(tmp_path, names=["e"])

    batch, labels = dataset.__getitems__([3, 1])
    batches = list(RaphaDataLoader(dataset, batch_size=2, shuffle=True, seed=1))

    assert batch.shape == (2, 3, 4, 4)
    assert torch.allclose(batch[0, 0], torch.from_numpy(images[3] / 255.0).float())
    assert torch.equal(batch[:, 0], batch[:, 2])
    assert labels.tolist() == [[1.0], [1.0]]
    assert sum(len(b[0]) for b in batches) == 5
    one = standard[2][0]
    assert float(one.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(one.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)


# --- DP plan ---------------------------------------------------------------------------------


def test_the_node_computes_noise_and_epsilon_itself() -> None:
    plan = plan_dp(
        records=1000, batch_size=50, epochs=3, target_epsilon=4.0, delta=1e-5, max_grad_norm=1.0
    )

    assert plan.steps == 60
    assert plan.sample_rate == pytest.approx(0.05)
    assert plan.noise_multiplier > 0.5
    assert plan.epsilon <= 4.0 + 1e-6
    with pytest.raises(PolicyError, match="delta"):
        plan_dp(records=10, batch_size=5, epochs=1, target_epsilon=1, delta=0.5, max_grad_norm=1)


# --- sandbox object --------------------------------------------------------------------------


def test_a_missing_bwrap_is_refused_with_the_reason(tmp_path: Path) -> None:
    sandbox = Sandbox(bwrap=tmp_path / "bwrap")

    with pytest.raises(DependencyError, match="never run without a sandbox"):
        sandbox.ensure_available()
    with pytest.raises(DependencyError):
        sandbox.run(["/usr/bin/true"], binds=[])


def test_root_is_never_bound_and_uid_zero_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        Bind(Path("/"), "/host")
    with pytest.raises(UsageError):
        Bind(tmp_path, "/")
    with pytest.raises(UsageError):
        Sandbox(uid=0)


def test_the_profile_never_binds_root_and_is_stable() -> None:
    first, second = Sandbox().profile(), Sandbox().profile()
    args = first["bwrap_args"]

    assert first == second
    pairs = list(itertools.pairwise(args))
    assert ("--ro-bind", "/") not in pairs
    assert ("--bind", "/") not in pairs
    for flag in ("--unshare-user", "--unshare-net", "--unshare-pid", "--clearenv",
                 "--die-with-parent", "--new-session"):  # fmt: skip
        assert flag in args


@pytest.mark.skipif(os.geteuid() != 0, reason="uid leases exist for a root node only")
def test_concurrent_workspaces_lease_distinct_uids(tmp_path: Path) -> None:
    sandbox = Sandbox(staging_root=tmp_path / "staging", uid_pool=2)

    with sandbox.workspace() as a, sandbox.workspace() as b:
        assert a.uid != b.uid
        with pytest.raises(Exception, match="uids are in use"), sandbox.workspace():
            pass
    with sandbox.workspace() as c:
        assert c.uid in (a.uid, b.uid)
