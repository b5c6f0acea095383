"""``fxpass viz`` on the tiny Gemma4 checkpoint: the acceptance command, in-process."""

from __future__ import annotations

import argparse
import re
import shutil

import pytest

from fxpass import zoo
from fxpass.viz import add_cli
from fxpass.viz.cli import main

pytestmark = pytest.mark.usefixtures("vllm_rt")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return zoo.write_tiny_gemma4_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-gemma4")


def _parse(argv):
    parser = argparse.ArgumentParser(prog="fxpass")
    sub = parser.add_subparsers(dest="command", required=True)
    add_cli(sub)
    return parser.parse_args(argv)


def test_viz_nf4_diff_writes_one_offline_page(checkpoint, tmp_path, open_page, capsys):
    out = tmp_path / "g.html"
    args = _parse(["viz", str(checkpoint), "--tower", "model.vision_tower", "--quant",
                   "bnb-nf4", "--diff", "-o", str(out)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "linears -> vLLM" in printed and "verify[" in printed and str(out) in printed
    assert [p.name for p in tmp_path.iterdir()] == ["g.html"]

    o = open_page(out)
    page = o.page
    n = int(page.inner_text("#count-rewritten"))
    assert n == 8  # tiny Gemma4 vision: input_proj + 7 per encoder layer, 1 layer
    assert page.inner_text("#quant-methods") == "nf4"
    assert page.locator("#diff-summary").is_visible()
    # each number says what it is measured against
    assert re.search(r"output SQNR vs HF \w+ reference", page.inner_text("#diff-summary"))
    page.click("#expand-all")
    assert page.locator("g.node.rewritten").count() == n + 1  # and its attention call
    assert page.locator("g.node.has-m").count() >= n  # the overlay coloured them
    assert page.evaluate("document.body.classList.contains('diff-on')")
    assert o.errors == []
    assert [u for u in o.requests if not u.startswith("file://")] == []


def test_viz_dot_format_and_missing_graphviz(checkpoint, tmp_path, monkeypatch, capsys):
    out = tmp_path / "g.dot"
    assert main([str(checkpoint), "--tower", "model.vision_tower", "-o", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("digraph fxpass {")
    # the 8 linears, and the attention call through vLLM's encoder attention
    assert text.count('class="op-call_module rewritten') == 8
    assert text.count('class="op-call_function rewritten') == 1
    # svg without Graphviz: a clear error, before any loading
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    assert main([str(checkpoint), "--tower", "model.vision_tower", "-o",
                 str(tmp_path / "g.svg")]) == 2
    err = capsys.readouterr().err
    assert "Graphviz" in err and "apt-get install graphviz" in err
    assert not (tmp_path / "g.svg").exists()


def test_viz_bad_tower_path_is_a_usage_error(checkpoint, tmp_path, capsys):
    assert main([str(checkpoint), "--tower", "model.nope", "-o", str(tmp_path / "x.html")]) == 2
    assert "model.nope" in capsys.readouterr().err


def test_viz_layout_option_picks_the_engine(checkpoint, tmp_path, monkeypatch):
    """``--layout python`` lays the page out in Python even where Graphviz is installed (and
    overrides $FXPASS_VIZ_LAYOUT); a bad choice is refused by the parser."""
    monkeypatch.setenv("FXPASS_VIZ_LAYOUT", "dot")
    out = tmp_path / "g.html"
    assert main([str(checkpoint), "--tower", "model.vision_tower", "--layout", "python",
                 "-o", str(out)]) == 0
    note = re.search(r'"layout": ?"([^"]*)"', out.read_text())
    assert note is not None and note.group(1).startswith("python"), note
    with pytest.raises(SystemExit):
        _parse(["viz", str(checkpoint), "--tower", "t", "-o", "x.html", "--layout", "neato"])
