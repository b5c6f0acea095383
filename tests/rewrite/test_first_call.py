"""``fxpass.apply`` without example inputs: linears swapped at init, graphs from the first call.

Compared with the original module (unquantized budget), with apply on example inputs (the
same graphs, bit for bit under nf4) and with vLLM's walk (the fixes the walk lacks).
"""

from __future__ import annotations

import copy
import inspect
import logging

import pytest
import torch
from torch import nn

import fxpass
from fxpass import zoo
from fxpass.errors import RewriteError
from fxpass.rewrite import first_call as first_call_mod
from fxpass.rules.base import is_vllm_linear
from fxpass.runtime import installed_graph
from fxpass.weights import bnb_config
from toys import MLP

pytestmark = pytest.mark.usefixtures("vllm_rt")


def _first(out):
    return out if isinstance(out, torch.Tensor) else out[0]


class Block(nn.Module):
    """An HF-style block fxpass's built-in input table does not know."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.proj = nn.Linear(d, 2 * d)
        self.out = nn.Linear(2 * d, d)

    def forward(self, hidden: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        h = self.proj(self.norm(hidden)).to(self.out.weight.dtype)
        return hidden + scale * self.out(torch.nn.functional.gelu(h))


class Tower(nn.Module):
    def __init__(self, d: int = 16, layers: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(d) for _ in range(layers))
        self.head = MLP(d)

    def forward(self, hidden: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        for layer in self.layers:
            hidden = layer(hidden, scale)
        return self.head(hidden)


def _tower() -> Tower:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Tower().eval()


X = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3))


def test_unknown_tower_swaps_at_init_and_traces_at_the_first_call():
    ref = _tower()
    model = copy.deepcopy(ref)
    report = fxpass.apply(model, None, prefix="tower", load_weights=True)
    linears = [n for n, m in ref.named_modules() if isinstance(m, nn.Linear)]
    # at init: every linear is a vLLM layer already (vLLM's loaders fill them), no graphs yet
    assert report.traced_at == "first call" and report.first_call["state"] == "armed"
    assert sorted(report.replaced) == sorted(f"tower.{n}" for n in linears)
    assert all(is_vllm_linear(model.get_submodule(n)) for n in linears)
    assert report.graph_rewrites == [] and "come at the first call" in report.summary_line()
    with torch.no_grad():
        out = model(X)
        torch.testing.assert_close(out, ref(X), atol=1e-5, rtol=0)
    # after the first call: the graphs, the fixes and the timing are in the same report
    assert report.first_call["state"] == "traced"
    assert report.first_call["elapsed_s"] > 0 and report.first_call["graphs"] >= 3
    assert sorted(report.graph_rewrites) == sorted(report.replaced)
    assert [f.detail for f in report.probes] == [
        f"layers.{i}.out.weight.dtype -> torch.float32" for i in (0, 1)]
    assert "graphs traced at the first call" in report.summary_line()
    # later calls: other shapes and argument forms, answered as the original
    with torch.no_grad():
        for x, kw in ((X[:1, :3], {}), (X, {"scale": 0.5}), (torch.randn(3, 7, 16), {})):
            torch.testing.assert_close(model(x, **kw), ref(x, **kw), atol=1e-5, rtol=0)
    assert report.to_dict()["traced_at"] == "first call"


@pytest.mark.parametrize("name", ["gemma4_vision", "gemma4_audio"])
def test_nf4_first_call_matches_apply_on_example_inputs_bit_for_bit(name):
    """The weight-probe fix (vision) and the contiguity fix (audio) already hold for the
    first call: the same graphs as apply on example inputs, the same numbers."""
    tower = zoo.build_tower(name).eval()
    eager = copy.deepcopy(tower)
    x = zoo.example_inputs(tower, size_index=1)
    deferred = fxpass.apply(tower, bnb_config("nf4"), load_weights=True, first_call=True)
    now = fxpass.apply(eager, bnb_config("nf4"), load_weights=True, example_inputs=x)
    with torch.no_grad():
        assert torch.equal(_first(tower(**x)), _first(eager(**x)))
    assert [f.detail for f in deferred.fixes] == [f.detail for f in now.fixes]
    assert deferred.fixes, "the graph fixes came with the first call"
    assert sorted(deferred.graph_rewrites) == sorted(now.graph_rewrites)


def test_audio_tower_runs_unquantized_where_the_walk_fails():
    """Gemma4 audio hands lconv1d.linear_end a transposed input: oneDNN's GEMM rejects it
    after the walk; the first call's graph gives it a .contiguous() first."""
    from vllm.model_executor.models.transformers.utils import recursive_replace_linear

    from fxpass.vllm_plugin import vllm_walk

    ref = zoo.build_tower("gemma4_audio").eval()
    x = zoo.example_inputs(ref, size_index=0)
    walked = copy.deepcopy(ref)
    walk = vllm_walk() if recursive_replace_linear.__module__.startswith("fxpass") else (
        recursive_replace_linear)
    walk(walked, None, prefix="audio_tower")
    _load_like_vllm(walked, ref)
    with pytest.raises(RuntimeError, match="stride"), torch.no_grad():
        walked(**x)
    model = copy.deepcopy(ref)
    report = fxpass.apply(model, None, prefix="audio_tower", load_weights=True,
                          first_call=True)
    with torch.no_grad():
        torch.testing.assert_close(_first(model(**x)), _first(ref(**x)), atol=1e-4, rtol=0)
    assert [f.rule for f in report.contiguity] == ["contiguity"]


def _load_like_vllm(walked: nn.Module, ref: nn.Module) -> None:
    from fxpass.weights import load_linear_weights

    for name, mod in ref.named_modules():
        if isinstance(mod, nn.Linear):
            load_linear_weights(walked.get_submodule(name), mod.weight, mod.bias, None)


def test_a_call_the_model_rejects_raises_its_error_and_stays_armed():
    ref = _tower()
    model = copy.deepcopy(ref)
    report = fxpass.apply(model, None, load_weights=True)
    bad = torch.randn(2, 5, 9)
    with pytest.raises(RuntimeError) as want:
        ref(bad)
    with pytest.raises(RuntimeError) as got:
        model(bad)
    assert str(got.value) == str(want.value)
    assert report.first_call["state"] == "armed"
    assert report.first_call["rejected"]["<root>"].startswith("RuntimeError: ")
    assert report.plain_swaps and all("so far raised (RuntimeError" in why
               for why in report.plain_swaps.values())
    with torch.no_grad():
        torch.testing.assert_close(model(X), ref(X), atol=1e-5, rtol=0)
    assert report.first_call["state"] == "traced"


def test_a_module_that_keeps_rejecting_calls_stops_tracing_each_one(monkeypatch):
    """Two rejected first calls in a row: the next calls run as Python (the same errors, no
    trace each); the first call that runs answers through Python, the one after it traces."""
    ref = _tower()
    model = copy.deepcopy(ref)
    report = fxpass.apply(model, None, load_weights=True)
    traces = []
    real = first_call_mod.FirstCall._trace
    # the root's traces (after it rejects a call, its Python forward reaches the armed
    # blocks inside, whose own first calls are rejected and counted the same way)
    monkeypatch.setattr(first_call_mod.FirstCall, "_trace", lambda self, module, *a: (
        traces.append(1) if module is model else None) or real(self, module, *a))
    bad = torch.randn(2, 5, 9)
    with pytest.raises(RuntimeError) as want:
        ref(bad)
    for _ in range(4):
        with pytest.raises(RuntimeError) as got:
            model(bad)
        assert str(got.value) == str(want.value)
    assert len(traces) == first_call_mod.REJECTIONS_BEFORE_PYTHON
    with torch.no_grad():
        torch.testing.assert_close(model(X), ref(X), atol=1e-5, rtol=0)
        assert installed_graph(model) is None and len(traces) == 2
        torch.testing.assert_close(model(X[:1]), ref(X[:1]), atol=1e-5, rtol=0)
    assert installed_graph(model) is not None and len(traces) == 3
    assert "<root>" in report.first_call["entries"]


def test_a_failing_trace_leaves_the_walks_state_and_says_why(monkeypatch, caplog):
    ref = _tower()
    model = copy.deepcopy(ref)
    report = fxpass.apply(model, None, load_weights=True)

    def boom(ctx):
        raise ValueError("rule exploded")

    monkeypatch.setattr("fxpass.rewrite.session.run_rules", boom)
    with caplog.at_level(logging.WARNING, logger="fxpass"), torch.no_grad():
        torch.testing.assert_close(model(X), ref(X), atol=1e-5, rtol=0)
        torch.testing.assert_close(model(X[:1]), ref(X[:1]), atol=1e-5, rtol=0)
    assert report.first_call["state"] == "python"
    assert report.first_call["error"] == "ValueError: rule exploded"
    assert "tracing the first call failed" in report.summary_line()
    assert not any(installed_graph(m) for m in model.modules())
    warned = [r.getMessage() for r in caplog.records if "first call failed" in r.getMessage()]
    assert len(warned) == 1 and "rule exploded" in warned[0]


def test_strict_raises_when_the_first_call_trace_fails(monkeypatch):
    model = _tower()
    fxpass.apply(model, None, load_weights=True, strict=True)
    monkeypatch.setattr("fxpass.rewrite.session.run_rules",
                        lambda ctx: (_ for _ in ()).throw(ValueError("rule exploded")))
    with pytest.raises(RewriteError, match=r"^fxpass: tracing Tower at its first call failed: "
                                           r"ValueError: rule exploded$"):
        model(X)


def test_no_trace_inside_dynamo_or_capture(monkeypatch):
    """A first call that must not trace (dynamo, CUDA-graph capture) runs Python; the next
    one traces."""
    ref = _tower()
    model = copy.deepcopy(ref)
    report = fxpass.apply(model, None, load_weights=True)
    monkeypatch.setattr(first_call_mod, "why_no_trace", lambda: "torch.compile is tracing it")
    with torch.no_grad():
        torch.testing.assert_close(model(X), ref(X), atol=1e-5, rtol=0)
    assert report.first_call["state"] == "armed"
    monkeypatch.setattr(first_call_mod, "why_no_trace", lambda: None)
    with torch.no_grad():
        torch.testing.assert_close(model(X), ref(X), atol=1e-5, rtol=0)
    assert report.first_call["state"] == "traced"


def test_callback_runs_once_and_apply_again_changes_nothing():
    model = _tower()
    seen = []
    report = fxpass.apply(model, None, load_weights=True, on_first_call=seen.append)
    again = fxpass.apply(model, None)
    assert again.already_applied and again.replaced == []
    with torch.no_grad():
        model(X)
        model(X)
    assert seen == [report]
    assert fxpass.apply(model, None).already_applied


def test_armed_model_keeps_its_signature_and_copies_trace_on_their_own():
    ref = _tower()
    model = copy.deepcopy(ref)
    fxpass.apply(model, None, load_weights=True)
    assert inspect.signature(model.forward) == inspect.signature(ref.forward)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(twin(X[:1]), ref(X[:1]), atol=1e-5, rtol=0)
        torch.testing.assert_close(model(X), ref(X), atol=1e-5, rtol=0)
    assert installed_graph(twin.layers[0]) is not None
    assert installed_graph(model.layers[0]) is not None
    assert inspect.signature(model.layers[0].forward) == inspect.signature(
        ref.layers[0].forward)


def test_torch_multihead_attention_out_proj_stays_nn_linear_at_init():
    class Pool(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.proj = nn.Linear(16, 16)

        def forward(self, x):
            return self.proj(self.attn(x, x, x, need_weights=False)[0])

    torch.manual_seed(0)
    ref = Pool().eval()
    model = copy.deepcopy(ref)
    report = fxpass.apply(model, None, load_weights=True)
    assert isinstance(model.attn.out_proj, nn.Linear) and is_vllm_linear(model.proj)
    assert "nn.MultiheadAttention" in report.skipped["attn.out_proj"]
    with torch.no_grad():
        torch.testing.assert_close(model(X), ref(X), atol=1e-5, rtol=0)


def test_a_graph_reading_a_swapped_layers_values_stays_python():
    """Known only from the graph, after the swap: that module runs as the walk leaves it."""

    class Reads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Linear(16, 16)
            self.k = nn.Linear(16, 16, bias=False)

        def forward(self, x):
            bias = torch.cat([self.q.bias, torch.zeros_like(self.q.bias)])
            return self.k(x) + self.q(x) + bias[:16]

    torch.manual_seed(0)
    ref = Reads().eval()
    model = copy.deepcopy(ref)
    report = fxpass.apply(model, None, load_weights=True)
    with torch.no_grad():
        torch.testing.assert_close(model(X), ref(X), atol=1e-5, rtol=0)
    assert "reads the values of q.bias" in report.untraced[""]
    assert set(report.plain_swaps) == {"q", "k"}


def _vllm_vision_call(tower, x):
    """How vLLM's gemma4_mm runs the vision tower: patch_embedder, then encoder, never the
    root (vllm/model_executor/models/gemma4_mm.py)."""
    pv, pp = x["pixel_values"], x["pixel_position_ids"]
    pad = (pp == -1).all(dim=-1)
    emb = tower.patch_embedder(pv, pp, pad)
    out = tower.encoder(inputs_embeds=emb, attention_mask=~pad, pixel_position_ids=pp)
    return out.last_hidden_state


def test_parts_called_directly_are_traced_at_their_own_first_call():
    ref = zoo.build_tower("gemma4_vision").eval()
    model = copy.deepcopy(ref)
    report = fxpass.apply(model, bnb_config("nf4"), prefix="vision_tower", load_weights=True,
                          first_call=True)
    eager = copy.deepcopy(ref)
    x = zoo.example_inputs(ref, size_index=1)
    now = fxpass.apply(eager, bnb_config("nf4"), prefix="vision_tower", load_weights=True,
                       example_inputs=x)
    with torch.no_grad():
        got = _vllm_vision_call(model, x)
        # the same graphs as apply on example inputs gives these parts: the same numbers
        assert torch.equal(got, _vllm_vision_call(eager, x))
    assert set(report.first_call["entries"]) == {"patch_embedder", "encoder"}
    assert installed_graph(model.patch_embedder) is not None
    assert installed_graph(model.encoder.layers[0].self_attn) is not None
    assert installed_graph(model) is None  # the root was never called
    assert sorted(report.graph_rewrites) == sorted(now.graph_rewrites)
    assert [f.detail for f in report.probes] == [
        "patch_embedder.input_proj.weight.dtype -> torch.float32"]
    # the root called later traces with its whole subtree: the same answer as apply's graphs
    x2 = zoo.example_inputs(ref, size_index=2, batch=2)
    with torch.no_grad():
        assert torch.equal(_first(model(**x2)), _first(eager(**x2)))
    assert set(report.first_call["entries"]) == {"patch_embedder", "encoder", "<root>"}
    assert [f.detail for f in report.probes] == [
        "patch_embedder.input_proj.weight.dtype -> torch.float32"]


class DataDependentEmbed(nn.Module):
    """Siglip2-style: a module that stays Python (a data-dependent branch) and reads its
    linear's weight dtype itself."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Linear(16, 16)
        self.out = nn.Linear(16, 16)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: no graph for this module
            x = x * 1.0
        return self.out(torch.relu(self.patch(x.to(self.patch.weight.dtype))))


def test_a_weight_read_by_python_goes_back_to_nn_linear_under_nf4():
    """Swapped at init, read by Python code the first call shows: back to nn.Linear holding
    its dequantized nf4 weight (the fake-quant numerics), not vLLM's packed uint8."""
    from fxpass.verify import fake_quant_reference

    torch.manual_seed(0)
    ref = DataDependentEmbed().eval()
    model = copy.deepcopy(ref)
    report = fxpass.apply(model, bnb_config("nf4"), prefix="t", load_weights=True)
    fake = fake_quant_reference(ref, {"patch": "nf4", "out": "nf4"})
    x = torch.randn(4, 16)
    with torch.no_grad():
        got = model(x.abs())
        torch.testing.assert_close(got, fake(x.abs()), atol=2e-2, rtol=0)
    assert type(model.patch) is nn.Linear and is_vllm_linear(model.out)
    assert "reads .weight off it" in report.skipped["t.patch"]
    assert "back to nn.Linear at the first call" in report.skipped["t.patch"]
    assert report.replaced == ["t.out"]


def test_torch_compile_of_an_armed_tower_traces_outside_dynamo_then_compiles_the_graphs():
    ref = _tower()
    model = copy.deepcopy(ref)
    report = fxpass.apply(model, None, load_weights=True)
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(X), ref(X), atol=1e-5, rtol=0)
        assert report.first_call["state"] == "traced"
        assert installed_graph(model.layers[0]) is not None
        torch.testing.assert_close(compiled(X), ref(X), atol=1e-5, rtol=0)
    assert report.runtime.fallbacks == {}
