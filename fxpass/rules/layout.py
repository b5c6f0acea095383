"""Rule (opt-in, ``fuse=True``): an elementwise op over a transposed view writes a contiguous result.

ViT patch embeddings end in ``conv(x).flatten(2).transpose(1, 2) + pos``: the add keeps the
transposed operand's layout (TensorIterator follows its inputs' strides), so the whole
residual stream of the tower is a transposed view. Every ``LayerNorm`` then copies its input
to contiguous memory first (``native_layer_norm`` calls ``.contiguous()``), and every residual
add mixes layouts: SigLIP so400m pays nine hidden-state copies per forward at 4 layers.

Where the graph shows such an op (add / sub / mul of two tensors whose example result was
non-contiguous), it becomes :func:`add_contiguous` (``sub_`` / ``mul_``), which writes the
same values into a contiguous output (``torch.add(a, b, out=...)``: no extra pass). Refused
where a user of the result changes its layout again (``.transpose``/``.permute``/``.view``
...: a contiguous result could make that a copy) and where the result is not floating point.
Strides of the module's output change, values do not; opt-in with the other speed rules.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Callable

import torch
import torch.fx as fx

from fxpass import meta
from fxpass.rules.base import RewriteContext, Site, SpeedRule
from fxpass.rules.contiguity import LAYOUT_METHODS

_RELAYOUT = LAYOUT_METHODS | {"view", "reshape", "flatten", "unflatten", "contiguous"}


def _contiguous_result(fn: Callable[..., torch.Tensor], a: torch.Tensor,
                       b: torch.Tensor) -> torch.Tensor:
    if (not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor)
            or torch.compiler.is_compiling()):
        return fn(a, b).contiguous()
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return fn(a, b).contiguous()  # out= does not record autograd
    out = torch.empty(torch.broadcast_shapes(a.shape, b.shape),
                      dtype=torch.result_type(a, b), device=a.device)
    return fn(a, b, out=out)


def add_contiguous(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b`` into a contiguous tensor (same values)."""
    return _contiguous_result(torch.add, a, b)


def sub_contiguous(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a - b`` into a contiguous tensor (same values)."""
    return _contiguous_result(torch.sub, a, b)


def mul_contiguous(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a * b`` into a contiguous tensor (same values)."""
    return _contiguous_result(torch.mul, a, b)


REPLACEMENT = {operator.add: add_contiguous, torch.add: add_contiguous,
               operator.sub: sub_contiguous, torch.sub: sub_contiguous,
               operator.mul: mul_contiguous, torch.mul: mul_contiguous}


@dataclasses.dataclass
class LayoutMatch:
    site: Site


def _relayout_user(node: fx.Node) -> str | None:
    for user in node.users:
        name = user.target if user.op == "call_method" else getattr(user.target, "__name__", "")
        if user.op in ("call_method", "call_function") and name in _RELAYOUT:
            return f"{user.format_node()} changes its layout again"
    return None


class ContiguousStream(SpeedRule):
    name = "layout"

    def match(self, ctx: RewriteContext) -> list[LayoutMatch]:
        out = []
        for mg in ctx.graphs():
            for node in mg.nodes_of("call_function"):
                if node.target not in REPLACEMENT or len(node.args) != 2 or node.kwargs:
                    continue
                if not all(isinstance(a, fx.Node) for a in node.args):
                    continue
                result = meta.get(node, "tensor")
                operands = [meta.get(a, "tensor") for a in node.args]
                if (result is None or result["contiguous"] or len(result["shape"]) < 2
                        or any(t is None for t in operands)):
                    continue
                if any(not t["contiguous"] for t in operands):
                    out.append(LayoutMatch(Site(mg, node)))
        return out

    def check(self, ctx: RewriteContext, m: LayoutMatch) -> str | None:
        node = m.site.node
        if not meta.get(node, "tensor")["dtype"].is_floating_point:
            return "the result is not floating point"
        return _relayout_user(node)

    def apply(self, ctx: RewriteContext, m: LayoutMatch) -> None:
        new_target = REPLACEMENT[m.site.node.target]

        def swap(graph: fx.Graph, node: fx.Node) -> None:
            node.target = new_target
            if tensor := meta.get(node, "tensor"):
                meta.info(node)["tensor"] = {**tensor, "contiguous": True}

        ctx.fix(self.name, m.site, f"{m.site.name}: result of a transposed operand written "
                                   f"contiguous ({new_target.__name__})", swap)
