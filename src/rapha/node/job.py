"""One job on the node, from a verified bundle and a built view to the outbox.

The exact pipeline of a hospital run and of ``rapha job dry-run`` (DESIGN.md, "The flow of
one job", trust boundaries 2 and 3):

1. **admission**: the hospital's admission policy (Rego) and rules (custom code allowed?
   DP required?) decide whether the bundle may run at all;
2. **train** (train jobs): a sandbox sees the bundle and the view's train and val splits,
   nothing else, and writes weights; the node counts the records it offered (what is
   billed) and, for DP, chose the noise and computes the ε itself
   (:func:`rapha.runtime.dp.plan_dp`);
3. **predict**: another sandbox sees the bundle, the weights to evaluate and the pixels of
   val and test shuffled together under a fresh permutation, without labels or metadata,
   and writes one score row per image;
4. **trusted evaluation** (:func:`rapha.runtime.evaluate`): the node picks thresholds on
   val and computes metrics on test, with subgroup suppression; predictions stay here
   (``PRIVATE_DIR/predictions.npy``, beside the held-out test labels);
5. **output guard** (:func:`rapha.runtime.guard_outputs`), after both sandboxes' process
   trees are gone: structure, weights, DICOM, egress scan, size, output policy (Rego).
   Only on allow does the outbox hold the re-encoded files and the node's ``metrics.json``.

Every step is recorded in the audit log. A sandbox that fails raises
:class:`~rapha.errors.SandboxError` whose ``detail`` is the sandbox's stderr: the dry-run
prints it in full, a production node sends only the error class and ``code``.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from rapha.audit import AuditLog
from rapha.crypto import canonical_json, digest_bytes
from rapha.errors import DataError, PolicyError, SandboxError
from rapha.node.quota import EvaluationQuota
from rapha.node.settings import PolicySettings, SandboxSettings
from rapha.runtime.bundle import VerifiedBundle
from rapha.runtime.dp import DPPlan, plan_dp
from rapha.runtime.evaluate import evaluate
from rapha.runtime.guard import GuardDecision, OutputPolicy, guard_outputs, precheck_outputs
from rapha.runtime.harness import EXIT_DP_INCOMPATIBLE, EXIT_SPEC, EXIT_WEIGHTS
from rapha.runtime.loader import RaphaDataset, encode_labels
from rapha.runtime.manifest import BundleManifest
from rapha.runtime.policy import evaluate_admission
from rapha.runtime.progress import ProgressEvent
from rapha.runtime.sandbox import Bind, Sandbox, SandboxLimits, SandboxResult, Workspace

__all__ = [
    "METRICS_FILE",
    "PREDICTIONS_FILE",
    "JobError",
    "JobOutcome",
    "JobRules",
    "decide_admission",
    "run_job",
    "sandbox_from_settings",
]

METRICS_FILE: Final = "metrics.json"
#: The node's copy of the scores in the private dir: val rows, then test rows, view order.
PREDICTIONS_FILE: Final = "predictions.npy"
_DP_FIX: Final = (
    "DP-SGD cannot train this model as it is (BatchNorm and some other layers mix "
    "samples within a batch). Fix it on your side, then export new weights and sign again: "
    "`from opacus.validators import ModuleValidator; model = ModuleValidator.fix(model)` "
    "(BatchNorm becomes GroupNorm), `ModuleValidator.validate(model, strict=True)` must "
    "return no errors, and `safetensors.torch.save_file(model.state_dict(), "
    "'weights.safetensors')`. The node never rewrites a model: the output guard checks "
    "the weights against the names and shapes you submitted."
)


class JobError(SandboxError):
    """A sandboxed step failed. ``code`` is stable and PHI-free; ``detail`` is its stderr."""

    def __init__(self, message: str, *, code: str, detail: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class JobRules:
    """The hospital's rules for one job (``[policy]`` of node.toml, or these defaults)."""

    allow_custom_code: bool = True
    allow_custom_loop: bool = True
    dp_required: bool = False
    dp_epsilon: float = 8.0
    dp_delta: float = 1e-5
    k: int = 10
    bootstrap: int = 1000
    max_output_bytes: int = 512 << 20
    admission_policy: Path | None = None
    output_policy: Path | None = None
    allowed_orgs: tuple[str, ...] = ()
    allowed_kinds: tuple[str, ...] = ("train", "evaluate")
    min_price_per_record: int = 0
    epsilon_budget: float = 0.0

    @classmethod
    def from_settings(cls, policy: PolicySettings, **overrides: Any) -> JobRules:
        """The rules of a node's ``[policy]`` table (``overrides`` for a dry-run's flags)."""
        values: dict[str, Any] = {
            "allow_custom_code": policy.allow_custom_code,
            "dp_required": policy.dp_required,
            "dp_epsilon": policy.dp_epsilon,
            "dp_delta": policy.dp_delta,
            "k": policy.k_anonymity,
            "max_output_bytes": policy.max_output_bytes,
            "admission_policy": policy.admission,
            "output_policy": policy.output,
            "allowed_orgs": tuple(policy.allowed_orgs),
            "allowed_kinds": tuple(policy.allowed_kinds),
            "min_price_per_record": policy.min_price_per_record,
            "epsilon_budget": policy.epsilon_budget,
        }
        return cls(**(values | overrides))

    def hospital_input(self) -> dict[str, Any]:
        """What the Rego policies see as ``input.hospital``."""
        return {
            "allow_custom_code": self.allow_custom_code,
            "dp_required": self.dp_required,
            "dp_epsilon": self.dp_epsilon,
            "dp_delta": self.dp_delta,
            "k_anonymity": self.k,
            "max_output_bytes": self.max_output_bytes,
            "allowed_orgs": list(self.allowed_orgs),
            "allowed_kinds": list(self.allowed_kinds),
            "min_price_per_record": self.min_price_per_record,
            "epsilon_budget": self.epsilon_budget,
        }


def sandbox_from_settings(settings: SandboxSettings, **overrides: Any) -> Sandbox:
    """The node's :class:`Sandbox` as its ``[sandbox]`` table configures it."""
    limits = {
        name: getattr(settings, name)
        for name in (
            "wall_seconds", "cpu_seconds", "address_space", "memory", "processes",
            "open_files", "tmp_bytes", "output_bytes",
        )
    }  # fmt: skip
    return Sandbox(
        bwrap=settings.bwrap, uid=settings.uid, limits=SandboxLimits(**(limits | overrides))
    )


@dataclass(frozen=True)
class JobOutcome:
    """What a run produced. ``metrics`` is what ``metrics.json`` holds."""

    job_id: str
    outbox: Path
    decision: GuardDecision
    metrics: Mapping[str, Any]
    metrics_sha256: str
    records_billed: int
    dp: DPPlan | None
    runs: Mapping[str, SandboxResult] = field(default_factory=dict)


Phase = Callable[[str], None]


def run_job(
    bundle: VerifiedBundle,
    *,
    job_id: str,
    org: str,
    view: Path,
    private_dir: Path,
    needles: Sequence[str],
    sandbox: Sandbox,
    workdir: Path,
    outbox: Path,
    audit: AuditLog,
    signer_pinned: bool,
    rules: JobRules | None = None,
    quota: EvaluationQuota | None = None,
    on_phase: Phase | None = None,
    on_event: Callable[[ProgressEvent], None] | None = None,
    facts: Mapping[str, Any] | None = None,
) -> JobOutcome:
    """Run ``bundle`` on ``view`` (module docstring); the outbox is written only on allow.

    ``signer_pinned`` says whether the bundle was verified against the hospital's pinned
    company keys (a company's own dry-run verifies against its own key). ``quota``, when
    given, is charged one evaluation of this view's test split for ``org`` before any
    prediction runs (adaptive probing of a test split is what it limits). ``facts`` are
    more job metadata the admission policy sees under ``input.job`` (the node agent's:
    the price offered, the epsilon already spent).

    Raises:
        PolicyError: admission refused the job, or the guard denied its outputs.
        JobError: a sandboxed step failed (``code``: ``model_error``, ``timeout``,
            ``dp_incompatible``, ``weights_mismatch`` …).
        DependencyError: no usable sandbox here; nothing untrusted was run.
        DataError: the view does not fit the bundle.
    """
    rules = rules or JobRules()
    manifest = bundle.manifest
    phase = on_phase or (lambda _name: None)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    view = Path(view)
    counts = _check_view(view, manifest)
    kind = manifest.bundle.kind.value
    records = counts["train"] + counts["val"] if kind == "train" else counts["val"] + counts["test"]
    job = {
        "id": job_id,
        "job_id": job_id,
        "org": org,
        "kind": kind,
        "model_source": manifest.model.source.value,
        "bundle_digest": bundle.digest,
        "records": records,
        **(facts or {}),
    }
    phase("admission")
    dp = _admit(bundle, rules, job, counts, pinned=signer_pinned)
    audit.append("job.admitted", {
        **job, "dp": dp is not None, **({"epsilon": dp.epsilon} if dp is not None else {}),
        "signer": {"fingerprint": bundle.signer_fingerprint, "pinned": signer_pinned},
    })  # fmt: skip
    sandbox.ensure_available()
    declared = manifest.train.epochs if manifest.train is not None else 0
    per_epoch: dict[int, dict[str, float | int]] = {}

    def record_event(event: ProgressEvent) -> None:
        # What leaves with the metrics is the node's summary of the curve: the last loss of
        # each declared epoch, nothing else the sandbox chose (no step counters), so model
        # code can say at most one number per epoch this way.
        if event.epoch is not None and event.loss is not None and 1 <= event.epoch <= declared:
            per_epoch[event.epoch] = {"epoch": event.epoch, "epochs": declared,
                                      "loss": event.loss}  # fmt: skip
        if on_event is not None:
            on_event(event)

    runs: dict[str, SandboxResult] = {}
    limits = sandbox.limits
    policy = OutputPolicy(files=manifest.outputs.files, max_total_bytes=rules.max_output_bytes)
    with sandbox.workspace() as ws:
        staged = ws.stage(bundle.root, "bundle")
        weights = staged / "weights.safetensors"
        train_out = ws.scratch("train-out", limits.output_bytes)

        def guard(metrics: Mapping[str, Any]) -> GuardDecision:
            """The output guard on the train sandbox's output (empty for evaluate jobs)."""
            return guard_outputs(
                out_dir=train_out,
                outbox=outbox,
                initial_weights=bundle.root / "weights.safetensors",
                policy=policy,
                needles=needles,
                metrics=metrics,
                dp=metrics.get("dp"),
                job=job,
                rego_policy=rules.output_policy,
                audit=audit,
                hospital=rules.hospital_input(),
            )

        if kind == "train":
            phase("train")
            spec = {
                "mode": "train",
                "train_dir": "/view/train",
                "val_dir": "/view/val",
                "weights": "/bundle/weights.safetensors",
                "dp": (
                    {"noise_multiplier": dp.noise_multiplier, "max_grad_norm": dp.max_grad_norm}
                    if dp is not None
                    else None
                ),
            }
            binds = [
                Bind(ws.stage(view / "train", "train"), "/view/train"),
                Bind(ws.stage(view / "val", "val"), "/view/val"),
                Bind(train_out, "/out", writable=True),
            ]
            runs["train"] = _run(
                sandbox, ws, "train", spec, manifest, binds, audit, job_id, record_event
            )
            weights = ws.path("weights") / "weights.safetensors"
            policy = OutputPolicy(
                files=manifest.outputs.files, max_total_bytes=rules.max_output_bytes
            )
            early = precheck_outputs(
                out_dir=train_out,
                initial_weights=bundle.root / "weights.safetensors",
                policy=policy,
                needles=needles,
                scratch=ws.root,
            )
            if early:
                # Deny now, through the guard (so the decision is audited), before a
                # predict sandbox spends time on outputs that can never leave.
                decision = guard({"job": job, "evaluated": False})
                _raise_if_denied(decision)
            raw = _read_sandbox_file(
                train_out / "weights.safetensors", limits.output_bytes, "weights", "weights"
            )
            weights.write_bytes(raw)
            weights.chmod(0o644)
        phase("predict")
        if quota is not None:
            left = quota.charge(org, _view_digest(view))
            audit.append("job.quota", {"job_id": job_id, "evaluations_left": left})
        order = _predict_input(view, ws.path("predict"))
        spec = {"mode": "predict", "predict_dir": "/predict", "weights": "/weights/w.safetensors"}
        predict_out = ws.scratch("predict-out", limits.output_bytes)
        binds = [
            Bind(ws.root / "predict", "/predict"),
            Bind(weights, "/weights/w.safetensors"),
            Bind(predict_out, "/out", writable=True),
        ]
        runs["predict"] = _run(sandbox, ws, "predict", spec, manifest, binds, audit, job_id, None)
        scores = _read_predictions(predict_out / "predictions.npy", len(order), manifest)
        phase("evaluate")
        metrics = _metrics(view, private_dir, manifest, scores, order, counts, rules)
        metrics["job"] = {"job_id": job_id, "kind": kind, "bundle_digest": bundle.digest}
        metrics["records"] = {**counts, "billed": records}
        curve = [per_epoch[epoch] for epoch in sorted(per_epoch)]
        metrics["training"] = {"progress": curve} if kind == "train" else None
        metrics["dp"] = dp.to_json() if dp is not None else None
        audit.append(
            "job.evaluated",
            {"job_id": job_id, "metrics_sha256": digest_bytes(canonical_json(metrics))},
        )
        phase("guard")
        decision = guard(metrics)
    _raise_if_denied(decision)
    digest = next(f.sha256 for f in decision.files if f.name == METRICS_FILE)
    audit.append("job.outbox", {"job_id": job_id, "files": len(decision.files) + 1})
    return JobOutcome(job_id, Path(outbox), decision, metrics, digest, records, dp, runs)


def _raise_if_denied(decision: GuardDecision) -> None:
    if not decision.allowed:
        raise PolicyError(
            "the output guard denied this job's outputs; nothing left the node: "
            + "; ".join(decision.reasons)
        )


# --- admission -----------------------------------------------------------------------------


def _admit(
    bundle: VerifiedBundle,
    rules: JobRules,
    job: Mapping[str, Any],
    counts: Mapping[str, int],
    *,
    pinned: bool,
) -> DPPlan | None:
    manifest = bundle.manifest
    decide_admission(bundle, rules, job, pinned=pinned)
    wants_dp = manifest.privacy.dp or rules.dp_required
    if not wants_dp or manifest.train is None:
        return None
    return plan_dp(
        records=counts["train"],
        batch_size=manifest.train.batch_size,
        epochs=manifest.train.epochs,
        target_epsilon=rules.dp_epsilon,
        delta=rules.dp_delta,
        max_grad_norm=manifest.privacy.max_grad_norm,
    )


def decide_admission(
    bundle: VerifiedBundle, rules: JobRules, job: Mapping[str, Any], *, pinned: bool
) -> None:
    """The admission policy (Rego) on this bundle and job; :class:`PolicyError` on deny.

    The node agent asks it before it builds a view, and :func:`run_job` again on the
    built view (with the record counts).
    """
    manifest = bundle.manifest
    custom = manifest.model.source.value == "custom"
    loop = manifest.train.loop.value if manifest.train is not None else None
    if custom and not rules.allow_custom_code:
        raise PolicyError(
            "this hospital does not run custom model code; submit a zoo model "
            '([model] source = "zoo") instead'
        )
    if loop == "custom" and not rules.allow_custom_loop:
        raise PolicyError('this hospital does not run custom training loops; use loop = "trusted"')
    wants_dp = manifest.privacy.dp or rules.dp_required
    if wants_dp and loop == "custom":
        raise PolicyError(
            "DP-SGD runs only in the trusted loop (so the reported epsilon means something); "
            'set [train] loop = "trusted"'
        )
    manifest_json = manifest.to_json()
    facts = {
        "bundle": {
            "kind": manifest.bundle.kind.value,
            "model": manifest_json["model"],
            "hparams": manifest_json.get("train") or {},
            "outputs": list(manifest.outputs.files),
            "dp": {"epsilon": rules.dp_epsilon, "delta": rules.dp_delta} if wants_dp else None,
        },
        "signer": {"fingerprint": bundle.signer_fingerprint, "pinned": pinned},
        "job": dict(job),
        "hospital": rules.hospital_input(),
    }
    decision = evaluate_admission(rules.admission_policy, facts)
    if not decision.allowed:
        raise PolicyError("the admission policy refused this job: " + "; ".join(decision.reasons))


# --- sandboxed steps -----------------------------------------------------------------------


def _run(
    sandbox: Sandbox,
    ws: Workspace,
    mode: str,
    spec: dict[str, Any],
    manifest: BundleManifest,
    binds: list[Bind],
    audit: AuditLog,
    job_id: str,
    on_event: Callable[[ProgressEvent], None] | None,
) -> SandboxResult:
    job_dir = ws.path(f"{mode}-job")
    full = {**spec, "manifest": manifest.to_json(), "bundle": "/bundle", "out": "/out"}
    full["threads"] = sandbox.threads
    (job_dir / "spec.json").write_text(json.dumps(full), encoding="utf-8")
    (job_dir / "spec.json").chmod(0o644)
    all_binds = [
        Bind(ws.root / "bundle", "/bundle"),
        Bind(job_dir, "/job"),
        Bind(ws.scratch(f"{mode}-tmp", sandbox.limits.tmp_bytes), "/tmp", writable=True),  # noqa: S108
        *binds,
    ]
    result = ws.run_harness(["--spec", "/job/spec.json"], binds=all_binds, on_event=on_event)
    audit.append(
        "job.sandbox",
        {
            "job_id": job_id,
            "mode": mode,
            "returncode": result.returncode,
            "timed_out": result.timed_out,
            "wall_seconds": round(result.wall_seconds, 3),
            "leftover_processes": result.leftover_processes,
        },
    )
    if result.ok:
        return result
    if result.timed_out:
        raise JobError(
            f"the {mode} sandbox hit its wall-clock limit "
            f"({sandbox.limits.wall_seconds:g} s) and was killed",
            code="timeout",
            detail=result.stderr,
        )
    if result.returncode == EXIT_DP_INCOMPATIBLE:
        raise JobError(_DP_FIX, code="dp_incompatible", detail=result.stderr)
    if result.returncode == EXIT_WEIGHTS:
        raise JobError(
            "weights.safetensors does not fit the model the bundle builds; export it from "
            "the same model (names, shapes and dtypes must match)",
            code="weights_mismatch",
            detail=result.stderr,
        )
    if result.returncode in (-9, 128 + 9):
        raise JobError(
            f"the {mode} sandbox was killed (SIGKILL): it most likely exceeded its memory "
            f"limit ({sandbox.limits.memory >> 20} MiB)",
            code="killed",
            detail=result.stderr,
        )
    code = "node_error" if result.returncode == EXIT_SPEC else "model_error"
    raise JobError(
        f"the model code failed in the {mode} sandbox (exit {result.returncode})",
        code=code,
        detail=result.stderr,
    )


def _read_sandbox_file(path: Path, limit: int, what: str, code: str) -> bytes:
    """The bytes of a file a sandbox wrote: a regular file (never followed), up to ``limit``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise JobError(f"the sandbox wrote no {what}", code=f"no_{code}") from exc
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            raise JobError(
                f"the sandbox's {what} is not a regular file within the size limit",
                code=f"bad_{code}",
            )
        return fh.read(limit + 1)


def _predict_input(view: Path, out: Path) -> NDArray[np.int64]:
    """Val and test pixels in one array, shuffled; ``order[i]`` is row ``i``'s source row."""
    val = np.load(view / "val" / "images.npy", mmap_mode="r", allow_pickle=False)
    test = np.load(view / "test" / "images.npy", mmap_mode="r", allow_pickle=False)
    order = np.random.default_rng(secrets.randbits(64)).permutation(len(val) + len(test))
    images = np.lib.format.open_memmap(
        out / "images.npy", mode="w+", dtype=val.dtype, shape=(len(order), *val.shape[1:])
    )
    for i, source in enumerate(order):
        images[i] = val[source] if source < len(val) else test[source - len(val)]
    images.flush()
    del images
    (out / "images.npy").chmod(0o644)
    return order.astype(np.int64)


def _read_predictions(path: Path, rows: int, manifest: BundleManifest) -> NDArray[np.float64]:
    width = len(manifest.labels.names)
    limit = rows * width * 8 + 4096
    raw = _read_sandbox_file(path, limit, "predictions.npy", "predictions")
    try:
        scores = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise JobError("predictions.npy is not a numpy array", code="bad_predictions") from exc
    if scores.shape != (rows, width) or scores.dtype.kind != "f" or not np.all(np.isfinite(scores)):
        raise JobError(
            f"predictions.npy must be a finite float array of shape ({rows}, {width})",
            code="bad_predictions",
        )
    return np.asarray(scores, dtype=np.float64)


# --- evaluation ---------------------------------------------------------------------------


def _check_view(view: Path, manifest: BundleManifest) -> dict[str, int]:
    try:
        doc = json.loads((view / "view.json").read_text(encoding="utf-8"))
        params = doc["params"]
        counts = {s: int(doc["counts"][s]) for s in ("train", "val", "test")}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{view} is not a view built by a Rapha node") from exc
    size = tuple(params.get("size", ()))
    if size != tuple(manifest.input.size):
        raise DataError(
            f"the view's images are {size[0]}x{size[1]} but the bundle expects "
            f"{manifest.input.size[0]}x{manifest.input.size[1]}; build the view at the "
            "bundle's size"
        )
    missing = [n for n in manifest.labels.names if n not in params.get("findings", ())]
    if missing:
        raise DataError(f"the view has no labels for {missing}; it holds {params['findings']}")
    if counts["test"] == 0 or counts["val"] == 0:
        raise DataError("the view has no val or test records; a larger archive is needed")
    if manifest.bundle.kind.value == "train" and counts["train"] == 0:
        raise DataError("the view has no training records")
    return counts


def _view_digest(view: Path) -> str:
    digest = json.loads((view / "view.json").read_text(encoding="utf-8")).get("digest")
    if not isinstance(digest, str):
        raise DataError(f"{view} has no digest; it is not a view built by a Rapha node")
    return digest


def _records(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as fh:
        for line in fh:
            yield json.loads(line)


def _metrics(
    view: Path,
    private_dir: Path,
    manifest: BundleManifest,
    scores: NDArray[np.float64],
    order: NDArray[np.int64],
    counts: Mapping[str, int],
    rules: JobRules,
) -> dict[str, Any]:
    labels = manifest.labels
    unshuffled = np.empty_like(scores)
    unshuffled[order] = scores
    # The node's own copy of the scores (hospital only, like the test labels beside it):
    # rows are the val records, then the test records, in the view's order.
    np.save(private_dir / PREDICTIONS_FILE, unshuffled, allow_pickle=False)
    n_val = counts["val"]
    val = RaphaDataset(
        view / "val",
        names=labels.names,
        uncertain=labels.uncertain.value,
        missing=labels.missing.value,
    )
    test_records = list(_records(view / "test" / "records.jsonl"))
    try:
        held = json.loads((private_dir / "test-labels.json").read_text(encoding="utf-8"))
        test_rows = [held["records"][r["record_id"]]["labels"] for r in test_records]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            "the node's test labels for this view are missing or belong to another view"
        ) from exc
    test_labels = encode_labels(
        test_rows, labels.names, uncertain=labels.uncertain.value, missing=labels.missing.value
    )
    if len(test_records) != counts["test"]:
        raise DataError("the view's test split does not match its view.json")
    return evaluate(
        findings=labels.names,
        val_scores=unshuffled[:n_val],
        val_labels=val.labels,
        test_scores=unshuffled[n_val:],
        test_labels=test_labels,
        test_meta=[r.get("meta", {}) for r in test_records],
        k=rules.k,
        bootstrap=rules.bootstrap,
    )
