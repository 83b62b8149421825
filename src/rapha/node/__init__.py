"""The hospital agent: its settings, its setup, the opt-out list, and (later) the job pipeline.

* :mod:`rapha.node.settings`: ``node.toml`` parsed once into :class:`NodeSettings`.
* :mod:`rapha.node.bootstrap`: ``rapha node init`` (keys, config, opt-out list, audit log).
* :mod:`rapha.node.optout`: the hospital's opt-out list, applied before anything else.

``node/`` is the only room that wires ``pacs/``, ``privacy/`` and ``dataset/`` together
(DESIGN.md, "Parts").
"""

from rapha.node.bootstrap import InitReport, init_node
from rapha.node.optout import OptOutList, load_opt_out
from rapha.node.settings import NodeKeys, NodeSettings, load_node_settings

__all__ = [
    "InitReport",
    "NodeKeys",
    "NodeSettings",
    "OptOutList",
    "init_node",
    "load_node_settings",
    "load_opt_out",
]
