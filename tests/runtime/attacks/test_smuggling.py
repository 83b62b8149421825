"""Attacks through what the sandbox returns: the output guard must deny each one.

The ``train()`` of each bundle trains nothing and returns normally after planting its
payload, so the job reaches the guard; each test asserts the denial with its reason code,
that the outbox does not exist, and that the decision is in the audit log.
"""

from __future__ import annotations

import json

import pytest

from rapha.errors import PolicyError
from rapha.node.quota import EvaluationQuota

from .conftest import Node

pytestmark = pytest.mark.slow

# Patches the harness's save_file (the code shares the process with the harness).
PATCH_SAVE = """
import safetensors.torch as _st
_original_save = _st.save_file
"""


def denied(node: Node, body: str, *codes: str, extra: str = "") -> str:
    with pytest.raises(PolicyError) as info:
        node.run(body + "\nreturn None\n", extra=extra)
    message = str(info.value)
    for code in codes:
        assert code in message, message
    assert not node.outbox.exists() or not any(node.outbox.iterdir())
    decisions = [
        json.loads(line)
        for line in node.audit_path.read_text().splitlines()
        if '"guard.decision"' in line
    ]
    assert decisions, "the guard's decision is not in the audit log"
    assert decisions[-1]["data"]["allowed"] is False
    return message


def first_record_id() -> str:
    return """
import json
with open("/view/train/records.jsonl") as fh:
    RID = json.loads(fh.readline())["record_id"]
"""


def test_an_extra_tensor_is_denied(node: Node) -> None:
    denied(
        node,
        'import torch\nmodel.register_buffer("smuggled", torch.arange(1000, dtype=torch.float32))',
        "extra_tensor",
    )


def test_a_changed_tensor_shape_is_denied(node: Node) -> None:
    denied(
        node,
        "import torch\nmodel.head = torch.nn.Linear(8, 4)",
        "shape_mismatch",
    )


def test_a_dcm_file_is_denied(node: Node) -> None:
    denied(node, 'open("/out/image.dcm", "wb").write(b"\\0" * 128 + b"DICM")', "dicom_name")


def test_dicom_bytes_under_the_weights_name_are_denied(node: Node) -> None:
    payload = """
def _save(tensors, path, metadata=None):
    with open(path, "wb") as fh:
        meta = b"\\x02\\x00\\x10\\x00UI\\x14\\x001.2.840.10008.1.2.1\\x00"
        fh.write(b"\\0" * 128 + b"DICM" + meta)
_st.save_file = _save
"""
    denied(node, PATCH_SAVE + payload, "dicom_content")


def test_identifiers_in_weight_bytes_are_denied(node: Node) -> None:
    body = (
        first_record_id()
        + """
import torch
raw = RID.encode()
with torch.no_grad():
    flat = model.conv.weight.view(-1)
    as_bytes = flat.view(torch.uint8)
    as_bytes[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
"""
    )
    denied(node, body, "identifier_in_output")


def test_identifiers_in_safetensors_metadata_are_denied(node: Node) -> None:
    body = (
        first_record_id()
        + PATCH_SAVE
        + """
def _save(tensors, path, metadata=None):
    _original_save(tensors, path, metadata={"cohort": RID})
_st.save_file = _save
"""
    )
    denied(node, body, "identifier_in_output")


@pytest.mark.parametrize(
    ("plant", "code"),
    [
        ('os.symlink("/etc/passwd", "/out/link.safetensors")', "symlink"),
        (
            'open("/out/a", "w").write("x")\nos.link("/out/a", "/out/b")',
            "hard_link",
        ),
        ('os.mkfifo("/out/pipe")', "special_file"),
        ('os.mkdir("/out/sub")', "subdirectory"),
    ],
)
def test_links_fifos_and_directories_in_the_output_are_denied(
    node: Node, plant: str, code: str
) -> None:
    denied(node, plant, code)


def test_a_device_cannot_even_be_created(node: Node) -> None:
    denied(
        node,
        """
import stat
try:
    os.mknod("/out/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    made = True
except OSError:
    made = False
    open("/out/not-a-device", "w").write("x")
""",
        "unexpected_file",
    )


def test_file_names_carrying_identifiers_are_denied(node: Node) -> None:
    denied(
        node,
        first_record_id() + 'open("/out/" + RID + ".safetensors", "w").write("x")',
        "identifier_in_name",
    )


def test_a_bundle_written_metrics_file_is_denied(node: Node) -> None:
    denied(node, 'open("/out/metrics.json", "w").write("{}")', "reserved_name")


def test_an_honest_bundle_passes_the_same_guard(node: Node) -> None:
    outcome = node.run("return None\n")

    assert outcome.decision.allowed
    names = sorted(p.name for p in node.outbox.iterdir())
    assert names == ["metrics.json", "weights.safetensors"]


def test_adaptive_probing_is_capped_by_the_evaluation_quota(node: Node) -> None:
    quota = EvaluationQuota(node.work / "state", limit=1)
    node.run("return None\n", quota=quota)

    with pytest.raises(PolicyError, match="limit"):
        node.run("return None\n", quota=quota)

    predicts = [
        json.loads(line)
        for line in node.audit_path.read_text().splitlines()
        if '"job.sandbox"' in line and '"predict"' in line
    ]
    assert len(predicts) == 1  # the second job never saw a test pixel
