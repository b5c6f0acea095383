"""Stage 1: trace a module tree into fx graphs.

``tracer.py`` traces one module (values carried beside the proxies); ``binding.py`` maps the
many forms of a call onto one; ``state.py`` records the module state a forward reads (checked
at each later call); ``hierarchy.py`` walks the tree (``trace``); ``cache.py`` shares traces
of identical modules; ``memo.py`` is the walk's meta memo; ``graph.py`` is the graph model.
What runs the graphs after ``apply`` is ``fxpass.runtime``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fxpass.trace.cache import DEFAULT_CACHE, TraceCache, TreeIndex
from fxpass.trace.graph import ModuleGraph

if TYPE_CHECKING:
    from fxpass.trace.hierarchy import Trace, trace

__all__ = ["DEFAULT_CACHE", "ModuleGraph", "Trace", "TraceCache", "TreeIndex", "trace"]


def __getattr__(name: str) -> Any:
    # The walk (hierarchy.py) installs graphs with fxpass.runtime, whose modules import this
    # package's tracer and graph model: loaded on first use, so importing either side first
    # works.
    if name in ("Trace", "trace"):
        from fxpass.trace import hierarchy

        return getattr(hierarchy, name)
    raise AttributeError(f"module 'fxpass.trace' has no attribute {name!r}")
