"""Rule: an SDPA call drops, at run time, an attention mask that masks nothing.

HF builds attention masks with a data-dependent shortcut: in eager mode a padding mask with
nothing padded gives no mask at all (``attn_mask=None``), which lets SDPA use its fastest
kernels. While tracing HF cannot look at data, so it takes the other branch and the graph
always materialises the mask: the traced tower then runs the slower masked kernels where HF
eager would not. This rule restores HF's shortcut at the one place it matters: each SDPA
call site gets :func:`scaled_dot_product_attention`, which checks the mask once per mask
tensor (the layers of a tower share one) and passes ``None`` when it masks nothing. A mask
that masks something is passed on unchanged, so the result is the same function either way.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxpass.rules.base import RewriteContext, RuleBase, Site

_checked = threading.local()  # .last: (weakref to the mask, its _version, masks nothing?)


def masks_nothing(mask: torch.Tensor) -> bool:
    """True when ``mask`` lets every query see every key (bool: all True; additive: all 0).

    Checked once per mask tensor (and in-place version, where the tensor has one: inference
    tensors, as under vLLM, do not; HF eager decides once per mask as well), so the layers
    sharing a mask cost one check. Never checked while a CUDA graph is being captured or
    torch.compile traces (a data check there would break the capture): the mask is kept.
    """
    if torch.compiler.is_compiling() or (
            mask.is_cuda and torch.cuda.is_current_stream_capturing()):
        return False
    version = None if mask.is_inference() else mask._version
    last = getattr(_checked, "last", None)
    if last is not None and last[0]() is mask and last[1] == version:
        return last[2]
    result = bool(mask.all()) if mask.dtype == torch.bool else not bool(mask.any())
    _checked.last = (weakref.ref(mask), version, result)
    return result


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, **kwargs: object) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` without a mask that masks nothing (see module)."""
    if attn_mask is not None and not is_causal and masks_nothing(attn_mask):
        attn_mask = None
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask,
                                          dropout_p=dropout_p, is_causal=is_causal, **kwargs)


_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")


@dataclasses.dataclass
class SdpaMatch:
    site: Site


class SdpaFullMask(RuleBase):
    name = "sdpa-mask"

    def match(self, ctx: RewriteContext) -> list[SdpaMatch]:
        out = []
        for mg in ctx.graphs():
            for node in mg.nodes_of("call_function"):
                if node.target is F.scaled_dot_product_attention:
                    mask = _mask_arg(node)
                    if isinstance(mask, fx.Node):
                        out.append(SdpaMatch(Site(mg, node)))
        return out

    def check(self, ctx: RewriteContext, m: SdpaMatch) -> str | None:
        node = m.site.node
        causal = node.kwargs.get("is_causal", node.args[5] if len(node.args) > 5 else False)
        if causal is not False:
            return f"{node.format_node()}: is_causal is {causal}, not a constant False"
        return None

    def apply(self, ctx: RewriteContext, m: SdpaMatch) -> None:
        def swap(graph: fx.Graph, node: fx.Node) -> None:
            # keywords for the named arguments, so the replacement's signature binds them
            named = dict(zip(_ARGS, node.args))
            node.args = tuple(named.pop(k) for k in _ARGS[:3])
            node.kwargs = {**named, **node.kwargs}
            node.target = scaled_dot_product_attention

        ctx.fix(self.name, m.site, f"{m.site.name}: attn_mask dropped at run time when it "
                                   "masks nothing (HF eager's shortcut)", swap)


def _mask_arg(node: fx.Node) -> object:
    if "attn_mask" in node.kwargs:
        return node.kwargs["attn_mask"]
    return node.args[3] if len(node.args) > 3 else None
