"""The rope rule: multidimensional RoPE as one rotation, bit for bit HF's (fuse=True)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.models.gemma4.modeling_gemma4 import apply_multidimensional_rope, rotate_half

import fxpass
from fxpass import zoo
from fxpass.rules.rope import multidim_rope
from fxpass.runtime import installed_graph

pytestmark = pytest.mark.usefixtures("vllm_rt")


def _first(out):
    return out if isinstance(out, torch.Tensor) else out[0]


def _inputs(dtype, b=2, n=5, heads=3, d=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, n, heads, d, generator=g).to(dtype)
    freqs = torch.randn(b, n, d // 2, generator=g)
    cos, sin = torch.cat([freqs, freqs], -1).cos().to(dtype), torch.cat([freqs, freqs], -1).sin().to(dtype)
    pos = torch.zeros(b, n, 2, dtype=torch.long)
    return x, cos, sin, pos


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_one_rotation_is_bit_for_bit_hf(dtype):
    x, cos, sin, pos = _inputs(dtype)
    want = apply_multidimensional_rope(x, cos, sin, pos)
    assert torch.equal(multidim_rope(x, cos, sin, [8, 8], 2), want)
    # sizes the one-rotation form does not take: the per-part loop, same values
    got = multidim_rope(x[..., :12], cos[..., :12], sin[..., :12], [6, 4, 2], 2)
    parts = [a * c.unsqueeze(2) + rotate_half(a) * s.unsqueeze(2) for a, c, s in zip(
        *(torch.split(t[..., :12], [6, 4, 2], -1) for t in (x, cos, sin)))]
    assert torch.equal(got, torch.cat(parts, -1))


class RopeAttention(nn.Module):
    def __init__(self, leak: bool = False) -> None:
        super().__init__()
        self.q = nn.Linear(48, 48)
        self.leak = leak

    def forward(self, h, cos, sin, pos):
        q = self.q(h).view(*h.shape[:-1], 3, 16)
        if not self.leak:
            return apply_multidimensional_rope(q, cos, sin, pos)
        parts = torch.split(q, [8, 8], dim=-1)
        cs, ss = torch.split(cos, [8, 8], dim=-1), torch.split(sin, [8, 8], dim=-1)
        ys = []
        for k in range(2):
            a, c, s = parts[k], cs[k].unsqueeze(2), ss[k].unsqueeze(2)
            half = a.shape[-1] // 2
            ys.append(a * c + torch.cat((-a[..., half:], a[..., :half]), dim=-1) * s)
        return torch.cat(ys, dim=-1), parts[0]  # a part escapes the rotation


def _apply(leak: bool, fuse: bool = True):
    torch.manual_seed(0)
    m = RopeAttention(leak).eval()
    ref = copy.deepcopy(m)
    plain = copy.deepcopy(m)
    _, cos, sin, pos = _inputs(torch.float32)
    h = torch.randn(2, 5, 48)
    args = (h, cos, sin, pos)
    report = fxpass.apply(m, None, load_weights=True, fuse=fuse, example_inputs=(args, {}))
    fxpass.apply(plain, None, load_weights=True, example_inputs=(args, {}))
    return m, ref, plain, args, report


def test_the_traced_hf_rotation_is_replaced_and_exact():
    m, ref, plain, args, report = _apply(leak=False)
    fixes = [f for f in report.fixes if f.rule == "rope"]
    assert len(fixes) == 1, report
    src = installed_graph(m).src
    assert "multidim_rope" in src and "torch.cat" not in src and "neg" not in src
    with torch.no_grad():
        assert torch.equal(m(*args), plain(*args))  # same GEMM: the rotation is bit for bit
        torch.testing.assert_close(m(*args), ref(*args))


def test_refused_where_a_value_inside_the_rotation_is_used_elsewhere():
    m, ref, plain, args, report = _apply(leak=True)
    assert not [f for f in report.fixes if f.rule == "rope"]
    reasons = [r["reason"] for r in report.refusals if r["rule"] == "rope"]
    assert any("is also used by" in r for r in reasons), report.refusals
    with torch.no_grad():
        for a, b in zip(m(*args), plain(*args)):
            assert torch.equal(a, b)


def test_opt_in_and_idempotent():
    _, _, _, args, report = _apply(leak=False, fuse=False)
    assert not [f for f in report.fixes if f.rule == "rope"]
    m, _, _, args, _ = _apply(leak=False)
    src = installed_graph(m).src
    again = fxpass.apply(m, None, load_weights=True, fuse=True, example_inputs=(args, {}))
    assert again.already_applied and installed_graph(m).src == src


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gemma4_vision_q_and_k_rotations_all_replaced(dtype):
    tower = zoo.build_tower("gemma4_vision").to(dtype)
    ref = copy.deepcopy(tower)
    report = fxpass.apply(tower, None, load_weights=True, fuse=True,
                          example_inputs=zoo.example_inputs(tower))
    layers = len(ref.encoder.layers)
    assert len([f for f in report.fixes if f.rule == "rope"]) == 2 * layers, report
    with torch.no_grad():
        for s in (0, 1):
            x = zoo.example_inputs(ref, size_index=s)
            want = _first(ref(**x)).float()
            tol = 1e-4 if dtype == torch.float32 else 1.6e-2 * want.abs().max().item()
            torch.testing.assert_close(_first(tower(**x)).float(), want, atol=tol, rtol=0)
