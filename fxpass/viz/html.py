"""The self-contained HTML page: summary, collapsible module tree, per-module graphs.

Everything is inlined (stylesheet, script, data as a JSON block); the page makes no
request at view time. Graph bodies are built in the browser when a module is expanded, so
a full-size tower (hundreds of modules, thousands of nodes) opens as fast as a tiny one.
Each graph comes with two layouts (:mod:`fxpass.viz.layout`): the default one without the
shape bookkeeping (folded into the node that uses it, "+N shape" on its box) and the full
one the "shape bookkeeping" checkbox switches to. Every number measured by verify says
what it was measured against (``refs``: :meth:`Overlay.reference_text`), on the badge or
box and in its tooltip.

Escaping: the static part is written with :func:`html.escape` on every value; the data
block is JSON with ``<``, ``>``, ``&`` and the JS line separators as ``\\uXXXX`` escapes (so
no ``</script>`` can end it early), and the script inserts strings with ``textContent`` /
``setAttribute`` only.
"""

from __future__ import annotations

import json
import math
from html import escape
from typing import Any

from fxpass.viz._assets import CSS, JS
from fxpass.viz.model import NODE_H, NODE_W, VizModel, _row_of, node_name_of


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def script_json(data: Any) -> str:
    """JSON that is safe inside a <script> element."""
    text = json.dumps(_json_safe(data), ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False)
    return (text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


# --------------------------------------------------------------------------------------
# data block

_NODE_KEYS = {  # model attribute -> short key in the page data
    "op": "o", "label": "l", "sub": "s", "badge": "bd", "x": "x", "y": "y", "h": "h", "target": "tg", "text": "tx",
    "tensor": "sh", "pytype": "py", "rewrite": "rw", "will_rewrite": "wr", "fixes": "fx",
    "inserted_by": "ins", "guard": "gd", "call_kind": "ck", "call_type": "ct",
    "reason": "why", "skipped": "sk", "metrics": "m", "sqnr": "q", "failed": "fail",
    "first": "first", "removed": "rm", "static": "st", "unused": "un", "tp": "tp",
    "tp_refused": "tpr",
}


def page_data(model: VizModel, *, expand_depth: int = 1) -> dict[str, Any]:
    rows = model.rows()
    ids = {p: i for i, p in enumerate(rows)}
    graphs: list[dict[str, Any]] = []
    gid: dict[tuple[str, str], int] = {}

    def add_graph(view: str, q: str, g: Any) -> int:
        names = list(g.nodes)
        pos = {n: i for i, n in enumerate(names)}
        nodes = []
        for n in names:
            d = g.nodes[n]
            out: dict[str, Any] = {"n": n}
            for k, short in _NODE_KEYS.items():
                v = d.get(k)
                if v is None or v is False or v == [] or v == {}:
                    continue
                out[short] = v
            call = d.get("call")
            if call is not None and d.get("call_kind") in ("graph", "python") and call in ids:
                out["c"] = ids[call]
            if d.get("shape_op"):
                out["so"] = 1
                if d.get("host") in pos:
                    out["ho"] = pos[d["host"]]
            if d.get("folded"):
                out["fo"] = list(d["folded"])
            nodes.append(out)

        def edge(a: str, b: str, route: Any) -> list[Any]:
            return [pos[a], pos[b], route] if route else [pos[a], pos[b]]

        edges = [edge(a, b, r) for a, b, r in g.edges(data="route")]
        entry: dict[str, Any] = {"w": g.graph.get("width", 0), "h": g.graph.get("height", 0),
                                 "n": nodes, "e": edges}
        fold = g.graph.get("fold")
        if fold is not None:  # the default view: shape bookkeeping folded out
            fp = fold["pos"]
            entry["f"] = {
                "w": fold["width"], "h": fold["height"],
                "p": [list(fp[n]) if n in fp else 0 for n in names],
                "e": [edge(a, b, fold["routes"].get((a, b))) for a, b in g.edges
                      if a in fp and b in fp],
            }
        graphs.append(entry)
        gid[(view, q)] = len(graphs) - 1
        return gid[(view, q)]

    modules = []
    leaves = []
    for p in rows:
        d = model.tree.nodes[p]
        preds = list(model.tree.predecessors(p))
        parent = preds[0] if preds else None
        g = model.graphs.get(p)
        b = model.before.get(p)
        entry = {
            "p": p,
            "r": model.tree.edges[parent, p]["rel"] if parent is not None else "",
            "k": d["kind"],
            "t": d.get("type") or "",
            "why": d.get("reason"),
            "reused": d.get("reused_from"),
            "par": ids[parent] if parent is not None else None,
            "ch": [ids[c] for c in d.get("children", [])],
            "d": 0,  # depth in the displayed tree (set below), not in the dotted path
            "g": add_graph("after", p, g) if g is not None else None,
            "b": add_graph("before", p, b) if b is not None else None,
            "roll": d.get("roll", {}),
            "fixes": d.get("fixes", []),
            "metrics": d.get("metrics", []),
            "swaps": d.get("plain_swaps", {}),
        }
        entry["d"] = 0 if parent is None else modules[ids[parent]]["d"] + 1
        modules.append(entry)
        if g is not None:
            for n, nd in g.nodes(data=True):
                if nd.get("call_kind") == "leaf":
                    what = nd.get("call_type") or ""
                    if nd.get("rewrite"):
                        what = f"{nd['rewrite'].get('layer')} · {nd['rewrite'].get('quant_method')}"
                    leaves.append([nd["call"], ids[p], n, what])
    first = None
    site = model.summary.get("first_site")
    if site is not None and _row_of(model.tree, site[0]) in ids:
        first = {"m": ids[_row_of(model.tree, site[0])], "n": site[1] or None}
    ov = model.overlay
    return {
        "title": model.title,
        "geom": {"w": NODE_W, "h": NODE_H},
        "applied": model.summary.get("applied", False),
        "has_before": model.has_before,
        "diff": ov is not None,
        "primary": ov.primary if ov is not None else None,
        # what each reference a number is measured against is, for every badge
        "refs": {r: ov.reference_text(r) for r in ov.references} if ov is not None else {},
        "layout": model.summary.get("layout"),
        "expand_depth": expand_depth,
        "modules": modules,
        "graphs": graphs,
        "leaves": leaves,
        "first": first,
    }


# --------------------------------------------------------------------------------------
# the static part


def _goto(text: str, mid: int | None, node: str | None = None, *, id_: str | None = None,
          view: str | None = None) -> str:
    if mid is None:
        return f'<code>{_e(text)}</code>'
    attrs = f' data-mod="{mid}"'
    if node:
        attrs += f' data-node="{_e(node)}"'
    if view:
        attrs += f' data-view="{_e(view)}"'
    if id_:
        attrs += f' id="{_e(id_)}"'
    return f'<a class="goto" href="#"{attrs}><code>{_e(text)}</code></a>'


def _fmt_db(v: Any) -> str:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return "–"
    if math.isinf(x):
        return "exact" if x > 0 else "-inf dB"
    if math.isnan(x):
        return "nan"
    return f"{x:.1f} dB"


def _site_index(model: VizModel, ids: dict[str, int]) -> dict[str, tuple[int, str]]:
    """Full module path of each call_module target -> (row id, node name) of its call site."""
    out: dict[str, tuple[int, str]] = {}
    for q, g in model.graphs.items():
        for n, d in g.nodes(data=True):
            call = d.get("call")
            if call is not None and call not in out and q in ids:
                out[call] = (ids[q], n)
    return out


def _summary_html(model: VizModel, data: dict[str, Any]) -> str:
    s = model.summary
    rep = model.report or {}
    ids = {m["p"]: i for i, m in enumerate(data["modules"])}
    sites = _site_index(model, ids)
    prefix = s.get("prefix") or ""

    def strip(name: str) -> str:
        return name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else name

    def where(full: str) -> tuple[int | None, str | None]:
        q = strip(full)
        if q in sites:
            return sites[q]
        row = _row_of(model.tree, q)
        return (ids.get(row), None)

    parts = ['<div class="counts">']

    def count(cls: str, id_: str, n: Any, text: str, title: str = "") -> None:
        t = f' title="{_e(title)}"' if title else ""
        parts.append(f'<span class="count {cls}"{t}><b id="{id_}">{_e(n)}</b> {_e(text)}</span>')

    count("rw", "count-rewritten", s["rewritten"], "linears → vLLM",
          "layers fxpass.apply replaced (Report.replaced)")
    count("rw", "count-graph-rewrites", s["graph_rewrites"], "at graph call sites")
    count("rw", "count-plain-swaps", s["plain_swaps"], "swapped without a graph")
    count("sk", "count-skipped", s["skipped"], "kept nn.Linear")
    count("py", "count-untraced", s["untraced"], "modules left as Python",
          "modules the tracer kept as Python (Trace.untraced)")
    if s.get("tp", 1) > 1:
        count("tp", "count-tp-sharded", s["tp_sharded"], f"linears sharded (tp={s['tp']})",
              "column- / row-parallel layers of the tensor-parallel pairs")
        count("sk", "count-tp-refused", s["tp_refused"], "tensor-parallel pairs refused")
    count("fx", "count-probes", s["probes"], "weight probes folded")
    count("fx", "count-contiguity", s["contiguity"], "contiguity fixes")
    count("", "count-graphs", s["graphs"], "graphs")
    count("", "count-nodes", s["nodes"], "nodes")
    if s["quant_methods"]:
        parts.append(f'<span class="count">quant: <code id="quant-methods">'
                     f'{_e(", ".join(s["quant_methods"]))}</code></span>')
    if prefix:
        parts.append(f'<span class="count">prefix: <code>{_e(prefix)}</code></span>')
    if not s.get("applied"):
        parts.append('<span class="count empty">(trace only: no apply report)</span>')
    parts.append("</div>")

    ov = model.overlay
    if ov is not None:
        vs = ov.summary
        ok = vs.get("passed")
        parts.append('<div class="diffsum" id="diff-summary">verify: '
                     f'<span class="{"ok" if ok else "bad"}" id="verify-verdict">'
                     f'{"PASSED" if ok else "FAILED"}</span> · mode {_e(vs.get("mode"))} · '
                     f'{_e(vs.get("dtype"))} · quant {_e(vs.get("quant_method"))}')
        for ref, v in (vs.get("output_sqnr_db") or {}).items():
            rt = ov.reference_text(ref)
            parts.append(f' · <span class="metric" data-ref="{_e(ref)}" title="tower output '
                         f'SQNR vs {_e(rt["long"])}">output SQNR vs {_e(rt["short"])}: '
                         f'<b>{_e(_fmt_db(v))}</b></span>')
        c = vs.get("counts") or {}
        if c:
            refs = "; ".join(f'vs {r["short"]}: {r["long"]}'
                             for r in (ov.reference_text(x) for x in ov.references))
            budget = ", ".join(f"{k} {v}" for k, v in (vs.get("budget") or {}).items()
                               if v is not None and not isinstance(v, (dict, list)))
            parts.append(f' · <span class="metric" title="{_e(f"budget: {budget}; {refs}")}">'
                         f'{_e(c.get("failed_nodes", 0))}/{_e(c.get("nodes", 0))} '
                         f'node comparisons over budget ('
                         f'{_e(" / ".join("vs " + ov.reference_text(x)["short"] for x in ov.references))})'
                         '</span>')
        fd = ov.first
        if fd is not None:
            first = data.get("first")
            label = fd["label"] + (f" (node {fd['node']} of graph {fd['graph'] or '<root>'})"
                                   if fd.get("node") else "")
            parts.append('<br>first divergence (input ' + _e(fd.get("input", 0)) + '): ')
            if first is not None:
                parts.append(_goto(label, first["m"], first["n"], id_="first-divergence-link",
                                   view="after"))
            else:
                parts.append(f'<code id="first-divergence-link">{_e(label)}</code>')
            if fd.get("violations"):
                parts.append(" — " + _e("; ".join(fd["violations"])))
        else:
            parts.append('<br>no divergence: every compared node is within budget')
        for err in vs.get("errors") or []:
            parts.append(f'<br><span class="bad">error on input {_e(err.get("input"))}: '
                         f'{_e(err.get("error"))}</span>')
        parts.append("</div>")

    # lists
    def details(id_: str, title: str, items: list[str]) -> None:
        if not items:
            return
        parts.append(f'<details class="list" id="{id_}"><summary>{_e(title)} ({len(items)})'
                     f'</summary><ul>')
        parts.extend(f"<li>{it}</li>" for it in items)
        parts.append("</ul></details>")

    replaced = rep.get("replaced", [])
    qm = rep.get("quant_methods", {})
    graph_rw = set(rep.get("graph_rewrites", []))
    items = []
    if rep:
        for name in replaced:
            mid, node = where(name)
            how = "graph" if name in graph_rw else "swap"
            items.append(f'{_goto(name, mid, node)} <span class="badge b-rw">'
                         f'{_e(qm.get(name, ""))}</span> <span class="mod-type">{how}</span>')
    else:
        for q, n in model.rewritten_sites():
            rw = model.graphs[q].nodes[n]["rewrite"]
            items.append(f'{_goto(rw.get("prefix", n), ids.get(q), n)} <span class="badge b-rw">'
                         f'{_e(rw.get("quant_method", ""))}</span>')
    details("list-rewritten", "Rewritten layers", items)
    untraced = [p for p in model.tree.nodes if model.tree.nodes[p]["kind"] == "python"]
    details("list-untraced", "Modules left as Python",
            [f'{_goto(p or "<root>", ids.get(p))}: <span class="mono">'
             f'{_e(model.tree.nodes[p]["reason"])}</span>' for p in untraced])
    fixes = []
    for f in rep.get("fixes", []):
        q = f.get("module", "")
        node = node_name_of(f.get("node", ""))
        view = "after"
        if q in model.graphs and node not in model.graphs[q]:
            view = "before" if (q in model.before and node in model.before[q]) else None
            node = node if view else None
        fixes.append(f'<span class="badge b-fix">{_e(f.get("rule"))}</span> '
                     f'{_goto(q or "<root>", ids.get(_row_of(model.tree, q)), node, view=view)}: '
                     f'{_e(f.get("detail"))}')
    details("list-fixes", "Fixes", fixes)
    tp = rep.get("tp") or {}
    if tp.get("size", 1) > 1:
        details("list-tp", f"Tensor-parallel styles (tp={tp['size']})", [
            f'{_goto(k, *where(k))} <span class="badge b-tp">{_e(v["style"])}</span>'
            + (f': {_e(v["reason"])}' if v.get("reason") else "")
            for k, v in tp.get("layers", {}).items()])
        details("list-tp-refused", "Tensor-parallel pairs refused", [
            f'<span class="mono">{_e(r.get("target"))}</span>: {_e(r.get("reason"))}'
            for r in rep.get("refusals", []) if r.get("rule") == "tensor-parallel"])
    details("list-skipped", "Kept nn.Linear", [
        f'{_goto(k, *where(k))}: {_e(v)}' for k, v in rep.get("skipped", {}).items()])
    details("list-plain-swaps", "Swapped without a graph", [
        f'{_goto(k, *where(k))}: {_e(v)}' for k, v in rep.get("plain_swaps", {}).items()])
    return "".join(parts)


def render_html(model: VizModel, *, expand_depth: int = 1) -> str:
    data = page_data(model, expand_depth=expand_depth)
    has_before = model.has_before
    dis = "" if has_before else ' disabled title="no before view: pass before=fxpass.viz.snapshot(trace)"'
    controls = [
        '<div class="controls">',
        '<span>view:</span>',
        '<label><input type="radio" name="view" value="after" id="view-after" checked> after</label>',
        f'<label><input type="radio" name="view" value="before" id="view-before"{dis}> before</label>',
        f'<label><input type="radio" name="view" value="both" id="view-both"{dis}> side by side</label>',
    ]
    n_shape = sum(1 for g in [*model.graphs.values(), *model.before.values()]
                  for _, d in g.nodes(data=True) if d.get("shape_op"))
    controls.append('<label title="nodes that only compute shapes, sizes and dtypes, and the '
                    'guards on them: folded into the node that uses them (+N on its box)">'
                    f'<input type="checkbox" id="shape-toggle"{"" if n_shape else " disabled"}> '
                    'shape bookkeeping</label>')
    if model.overlay is not None:
        ov = model.overlay
        rt = ov.reference_text(ov.primary)
        controls.append('<label><input type="checkbox" id="diff-toggle" checked> diff overlay</label>'
                        '<span class="legend" data-ref="' + _e(ov.primary) + '" title="colour of '
                        f'a node: lowest SQNR of its output vs {_e(rt["long"])}">'
                        f'SQNR vs {_e(rt["short"])}: 0 dB<span class="scale"></span>40 dB'
                        '<span class="exact"></span>exact</span>')
    controls.append('<button type="button" id="expand-all">expand all</button>'
                    '<button type="button" id="collapse-all">collapse all</button>'
                    '<span class="search-wrap"><input type="search" id="search" '
                    'placeholder="search a module path…" autocomplete="off">'
                    '<div id="search-results" hidden></div></span>')
    controls.append("</div>")
    return "".join([
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:\">",
        f"<title>{_e(model.title)}</title><style>{CSS}</style></head><body>",
        '<svg width="0" height="0" style="position:absolute" aria-hidden="true"><defs>'
        '<marker id="fx-arrow" viewBox="0 0 8 8" refX="7" refY="4" markerWidth="7" '
        'markerHeight="7" orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#adb5bd"/></marker>'
        '<pattern id="fx-hatch" width="8" height="8" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)"><rect width="8" height="8" fill="#f1f3f5"/>'
        '<rect width="4" height="8" fill="#dee2e6"/></pattern></defs></svg>',
        "<header>",
        f'<div class="bar"><h1>{_e(model.title)}</h1>{"".join(controls)}</div>',
        _summary_html(model, data),
        "</header>",
        '<main id="tree"></main><div id="tip"></div>',
        f'<script type="application/json" id="fxpass-data">{script_json(data)}</script>',
        f"<script>{JS}</script>",
        "</body></html>\n",
    ])
