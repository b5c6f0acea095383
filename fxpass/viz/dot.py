"""Static output: Graphviz DOT (no dependency) and SVG (through Graphviz's ``dot``).

One cluster per module, nested like the module tree; inside it the module's graph
(before or after apply). Rewritten call sites are filled orange and labelled with the vLLM
layer and quant method; modules left as Python are a grey ``box3d`` with the reason;
fixed nodes have a purple border; with a verify overlay nodes are filled on the SQNR
scale. Every node has ``id="<module path>/<node name>"`` (kept as the SVG element id)
and a ``class`` (``rewritten``, ``python``, ``fixed``, ``first-divergence``...).
"""

from __future__ import annotations

import colorsys
import shutil
import subprocess
import textwrap
from typing import Any

from fxpass.errors import UsageError
from fxpass.viz.model import VizModel, sqnr_color


class MissingToolError(UsageError):
    """An external program a format needs is not installed."""


def quote(text: Any) -> str:
    """A DOT double-quoted string (backslash, quote and newlines escaped)."""
    s = str(text).replace("\\", "\\\\").replace('"', '\\"')
    s = s.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\\n")
    return f'"{s}"'


def _attrs(**kw: Any) -> str:
    items = [f"{k}={quote(v)}" for k, v in kw.items() if v is not None and v != ""]
    return f" [{', '.join(items)}]" if items else ""


def _hex(color: str | None) -> str | None:
    """hsl(h,s%,l%) (as sqnr_color gives) -> #rrggbb; hex passes through."""
    if color is None or color.startswith("#"):
        return color
    h, s, l = (float(x.strip().rstrip("%")) for x in color[4:-1].split(","))
    r, g, b = colorsys.hls_to_rgb(h / 360.0, l / 100.0, s / 100.0)
    return "#%02x%02x%02x" % (round(r * 255), round(g * 255), round(b * 255))


def _wrap(text: str, width: int = 60, limit: int = 400) -> str:
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return "\n".join(textwrap.wrap(text, width)) or text


def _node_style(d: dict[str, Any], diff: bool) -> dict[str, Any]:
    classes = [f"op-{d['op']}"]
    style = ["rounded", "filled"]
    fill = {"placeholder": "#ebfbee", "get_attr": "#fff9db", "output": "#f1f3f5",
            "call_module": "#e7f5ff"}.get(d["op"], "#ffffff")
    color = "#adb5bd"
    penwidth = None
    if d.get("static"):
        style.append("dashed")
        classes.append("static")
    if d.get("shape_op"):
        classes.append("shape-op")
    if d.get("rewrite"):
        fill, color, penwidth = "#ffe8cc", "#e8590c", "2.5"
        classes.append("rewritten")
    if d.get("will_rewrite"):
        color, penwidth = "#e8590c", "2"
        style.append("dashed")
        classes.append("will-rewrite")
    if d.get("call_kind") == "python":
        fill, color, penwidth = "#dee2e6", "#495057", "2"
        classes.append("python")
    if d.get("skipped"):
        color, penwidth = "#c92a2a", "2"
        classes.append("skipped")
    if d.get("tp"):
        row = d["tp"].get("style") == "RowParallelLinear"
        color, penwidth = ("#9c36b5" if row else "#1971c2"), "3"
        classes.append("tp-row" if row else "tp-column")
    if d.get("tp_refused"):
        color, penwidth = "#c92a2a", "2"
        style.append("dotted")
        classes.append("tp-refused")
    if d.get("inserted_by"):
        color, penwidth = "#2b8a3e", "2"
        style.append("dashed")
        classes.append("inserted")
    if d.get("removed"):
        color = "#c92a2a"
        style.append("dashed")
        classes.append("removed")
    if d.get("fixes"):
        if not d.get("rewrite"):  # a rewritten node keeps its orange border; the label says ⚑
            color, penwidth = "#7048e8", "2.5"
        classes.append("fixed")
    if diff and d.get("sqnr") is not None:
        fill = _hex(sqnr_color(d["sqnr"]))
    if diff and d.get("failed"):
        color, penwidth = "#c92a2a", "2.5"
        classes.append("failed")
    if d.get("first"):
        color, penwidth = "#d6336c", "4"
        classes.append("first-divergence")
    return {"style": ",".join(dict.fromkeys(style)), "fillcolor": fill, "color": color,
            "penwidth": penwidth, "class": " ".join(classes)}


def _db(v: float) -> str:
    if v == float("inf"):
        return "exact"
    return f"{v:.1f} dB"


def _tooltip(path: str, name: str, d: dict[str, Any], overlay: Any = None) -> str:
    lines = [f"{path or '<root>'} / {name}", d.get("text", "")]
    if d.get("rewrite"):
        rw = d["rewrite"]
        lines.append(f"rewritten: {rw.get('was')} -> {rw.get('layer')} "
                     f"({rw.get('quant_method')}), prefix {rw.get('prefix')}")
    for f in d.get("fixes") or []:
        lines.append(f"fix {f.get('rule')}: {f.get('detail')}")
    if d.get("reason"):
        lines.append(f"Python: {d['reason']}")
    if d.get("skipped"):
        lines.append(f"kept nn.Linear: {d['skipped']}")
    if d.get("tp"):
        lines.append(f"tensor parallel: {d['tp'].get('style')} (tp={d['tp'].get('tp')})"
                     + (f": {d['tp']['pair']}" if d["tp"].get("pair") else ""))
    if d.get("tp_refused"):
        lines.append(f"tensor parallel: replicated: {d['tp_refused']}")
    refs: set[str] = set()
    for e in d.get("metrics") or []:
        refs |= set(e.get("metrics", {}))
        ms = ", ".join(
            f"vs {overlay.reference_text(ref)['short'] if overlay else ref}: sqnr "
            f"{m.get('sqnr_db')} dB, cos {m.get('cosine')}, max_abs {m.get('max_abs')}"
            for ref, m in e.get("metrics", {}).items())
        lines.append(f"verify {e.get('label')} input {e.get('input')}: {ms}")
    if overlay is not None:
        for ref in sorted(refs):
            rt = overlay.reference_text(ref)
            lines.append(f"{rt['short']}: {rt['long']}")
    if d.get("folded"):
        lines.append(f"shape bookkeeping it uses: {', '.join(d['folded'])}")
    return "\n".join(lines)[:2000]


def to_dot(model: VizModel, view: str = "after") -> str:
    """The model as one DOT digraph (``view``: "after" or "before")."""
    if view not in ("after", "before"):
        raise UsageError(f"view must be 'after' or 'before', got {view!r}")
    if view == "before" and not model.has_before:
        raise UsageError("no before graphs in this model: build it with before=snapshot(trace)")
    graphs = model.before if view == "before" else model.graphs
    diff = model.overlay is not None
    s = model.summary
    title = (f"{model.title} ({view}): {s['rewritten']} linears -> vLLM, "
             f"{s['untraced']} modules left as Python, {s['probes']} probes folded, "
             f"{s['contiguity']} contiguity fixes")
    out = ["digraph fxpass {",
           f"  graph{_attrs(label=title, labelloc='t', fontname='Helvetica', fontsize='12', rankdir='TB', newrank='true')};",
           '  node [shape="box", style="rounded,filled", fontname="Helvetica", fontsize="9", '
           'height="0.3"];',
           '  edge [color="#adb5bd", arrowsize="0.6"];']
    if "" not in model.tree:
        out.append("}")
        return "\n".join(out) + "\n"
    ids = {p: i for i, p in enumerate(model.rows())}

    def cluster(p: str, depth: int) -> None:
        ind = "  " * (depth + 1)
        d = model.tree.nodes[p]
        preds = list(model.tree.predecessors(p))
        rel = model.tree.edges[preds[0], p]["rel"] if preds else "<root>"
        roll = d.get("roll", {})
        label = f"{rel}: {d.get('type') or ''}"
        if roll.get("rewritten"):
            label += f"  [{roll['rewritten']} -> vLLM]"
        kind = d["kind"]
        out.append(f"{ind}subgraph {quote(f'cluster_{ids[p]}')} {{")
        out.append(f"{ind}  graph{_attrs(label=label, id=f'module:{p}', tooltip=p or '<root>', style='rounded,filled' + (',dashed' if kind == 'python' else ''), fillcolor='#e9ecef' if kind == 'python' else '#fbfcfd', color='#495057' if kind == 'python' else '#ced4da', fontsize='10')};")
        if kind == "python":
            out.append(f"{ind}  {quote(f'm{ids[p]}_python')}"
                       + _attrs(label=f"Python (not traced)\n{_wrap(d.get('reason') or '')}",
                                shape="box3d", style="filled", fillcolor="#dee2e6",
                                color="#495057", id=f"{p}/<python>", **{"class": "python"}))
        for swap, why in (d.get("plain_swaps") or {}).items():
            out.append(f"{ind}  {quote(f'm{ids[p]}_swap_{swap}')}"
                       + _attrs(label=f"{swap} -> ReplicatedLinear\n(no graph: caller is Python)",
                                style="rounded,filled", fillcolor="#ffe8cc", color="#e8590c",
                                penwidth="2.5", id=f"{swap}/<swap>", tooltip=why,
                                **{"class": "rewritten plain-swap"}))
        g = graphs.get(p)
        if g is not None:
            for n, nd in g.nodes(data=True):
                label = "\n".join(x for x in (nd.get("label", n), nd.get("badge"), nd.get("sub")) if x)
                if nd.get("fixes"):
                    label = "⚑ " + label
                if nd.get("first"):
                    label = "◆ first divergence\n" + label
                if diff and nd.get("sqnr") is not None:  # the number and its reference
                    label += (f"\nSQNR {_db(nd['sqnr'])} vs "
                              f"{model.overlay.reference_text(model.overlay.primary)['tag']}")
                out.append(f"{ind}  {quote(f'm{ids[p]}_{n}')}"
                           + _attrs(label=label, id=f"{p}/{n}",
                                    tooltip=_tooltip(p, n, nd, model.overlay),
                                    **_node_style(nd, diff)))
            for a, b in g.edges:
                out.append(f"{ind}  {quote(f'm{ids[p]}_{a}')} -> {quote(f'm{ids[p]}_{b}')};")
        for c in d.get("children", []):
            cluster(c, depth + 1)
        out.append(f"{ind}}}")

    cluster("", 0)
    out.append("}")
    return "\n".join(out) + "\n"


def dot_program() -> str:
    exe = shutil.which("dot")
    if exe is None:
        raise MissingToolError(
            "SVG output needs Graphviz's `dot` program, which is not installed "
            "(Debian/Ubuntu: apt-get install graphviz; macOS: brew install graphviz). "
            "--format dot writes the graph without it, and --format html needs nothing.")
    return exe


def to_svg(model: VizModel, view: str = "after", *, timeout_s: float = 300.0) -> str:
    """The DOT graph laid out by Graphviz's ``dot -Tsvg`` (MissingToolError without it)."""
    exe = dot_program()
    src = to_dot(model, view)
    try:
        res = subprocess.run([exe, "-Tsvg"], input=src.encode("utf-8"), capture_output=True,
                             timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as e:
        raise UsageError(f"Graphviz dot took over {timeout_s:.0f} s to lay out "
                         f"{sum(g.number_of_nodes() for g in model.graphs.values())} nodes; "
                         "use --format html for a tower this size") from e
    if res.returncode != 0:
        err = res.stderr.decode("utf-8", "replace").strip()[-2000:]
        raise UsageError(f"Graphviz dot failed (exit {res.returncode}): {err}")
    return res.stdout.decode("utf-8")
