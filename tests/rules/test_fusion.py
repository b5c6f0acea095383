"""Sibling-linear fusion (apply(fuse=True)): exact where it fuses, refused with a reason where not."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModel

import fxpass
from numerics import first as _first
from numerics import sqnr_db as _sqnr
from fxpass.rules.fusion import FusedSlice
from fxpass import zoo
from fxpass.weights import bnb_config, load_checkpoint

pytestmark = pytest.mark.usefixtures("vllm_rt")



def _unclipped_gemma4_vision(dtype=torch.float32):
    cfg = zoo.tower_config("gemma4_vision")
    cfg.use_clipped_linears = False
    torch.manual_seed(0)
    return AutoModel.from_config(cfg).to(dtype).eval()


def _towers():
    return {
        "siglip_vision": (lambda dt: zoo.build_tower("siglip_vision", dtype=dt), 1),
        "clip_vision": (lambda dt: zoo.build_tower("clip_vision", dtype=dt), 1),
        "gemma4_vision_unclipped": (_unclipped_gemma4_vision, 0),
    }


@pytest.mark.parametrize("name", list(_towers()))
def test_fused_unquantized_matches_original(name):
    build, size = _towers()[name]
    tower = build(torch.float32)
    ref = copy.deepcopy(tower)
    report = fxpass.apply(tower, None, prefix="t", load_weights=True, fuse=True,
                          example_inputs=zoo.example_inputs(tower, size_index=size))
    assert report.fused, report
    assert all(len(m) >= 2 for m in report.fused.values())
    assert sorted(report.replaced) == sorted(
        f"t.{n}" for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear)
        and n != "head.attention.out_proj")
    with torch.no_grad():
        for s in (size, size + 1):
            x = zoo.example_inputs(ref, size_index=s, seed=5)
            torch.testing.assert_close(_first(tower(**x)), _first(ref(**x)), atol=1e-4, rtol=0)


@pytest.mark.parametrize("traced_at", ["apply", "first call"])
def test_gemma4_thin_wrappers_fuse_qkv_and_gate_up(traced_at):
    """Traced on example inputs, the fused layers are planned at apply; without, they are
    built at the first call from the loaded vLLM layers (what vLLM's plugin does)."""
    tower = _unclipped_gemma4_vision()
    ref = copy.deepcopy(tower)
    x = zoo.example_inputs(ref)
    report = fxpass.apply(tower, None, load_weights=True, fuse=True,
                          example_inputs=x if traced_at == "apply" else None)
    assert report.traced_at == traced_at
    with torch.no_grad():
        torch.testing.assert_close(_first(tower(**x)), _first(ref(**x)), atol=1e-4, rtol=0)
    groups = sorted(tuple(n.rsplit(".", 2)[-2] for n in m) for m in report.fused.values())
    assert ("gate_proj", "up_proj") in groups and ("q_proj", "k_proj", "v_proj") in groups
    attn = tower.encoder.layers[0].self_attn
    assert isinstance(attn.q_proj, FusedSlice) and hasattr(attn, "fused__q_proj__k_proj__v_proj")


@pytest.mark.parametrize("name", ["siglip_vision", "gemma4_vision_unclipped"])
def test_fused_nf4_equals_unfused_nf4(name):
    build, size = _towers()[name]
    x = zoo.example_inputs(build(torch.bfloat16), size_index=size + 1, seed=2)
    outs = {}
    for fuse in (False, True):
        tower = build(torch.bfloat16)
        fxpass.apply(tower, bnb_config("nf4"), load_weights=True, fuse=fuse,
                     example_inputs=zoo.example_inputs(tower, size_index=size))
        with torch.no_grad():
            outs[fuse] = _first(tower(**x))
    # One quant state per shard: the fused layer holds the same 4-bit weights as the members.
    assert _sqnr(outs[False], outs[True]) >= 40.0


def test_clipped_wrappers_are_refused_with_reason():
    tower = zoo.build_tower("gemma4_vision")  # tiny config: clipping on, active bounds
    report = fxpass.apply(tower, None, load_weights=True, fuse=True,
                          example_inputs=zoo.example_inputs(tower))
    assert not report.fused
    reasons = [r["reason"] for r in report.refusals if r["rule"] == "fusion"]
    assert reasons and all("clamp" in r and "per-layer" in r for r in reasons)


def test_checkpoint_with_original_names_loads_into_fused_layers():
    ref = zoo.build_tower("clip_vision")
    state = ref.state_dict()
    fresh = zoo.build_tower("clip_vision", seed=123)  # other weights: the load must overwrite them
    x = zoo.example_inputs(fresh, size_index=1)
    report = fxpass.apply(fresh, None, prefix="vision", fuse=True, example_inputs=x)
    fused = {k.removeprefix("vision."): [m.removeprefix("vision.") for m in v]
             for k, v in report.fused.items()}
    leftover = load_checkpoint(fresh, state, None, fused=fused)
    assert leftover == []
    with torch.no_grad():
        torch.testing.assert_close(_first(fresh(**x)), _first(ref(**x)), atol=1e-4, rtol=0)


def test_elementwise_ops_on_dead_fresh_inputs_go_in_place():
    tower = _unclipped_gemma4_vision()
    ref = copy.deepcopy(tower)
    report = fxpass.apply(tower, None, load_weights=True, fuse=True,
                          example_inputs=zoo.example_inputs(tower))
    inplace = [f for f in report.fixes if f.rule == "elementwise"]
    assert any("mul -> in-place .mul_()" in f.detail for f in inplace), report
    with torch.no_grad():
        for s in (0, 1, 2):
            x = zoo.example_inputs(ref, size_index=s)
            torch.testing.assert_close(_first(tower(**x)), _first(ref(**x)), atol=1e-4, rtol=0)
    # never on a module input or a view: the residual adds read the layer input
    attn_layer = report.fixes
    assert all("placeholder" not in f.node for f in attn_layer if f.rule == "elementwise")


class _Residual(nn.Module):
    def __init__(self, op) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.op = op

    def forward(self, x):
        return self.op(x, self.proj(x))  # residual (a module input) op fresh GEMM output


@pytest.mark.parametrize("op, inplace", [(torch.add, True), (torch.mul, True),
                                         (torch.sub, False)], ids=["add", "mul", "sub"])
def test_commutative_ops_go_in_place_on_a_fresh_right_operand(op, inplace):
    torch.manual_seed(0)
    m = _Residual(op).eval()
    ref = copy.deepcopy(m)
    plain = copy.deepcopy(m)
    x = torch.randn(2, 3, 8)
    report = fxpass.apply(m, None, load_weights=True, fuse=True, example_inputs=(x,))
    fxpass.apply(plain, None, load_weights=True, example_inputs=(x,))  # same GEMM, no fuse
    right = [f for f in report.fixes if f.rule == "elementwise" and "dead right input" in f.detail]
    assert bool(right) is inplace, report
    keep = x.clone()
    with torch.no_grad():
        assert torch.equal(m(x), plain(x))  # add and mul commute bit for bit
        torch.testing.assert_close(m(x), ref(x))
    assert torch.equal(x, keep)  # the module input is never written


def test_siglip_residual_adds_go_in_place_on_the_sublayer_output():
    """``residual + self_attn(...)[0]``: freshness is followed through the tuple item."""
    tower = zoo.build_tower("siglip_vision")
    ref = copy.deepcopy(tower)
    report = fxpass.apply(tower, None, load_weights=True, fuse=True,
                          example_inputs=zoo.example_inputs(tower))
    right = [f for f in report.fixes if f.rule == "elementwise" and "dead right input" in f.detail]
    assert {f.module.rsplit(".", 1)[-1] for f in right} >= {"0", "1"}, report
    with torch.no_grad():
        for s in (0, 1):
            x = zoo.example_inputs(ref, size_index=s)
            torch.testing.assert_close(_first(tower(**x)), _first(ref(**x)), atol=1e-4, rtol=0)


class _Broadcast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(1, 3, 8))
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return x + self.proj(self.table)  # (1, 3, 8): the result's shape only at batch 1


def test_in_place_on_the_right_operand_is_checked_per_call():
    torch.manual_seed(0)
    m = _Broadcast().eval()
    ref = copy.deepcopy(m)
    report = fxpass.apply(m, None, load_weights=True, fuse=True,
                          example_inputs=(torch.randn(1, 3, 8),))
    assert any("dead right input" in f.detail for f in report.fixes if f.rule == "elementwise")
    with torch.no_grad():
        for batch in (1, 2):  # batch 2 broadcasts the right operand: out of place
            x = torch.randn(batch, 3, 8)
            torch.testing.assert_close(m(x), ref(x))


def test_a_graph_traced_after_apply_calls_the_merged_layer_once():
    """The module's Python calls its fused members by name (FusedSlices, each running the
    whole merged GEMM); a graph traced for a new call regroups them: one merged call."""
    from fxpass.runtime import installed_graph

    tower = _unclipped_gemma4_vision()
    ref = copy.deepcopy(tower)
    report = fxpass.apply(tower, None, load_weights=True, fuse=True,
                          example_inputs=zoo.example_inputs(tower))
    assert report.fused
    attn, ref_attn = tower.encoder.layers[0].self_attn, ref.encoder.layers[0].self_attn
    x = zoo.example_inputs(ref)
    captured = {}
    hook = ref_attn.register_forward_pre_hook(
        lambda m, a, kw: captured.update(kw), with_kwargs=True)
    with torch.no_grad():
        ref(**x)
    hook.remove()
    n = captured["hidden_states"].shape[1]
    mask = torch.ones(1, 1, n, n, dtype=torch.bool)  # traced without a mask: a new graph
    call = {**captured, "attention_mask": mask}
    with torch.no_grad():
        got, want = attn(**call)[0], ref_attn(**call)[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    variant = installed_graph(attn).family.variants[-1]
    assert "fused__q_proj__k_proj__v_proj" in variant.src
    assert "self.q_proj(" not in variant.src and "self.k_proj(" not in variant.src


class _Modulator(nn.Module):
    """FocalNet's pattern: a fresh GEMM output times a map it broadcasts against when the
    map is larger than at the traced call."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x, grid):
        return self.proj(x) * grid  # (b, 1, 8) * (b, s, 8)


def test_in_place_on_the_left_operand_checks_each_call_for_broadcasting():
    torch.manual_seed(0)
    m = _Modulator().eval()
    ref = copy.deepcopy(m)
    x = torch.randn(2, 1, 8)
    report = fxpass.apply(m, None, load_weights=True, fuse=True,
                          example_inputs=(x, torch.randn(2, 1, 8)))
    assert any("in-place .mul_() on a dead left input" in f.detail for f in report.fixes), report
    with torch.no_grad():
        for s in (1, 3):  # s=3: the left operand broadcasts up, so out of place
            grid = torch.randn(2, s, 8)
            torch.testing.assert_close(m(x, grid), ref(x, grid))
