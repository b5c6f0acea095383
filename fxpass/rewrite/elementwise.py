"""Rule (opt-in, ``fuse=True``): elementwise ops around the GEMMs write into a dead input.

``act(gate) * up`` allocates a third activation-sized tensor although ``act(gate)`` dies right
there; on the CPU each fresh large tensor costs page faults and a pass over memory. Where the
graph shows the left operand is a fresh tensor (made by a GEMM, an activation or another
elementwise op, not a view or a module input), used only by this op, with the result's shape
and dtype, the op becomes its in-place form (``mul_``, ``add_``, ...): the same values, one
allocation less. The tower stays an eager module; inference only (in-place ops and autograd
do not mix), hence opt-in.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxpass import meta
from fxpass.rewrite.base import RewriteContext, Site, is_vllm_linear

INPLACE = {operator.mul: "mul_", operator.add: "add_", operator.sub: "sub_",
           operator.truediv: "div_", torch.mul: "mul_", torch.add: "add_", torch.sub: "sub_"}
FRESH_FUNCTIONS = frozenset({
    F.gelu, F.silu, F.relu, F.mish, torch.tanh, torch.sigmoid, torch.exp, torch.matmul,
    operator.matmul, operator.mul, operator.add, operator.sub, operator.truediv,
    torch.mul, torch.add, torch.sub, F.linear,
})


@dataclasses.dataclass
class InplaceMatch:
    site: Site
    method: str


def _fresh(ctx: RewriteContext, mg_qualname: str, node: fx.Node, depth: int = 0) -> bool:
    """Whether ``node`` certainly returns a newly allocated tensor (never an alias)."""
    if depth > 8:
        return False
    if node.op == "call_function":
        return node.target in FRESH_FUNCTIONS
    if node.op == "call_module":
        full = f"{mg_qualname}.{node.target}" if mg_qualname else str(node.target)
        mod = ctx.layer_after(full)
        if is_vllm_linear(mod):
            return True
        sub = ctx.trace.graphs.get(full)
        if sub is None:
            return False
        out = next(n for n in sub.graph.nodes if n.op == "output").args[0]
        return isinstance(out, fx.Node) and _fresh(ctx, full, out, depth + 1)
    return False


class InplaceElementwise:
    name = "elementwise"

    def match(self, ctx: RewriteContext) -> list[InplaceMatch]:
        if not ctx.fuse:
            return []
        out = []
        for mg in ctx.graphs():
            for node in mg.nodes_of("call_function"):
                method = INPLACE.get(node.target)
                if method is None or len(node.args) != 2 or node.kwargs:
                    continue
                left = node.args[0]
                if not isinstance(left, fx.Node) or len(left.users) != 1:
                    continue
                if node.args[1] is left:
                    continue
                a, r = meta.get(left, "tensor"), meta.get(node, "tensor")
                if not a or not r or a["shape"] != r["shape"] or a["dtype"] != r["dtype"]:
                    continue
                if _fresh(ctx, mg.qualname, left):
                    out.append(InplaceMatch(Site(mg, node), method))
        return out

    def check(self, ctx: RewriteContext, m: InplaceMatch) -> str | None:
        return None

    def apply(self, ctx: RewriteContext, m: InplaceMatch) -> None:
        method = m.method

        def inplace(graph: fx.Graph, node: fx.Node) -> None:
            with graph.inserting_before(node):
                new = graph.call_method(method, node.args)
            new.meta[meta.KEY] = dict(node.meta.get(meta.KEY, {}))
            node.replace_all_uses_with(new)
            graph.erase_node(node)

        node = m.site.node
        ctx.fix(self.name, m.site, f"{node.name}: {node.target.__name__} -> in-place "
                                   f".{method}() on a dead input", inplace)
