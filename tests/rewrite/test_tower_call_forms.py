"""Never worse than the walk, on HF towers nobody tuned for: every catalogue tower
(tests/towers/catalogue.py: the four named ones and 60+ others built from shrunk default
configs), rewritten by fxpass.apply with no example inputs (the graphs come from its first
call, as inside vLLM) and called as HF users call it, gives the original's answer within the
unquantized budget, or the original's exception; under bnb nf4 its output is as close to the
original as HF's own code on the same fake-quantized weights."""

from __future__ import annotations

import logging

import pytest
import torch

import call_forms
import catalogue as cat

pytestmark = pytest.mark.usefixtures("vllm_rt")

NF4_GAP_DB = 0.5  # nf4 through fxpass vs the fake-quant reference, output SQNR
MIN_TOWERS = 24
MIN_GRAPH_SITES = 0.95

_results: dict[str, call_forms.Result] = {}
# the sweep's tests and its summary read the same results: one worker under pytest-xdist
SWEEP = pytest.mark.xdist_group("call-forms-sweep")


@pytest.fixture(autouse=True)
def quiet_and_one_thread(caplog):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny towers: one thread is fastest on a shared 2-core box
    caplog.set_level(logging.ERROR, logger="fxpass")
    yield
    torch.set_num_threads(before)


def _result(name: str) -> call_forms.Result:
    if name not in _results:
        _results[name] = call_forms.check(cat.by_name(name))
    return _results[name]


# Towers whose Python code reads a linear's weight values: with no example inputs the linear
# is swapped at init, before any graph shows the read. At the first call it goes back to
# nn.Linear holding the weight it computes with, where that weight can be read back
# (bitsandbytes: dequantized; the nf4 leg passes for these too); unquantized vLLM-CPU
# empties it after loading, so that code raises exactly as after vLLM's walk (never worse).
# apply with example inputs keeps such a linear nn.Linear (test_named_towers_traced_on_
# example_inputs_too).
AS_THE_WALK = {
    "WavLMModel": "attention passes q/k/v weights to F.multi_head_attention_forward",
}


@SWEEP
@pytest.mark.parametrize("name", [t.name for t in cat.TOWERS])
def test_rewritten_tower_answers_every_call_form_as_the_original(name):
    res = _result(name)
    assert res.wrong == [], "\n".join(res.wrong)
    assert bool(res.as_the_walk) == (name in AS_THE_WALK), res.as_the_walk
    assert {"keyword", "positional", "omitted_defaults", "explicit_defaults",
            "submodule"} <= res.forms
    assert res.first_call_ms > 0  # the graphs came from the first call
    # every linear site sits in a graph, or has a reason a person can read
    assert res.graph_sites == res.linears or all(
        len(why) > 20 for why in res.site_reasons.values()), res.site_reasons


FUSED_RTOL = 1e-3  # merged GEMMs / a patch conv as a GEMM: another summation order


@pytest.mark.parametrize("name", [t.name for t in cat.TOWERS])
def test_speed_rules_without_example_inputs_answer_as_the_original(name):
    """vLLM's plugin default: apply(fuse=True) with no example inputs, the fused layers built
    at the first call from the loaded ones; keyword calls at every size and batch give the
    original's answer (fp32, within FUSED_RTOL of its scale) or its exception. Batches of
    two at every size (padded where the catalogue pads): the first call traces the smallest,
    the others meet the graph's decisions (in place, fused) at other shapes."""
    res = call_forms.check(cat.by_name(name), fuse=True, forms={"keyword"}, rtol=FUSED_RTOL,
                           batches=(2,))
    assert res.calls > 0
    assert res.wrong == [], "\n".join(res.wrong)
    assert bool(res.as_the_walk) == (name in AS_THE_WALK), res.as_the_walk


@pytest.mark.parametrize("name", [*cat.NAMED, *AS_THE_WALK])
def test_named_towers_traced_on_example_inputs_too(name):
    """apply with example inputs (traced at once) answers the same call forms."""
    res = call_forms.check(cat.by_name(name), first_call=False)
    assert res.wrong == [], "\n".join(res.wrong)
    assert res.graph_sites == res.linears or all(
        len(why) > 20 for why in res.site_reasons.values()), res.site_reasons


@pytest.mark.parametrize("name", [t.name for t in cat.TOWERS])
def test_nf4_tower_matches_the_fake_quant_reference(name):
    res = call_forms.check_nf4(cat.by_name(name))
    assert "nf4" in res.methods.values(), res.methods
    assert res.error is None, res.error
    assert res.gap_db <= NF4_GAP_DB, (res.sqnr_db, res.fake_quant_db)


@SWEEP
def test_sweep_covers_enough_towers_and_sites():
    """The acceptance bar of the sweep: >= 24 tower classes, >= 95% of linear sites inside
    graphs across them."""
    results = [_result(t.name) for t in cat.TOWERS]
    assert len(results) >= MIN_TOWERS
    # a tower whose first calls all raise the walk's error never gets graphs: not counted
    sites = sum(r.graph_sites for r in results if r.tower not in AS_THE_WALK)
    linears = sum(r.linears for r in results if r.tower not in AS_THE_WALK)
    assert sites >= MIN_GRAPH_SITES * linears, (sites, linears)
