"""``fxpass.verify`` compares the candidate's real calls, not the calls its tracer makes: a
module traced during verify (at its first call, or again for a call its graph does not
cover) runs its submodules eagerly while tracing, then computes the call through the new
graph. Only the latter is paired with the reference's calls (fxpass/verify/compare.py
``_Tap``); before, the traced calls took the reference's call numbers and the real ones
were listed as ``candidate_only`` and never compared.
"""

from __future__ import annotations

import collections
import copy

import pytest
from torch import nn

import fxpass
from fxpass import zoo
from fxpass.verify import verify

SIZES = (0, 1, 2)  # size 1 has padding: Gemma4 vision's attention is traced again for it


@pytest.fixture(scope="module")
def tower():
    ref = zoo.build_tower("gemma4_vision")
    return ref, [zoo.example_inputs(ref, size_index=s, seed=s) for s in SIZES]


@pytest.mark.parametrize("traced_at", ["first call", "apply"])
def test_every_input_compares_the_real_calls(tower, vllm_rt, traced_at):
    ref, inputs = tower
    cand = copy.deepcopy(ref)
    fxpass.apply(cand, load_weights=True,
                 example_inputs=inputs[0] if traced_at == "apply" else None)
    report = verify(ref, cand, inputs, progress=False)
    assert report.passed, report.format()
    assert report.candidate_only == [] and report.reference_only == []
    # vLLM's encoder attention where HF calls SDPA: compared through its attention module
    layers = range(ref.config.num_hidden_layers)
    assert report.covered == {f"encoder.layers.{i}.self_attn.attn": f"encoder.layers.{i}.self_attn"
                              for i in layers}
    compared = collections.defaultdict(set)
    for n in report.nodes:
        compared[n.input].add(n.module)
    # every submodule runs once here (the layers' ModuleList is never called)
    modules = {p for p, m in ref.named_modules() if p and not isinstance(m, nn.ModuleList)}
    assert [compared[i] for i in range(len(SIZES))] == [modules] * len(SIZES)
    attn = [n for n in report.nodes if n.module == "encoder.layers.0.self_attn"]
    assert [n.input for n in attn] == list(range(len(SIZES)))
    assert all(n.metrics["reference"].max_abs < 1e-4 for n in attn)
