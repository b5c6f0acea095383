"""Stage 1: trace a module tree into fx graphs.

``tracer.py`` traces one module (values carried beside the proxies); ``binding.py`` maps the
many forms of a call onto one; ``state.py`` records the module state a forward reads (checked
at each later call); ``hierarchy.py`` walks the tree (``trace``); ``cache.py`` shares traces
of identical modules; ``memo.py`` is the walk's meta memo; ``graph.py`` is the graph model.
What runs the graphs after ``apply`` is ``fxpass.runtime``.
"""

from fxpass.trace.cache import DEFAULT_CACHE, TraceCache, TreeIndex
from fxpass.trace.graph import ModuleGraph
from fxpass.trace.hierarchy import Trace, trace

__all__ = ["DEFAULT_CACHE", "ModuleGraph", "Trace", "TraceCache", "TreeIndex", "trace"]
