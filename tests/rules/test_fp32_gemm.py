"""Rule fp32-gemm: half-precision vLLM-CPU GEMMs in fp32 where this machine does that faster.

The decision is a measurement (machines differ: AMX keeps bf16); the tests force it either
way through ``decide`` and check what each way computes against the HF module.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import fxpass
from numerics import first as _first
from numerics import sqnr_db as _sqnr
from fxpass import zoo
from fxpass.layers import is_vllm_linear
from fxpass.rules import fp32_gemm
from fxpass.rules.fp32_gemm import Fp32Gemm

pytestmark = pytest.mark.usefixtures("vllm_rt")



@pytest.fixture
def fp32_faster(monkeypatch):
    """Force the measurement's answer (and forget decisions other tests cached)."""

    def force(answer: bool) -> None:
        monkeypatch.setattr(fp32_gemm, "_DECISIONS", {})
        monkeypatch.setattr(fp32_gemm, "decide", lambda layer, w32: (answer, 2e-3, 1e-3))

    return force


def _kernels(tower):
    out = {}
    for n, m in tower.named_modules():
        if is_vllm_linear(m):
            gemm = m.__dict__.get("cpu_linear")
            out[n] = gemm.gemm if hasattr(gemm, "gemm") else gemm
    return out


@pytest.mark.parametrize("name", ["siglip_vision", "gemma4_vision"])
def test_bf16_layers_compute_in_fp32_and_stay_within_hf_bf16(name, fp32_faster):
    fp32_faster(True)
    tower = zoo.build_tower(name, dtype=torch.bfloat16)
    ref32 = copy.deepcopy(tower).float()
    hf = copy.deepcopy(tower)
    rest = copy.deepcopy(tower)  # the other speed rules alone: their own ulps
    report = fxpass.apply(tower, None, prefix="t", load_weights=True, fuse=True)
    fxpass.apply(rest, None, prefix="t", load_weights=True, fuse=True, disable=["fp32-gemm"])
    for size, batch in ((0, 1), (1, 2)):
        x = zoo.example_inputs(hf, size_index=size, batch=batch, seed=3)
        x32 = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
               for k, v in x.items()}
        with torch.no_grad():
            got, other, ref = _first(tower(**x)), _first(rest(**x)), _first(ref32(**x32))
            want = _first(hf(**x))
        assert got.dtype == torch.bfloat16
        # fp32 GEMMs: no further from HF's fp32 answer than the same rules with bf16 GEMMs
        # (0.5 dB: bf16's own rounding of other values), and close to HF's bf16 run
        assert _sqnr(ref, got) >= _sqnr(ref, other) - 0.5, (_sqnr(ref, got), _sqnr(ref, other))
        assert _sqnr(want, got) >= 35, _sqnr(want, got)
    fixes = [f for f in report.fixes if f.rule == "fp32-gemm"]
    kernels = _kernels(tower)
    assert fixes and len(fixes) == len(kernels), (len(fixes), sorted(kernels))
    assert all(isinstance(k, Fp32Gemm) for k in kernels.values()), kernels
    assert all("GEMM computed in fp32" in f.detail for f in fixes)
    # the one-line summary (the plugin's INFO line) names the rules that changed the graphs
    assert f"fp32-gemm {len(fixes)}" in report.summary_line(), report.summary_line()


def test_fast_half_kernels_are_kept_with_the_measurement_as_reason(fp32_faster):
    fp32_faster(False)
    tower = zoo.build_tower("siglip_vision", dtype=torch.bfloat16)
    hf = copy.deepcopy(tower)
    report = fxpass.apply(tower, None, prefix="t", load_weights=True, fuse=True)
    x = zoo.example_inputs(hf)
    with torch.no_grad():
        tower(**x)
    assert not [f for f in report.fixes if f.rule == "fp32-gemm"]
    reasons = [r for r in report.refusals if r["rule"] == "fp32-gemm"]
    assert reasons and all("kernel is fast enough" in r["reason"] for r in reasons), reasons
    assert not any(isinstance(k, Fp32Gemm) for k in _kernels(tower).values())


def test_fp32_towers_and_disabled_rule_are_left_alone(fp32_faster):
    fp32_faster(True)
    tower = zoo.build_tower("siglip_vision", dtype=torch.float32)
    report = fxpass.apply(tower, None, load_weights=True, fuse=True)
    with torch.no_grad():
        tower(**zoo.example_inputs(tower))
    assert not [f for f in report.fixes if f.rule == "fp32-gemm"]
    bf16 = zoo.build_tower("siglip_vision", dtype=torch.bfloat16)
    report = fxpass.apply(bf16, None, load_weights=True, fuse=True, disable=["fp32-gemm"])
    with torch.no_grad():
        bf16(**zoo.example_inputs(bf16))
    assert not [f for f in report.fixes if f.rule == "fp32-gemm"]
    assert not any(isinstance(k, Fp32Gemm) for k in _kernels(bf16).values())


def test_the_measurement_compares_the_layers_own_kernel_with_fp32():
    """The real probe, on a real loaded layer: both times measured, cached per shape."""
    tower = zoo.build_tower("siglip_vision", dtype=torch.bfloat16)
    fxpass.apply(tower, None, load_weights=True)
    with torch.no_grad():
        tower(**zoo.example_inputs(tower))
    layer = next(m for m in tower.modules() if is_vllm_linear(m))
    fp32_gemm._DECISIONS.clear()
    faster, half_s, fp32_s = fp32_gemm.decide(layer, None)
    assert half_s > 0 and fp32_s > 0 and faster == (half_s >= fp32_gemm.MIN_GAIN * fp32_s)
    assert fp32_gemm.decide(layer, None) == (faster, half_s, fp32_s)  # measured once


class TestPerCallKernel:
    """A layer holding its live weight: what ``F.linear`` answers, or its error."""

    w = torch.randn(8, 16).to(torch.bfloat16)
    b = torch.randn(8).to(torch.bfloat16)

    def test_answers_as_fp32_then_rounded(self):
        x = torch.randn(4, 16).to(torch.bfloat16)
        got = Fp32Gemm()(x, self.w, self.b)
        want = torch.nn.functional.linear(x.float(), self.w.float(), self.b.float()).to(
            torch.bfloat16)
        assert got.dtype == torch.bfloat16 and torch.equal(got, want)

    def test_mixed_dtypes_raise_as_f_linear_does(self):
        x = torch.randn(4, 16)
        with pytest.raises(RuntimeError) as want:
            torch.nn.functional.linear(x, self.w, self.b)
        with pytest.raises(RuntimeError) as got:
            Fp32Gemm()(x, self.w, self.b)
        assert str(got.value) == str(want.value)

    def test_a_converted_layer_computes_in_its_new_dtype(self):
        x = torch.randn(4, 16)
        got = Fp32Gemm()(x, self.w.float(), self.b.float())
        assert torch.equal(got, torch.nn.functional.linear(x, self.w.float(), self.b.float()))

    def test_gradients_flow_to_input_and_weight(self):
        x = torch.randn(4, 16).to(torch.bfloat16).requires_grad_()
        w = self.w.clone().requires_grad_()
        Fp32Gemm()(x, w, None).float().sum().backward()
        assert x.grad is not None and w.grad is not None
        torch.testing.assert_close(x.grad.float(), w.float().sum(0).expand(4, 16),
                                   atol=1e-2, rtol=1e-2)

    def test_pickles(self):
        buf = io.BytesIO()
        pickle.dump(Fp32Gemm(), buf)
        assert isinstance(pickle.loads(buf.getvalue()), Fp32Gemm)
