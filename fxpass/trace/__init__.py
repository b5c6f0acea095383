"""Stage 1: trace a module tree into fx graphs.

``tracer.py`` traces one module; ``hierarchy.py`` walks the tree (``trace``); ``cache.py``
shares traces of identical modules; ``memo.py`` is the walk's meta memo; ``graph_runtime.py``
is what runs after ``apply``: the installed forwards, re-specialisation and Python fallback.
"""

from fxpass.trace.cache import DEFAULT_CACHE, TraceCache, TreeIndex
from fxpass.trace.graph_runtime import (
    GraphForward,
    ModuleGraph,
    Respecialiser,
    RuntimeStats,
    install,
    installed_graph,
    uninstall,
)
from fxpass.trace.hierarchy import Trace, trace

__all__ = ["DEFAULT_CACHE", "GraphForward", "ModuleGraph", "Respecialiser", "RuntimeStats",
           "Trace", "TraceCache", "TreeIndex", "install", "installed_graph", "trace",
           "uninstall"]
