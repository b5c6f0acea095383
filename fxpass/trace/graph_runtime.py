"""What runs after ``apply``: the graphs fxpass installs as module forwards.

A traced module's ``forward`` becomes a :class:`GraphForward` over its graph. Every call is
checked against what the graph was traced for: the argument structure, the flags baked in,
the training flag, and the guard nodes inside the graph (shapes, dtypes and lengths the
tracer had to make concrete). A call the graph does not cover is never a wrong answer, and
never an error the module itself would not raise:

* it **re-specialises**: the module is traced again for that call, the rewrite rules run on
  the new graph (see :class:`Respecialiser`), and the call is served from it; at most
  ``MAX_VARIANTS`` graphs per module, shared by identical modules (one graph family);
* past that bound, when the new trace fails, or while dynamo traces / a CUDA graph is
  captured (never a trace there), the module's **Python forward** serves the call, with one
  warning per module naming why. Where Python would lose a fix the graph carried (a weight
  probe under 4-bit), :class:`~fxpass.errors.FallbackError` names the module and the fix.

A *strict* forward (``apply(..., strict=True)``, ``Trace.build(strict=True)``) raises
:class:`~fxpass.errors.GuardError` instead: that is how tests prove what the graphs cover.
Specialisations and fallbacks are counted per module in :class:`RuntimeStats`, which the
``Report`` and the vLLM plugin's records read.

The installed forward is a plain function bound to the module (``types.MethodType``), so
``copy.deepcopy``, hooks and ``torch.compile`` see an ordinary method.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import itertools
import linecache
import logging
import threading
import types
import weakref
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from fxpass import meta
from fxpass.errors import GuardError, NotLoadedError
from fxpass.trace import guards
from fxpass.trace.state import same as _same
from fxpass.trace.tracer import (
    TRACE_LOCK,
    CallSpec,
    bind_call,
    bind_module_call,
    forward_is_wrapped,
    forward_signature,
    is_constant,
    trace_module,
)

logger = logging.getLogger("fxpass")

MAX_VARIANTS = 8  # graphs per module family beyond the first, then Python


@dataclasses.dataclass
class ModuleGraph:
    """The traced graph of one module and how its calls map onto the graph's inputs."""

    qualname: str
    module_type: str
    graph: fx.Graph
    spec: CallSpec
    reused_from: str | None = None  # qualname whose trace this graph copies
    shared: bool = False  # graph is the trace cache's: copy before editing (see own())
    _by_name: dict[str, fx.Node] | None = dataclasses.field(default=None, repr=False)
    # node name -> fxpass annotations waiting to be written (the graph is still shared)
    _pending: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict, repr=False)

    def own(self) -> fx.Graph:
        """The graph, copied first if it is still shared with the cache (copy on write)."""
        if self.shared:
            self.graph = _copy_graph(self.graph)
            self.shared = False
            self._by_name = None
            self._write_pending()
        return self.graph

    def annotate(self, node: str, key: str, value: Any) -> None:
        """Set ``node.meta["fxpass"][key]`` without copying a shared graph for it.

        Annotations on a shared graph wait until :meth:`own` copies it or :meth:`settle`
        writes them into a copy shared by every graph with the same source and annotations
        (the 16 identical layers of a tower: one annotated copy, not 16).
        """
        if self.shared:
            self._pending.setdefault(node, {})[key] = value
        else:
            meta.info(self.node(node))[key] = value

    def settle(self) -> None:
        """Write pending annotations (see :meth:`annotate`); the graph stays shared."""
        if self._pending:
            self.edit(None, None)

    def edit(self, key: Any, fn: Callable[[fx.Graph], None] | None) -> None:
        """Apply ``fn``, an in-place edit, to this graph (pending annotations first).

        ``key`` must name the edit completely (its rule and every argument, none of them
        specific to this module): on a shared graph the edited copy is kept per (source
        graph, pending annotations, key), so identical layers share one edited graph and
        its compiled code, and applying to an identical tower again edits nothing. The
        result stays shared: a later edit starts from it the same way.
        """
        if not self.shared:
            self._write_pending()
            if fn is not None:
                fn(self.graph)
            self._by_name = None
            return
        variants = _VARIANTS.setdefault(self.graph, {})
        vkey = (_freeze(self._pending), key)
        graph = variants.get(vkey)
        if graph is None:
            graph = _copy_graph(self.graph)
            by_name = {n.name: n for n in graph.nodes}
            for name, values in self._pending.items():
                meta.info(by_name[name]).update(values)
            if fn is not None:
                fn(graph)
                graph.lint()
            variants[vkey] = graph
        self.graph = graph
        self._by_name = None
        self._pending = {}

    def _write_pending(self) -> None:
        for name, values in self._pending.items():
            meta.info(self.node(name)).update(values)
        self._pending = {}

    def node(self, name: str) -> fx.Node:
        if self._by_name is None or name not in self._by_name:
            self._by_name = {n.name: n for n in self.graph.nodes}
        return self._by_name[name]

    def nodes_of(self, op: str) -> list[fx.Node]:
        """The nodes with this opcode, in graph order.

        Indexed once per shared graph (shared graphs are never edited in place, and the
        identical layers of a tower share one), scanned afresh on an owned one.
        """
        if not self.shared:
            return [n for n in self.graph.nodes if n.op == op]
        index = _NODE_INDEX.get(self.graph)
        if index is None:
            index = {}
            for n in self.graph.nodes:
                index.setdefault(n.op, []).append(n)
            _NODE_INDEX[self.graph] = index
        return index.get(op, [])

    @property
    def guards(self) -> list[fx.Node]:
        return [n for n in self.graph.nodes if meta.get(n, "guard")]


# shared graph -> its edited and annotated copies (see ModuleGraph.edit). Shared graphs are
# never changed in place (own() copies first), so applies may share the copies too.
_VARIANTS: "weakref.WeakKeyDictionary[fx.Graph, dict[Any, fx.Graph]]" = (
    weakref.WeakKeyDictionary())

# shared graph -> its generated forward and source (see _Compiled)
_CODE: "weakref.WeakKeyDictionary[fx.Graph, tuple[Callable[..., Any], str]]" = (
    weakref.WeakKeyDictionary())

# shared graph -> its nodes by opcode (see ModuleGraph.nodes_of)
_NODE_INDEX: "weakref.WeakKeyDictionary[fx.Graph, dict[str, list[fx.Node]]]" = (
    weakref.WeakKeyDictionary())


def _freeze(value: Any) -> Any:
    """A hashable form of nested dicts/lists of plain values."""
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    """A copy whose nodes and fxpass annotations can be edited without touching ``graph``."""
    new = fx.Graph(tracer_cls=graph._tracer_cls)
    val_map: dict[fx.Node, fx.Node] = {}
    out = new.graph_copy(graph, val_map)
    val_map[graph.output_node()] = new.output(out)  # graph-level notes live on the output
    for old_node, node in val_map.items():
        info = old_node.meta.get(meta.KEY)
        if info is not None:  # fx copies meta shallowly: give each copy its own annotations
            node.meta[meta.KEY] = {k: dict(v) if isinstance(v, dict) else
                                   list(v) if isinstance(v, list) else v
                                   for k, v in info.items()}
    return new


# -- statistics --------------------------------------------------------------------------

@dataclasses.dataclass
class RuntimeStats:
    """Per module: graphs traced after install, calls served by Python, and why (live)."""

    specialisations: dict[str, int] = dataclasses.field(default_factory=dict)
    fallbacks: dict[str, int] = dataclasses.field(default_factory=dict)
    # module -> {"specialisation" | "fallback": why, the first time}
    reasons: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def count(self, kind: str, qualname: str, why: str) -> bool:
        """Count one event; True for the module's first event of this kind."""
        table = self.specialisations if kind == "specialisation" else self.fallbacks
        name = qualname or "<root>"
        with self._lock:
            first = name not in table
            table[name] = table.get(name, 0) + 1
            self.reasons.setdefault(name, {}).setdefault(kind, why)
        return first

    def to_dict(self) -> dict[str, Any]:
        return {"specialisations": dict(self.specialisations),
                "fallbacks": dict(self.fallbacks),
                "reasons": {k: dict(v) for k, v in self.reasons.items()}}


# -- policy ------------------------------------------------------------------------------

class Respecialiser:
    """What happens on a call a graph does not cover (one per ``apply`` / ``install``).

    This base traces the module again for the call and installs the new graph as it is (what
    ``fxpass.trace`` gives). The rewrite stage subclasses it to run its rules on the new
    graph, to show the tracer the logical weights of vLLM layers, and to refuse a Python
    fallback that would lose a graph fix.
    """

    def __init__(self, *, strict: bool = False, max_variants: int = MAX_VARIANTS,
                 stats: RuntimeStats | None = None) -> None:
        self.strict = strict
        self.max_variants = max_variants
        self.stats = stats if stats is not None else RuntimeStats()

    # hooks for the rewrite stage ---------------------------------------------------------
    def trace_values(self, module: nn.Module) -> dict[str, Any]:
        """get_attr target -> the value the tracer should see for it (default: the real one)."""
        return {}

    def leaf_inputs(self, module: nn.Module, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The inputs a leaf submodule runs on while tracing (default: as given)."""
        return args, kwargs

    def rewrite(self, module: nn.Module, qualname: str, mg: ModuleGraph) -> ModuleGraph:
        """The graph to install for a new specialisation (default: as traced)."""
        return mg

    def python_forward(self, module: nn.Module, qualname: str, graphs: list[fx.Graph],
                       why: str) -> contextlib.AbstractContextManager[None]:
        """Context for running ``module``'s Python forward (``why``: the call its graphs do
        not cover); raises FallbackError where Python would lose a graph fix."""
        return contextlib.nullcontext()

    # -------------------------------------------------------------------------------------
    def specialise(self, module: nn.Module, qualname: str, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> "_Compiled":
        # In a fresh context: the trace runs the submodules on this call's values, and a
        # caller's context variables (HF's output collector for output_hidden_states) must
        # not see those runs; the graph's own run of this call is what they see.
        graph, spec = contextvars.Context().run(
            trace_module, module, args, kwargs, values=self.trace_values(module),
            leaf_inputs=self.leaf_inputs)
        mg = ModuleGraph(qualname, type(module).__name__, graph, spec)
        mg = self.rewrite(module, qualname, mg)
        owner = (weakref.ref(module) if any(n.op == "call_function" and is_constant(n.target)
                                            for n in mg.graph.nodes) else None)
        return _Compiled(mg, owner)


_STRICT = Respecialiser(strict=True)


def _why_no_trace() -> str | None:
    """Why a call must not be traced now (dynamo tracing, CUDA graph capture), or None."""
    if torch.compiler.is_compiling():
        return "torch.compile is tracing it (fxpass never traces inside dynamo)"
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return "a CUDA graph is being captured (fxpass never traces during capture)"
    return None


# -- compiled graphs ---------------------------------------------------------------------

_counter = itertools.count()
_MISS = object()


class _Compiled:
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
                f"called as {_call_form(treespec)}, but its graph was traced for "
                f"{_call_form(spec.treespec)}")
        for i, expected in spec.constants.items():
            if not _same(leaves[i], expected):
                return "miss" if not explain else (
                    f"argument leaf {i} is {leaves[i]!r}, but the graph was traced with "
                    f"{expected!r} baked in")
        inputs = [leaves[i] for i in spec.placeholders]
        if not _kinds_match(inputs, spec):
            return "miss" if not explain else ("an argument the graph takes as a tensor (or an int) is something else "
                    f"here ({', '.join(type(x).__name__ for x in inputs)})")
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


class _Family:
    """The graphs traced after install for one group of identical modules, and which call
    metadata each served last (a hint: guards still decide)."""

    def __init__(self) -> None:
        self.variants: list[_Compiled] = []
        self.chosen: dict[Any, _Compiled | None] = {}  # call metadata -> graph, None: Python
        self.lock = threading.RLock()


# -- the installed forward ---------------------------------------------------------------

class GraphForward:
    """The forward installed on a traced module (see the module docstring).

    Calls of a form seen before (same positional count and keywords) map straight onto the
    graph's inputs; anything else is bound, flattened and checked first.
    """

    def __init__(self, mg: ModuleGraph, runtime: Respecialiser | None = None,
                 family: _Family | None = None) -> None:
        self.qualname = mg.qualname
        self.primary = _Compiled(mg)
        self.spec = mg.spec
        self.fn = self.primary.fn
        self.src = self.primary.src
        self.graph = mg.graph  # what runs: verify and viz read node names off it
        self.runtime = runtime if runtime is not None else Respecialiser()
        self.family = family if family is not None else _Family()
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
                    if not _is_leaf(value):
                        break
                    leaves.append(value)
                elif (type(value) is shape[0] and len(value) == shape[1]
                      and all(map(_is_leaf, value))):
                    leaves.extend(value)
                else:
                    break
            else:
                inputs = [leaves[i] for i in self.spec.placeholders]
                if (all(_same(leaves[i], c) for i, c in self.spec.constants.items())
                        and _kinds_match(inputs, self.spec)):
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
        plan = _plan_of(sig, args, kwargs, defaults=not forward_is_wrapped(type(module)))
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
        key = _call_key(module, args, kwargs)
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
        blocked = _why_no_trace()
        if blocked:
            return self._python(module, args, kwargs, f"{why}; not traced again: {blocked}")
        with TRACE_LOCK, fam.lock:  # the trace lock first (see tracer.TRACE_LOCK)
            if len(fam.variants) >= self.runtime.max_variants:
                self._choose(key, None)
                return self._python(module, args, kwargs, (
                    f"{why}; its {len(fam.variants)} extra graphs (the bound) do not cover "
                    "this call either"))
            try:
                variant = self.runtime.specialise(module, self.qualname, args, kwargs)
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

    def _choose(self, key: Any, variant: _Compiled | None) -> None:
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


class _Leaf:
    def __repr__(self) -> str:
        return "*"


def _call_form(treespec: Any) -> str:
    """A call's argument structure as a person reads it: ``(*, mask=None, pos=(*, *))``."""
    try:
        args, kwargs = pytree.tree_unflatten([_Leaf()] * treespec.num_leaves, treespec)
    except Exception:  # noqa: BLE001 - an unusual structure: fx's own form
        return str(treespec)
    return "(" + ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())]) + ")"


def _kinds_match(inputs: list[Any], spec: CallSpec) -> bool:
    """Each graph input is what it was traced as: a tensor, or an int (a None or a float in
    a tensor's place flattens to the same structure)."""
    for x, is_tensor in zip(inputs, spec.tensor_inputs):
        if (isinstance(x, torch.Tensor) if is_tensor else type(x) is int):
            continue
        return False
    return True


def _first_line(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}"[:500] if not isinstance(e, GuardError) else text[:500]


def _call_key(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """What guards can depend on: the call's structure, tensor metadata and plain values."""
    leaves, treespec = pytree.tree_flatten((args, kwargs))
    parts: list[Any] = [module.training, len(args), tuple(kwargs), treespec]
    for x in leaves:
        if isinstance(x, torch.Tensor):
            parts.append((tuple(x.shape), x.stride(), x.dtype, x.device))
        elif type(x) in _LEAF_TYPES:
            parts.append((type(x), x))
        else:
            parts.append(("id", id(x)))
    try:
        key = tuple(parts)
        hash(key)
    except TypeError:
        return None
    return key


_LEAF_TYPES = frozenset({torch.Tensor, nn.Parameter, int, float, bool, str, type(None),
                         torch.dtype, torch.device})


def _is_leaf(value: Any) -> bool:
    return type(value) in _LEAF_TYPES or pytree.tree_is_leaf(value)


class _Source:
    __slots__ = ("key",)

    def __init__(self, key: int | str) -> None:
        self.key = key


def _plan_of(sig: Any, args: tuple[Any, ...], kwargs: dict[str, Any], *, defaults: bool = True
             ) -> list[tuple[Any, Any]] | None:
    """The fast-path plan for calls of this form (see ``GraphForward.__init__``).

    Each canonical argument comes from a position (int), a keyword (str) or the signature's
    default (a 1-tuple holding it).
    """
    markers = tuple(_Source(i) for i in range(len(args)))
    named = {k: _Source(k) for k in kwargs}
    try:
        a, kw = bind_call(sig, markers, named, defaults=defaults)
    except TypeError:
        return None
    plan: list[tuple[Any, Any]] = []
    for marker in (*a, *kw.values()):
        if isinstance(marker, _Source):
            key: Any = marker.key
            value = args[key] if type(key) is int else kwargs[key]
        else:  # a default the call left out
            key, value = (marker,), marker
        if _is_leaf(value):
            plan.append((key, None))
        elif type(value) in (tuple, list) and all(map(_is_leaf, value)):
            if not isinstance(key, (int, str)):
                return None
            plan.append((key, (type(value), len(value))))
        else:
            return None
    return plan


# -- installing --------------------------------------------------------------------------

_MARK = "__fxpass_graph_forward__"


def install(module: nn.Module, gf: Callable[..., Any]) -> None:
    """Make ``gf`` the module's forward: a plain function bound to it (see module docs).

    ``gf`` is a GraphForward, or another fxpass forward called as ``gf(module, *args,
    **kwargs)`` (the first-call trace armed on a root apply had no inputs for).
    """

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return gf(self, *args, **kwargs)

    setattr(forward, _MARK, gf)
    forward.__qualname__ = f"{type(module).__qualname__}.forward (fxpass graph)"
    sig = _class_forward_signature(type(module))
    if sig is not None:  # inspect.signature(module.forward) as before (HF and users read it)
        forward.__signature__ = sig  # type: ignore[attr-defined]
    module.forward = types.MethodType(forward, module)


@functools.lru_cache(maxsize=None)
def _class_forward_signature(cls: type) -> inspect.Signature | None:
    try:
        return inspect.signature(cls.forward)
    except (TypeError, ValueError):
        return None


def installed_graph(module: nn.Module) -> GraphForward | None:
    """The GraphForward fxpass installed as ``module``'s forward, if any."""
    return _graph_forward(module.__dict__.get("forward"))


def _graph_forward(fwd: Any) -> GraphForward | None:
    gf = fxpass_forward(fwd)
    return gf if isinstance(gf, GraphForward) else None


def fxpass_forward(fwd: Any) -> Any:
    """The fxpass object behind an installed forward (a GraphForward or an armed first-call
    trace), or None for anything else."""
    if isinstance(fwd, types.MethodType):
        return getattr(fwd.__func__, _MARK, None)
    return None


def is_graph_forward(fwd: Any) -> bool:
    """Installed by fxpass (a graph, or the first-call trace waiting for its call)."""
    return fxpass_forward(fwd) is not None


def foreign_forward(module: nn.Module) -> bool:
    """An instance ``forward`` fxpass did not install (accelerate hooks, a monkeypatch)."""
    fwd = module.__dict__.get("forward")
    return fwd is not None and not is_graph_forward(fwd)


def uninstall(module: nn.Module) -> None:
    """Remove fxpass-installed forwards from a module tree (back to the class forward)."""
    for sub in module.modules():
        if is_graph_forward(sub.__dict__.get("forward")):
            del sub.__dict__["forward"]


def graph_notes(graphs: list[fx.Graph], key: str) -> Iterator[Any]:
    """Graph-level records a rule left on the output node (``meta["fxpass"][key]``)."""
    for graph in graphs:
        for node in reversed(graph.nodes):
            if node.op == "output":
                yield from meta.get(node, key, ())
                break
