"""Rule (opt-in, ``fuse=True``): elementwise ops around the GEMMs write into a dead input.

``act(gate) * up`` allocates a third activation-sized tensor although ``act(gate)`` dies right
there; on the CPU each fresh large tensor costs page faults and a pass over memory. Where the
graph shows the left operand is a fresh tensor (made by a GEMM, an activation or another
elementwise op, not a view or a module input), used only by this op, with the result's shape
and dtype, the op becomes its in-place form (``mul_``, ``add_``, ...): the same values, one
allocation less; each call checks that the operand still has the result's shape and dtype
(:func:`add_into_left`, ...: a call of another shape may broadcast it), else runs out of place. ``add`` and ``mul`` commute bit for bit (IEEE), so where only the right
operand is fresh (HF's ``residual + hidden_states``) the op runs in place on that one
(:func:`add_into_right`, which checks per call that the right operand has the result's shape
and dtype: a call of another shape may broadcast it). Freshness is followed into a submodule's graph, also
through an item of a tuple it returns (``self_attn(...)[0]``). The tower stays an eager
module; inference only (in-place ops and autograd do not mix), hence opt-in.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxpass import meta
from fxpass.rules.base import RewriteContext, Site, SpeedRule, is_vllm_linear
from fxpass.rules.layout import add_contiguous, mul_contiguous, sub_contiguous
from fxpass.rules.norms import rms_norm
from fxpass.rules.rope import multidim_rope

INPLACE = {operator.mul: "mul_", operator.add: "add_", operator.sub: "sub_",
           operator.truediv: "div_", torch.mul: "mul_", torch.add: "add_", torch.sub: "sub_",
           add_contiguous: "add_", sub_contiguous: "sub_", mul_contiguous: "mul_"}
COMMUTATIVE = frozenset({operator.mul, operator.add, torch.mul, torch.add, add_contiguous,
                         mul_contiguous})


def _into_right(a: torch.Tensor, b: torch.Tensor, method: str) -> torch.Tensor:
    """``a <op> b`` written into ``b`` (add and mul commute bit for bit) where ``b`` has the
    result's shape and dtype in this call too (a call of another shape than the traced one
    may broadcast ``b``); otherwise out of place (and under torch.compile, which
    allocates for itself)."""
    if (not torch.compiler.is_compiling()
            and isinstance(b, torch.Tensor) and isinstance(a, torch.Tensor)
            and torch.broadcast_shapes(a.shape, b.shape) == b.shape
            and torch.result_type(a, b) == b.dtype):
        return getattr(b, method)(a)
    return getattr(torch, method.rstrip("_"))(a, b)


def add_into_right(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b`` in place on ``b`` where it can be (see :func:`_into_right`)."""
    return _into_right(a, b, "add_")


def mul_into_right(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a * b`` in place on ``b`` where it can be (see :func:`_into_right`)."""
    return _into_right(a, b, "mul_")


def _into_left(a: torch.Tensor, b: Any, method: str) -> torch.Tensor:
    """``a <op> b`` written into ``a`` where ``a`` has the result's shape and dtype in this
    call too (the traced call showed it; a call of another shape may broadcast ``a`` up:
    FocalNet's modulator ``(1, C, 1, 1)`` against a ``(1, C, 2, 2)`` map); otherwise out of
    place (and under torch.compile)."""
    if (not torch.compiler.is_compiling() and isinstance(a, torch.Tensor)
            and (not isinstance(b, torch.Tensor)
                 or torch.broadcast_shapes(a.shape, b.shape) == a.shape)
            and torch.result_type(a, b) == a.dtype):
        return getattr(a, method)(b)
    return getattr(torch, method.rstrip("_"))(a, b)


def add_into_left(a: torch.Tensor, b: Any) -> torch.Tensor:
    return _into_left(a, b, "add_")


def sub_into_left(a: torch.Tensor, b: Any) -> torch.Tensor:
    return _into_left(a, b, "sub_")


def mul_into_left(a: torch.Tensor, b: Any) -> torch.Tensor:
    return _into_left(a, b, "mul_")


def div_into_left(a: torch.Tensor, b: Any) -> torch.Tensor:
    return _into_left(a, b, "div_")


INTO_RIGHT = {"add_": add_into_right, "mul_": mul_into_right}
INTO_LEFT = {"add_": add_into_left, "sub_": sub_into_left, "mul_": mul_into_left,
             "div_": div_into_left}
FRESH_FUNCTIONS = frozenset({
    F.gelu, F.silu, F.relu, F.mish, torch.tanh, torch.sigmoid, torch.exp, torch.matmul,
    operator.matmul, operator.mul, operator.add, operator.sub, operator.truediv,
    torch.mul, torch.add, torch.sub, F.linear, rms_norm, add_contiguous, sub_contiguous,
    mul_contiguous, multidim_rope, add_into_right, mul_into_right, *INTO_LEFT.values(),
})


@dataclasses.dataclass
class InplaceMatch:
    site: Site
    method: str
    swapped: bool = False  # in place on the right operand (a commutative op)


def _fresh(ctx: RewriteContext, mg_qualname: str, node: fx.Node, depth: int = 0) -> bool:
    """Whether ``node`` certainly returns a newly allocated tensor (never an alias)."""
    if depth > 8:
        return False
    if node.op == "call_function" and node.target is operator.getitem:
        # an item of a tuple a submodule returns: fresh when that item is, in its graph
        source, index = node.args
        if (isinstance(source, fx.Node) and source.op == "call_module"
                and isinstance(index, int)):
            return _fresh_module_output(ctx, mg_qualname, source, index, depth)
        return False
    if node.op == "call_function":
        return node.target in FRESH_FUNCTIONS
    if node.op == "call_module":
        return _fresh_module_output(ctx, mg_qualname, node, None, depth)
    return False


def _fresh_module_output(ctx: RewriteContext, mg_qualname: str, node: fx.Node,
                         index: int | None, depth: int) -> bool:
    full = f"{mg_qualname}.{node.target}" if mg_qualname else str(node.target)
    mod = ctx.layer_after(full)
    if is_vllm_linear(mod):
        return index is None
    sub = ctx.trace.graphs.get(full)
    if sub is None:
        return False
    out = next(n for n in sub.graph.nodes if n.op == "output").args[0]
    if index is not None:
        if not isinstance(out, (tuple, list)) or not -len(out) <= index < len(out):
            return False
        item = out[index]
        # the item must not also be another item of the tuple (the same tensor twice)
        if sum(o is item for o in out) != 1:
            return False
        out = item
    return isinstance(out, fx.Node) and _fresh(ctx, full, out, depth + 1)


class InplaceElementwise(SpeedRule):
    name = "elementwise"
    # reads what the norm, rope and layout rules produce
    after = ("rms-norm", "rope", "layout")

    def refuse(self, ctx: RewriteContext, m: InplaceMatch, reason: str) -> None:
        pass  # a value that must stay is the common case, not news

    def match(self, ctx: RewriteContext) -> list[InplaceMatch]:
        out = []
        for mg in ctx.graphs():
            for node in mg.nodes_of("call_function"):
                method = INPLACE.get(node.target)
                if method is None or len(node.args) != 2 or node.kwargs:
                    continue
                if node.args[0] is node.args[1]:
                    continue
                sides = [False, True] if node.target in COMMUTATIVE else [False]
                for swapped in sides:
                    operand = node.args[1] if swapped else node.args[0]
                    if self._dead_fresh(ctx, mg, node, operand):
                        out.append(InplaceMatch(Site(mg, node), method, swapped))
                        break
        return out

    @staticmethod
    def _dead_fresh(ctx: RewriteContext, mg: object, node: fx.Node, operand: object) -> bool:
        if not isinstance(operand, fx.Node) or len(operand.users) != 1:
            return False
        a, r = meta.get(operand, "tensor"), meta.get(node, "tensor")
        if not a or not r or a["shape"] != r["shape"] or a["dtype"] != r["dtype"]:
            return False
        return _fresh(ctx, mg.qualname, operand)

    def check(self, ctx: RewriteContext, m: InplaceMatch) -> str | None:
        return None

    def apply(self, ctx: RewriteContext, m: InplaceMatch) -> None:
        method = m.method
        swapped = m.swapped

        def inplace(graph: fx.Graph, node: fx.Node) -> None:
            with graph.inserting_before(node):
                if swapped:
                    new = graph.call_function(INTO_RIGHT[method], node.args)
                else:
                    new = graph.call_function(INTO_LEFT[method], node.args)
            new.meta[meta.KEY] = dict(node.meta.get(meta.KEY, {}))
            node.replace_all_uses_with(new)
            graph.erase_node(node)

        node = m.site.node
        side = "right" if swapped else "left"
        ctx.fix(self.name, m.site, f"{node.name}: {node.target.__name__} -> in-place "
                                   f".{method}() on a dead {side} input", inplace)
