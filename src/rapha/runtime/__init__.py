"""Untrusted code: bundles, the sandbox, the in-sandbox harness, trusted evaluation and
the output guard (DESIGN.md, trust boundaries 2 and 3).

* :mod:`~rapha.runtime.manifest` and :mod:`~rapha.runtime.bundle`: ``bundle.toml``, the
  bundle digest, signing, verification and safe ``.tar`` extraction;
* :mod:`~rapha.runtime.zoo`: the catalogue of architectures a ``zoo`` bundle may name;
* :mod:`~rapha.runtime.sandbox` and :mod:`~rapha.runtime.seccomp`: bubblewrap, one process
  tree per job, as a dedicated uid, with no network;
* :mod:`~rapha.runtime.harness`, :mod:`~rapha.runtime.loader`, :mod:`~rapha.runtime.train`:
  what runs inside (imported there, not here: they load torch);
* :mod:`~rapha.runtime.progress`: the numbers-only event pipe out of the sandbox;
* :mod:`~rapha.runtime.evaluate` and :mod:`~rapha.runtime.dp`: metrics and the DP budget,
  computed by the node itself;
* :mod:`~rapha.runtime.guard` and :mod:`~rapha.runtime.policy`: the output guard and the
  hospital's Rego policies.

This package never imports :mod:`rapha.pacs`; only :mod:`rapha.node` wires the rooms.
"""

from rapha.runtime.bundle import (
    SIGNATURE_NAME,
    WEIGHTS_NAME,
    VerifiedBundle,
    bundle_digest,
    key_fingerprint,
    read_weights_spec,
    sign_bundle,
    verify_bundle,
)
from rapha.runtime.dp import DPPlan, plan_dp
from rapha.runtime.evaluate import evaluate, write_metrics
from rapha.runtime.guard import (
    GuardDecision,
    OutboxFile,
    OutputPolicy,
    guard_outputs,
    precheck_outputs,
)
from rapha.runtime.manifest import (
    BundleManifest,
    JobKind,
    ModelSource,
    load_manifest,
    parse_manifest,
)
from rapha.runtime.policy import PolicyDecision, evaluate_admission, evaluate_output_policy
from rapha.runtime.progress import ProgressEvent
from rapha.runtime.sandbox import Bind, Sandbox, SandboxLimits, SandboxResult, Workspace
from rapha.runtime.seccomp import build_filter
from rapha.runtime.zoo import ZOO

__all__ = [
    "SIGNATURE_NAME",
    "WEIGHTS_NAME",
    "ZOO",
    "Bind",
    "BundleManifest",
    "DPPlan",
    "GuardDecision",
    "JobKind",
    "ModelSource",
    "OutboxFile",
    "OutputPolicy",
    "PolicyDecision",
    "ProgressEvent",
    "Sandbox",
    "SandboxLimits",
    "SandboxResult",
    "VerifiedBundle",
    "Workspace",
    "build_filter",
    "bundle_digest",
    "evaluate",
    "evaluate_admission",
    "evaluate_output_policy",
    "guard_outputs",
    "key_fingerprint",
    "load_manifest",
    "parse_manifest",
    "plan_dp",
    "precheck_outputs",
    "read_weights_spec",
    "sign_bundle",
    "verify_bundle",
    "write_metrics",
]
