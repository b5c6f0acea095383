"""Dispatch per call: the installed forward picks the graph that serves a call.

A traced module's ``forward`` becomes a :class:`GraphForward` over its graph. Every call is
checked against what the graph was traced for: the argument structure, the flags baked in,
the training flag, the module state the forward read (``trace/state.py``) and the guard
nodes inside the graph. A call the graph does not cover is never a wrong answer, and never
an error the module itself would not raise:

* it **re-specialises**: the module is traced again for that call and the policy
  (:class:`~fxpass.runtime.policy.Respecialiser`; the rewrite stage's runs the rules) turns
  it into a graph that serves the call; at most ``MAX_VARIANTS`` graphs per module, shared
  by identical modules (one :class:`Family`);
* past that bound, when the new trace fails, or while dynamo traces / a CUDA graph is
  captured (never a trace there), the module's **Python forward** serves the call, with one
  warning per module naming why; where Python would lose a fix the graph carried, the policy
  raises :class:`~fxpass.errors.FallbackError` naming the module and the fix.

A *strict* forward raises :class:`~fxpass.errors.GuardError` instead: that is how tests prove
what the graphs cover.
"""

from __future__ import annotations

import itertools
import linecache
import logging
import threading
import weakref
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from fxpass.errors import GuardError, NotLoadedError
from fxpass.runtime.policy import Respecialiser, why_no_trace
from fxpass.trace import guards
from fxpass.trace.binding import (
    bind_module_call,
    call_form,
    call_key,
    forward_is_wrapped,
    forward_signature,
    is_leaf,
    kinds_match,
    plan_of,
    show_value,
)
from fxpass.trace.graph import ModuleGraph
from fxpass.trace.state import same as _same
from fxpass.trace.tracer import TRACE_LOCK, is_constant

logger = logging.getLogger("fxpass")

# shared graph -> its generated forward and source (see CompiledGraph)
_CODE: "weakref.WeakKeyDictionary[fx.Graph, tuple[Callable[..., Any], str]]" = (
    weakref.WeakKeyDictionary())

_counter = itertools.count()
_MISS = object()


class CompiledGraph:
    """One graph's generated code and the call structure it serves."""

    __slots__ = ("spec", "fn", "src", "graph", "owner", "__weakref__")

    def __init__(self, mg: ModuleGraph, owner: "weakref.ref[nn.Module] | None" = None) -> None:
        compiled = _CODE.get(mg.graph) if mg.shared else None
        if compiled is None:
            compiled = _compile(mg)
            if mg.shared:  # never edited in place: every module running it shares the code
                _CODE[mg.graph] = compiled
        self.fn: Callable[..., Any] = compiled[0]
        self.src: str = compiled[1]
        self.graph = mg.graph
        self.spec = mg.spec
        self.owner = owner  # set when the graph holds tensors made while tracing that module

    @classmethod
    def of(cls, mg: ModuleGraph, module: nn.Module) -> "CompiledGraph":
        """A graph traced for ``module`` after install: tied to it when the graph holds
        tensors made while tracing it (another module of the family must not run them)."""
        owner = (weakref.ref(module) if any(n.op == "call_function" and is_constant(n.target)
                                            for n in mg.graph.nodes) else None)
        return cls(mg, owner)

    def inputs(self, module: nn.Module, args: tuple[Any, ...],
               kwargs: dict[str, Any], explain: bool = True) -> list[Any] | str:
        """The graph's inputs for this call, or why the graph does not serve it (with
        ``explain=False`` just "miss": dynamo cannot trace the reprs of a reason)."""
        spec = self.spec
        if self.owner is not None and self.owner() is not module:
            return "its graph holds tensors made while tracing another module"
        if spec.training is not None and module.training != spec.training:
            return (f"the module is in {'training' if module.training else 'eval'} mode, but "
                    f"its graph was traced in {'training' if spec.training else 'eval'} mode")
        if spec.reads and not spec.reads.hold(module):
            return "miss" if not explain else (spec.reads.why_not(module) or "miss")
        args, kwargs = bind_module_call(module, args, kwargs)
        leaves, treespec = pytree.tree_flatten((args, kwargs))
        if treespec != spec.treespec:
            return "miss" if not explain else (
                f"called as {call_form(treespec)}, but its graph was traced for "
                f"{call_form(spec.treespec)}")
        for i, expected in spec.constants.items():
            if not _same(leaves[i], expected):
                return "miss" if not explain else (
                    f"argument leaf {i} is {show_value(leaves[i])}, but the graph was traced "
                    f"with {show_value(expected)} baked in")
        inputs = [leaves[i] for i in spec.placeholders]
        if not kinds_match(inputs, spec):
            return "miss" if not explain else (
                "an argument the graph takes as a tensor (or an int) is something else here "
                f"({', '.join(type(x).__name__ for x in inputs)})")
        return inputs

    def run(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The call's result, or ``_MISS`` when this graph does not cover the call."""
        inputs = self.inputs(module, args, kwargs)
        if isinstance(inputs, str):
            return _MISS
        try:
            return self.fn(module, *inputs)
        except GuardError as e:
            if _raised_by_own_guard(e, self.fn):
                return _MISS
            raise


def _compile(mg: ModuleGraph) -> tuple[Callable[..., Any], str]:
    code = mg.graph.python_code(root_module="self")
    # shared code runs for every module with this graph: name it by class, not by one of them
    name = mg.module_type if mg.shared else (mg.qualname or "<root>")
    filename = f"<fxpass graph {name} #{next(_counter)}>"
    linecache.cache[filename] = (len(code.src), None, code.src.splitlines(True), filename)
    namespace = dict(code.globals)
    exec(compile(code.src, filename, "exec"), namespace)  # noqa: S102 - fx-generated code
    return namespace["forward"], code.src


def _raised_by_own_guard(e: GuardError, fn: Callable[..., Any]) -> bool:
    """Whether ``e`` came from a guard node of ``fn``'s graph (not from deeper down)."""
    tb = e.__traceback__
    while tb is not None and tb.tb_frame.f_code is not fn.__code__:
        tb = tb.tb_next
    return (tb is not None and tb.tb_next is not None
            and tb.tb_next.tb_frame.f_code is guards.guard.__code__
            and tb.tb_next.tb_next is None)


class Family:
    """The graphs traced after install for one group of identical modules, and which call
    metadata each served last (a hint: guards still decide)."""

    def __init__(self) -> None:
        self.variants: list[CompiledGraph] = []
        self.chosen: dict[Any, CompiledGraph | None] = {}  # call metadata -> graph, None: Python
        self.lock = threading.RLock()



class GraphForward:
    """The forward installed on a traced module (see the module docstring).

    Calls of a form seen before (same positional count and keywords) map straight onto the
    graph's inputs; anything else is bound, flattened and checked first.
    """

    def __init__(self, mg: ModuleGraph, runtime: Respecialiser | None = None,
                 family: Family | None = None) -> None:
        self.qualname = mg.qualname
        self.primary = CompiledGraph(mg)
        self.spec = mg.spec
        self.fn = self.primary.fn
        self.src = self.primary.src
        self.graph = mg.graph  # what runs: verify and viz read node names off it
        self.runtime = runtime if runtime is not None else Respecialiser()
        self.family = family if family is not None else Family()
        # call form (positional count, keywords) -> where each canonical argument comes from
        # and its shape: None for one leaf, (tuple or list, n) for a flat container of n leaves;
        # made at the first call (a tower installs hundreds of forwards)
        self._plans: dict[tuple[int, tuple[str, ...]], list[tuple[Any, Any]]] | None = None

    @property
    def strict(self) -> bool:
        return self.runtime.strict

    def __call__(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        # Fast path: a call of a form seen before maps straight onto the graph's inputs,
        # without binding and flattening it again; anything not shaped as the plan says
        # takes the checked path.
        plan = self._plans.get((len(args), tuple(kwargs))) if self._plans else None
        reads = self.spec.reads
        if (plan is not None and module.training is self.spec.training
                and (not reads or reads.hold(module))):
            leaves: list[Any] = []
            for key, shape in plan:
                t = type(key)
                value = args[key] if t is int else kwargs[key] if t is str else key[0]
                if shape is None:
                    if not is_leaf(value):
                        break
                    leaves.append(value)
                elif (type(value) is shape[0] and len(value) == shape[1]
                      and all(map(is_leaf, value))):
                    leaves.extend(value)
                else:
                    break
            else:
                inputs = [leaves[i] for i in self.spec.placeholders]
                if (all(_same(leaves[i], c) for i, c in self.spec.constants.items())
                        and kinds_match(inputs, self.spec)):
                    return self._run(module, inputs, args, kwargs)
        if torch.compiler.is_compiling():
            return self._call_compiling(module, args, kwargs)
        return self._call_slow(module, args, kwargs)

    def _call_compiling(self, module: nn.Module, args: tuple[Any, ...],
                        kwargs: dict[str, Any]) -> Any:
        """A call dynamo traces: the first graph that serves the call, the primary or one
        traced later (dynamo compiles it); anything else leaves the compiled region and runs
        as in eager mode (another graph traced for it, then compiled at the next call, or
        Python). Dynamo tracing the bookkeeping of a miss (tracing, the Python fallback's
        counters, lock and hooks) would break the graph inside it and recompile it per
        module until its limit."""
        for graph in (self.primary, *self.family.variants):
            try:
                inputs = graph.inputs(module, args, kwargs, explain=False)
            except TypeError:
                break  # the call does not bind to forward: the module raises (eagerly)
            if not isinstance(inputs, str):
                try:
                    return graph.fn(module, *inputs)
                except GuardError:
                    pass
        # Dynamo guards on the variants it iterated: once the eager call below has traced a
        # graph for this call, the next call recompiles and compiles that graph.
        return _eager_call(self, module, args, kwargs)

    def _run(self, module: nn.Module, inputs: list[Any], args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> Any:
        """The primary graph on ``inputs``; a miss at one of its own guards goes on below."""
        try:
            return self.fn(module, *inputs)
        except GuardError as e:
            if self.strict or not _raised_by_own_guard(e, self.fn):
                raise
            return self._miss(module, args, kwargs, _first_line(e))

    def _call_slow(self, module: nn.Module, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> Any:
        sig = forward_signature(type(module))
        try:
            inputs = self.primary.inputs(module, args, kwargs)
        except TypeError:
            # the call does not bind to forward: the module itself raises the real error
            return type(module).forward(module, *args, **kwargs)
        if isinstance(inputs, str):
            if self.strict:
                raise GuardError(f"{self._where(module)}: {inputs}; trace it with example "
                                 "inputs shaped like this call.")
            return self._miss(module, args, kwargs, inputs)
        plan = plan_of(sig, args, kwargs, defaults=not forward_is_wrapped(type(module)))
        if plan is not None and module.training is self.spec.training:
            if self._plans is None:
                self._plans = {}
            self._plans[(len(args), tuple(kwargs))] = plan
        return self._run(module, inputs, args, kwargs)

    def _where(self, module: nn.Module) -> str:
        return f"module {self.qualname or '<root>'!r} ({type(module).__name__})"

    # -- calls the primary graph does not cover -------------------------------------------
    def _miss(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
              why: str) -> Any:
        fam = self.family
        key = call_key(module, args, kwargs)
        with fam.lock:
            chosen = fam.chosen.get(key, _MISS) if key is not None else _MISS
            candidates = list(reversed(fam.variants))
        if chosen is None:
            return self._python(module, args, kwargs, why)
        if chosen is not _MISS:
            candidates.remove(chosen)
            candidates.insert(0, chosen)
        for variant in candidates:
            out = variant.run(module, args, kwargs)
            if out is not _MISS:
                self._choose(key, variant)
                return out
        blocked = why_no_trace()
        if blocked:
            return self._python(module, args, kwargs, f"{why}; not traced again: {blocked}")
        with TRACE_LOCK, fam.lock:  # the trace lock first (see tracer.TRACE_LOCK)
            if len(fam.variants) >= self.runtime.max_variants:
                self._choose(key, None)
                return self._python(module, args, kwargs, (
                    f"{why}; its {len(fam.variants)} extra graphs (the bound) do not cover "
                    "this call either"))
            try:
                variant = CompiledGraph.of(
                    self.runtime.specialise(module, self.qualname, args, kwargs), module)
            except NotLoadedError:
                raise  # the layers are not filled yet: not a property of this call form
            except Exception as e:  # noqa: BLE001 - any failure: Python serves the call
                self._choose(key, None)
                return self._python(module, args, kwargs, (
                    f"{why}; tracing it again for this call failed: {_first_line(e)}"))
            fam.variants.append(variant)
        self.runtime.stats.count("specialisation", self.qualname, why)
        logger.debug("fxpass: %s traced again for a call its graph does not cover: %s",
                     self._where(module), why)
        out = variant.run(module, args, kwargs)
        if out is _MISS:  # its own trace does not cover the call (changed in place?)
            self._choose(key, None)
            return self._python(module, args, kwargs, f"{why}; its new graph does not cover it")
        self._choose(key, variant)
        return out

    def _choose(self, key: Any, variant: CompiledGraph | None) -> None:
        if key is not None:
            with self.family.lock:
                self.family.chosen[key] = variant

    def _python(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                why: str) -> Any:
        if self.runtime.stats.count("fallback", self.qualname, why):
            logger.warning("fxpass: %s runs its Python forward for a call its graphs do not "
                           "cover: %s", self._where(module), why)
        graphs = [self.graph, *(v.graph for v in self.family.variants)]
        with self.runtime.python_forward(module, self.qualname, graphs, why):
            return type(module).forward(module, *args, **kwargs)


@torch.compiler.disable
def _eager_call(gf: GraphForward, module: nn.Module, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> Any:
    """A call its primary graph does not serve, made from a torch.compile'd caller: run
    outside dynamo (see ``GraphForward.__call__``)."""
    return gf._call_slow(module, args, kwargs)

def _first_line(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}"[:500] if not isinstance(e, GuardError) else text[:500]
