"""Rule: every nn.Linear becomes a vLLM ReplicatedLinear at the same path, same prefix.

Inside a traced graph the call_module node keeps its target (the new layer is registered at
the original path, so vLLM's loaders find it by name) and is annotated; a linear whose caller
stayed Python is swapped all the same, as vLLM's module walk does, and the report says why
no graph covered it.
"""

from __future__ import annotations

import dataclasses
import functools

import torch.fx as fx
from torch import nn

from fxpass.rules.base import Mode, Options, Phase, RewriteContext, RuleBase, Site


@dataclasses.dataclass
class LinearMatch:
    qualname: str
    linear: nn.Linear
    sites: list[Site]


class LinearToVllm(RuleBase):
    name = "linear"
    phase = Phase.SWAP

    def enabled(self, options: Options, mode: Mode) -> bool:
        return mode is Mode.APPLY  # later graphs find the layers swapped at apply

    def refuse(self, ctx: RewriteContext, m: LinearMatch, reason: str) -> None:
        ctx.emit("skip", self.name, ctx.full_name(m.qualname), reason=reason)

    def match(self, ctx: RewriteContext) -> list[LinearMatch]:
        sites: dict[str, list[Site]] = {}
        for mg in ctx.graphs():
            for node in mg.nodes_of("call_module"):
                site = Site(mg, node)
                sites.setdefault(site.full_target(), []).append(site)
        paths: dict[int, list[str]] = {}
        for name, mod in ctx.modules.items():
            if isinstance(mod, nn.Linear):
                paths.setdefault(id(mod), []).append(name)
        matches = []
        for names in paths.values():
            if len(names) > 1:
                for n in names:
                    ctx.unsafe.setdefault(
                        n, f"the same nn.Linear object is registered at {', '.join(names)}; "
                           "vLLM would load it once per path")
            for n in names:
                matches.append(LinearMatch(n, ctx.module(n), sites.get(n, [])))
        return matches

    def check(self, ctx: RewriteContext, m: LinearMatch) -> str | None:
        if m.qualname in ctx.unsafe:
            return ctx.unsafe[m.qualname]
        if not m.qualname:
            return ("the model itself is an nn.Linear: there is no parent to swap it in; apply "
                    "fxpass to the module that holds it")
        if type(m.linear).forward is not nn.Linear.forward:
            return (f"{type(m.linear).__qualname__} overrides nn.Linear.forward; a "
                    "ReplicatedLinear would drop that code")
        if "forward" in vars(m.linear) or m.linear._forward_hooks or m.linear._forward_pre_hooks:
            return ("it carries forward hooks or an instance forward (accelerate-style "
                    "wrapping); a ReplicatedLinear would drop them")
        for site in m.sites:
            node = site.node
            if len(node.args) + len(node.kwargs) != 1 or (node.kwargs and "input" not in node.kwargs):
                return (f"called as {node.format_node()} in {site.graph.qualname or '<root>'}: "
                        "expected one input tensor")
        return None

    def apply(self, ctx: RewriteContext, m: LinearMatch) -> None:
        from fxpass.weights import build_vllm_linear, quant_method_name

        full = ctx.full_name(m.qualname)
        layer = build_vllm_linear(m.linear, ctx.quant_config, full)
        ctx.new_layers[m.qualname] = layer
        method = quant_method_name(ctx.quant_config, layer)
        ctx.emit("swap", self.name, full, method=method)
        for site in m.sites:
            if site.node.kwargs:  # nn.Linear(input=x) -> ReplicatedLinear(x)
                site.graph.edit((self.name, "positional input", site.name), functools.partial(
                    positional_input, site.name))
                ctx.edited.add(site.graph.qualname)
            # the same for every identical layer (the prefix follows from the node's path),
            # so identical graphs share one annotated copy
            site.graph.annotate(site.name, "rewrite", {
                "rule": self.name, "layer": type(layer).__name__,
                "quant_method": method, "was": type(m.linear).__name__,
            })
        if m.qualname in ctx.trace.linear_sites and m.sites:
            ctx.emit("placement", self.name, full, graph=True)
        else:
            ctx.emit("placement", self.name, full, why=why_no_graph(ctx, m.qualname))


def positional_input(name: str, graph: fx.Graph) -> None:
    node = next(n for n in graph.nodes if n.name == name)
    node.args, node.kwargs = (node.kwargs["input"],), {}


def why_no_graph(ctx: RewriteContext, qualname: str) -> str:
    parts = qualname.split(".")
    for i in range(len(parts) - 1, -1, -1):
        anc = ".".join(parts[:i])
        if anc in ctx.trace.untraced:
            return f"its caller {anc or '<root>'} stayed Python: {ctx.trace.untraced[anc]}"
    return "not called on the example inputs, so no graph shows its call site"
