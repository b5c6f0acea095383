"""The patch-conv rule: a kernel == stride conv runs as unfold + one GEMM (fuse=True)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxpass
from fxpass import zoo
from fxpass.rules.conv import patch_conv2d
from fxpass.runtime import installed_graph

pytestmark = pytest.mark.usefixtures("vllm_rt")


def _first(out):
    return out if isinstance(out, torch.Tensor) else out[0]


class Embed(nn.Module):
    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        self.proj = nn.Linear(conv.out_channels, 8)

    def forward(self, x):
        return self.proj(self.conv(x).flatten(2).transpose(1, 2))


def _rewrite(conv: nn.Conv2d, x: torch.Tensor, fuse: bool = True):
    torch.manual_seed(0)
    model = Embed(conv).eval()
    ref = copy.deepcopy(model)
    report = fxpass.apply(model, None, load_weights=True, fuse=fuse, example_inputs=(x,))
    return model, ref, report


def _fixes(report):
    return [f for f in report.fixes if f.rule == "patch-conv"]


def _refusals(report):
    return [r["reason"] for r in report.refusals if r["rule"] == "patch-conv"]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (1, 3, 18, 13)], ids=["even", "remainder"])
def test_patch_conv_equals_the_convolution(bias, shape):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, kernel_size=4, stride=4, bias=bias)
    x = torch.randn(*shape)
    got = patch_conv2d(x, conv.weight, conv.bias, 4, 4)
    torch.testing.assert_close(got, conv(x), atol=1e-5, rtol=1e-5)
    conv = nn.Conv2d(3, 6, kernel_size=(2, 4), stride=(2, 4), bias=bias)  # non-square
    torch.testing.assert_close(patch_conv2d(x, conv.weight, conv.bias, 2, 4), conv(x),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tower_patch_embeddings_run_as_a_gemm(dtype):
    for name in ("siglip_vision", "clip_vision"):
        tower = zoo.build_tower(name).to(dtype)
        ref = copy.deepcopy(tower)
        report = fxpass.apply(tower, None, load_weights=True, fuse=True,
                              example_inputs=zoo.example_inputs(tower))
        assert len(_fixes(report)) == 1, report
        assert "patch_conv2d" in installed_graph(tower.embeddings).src
        with torch.no_grad():
            for s in (0, 1):
                x = zoo.example_inputs(ref, size_index=s)
                want = _first(ref(**x)).float()
                tol = 1e-4 if dtype == torch.float32 else 1.6e-2 * want.abs().max().item()
                torch.testing.assert_close(_first(tower(**x)).float(), want, atol=tol, rtol=0)


@pytest.mark.parametrize("conv, reason", [
    (lambda: nn.Conv2d(3, 6, 4, stride=2), "is not its stride"),
    (lambda: nn.Conv2d(3, 6, 4, stride=4, padding=1), "padding (1, 1)"),
    (lambda: nn.Conv2d(3, 6, 4, stride=4, groups=3), "3 groups"),
    (lambda: nn.Conv2d(3, 6, 4, stride=4, dilation=2), "dilation"),
], ids=["overlapping", "padding", "groups", "dilation"])
def test_other_convolutions_are_refused_with_the_reason(conv, reason):
    x = torch.randn(1, 3, 16, 16)
    model, ref, report = _rewrite(conv(), x)
    assert not _fixes(report)
    assert any(reason in r for r in _refusals(report)), report.refusals
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))


def test_opt_in_and_idempotent():
    x = torch.randn(1, 3, 16, 16)
    _, _, report = _rewrite(nn.Conv2d(3, 6, 4, stride=4), x, fuse=False)
    assert not _fixes(report) and not _refusals(report)
    model, _, report = _rewrite(nn.Conv2d(3, 6, 4, stride=4), x)
    src = installed_graph(model).src
    again = fxpass.apply(model, None, load_weights=True, fuse=True, example_inputs=(x,))
    assert again.already_applied and installed_graph(model).src == src
