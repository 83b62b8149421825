"""rapha.runtime.guard: every check on real files, real safetensors, a real Rego child and a
real audit log."""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from pydicom.data import get_testdata_file
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from rapha import crypto
from rapha.audit import AuditLog, verify_log
from rapha.errors import UsageError
from rapha.runtime.guard import (
    AUDIT_EVENT,
    METRICS_NAME,
    REASONS,
    GuardDecision,
    OutboxFile,
    OutputPolicy,
    guard_outputs,
)

RECORD_ID = "R7QX2M9KD4"
PSEUDONYM = "PSN-3F9A0C7E11"
PATIENT = "Doe^Jane"
ACCESSION = "ACC20240117"
NEEDLES = (RECORD_ID, PSEUDONYM, PATIENT, ACCESSION)
WEIGHTS = "weights.safetensors"

Arrays = dict[str, npt.NDArray[Any]]


def _initial_arrays() -> Arrays:
    rng = np.random.default_rng(7)
    return {
        "conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "fc.bias": np.zeros(2, dtype=np.float16),
        "mask": np.zeros(256, dtype=np.uint8),
        "steps": np.array([0], dtype=np.int64),
    }


def _trained(**changes: npt.NDArray[Any] | None) -> Arrays:
    arrays = {name: value + 1 for name, value in _initial_arrays().items()}
    for name, value in changes.items():
        name = name.replace("__", ".")
        if value is None:
            del arrays[name]
        else:
            arrays[name] = value
    return arrays


class Node:
    """A node's side of one job: bundle weights, sandbox output dir, audit log, outbox."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.initial = root / "bundle" / WEIGHTS
        self.initial.parent.mkdir()
        self.initial.write_bytes(save_safetensors(_initial_arrays(), metadata={"format": "np"}))
        self.out = root / "sandbox-out"
        self.out.mkdir()
        self.outbox = root / "jobs" / "job-1" / "outbox"
        self.key = crypto.generate_private_key()
        self.log_path = root / "audit.jsonl"
        self.audit = AuditLog.create(self.log_path, self.key)

    def write(self, data: bytes, name: str = WEIGHTS) -> Path:
        path = self.out / name
        path.write_bytes(data)
        return path

    def write_weights(self, arrays: Arrays, metadata: dict[str, str] | None = None) -> bytes:
        data = save_safetensors(arrays, metadata=metadata)
        self.write(data)
        return data

    def guard(self, **overrides: Any) -> GuardDecision:
        kind = overrides.pop("kind", "train")
        args: dict[str, Any] = {
            "out_dir": self.out,
            "outbox": self.outbox,
            "initial_weights": self.initial,
            "policy": OutputPolicy.default_for(kind),
            "needles": NEEDLES,
            "metrics": {"auc": 0.91, "loss": 0.25},
            "dp": None,
            "job": {"id": "job-1", "kind": kind, "records": 200},
            "rego_policy": None,
            "audit": self.audit,
        }
        args.update(overrides)
        return guard_outputs(**args)

    def entries(self) -> list[dict[str, Any]]:
        lines = self.log_path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines]


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path)


def _codes(decision: GuardDecision) -> set[str]:
    return {reason.split(":", 1)[0] for reason in decision.reasons}


def _assert_denied(node: Node, decision: GuardDecision, *codes: str) -> None:
    assert not decision.allowed
    assert set(codes) <= _codes(decision), decision.reasons
    assert decision.files == ()
    assert not node.outbox.exists()
    assert sorted(p.name for p in node.outbox.parent.iterdir()) == []  # nothing partial
    entry = node.entries()[-1]
    assert entry["event"] == AUDIT_EVENT
    assert entry["data"]["allowed"] is False
    assert entry["data"]["reasons"] == list(decision.reasons)


def _safetensors(header: dict[str, Any], buffer: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + buffer


# --- allowed outputs ---------------------------------------------------------------------


def test_allowed_weights_are_re_encoded_without_the_sandbox_metadata(node: Node) -> None:
    arrays = _trained()
    raw = node.write_weights(arrays, metadata={"format": "pt", "note": "trained on 1 GPU"})

    decision = node.guard()

    assert decision.allowed, decision.reasons
    assert decision.reasons == ()
    out = (node.outbox / WEIGHTS).read_bytes()
    assert out != raw
    (size,) = struct.unpack("<Q", out[:8])
    assert "__metadata__" not in json.loads(out[8 : 8 + size])
    loaded = load_safetensors(out)
    assert sorted(loaded) == sorted(arrays)
    for name, value in arrays.items():
        np.testing.assert_array_equal(loaded[name], value)
        assert loaded[name].dtype == value.dtype
    assert decision.files == (
        OutboxFile.of(METRICS_NAME, (node.outbox / METRICS_NAME).read_bytes()),
        OutboxFile.of(WEIGHTS, out),
    )
    assert json.loads((node.outbox / METRICS_NAME).read_bytes()) == {"auc": 0.91, "loss": 0.25}


def test_the_outbox_is_private_and_nothing_else_is_left_next_to_it(node: Node) -> None:
    node.write_weights(_trained())

    node.guard()

    assert stat.S_IMODE(node.outbox.stat().st_mode) == 0o700
    assert [p.name for p in node.outbox.parent.iterdir()] == ["outbox"]
    assert sorted(p.name for p in node.outbox.iterdir()) == [METRICS_NAME, WEIGHTS]


def test_an_existing_empty_outbox_is_filled(node: Node) -> None:
    node.outbox.mkdir(parents=True)
    node.write_weights(_trained())

    assert node.guard().allowed
    assert (node.outbox / WEIGHTS).exists()


def test_an_evaluate_job_returns_metrics_only(node: Node) -> None:
    decision = node.guard(kind="evaluate", initial_weights=None)

    assert decision.allowed, decision.reasons
    assert [f.name for f in decision.files] == [METRICS_NAME]


def test_an_evaluate_job_with_an_absent_output_directory_returns_metrics(node: Node) -> None:
    node.out.rmdir()

    assert node.guard(kind="evaluate", initial_weights=None).allowed


def test_bf16_weights_are_checked_and_re_encoded(node: Node) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import load as load_torch
    from safetensors.torch import save as save_torch

    node.initial.write_bytes(save_torch({"w": torch.zeros(8, dtype=torch.bfloat16)}))
    node.write(save_torch({"w": torch.full((8,), 0.5, dtype=torch.bfloat16)}))

    allowed = node.guard()

    assert allowed.allowed, allowed.reasons
    out = load_torch((node.outbox / WEIGHTS).read_bytes())
    assert out["w"].dtype == torch.bfloat16
    assert torch.equal(out["w"], torch.full((8,), 0.5, dtype=torch.bfloat16))

    shutil.rmtree(node.outbox)
    node.write(save_torch({"w": torch.tensor([float("nan")] * 8, dtype=torch.bfloat16)}))
    _assert_denied(node, node.guard(), "nonfinite")


# --- weights -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arrays", "code"),
    [
        (_trained(extra=np.zeros(3, dtype=np.float32)), "extra_tensor"),
        (_trained(steps=None), "missing_tensor"),
        (_trained(conv__weight=np.zeros((4, 3, 3, 4), dtype=np.float32)), "shape_mismatch"),
        (_trained(conv__weight=np.zeros((4, 3, 3, 3), dtype=np.float64)), "dtype_mismatch"),
        (_trained(fc__bias=np.array([np.nan, 0], dtype=np.float16)), "nonfinite"),
        (_trained(fc__bias=np.array([np.inf, 0], dtype=np.float16)), "nonfinite"),
    ],
    ids=["extra", "missing", "shape", "dtype", "nan", "inf"],
)
def test_weights_must_match_the_submitted_tensors(node: Node, arrays: Arrays, code: str) -> None:
    node.write_weights(arrays)

    _assert_denied(node, node.guard(), code)


def test_nonfinite_values_pass_when_the_policy_allows_them(node: Node) -> None:
    node.write_weights(_trained(fc__bias=np.array([np.nan, 0], dtype=np.float16)))

    decision = node.guard(policy=OutputPolicy((WEIGHTS,), allow_nonfinite=True))

    assert decision.allowed, decision.reasons


@pytest.mark.parametrize(
    "data",
    [
        b"\x80\x04\x95 not safetensors but a pickle",
        b"\x40\x00\x00\x00\x00\x00\x00\x00{}",  # a header longer than the file
        _safetensors(  # a hole of 4 hidden bytes before the tensor
            {"steps": {"dtype": "I64", "shape": [1], "data_offsets": [4, 12]}}, b"\0" * 12
        ),
        _safetensors(  # trailing bytes after the last tensor
            {"steps": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 16
        ),
        b'\x20\x00\x00\x00\x00\x00\x00\x00{"a": 1, "a": 2}              ',
    ],
    ids=["pickle", "truncated", "hole", "trailing", "duplicate-keys"],
)
def test_weights_that_are_not_strict_safetensors_are_refused(node: Node, data: bytes) -> None:
    node.write(data)

    _assert_denied(node, node.guard(), "malformed_weights")


# --- DICOM -------------------------------------------------------------------------------


def test_a_dcm_name_is_refused_in_any_case(node: Node) -> None:
    node.write_weights(_trained())
    node.write(b"not even dicom", name="scan.DCM")

    _assert_denied(node, node.guard(), "dicom_name", "unexpected_file")


def test_dicom_bytes_under_the_weights_name_are_refused(node: Node) -> None:
    node.write(Path(get_testdata_file("CT_small.dcm")).read_bytes())  # type: ignore[arg-type]

    _assert_denied(node, node.guard(), "dicom_content")


def test_a_dicom_file_inside_a_tensor_is_refused(node: Node) -> None:
    dicom = Path(get_testdata_file("CT_small.dcm")).read_bytes()  # type: ignore[arg-type]
    node.write_weights(_trained(mask=np.frombuffer(dicom[:256], dtype=np.uint8)))

    _assert_denied(node, node.guard(), "dicom_content")


# --- identifiers -------------------------------------------------------------------------


def _spell(text: str) -> npt.NDArray[np.uint8]:
    data = text.encode().ljust(256, b"\0")
    return np.frombuffer(data, dtype=np.uint8).copy()


@pytest.mark.parametrize(
    ("write", "codes"),
    [
        (lambda n: n.write_weights(_trained(mask=_spell(RECORD_ID))), {"identifier_in_output"}),
        (
            lambda n: n.write_weights(_trained(mask=_spell(PATIENT.replace("^", " ")))),
            {"identifier_in_output"},
        ),
        (
            lambda n: n.write_weights(_trained(mask=_spell(PSEUDONYM.encode().hex()))),
            {"identifier_in_output"},
        ),
        (
            lambda n: n.write_weights(_trained(), metadata={"cohort": ACCESSION}),
            {"identifier_in_output"},
        ),
        (
            lambda n: n.write_weights({**_trained(), RECORD_ID: np.zeros(1, np.float32)}),
            {"identifier_in_output", "extra_tensor"},
        ),
        (
            lambda n: (n.write_weights(_trained()), n.write(b"x", name=f"{RECORD_ID}.txt")),
            {"identifier_in_name", "unexpected_file"},
        ),
    ],
    ids=["tensor-bytes", "person-name", "hex", "metadata", "tensor-name", "file-name"],
)
def test_an_identifier_anywhere_in_the_output_denies_it(
    node: Node, write: Callable[[Node], object], codes: set[str]
) -> None:
    write(node)

    decision = node.guard()

    _assert_denied(node, decision, *codes)
    log = node.log_path.read_text(encoding="utf-8")
    assert not any(needle in log for needle in NEEDLES)
    assert not any(needle in reason for needle in NEEDLES for reason in decision.reasons)


def test_an_identifier_in_the_node_metrics_denies_the_output(node: Node) -> None:
    node.write_weights(_trained())

    decision = node.guard(metrics={"auc": 0.9, "worst_case": RECORD_ID})

    _assert_denied(node, decision, "identifier_in_metrics")


def test_an_xor_encoded_identifier_passes_the_scan_which_is_only_a_tripwire(node: Node) -> None:
    # The egress scan finds identifiers as written; weights can carry any bytes, so code
    # that encodes what it leaks (here XOR 0x5A) is not caught. The controls are the
    # sandbox (no network, view only) and what the output policy allows, not this scan.
    hidden = bytes(b ^ 0x5A for b in RECORD_ID.encode())
    node.write_weights(_trained(mask=_spell(hidden.decode("latin-1"))))

    decision = node.guard()

    assert decision.allowed, decision.reasons
    assert hidden in (node.outbox / WEIGHTS).read_bytes()


# --- file types and names ----------------------------------------------------------------


def _symlink(node: Node) -> None:
    target = node.root / "elsewhere.safetensors"
    target.write_bytes(save_safetensors(_trained()))
    (node.out / WEIGHTS).symlink_to(target)


def _hard_link(node: Node) -> None:
    path = node.write(save_safetensors(_trained()))
    os.link(path, node.root / "kept-by-the-sandbox")


def _fifo(node: Node) -> None:
    node.write_weights(_trained())
    os.mkfifo(node.out / "pipe")


def _subdirectory(node: Node) -> None:
    node.write_weights(_trained())
    (node.out / "more").mkdir()


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (_symlink, "symlink"),
        (_hard_link, "hard_link"),
        (_fifo, "special_file"),
        (_subdirectory, "subdirectory"),
    ],
    ids=["symlink", "hard-link", "fifo", "subdirectory"],
)
def test_only_regular_files_with_one_link_may_come_back(
    node: Node, make: Callable[[Node], None], code: str
) -> None:
    make(node)

    _assert_denied(node, node.guard(), code)


def test_a_device_node_is_refused(node: Node) -> None:
    node.write_weights(_trained())
    try:
        os.mknod(node.out / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD")

    _assert_denied(node, node.guard(), "special_file")


def test_an_output_directory_that_is_a_symlink_is_refused(node: Node) -> None:
    real = node.root / "real-out"
    node.out.rename(real)
    node.out.symlink_to(real)

    _assert_denied(node, node.guard(), "output_not_directory")


@pytest.mark.parametrize("name", [METRICS_NAME, "receipt.json"])
def test_files_only_the_node_writes_are_refused_from_the_sandbox(node: Node, name: str) -> None:
    node.write_weights(_trained())
    node.write(b'{"auc": 1.0}', name=name)

    _assert_denied(node, node.guard(), "reserved_name")


def test_the_policy_s_files_must_all_be_there(node: Node) -> None:
    _assert_denied(node, node.guard(), "missing_file")


def test_an_evaluate_job_may_not_return_weights(node: Node) -> None:
    node.write_weights(_trained())

    _assert_denied(node, node.guard(kind="evaluate"), "unexpected_file")


def test_outputs_above_the_size_cap_are_refused_unread(node: Node) -> None:
    node.write_weights(_trained())

    decision = node.guard(policy=OutputPolicy((WEIGHTS,), max_total_bytes=256))

    _assert_denied(node, decision, "too_large")
    assert node.entries()[-1]["data"]["read"] == []


# --- the Rego output policy --------------------------------------------------------------


def _rego(node: Node, body: str) -> Path:
    path = node.root / "output.rego"
    path.write_text(f"package rapha.output\n\nimport rego.v1\n\n{body}\n", encoding="utf-8")
    return path


def test_the_output_policy_sees_a_manifest_of_what_would_leave(node: Node) -> None:
    node.write_weights(_trained())
    policy = _rego(
        node,
        "ok if {\n"
        '  input.outputs[0].name == "weights.safetensors"\n'
        "  input.outputs[0].tensors == 4\n"
        "  input.outputs[0].parameters == 108 + 2 + 256 + 1\n"
        '  input.outputs[0].dtypes == ["F16", "F32", "I64", "U8"]\n'
        "  count(input.outputs[0].sha256) == 64\n"
        "  input.total_bytes == input.outputs[0].size + input.metrics_bytes\n"
        "  input.metrics.auc == 0.91\n"
        '  input.job.kind == "train"\n'
        "  input.dp.epsilon == 3\n"
        "  input.hospital.k_anonymity == 10\n"
        "}\n"
        'decision := {"allow": true, "reasons": []} if ok\n'
        'decision := {"allow": false, "reasons": ["manifest: unexpected input"]} if not ok',
    )

    decision = node.guard(
        rego_policy=policy, dp={"epsilon": 3, "delta": 1e-6}, hospital={"k_anonymity": 10}
    )

    assert decision.allowed, decision.reasons


def test_a_denying_output_policy_denies(node: Node) -> None:
    node.write_weights(_trained())
    policy = _rego(
        node, 'decision := {"allow": false, "reasons": ["embargo: no outputs this month"]}'
    )

    decision = node.guard(rego_policy=policy)

    _assert_denied(node, decision, "embargo")
    assert decision.reasons == ("embargo: no outputs this month",)


def test_an_undefined_output_policy_denies(node: Node) -> None:
    node.write_weights(_trained())

    decision = node.guard(rego_policy=_rego(node, "decision := input.no_such_field"))

    _assert_denied(node, decision, "policy_undefined")


def test_a_crashing_output_policy_denies(node: Node) -> None:
    node.write_weights(_trained())
    crash = _rego(node, "decision := " + "[" * 100_000 + "]" * 100_000)

    _assert_denied(node, node.guard(rego_policy=crash), "policy_crashed")


def test_an_output_policy_that_never_ends_denies_within_the_timeout(node: Node) -> None:
    node.write_weights(_trained())
    slow = _rego(
        node,
        "decision := count({1 | some i in numbers.range(1, 100000); "
        "some j in numbers.range(1, 100000)})",
    )

    decision = node.guard(rego_policy=slow, policy_timeout=0.5)

    _assert_denied(node, decision, "policy_timeout")


# --- the audit log -----------------------------------------------------------------------


def test_every_decision_is_in_a_verifiable_audit_log(node: Node) -> None:
    raw = node.write_weights(_trained())
    allowed = node.guard()
    shutil.rmtree(node.outbox)
    node.write(b"garbage")
    denied = node.guard()

    verdict = verify_log(node.log_path, node.key.public_key())

    entries = node.entries()
    assert verdict.entries == 3
    assert [e["event"] for e in entries] == ["audit.genesis", AUDIT_EVENT, AUDIT_EVENT]
    first, second = entries[1]["data"], entries[2]["data"]
    assert first["allowed"] is True
    assert first["job"] == "job-1"
    assert first["files"] == [f.as_json() for f in allowed.files]
    assert first["read"] == [OutboxFile.of(WEIGHTS, raw).as_json()]
    assert second["allowed"] is False
    assert second["reasons"] == list(denied.reasons)
    assert second["files"] == []


# --- arguments ---------------------------------------------------------------------------


def test_a_non_empty_outbox_is_refused_before_anything_is_read(node: Node) -> None:
    node.outbox.mkdir(parents=True)
    (node.outbox / "old").write_bytes(b"x")

    with pytest.raises(UsageError):
        node.guard()
    assert len(node.entries()) == 1


def test_a_needle_too_short_to_search_for_is_a_usage_error(node: Node) -> None:
    with pytest.raises(UsageError):
        node.guard(needles=["abc"])


@pytest.mark.parametrize(
    "files", [("model.pt",), ("../weights.safetensors",), ("w.safetensors", "w.safetensors")]
)
def test_an_output_policy_names_plain_distinct_safetensors_files(files: tuple[str, ...]) -> None:
    with pytest.raises(UsageError):
        OutputPolicy(files)


def test_every_reason_code_is_explained_briefly() -> None:
    assert all(0 < len(text) <= 100 for text in REASONS.values())
    assert OutputPolicy.default_for("train").files == (WEIGHTS,)
    assert OutputPolicy.default_for("evaluate").files == ()
