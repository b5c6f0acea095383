"""Shape bookkeeping (size reads, ints out of sizes, len, int arithmetic, guards) folded out
of the default view, one click from being drawn; no data node ever folded."""

from __future__ import annotations

import re

import torch
import torch.fx as fx
from torch import nn

import fxpass
import fxpass.viz as viz
from fxpass import meta

DATA_OPS = ("placeholder", "get_attr", "call_module", "output")


def _drawn_by_default(g) -> set[str]:
    fold = g.graph.get("fold")
    return set(fold["pos"]) if fold is not None else set(g.nodes)


def test_shape_bookkeeping_is_folded_and_no_data_node_is(gemma_trace):
    m = viz.build_model(gemma_trace, layout="python")
    folded_kinds: set[str] = set()
    total = 0
    for q, g in m.graphs.items():
        fx_nodes = {n.name: n for n in gemma_trace.graphs[q].graph.nodes}
        shown = _drawn_by_default(g)
        for n, d in g.nodes(data=True):
            node = fx_nodes[n]
            info = node.meta.get(meta.KEY, {})
            if not d["shape_op"]:
                assert n in shown, (q, n)
                continue
            total += 1
            assert n not in shown, (q, n)
            # bookkeeping: a call computing no tensor, from shapes / dtypes / constants only
            assert node.op in ("call_function", "call_method"), (q, n)
            assert "tensor" not in info, (q, n)
            assert info.get("static") or info.get("guard"), (q, n)
            assert "Tensor" not in str(info.get("pytype")), (q, n)  # ints, sizes, dtypes...
            host = d.get("host")
            if host is not None:  # folded into a drawn node, which lists it
                assert not g.nodes[host]["shape_op"] and n in g.nodes[host]["folded"]
            folded_kinds.add(d["target"].rsplit(".", 1)[-1])
        # every data node is drawn: a tensor value, an input, an attribute, a call, the output
        for n, node in fx_nodes.items():
            if "tensor" in node.meta.get(meta.KEY, {}) or node.op in DATA_OPS:
                assert n in shown, (q, n)
    # the attention graph is mostly bookkeeping; the kinds the issue names are among it
    attn = m.graphs["encoder.layers.0.self_attn"]
    assert sum(1 for _, d in attn.nodes(data=True) if d["shape_op"]) >= 40
    assert {"getattr", "getitem", "len", "guard", "floordiv", "mul"} <= folded_kinds, folded_kinds
    assert m.summary["shape_ops"] == total
    # the full view still holds every node, with its own layout
    for g in m.graphs.values():
        assert all("x" in d and "y" in d for _, d in g.nodes(data=True))


class _Reshape(nn.Module):
    def forward(self, x):
        b = x.size(0)
        n = x.shape[1] * x.shape[2]
        return torch.relu(x.reshape(b, n)) + x.dim()


def test_plain_fx_graphs_fold_by_target():
    """A graph without fxpass's annotations (plain torch.fx, passed as a before graph):
    size reads, ints out of them and arithmetic on them fold; tensor ops do not."""
    x = torch.randn(2, 3, 4)
    tr = fxpass.trace(_Reshape(), (x,), cache=None)
    plain = fx.symbolic_trace(_Reshape()).graph
    m = viz.build_model(tr, before={"": plain}, layout="python")
    g = m.before[""]
    shape = {n for n, d in g.nodes(data=True) if d["shape_op"]}
    data = {n for n, d in g.nodes(data=True) if not d["shape_op"]}
    assert {"size", "getattr_1", "getitem", "mul"} <= shape, shape
    assert {"x", "reshape", "relu", "add", "output"} <= data, data
    # the traced graph (annotated) folds the same kinds
    a = m.graphs[""]
    assert {n for n, d in a.nodes(data=True) if d["op"] in DATA_OPS or d["tensor"]} \
        <= _drawn_by_default(a)


def test_markings_are_never_folded():
    """A shape read the page has something to say about (a fix, a removal) stays drawn."""
    d = {"op": "call_function", "target": "builtins.getattr", "attr": "dtype", "static": True,
         "annotated": True, "tensor": None}
    assert viz.model.is_shape_op(d)
    for mark in ("fixes", "removed", "inserted_by", "metrics", "rewrite"):
        assert not viz.model.is_shape_op({**d, mark: [{"rule": "x"}]})
    assert not viz.model.is_shape_op({**d, "tensor": {"shape": [2]}})
    assert not viz.model.is_shape_op({**d, "op": "placeholder"})


def test_default_view_hides_shape_bookkeeping_and_the_toggle_shows_it(gemma_trace, open_page,
                                                                      tmp_path):
    m = viz.build_model(gemma_trace)
    path = tmp_path / "gemma4_trace.html"
    path.write_text(viz.render_html(m), encoding="utf-8")
    q = "encoder.layers.0.self_attn"
    g = m.graphs[q]
    shape = {n for n, d in g.nodes(data=True) if d["shape_op"]}
    hosted = sum(1 for n in shape if g.nodes[n].get("host") is not None)
    o = open_page(path)
    page = o.page
    page.fill("#search", q)
    page.press("#search", "Enter")
    panel = f"#mod-{m.rows().index(q)} > .mod-body > .graphs"
    nodes = page.locator(f"{panel} g.node")
    assert page.locator(f"{panel} svg").get_attribute("data-shapes") == "folded"
    assert nodes.count() == g.number_of_nodes() - len(shape)
    assert page.locator(f"{panel} g.node.shape-op").count() == 0
    drawn = set(nodes.evaluate_all("els => els.map(e => e.getAttribute('data-node'))"))
    assert drawn == set(g.nodes) - shape
    assert {n for n, d in g.nodes(data=True) if d["tensor"]} <= drawn
    # the consumers carry the count: "+N shape" tabs add up to what was folded into them
    tabs = page.locator(f"{panel} g.fold text").all_text_contents()
    assert tabs and sum(int(re.match(r"\+(\d+) shape", t).group(1)) for t in tabs) == hosted
    assert f"({len(shape)} shape bookkeeping folded)" in page.inner_text(f"{panel} .panel-title")
    host = next(n for n in g.nodes if g.nodes[n].get("folded"))
    page.locator(f"{panel} g.node[data-node='{host}']").hover()
    tip = page.inner_text("#tip")
    assert "shape bookkeeping" in tip and g.nodes[host]["folded"][0] in tip
    # the toggle draws every node, the bookkeeping marked as such
    page.click("#shape-toggle")
    assert page.locator(f"{panel} svg").get_attribute("data-shapes") == "shown"
    assert nodes.count() == g.number_of_nodes()
    assert page.locator(f"{panel} g.node.shape-op").count() == len(shape)
    assert page.locator(f"{panel} g.fold").count() == 0
    page.click("#shape-toggle")
    assert nodes.count() == g.number_of_nodes() - len(shape)
    assert o.errors == []
