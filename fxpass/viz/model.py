"""The graph model every viz writer reads: networkx graphs built from a Trace.

Two kinds of graph:

- ``VizModel.tree``: the module hierarchy, one node per module that has a traced graph or
  stayed Python (keyed by qualified name, ``""`` the root), an edge parent -> child. A
  module's parent is its nearest ancestor path that is in the tree, so containers that are
  never called (``encoder.layers``) do not add levels. Roll-ups (rewritten layers, fixes,
  Python-left modules, worst SQNR under a module) are computed over this tree.
- ``VizModel.graphs`` / ``VizModel.before``: one ``nx.DiGraph`` per traced module, the fx
  graph after / before ``fxpass.apply``; nodes are fx node names, edges are data flow. Each
  node carries ``op``, ``target``, ``label``/``sub`` (what a box shows), ``tensor``
  (shape/dtype/contiguous from the example values), the fxpass annotations (``rewrite``,
  ``fixes``, ``inserted_by``, ``guard``), the call it makes (``call``: the called module's
  path, ``call_kind``: graph / python / leaf), diff metrics, and a layout (``x``, ``y``;
  long edges' ``route``; :mod:`fxpass.viz.layout`, Graphviz dot or pure Python).
  Shape bookkeeping (``shape_op``: size reads, ints out of sizes, ``len``, int arithmetic,
  guards; :func:`is_shape_op`) is folded out of the default view: ``host`` names the node
  it folds into, whose ``folded`` lists it, and ``g.graph["fold"]`` is the layout without
  it; the full layout keeps every node.

Nothing here imports vLLM or renders anything: ``html.py`` and ``dot.py`` read this model.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from typing import Any, Iterable, Mapping

import networkx as nx
import torch.fx as fx

from fxpass import meta
from fxpass.errors import UsageError
from fxpass.viz.layout import GAP_X, GAP_Y, MARGIN, NODE_H, NODE_W, Layout, layout_all
from fxpass.viz.overlay import Overlay, overlay_from_verify

__all__ = ["GAP_X", "GAP_Y", "MARGIN", "NODE_H", "NODE_W", "VizModel", "build_model",
           "is_shape_op", "snapshot"]

# Box geometry shared by the HTML and the layout (pixels): see fxpass.viz.layout.
LINE_H = 14  # one more line in a box: the vLLM layer of a rewritten call site, the SQNR
NODE_H_TALL = NODE_H + LINE_H  # boxes with a third line
LABEL_CHARS = 27


def snapshot(trace_result: Any) -> dict[str, fx.Graph]:
    """Copies of a Trace's graphs and their fxpass annotations: the "before" view.

    Call it between ``fxpass.trace`` and ``fxpass.apply(trace_result=...)``: apply edits the
    Trace's graphs in place. (A plain ``copy.deepcopy(graph)`` shares ``node.meta`` dicts
    with the original, so apply's annotations would show up in the copy too.)
    """
    out = {}
    for qualname, mg in trace_result.graphs.items():
        graph = copy.deepcopy(mg.graph)
        for node in graph.nodes:
            if meta.KEY in node.meta:
                node.meta[meta.KEY] = copy.deepcopy(node.meta[meta.KEY])
        out[qualname] = graph
    return out


@dataclasses.dataclass
class VizModel:
    title: str
    tree: nx.DiGraph
    graphs: dict[str, nx.DiGraph]
    before: dict[str, nx.DiGraph]
    summary: dict[str, Any]
    report: dict[str, Any] | None = None
    overlay: Overlay | None = None

    @property
    def has_before(self) -> bool:
        return bool(self.before)

    def rows(self) -> list[str]:
        """Module paths in display order: depth first, children in call order."""
        if "" not in self.tree:
            return []
        out, stack = [], [""]
        while stack:
            p = stack.pop()
            out.append(p)
            stack.extend(reversed(self.tree.nodes[p].get("children", [])))
        return out

    def rewritten_sites(self) -> list[tuple[str, str]]:
        """(module path, node name) of every rewritten call site in the after graphs."""
        return [(q, n) for q, g in self.graphs.items()
                for n, d in g.nodes(data=True) if d.get("rewrite")]


# --------------------------------------------------------------------------------------
# labels

_DTYPE_SHORT = {
    "float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64",
    "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8",
    "bool": "bool", "complex64": "c64",
}


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _fn_name(target: Any) -> str:
    name = getattr(target, "__name__", None)
    if name is None:
        return str(target)
    return name


def _qualified(target: Any) -> str:
    if isinstance(target, str):
        return target
    try:
        from torch.fx.node import _get_qualified_name

        return _get_qualified_name(target)
    except Exception:  # noqa: BLE001 - any target still gets a name
        return _fn_name(target)


def _short(text: str, n: int = LABEL_CHARS) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _tensor_info(node: fx.Node) -> dict[str, Any] | None:
    t = meta.get(node, "tensor")
    if not t:
        return None
    return {"shape": [int(s) if isinstance(s, int) else str(s) for s in t["shape"]],
            "dtype": _dtype_name(t["dtype"]), "contiguous": bool(t.get("contiguous", True))}


def _shape_text(t: dict[str, Any] | None, pytype: str | None) -> str:
    if t is None:
        return pytype or ""
    shape = "×".join(str(s) for s in t["shape"]) or "scalar"
    dt = _DTYPE_SHORT.get(t["dtype"], t["dtype"])
    nc = " nc" if not t["contiguous"] else ""
    return f"{shape} {dt}{nc}"


def _jsonable(value: Any, depth: int = 0) -> Any:
    """Annotation values as JSON (dtypes, sizes and other objects as strings)."""
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping) and depth < 4:
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and depth < 4:
        return [_jsonable(v, depth + 1) for v in value]
    return str(value)


_FORMAT_RE = re.compile(r"^%([\w.]+)\s*:")


def node_name_of(formatted: str) -> str | None:
    """The node name in ``Node.format_node()`` text (``%getattr_1 : ...`` -> ``getattr_1``)."""
    m = _FORMAT_RE.match(formatted.strip())
    return m.group(1) if m else None


# --------------------------------------------------------------------------------------
# building


def _full(qualname: str, rel: str) -> str:
    return f"{qualname}.{rel}" if qualname else rel


def _module_type(root: Any, path: str) -> str:
    try:
        return type(root.get_submodule(path)).__name__
    except Exception:  # noqa: BLE001 - a path the root no longer has
        return ""


def _graph_to_nx(qualname: str, graph: fx.Graph, *, annotations: bool,
                 prefix: str = "") -> nx.DiGraph:
    """An fx graph as an nx.DiGraph (nodes in fx order, which is topological)."""
    g = nx.DiGraph(qualname=qualname)
    for i, node in enumerate(graph.nodes):
        info = node.meta.get(meta.KEY, {})
        tensor = _tensor_info(node)
        pytype = info.get("pytype")
        attrs: dict[str, Any] = {
            "index": i,
            "op": node.op,
            "target": _qualified(node.target),
            "tensor": tensor,
            "pytype": pytype,
            "static": bool(info.get("static")),
            "annotated": "static" in info,  # the tracer judged this node's value
            "text": _short(node.format_node() or node.name, 400),
        }
        if node.op == "call_function" and len(node.args) > 1 and isinstance(node.args[1], str):
            attrs["attr"] = node.args[1]  # getattr(x, "shape")
        if info.get("guard"):
            attrs["guard"] = _jsonable(info["guard"])
        if annotations:
            if info.get("rewrite"):
                attrs["rewrite"] = rw = _jsonable(info["rewrite"])
                # annotations are shared by identical layers: the layer's own name is its path
                rw.setdefault("prefix", _full(prefix, _full(qualname, str(node.target))))
            if info.get("fixes"):
                attrs["fixes"] = _jsonable(info["fixes"])
            if info.get("inserted_by"):
                attrs["inserted_by"] = str(info["inserted_by"])
            if info.get("tp"):  # a tensor-parallel layer (or the call of its wrapper)
                attrs["tp"] = _jsonable(info["tp"])
        g.add_node(node.name, **attrs)
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


def _label(name: str, d: dict[str, Any]) -> tuple[str, str, str | None]:
    op = d["op"]
    target = d["target"]
    if op == "placeholder":
        head = f"in: {name}"
    elif op == "get_attr":
        head = f"attr: {target}"
    elif op == "output":
        head = "output"
    elif op == "call_module":
        head = target if name == re.sub(r"\W", "_", target) else f"{target} ({name})"
    elif op == "call_method":
        head = f".{target}()"
    else:
        head = target.rsplit(".", 1)[-1]
        if head == "guard" and d.get("guard"):
            head = f"guard {d['guard'].get('kind', '')}".strip()
    sub = _shape_text(d.get("tensor"), d.get("pytype"))
    badge = None
    if d.get("rewrite"):
        rw = d["rewrite"]
        badge = f"{rw.get('layer', '?')} · {rw.get('quant_method', rw.get('backend', '?'))}"
        if d.get("tp"):
            badge += f" · tp={d['tp'].get('tp')}"
    elif d.get("tp"):
        badge = f"{d['tp'].get('style', '?')} · tp={d['tp'].get('tp')}"
    elif d.get("will_rewrite"):
        rw = d["will_rewrite"]
        badge = f"→ {rw.get('layer', '?')} · {rw.get('quant_method', '?')}"
    return _short(head), _short(sub), (_short(badge) if badge else None)


# --------------------------------------------------------------------------------------
# shape bookkeeping (folded out of the default view)

# Without fxpass's annotations (a graph from plain fx): what reads sizes and dtypes.
_META_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "is_meta", "layout",
                         "requires_grad", "is_floating_point", "itemsize"})
_META_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement", "stride",
                           "is_floating_point", "is_complex", "is_contiguous", "element_size",
                           "get_device", "storage_offset"})
_META_FUNCTIONS = frozenset({"len", "builtins.len", "torch._assert", "torch.numel",
                             "torch.is_floating_point", "torch.is_complex", "torch.is_tensor"})
# A node carrying one of these is part of what the page explains: never folded.
_MARKINGS = ("rewrite", "will_rewrite", "fixes", "inserted_by", "removed", "metrics", "first",
             "tp", "tp_refused", "skipped")


def is_shape_op(d: Mapping[str, Any], inputs: Iterable[Mapping[str, Any]] = ()) -> bool:
    """Whether a viz node only does shape bookkeeping: reads sizes or dtypes, takes an int
    out of a size, ``len``, int arithmetic on sizes, a guard fxpass inserted, an assert.

    Read from fxpass's annotations: the tracer marks ``static`` every value derived from
    shapes, dtypes and constants only, never from tensor data, and ``guard`` its
    specialisation checks. A node with a tensor value, an input, an attribute, a module
    call, the output, or any marking the page shows (a rewrite, a fix, a verify result...)
    is never one. ``inputs``: the node's inputs' attribute dicts, with ``shape_op`` set,
    for graphs without annotations (plain fx: decided by target).
    """
    if d.get("op") not in ("call_function", "call_method") or d.get("tensor"):
        return False
    if any(d.get(k) for k in _MARKINGS):
        return False
    if d.get("guard") or d.get("static"):
        return True
    if d.get("annotated"):
        return False  # the tracer saw a value that is not shape-derived
    target = d.get("target", "")
    if d["op"] == "call_method":
        return target in _META_METHODS
    if target in _META_FUNCTIONS or target.endswith(".guard"):
        return True
    inputs = list(inputs)
    if target in ("builtins.getattr", "getattr") and d.get("attr") in _META_ATTRS:
        return True
    if target.startswith(("_operator.", "operator.")) and inputs:
        return all(i.get("shape_op") for i in inputs)
    return False


def _fold_shape_ops(g: nx.DiGraph) -> None:
    """Mark shape bookkeeping (``shape_op``) and the node each one folds into (``host``):
    the first node outside it that uses it (through other bookkeeping), else the last one
    it reads from; a host lists what it holds in ``folded``."""
    for n in g.nodes:  # fx order: inputs first
        d = g.nodes[n]
        d["shape_op"] = is_shape_op(d, (g.nodes[p] for p in g.predecessors(n)))
    index = {n: i for i, n in enumerate(g.nodes)}
    for n, d in g.nodes(data=True):
        if not d["shape_op"]:
            continue
        # the first real consumer, through bookkeeping; if nothing real uses it (a guard),
        # the last real value it reads
        host = _nearest_real(g, n, g.successors, lambda a, b: index[a] < index[b])
        if host is None:
            host = _nearest_real(g, n, g.predecessors, lambda a, b: index[a] > index[b])
        if host is not None:
            d["host"] = host
            g.nodes[host].setdefault("folded", []).append(n)


# --------------------------------------------------------------------------------------
# layout


def _layout_graphs(graphs: list[nx.DiGraph], engine: str | None) -> str:
    """Lay out every graph twice: all nodes (``x``/``y`` on the nodes, ``route`` on the
    edges, ``width``/``height`` on the graph) and without shape bookkeeping
    (``g.graph["fold"]``: ``pos``, ``routes``, ``width``, ``height``). Returns the engine
    note (see :func:`fxpass.viz.layout.layout_all`)."""
    if engine == "none":
        for g in graphs:
            for _, d in g.nodes(data=True):
                d["x"] = d["y"] = 0
            g.graph["width"] = g.graph["height"] = 0
        return "none"
    jobs = []
    for g in graphs:
        heights = {n: d.get("h", NODE_H) for n, d in g.nodes(data=True)}
        jobs.append((list(g.nodes), heights, list(g.edges)))
        kept = [n for n, d in g.nodes(data=True) if not d.get("shape_op")]
        if len(kept) < g.number_of_nodes():
            keep = set(kept)
            jobs.append((kept, heights, [(a, b) for a, b in g.edges if a in keep and b in keep]))
        else:
            jobs.append(None)
    todo = [j for j in jobs if j is not None]
    done, note = layout_all(todo, engine)
    it = iter(done)
    for k, g in enumerate(graphs):
        full: Layout = next(it)
        for n, (x, y) in full.pos.items():
            g.nodes[n]["x"], g.nodes[n]["y"] = x, y
        for a, b in g.edges:
            route = full.routes.get((a, b))
            if route:
                g.edges[a, b]["route"] = route
            else:
                g.edges[a, b].pop("route", None)
        g.graph["width"], g.graph["height"] = full.width, full.height
        if jobs[2 * k + 1] is not None:
            fold = next(it)
            g.graph["fold"] = {"pos": fold.pos, "routes": fold.routes, "width": fold.width,
                               "height": fold.height}
        else:
            g.graph.pop("fold", None)
    return note


def _as_graph_dict(before: Any) -> dict[str, fx.Graph]:
    if before is None:
        return {}
    graphs = getattr(before, "graphs", None)
    if graphs is not None:  # a Trace of the original model
        return {q: mg.graph for q, mg in graphs.items()}
    if isinstance(before, Mapping):
        out = {}
        for q, g in before.items():
            out[q] = getattr(g, "graph", g)  # ModuleGraph or fx.Graph
            if not isinstance(out[q], fx.Graph):
                raise UsageError(f"before[{q!r}] is a {type(g).__name__}, expected an fx.Graph")
        return out
    raise UsageError(
        "before must be a Trace of the original model or a dict of qualname -> fx.Graph "
        f"(fxpass.viz.snapshot(trace) before apply); got {type(before).__name__}")


def _report_dict(report: Any) -> dict[str, Any] | None:
    if report is None:
        return None
    if isinstance(report, Mapping):
        return dict(report)
    if hasattr(report, "to_dict"):
        return report.to_dict()
    raise UsageError(f"report must be an fxpass Report or its to_dict(); got {type(report).__name__}")


def build_model(trace_result: Any, report: Any = None, verify: Any = None,
                before: Any = None, *, title: str | None = None,
                layout: str | None = None) -> VizModel:
    """The viz model of ``trace_result`` (see the module docstring).

    ``report``: the :class:`fxpass.report.Report` apply returned (or its ``to_dict()``);
    ``verify``: a VerifyReport (or its ``to_dict()``) for the diff overlay; ``before``: the
    graphs before apply (``snapshot(trace)``, or a Trace of an untouched copy).
    ``layout``: ``"auto"`` (Graphviz ``dot`` when installed, else the pure-Python layered
    layout), ``"dot"`` or ``"python"``; None reads ``$FXPASS_VIZ_LAYOUT`` (default auto).
    Never fails over the layout: ``summary["layout"]`` says which engine ran, and why not
    dot when it could not.
    """
    if not hasattr(trace_result, "graphs") or not hasattr(trace_result, "untraced"):
        raise UsageError(f"expected an fxpass Trace, got {type(trace_result).__name__}")
    from fxpass.viz.layout import engine_choice

    if layout != "none":  # "none": no positions (the DOT / SVG writers lay out themselves)
        engine_choice(layout)  # a bad name is a UsageError before any work
    rep = _report_dict(report)
    overlay = overlay_from_verify(verify) if verify is not None else None
    prefix = (rep or {}).get("prefix") or ""
    root = trace_result.root

    def strip(name: str) -> str:
        return name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else name

    # -- hierarchy --------------------------------------------------------------------
    tree = nx.DiGraph()
    paths = set(trace_result.graphs) | set(trace_result.untraced) | {""}
    for path in sorted(paths, key=lambda p: (p.count(".") + bool(p), p)):
        mg = trace_result.graphs.get(path)
        kind = "graph" if mg is not None else ("python" if path in trace_result.untraced
                                               else "none")
        tree.add_node(path, kind=kind, type=(mg.module_type if mg else _module_type(root, path)),
                      reason=trace_result.untraced.get(path), reused_from=getattr(mg, "reused_from", None))
        if path:
            parent = path
            while parent:
                parent = parent.rpartition(".")[0]
                if parent in paths:
                    break
            tree.add_edge(parent, path, rel=path[len(parent) + 1:] if parent else path)
    # children in call order: where the parent's graph calls them, else the trace order
    traced_order = {p: i for i, p in enumerate([*trace_result.graphs, *trace_result.untraced])}
    for p in tree.nodes:
        calls: dict[str, int] = {}
        mg = trace_result.graphs.get(p)
        if mg is not None:
            for i, node in enumerate(mg.graph.nodes):
                if node.op == "call_module":
                    calls.setdefault(_full(p, str(node.target)), i)

        def key(c: str, calls: dict[str, int] = calls) -> tuple[int, int, str]:
            hit = min((i for t, i in calls.items() if t == c or t.startswith(c + ".")),
                      default=None)
            return (0, hit, c) if hit is not None else (1, traced_order.get(c, 1 << 30), c)

        tree.nodes[p]["children"] = sorted(tree.successors(p), key=key)

    # -- per-module graphs ------------------------------------------------------------
    before_graphs = _as_graph_dict(before)
    graphs = {q: _graph_to_nx(q, mg.graph, annotations=True, prefix=prefix)
              for q, mg in trace_result.graphs.items()}
    befores = {q: _graph_to_nx(q, g, annotations=False) for q, g in before_graphs.items()}

    skipped = {strip(k): v for k, v in (rep or {}).get("skipped", {}).items()}
    plain_swaps = {strip(k): v for k, v in (rep or {}).get("plain_swaps", {}).items()}
    quant_methods = {strip(k): v for k, v in (rep or {}).get("quant_methods", {}).items()}
    # linears a refused tensor-parallel pair left replicated -> the reason
    tp_refused = {strip(k): v["reason"]
                  for k, v in ((rep or {}).get("tp") or {}).get("layers", {}).items()
                  if v.get("style") == "replicated" and "pair refused" in v.get("reason", "")}

    def annotate_calls(q: str, g: nx.DiGraph) -> None:
        for n, d in g.nodes(data=True):
            if d["op"] != "call_module":
                continue
            full = _full(q, d["target"])
            d["call"] = full
            if full in tree:
                d["call_kind"] = tree.nodes[full]["kind"]
                if d["call_kind"] == "python":
                    d["reason"] = tree.nodes[full]["reason"]
            else:
                d["call_kind"] = "leaf"
                d["call_type"] = _module_type(root, full)
            if full in skipped:
                d["skipped"] = skipped[full]
            refused = tp_refused.get(full) or next(
                (v for k, v in tp_refused.items() if k.startswith(full + ".")
                 and "." not in k[len(full) + 1:]), None)
            if refused:
                d["tp_refused"] = refused

    for q, g in graphs.items():
        annotate_calls(q, g)
    for q, g in befores.items():
        annotate_calls(q, g)
        after = graphs.get(q)
        for n, d in g.nodes(data=True):
            if after is None or n not in after:
                d["removed"] = True
            elif after.nodes[n].get("rewrite"):
                d["will_rewrite"] = dict(after.nodes[n]["rewrite"])
            # the module a call_module targets is the rewritten one now: show the old type
            if d.get("call_kind") == "leaf" and after is not None and n in after \
                    and after.nodes[n].get("rewrite"):
                d["call_type"] = after.nodes[n]["rewrite"].get("was", d.get("call_type"))

    # -- fixes from the report (probe nodes are erased by the fix: attach them to the
    # node before and to its former users after) ----------------------------------------
    module_fixes: dict[str, list[dict[str, str]]] = {}
    for fix in (rep or {}).get("fixes", []):
        q = fix.get("module", "")
        module_fixes.setdefault(q, []).append({"rule": fix.get("rule", ""),
                                               "detail": fix.get("detail", "")})
        name = node_name_of(fix.get("node", ""))
        entry = {"rule": fix.get("rule", ""), "detail": fix.get("detail", "")}
        bg = befores.get(q)
        ag = graphs.get(q)
        if name is None:
            continue
        if bg is not None and name in bg:
            bg.nodes[name].setdefault("fixes", []).append(entry)
            if ag is not None and name not in ag:
                for user in bg.successors(name):
                    if user in ag and entry not in ag.nodes[user].get("fixes", []):
                        ag.nodes[user].setdefault("fixes", []).append(
                            {**entry, "detail": f"input {name} folded: {entry['detail']}"})
        if ag is not None and name in ag and entry not in ag.nodes[name].get("fixes", []) \
                and not ag.nodes[name].get("fixes"):
            ag.nodes[name].setdefault("fixes", []).append(entry)

    # -- diff overlay -------------------------------------------------------------------
    module_metrics: dict[str, list[dict[str, Any]]] = {}
    first_site: tuple[str, str] | None = None
    if overlay is not None:
        for (q, n), entries in overlay.nodes.items():
            hit = False
            for g in (graphs.get(q), befores.get(q)):
                if g is not None and n in g:
                    g.nodes[n]["metrics"] = entries
                    g.nodes[n]["sqnr"] = overlay.node_sqnr(entries)
                    g.nodes[n]["failed"] = any(not e.get("passed", True) for e in entries)
                    hit = True
            for e in entries:  # a module's output metrics also on its own row
                if not hit or (e["kind"] == "module" and e["module"] in tree):
                    module_metrics.setdefault(_row_of(tree, e["module"] or q), []).append(e)
        for path, entries in overlay.modules.items():
            module_metrics.setdefault(_row_of(tree, path), []).extend(entries)
        fd = overlay.first
        if fd is not None:
            q, n = fd.get("graph"), fd.get("node")
            if q is not None and n is not None and (q in graphs or q in befores):
                first_site = (q, n)
                for g in (graphs.get(q), befores.get(q)):
                    if g is not None and n in g:
                        g.nodes[n]["first"] = True
            else:
                first_site = (_row_of(tree, fd.get("module") or ""), "")

    # -- labels, reachability, layout ---------------------------------------------------
    for g in [*graphs.values(), *befores.values()]:
        outputs = [n for n, d in g.nodes(data=True) if d["op"] == "output"]
        live = set(outputs)
        for o in outputs:
            live |= nx.ancestors(g, o)
        for n, d in g.nodes(data=True):
            d["label"], d["sub"], d["badge"] = _label(n, d)
            # lines: label, [vLLM layer], shape, [SQNR vs its reference]
            d["h"] = NODE_H + LINE_H * (bool(d["badge"]) + (d.get("sqnr") is not None))
            d["unused"] = n not in live
        _fold_shape_ops(g)
    layout_note = _layout_graphs([*graphs.values(), *befores.values()], layout)

    # -- roll-ups over the module tree --------------------------------------------------
    own: dict[str, dict[str, Any]] = {}
    for p, d in tree.nodes(data=True):
        g = graphs.get(p)
        nodes = list(g.nodes(data=True)) if g is not None else []
        sq = [nd["sqnr"] for _, nd in nodes if nd.get("sqnr") is not None]
        sq += [overlay.node_sqnr(module_metrics[p])] if overlay and p in module_metrics else []
        sq = [s for s in sq if s is not None]
        own[p] = {
            "rewritten": sum(1 for _, nd in nodes if nd.get("rewrite")),
            "skipped": sum(1 for _, nd in nodes if nd.get("skipped")),
            "fixes": len(module_fixes.get(p, [])),
            "python": int(d["kind"] == "python"),
            "plain_swaps": sum(1 for s in plain_swaps if _row_of(tree, s.rpartition(".")[0]) == p),
            "failed": sum(1 for _, nd in nodes if nd.get("failed")),
            "worst_sqnr": min(sq) if sq else None,
        }
        d["fixes"] = module_fixes.get(p, [])
        d["metrics"] = module_metrics.get(p, [])
        d["plain_swaps"] = {s: w for s, w in plain_swaps.items()
                            if _row_of(tree, s.rpartition(".")[0]) == p}
    for p in nx.dfs_postorder_nodes(tree, "") if "" in tree else []:
        roll = dict(own[p])
        for c in tree.successors(p):
            cr = tree.nodes[c]["roll"]
            for k in ("rewritten", "skipped", "fixes", "python", "plain_swaps", "failed"):
                roll[k] += cr[k]
            if cr["worst_sqnr"] is not None:
                roll["worst_sqnr"] = (cr["worst_sqnr"] if roll["worst_sqnr"] is None
                                      else min(roll["worst_sqnr"], cr["worst_sqnr"]))
        tree.nodes[p]["roll"] = roll
        tree.nodes[p]["own"] = own[p]

    # -- summary ------------------------------------------------------------------------
    sites = [(q, n) for q, g in graphs.items() for n, d in g.nodes(data=True) if d.get("rewrite")]
    methods = sorted({d["rewrite"]["quant_method"] for q, g in graphs.items()
                      for _, d in g.nodes(data=True)
                      if d.get("rewrite") and "quant_method" in d["rewrite"]}
                     | set(quant_methods.values()))
    fixes = (rep or {}).get("fixes", [])
    summary = {
        "modules": tree.number_of_nodes(),
        "graphs": len(graphs),
        "nodes": sum(g.number_of_nodes() for g in graphs.values()),
        "rewritten": len(rep["replaced"]) if rep else len({s for s in sites}),
        "graph_rewrites": len(rep["graph_rewrites"]) if rep else len(sites),
        "plain_swaps": len(plain_swaps),
        "skipped": len(skipped),
        "untraced": len(trace_result.untraced),
        "tp": ((rep or {}).get("tp") or {}).get("size", 1),
        "tp_sharded": sum(1 for v in ((rep or {}).get("tp") or {}).get("layers", {}).values()
                          if v.get("style") != "replicated"),
        "tp_refused": sum(1 for r in (rep or {}).get("refusals", [])
                          if r.get("rule") == "tensor-parallel"),
        "probes": sum(1 for f in fixes if f.get("rule") == "weight-probes"),
        "contiguity": sum(1 for f in fixes if f.get("rule") == "contiguity"),
        "quant_methods": methods,
        "prefix": prefix,
        "root_type": type(root).__name__,
        "first_site": first_site,
        "applied": rep is not None,
        "layout": layout_note,
        "shape_ops": sum(1 for g in graphs.values() for _, d in g.nodes(data=True)
                         if d.get("shape_op")),
    }
    return VizModel(title or f"fxpass: {type(root).__name__}", tree, graphs, befores, summary,
                    rep, overlay)


def _row_of(tree: nx.DiGraph, path: str) -> str:
    """The tree row holding ``path`` (itself or its nearest ancestor in the tree)."""
    while path and path not in tree:
        path = path.rpartition(".")[0]
    return path


def sqnr_color(sqnr: float | None) -> str | None:
    """The colour of an SQNR (dB) on the diff scale: red 0 dB -> yellow 20 -> green >= 40."""
    if sqnr is None:
        return None
    if math.isinf(sqnr) and sqnr > 0:
        return "#7fd4c1"  # exact
    s = 0.0 if math.isnan(sqnr) else max(0.0, min(40.0, sqnr))
    hue = s / 40.0 * 120.0
    return f"hsl({hue:.0f},75%,70%)"


def iter_nodes(model: VizModel, view: str = "after") -> Iterable[tuple[str, str, dict[str, Any]]]:
    graphs = model.before if view == "before" else model.graphs
    for q, g in graphs.items():
        for n, d in g.nodes(data=True):
            yield q, n, d


def _nearest_real(g: Any, start: Any, neighbours: Any, better: Any) -> Any:
    """The best (by ``better(a, b)``) node that is not a shape op, reached from ``start``
    through shape ops along ``neighbours``; None when there is none."""
    host = None
    seen, todo = {start}, [start]
    while todo:
        for nxt in neighbours(todo.pop()):
            if nxt in seen:
                continue
            seen.add(nxt)
            if g.nodes[nxt]["shape_op"]:
                todo.append(nxt)
            elif host is None or better(nxt, host):
                host = nxt
    return host
