"""The rewrite-rule protocol and the context rules share.

A rule is a small unit: ``match`` finds candidate sites, ``check`` says why a site must be
left alone (or None), ``apply`` edits. It declares its ``name``, its ``phase`` (when it runs),
the rules it must run ``after`` and when it is ``enabled`` (the session's options and mode);
the registry (``registry.py``) builds the list a session runs from those. Rules edit the
Trace's graphs, plan module swaps in the context and emit events (the report is built from
them); nothing touches the model until the session commits (``fxpass.rewrite.session``),
so a failure anywhere leaves the model as it was.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable, ClassVar, Iterator, Protocol

import torch.fx as fx
from torch import nn

from fxpass import meta
from fxpass.layers import is_vllm_linear  # noqa: F401 - re-exported for the rules
from fxpass.report import EventLog, Fix, Report
from fxpass.trace.graph import ModuleGraph
from fxpass.trace.hierarchy import Trace


class Site:
    """A node of one graph, with the graph's module path.

    Held by name: graphs are copied on first edit (``ModuleGraph.own``), and the name finds
    the same node in the copy.
    """

    def __init__(self, graph: ModuleGraph, node: fx.Node) -> None:
        self.graph = graph
        self.name = node.name

    @property
    def node(self) -> fx.Node:
        return self.graph.node(self.name)

    def own(self) -> fx.Node:
        """This site's node in a graph that may be edited."""
        self.graph.own()
        return self.node

    def full_target(self) -> str:
        q = self.graph.qualname
        return f"{q}.{self.node.target}" if q else str(self.node.target)


class Mode(enum.Enum):
    """Which entry point runs a session: the rules see it through ``enabled``."""

    APPLY = "apply"  # fxpass.apply with a trace: layers are built here
    FIRST_CALL = "first call"  # the tower's first real call: graphs for layers swapped at init
    RESPECIALISE = "re-specialise"  # a call no installed graph covers: one module's new graph


class Phase(enum.IntEnum):
    """When a rule runs; within a phase, registry order and ``after``."""

    SWAP = 0  # build the vLLM layers (they plan what the others look at)
    SHARD = 1  # tensor parallelism
    SPEED = 2  # opt-in speed rules (fuse=True)
    FIX = 3  # graph fixes every rewritten graph needs


@dataclasses.dataclass(frozen=True)
class Options:
    """What ``apply`` was asked for; one session's rules all read the same."""

    quant_config: Any = None
    prefix: str = ""
    fuse: bool = False
    tp: int = 1  # tensor-parallel size the tower is sharded for (1: replicated)
    load_weights: bool = False
    strict: bool = False
    disabled: frozenset[str] = frozenset()  # rule names switched off
    # the engine's VllmConfig when apply ran inside one: layers a later session builds (at a
    # first call) are built under it, as vLLM builds its own at model init
    vllm_config: Any = dataclasses.field(default=None, compare=False, repr=False)


@dataclasses.dataclass
class RewriteContext:
    model: nn.Module
    trace: Trace
    options: Options
    log: EventLog
    mode: Mode = Mode.APPLY
    prefix: str = ""  # the full name of ``model`` (the apply's prefix, and a path below it)
    # linear qualified name -> its tensor-parallel style, for the linears sharded by the
    # tensor-parallel rule (the other rules leave them to it)
    tp_roles: dict[str, str] = dataclasses.field(default_factory=dict)
    # (graph qualname, node name) -> the dim the tensor-parallel rule split that value along
    tp_split: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)
    # linear qualified name -> why the tensor-parallel rule left it replicated
    tp_refused: dict[str, str] = dataclasses.field(default_factory=dict)
    # qualified name -> vLLM layer planned to replace the module there (not yet installed);
    # its weights come from the module it replaces (load_weights) or vLLM's loader
    new_layers: dict[str, nn.Module] = dataclasses.field(default_factory=dict)
    # qualified name -> a module a rule adds at a new path (an attention layer: no weights
    # to load), registered on its parent when the session's graphs are installed (apply's
    # commit, a first call's install)
    added: dict[str, nn.Module] = dataclasses.field(default_factory=dict)
    # qualified name of a loaded vLLM layer -> the ``cpu_linear`` it computes with from the
    # commit on (a kernel chosen at the first call: rule fp32-gemm)
    kernels: dict[str, Any] = dataclasses.field(default_factory=dict)
    # qualified name -> why this linear must stay nn.Linear
    unsafe: dict[str, str] = dataclasses.field(default_factory=dict)
    edited: set[str] = dataclasses.field(default_factory=set)  # graphs changed
    removed: list[str] = dataclasses.field(default_factory=list)  # modules deleted at commit
    fused: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # fused -> members
    # removed member path -> (fused layer path, first output, end): a FusedSlice stands there
    fused_slices: dict[str, tuple[str, int, int]] = dataclasses.field(default_factory=dict)
    # every module of the model by qualified name (each path of a shared one); read once,
    # as the model does not change until the commit
    modules: dict[str, nn.Module] = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.modules:
            self.modules = dict(self.model.named_modules(remove_duplicate=False))

    @property
    def quant_config(self) -> Any:
        return self.options.quant_config

    @property
    def tp(self) -> int:
        return self.options.tp

    @property
    def report(self) -> Report:
        """What the session's events say so far (read-only)."""
        return self.log.report()

    def emit(self, kind: Any, rule: str, target: str = "", **data: Any) -> None:
        self.log.emit(kind, rule, target, **data)

    def full_name(self, qualname: str) -> str:
        return f"{self.prefix}.{qualname}" if self.prefix else qualname

    def module(self, qualname: str) -> nn.Module:
        mod = self.modules.get(qualname)
        if mod is None:
            return self.model.get_submodule(qualname)  # raises AttributeError naming the path
        return mod

    def layer_after(self, qualname: str) -> nn.Module:
        """The module that will sit at ``qualname`` once the plan is committed."""
        return self.new_layers.get(qualname) or self.module(qualname)

    def graphs(self) -> Iterator[ModuleGraph]:
        return iter(self.trace.graphs.values())

    def fix(self, rule: str, site: Site, note: str,
            edit: Callable[[fx.Graph, fx.Node], None] | None = None, *,
            detail: str | None = None) -> None:
        """Make a graph fix at ``site`` with ``edit(graph, node)`` and report it.

        ``note`` (kept on the node) says what the fix does in the graph's own terms, node
        targets relative to the graph's module; with ``edit`` it must name the edit
        completely, so that identical layers share one edited graph (``ModuleGraph.edit``).
        ``detail`` is the report's text (default: the note under the graph's path). Without
        ``edit`` the caller has already edited a graph it owns.
        """
        mg = site.graph
        name = site.name
        before = site.node.format_node()

        def run(graph: fx.Graph) -> None:
            node = next(n for n in graph.nodes if n.name == name)
            meta.info(node).setdefault("fixes", []).append({"rule": rule, "detail": note})
            if edit is not None:
                edit(graph, node)

        mg.edit((rule, name, note), run)
        if detail is None:
            detail = f"{mg.qualname}.{note}" if mg.qualname else note
        self.log.emit("fix", rule, mg.qualname, fix=Fix(rule, mg.qualname, before, detail))
        self.edited.add(mg.qualname)


def module_sites(ctx: RewriteContext, pred: Callable[[nn.Module], bool]
                 ) -> Iterator[tuple[Site, str]]:
    """Every call_module site of the graphs whose module satisfies ``pred``, with the
    module's qualified name (what a rule that replaces a module kind matches)."""
    for mg in ctx.graphs():
        for node in mg.nodes_of("call_module"):
            site = Site(mg, node)
            q = site.full_target()
            if q in ctx.modules and pred(ctx.module(q)):
                yield site, q


class Rule(Protocol):
    """match -> check -> apply. Register new rules in ``registry.RULES``.

    ``check`` returns why a match is left alone; the session emits that as a refusal
    (``describe`` names the match) unless the rule reports it itself (``refuse``).
    """

    name: ClassVar[str]
    phase: ClassVar[Phase]
    after: ClassVar[tuple[str, ...]]

    def enabled(self, options: Options, mode: Mode) -> bool: ...

    def match(self, ctx: RewriteContext) -> list[Any]: ...

    def check(self, ctx: RewriteContext, m: Any) -> str | None: ...

    def apply(self, ctx: RewriteContext, m: Any) -> None: ...

    def describe(self, ctx: RewriteContext, m: Any) -> str: ...

    def refuse(self, ctx: RewriteContext, m: Any, reason: str) -> None: ...


class RuleBase:
    """Defaults for a rule: every phase-FIX rule runs in every mode, refusals are reported
    with ``describe``'s text (the graph and node)."""

    name: ClassVar[str] = ""
    phase: ClassVar[Phase] = Phase.FIX
    after: ClassVar[tuple[str, ...]] = ()

    def enabled(self, options: Options, mode: Mode) -> bool:
        return True

    def describe(self, ctx: RewriteContext, m: Any) -> str:
        site = getattr(m, "site", None)
        if isinstance(site, Site):
            q = site.graph.qualname
            return f"{ctx.full_name(q) if q else ctx.prefix or '<root>'}: {site.name}"
        return str(m)

    def refuse(self, ctx: RewriteContext, m: Any, reason: str) -> None:
        ctx.emit("refusal", self.name, target=self.describe(ctx, m), reason=reason)


class SpeedRule(RuleBase):
    """An opt-in speed rule (``fuse=True``): graph edits only, so it runs in every mode."""

    phase = Phase.SPEED

    def enabled(self, options: Options, mode: Mode) -> bool:
        return options.fuse
