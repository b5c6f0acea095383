"""DOT and SVG output: they parse, and every rewritten call site is in them."""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET

import pytest

import fxpass.viz as viz
from fxpass.errors import UsageError
from fxpass.viz.dot import MissingToolError

from viz_dotparse import parse_dot
from viz_toys import XSS_NAME, XSS_REASON

SVG = "{http://www.w3.org/2000/svg}"



def _expected_sites(case) -> set[str]:
    return {f"{q}/{n.name}" for q, mg in case.trace.graphs.items() for n in mg.graph.nodes
            if n.meta.get("fxpass", {}).get("rewrite")}


@pytest.mark.parametrize("which", ["gemma_case", "toy_case"])
def test_dot_parses_and_holds_every_rewritten_node(which, request):
    case = request.getfixturevalue(which)
    text = viz.render_dot(case.model)
    g = parse_dot(text)
    nodes = g.nodes
    rewritten = {a["id"]: a for a in nodes.values()
                 if "rewritten" in a.get("class", "").split()}
    sites = _expected_sites(case)
    attention = [f for f in case.report.fixes if f.rule == "mm-attention"]
    assert len(sites) == len(case.report.graph_rewrites) + len(attention)
    assert set(rewritten) == sites
    tips = " ".join(a.get("tooltip", "") for a in rewritten.values())
    for name in case.report.replaced:  # the vLLM prefix of each layer is on its node
        assert name in tips
    layers = [a["label"].split("ReplicatedLinear")[0] for a in rewritten.values()
              if "ReplicatedLinear" in a["label"]]
    calls = [a for a in rewritten.values() if "MMEncoderAttention" in a["label"]]
    assert len(layers) == len(case.report.graph_rewrites)
    assert len(calls) == len(attention)
    # every node and edge of every graph is there, one cluster per module
    total = sum(len(mg.graph.nodes) for mg in case.trace.graphs.values())
    assert sum(1 for a in nodes.values() if "op-" in a.get("class", "")) == total
    assert len(g.edges) == sum(len(gg.edges) for gg in case.model.graphs.values())
    assert {a["id"] for a in g.subgraphs.values()} == {f"module:{p}" for p in case.model.rows()}


def test_dot_escapes_hostile_names(toy_case):
    text = viz.render_dot(toy_case.model)
    nodes = parse_dot(text).nodes
    labels = [a.get("label", "") for a in nodes.values()]
    assert any(XSS_NAME[:20] in lab for lab in labels)
    python = [a for a in nodes.values() if a.get("class") == "python" and "box3d" in a.get("shape", "")]
    assert len(python) == 1 and XSS_REASON[:20] in python[0]["label"]
    assert any(XSS_NAME in a.get("id", "") for a in nodes.values())
    before = parse_dot(viz.render_dot(toy_case.model, view="before"))
    assert sum(1 for a in before.nodes.values() if "removed" in a.get("class", "")) >= 1


@pytest.mark.parametrize("which", ["gemma_case", "toy_case"])
def test_svg_parses_and_holds_every_rewritten_node(which, request):
    assert shutil.which("dot"), "Graphviz is missing: tools/setup.sh installs it (apt-get install graphviz)"
    case = request.getfixturevalue(which)
    svg = viz.render_svg(case.model)
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    groups = {g.get("id"): g for g in root.iter(f"{SVG}g")}
    rewritten = {i for i, g in groups.items() if "rewritten" in (g.get("class") or "").split()}
    assert rewritten == _expected_sites(case)
    for site in rewritten:
        text = " ".join(t.text or "" for t in groups[site].iter(f"{SVG}text"))
        assert "ReplicatedLinear" in text or "MMEncoderAttention" in text
    # hostile strings stay text: no element the SVG did not draw itself
    tags = {el.tag.removeprefix(SVG) for el in root.iter()}
    assert tags <= {"svg", "g", "title", "text", "path", "polygon", "ellipse", "a", "polyline"}


def test_svg_without_graphviz_names_the_missing_tool(gemma_case, monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    with pytest.raises(MissingToolError) as e:
        viz.render_svg(gemma_case.model)
    msg = str(e.value)
    assert "Graphviz" in msg and "`dot`" in msg and "apt-get install graphviz" in msg
    # DOT needs nothing
    out = viz.write(tmp_path / "g.dot", None, gemma_case.model)
    assert out.read_text().startswith("digraph fxpass {")


def test_write_picks_the_format_from_the_suffix(toy_case, tmp_path):
    for suffix, head in ((".html", "<!DOCTYPE html>"), (".dot", "digraph"), (".svg", "<?xml")):
        p = viz.write(tmp_path / f"t{suffix}", None, toy_case.trace, toy_case.report,
                      toy_case.verify, toy_case.before)
        assert p.read_text(encoding="utf-8").lstrip().startswith(head)
    with pytest.raises(UsageError, match="unknown viz format"):
        viz.write(tmp_path / "t.png", "png", toy_case.trace)
