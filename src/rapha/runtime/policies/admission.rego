# Rapha admission policy: may this signed bundle run on this node?
#
# The node asks `data.rapha.admission.decision` before any bundle code runs. It must be
# {"allow": bool, "reasons": [string]}; anything else (undefined, an error, a crash, a
# timeout) is a deny. The job runs only when allow is true and reasons is empty.
#
# Reasons are "code: explanation": a lower-case code, then a short fixed text. Never put a
# value from the input in a reason: reasons go to the audit log and to the hub.
#
# The input:
#   input.bundle.kind              "train" or "evaluate"
#   input.bundle.model.source      "zoo" or "custom" (custom: the bundle carries model.py)
#   input.bundle.hparams           {"epochs": n, "batch_size": n, ...}
#   input.bundle.outputs           the file names the bundle declares it will return
#   input.bundle.dp                null, or {"epsilon": e, "delta": d} (differential privacy)
#   input.signer.fingerprint       SHA-256 (hex) of the key that signed the bundle
#   input.signer.pinned            true when that key is one the hospital pinned
#   input.job                      job metadata from the hub; "evaluations_used": how many
#                                  evaluate jobs this company already ran on this node;
#                                  "org": the submitting company; "price_per_record": the
#                                  most it pays per record (token base units); "epsilon_spent": the
#                                  DP epsilon earlier jobs spent on this dataset
#   input.hospital                 the node's [policy] settings: allow_custom_code,
#                                  dp_required, dp_epsilon, dp_delta, k_anonymity,
#                                  evaluation_quota, allowed_orgs, allowed_kinds,
#                                  min_price_per_record, epsilon_budget; optional
#                                  max_epochs, max_batch_size
#
# This file is the hospital's: edit it to tighten (or loosen) what the node accepts.

package rapha.admission

import rego.v1

hospital := object.get(input, "hospital", {})

bundle := object.get(input, "bundle", {})

kind := object.get(bundle, "kind", "")

hparams := object.get(bundle, "hparams", {})

outputs := object.get(bundle, "outputs", [])

dp := object.get(bundle, "dp", null)

max_epochs := object.get(hospital, "max_epochs", 100)

max_batch_size := object.get(hospital, "max_batch_size", 1024)

train_outputs := {"weights.safetensors"}

deny contains "unknown_kind: the job kind is neither train nor evaluate" if {
	not kind in {"train", "evaluate"}
}

deny contains "unpinned_signer: the bundle is not signed by a key this hospital pinned" if {
	object.get(object.get(input, "signer", {}), "pinned", false) != true
}

deny contains "unknown_model_source: the model source is neither zoo nor custom" if {
	not object.get(object.get(bundle, "model", {}), "source", "") in {"zoo", "custom"}
}

deny contains "custom_code_disabled: this hospital does not run custom model code" if {
	bundle.model.source == "custom"
	object.get(hospital, "allow_custom_code", false) != true
}

deny contains "dp_required: this hospital requires differential privacy for training" if {
	kind == "train"
	object.get(hospital, "dp_required", false) == true
	dp == null
}

deny contains "dp_invalid: epsilon and delta must be numbers, epsilon above 0, delta in (0, 1)" if {
	dp != null
	not dp_valid
}

dp_valid if {
	is_number(dp.epsilon)
	is_number(dp.delta)
	dp.epsilon > 0
	dp.delta > 0
	dp.delta < 1
}

deny contains "dp_epsilon_too_high: the privacy budget epsilon is above the hospital's cap" if {
	dp_valid
	dp.epsilon > object.get(hospital, "dp_epsilon", 8)
}

deny contains "dp_delta_too_high: the privacy parameter delta is above the hospital's cap" if {
	dp_valid
	dp.delta > object.get(hospital, "dp_delta", 0.00001)
}

deny contains "epochs_invalid: epochs must be a whole number from 1 to the hospital's cap" if {
	kind == "train"
	not count_ok(object.get(hparams, "epochs", 1), max_epochs)
}

deny contains "batch_size_invalid: batch_size must be a whole number from 1 to the cap" if {
	not count_ok(object.get(hparams, "batch_size", 1), max_batch_size)
}

count_ok(n, cap) if {
	is_number(n)
	n == round(n)
	n >= 1
	n <= cap
}

deny contains "evaluate_outputs: an evaluate job may not return files; the node writes metrics" if {
	kind == "evaluate"
	count(outputs) > 0
}

deny contains "undeclared_output: a train job may return only weights.safetensors" if {
	kind == "train"
	some name in outputs
	not name in train_outputs
}

deny contains "evaluation_quota: this company used up its evaluate jobs on this node" if {
	kind == "evaluate"
	used := object.get(object.get(input, "job", {}), "evaluations_used", 0)
	used >= object.get(hospital, "evaluation_quota", 20)
}

job := object.get(input, "job", {})

deny contains "org_not_allowed: this hospital does not take jobs from this organisation" if {
	allowed := object.get(hospital, "allowed_orgs", [])
	count(allowed) > 0
	not object.get(job, "org", "") in allowed
}

deny contains "kind_not_allowed: this hospital does not take jobs of this kind" if {
	not kind in object.get(hospital, "allowed_kinds", ["train", "evaluate"])
}

deny contains "price_too_low: the job pays less per record than this hospital's minimum" if {
	price := object.get(job, "price_per_record", null)
	price != null
	price < object.get(hospital, "min_price_per_record", 0)
}

deny contains "epsilon_budget: this job's epsilon would exceed the dataset's privacy budget" if {
	budget := object.get(hospital, "epsilon_budget", 0)
	budget > 0
	dp_valid
	object.get(job, "epsilon_spent", 0) + dp.epsilon > budget
}

decision := {"allow": count(deny) == 0, "reasons": sort(deny)}
