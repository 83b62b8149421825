# Rapha output policy: may these guarded outputs leave the hospital?
#
# The output guard asks `data.rapha.output.decision` only after its own checks passed:
# every file is a regular, allowed, re-encoded safetensors file with exactly the submitted
# tensor names, shapes and dtypes; nothing parses as DICOM; no identifier of the cohort was
# found in any byte. This policy adds the hospital's own rules on top. It must return
# {"allow": bool, "reasons": [string]}; anything else is a deny.
#
# Reasons are "code: explanation" with a fixed text: never a value from the input.
#
# The input:
#   input.job                  job metadata: "id", "kind" ("train" or "evaluate"), and
#                              "records" (how many records the job's data held), when known
#   input.outputs              [{"name", "size", "sha256", "tensors", "parameters",
#                                "dtypes"}] for each re-encoded file that would leave
#   input.metrics_bytes        size of the node's metrics.json
#   input.total_bytes          all outgoing bytes, metrics.json included
#   input.metrics              the node's own metrics document (trusted evaluation)
#   input.dp                   null, or the privacy spent: {"epsilon": e, "delta": d}
#   input.policy               the job's output policy: "files", "max_total_bytes",
#                              "allow_nonfinite"
#   input.hospital             the node's [policy] settings (k_anonymity, dp_required,
#                              dp_epsilon, dp_delta, max_output_bytes, ...)
#
# This file is the hospital's: edit it to tighten what may leave.

package rapha.output

import rego.v1

hospital := object.get(input, "hospital", {})

job := object.get(input, "job", {})

kind := object.get(job, "kind", "")

dp := object.get(input, "dp", null)

deny contains "unknown_kind: the job kind is neither train nor evaluate" if {
	not kind in {"train", "evaluate"}
}

deny contains "evaluate_outputs: an evaluate job returns metrics only, no files" if {
	kind == "evaluate"
	count(input.outputs) > 0
}

deny contains "undeclared_output: a file is not one the job's output policy names" if {
	some out in input.outputs
	not out.name in input.policy.files
}

deny contains "too_large: the outputs exceed the job's size limit" if {
	input.total_bytes > input.policy.max_total_bytes
}

deny contains "too_large: the outputs exceed the hospital's size limit" if {
	input.total_bytes > object.get(hospital, "max_output_bytes", input.total_bytes)
}

deny contains "small_cohort: the job's data held fewer records than the hospital's k" if {
	records := object.get(job, "records", null)
	is_number(records)
	records < object.get(hospital, "k_anonymity", 10)
}

deny contains "dp_required: this hospital requires differential privacy for training" if {
	kind == "train"
	object.get(hospital, "dp_required", false) == true
	dp == null
}

deny contains "dp_epsilon_too_high: the privacy spent is above the hospital's epsilon cap" if {
	dp != null
	not dp.epsilon <= object.get(hospital, "dp_epsilon", 8)
}

deny contains "dp_delta_too_high: the privacy spent is above the hospital's delta cap" if {
	dp != null
	not dp.delta <= object.get(hospital, "dp_delta", 0.00001)
}

decision := {"allow": count(deny) == 0, "reasons": sort(deny)}
