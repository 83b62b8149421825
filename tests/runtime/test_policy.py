"""rapha.runtime.policy: the default policies, and every way a policy fails closed.

Every test runs the real regopy child process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rapha.errors import UsageError
from rapha.runtime.policy import (
    MAX_INPUT_DEPTH,
    PolicyDecision,
    default_policy_text,
    evaluate_admission,
    evaluate_output_policy,
)

HOSPITAL = {
    "allow_custom_code": True,
    "dp_required": False,
    "dp_epsilon": 8.0,
    "dp_delta": 1e-5,
    "k_anonymity": 10,
    "evaluation_quota": 20,
}


def _admission(**changes: Any) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "bundle": {
            "kind": "train",
            "model": {"source": "zoo", "name": "resnet18"},
            "hparams": {"epochs": 5, "batch_size": 32, "lr": 0.001},
            "outputs": ["weights.safetensors"],
            "dp": None,
        },
        "signer": {"fingerprint": "ab" * 32, "pinned": True},
        "job": {"id": "job-1", "evaluations_used": 0},
        "hospital": dict(HOSPITAL),
    }
    for path, value in changes.items():
        *parents, last = path.split("__")
        where = facts
        for part in parents:
            where = where[part]
        where[last] = value
    return facts


def _codes(decision: PolicyDecision) -> set[str]:
    return {reason.split(":", 1)[0] for reason in decision.reasons}


def _policy(tmp_path: Path, body: str, package: str = "rapha.output") -> Path:
    path = tmp_path / "policy.rego"
    path.write_text(f"package {package}\n\nimport rego.v1\n\n{body}\n", encoding="utf-8")
    return path


# --- the default admission policy --------------------------------------------------------


def test_the_default_admission_policy_admits_a_plain_zoo_training_job() -> None:
    decision = evaluate_admission(None, _admission())

    assert decision == PolicyDecision(True, ())


def test_custom_code_is_admitted_unless_the_hospital_switched_it_off() -> None:
    allowed = evaluate_admission(None, _admission(bundle__model={"source": "custom"}))
    refused = evaluate_admission(
        None,
        _admission(bundle__model={"source": "custom"}, hospital__allow_custom_code=False),
    )

    assert allowed.allowed
    assert not refused.allowed
    assert _codes(refused) == {"custom_code_disabled"}


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"signer__pinned": False}, "unpinned_signer"),
        ({"bundle__kind": "exfiltrate"}, "unknown_kind"),
        ({"bundle__model": {"source": "pickle"}}, "unknown_model_source"),
        ({"hospital__dp_required": True}, "dp_required"),
        ({"bundle__dp": {"epsilon": 50.0, "delta": 1e-6}}, "dp_epsilon_too_high"),
        ({"bundle__dp": {"epsilon": 1.0, "delta": 0.01}}, "dp_delta_too_high"),
        ({"bundle__dp": {"epsilon": -1.0, "delta": 1e-6}}, "dp_invalid"),
        ({"bundle__hparams": {"epochs": 10_000, "batch_size": 32}}, "epochs_invalid"),
        ({"bundle__hparams": {"epochs": 2.5, "batch_size": 32}}, "epochs_invalid"),
        ({"bundle__hparams": {"epochs": 5, "batch_size": 1 << 20}}, "batch_size_invalid"),
        ({"bundle__outputs": ["weights.safetensors", "cohort.csv"]}, "undeclared_output"),
        ({"bundle__kind": "evaluate"}, "evaluate_outputs"),
    ],
)
def test_the_default_admission_policy_refuses(changes: dict[str, Any], code: str) -> None:
    decision = evaluate_admission(None, _admission(**changes))

    assert not decision.allowed
    assert code in _codes(decision)


def test_evaluate_jobs_are_admitted_until_the_quota_is_used() -> None:
    base = {"bundle__kind": "evaluate", "bundle__outputs": []}

    within = evaluate_admission(None, _admission(**base, job__evaluations_used=19))
    over = evaluate_admission(None, _admission(**base, job__evaluations_used=20))

    assert within.allowed
    assert _codes(over) == {"evaluation_quota"}


def test_dp_within_the_hospital_caps_satisfies_dp_required() -> None:
    decision = evaluate_admission(
        None,
        _admission(hospital__dp_required=True, bundle__dp={"epsilon": 4.0, "delta": 1e-6}),
    )

    assert decision.allowed


# --- the default output policy -----------------------------------------------------------


def _output(**changes: Any) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "job": {"id": "job-1", "kind": "train", "records": 120},
        "outputs": [{"name": "weights.safetensors", "size": 1000, "sha256": "0" * 64}],
        "metrics_bytes": 20,
        "total_bytes": 1020,
        "metrics": {"auc": 0.9},
        "dp": None,
        "policy": {"files": ["weights.safetensors"], "max_total_bytes": 1 << 20},
        "hospital": dict(HOSPITAL),
    }
    facts.update(changes)
    return facts


def test_the_default_output_policy_allows_declared_weights() -> None:
    assert evaluate_output_policy(None, _output()).allowed


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"job": {"kind": "evaluate"}}, "evaluate_outputs"),
        ({"policy": {"files": [], "max_total_bytes": 1 << 20}}, "undeclared_output"),
        ({"total_bytes": 2 << 20}, "too_large"),
        ({"job": {"kind": "train", "records": 3}}, "small_cohort"),
        ({"dp": {"epsilon": 9.5, "delta": 1e-6}}, "dp_epsilon_too_high"),
        ({"dp": {"epsilon": 1.0}}, "dp_delta_too_high"),
        ({"hospital": {**HOSPITAL, "dp_required": True}}, "dp_required"),
    ],
)
def test_the_default_output_policy_refuses(changes: dict[str, Any], code: str) -> None:
    decision = evaluate_output_policy(None, _output(**changes))

    assert not decision.allowed
    assert code in _codes(decision)


def test_the_default_policies_ship_as_package_data() -> None:
    assert "package rapha.admission" in default_policy_text("admission")
    assert "package rapha.output" in default_policy_text("output")
    with pytest.raises(UsageError):
        default_policy_text("sandbox")  # type: ignore[arg-type]


# --- failing closed ----------------------------------------------------------------------


def test_a_hospital_policy_decides_with_its_own_reasons(tmp_path: Path) -> None:
    policy = _policy(
        tmp_path,
        'deny contains "no_weekend_jobs: this hospital runs no jobs at weekends" if true\n'
        'decision := {"allow": count(deny) == 0, "reasons": sort(deny)}',
    )

    decision = evaluate_output_policy(policy, _output())

    assert decision == PolicyDecision(
        False, ("no_weekend_jobs: this hospital runs no jobs at weekends",)
    )


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ("other := 1", "policy_undefined"),
        ("decision := input.nothing_here", "policy_undefined"),
        ('decision := {"allow": true}', "policy_malformed"),
        ('decision := {"allow": "yes", "reasons": []}', "policy_malformed"),
        ("decision := [true]", "policy_malformed"),
        ('decision := {"allow": false, "reasons": []}', "policy_denied"),
        ('decision := {"allow": true, "reasons": ["late: too late"]}', "late"),
        ('decision := {"allow": false, "reasons": ["Patient Doe^Jane"]}', "policy_reason_invalid"),
        ('decision := {"allow": false, "reasons": [7]}', "policy_reason_invalid"),
        ("decision := 1 if true\ndecision := 2 if true", "policy_error"),
        ("decision := {", "policy_invalid"),
        # rego-cpp recurses on nesting depth: this segfaults the interpreter.
        ("decision := " + "[" * 100_000 + "]" * 100_000, "policy_crashed"),
    ],
)
def test_a_broken_policy_is_a_deny_with_a_reason_code(tmp_path: Path, body: str, code: str) -> None:
    decision = evaluate_output_policy(_policy(tmp_path, body), _output())

    assert not decision.allowed
    assert _codes(decision) == {code}


def test_a_policy_that_runs_too_long_is_killed_and_denies(tmp_path: Path) -> None:
    # Seconds of work for rego-cpp, in little memory: a 10^10-step comprehension.
    slow = _policy(
        tmp_path,
        "decision := count({1 | some i in numbers.range(1, 100000); "
        "some j in numbers.range(1, 100000)})",
    )

    decision = evaluate_output_policy(slow, _output(), timeout=0.5)

    assert _codes(decision) == {"policy_timeout"}


def test_a_missing_policy_file_denies(tmp_path: Path) -> None:
    decision = evaluate_admission(tmp_path / "absent.rego", _admission())

    assert _codes(decision) == {"policy_unreadable"}


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize(
    "facts",
    [
        {"nan": float("nan")},
        {"object": object()},
        {"deep": _nested(MAX_INPUT_DEPTH + 1)},
        {"big": "x" * (2 << 20)},
    ],
    ids=["nan", "object", "deep", "big"],
)
def test_input_that_is_not_small_plain_json_denies_before_any_child_runs(
    facts: dict[str, Any],
) -> None:
    decision = evaluate_output_policy(None, facts)

    assert _codes(decision) == {"policy_input"}


def test_a_timeout_must_be_positive() -> None:
    with pytest.raises(UsageError):
        evaluate_output_policy(None, _output(), timeout=0)
