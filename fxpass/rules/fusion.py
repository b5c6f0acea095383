"""Rule (opt-in, ``fuse=True``): sibling linears reading one input become one vLLM GEMM.

Only a graph shows that q/k/v (or gate/up, or any such group) read the same node. The group
becomes one ``MergedColumnParallelLinear`` over the concatenated outputs, followed by a split;
members reached through a thin wrapper (a traced module whose graph is just ``linear(x)``, such
as ``Gemma4ClippableLinear`` without clipping) fuse too. Each member's weight is one shard of
the fused layer (bnb quant states per shard), so checkpoints keep their original names (see
``fxpass.weights.load_checkpoint``). Refused, with the reason in the report, where fusing would
not be exact: a per-layer op on the input (clipping), different dtypes / bias / quant methods,
a linear called elsewhere too.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx
from torch import nn

from fxpass import meta
from fxpass.layers import is_vllm_linear
from fxpass.rules.base import Mode, Options, Phase, RewriteContext, RuleBase, Site


@dataclasses.dataclass
class Member:
    site: Site  # call_module node in the parent graph
    linear: str  # qualified name of the nn.Linear
    wrapper: str | None  # qualified name of a thin wrapper module called instead, if any
    refusal: str | None = None


class FusedSlice(nn.Module):
    """What stands at a fused member's path after the commit: its slice of the merged layer's
    output. Python code that calls the member by name (the module's Python forward, a graph
    traced after apply for a call the first graph did not cover) still runs, correctly.

    The merged layer is held as a plain attribute, not a child: it is registered once, at its
    own path (no second copy in ``named_modules`` or the state_dict); no parameters here.
    """

    def __init__(self, merged: nn.Module, start: int, end: int) -> None:
        super().__init__()
        self.__dict__["merged"] = merged
        self.start, self.end = start, end

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merged(x.contiguous())[..., self.start:self.end]

    def extra_repr(self) -> str:
        return f"slice {self.start}:{self.end} of {type(self.merged).__name__}"


@dataclasses.dataclass
class FusionGroup:
    members: list[Member]

    @property
    def graph(self):  # noqa: ANN201 - ModuleGraph
        return self.members[0].site.graph

    def names(self) -> list[str]:
        return [m.linear for m in self.members]


def _thin_wrapper_linear(ctx: RewriteContext, qualname: str) -> tuple[str | None, str | None]:
    """(linear qualname, refusal) for a traced wrapper whose graph is ``linear(x)``."""
    mg = ctx.trace.graphs.get(qualname)
    if mg is None:
        return None, None
    nodes = list(mg.graph.nodes)
    calls = [n for n in nodes if n.op == "call_module"]
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(calls) != 1 or len(placeholders) != 1:
        return None, None
    call = calls[0]
    target = f"{qualname}.{call.target}"
    if not _member_layer(ctx, ctx.module(target)):
        return None, None
    output = next(n for n in nodes if n.op == "output")
    if call.args != (placeholders[0],) or call.kwargs:
        ops = sorted({getattr(n.target, "__name__", str(n.target)) for n in nodes
                      if n.op not in ("placeholder", "output", "get_attr") and n is not call})
        return target, (f"{qualname} applies {', '.join(ops) or 'other ops'} to the input "
                        "before its linear (per-layer, e.g. clipping)")
    if output.args[0] is not call:
        return target, f"{qualname} applies ops to the linear's output (per-layer)"
    return target, None


def _member_layer(ctx: RewriteContext, module: nn.Module) -> bool:
    """A linear the rule may fuse: an ``nn.Linear`` at apply; at a first call, the vLLM
    layer apply swapped in (its weights loaded since)."""
    if ctx.mode is Mode.FIRST_CALL:
        return is_vllm_linear(module)
    return isinstance(module, nn.Linear)


class SiblingFusion(RuleBase):
    """Sibling linears on one input become one vLLM layer and a split (fuse=True). At apply
    with a trace it plans the fused layer over the HF linears; at the first call of a tower
    apply had no inputs for, it builds it from the vLLM layers vLLM's loader filled (their
    weights kept for it: ``fxpass.weights.keep_loaded_weight``)."""

    name = "fusion"
    phase = Phase.SPEED

    def enabled(self, options: Options, mode: Mode) -> bool:
        return options.fuse and mode in (Mode.APPLY, Mode.FIRST_CALL)

    def describe(self, ctx: RewriteContext, g: FusionGroup | SliceGroup) -> str:
        if isinstance(g, SliceGroup):
            return g.describe()
        return " + ".join(ctx.full_name(n) for n in g.names())

    def match(self, ctx: RewriteContext) -> list[FusionGroup]:
        call_counts: dict[str, int] = {}
        for mg in ctx.graphs():
            for node in mg.nodes_of("call_module"):
                q = f"{mg.qualname}.{node.target}" if mg.qualname else str(node.target)
                call_counts[q] = call_counts.get(q, 0) + 1
        from fxpass.rules.analysis import weight_uses

        read = {u.linear for u in weight_uses(ctx)}
        groups = []
        for mg in ctx.graphs():
            by_input: dict[fx.Node, list[Member]] = {}
            for node in mg.nodes_of("call_module"):
                if len(node.args) != 1 or node.kwargs:
                    continue
                if not isinstance(node.args[0], fx.Node):
                    continue
                site = Site(mg, node)
                target = site.full_target()
                if target not in ctx.modules:
                    continue  # a layer another rule added (a tensor-parallel fused layer)
                mod = ctx.module(target)
                if _member_layer(ctx, mod):
                    member = Member(site, target, None)
                else:
                    linear, refusal = _thin_wrapper_linear(ctx, target)
                    if linear is None:
                        continue
                    member = Member(site, linear, target, refusal)
                if member.linear in ctx.tp_roles:
                    continue  # sharded (and fused, with fuse=True) by the tensor-parallel rule
                if call_counts.get(target, 0) > 1:
                    member.refusal = f"{target} is called more than once"
                elif member.linear in read:
                    member.refusal = f"{member.linear}'s weight is read in a graph"
                by_input.setdefault(node.args[0], []).append(member)
            groups += [FusionGroup(ms) for ms in by_input.values() if len(ms) > 1]
        return groups

    def check(self, ctx: RewriteContext, g: FusionGroup) -> str | None:
        for m in g.members:
            if m.refusal:
                return m.refusal
            if ctx.mode is Mode.FIRST_CALL:
                why = _loaded_refusal(ctx.module(m.linear))
                if why:
                    return f"{m.linear}: {why}"
            elif m.linear not in ctx.new_layers:
                return f"{m.linear} is not rewritten ({ctx.unsafe.get(m.linear, 'skipped')})"
        if ctx.mode is Mode.FIRST_CALL:
            return _same_layers(g.names(), [ctx.module(n) for n in g.names()])
        linears = [ctx.module(n) for n in g.names()]
        first = linears[0]
        for n, lin in zip(g.names(), linears):
            if lin.in_features != first.in_features or lin.weight.dtype != first.weight.dtype:
                return f"{n} differs in input size or dtype from {g.names()[0]}"
            if (lin.bias is None) != (first.bias is None):
                return f"{n} differs in bias from {g.names()[0]}"
        methods = {ctx.report.quant_methods[ctx.full_name(n)] for n in g.names()}
        if len(methods) != 1:
            return f"members have different quant methods {sorted(methods)}"
        return None

    def apply(self, ctx: RewriteContext, g: FusionGroup) -> None:
        from fxpass.weights import build_fused_from_loaded, build_fused_linear

        linears = [ctx.module(n) for n in g.names()]
        if ctx.mode is Mode.FIRST_CALL:
            layer = build_fused_from_loaded(linears, ctx.quant_config,
                                            ctx.full_name(g.names()[0]))
            sizes = [lin.output_size for lin in linears]
        else:
            layer = build_fused_linear(linears, ctx.quant_config, ctx.full_name(g.names()[0]))
            sizes = [lin.out_features for lin in linears]
        install_fused(ctx, g, layer, self.name, sizes)


def _loaded_refusal(layer: nn.Module) -> str | None:
    """Why a loaded vLLM layer cannot be a member of a layer fused at the first call."""
    from fxpass.weights import loaded_weight, tp_style

    if type(layer).__name__ != "ReplicatedLinear":
        return f"it is a {type(layer).__name__}, not a replicated vLLM layer"
    if tp_style(layer) is not None:
        return "it is sharded"
    _, why = loaded_weight(layer)
    return why or None


def _same_layers(names: list[str], layers: list[nn.Module]) -> str | None:
    from fxpass.weights import logical_weight_info

    first = layers[0]
    for n, lin in zip(names, layers):
        if (lin.input_size != first.input_size
                or logical_weight_info(lin)[0] != logical_weight_info(first)[0]):
            return f"{n} differs in input size or dtype from {names[0]}"
        if (lin.bias is None) != (first.bias is None):
            return f"{n} differs in bias from {names[0]}"
    return None


@dataclasses.dataclass
class SliceGroup:
    """Calls of FusedSlices of one merged layer on one input, in a graph traced after apply
    (the module's Python calls its fused members by name): one merged GEMM would serve them
    all, where each slice call runs the whole merged GEMM."""

    sites: list[Site]
    merged_path: str | None  # the merged layer's path from the traced module
    slices: list[tuple[int, int]]

    def describe(self) -> str:
        return " + ".join(s.name for s in self.sites)


class FusedSlices(RuleBase):
    """In a graph traced after apply, the members of a fused layer (``FusedSlice``) called
    on one input become one call of the fused layer again."""

    name = "fused-slices"
    phase = Phase.SPEED

    def enabled(self, options: Options, mode: Mode) -> bool:
        return mode is not Mode.APPLY

    def describe(self, ctx: RewriteContext, g: SliceGroup) -> str:
        return g.describe()

    def match(self, ctx: RewriteContext) -> list[SliceGroup]:
        return _slice_groups(ctx)

    def check(self, ctx: RewriteContext, g: SliceGroup) -> str | None:
        return None if g.merged_path else (
            "the merged layer is not a submodule of the module traced again")

    def apply(self, ctx: RewriteContext, g: SliceGroup) -> None:
        _regroup(ctx, g, "fusion")


def _slice_groups(ctx: RewriteContext) -> list[SliceGroup]:
    paths = {id(m): q for q, m in ctx.modules.items()}
    out = []
    for mg in ctx.graphs():
        by_input: dict[tuple[fx.Node, int], list[fx.Node]] = {}
        for node in mg.nodes_of("call_module"):
            if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
                continue
            q = Site(mg, node).full_target()
            mod = ctx.modules.get(q)
            if isinstance(mod, FusedSlice):
                by_input.setdefault((node.args[0], id(mod.merged)), []).append(node)
        for (_, merged_id), nodes in by_input.items():
            if len(nodes) < 2:
                continue
            path = paths.get(merged_id)
            if path is not None and mg.qualname:
                prefix = mg.qualname + "."
                path = path[len(prefix):] if path.startswith(prefix) else None
            mods = [ctx.modules[Site(mg, n).full_target()] for n in nodes]
            out.append(SliceGroup([Site(mg, n) for n in nodes], path,
                                  [(m.start, m.end) for m in mods]))
    return out


def _regroup(ctx: RewriteContext, g: SliceGroup, rule: str) -> None:
    """One call of the merged layer on the shared input, each member its slice of it: what
    each FusedSlice computes (``merged(x.contiguous())[..., start:end]``), with one GEMM."""
    mg = g.sites[0].graph
    graph = mg.own()
    nodes = [mg.node(s.name) for s in g.sites]
    x = nodes[0].args[0]
    with graph.inserting_before(nodes[0]):
        c = graph.call_method("contiguous", (x,))
        merged = graph.call_module(g.merged_path, (c,))
    for node, (start, end) in zip(nodes, g.slices):
        with graph.inserting_before(node):
            part = graph.call_function(operator.getitem,
                                       (merged, (Ellipsis, slice(start, end, None))))
        if tensor := meta.get(node, "tensor"):
            meta.info(part)["tensor"] = {**tensor, "contiguous": False}
        node.replace_all_uses_with(part)
        graph.erase_node(node)
    text = (f"{', '.join(str(n) for n in (s.name for s in g.sites))}: slices of "
            f"{g.merged_path} on one input -> one call of it")
    ctx.fix(rule, Site(mg, merged), text, detail=text)


def install_fused(ctx: RewriteContext, g: FusionGroup, layer: nn.Module, rule: str,
                  split_sizes: list[int]) -> str:
    """Put ``layer`` in place of the group: one call on the shared input, then a split into
    ``split_sizes`` (the members' outputs as this rank holds them); plan the swaps and
    report. Returns the fused layer's qualified name."""
    from fxpass.weights import quant_method_name

    mg = g.graph
    graph = mg.own()
    nodes = [mg.node(m.site.name) for m in g.members]
    rels = [str(n.target).split(".")[0] for n in nodes]
    attr = "fused__" + "__".join(rels)
    fused_q = f"{mg.qualname}.{attr}" if mg.qualname else attr
    sizes = list(split_sizes)

    x = nodes[0].args[0]
    with graph.inserting_before(nodes[0]):
        fused = graph.call_module(attr, (x,))
        parts = graph.call_function(torch.split, (fused, sizes), {"dim": -1})
        outs = [graph.call_function(operator.getitem, (parts, i)) for i in range(len(sizes))]
    method = quant_method_name(ctx.quant_config, layer)
    meta.info(fused)["rewrite"] = {
        "rule": rule, "layer": type(layer).__name__, "prefix": ctx.full_name(fused_q),
        "quant_method": method, "members": [ctx.full_name(n) for n in g.names()],
    }
    for node, out in zip(nodes, outs):
        if tensor := meta.get(node, "tensor"):
            meta.info(out)["tensor"] = {**tensor, "contiguous": False}
        meta.info(out)["inserted_by"] = rule
        node.replace_all_uses_with(out)
        graph.erase_node(node)

    start = 0
    for m, size in zip(g.members, sizes):
        ctx.new_layers.pop(m.linear, None)  # planned at apply; loaded already at a first call
        ctx.removed.append(m.wrapper or m.linear)
        # the member stays callable by name: a slice of the fused output (this rank's, under
        # tensor parallelism)
        ctx.fused_slices[m.wrapper or m.linear] = (fused_q, start, start + size)
        start += size
        if m.wrapper:
            ctx.trace.graphs.pop(m.wrapper, None)
    ctx.new_layers[fused_q] = layer
    ctx.fused[fused_q] = list(g.names())
    ctx.emit("fusion", rule, ctx.full_name(fused_q),
             members=[ctx.full_name(n) for n in g.names()], method=method)
    text = (f"{', '.join(g.names())} read one input: one {type(layer).__name__} "
            f"({'+'.join(map(str, sizes))} outputs) and a split")
    ctx.fix(rule, Site(mg, fused), text, detail=text)
    return fused_q
