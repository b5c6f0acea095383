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
  path, ``call_kind``: graph / python / leaf), diff metrics, and a layout (``x``, ``y``).

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
from fxpass.viz.overlay import Overlay, overlay_from_verify

# Box geometry shared by the HTML and the layout (pixels).
NODE_W = 184
NODE_H = 38
NODE_H_TALL = 52  # boxes with a third line (the vLLM layer of a rewritten call site)
GAP_X = 22
GAP_Y = 30
MARGIN = 12
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
            "text": _short(node.format_node() or node.name, 400),
        }
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
        badge = f"{rw.get('layer', '?')} · {rw.get('quant_method', '?')}"
        if d.get("tp"):
            badge += f" · tp={d['tp'].get('tp')}"
    elif d.get("tp"):
        badge = f"{d['tp'].get('style', '?')} · tp={d['tp'].get('tp')}"
    elif d.get("will_rewrite"):
        rw = d["will_rewrite"]
        badge = f"→ {rw.get('layer', '?')} · {rw.get('quant_method', '?')}"
    return _short(head), _short(sub), (_short(badge) if badge else None)


def _layout(g: nx.DiGraph) -> tuple[int, int]:
    """Layered top-down layout; sets x, y (box top-left) on every node. Returns (w, h).

    Layers are networkx topological generations; sources (inputs, attributes) are then
    pulled down next to their first consumer, and each layer is placed left to right by
    the mean x of its inputs (a one-pass barycenter), so chains stay straight.
    """
    if g.number_of_nodes() == 0:
        return 0, 0
    layer: dict[str, int] = {}
    for i, gen in enumerate(nx.topological_generations(g)):
        for n in gen:
            layer[n] = i
    for n in g.nodes:
        if g.in_degree(n) == 0 and g.out_degree(n) > 0:
            layer[n] = max(0, min(layer[s] for s in g.successors(n)) - 1)
    by_layer: dict[int, list[str]] = {}
    for n in sorted(g.nodes, key=lambda n: g.nodes[n]["index"]):
        by_layer.setdefault(layer[n], []).append(n)
    step = NODE_W + GAP_X
    xs: dict[str, float] = {}
    for li in sorted(by_layer):
        nodes = by_layer[li]
        want: dict[str, float] = {}
        sources = []
        for n in nodes:
            preds = [xs[p] for p in g.predecessors(n) if p in xs]
            if preds:
                want[n] = sum(preds) / len(preds)
            else:
                sources.append(n)
        for n in sources:
            # a source (input, attribute): right of the other inputs of its first consumer,
            # so the consumer's main input stays straight above it
            succ = min(g.successors(n), key=lambda s: g.nodes[s]["index"], default=None)
            others = [xs.get(p, want.get(p)) for p in g.predecessors(succ)] if succ else []
            others = [x for x in others if x is not None]
            want[n] = (max(others) + step) if others else 0.0
        x_prev = -math.inf
        for n in sorted(nodes, key=lambda n: (want[n], g.nodes[n]["index"])):
            x = max(want[n], x_prev + step)
            xs[n] = x
            x_prev = x
    x0 = min(xs.values())
    tops: dict[int, int] = {}
    y = MARGIN
    for li in sorted(by_layer):
        tops[li] = y
        y += max(g.nodes[n].get("h", NODE_H) for n in by_layer[li]) + GAP_Y
    width = 0
    height = 0
    for n, x in xs.items():
        d = g.nodes[n]
        d["x"] = int(round(x - x0)) + MARGIN
        d["y"] = tops[layer[n]]
        width = max(width, d["x"] + NODE_W + MARGIN)
        height = max(height, d["y"] + d.get("h", NODE_H) + MARGIN)
    g.graph["width"], g.graph["height"] = width, height
    return width, height


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
                before: Any = None, *, title: str | None = None) -> VizModel:
    """The viz model of ``trace_result`` (see the module docstring).

    ``report``: the :class:`fxpass.report.Report` apply returned (or its ``to_dict()``);
    ``verify``: a VerifyReport (or its ``to_dict()``) for the diff overlay; ``before``: the
    graphs before apply (``snapshot(trace)``, or a Trace of an untouched copy).
    """
    if not hasattr(trace_result, "graphs") or not hasattr(trace_result, "untraced"):
        raise UsageError(f"expected an fxpass Trace, got {type(trace_result).__name__}")
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
            d["h"] = NODE_H_TALL if d["badge"] else NODE_H
            d["unused"] = n not in live
        _layout(g)

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
    methods = sorted({d["rewrite"].get("quant_method", "?") for q, g in graphs.items()
                      for _, d in g.nodes(data=True) if d.get("rewrite")}
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
