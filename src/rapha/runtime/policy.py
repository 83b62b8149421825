"""Hospital-owned Rego policies, evaluated where they cannot take the node down.

Two policies decide, each as one Rego package with a ``decision`` rule:

* **admission** (``data.rapha.admission.decision``): may this signed bundle run here at
  all? Asked before any of its code runs; see ``policies/admission.rego`` for the input.
* **output** (``data.rapha.output.decision``): may these guarded outputs leave the
  hospital? Asked by :func:`rapha.runtime.guard.guard_outputs` after every structural check
  passed; see ``policies/output.rego`` for the input.

``decision`` must be an object ``{"allow": <bool>, "reasons": [<string>, ...]}``. Anything
else is a deny. The default policies ship with Rapha (:func:`default_policy_text`);
``rapha node init`` copies them into the node directory, where the hospital owns them.

**Fail closed, in another process.** rego-cpp is native code: a deeply nested term in a
policy segfaults it, and some inputs make it allocate without bound. So each evaluation
runs ``python -I rapha/runtime/_rego.py`` in a child process (it imports only the standard
library and regopy), with a wall-clock timeout, a CPU rlimit and a resident-memory
watchdog; the query binds the decision to a variable (``x = data.<pkg>.decision``),
because querying some documents bare yields output regopy cannot parse. Whatever goes
wrong becomes a deny with a stable reason code:

=====================  =================================================================
``policy_unreadable``  the policy file cannot be read as UTF-8
``policy_input``       the input is not plain JSON, too large or nested too deep
``policy_invalid``     the policy does not compile
``policy_error``       the query failed (a conflict between rules, a runtime error)
``policy_undefined``   ``decision`` is undefined for this input
``policy_malformed``   ``decision`` is not ``{"allow": bool, "reasons": [str]}``, or the
                       child's output is not the protocol's JSON
``policy_timeout``     the child ran past its timeout and was killed
``policy_memory``      the child's resident memory passed the limit and it was killed
``policy_crashed``     the child died from a signal or exited non-zero
``policy_denied``      the policy said no without giving a reason
=====================  =================================================================

Reasons a policy gives are kept only if they look like ``code: short explanation``
(lower-case code, printable ASCII, at most :data:`MAX_REASON_CHARS`); any other string is
replaced by ``policy_reason_invalid``, so a policy cannot smuggle free text (or a value it
matched) into the audit log or out of the hospital.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Final, Literal

from rapha.errors import UsageError

__all__ = [
    "DEFAULT_TIMEOUT",
    "MAX_INPUT_BYTES",
    "MAX_INPUT_DEPTH",
    "MAX_REASON_CHARS",
    "MAX_RSS_BYTES",
    "PolicyDecision",
    "default_policy_text",
    "evaluate_admission",
    "evaluate_output_policy",
]

#: Seconds one evaluation may take, child start-up included.
DEFAULT_TIMEOUT: Final = 10.0
#: Resident memory the child may reach before it is killed.
MAX_RSS_BYTES: Final = 1 << 30
#: Largest input document, as JSON bytes.
MAX_INPUT_BYTES: Final = 1 << 20
#: Deepest nesting of arrays and objects in the input (rego-cpp recurses on depth).
MAX_INPUT_DEPTH: Final = 32
#: Longest reason string kept from a policy.
MAX_REASON_CHARS: Final = 200

PolicyName = Literal["admission", "output"]

_CHILD: Final = Path(__file__).with_name("_rego.py")
_MAX_OUTPUT_BYTES: Final = 1 << 20
_POLL: Final = 0.02
_REASON_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,63}(: [ -~]+)?")
_PAGE: Final = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class PolicyDecision:
    """A policy's verdict: ``allowed`` only when the policy said yes without a reason against.

    ``reasons`` are stable ``code: explanation`` strings, never a value from the input.
    """

    allowed: bool
    reasons: tuple[str, ...] = ()

    @classmethod
    def deny(cls, code: str, explanation: str) -> PolicyDecision:
        """A deny with one reason ``code: explanation``."""
        return cls(False, (f"{code}: {explanation}",))


def default_policy_text(name: PolicyName) -> str:
    """The Rego source of the default ``admission`` or ``output`` policy shipped with Rapha."""
    if name not in ("admission", "output"):
        raise UsageError("the default policies are 'admission' and 'output'")
    return (resources.files("rapha.runtime") / "policies" / f"{name}.rego").read_text("utf-8")


def evaluate_admission(
    policy: Path | None, facts: Mapping[str, Any], *, timeout: float = DEFAULT_TIMEOUT
) -> PolicyDecision:
    """Ask the admission policy (``data.rapha.admission.decision``) about a job.

    Args:
        policy: the hospital's ``admission.rego``; ``None`` for the default shipped with Rapha.
        facts: the input document (see ``policies/admission.rego``): plain JSON values.
        timeout: seconds before the evaluation is killed and counted as a deny.

    Returns:
        The decision; every failure is a deny with a reason code (module docstring). Never
        raises for a bad policy, input or crash.
    """
    return _evaluate("admission", policy, facts, timeout=timeout)


def evaluate_output_policy(
    policy: Path | None, facts: Mapping[str, Any], *, timeout: float = DEFAULT_TIMEOUT
) -> PolicyDecision:
    """Ask the output policy (``data.rapha.output.decision``) about guarded outputs.

    Same contract as :func:`evaluate_admission`; the input is described in
    ``policies/output.rego``.
    """
    return _evaluate("output", policy, facts, timeout=timeout)


# --- the evaluator -----------------------------------------------------------------------


def _depth(value: Any, limit: int) -> bool:
    """Whether ``value`` nests arrays/objects at most ``limit`` deep (iteratively)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, Mapping | list | tuple):
            if level >= limit:
                return False
            children = item.values() if isinstance(item, Mapping) else item
            stack.extend((child, level + 1) for child in children)
    return True


def _request(name: PolicyName, source: str, facts: Mapping[str, Any]) -> bytes | None:
    if not _depth(facts, MAX_INPUT_DEPTH):
        return None
    try:
        data = json.dumps(
            {
                "modules": [[f"{name}.rego", source]],
                "input": facts,
                "query": f"x = data.rapha.{name}.decision",
            },
            allow_nan=False,
        ).encode("utf-8")
    except (TypeError, ValueError):
        return None
    return data if len(data) - len(source) <= MAX_INPUT_BYTES else None


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0  # gone already, or no procfs: the timeout still bounds the child


def _run_child(request: bytes, timeout: float) -> tuple[str, bytes]:
    """Run the child on ``request``; ``("ok", stdout)`` or ``(reason code, b"")``."""
    env = {"RAPHA_REGO_CPU_SECONDS": str(max(1, math.ceil(timeout)) + 1), "LC_ALL": "C.UTF-8"}
    deadline = time.monotonic() + timeout
    # The request goes in through an unlinked file rather than a pipe: communicate() can
    # be retried after a timeout without losing output, but not without losing input.
    with tempfile.TemporaryFile() as request_file:
        request_file.write(request)
        request_file.seek(0)
        proc = subprocess.Popen(  # noqa: S603 - our own interpreter and script, no shell
            [sys.executable, "-I", os.fspath(_CHILD)],
            stdin=request_file,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
    with proc:
        try:
            while True:
                try:
                    stdout, _ = proc.communicate(timeout=_POLL)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if time.monotonic() > deadline:
                    return "policy_timeout", b""
                if _rss(proc.pid) > MAX_RSS_BYTES:
                    return "policy_memory", b""
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    if proc.returncode != 0:
        return "policy_crashed", b""
    return "ok", stdout[:_MAX_OUTPUT_BYTES]


_KILLED: Final = {
    "policy_timeout": "the policy did not finish in time and was stopped",
    "policy_memory": "the policy used too much memory and was stopped",
    "policy_crashed": "the policy evaluator crashed",
}
_STAGES: Final = {
    "compile": ("policy_invalid", "the policy does not compile; check it with regopy or opa"),
    "query": ("policy_error", "evaluating the policy failed (conflicting rules?)"),
    "protocol": ("policy_malformed", "the policy evaluator did not understand its input"),
}


def _evaluate(
    name: PolicyName, policy: Path | None, facts: Mapping[str, Any], *, timeout: float
) -> PolicyDecision:
    if not timeout > 0:
        raise UsageError("a policy timeout must be a positive number of seconds")
    try:
        source = default_policy_text(name) if policy is None else policy.read_text("utf-8")
    except (OSError, UnicodeDecodeError):
        return PolicyDecision.deny("policy_unreadable", f"the {name} policy cannot be read")
    request = _request(name, source, facts)
    if request is None:
        return PolicyDecision.deny(
            "policy_input",
            f"the {name} policy input is not plain JSON, too large or nested too deep",
        )
    status, stdout = _run_child(request, timeout)
    if status != "ok":
        return PolicyDecision.deny(status, _KILLED[status])
    try:
        result = json.loads(stdout)
    except ValueError:
        result = None
    if not isinstance(result, dict) or result.get("status") not in ("ok", "undefined", "error"):
        return PolicyDecision.deny("policy_malformed", "the policy evaluator's output is garbled")
    if result["status"] == "undefined":
        return PolicyDecision.deny(
            "policy_undefined", f"data.rapha.{name}.decision is undefined for this input"
        )
    if result["status"] == "error":
        code, explanation = _STAGES.get(str(result.get("stage")), _STAGES["protocol"])
        return PolicyDecision.deny(code, explanation)
    return _decision(result.get("value"), name)


def _decision(value: Any, name: PolicyName) -> PolicyDecision:
    if (
        not isinstance(value, dict)
        or not isinstance(value.get("allow"), bool)
        or not isinstance(value.get("reasons"), list)
    ):
        return PolicyDecision.deny(
            "policy_malformed",
            f'data.rapha.{name}.decision is not {{"allow": bool, "reasons": [string]}}',
        )
    reasons = tuple(dict.fromkeys(_reason(r) for r in value["reasons"]))
    if value["allow"] is True and not reasons:
        return PolicyDecision(True)
    return PolicyDecision(
        False, reasons or ("policy_denied: the policy denied the request without a reason",)
    )


def _reason(reason: Any) -> str:
    if (
        isinstance(reason, str)
        and len(reason) <= MAX_REASON_CHARS
        and "^" not in reason
        and _REASON_RE.fullmatch(reason)
    ):
        return reason
    return "policy_reason_invalid: the policy gave a reason that is not 'code: explanation'"
