"""The networkx model and the verify adapter, without a browser."""

from __future__ import annotations

import json
import math

import networkx as nx
import pytest
import torch
from torch import nn

import fxpass
import fxpass.viz as viz
from fxpass.viz.html import page_data, script_json
from fxpass.viz.model import node_name_of, sqnr_color
from fxpass.viz.overlay import overlay_from_verify


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _trace():
    return fxpass.trace(Two().eval(), (torch.randn(2, 4),), cache=None)


def test_tree_graphs_and_layout():
    tr = _trace()
    m = viz.build_model(tr)
    assert isinstance(m.tree, nx.DiGraph) and m.rows() == [""]
    g = m.graphs[""]
    assert isinstance(g, nx.DiGraph) and nx.is_directed_acyclic_graph(g)
    assert list(g.nodes) == [n.name for n in tr.graphs[""].graph.nodes]
    for a, b in g.edges:  # data flows down the page
        assert g.nodes[a]["y"] < g.nodes[b]["y"]
    boxes = {(d["x"], d["y"]) for _, d in g.nodes(data=True)}
    assert len(boxes) == g.number_of_nodes()  # no two boxes on the same spot
    assert g.nodes["a"]["call_kind"] == "leaf" and g.nodes["a"]["sub"] == "2×4 f32"
    assert m.summary["rewritten"] == 0 and not m.summary["applied"]


def test_report_markings_without_vllm():
    """A report as a dict (skipped linear, plain swap, fix) is enough to mark the graph."""
    tr = _trace()
    for n in tr.graphs[""].graph.nodes:
        if n.op == "call_module" and n.target == "a":
            n.meta.setdefault("fxpass", {})["rewrite"] = {
                "rule": "linear", "layer": "ReplicatedLinear", "prefix": "t.a",
                "quant_method": "nf4", "was": "Linear"}
    rep = {"prefix": "t", "replaced": ["t.a", "t.gone"], "graph_rewrites": ["t.a"],
           "plain_swaps": {"t.gone": "not called"}, "skipped": {"t.b": "tied <weights>"},
           "quant_methods": {"t.a": "nf4"}, "untraced": {},
           "fixes": [{"rule": "contiguity", "module": "", "node": "%a : [num_users=1] = x",
                      "detail": "inserted .contiguous()"}]}
    m = viz.build_model(tr, rep)
    g = m.graphs[""]
    assert g.nodes["a"]["rewrite"]["layer"] == "ReplicatedLinear"
    assert g.nodes["a"]["badge"] == "ReplicatedLinear · nf4"
    assert g.nodes["b"]["skipped"] == "tied <weights>"
    assert g.nodes["a"]["fixes"][0]["rule"] == "contiguity"
    assert m.summary["rewritten"] == 2 and m.summary["skipped"] == 1
    assert m.tree.nodes[""]["roll"]["rewritten"] == 1
    html = viz.render_html(m)
    assert "tied &lt;weights&gt;" in html and "tied <weights>" not in html
    dot = viz.render_dot(m)
    assert 'class="op-call_module skipped"' in dot


def verify_dict() -> dict:
    """A VerifyReport.to_dict() as documented in fxpass/viz/overlay.py (nf4, fp32)."""
    return {
        "counts": {"nodes": 2, "failed_nodes": 1},
        "passed": False, "mode": "propagated", "dtype": "float32", "quant_method": "nf4",
        "references": ["fake_quant", "reference"], "output_sqnr_db": {"reference": 12.5},
        "nodes": [
            {"kind": "layer", "module": "a", "graph": "", "node": "a", "input": 0, "call": 0,
             "leaf": "", "passed": False, "violations": ["vs reference: SQNR 3 dB < 9 dB"],
             "metrics": {"reference": {"sqnr_db": 3.0, "cosine": 0.9},
                         "fake_quant": {"sqnr_db": "inf", "cosine": 1.0}}},
            {"kind": "module", "module": "x.y", "graph": None, "node": None, "passed": True,
             "metrics": {"reference": {"sqnr_db": 30.0}}},
        ],
        "outputs": [{"kind": "output", "module": "", "graph": None, "node": None, "leaf": "",
                     "passed": True, "metrics": {"reference": {"sqnr_db": 12.5}}}],
        "first_divergence": {"kind": "layer", "module": "a", "graph": "", "node": "a",
                             "passed": False, "violations": ["x"], "metrics": {}},
    }


def test_overlay_adapter_reads_the_documented_dict():
    d = verify_dict()
    ov = overlay_from_verify(d)
    assert ov.primary == "reference"
    assert ov.node_sqnr(ov.nodes[("", "a")]) == 3.0
    assert ("", "output") in ov.nodes and "x.y" in ov.modules
    assert ov.first["graph"] == "" and ov.first["node"] == "a"
    m = viz.build_model(_trace(), None, d)
    g = m.graphs[""]
    assert g.nodes["a"]["first"] and g.nodes["a"]["failed"] and g.nodes["a"]["sqnr"] == 3.0
    assert g.nodes["output"]["sqnr"] == 12.5
    assert m.summary["first_site"] == ("", "a")
    html = viz.render_html(m)
    assert 'id="first-divergence-link"' in html
    assert 'class="op-call_module first-divergence"' not in viz.render_dot(m)  # failed too
    assert "first-divergence" in viz.render_dot(m)


def test_numbers_name_their_reference_without_a_browser():
    """The static page and the DOT: every SQNR says what it was measured against."""
    m = viz.build_model(_trace(), None, verify_dict())
    refs = page_data(m)["refs"]
    assert refs["reference"]["tag"] == "HF fp32"
    assert refs["reference"]["short"] == "HF fp32 reference"
    assert "original HF module in float32" in refs["reference"]["long"]
    assert "propagated" in refs["reference"]["long"]
    assert refs["fake_quant"]["short"] == "fake-quant nf4 reference"
    assert "fake-quantized (nf4)" in refs["fake_quant"]["long"]
    html = viz.render_html(m)
    assert "output SQNR vs HF fp32 reference: <b>12.5 dB</b>" in html
    assert 'title="tower output SQNR vs the original HF module in float32' in html
    assert "SQNR vs HF fp32 reference: 0 dB" in html  # the colour legend
    assert ("node comparisons over budget (vs fake-quant nf4 reference / vs HF fp32 reference)"
            in html)
    dot = viz.render_dot(m)
    assert "SQNR 3.0 dB vs HF fp32" in dot
    assert "vs HF fp32 reference: sqnr 3.0 dB" in dot and "fake-quantized (nf4)" in dot
    # without a dtype or quant method the words stay true
    d = verify_dict()
    d.update(dtype=None, quant_method="none", mode="isolated")
    ov = overlay_from_verify(d)
    assert ov.reference_text("reference")["short"] == "HF reference"
    assert ov.reference_text("fake_quant")["tag"] == "fake-quant"
    assert "isolated mode" in ov.reference_text("reference")["long"]


def test_script_json_cannot_close_the_script_element():
    s = script_json({"name": "</script><script>alert(1)</script>", "x": math.inf,
                     "u": "\u2028"})
    assert "</" not in s and "<" not in s and "\u2028" not in s
    assert json.loads(s) == {"name": "</script><script>alert(1)</script>", "x": "inf",
                             "u": "\u2028"}


def test_helpers():
    assert node_name_of("%getattr_1 : [num_users=2] = call_function[...]") == "getattr_1"
    assert node_name_of("garbage") is None
    assert sqnr_color(None) is None and sqnr_color(math.inf) == "#7fd4c1"
    assert sqnr_color(0.0) == "hsl(0,75%,70%)" and sqnr_color(99.0) == "hsl(120,75%,70%)"
    with pytest.raises(fxpass.UsageError):
        viz.build_model(object())
