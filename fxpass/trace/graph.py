"""The graph model: one module's traced graph, copy-on-write shared between identical layers.

The trace cache hands identical layers one graph; a rule that edits it edits a copy, kept per
(source graph, edit) so the 16 identical layers of a tower still share one edited graph and
one compiled forward (``fxpass.runtime.dispatch``).
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable, Iterator

import torch.fx as fx

from fxpass import meta
from fxpass.trace.binding import CallSpec


@dataclasses.dataclass
class ModuleGraph:
    """The traced graph of one module and how its calls map onto the graph's inputs."""

    qualname: str
    module_type: str
    graph: fx.Graph
    spec: CallSpec
    reused_from: str | None = None  # qualname whose trace this graph copies
    shared: bool = False  # graph is the trace cache's: copy before editing (see own())
    _by_name: dict[str, fx.Node] | None = dataclasses.field(default=None, repr=False)
    # node name -> fxpass annotations waiting to be written (the graph is still shared)
    _pending: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict, repr=False)

    def own(self) -> fx.Graph:
        """The graph, copied first if it is still shared with the cache (copy on write)."""
        if self.shared:
            self.graph = _copy_graph(self.graph)
            self.shared = False
            self._by_name = None
            self._write_pending()
        return self.graph

    def annotate(self, node: str, key: str, value: Any) -> None:
        """Set ``node.meta["fxpass"][key]`` without copying a shared graph for it.

        Annotations on a shared graph wait until :meth:`own` copies it or :meth:`settle`
        writes them into a copy shared by every graph with the same source and annotations
        (the 16 identical layers of a tower: one annotated copy, not 16).
        """
        if self.shared:
            self._pending.setdefault(node, {})[key] = value
        else:
            meta.info(self.node(node))[key] = value

    def settle(self) -> None:
        """Write pending annotations (see :meth:`annotate`); the graph stays shared."""
        if self._pending:
            self.edit(None, None)

    def edit(self, key: Any, fn: Callable[[fx.Graph], None] | None) -> None:
        """Apply ``fn``, an in-place edit, to this graph (pending annotations first).

        ``key`` must name the edit completely (its rule and every argument, none of them
        specific to this module): on a shared graph the edited copy is kept per (source
        graph, pending annotations, key), so identical layers share one edited graph and
        its compiled code, and applying to an identical tower again edits nothing. The
        result stays shared: a later edit starts from it the same way.
        """
        if not self.shared:
            self._write_pending()
            if fn is not None:
                fn(self.graph)
            self._by_name = None
            return
        variants = _VARIANTS.setdefault(self.graph, {})
        vkey = (_freeze(self._pending), key)
        graph = variants.get(vkey)
        if graph is None:
            graph = _copy_graph(self.graph)
            by_name = {n.name: n for n in graph.nodes}
            for name, values in self._pending.items():
                meta.info(by_name[name]).update(values)
            if fn is not None:
                fn(graph)
                graph.lint()
            variants[vkey] = graph
        self.graph = graph
        self._by_name = None
        self._pending = {}

    def _write_pending(self) -> None:
        for name, values in self._pending.items():
            meta.info(self.node(name)).update(values)
        self._pending = {}

    def node(self, name: str) -> fx.Node:
        if self._by_name is None or name not in self._by_name:
            self._by_name = {n.name: n for n in self.graph.nodes}
        return self._by_name[name]

    def nodes_of(self, op: str) -> list[fx.Node]:
        """The nodes with this opcode, in graph order.

        Indexed once per shared graph (shared graphs are never edited in place, and the
        identical layers of a tower share one), scanned afresh on an owned one.
        """
        if not self.shared:
            return [n for n in self.graph.nodes if n.op == op]
        index = _NODE_INDEX.get(self.graph)
        if index is None:
            index = {}
            for n in self.graph.nodes:
                index.setdefault(n.op, []).append(n)
            _NODE_INDEX[self.graph] = index
        return index.get(op, [])

    @property
    def guards(self) -> list[fx.Node]:
        return [n for n in self.graph.nodes if meta.get(n, "guard")]


# shared graph -> its edited and annotated copies (see ModuleGraph.edit). Shared graphs are
# never changed in place (own() copies first), so applies may share the copies too.
_VARIANTS: "weakref.WeakKeyDictionary[fx.Graph, dict[Any, fx.Graph]]" = (
    weakref.WeakKeyDictionary())

# shared graph -> its nodes by opcode (see ModuleGraph.nodes_of)
_NODE_INDEX: "weakref.WeakKeyDictionary[fx.Graph, dict[str, list[fx.Node]]]" = (
    weakref.WeakKeyDictionary())


def _freeze(value: Any) -> Any:
    """A hashable form of nested dicts/lists of plain values."""
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    """A copy whose nodes and fxpass annotations can be edited without touching ``graph``."""
    new = fx.Graph(tracer_cls=graph._tracer_cls)
    val_map: dict[fx.Node, fx.Node] = {}
    out = new.graph_copy(graph, val_map)
    val_map[graph.output_node()] = new.output(out)  # graph-level notes live on the output
    for old_node, node in val_map.items():
        info = old_node.meta.get(meta.KEY)
        if info is not None:  # fx copies meta shallowly: give each copy its own annotations
            node.meta[meta.KEY] = {k: dict(v) if isinstance(v, dict) else
                                   list(v) if isinstance(v, list) else v
                                   for k, v in info.items()}
    return new



def graph_notes(graphs: list[fx.Graph], key: str) -> Iterator[Any]:
    """Graph-level records a rule left on the output node (``meta["fxpass"][key]``)."""
    for graph in graphs:
        for node in reversed(graph.nodes):
            if node.op == "output":
                yield from meta.get(node, key, ())
                break
