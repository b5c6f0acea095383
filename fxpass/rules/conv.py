"""Rule (opt-in, ``fuse=True``): a patch-embedding conv runs as one GEMM, as vLLM's Conv2dLayer does.

ViT towers cut the image into patches with ``nn.Conv2d(kernel_size=p, stride=p)``. On the CPU
that is oneDNN's direct convolution, slow in bf16 (the profile of SigLIP so400m bf16: the
conv costs about two of the tower's GEMMs). vLLM's own ``Conv2dLayer`` runs such a conv
(kernel == stride, no padding, one group) as unfold + ``F.linear`` (``_forward_mulmat``);
this rule gives the HF tower the same: :func:`patch_conv2d` in place of the module call,
reading the conv's own weight and bias (the module and its state_dict stay as they are).

Refused, with the reason, where it would not be the same function: a kernel other than the
stride, padding, dilation, groups, a padding mode other than zeros, hooks on the module, an
input that is not 4-D. Numerics: a GEMM instead of a direct convolution sums in another
order (fp32 ~1e-6, bf16 within an ulp); same output shape and layout contract (a
``(B, C, H', W')`` tensor, here a permuted view of the GEMM's ``(B, H', W', C)`` result).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxpass import meta
from fxpass.rules.base import RewriteContext, Site, SpeedRule, module_sites


def patch_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 kh: int, kw: int) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride=(kh, kw))`` for a ``kh x kw`` kernel, as a GEMM."""
    if x.dim() != 4 or weight.shape[2:] != (kh, kw):
        return F.conv2d(x, weight, bias, stride=(kh, kw))
    b, c, h, w = x.shape
    ho, wo = h // kh, w // kw
    patches = x.unfold(2, kh, kh).unfold(3, kw, kw)  # b, c, ho, wo, kh, kw
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b * ho * wo, c * kh * kw)
    out = F.linear(patches, weight.reshape(weight.shape[0], -1), bias)
    return out.view(b, ho, wo, -1).permute(0, 3, 1, 2)


@dataclasses.dataclass
class ConvMatch:
    site: Site
    qualname: str


def _pair(v: object) -> tuple[int, ...] | object:
    return tuple(v) if isinstance(v, (tuple, list)) else v


class PatchConvAsGemm(SpeedRule):
    name = "patch-conv"

    def describe(self, ctx: RewriteContext, m: ConvMatch) -> str:
        return ctx.full_name(m.qualname)

    def match(self, ctx: RewriteContext) -> list[ConvMatch]:
        return [ConvMatch(site, q) for site, q in module_sites(ctx, lambda m: type(m) is nn.Conv2d)]

    def check(self, ctx: RewriteContext, m: ConvMatch) -> str | None:
        conv = ctx.module(m.qualname)
        node = m.site.node
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            return f"called as {node.format_node()}, not on one tensor"
        if _pair(conv.kernel_size) != _pair(conv.stride):
            return f"kernel {conv.kernel_size} is not its stride {conv.stride} (not patches)"
        padding = _pair(conv.padding)
        if padding not in ((0, 0), "valid"):
            return f"padding {conv.padding}"
        if _pair(conv.dilation) != (1, 1):
            return f"dilation {conv.dilation}"
        if conv.groups != 1:
            return f"{conv.groups} groups"
        if conv.padding_mode != "zeros":
            return f"padding mode {conv.padding_mode!r}"
        if conv._forward_hooks or conv._forward_pre_hooks:  # noqa: SLF001
            return "it has forward hooks (a graph call of the GEMM would skip them)"
        tensor = meta.get(node.args[0], "tensor")
        if tensor is None or len(tensor["shape"]) != 4:
            return "its input is not known to be 4-D (batch, channels, height, width)"
        return None

    def apply(self, ctx: RewriteContext, m: ConvMatch) -> None:
        conv = ctx.module(m.qualname)
        kh, kw = _pair(conv.kernel_size)
        has_bias = conv.bias is not None
        target = str(m.site.node.target)

        def swap(graph: fx.Graph, node: fx.Node) -> None:
            with graph.inserting_before(node):
                w = graph.get_attr(f"{target}.weight")
                b = graph.get_attr(f"{target}.bias") if has_bias else None
                new = graph.call_function(patch_conv2d, (node.args[0], w, b, kh, kw))
            new.meta[meta.KEY] = dict(node.meta.get(meta.KEY, {}))
            if tensor := meta.get(node, "tensor"):
                meta.info(new)["tensor"] = {**tensor, "contiguous": False}
            meta.info(new)["inserted_by"] = self.name
            node.replace_all_uses_with(new)
            graph.erase_node(node)

        ctx.fix(self.name, m.site, f"{m.site.name}: {target} ({kh}x{kw} patches) -> unfold + "
                                   "one GEMM (vLLM Conv2dLayer's form)", swap)
