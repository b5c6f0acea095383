"""Graph layout: fewer edge crossings than the one-pass layout it replaced, on the tiny
Gemma4 vision tower, with Graphviz's dot and with the pure-Python fallback; never failing."""

from __future__ import annotations

import copy
import shutil
import stat

import networkx as nx
import pytest

import fxpass.viz as viz
from fxpass.errors import UsageError
from fxpass.viz import layout as L
from fxpass.viz.layout import Layout, count_crossings, graph_crossings

from viz_layout_baseline import baseline_layout

HAVE_DOT = shutil.which("dot") is not None


def _baseline_crossings(g: nx.DiGraph) -> int:
    g = copy.deepcopy(g)
    for a, b in g.edges:
        g.edges[a, b].pop("route", None)
    baseline_layout(g)
    return graph_crossings(g)


def _check_geometry(g: nx.DiGraph) -> None:
    """Boxes inside the drawing, no two overlapping, every edge going down the page."""
    W, H = g.graph["width"], g.graph["height"]
    boxes = []
    for n, d in g.nodes(data=True):
        x, y, h = d["x"], d["y"], d["h"]
        assert 0 <= x and x + L.NODE_W <= W and 0 <= y and y + h <= H, (n, x, y, W, H)
        boxes.append((x, y, x + L.NODE_W, y + h, n))
    boxes.sort()
    for i, (x0, y0, x1, y1, n) in enumerate(boxes):
        for u0, v0, u1, v1, m in boxes[i + 1:]:
            if u0 >= x1:
                break
            assert v1 <= y0 or v0 >= y1, f"{n} and {m} overlap"
    for a, b in g.edges:
        assert g.nodes[a]["y"] + g.nodes[a]["h"] <= g.nodes[b]["y"], (a, b)
        route = g.edges[a, b].get("route")
        if route:
            assert (len(route) - 2) % 6 == 0
            assert all(0 <= v <= max(W, H) for v in route)


def test_count_crossings_counts_what_is_drawn():
    # two edges swapping sides between two layers cross once; parallel ones do not; edges
    # that share a node meet at its box, which is not a crossing
    pos = {"a": (0, 0), "b": (300, 0), "c": (0, 100), "d": (300, 100)}
    h = {n: 38 for n in pos}
    assert count_crossings(Layout(pos, {}, 0, 0, ""), h, [("a", "d"), ("b", "c")]) == 1
    assert count_crossings(Layout(pos, {}, 0, 0, ""), h, [("a", "c"), ("b", "d")]) == 0
    assert count_crossings(Layout(pos, {}, 0, 0, ""), h, [("a", "d"), ("a", "c"), ("b", "d")]) == 0
    # a routed edge counts along its route: around the other edge's end, no crossing
    route = [92, 38, 92, 60, 500, 60, 500, 150, 500, 200, 392, 200, 392, 198]
    pos2 = {**pos, "e": (300, 200)}
    h2 = {n: 38 for n in pos2}
    assert count_crossings(Layout(pos2, {("a", "e"): route}, 0, 0, ""), h2,
                           [("a", "e"), ("b", "c")]) == 1
    assert count_crossings(Layout(pos2, {}, 0, 0, ""), h2, [("a", "e"), ("b", "d")]) == 0


@pytest.mark.parametrize("engine", ["python", "dot"])
def test_fewer_crossings_than_the_baseline_on_gemma4_vision(gemma_trace, engine, capsys):
    """Every graph of the tiny Gemma4 vision tower: the new layout (all nodes drawn) crosses
    fewer edges than the baseline layout, in total by far; folding the shape bookkeeping
    out removes more."""
    if engine == "dot":  # as the SVG tests: tools/setup.sh installs it, CI has it
        assert HAVE_DOT, "Graphviz is missing: tools/setup.sh installs it (apt-get install graphviz)"
    m = viz.build_model(gemma_trace, layout=engine)
    assert m.summary["layout"] == engine
    base = new = folded = 0
    for q, g in m.graphs.items():
        b, c, f = _baseline_crossings(g), graph_crossings(g), graph_crossings(g, folded=True)
        if engine == "python":
            assert c <= b, f"{q}: {c} crossings, the baseline has {b}"
        base, new, folded = base + b, new + c, folded + f
        _check_geometry(g)
    with capsys.disabled():
        print(f"\ngemma4_vision ({len(m.graphs)} graphs), edge crossings: baseline {base}, "
              f"{engine} {new} (shape bookkeeping folded: {folded})")
    assert new * 2 < base
    assert folded <= new


@pytest.mark.usefixtures("vllm_rt")
def test_the_rendered_page_has_fewer_crossings(gemma_case, capsys):
    """The page the HTML tests open (nf4, applied, engine "auto"): before and after views."""
    m = gemma_case.model
    for view, graphs in (("after", m.graphs), ("before", m.before)):
        base = sum(_baseline_crossings(g) for g in graphs.values())
        new = sum(graph_crossings(g) for g in graphs.values())
        folded = sum(graph_crossings(g, folded=True) for g in graphs.values())
        with capsys.disabled():
            print(f"\ngemma4_vision nf4 {view} ({m.summary['layout']}): baseline {base}, "
                  f"new {new}, shape bookkeeping folded {folded}")
        assert new * 2 < base and folded <= new


def test_layout_is_deterministic(gemma_trace):
    for engine in ("python", "dot"):
        a = viz.build_model(gemma_trace, layout=engine)
        b = viz.build_model(gemma_trace, layout=engine)
        assert a.summary["layout"] == b.summary["layout"] == engine  # dot ran, no fallback
        for q in a.graphs:
            ga, gb = a.graphs[q], b.graphs[q]
            assert [(d["x"], d["y"]) for _, d in ga.nodes(data=True)] == \
                   [(d["x"], d["y"]) for _, d in gb.nodes(data=True)]
            assert list(ga.edges(data="route")) == list(gb.edges(data="route"))
            assert ga.graph.get("fold") == gb.graph.get("fold")


def _fake_dot(tmp_path, body: str) -> str:
    exe = tmp_path / "dot"
    exe.write_text("#!/bin/sh\n" + body + "\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return str(exe)


def test_layout_never_fails_without_a_working_dot(gemma_trace, monkeypatch, tmp_path):
    # auto without dot: pure Python
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    m = viz.build_model(gemma_trace)
    assert m.summary["layout"] == "python"
    m = viz.build_model(gemma_trace, layout="dot")
    assert m.summary["layout"] == "python (dot is not installed)"
    # a dot that fails, one that prints nonsense, one that hangs: pure Python, saying why
    g = m.graphs["pooler"]
    job = [(list(g.nodes), {n: d["h"] for n, d in g.nodes(data=True)}, list(g.edges))]
    for body, why in (("echo boom >&2; exit 3", "exit 3"),
                      ("cat >/dev/null; echo 'graph 1 2 3'; echo stop", "placed 0 of"),
                      ("sleep 5", "took over")):
        exe = _fake_dot(tmp_path, body)
        monkeypatch.setattr(shutil, "which", lambda name, *a, exe=exe, **k: exe)
        out, note = L.layout_all(job, "auto", timeout_s=0.5)
        assert note.startswith("python (dot failed: ") and why in note, note
        assert out[0].engine == "python" and len(out[0].pos) == g.number_of_nodes()
    monkeypatch.setenv("FXPASS_VIZ_LAYOUT", "python")
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: "/nonexistent/dot")
    assert viz.build_model(gemma_trace).summary["layout"] == "python"
    monkeypatch.setenv("FXPASS_VIZ_LAYOUT", "graphviz")
    with pytest.raises(UsageError, match="layout engine"):
        viz.build_model(gemma_trace)


def test_identical_graphs_share_one_layout(gemma_trace):
    m = viz.build_model(gemma_trace, layout="python")
    a, b = m.graphs["encoder.layers.0.self_attn"], m.graphs["encoder.layers.1.self_attn"]
    assert [(d["x"], d["y"]) for _, d in a.nodes(data=True)] == \
           [(d["x"], d["y"]) for _, d in b.nodes(data=True)]

