"""What runs after ``apply``: the graphs fxpass installs as module forwards.

``dispatch.py`` picks the graph that serves each call (:class:`GraphForward`);
``policy.py`` decides what a call no graph covers gets (traced again, or Python);
``install.py`` puts a forward on a module; ``stats.py`` counts what happened per module.
"""

from fxpass.runtime.dispatch import CompiledGraph, Family, GraphForward
from fxpass.runtime.install import (
    foreign_forward,
    fxpass_forward,
    install,
    installed_graph,
    is_graph_forward,
    uninstall,
)
from fxpass.runtime.policy import MAX_VARIANTS, Respecialiser, why_no_trace
from fxpass.runtime.stats import RuntimeStats

__all__ = ["MAX_VARIANTS", "CompiledGraph", "Family", "GraphForward", "Respecialiser",
           "RuntimeStats", "foreign_forward", "fxpass_forward", "install", "installed_graph",
           "is_graph_forward", "uninstall", "why_no_trace"]
