"""Stage 1: trace a module tree into fx graphs (see hierarchy.py and tracer.py)."""

from fxpass.trace.hierarchy import (
    DEFAULT_CACHE,
    GraphForward,
    ModuleGraph,
    Trace,
    TraceCache,
    TreeIndex,
    installed_graph,
    trace,
    uninstall,
)

__all__ = ["DEFAULT_CACHE", "GraphForward", "ModuleGraph", "Trace", "TraceCache", "TreeIndex",
           "installed_graph", "trace", "uninstall"]
