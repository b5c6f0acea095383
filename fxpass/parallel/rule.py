"""Rule (``tp > 1``): shard column -> row linear pairs over the tensor-parallel ranks.

vLLM's hand-written towers split each layer's weights across the TP ranks
(``mm_encoder_tp_mode="weights"``, the default): q/k/v (and an MLP's up projections) are
column-parallel, each rank computing its block of heads / channels, and the output
projection is row-parallel, summing the ranks' partial products in one all-reduce. An HF
tower rewritten linear by linear is replicated whole on every rank; only the graph shows
which linears form such a pair and whether everything between them keeps heads / channels
apart. In each traced graph:

* **match** — for each linear site (an ``nn.Linear`` call, or a thin wrapper module around
  one such as ``Gemma4ClippableLinear``), the linears its input comes from (stopping at the
  first linear on every path) are the column group; everything downstream of the group is
  followed by :mod:`fxpass.parallel.sharding`, and any other linear the sharded values reach
  joins as row-parallel;
* **check** — refuses the pair, naming the op, where an op between them mixes heads or
  channels (or is not on the whitelist), where a sharded dim (a head count) does not divide
  by the TP size (vLLM falls back to data parallel there: replicated), where a weight is read
  outside its call or a member stays ``nn.Linear`` (tied weights), where a sharded value
  leaves the module other than into an unused output;
* **apply** — the group becomes ``ColumnParallelLinear`` (``gather_output=False``; with
  ``fuse=True`` members reading one input become one ``QKVParallelLinear`` /
  ``MergedColumnParallelLinear``), the consumer ``RowParallelLinear``
  (``input_is_parallel=True``), and graph constants that bake the full head count or width
  between them (``view(b, s, 8, 64)``) are rewritten to the per-rank value.

Everything not sharded stays replicated, as with ``tp=1``. Each layer's parallel style (or
why it stayed replicated) is in ``report.tp``.
"""

from __future__ import annotations

import builtins
import dataclasses
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxpass.rules.analysis import is_probe, weight_uses
from fxpass.rules.base import (
    Mode,
    Options,
    Phase,
    RewriteContext,
    RuleBase,
    Site,
    is_vllm_linear,
)
from fxpass.parallel.sharding import (
    Analysis,
    NeedsRow,
    Propagator,
    Refuse,
    has_sharded,
    is_rep,
    spec,
)
from fxpass.trace.graph import ModuleGraph

# weight metadata a sharded layer still reports as HF's (dtype / device); shapes differ
_SAFE_PROBES = frozenset({"dtype", "device", "is_cuda", "is_meta", "is_floating_point",
                          "is_complex", "get_device"})


@dataclasses.dataclass
class LinearSite:
    """A call of one linear in a graph: directly, or through a one-linear wrapper module."""

    node: str  # call_module node name in the graph
    linear: str  # qualified name of the nn.Linear
    wrapper: str | None  # qualified name of the wrapper module called instead, if any
    refusal: str | None = None  # why this linear cannot be sharded


@dataclasses.dataclass
class TPPair:
    graph: ModuleGraph
    columns: list[LinearSite]
    rows: list[LinearSite]
    analysis: Analysis | None = None
    refusal: str | None = None
    # (caller graph, call node) of the module, where it returns a sharded (unused) value
    callers: list[tuple[ModuleGraph, str]] = dataclasses.field(default_factory=list)

    def names(self) -> list[str]:
        return [s.linear for s in (*self.columns, *self.rows)]


class TensorParallel(RuleBase):
    name = "tensor-parallel"
    phase = Phase.SHARD

    def enabled(self, options: Options, mode: Mode) -> bool:
        # at apply with a trace, or at the first call of a tower applied without inputs (the
        # sharded layers are built then from the replicated ones the loader filled); graphs
        # traced later: ``reshard``
        return options.tp > 1 and mode in (Mode.APPLY, Mode.FIRST_CALL)
    # it only fires inside a tensor-parallel group of more than one rank (its failure
    # injection runs on two ranks: tests/parallel/test_tensor_parallel_ranks.py)
    needs_tp_group = True

    def describe(self, ctx: RewriteContext, p: TPPair) -> str:
        cols = " + ".join(ctx.full_name(s.linear) for s in p.columns)
        rows = " + ".join(ctx.full_name(s.linear) for s in p.rows)
        return f"{cols} -> {rows}"

    # -- match -------------------------------------------------------------------------------

    def match(self, ctx: RewriteContext) -> list[TPPair]:
        planner = _Planner(ctx)
        pairs = []
        for mg in ctx.graphs():
            pairs += planner.plan(mg)
        for p in pairs:
            if p.refusal is not None:
                for s in (*p.columns, *p.rows):
                    planner.replicated.setdefault(s.linear, f"pair refused: {p.refusal}")
        ctx.tp_refused.update(planner.replicated)
        return pairs

    def check(self, ctx: RewriteContext, p: TPPair) -> str | None:
        return p.refusal

    # -- apply -------------------------------------------------------------------------------

    def apply(self, ctx: RewriteContext, p: TPPair) -> None:
        from fxpass.weights import build_parallel_linear, quant_method_name

        assert p.analysis is not None
        fusing = ctx.options.fuse and "fusion" not in ctx.options.disabled  # one switch
        fused = _fuse_groups(ctx, p) if fusing else []
        in_group = {s.node for g in fused for s in g}
        for s in p.columns:
            if s.node not in in_group:
                self._swap(ctx, p, s, "column", build_parallel_linear, quant_method_name)
        for s in p.rows:
            self._swap(ctx, p, s, "row", build_parallel_linear, quant_method_name)
        for q, node, av in p.analysis.module_outputs:  # verify slices the reference there
            mg = ctx.trace.graphs.get(q)
            if mg is not None:
                mg.annotate(node, "tp_out", spec(av))
        for q, node, av in p.analysis.module_inputs:  # this module sees per-rank shapes
            mg = ctx.trace.graphs.get(q)
            if mg is not None:
                mg.annotate(node, "tp_in", spec(av))
        for name, av in p.analysis.env.items():  # per-rank shapes, for rules after this one
            if av.kind == "S":
                ctx.tp_split[(p.graph.qualname, name)] = av.dim
        for parent, call in p.callers:  # the module's own output, as its callers see it
            parent.annotate(call, "tp_out", spec(p.analysis.output))
        if p.callers:  # and on its graph's output (a new trace of it must return the same)
            out = next(n for n in p.graph.graph.nodes if n.op == "output")
            p.graph.annotate(out.name, "tp_out", spec(p.analysis.output))
        for group in fused:
            self._fuse(ctx, p, group)
        for edit in p.analysis.edits:
            path, new = edit.path, edit.new

            def rewrite(graph: fx.Graph, node: fx.Node, path: Any = path, new: int = new
                        ) -> None:
                node.args, node.kwargs = _replace_at((node.args, node.kwargs), path, new)

            ctx.fix(self.name, Site(p.graph, p.graph.node(edit.node)), edit.why, rewrite)
        ctx.emit("tp-pair", self.name, p.graph.qualname, pair={
            "graph": p.graph.qualname,
            "columns": [ctx.full_name(s.linear) for s in p.columns],
            "rows": [ctx.full_name(s.linear) for s in p.rows],
            "constants": [e.why for e in p.analysis.edits],
        })

    def _swap(self, ctx: RewriteContext, p: TPPair, s: LinearSite, style: str,
              build: Any, method_name: Any) -> None:
        from fxpass.weights import load_linear_weights

        full = ctx.full_name(s.linear)
        linear = source_linear(ctx, s.linear)
        layer = build(linear, ctx.quant_config, full, style)
        if ctx.mode is Mode.FIRST_CALL:  # no load step follows: this rank's block now
            load_linear_weights(layer, linear.weight, linear.bias, ctx.quant_config)
        ctx.new_layers[s.linear] = layer
        ctx.tp_roles[s.linear] = type(layer).__name__
        method = method_name(ctx.quant_config, layer)
        ctx.emit("swap", self.name, full, method=method)
        info = {"style": type(layer).__name__, "tp": ctx.tp,
                "pair": " + ".join(c.linear for c in p.columns) + " -> "
                        + " + ".join(r.linear for r in p.rows)}
        # the linear rule's annotation on the call, naming the layer actually built
        rewrite = {"rule": "linear", "layer": type(layer).__name__, "quant_method": method,
                   "was": type(linear).__name__}
        p.graph.annotate(s.node, "tp", info)
        if s.wrapper is None:
            p.graph.annotate(s.node, "rewrite", rewrite)
            return
        inner = ctx.trace.graphs.get(s.wrapper)  # the layer sits in the wrapper's graph
        rel = s.linear[len(s.wrapper) + 1:]
        node = next((n for n in inner.nodes_of("call_module") if n.target == rel), None
                    ) if inner is not None else None
        if node is not None:
            inner.annotate(node.name, "tp", info)
            inner.annotate(node.name, "rewrite", rewrite)

    def _fuse(self, ctx: RewriteContext, p: TPPair, group: list[LinearSite]) -> None:
        from fxpass.rules.fusion import FusionGroup, Member, install_fused
        from fxpass.weights import build_fused_parallel_linear

        linears = [source_linear(ctx, s.linear) for s in group]
        units = {p.analysis.head_units.get(s.node) for s in group}  # type: ignore[union-attr]
        head = units.pop() if len(units) == 1 else None
        layer = build_fused_parallel_linear(linears, ctx.quant_config,
                                            ctx.full_name(group[0].linear), head_size=head)
        if ctx.mode is Mode.FIRST_CALL:
            from fxpass.weights import load_fused_weights

            load_fused_weights(layer, [(lin.weight, lin.bias) for lin in linears],
                               ctx.quant_config)
        members = [Member(Site(p.graph, p.graph.node(s.node)), s.linear, s.wrapper)
                   for s in group]
        fused_q = install_fused(ctx, FusionGroup(members), layer, self.name,
                                [lin.out_features // ctx.tp for lin in linears])
        style = type(layer).__name__
        for s in group:
            ctx.tp_roles[s.linear] = style
        node = next(n for n in p.graph.nodes_of("call_module")
                    if n.target == fused_q.rpartition(".")[2])
        p.graph.annotate(node.name, "tp", {
            "style": style, "tp": ctx.tp, "members": [s.linear for s in group]})


def owns_pairs(graph: fx.Graph) -> bool:
    """True for a graph that calls sharded layers itself and is fed replicated values."""
    infos = [n.meta.get("fxpass", {}) for n in graph.nodes]
    return any("tp" in i for i in infos) and not any("tp_in" in i for i in infos)


class StandIns:
    """The sharded vLLM layers under ``module`` replaced by full-size ``nn.Linear`` of zeros
    (HF's logical shape and dtype, the layer's device), until :meth:`restore` (idempotent):
    tracing the module then follows its unsharded code path with full shapes."""

    def __init__(self, module: nn.Module) -> None:
        from fxpass.errors import TraceError
        from fxpass.weights import logical_weight_info, tp_style

        self.swapped: list[tuple[nn.Module, str, nn.Module]] = []
        todo = []
        for path, sub in module.named_modules():
            if not path or not is_vllm_linear(sub) or tp_style(sub) is None:
                continue
            if len(getattr(sub, "output_sizes", None) or [1]) > 1:
                raise TraceError(f"{path} is a fused tensor-parallel layer; a module holding "
                                 "one is not traced again")
            dtype, shape, device = logical_weight_info(sub)
            stand_in = nn.Linear(shape[1], shape[0], bias=getattr(sub, "bias", None) is not None,
                                 device=device, dtype=dtype)
            with torch.no_grad():  # only shapes matter while tracing; zeros stay finite
                for p in stand_in.parameters():
                    p.zero_()
            parent, _, child = path.rpartition(".")
            todo.append((module.get_submodule(parent) if parent else module, child, stand_in))
        for parent, child, stand_in in todo:
            self.swapped.append((parent, child, getattr(parent, child)))
            setattr(parent, child, stand_in)

    def restore(self) -> None:
        while self.swapped:
            parent, child, layer = self.swapped.pop()
            setattr(parent, child, layer)


def reshard(module: nn.Module, mg: ModuleGraph) -> None:
    """Shard a graph traced again for a module that owns tensor-parallel pairs: the sharding
    analysis with each call's role taken from the layer it calls (column / row), the graph's
    constants that bake a full head count rewritten; TraceError (with the reason) where the
    new graph cannot run on each rank's block."""
    from fxpass.errors import TraceError
    from fxpass.runtime.install import installed_graph
    from fxpass.trace.tracer import is_constant
    from fxpass.weights import tp_style

    def resolve(node: fx.Node, parent: Any) -> tuple[str, Any]:
        q = f"{parent.qualname}.{node.target}" if parent.qualname else str(node.target)
        try:
            sub = module.get_submodule(q)
        except AttributeError:
            return "opaque", q
        if isinstance(sub, nn.Linear) or is_vllm_linear(sub):
            return "linear", q
        fwd = installed_graph(sub)
        if fwd is not None:
            return "graph", (ModuleGraph(q, type(sub).__name__, fwd.graph, fwd.spec), sub)
        return "opaque", f"{q} ({type(sub).__name__})"

    saved, mg.qualname = mg.qualname, ""
    try:
        roles: dict[str, str] = {}
        styles: dict[str, str] = {}
        tp = 1
        for node in mg.nodes_of("call_module"):
            kind, payload = resolve(node, mg)
            layer = None
            if kind == "linear":
                layer = module.get_submodule(payload)
            elif kind == "graph":
                sub_mg, _ = payload
                inner = [n for n in sub_mg.graph.nodes if n.op == "call_module"]
                if len(inner) == 1 and resolve(inner[0], sub_mg)[0] == "linear":
                    layer = module.get_submodule(resolve(inner[0], sub_mg)[1])
            style = tp_style(layer) if layer is not None and is_vllm_linear(layer) else None
            if style is not None:
                roles[node.name] = style
                styles[node.name] = type(layer).__name__
                tp = layer.tp_size
        if any(n.op == "call_function" and is_constant(n.target) for n in mg.graph.nodes):
            raise TraceError("the new graph holds tensors made while tracing (on meta)")
        try:
            analysis = Propagator(mg, tp, roles, resolve).run()
        except NeedsRow as e:
            raise TraceError(f"tensor parallel: a sharded value reaches {e.node}") from e
        except Refuse as e:
            raise TraceError(f"tensor parallel: {e}") from e
        fwd = installed_graph(module)
        before = None
        if fwd is not None:  # what the callers were checked against at apply
            out = next(n for n in fwd.graph.nodes if n.op == "output")
            before = out.meta.get("fxpass", {}).get("tp_out")
        if has_sharded(analysis.output) and spec(analysis.output) != before:
            raise TraceError("tensor parallel: the new graph returns a sharded value its "
                             "callers were not checked for")
        by_name = {n.name: n for n in mg.graph.nodes}
        for edit in analysis.edits:
            node = by_name[edit.node]
            node.args, node.kwargs = _replace_at((node.args, node.kwargs), edit.path, edit.new)
        for name, style in styles.items():
            by_name[name].meta.setdefault("fxpass", {})["tp"] = {"style": style, "tp": tp}
        for q, name, av in analysis.module_outputs:
            if q == "" and name in by_name:
                by_name[name].meta.setdefault("fxpass", {})["tp_out"] = spec(av)
        mg.graph.lint()
    finally:
        mg.qualname = saved


def runs_sharded(graph: fx.Graph) -> bool:
    """True for a graph the tensor-parallel rule made per-rank (it calls a sharded layer or
    is fed a sharded value): its module's Python forward would not compute the same."""
    return any("tp" in n.meta.get("fxpass", {}) or "tp_in" in n.meta.get("fxpass", {})
               for n in graph.nodes)


def _replace_at(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    """``obj`` (nested tuples / lists / dicts, fx's immutable ones too) with the item at
    ``path`` replaced."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(obj, dict):
        out = dict(obj)
        out[head] = _replace_at(obj[head], rest, value)
        return out
    items = list(obj)
    items[head] = _replace_at(items[head], rest, value)
    return tuple(items) if isinstance(obj, tuple) else items


def _fuse_groups(ctx: RewriteContext, p: TPPair) -> list[list[LinearSite]]:
    """Column members reading one input, fusable exactly (same dtype / bias / quant method,
    thin wrappers without per-layer ops): one fused column-parallel layer each."""
    from fxpass.rules.fusion import _thin_wrapper_linear

    by_input: dict[Any, list[LinearSite]] = {}
    for s in p.columns:
        node = p.graph.node(s.node)
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            continue
        if s.wrapper is not None and _thin_wrapper_linear(ctx, s.wrapper)[1] is not None:
            continue
        by_input.setdefault(node.args[0].name, []).append(s)
    groups = []
    for members in by_input.values():
        if len(members) < 2:
            continue
        linears = [source_linear(ctx, s.linear) for s in members]
        first = linears[0]
        if any(lin.in_features != first.in_features or lin.weight.dtype != first.weight.dtype
               or (lin.bias is None) != (first.bias is None) for lin in linears):
            continue
        methods = {ctx.report.quant_methods.get(ctx.full_name(s.linear)) for s in members}
        if len(methods) != 1:
            continue
        groups.append(members)
    return groups


class _Planner:
    """Finds the pairs of each graph (see the module docstring); keeps what it learnt."""

    def __init__(self, ctx: RewriteContext) -> None:
        self.ctx = ctx
        self.calls: dict[str, int] = {}
        self.callers: dict[str, list[tuple[ModuleGraph, fx.Node]]] = {}
        for mg in ctx.graphs():
            for node in mg.nodes_of("call_module"):
                q = f"{mg.qualname}.{node.target}" if mg.qualname else str(node.target)
                self.calls[q] = self.calls.get(q, 0) + 1
                self.callers.setdefault(q, []).append((mg, node))
        self.weight_reads: dict[str, str] = {}
        for use in weight_uses(ctx):
            bad = [u for u in (*use.probes, *use.value_users) if not _safe_probe(u)]
            if bad:
                self.weight_reads.setdefault(
                    use.linear, f"graph {use.site.graph.qualname or '<root>'} reads its "
                                f"{use.attr} outside its call ({bad[0].format_node()}); a "
                                "sharded layer holds only its rank's block")
        self.replicated: dict[str, str] = {}

    # what a call_module node calls
    def resolve(self, node: fx.Node, mg: Any) -> tuple[str, Any]:
        q = f"{mg.qualname}.{node.target}" if mg.qualname else str(node.target)
        try:
            module = self.ctx.module(q)
        except AttributeError:
            return "opaque", q
        if isinstance(module, nn.Linear) or is_vllm_linear(module):
            return "linear", q
        sub = self.ctx.trace.graphs.get(q)
        if sub is not None:
            return "graph", (sub, module)
        return "opaque", f"{q} ({type(module).__name__})"

    def site(self, mg: ModuleGraph, node: fx.Node) -> LinearSite | None:
        kind, payload = self.resolve(node, mg)
        if kind == "linear":
            return LinearSite(node.name, payload, None, self._refusal(payload, payload))
        if kind != "graph":
            return None
        sub, _ = payload
        calls = sub.nodes_of("call_module")
        linears = [n for n in calls if self.resolve(n, sub)[0] == "linear"]
        if len(calls) != 1 or len(linears) != 1:
            return None
        inner = self.resolve(linears[0], sub)[1]
        return LinearSite(node.name, inner, sub.qualname, self._refusal(inner, sub.qualname))

    def _refusal(self, linear: str, called: str) -> str | None:
        ctx = self.ctx
        if ctx.mode is Mode.FIRST_CALL:  # the layers vLLM's loader filled at init
            layer = ctx.module(linear)
            if type(layer).__name__ != "ReplicatedLinear":
                return f"it is a {type(layer).__name__}, not a replicated vLLM layer"
            from fxpass.weights import loaded_linear

            why = loaded_linear(layer)[1]
            if why:
                return why
        else:
            layer = ctx.new_layers.get(linear)
            if layer is None or type(layer).__name__ != "ReplicatedLinear":
                why = ctx.unsafe.get(linear) or ctx.report.skipped.get(ctx.full_name(linear))
                return f"it stays nn.Linear ({why or 'not rewritten'})"
        if self.calls.get(called, 0) > 1 or (called != linear and self.calls.get(linear, 0) > 1):
            return "it is called more than once (one layer cannot be column and row)"
        if linear in self.weight_reads:
            return self.weight_reads[linear]
        return None

    def plan(self, mg: ModuleGraph) -> list[TPPair]:
        sites: dict[str, LinearSite] = {}
        for node in mg.nodes_of("call_module"):
            s = self.site(mg, node)
            if s is not None:
                sites[node.name] = s
        if len(sites) < 2:
            return []
        taken: set[str] = set()
        pairs = []
        for name in [n.name for n in mg.graph.nodes if n.name in sites]:
            if name in taken:
                continue
            cols = _cone(mg.node(name), sites)
            if not cols or all(c in taken for c in cols):
                continue
            pair = self._pair(mg, sites, cols, name, taken)
            if pair.refusal is None:
                taken.update(s.node for s in (*pair.columns, *pair.rows))
            pairs.append(pair)
        return pairs

    def _pair(self, mg: ModuleGraph, sites: dict[str, LinearSite], cols: list[str], row: str,
              taken: set[str]) -> TPPair:
        roles = {c: "column" for c in cols}
        roles[row] = "row"

        def result(refusal: str | None, analysis: Analysis | None = None) -> TPPair:
            return TPPair(mg, [sites[n] for n in roles if roles[n] == "column"],
                          [sites[n] for n in roles if roles[n] == "row"], analysis, refusal)

        for _ in range(len(sites) + 1):
            for n in roles:
                if n in taken:
                    return result(f"{sites[n].linear} is already sharded in another pair")
                if sites[n].refusal:
                    return result(f"{sites[n].linear}: {sites[n].refusal}")
            try:
                analysis = Propagator(mg, self.ctx.tp, roles, self.resolve).run()
            except NeedsRow as e:
                if e.node in sites and e.node not in roles:
                    roles[e.node] = "row"
                    continue
                return result(f"a sharded value reaches the linear call {e.node}, which cannot "
                              "take it")
            except Refuse as e:
                return result(str(e))
            pair = result(self._escapes(mg, analysis), analysis)
            if has_sharded(analysis.output):
                pair.callers = [(parent, call.name)
                                for parent, call in self.callers.get(mg.qualname, [])]
            return pair
        return result("the pair does not settle")

    def _escapes(self, mg: ModuleGraph, analysis: Analysis) -> str | None:
        """A sharded value may leave the module only into an output its callers drop."""
        out = analysis.output
        if not has_sharded(out):
            return None
        where = mg.qualname or "<root>"
        if out.kind != "T":
            return f"{where} returns the sharded value itself"
        callers = self.callers.get(mg.qualname, [])
        if not callers:
            return f"{where} returns a sharded value and no traced graph calls it"
        for parent, call in callers:
            for user in call.users:
                if user.op == "call_function" and user.target is builtins.len:
                    continue  # the tuple's length: the same on every rank
                index = user.args[1] if (user.op == "call_function" and user.args
                                         and getattr(user.target, "__name__", "") == "getitem"
                                         ) else None
                if not isinstance(index, int):
                    return (f"{where} returns a sharded value and its caller "
                            f"{parent.qualname or '<root>'} uses the output as a whole "
                            f"({user.format_node()})")
                item = out.items[index] if -len(out.items) <= index < len(out.items) else None
                if item is not None and not is_rep(item) and user.users:
                    return (f"{where} returns a sharded value (output {index}, per-head "
                            f"data such as attention weights) that its caller "
                            f"{parent.qualname or '<root>'} uses")
        return None


def _safe_probe(user: fx.Node) -> bool:
    if not is_probe(user):
        return False
    what = user.args[1] if user.op == "call_function" else user.target
    return what in _SAFE_PROBES


def _cone(node: fx.Node, sites: dict[str, LinearSite]) -> list[str]:
    """The linear sites the input of ``node`` comes from (the first linear on each path)."""
    found: list[str] = []
    seen: set[fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.name in sites:
            found.append(n.name)
            continue
        if n.op in ("placeholder", "get_attr"):
            continue
        stack.extend(n.all_input_nodes)
    order = {n.name: i for i, n in enumerate(node.graph.nodes)}
    return sorted(found, key=order.__getitem__)


def source_linear(ctx: RewriteContext, qualname: str) -> nn.Linear:
    """The ``nn.Linear`` a sharded layer is built (and, at a first call, loaded) from: the HF
    linear at apply; at a first call, the replicated layer vLLM's loader filled, viewed as
    one (the planner refused layers without a loaded weight)."""
    if ctx.mode is not Mode.FIRST_CALL:
        return ctx.module(qualname)
    from fxpass.errors import RewriteError
    from fxpass.weights import loaded_linear

    linear, why = loaded_linear(ctx.module(qualname))
    if linear is None:
        raise RewriteError(f"{ctx.full_name(qualname)}: {why}")
    return linear


def report_sharding(ctx: RewriteContext) -> None:
    """Each linear's parallel style or why it stayed replicated, and the share of the
    tower's parameter bytes that is sharded (as loaded: vLLM-CPU empties packed weights)."""
    from fxpass.weights import logical_weight_info

    for q, style in ctx.tp_roles.items():
        ctx.emit("shard", "tensor-parallel", ctx.full_name(q), style=style)
    for name, why in replicated_reasons(ctx).items():
        ctx.emit("replicated", "tensor-parallel", name, reason=why)

    def nbytes(module: nn.Module) -> int:
        if is_vllm_linear(module):
            dtype, shape, _ = logical_weight_info(module)
            bias = getattr(module, "bias", None)
            return (shape.numel() * dtype.itemsize
                    + (bias.numel() * bias.element_size() if bias is not None else 0))
        return sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))

    total = sum(nbytes(m) for m in ctx.model.modules())
    sharded = sum(nbytes(ctx.module(q)) for q in ctx.tp_roles)
    ctx.log.set("tp_sharded_fraction", sharded / total if total else 0.0)


def replicated_reasons(ctx: RewriteContext) -> dict[str, str]:
    """Why each rewritten linear that is not sharded stayed replicated (full names)."""
    refused = getattr(ctx, "tp_refused", {})
    out = {}
    layers = ctx.new_layers
    if ctx.mode is Mode.FIRST_CALL:  # the replicated layers loaded at init
        layers = {q: m for q, m in ctx.modules.items()
                  if type(m).__name__ == "ReplicatedLinear"}
    for q, layer in layers.items():
        members = ctx.fused.get(q, [q])
        for m in members:
            if m in ctx.tp_roles:
                continue
            out[ctx.full_name(m)] = refused.get(m, "not in a column -> row pair (no linear "
                                                   "feeds it through per-head / per-channel "
                                                   "ops in its graph)")
    return out


def plan(model: nn.Module, tp: int, *, example_inputs: Any = None, prefix: str = ""
         ) -> list[dict[str, Any]]:
    """The pairs ``apply(model, tp=tp)`` would shard or refuse, without a TP group or
    changing the model: ``[{"columns", "rows", "constants", "refusal"}]`` (full names; the
    refusal None for a pair that would be sharded). For checks and tests on one process."""
    from fxpass.report import EventLog
    from fxpass.rules.analysis import mark_unsafe
    from fxpass.rules.linear import LinearToVllm
    from fxpass.trace.hierarchy import trace
    from fxpass.vllm_context import vllm_runtime

    tr = trace(model, example_inputs)
    ctx = RewriteContext(model, tr, Options(prefix=prefix, tp=tp), EventLog(prefix, tp),
                         prefix=prefix)
    mark_unsafe(ctx)
    rule = LinearToVllm()
    with vllm_runtime():
        for m in rule.match(ctx):
            if rule.check(ctx, m) is None:
                rule.apply(ctx, m)
    return [{"columns": [ctx.full_name(s.linear) for s in p.columns],
             "rows": [ctx.full_name(s.linear) for s in p.rows],
             "constants": [e.why for e in p.analysis.edits] if p.analysis else [],
             "refusal": p.refusal} for p in TensorParallel().match(ctx)]
