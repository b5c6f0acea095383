"""Fixtures for the viz tests: applied towers (with verify) and a real headless Chromium.

The browser is Debian's /usr/bin/chromium driven by playwright's Python client (its own
driver, no browser download); tools/setup.sh installs both.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import pytest

import fxpass
import fxpass.viz as viz
from fxpass import zoo

sys.path.insert(0, str(Path(__file__).parent))
from viz_toys import Toy, toy_inputs  # noqa: E402

CHROMIUM = os.environ.get("FXPASS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


@dataclasses.dataclass
class Case:
    trace: Any
    report: Any
    verify: Any
    before: Any
    html: Path
    model: Any


def _budget(**kw: Any) -> Any:
    from fxpass.verify import Budget

    return Budget(**kw)


@pytest.fixture(scope="session")
def gemma_case(vllm_rt, tmp_path_factory) -> Case:
    """Tiny Gemma4 vision tower, nf4, with verify. The per-layer SQNR floor (14 dB) is set
    above what nf4 gives on this tower (~11-13 dB at the attention projections), so the
    report has failures and a first divergence for the overlay to show."""
    tower = zoo.build_tower("gemma4_vision")
    ref = copy.deepcopy(tower)
    x = zoo.example_inputs(tower, size_index=0)
    tr = fxpass.trace(tower, x, cache=None)
    before = viz.snapshot(tr)
    from fxpass.weights import bnb_config

    report = fxpass.apply(tower, bnb_config("nf4"), prefix="vision_tower", load_weights=True,
                          trace_result=tr)
    v = fxpass.verify(ref, tower, x, budget=_budget(
        dtype="float32", method="nf4", exact_sqnr_db=20.0, layer_sqnr_db=14.0,
        output_sqnr_db=9.0))
    model = viz.build_model(tr, report, v, before)
    path = tmp_path_factory.mktemp("viz") / "gemma4_vision.html"
    path.write_text(viz.render_html(model), encoding="utf-8")
    return Case(tr, report, v, before, path, model)


@pytest.fixture(scope="session")
def gemma_trace():
    """The tiny Gemma4 vision tower traced (no apply, no vLLM): the real graphs the layout
    and folding tests measure."""
    tower = zoo.build_tower("gemma4_vision")
    return fxpass.trace(tower, zoo.example_inputs(tower, size_index=0), cache=None)


@pytest.fixture(scope="session")
def toy_case(vllm_rt, tmp_path_factory) -> Case:
    """The hostile toy: XSS module name, HTML in an untraced reason and in the prefix."""
    m = Toy().eval()
    ref = copy.deepcopy(m)
    x = toy_inputs()
    tr = fxpass.trace(m, x, cache=None)
    before = viz.snapshot(tr)
    report = fxpass.apply(m, None, prefix="<i>p</i>", load_weights=True, trace_result=tr)
    v = fxpass.verify(ref, m, [x], budget=_budget(atol=1e-4, rtol=0.0))
    model = viz.build_model(tr, report, v, before, title="<svg onload=alert(4)> toy")
    path = tmp_path_factory.mktemp("viz") / "toy.html"
    path.write_text(viz.render_html(model), encoding="utf-8")
    return Case(tr, report, v, before, path, model)


@pytest.fixture(scope="session")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: tools/setup.sh installs Debian's chromium "
                    "(apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Opened:
    """A page with what it reported: JS errors, dialogs, network requests."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.requests: list[str] = []


@pytest.fixture
def open_page(browser):
    contexts = []

    def _open(path: Path, *, width: int = 1400, height: int = 1000) -> Opened:
        ctx = browser.new_context(viewport={"width": width, "height": height})
        contexts.append(ctx)
        page = ctx.new_page()
        o = Opened(page)
        page.on("console", lambda m: o.errors.append(f"console.{m.type}: {m.text}")
                if m.type == "error" else None)
        page.on("pageerror", lambda e: o.errors.append(f"pageerror: {e}"))

        def on_dialog(d: Any) -> None:
            o.dialogs.append(d.message)
            d.dismiss()

        page.on("dialog", on_dialog)
        page.on("request", lambda r: o.requests.append(r.url))
        page.goto(path.resolve().as_uri())
        page.wait_for_function("window.__fxpassReady", timeout=10_000)
        return o

    yield _open
    for ctx in contexts:
        ctx.close()
