"""The hospital agent: its settings, its setup, the opt-out list, and the view build.

* :mod:`rapha.node.settings`: ``node.toml`` parsed once into :class:`NodeSettings`.
* :mod:`rapha.node.bootstrap`: ``rapha node init`` (keys, config, opt-out list, audit log).
* :mod:`rapha.node.optout`: the hospital's opt-out list, applied before anything else.
* :mod:`rapha.node.deid`: one instance's header screened, pseudonymised and allowlisted,
  and its pixels prepared.
* :mod:`rapha.node.sources`: the PACS source the settings name, wired to the audit log.
* :mod:`rapha.node.pipeline`: the view build, PACS to view, with its audit entries.
* :mod:`rapha.node.register`: which views and jobs used which patients (data-subject requests).
* :mod:`rapha.node.preview`: ``rapha node preview`` and ``rapha node profile``.

``node/`` is the only room that wires ``pacs/``, ``privacy/`` and ``dataset/`` together
(DESIGN.md, "Parts").
"""

from rapha.node.bootstrap import InitReport, init_node
from rapha.node.deid import HeaderResult, deidentify_header, prepare_pixels
from rapha.node.optout import OptOutList, load_opt_out
from rapha.node.pipeline import BuildProgress, BuildReason, InstanceOutcome, build_view
from rapha.node.preview import PreviewResult, preview_view, profile_node, with_overrides
from rapha.node.register import LookupRegister, LookupResult, RegisterUse, lookup_patient
from rapha.node.settings import NodeKeys, NodeSettings, load_node_settings
from rapha.node.sources import open_source, scope_summary

__all__ = [
    "BuildProgress",
    "BuildReason",
    "HeaderResult",
    "InitReport",
    "InstanceOutcome",
    "LookupRegister",
    "LookupResult",
    "NodeKeys",
    "NodeSettings",
    "OptOutList",
    "PreviewResult",
    "RegisterUse",
    "build_view",
    "deidentify_header",
    "init_node",
    "load_node_settings",
    "load_opt_out",
    "lookup_patient",
    "open_source",
    "prepare_pixels",
    "preview_view",
    "profile_node",
    "scope_summary",
    "with_overrides",
]
