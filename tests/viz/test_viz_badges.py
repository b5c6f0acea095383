"""Every number on the page says what it was measured against (in a real Chromium)."""

from __future__ import annotations

import re

import pytest

import fxpass.viz as viz

from test_viz_model import _trace, verify_dict

HF = "original HF module"


def check_badges(page, *, fake_quant: bool) -> None:
    """The page's numeric badges, open and hovered, name their reference."""
    refs = {"HF fp32 reference"} | ({"fake-quant nf4 reference"} if fake_quant else set())
    # the header: tower output SQNR, budget counts, the colour legend
    summ = page.inner_text("#diff-summary")
    assert "output SQNR vs HF fp32 reference" in summ
    for el in page.locator("#diff-summary .metric").all():
        assert any(f"vs {r}" in el.inner_text() for r in refs), el.inner_text()
        assert HF in el.get_attribute("title")
    legend = page.locator(".legend")
    assert "SQNR vs HF fp32 reference" in legend.inner_text()
    assert HF in legend.get_attribute("title")
    page.click("#expand-all")
    # module rows: the lowest SQNR under a module, and what is over budget
    sq = page.locator(".mod-head .b-sq")
    assert sq.count() > 0
    for el in sq.all():
        assert re.fullmatch(r"min SQNR (-?[\d.]+ dB|exact) vs HF fp32", el.inner_text()), el.inner_text()
        assert el.get_attribute("title").startswith(f"lowest SQNR in this subtree vs the {HF}")
    for el in page.locator(".mod-head .b-fail").all():
        assert HF in el.get_attribute("title")
        if fake_quant:
            assert "fake-quantized (nf4)" in el.get_attribute("title")
    for el in page.locator(".modnote.metric").all():
        assert "vs HF fp32 reference" in el.inner_text() and HF in el.get_attribute("title")
    # node boxes: the SQNR on the box, with the reference, and its title
    boxes = page.locator("svg[data-view=after] g.node.has-m")
    texts = page.locator("svg[data-view=after] g.node text.sq")
    assert texts.count() > 0 and texts.count() <= boxes.count()
    for el in texts.all():
        t = el.evaluate("e => e.firstChild.textContent")
        assert re.fullmatch(r"SQNR (-?[\d.]+ dB|exact|nan) vs HF fp32", t), t
        assert HF in el.evaluate("e => e.querySelector('title').textContent")
    # everything that carries a reference name carries a real one
    for ref in page.locator("[data-ref]").evaluate_all("els => els.map(e => e.getAttribute('data-ref'))"):
        assert set(ref.split()) <= {"reference", "fake_quant"}, ref
    # the hover: each metrics column names its reference, and the references are explained
    texts.first.evaluate("e => e.closest('g.node').dispatchEvent(new MouseEvent('mouseover', {bubbles: true}))")
    tip = page.inner_text("#tip")
    assert "lowest SQNR" in tip and "vs HF fp32 reference" in tip
    heads = page.locator("#tip th[data-ref]").all_inner_texts()
    assert heads and all(h.startswith("vs ") for h in heads)
    assert {r for r in refs if any(h.startswith(f"vs {r}") for h in heads)} == refs
    assert f"vs HF fp32 reference: the {HF} in float32" in tip


def test_badges_name_their_reference_on_a_small_graph(open_page, tmp_path):
    """A VerifyReport dict (nf4 over fp32) on a two-linear graph: no vLLM needed."""
    m = viz.build_model(_trace(), None, verify_dict())
    path = tmp_path / "two.html"
    path.write_text(viz.render_html(m), encoding="utf-8")
    o = open_page(path)
    check_badges(o.page, fake_quant=True)
    assert o.errors == []


@pytest.mark.usefixtures("vllm_rt")
def test_badges_name_their_reference_on_gemma4_nf4(gemma_case, open_page):
    """The tiny Gemma4 vision tower in nf4, verified against the fp32 HF module and the
    fake-quant one: every badge of the page names one of the two."""
    assert set(gemma_case.verify.references) == {"fake_quant", "reference"}
    o = open_page(gemma_case.html)
    check_badges(o.page, fake_quant=True)
    assert o.errors == []
