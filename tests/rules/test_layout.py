"""The layout rule: an elementwise op over a transposed view writes a contiguous result."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxpass
from fxpass import zoo
from fxpass.rules import layout
from fxpass.runtime import installed_graph

pytestmark = pytest.mark.usefixtures("vllm_rt")


def _first(out):
    return out if isinstance(out, torch.Tensor) else out[0]


class PatchEmbed(nn.Module):
    """ViT-style: channels-first features, flattened and transposed, plus a position table."""

    def __init__(self, back: bool = False) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 6, 8))
        self.proj = nn.Linear(8, 8)
        self.back = back

    def forward(self, feats):  # feats: (b, 8, 6)
        x = feats.transpose(1, 2) + self.pos
        if self.back:
            return self.proj(x.transpose(1, 2).transpose(1, 2))
        return self.proj(x), x


def _layout_fixes(report):
    return [f for f in report.fixes if f.rule == "layout"]


def test_the_sum_of_a_transposed_view_is_written_contiguous_with_the_same_values():
    torch.manual_seed(0)
    m = PatchEmbed().eval()
    ref = copy.deepcopy(m)
    feats = torch.randn(2, 8, 6)
    report = fxpass.apply(m, None, load_weights=True, fuse=True, example_inputs=(feats,))
    assert len(_layout_fixes(report)) == 1, report
    assert "add_contiguous" in installed_graph(m).src
    with torch.no_grad():
        (y, x), (y0, x0) = m(feats), ref(feats)
    assert not x0.is_contiguous() and x.is_contiguous()
    assert torch.equal(x, x0)
    torch.testing.assert_close(y, y0)


def test_refused_where_a_user_changes_the_layout_again():
    torch.manual_seed(0)
    m = PatchEmbed(back=True).eval()
    ref = copy.deepcopy(m)
    feats = torch.randn(2, 8, 6)
    report = fxpass.apply(m, None, load_weights=True, fuse=True, example_inputs=(feats,))
    assert not _layout_fixes(report)
    reasons = [r["reason"] for r in report.refusals if r["rule"] == "layout"]
    assert any("changes its layout again" in r for r in reasons), report.refusals
    with torch.no_grad():
        torch.testing.assert_close(m(feats), ref(feats))


def test_opt_in_and_idempotent():
    feats = torch.randn(2, 8, 6)
    m = PatchEmbed().eval()
    report = fxpass.apply(m, None, load_weights=True, example_inputs=(feats,))
    assert not _layout_fixes(report)
    m = PatchEmbed().eval()
    fxpass.apply(m, None, load_weights=True, fuse=True, example_inputs=(feats,))
    src = installed_graph(m).src
    again = fxpass.apply(m, None, load_weights=True, fuse=True, example_inputs=(feats,))
    assert again.already_applied and installed_graph(m).src == src


@pytest.mark.parametrize("fn, op", [(layout.add_contiguous, torch.add),
                                    (layout.sub_contiguous, torch.sub),
                                    (layout.mul_contiguous, torch.mul)])
def test_replacements_equal_the_op_with_broadcasting_promotion_and_autograd(fn, op):
    a = torch.randn(2, 8, 6).transpose(1, 2)
    b = torch.randn(6, 8, dtype=torch.float64)
    got = fn(a, b)
    assert got.is_contiguous() and got.dtype == torch.float64
    assert torch.equal(got, op(a, b))
    leaf = torch.randn(1, 8, requires_grad=True)
    out = fn(a, leaf)
    out.sum().backward()
    assert leaf.grad is not None and out.is_contiguous()


def test_siglip_residual_stream_is_contiguous_and_layer_norms_copy_nothing():
    tower = zoo.build_tower("siglip_vision")
    ref = copy.deepcopy(tower)
    report = fxpass.apply(tower, None, load_weights=True, fuse=True,
                          example_inputs=zoo.example_inputs(tower))
    assert "embeddings" in {f.module for f in _layout_fixes(report)}, report
    x = zoo.example_inputs(ref)
    with torch.no_grad():
        assert tower.embeddings(**x).is_contiguous()
        assert not ref.embeddings(**x).is_contiguous()
        for s in (0, 1):
            x = zoo.example_inputs(ref, size_index=s)
            torch.testing.assert_close(_first(tower(**x)), _first(ref(**x)), atol=1e-4, rtol=0)
