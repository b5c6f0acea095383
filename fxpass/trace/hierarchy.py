"""Hierarchical tracing: one fx graph per module that traces, Python for the rest.

The root is traced first with the example inputs; each submodule it calls is traced next
with the inputs captured during that trace, and so on down. A module that cannot be traced
is recorded with its reason and kept as Python; its children are still reached, through a
plain run of it with capture hooks. Identical modules (same class, structure, attributes
read while tracing and input signature) are traced once: the cache shares their graph, and a
module whose whole subtree was traced before is recorded from the cache in one step (its
attribute reads checked), so a second identical tower costs one tree walk. On meta values a
graph's outputs depend on its inputs' metadata only, so while walking each (graph, input
metadata) runs once (``_MetaMemo``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import linecache
import threading
import time
import types
import weakref
from collections import OrderedDict
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from fxpass import meta
from fxpass.errors import GuardError, TraceError, UsageError
from fxpass.trace.tracer import (
    Capture,
    CallSpec,
    ValueTracer,
    canonical_call,
    forward_signature,
    is_constant,
    make_call_spec,
)

Inputs = tuple[tuple[Any, ...], dict[str, Any]]


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

# shared graph -> its generated forward and source (see GraphForward)
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


class GraphForward:
    """The generated forward installed on a traced module (as its instance ``forward``).

    It checks each call against the traced call structure (which arguments were tensors,
    which were flags baked into the graph) before running the graph's code, so a call the
    graph was not traced for raises GuardError instead of computing something else.
    """

    _counter = itertools.count()

    def __init__(self, mg: ModuleGraph) -> None:
        self.qualname = mg.qualname
        self.spec = mg.spec
        compiled = _CODE.get(mg.graph) if mg.shared else None
        if compiled is None:
            compiled = _compile(mg)
            if mg.shared:  # never edited in place: every module running it shares the code
                _CODE[mg.graph] = compiled
        self.fn: Callable[..., Any] = compiled[0]
        self.src = compiled[1]
        self.graph = mg.graph  # what runs: verify and viz read node names off it
        # call form (positional count, keywords) -> where each canonical argument comes from
        # and its shape: None for one leaf, (tuple or list, n) for a flat container of n leaves;
        # made at the first call (a tower installs hundreds of forwards)
        self._plans: dict[tuple[int, tuple[str, ...]],
                          list[tuple[int | str, tuple[type, int] | None]]] | None = None

    def __call__(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        # Fast path: a call of a form seen before (same positional count, same keywords) maps
        # straight onto the graph's inputs, without binding and flattening it again; any
        # argument not shaped as the plan says takes the checked path.
        plan = self._plans.get((len(args), tuple(kwargs))) if self._plans else None
        if plan is not None:
            leaves: list[Any] = []
            for key, shape in plan:
                value = args[key] if type(key) is int else kwargs[key]
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
                if all(_same(leaves[i], c) for i, c in self.spec.constants.items()):
                    return self.fn(module, *[leaves[i] for i in self.spec.placeholders])
        return self._call_slow(module, args, kwargs)

    def _call_slow(self, module: nn.Module, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> Any:
        form = (len(args), tuple(kwargs))
        sources = _call_sources(forward_signature(type(module)), args, kwargs)
        args, kwargs = canonical_call(forward_signature(type(module)), args, kwargs)
        leaves, treespec = pytree.tree_flatten((args, kwargs))
        spec = self.spec
        where = f"module {self.qualname or '<root>'!r} ({type(module).__name__})"
        if treespec != spec.treespec:
            raise GuardError(
                f"{where}: called with arguments structured as {treespec}, but its graph was "
                f"traced for {spec.treespec}; trace it with example inputs shaped like this call.")
        for i, expected in spec.constants.items():
            got = leaves[i]
            if not _same(got, expected):
                raise GuardError(
                    f"{where}: argument leaf {i} is {got!r}, but the graph was traced with "
                    f"{expected!r} baked in; trace it with example inputs using this value.")
        inputs = [leaves[i] for i in spec.placeholders]
        plan = _plan_of(sources, (*args, *kwargs.values()))
        if plan is not None and sum(1 if n is None else n[1] for _, n in plan) == len(leaves):
            if self._plans is None:
                self._plans = {}
            self._plans[form] = plan
        return self.fn(module, *inputs)


_LEAF_TYPES = frozenset({torch.Tensor, nn.Parameter, int, float, bool, str, type(None),
                         torch.dtype, torch.device})


def _is_leaf(value: Any) -> bool:
    return type(value) in _LEAF_TYPES or pytree.tree_is_leaf(value)


def _plan_of(sources: list[int | str] | None, values: tuple[Any, ...]
             ) -> list[tuple[int | str, tuple[type, int] | None]] | None:
    """The fast-path plan for a call whose canonical arguments are ``values`` (see __init__)."""
    if sources is None or len(sources) != len(values):
        return None
    plan: list[tuple[int | str, tuple[type, int] | None]] = []
    for key, value in zip(sources, values):
        if _is_leaf(value):
            plan.append((key, None))
        elif type(value) in (tuple, list) and all(map(_is_leaf, value)):
            plan.append((key, (type(value), len(value))))
        else:
            return None
    return plan


def _compile(mg: ModuleGraph) -> tuple[Callable[..., Any], str]:
    code = mg.graph.python_code(root_module="self")
    # shared code runs for every module with this graph: name it by class, not by one of them
    name = mg.module_type if mg.shared else (mg.qualname or "<root>")
    filename = f"<fxpass graph {name} #{next(GraphForward._counter)}>"
    linecache.cache[filename] = (len(code.src), None, code.src.splitlines(True), filename)
    namespace = dict(code.globals)
    exec(compile(code.src, filename, "exec"), namespace)  # noqa: S102 - fx-generated code
    return namespace["forward"], code.src


def _call_sources(sig: Any, args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> list[int | str] | None:
    """Where each canonical argument comes from in a call of this form (index or keyword)."""
    markers = [_Source(i) for i in range(len(args))]
    named = {k: _Source(k) for k in kwargs}
    try:
        a, kw = canonical_call(sig, tuple(markers), named)
    except TypeError:
        return None
    return [m.key for m in (*a, *kw.values())]


class _Source:
    __slots__ = ("key",)

    def __init__(self, key: int | str) -> None:
        self.key = key


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if type(a) is not type(b) or isinstance(a, torch.Tensor):
        return False
    if isinstance(a, functools.partial):  # partials compare by identity; compare their parts
        return (_same(a.func, b.func) and len(a.args) == len(b.args)
                and all(_same(x, y) for x, y in zip(a.args, b.args))
                and a.keywords.keys() == b.keywords.keys()
                and all(_same(v, b.keywords[k]) for k, v in a.keywords.items()))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - incomparable objects are simply different
        return False


@dataclasses.dataclass
class Trace:
    """What ``fxpass.trace`` learnt about a module tree. The module itself is not changed."""

    root: nn.Module
    graphs: dict[str, ModuleGraph] = dataclasses.field(default_factory=dict)
    untraced: dict[str, str] = dataclasses.field(default_factory=dict)
    linear_sites: dict[str, str] = dataclasses.field(default_factory=dict)
    # linear -> what the Python code of an untraced module does to it that a vLLM layer
    # cannot serve (attribute reads, keyword calls, stride(-1) != 1 inputs): stay nn.Linear
    python_linear_uses: dict[str, str] = dataclasses.field(default_factory=dict)
    # untraced module -> the error its plain Python run on the example values raised
    eager_errors: dict[str, str] = dataclasses.field(default_factory=dict)
    example_inputs: Inputs | None = None
    elapsed_s: float = 0.0
    cache_hits: int = 0

    def install(self, module: nn.Module | None = None) -> nn.Module:
        """Make each traced module of ``module`` (default: the traced one) run its graph.

        The tree, classes and state_dict stay as they are: only the instance ``forward``
        of traced modules is set.
        """
        target = self.root if module is None else module
        for qualname, mg in self.graphs.items():
            sub = target.get_submodule(qualname)
            sub.forward = types.MethodType(GraphForward(mg), sub)
        return target

    def build(self) -> nn.Module:
        """A deep copy of the traced module running its graphs (the original is untouched)."""
        return self.install(copy.deepcopy(self.root))

    def summary(self) -> dict[str, Any]:
        return {
            "graphs": len(self.graphs),
            "untraced": dict(self.untraced),
            "linear_sites": len(self.linear_sites),
            "guards": sum(len(g.guards) for g in self.graphs.values()),
            "cache_hits": self.cache_hits,
            "elapsed_s": round(self.elapsed_s, 4),
        }

    def __str__(self) -> str:
        lines = [f"Trace of {type(self.root).__name__}: {len(self.graphs)} graphs, "
                 f"{len(self.untraced)} untraced, {len(self.linear_sites)} linear sites, "
                 f"{self.elapsed_s * 1000:.1f} ms"]
        for name, reason in self.untraced.items():
            lines.append(f"  python  {name or '<root>'}: {reason}")
        return "\n".join(lines)


def uninstall(module: nn.Module) -> None:
    """Remove fxpass-installed forwards from a module tree (back to the class forward)."""
    for sub in module.modules():
        if _is_graph_forward(sub.__dict__.get("forward")):
            del sub.__dict__["forward"]


def installed_graph(module: nn.Module) -> GraphForward | None:
    """The GraphForward fxpass installed as ``module``'s forward, if any."""
    return _graph_forward(module.__dict__.get("forward"))


def _graph_forward(fwd: Any) -> GraphForward | None:
    if isinstance(fwd, types.MethodType) and isinstance(fwd.__func__, GraphForward):
        return fwd.__func__
    return None


def _is_graph_forward(fwd: Any) -> bool:
    return _graph_forward(fwd) is not None


def _foreign_forward(module: nn.Module) -> bool:
    """An instance ``forward`` fxpass did not install (accelerate hooks, a monkeypatch)."""
    fwd = module.__dict__.get("forward")
    return fwd is not None and not _is_graph_forward(fwd)


_FOREIGN_FORWARD = ("it has an instance forward fxpass did not install (accelerate hooks, a "
                    "monkeypatch); a graph of its class forward would replace it")


# -- attribute-read recording (the cache key's non-structural part) ----------------------

_RECORDERS: list["_Recorder"] = []
_orig_getattribute = object.__getattribute__
_PLAIN = (bool, int, float, str, type(None), torch.dtype, torch.device)


class _Recorder:
    def __init__(self, root: nn.Module, tracer: ValueTracer) -> None:
        self.paths = {id(m): p for p, m in root.named_modules()}
        self.tracer = tracer
        self.reads: dict[tuple[str, str], Any] = {}


def _recording_getattribute(self: nn.Module, name: str) -> Any:
    value = _orig_getattribute(self, name)
    if _RECORDERS and name[0] != "_":
        rec = _RECORDERS[-1]
        path = rec.paths.get(id(self))
        if (path is not None and not rec.tracer._eager
                and not isinstance(value, (nn.Module, torch.Tensor, types.MethodType))):
            rec.reads.setdefault((path, name), value)
    return value


_patch_lock = threading.RLock()


class _recording:
    """Record the plain attributes read off modules of ``root`` while tracing it."""

    def __init__(self, root: nn.Module, tracer: ValueTracer) -> None:
        self.rec = _Recorder(root, tracer)

    def __enter__(self) -> _Recorder:
        _patch_lock.acquire()
        if not _RECORDERS:
            nn.Module.__getattribute__ = _recording_getattribute  # type: ignore[method-assign]
        _RECORDERS.append(self.rec)
        return self.rec

    def __exit__(self, *exc: Any) -> None:
        _RECORDERS.pop()
        if not _RECORDERS:
            del nn.Module.__getattribute__
        _patch_lock.release()


# -- cache -------------------------------------------------------------------------------

@dataclasses.dataclass
class _Entry:
    reads: dict[tuple[str, str], Any]
    graph: fx.Graph | None
    spec: CallSpec | None
    captures: dict[str, Capture]
    reason: str | None
    qualname: str
    compiled: GraphForward | None = None  # used while walking only
    # untraced modules only: linear (relative path) -> what the Python code does to it
    linear_uses: dict[str, str] = dataclasses.field(default_factory=dict)
    eager_error: str | None = None  # untraced modules only: their Python run failed too
    # Set when the graph holds tensors made while tracing (fxpass_constant nodes): they may
    # derive from this module's state, so the trace serves this module only.
    owner: "weakref.ref[nn.Module] | None" = None
    # Every visit below this module, once all of them are cached (see _Walker._replay)
    subtree: "_Subtree | None" = None
    _linear_children: frozenset[str] | None = None
    _weight_reads: tuple[str, ...] | None = None

    def linear_children(self, module: nn.Module) -> frozenset[str]:
        """The captured calls that are nn.Linear calls (sites, not modules to visit)."""
        if self._linear_children is None:
            self._linear_children = frozenset(
                rel for rel in self.captures if isinstance(module.get_submodule(rel), nn.Linear))
        return self._linear_children

    def weight_reads(self, module: nn.Module) -> tuple[str, ...]:
        """Linears whose weight or bias the graph reads with get_attr (relative paths)."""
        if self._weight_reads is None:
            owners = []
            for node in self.graph.nodes if self.graph is not None else ():
                if node.op == "get_attr" and "." in node.target:
                    owner, _, attr = node.target.rpartition(".")
                    if (attr in ("weight", "bias")
                            and isinstance(module.get_submodule(owner), nn.Linear)):
                        owners.append(owner)
            self._weight_reads = tuple(owners)
        return self._weight_reads


@dataclasses.dataclass
class _Subtree:
    """A module's visit and every visit below it, relative to it, with their reads."""

    visits: list[tuple[str, _Entry]]  # (relative qualname, entry), "" (itself) last
    reads: dict[str, list[tuple[str, Any]]]  # relative module path -> (attribute, value)

    @classmethod
    def build(cls, entry: _Entry, children: list[tuple[str, "_Subtree"]]) -> "_Subtree":
        visits: list[tuple[str, _Entry]] = []
        reads: dict[str, list[tuple[str, Any]]] = {}
        for (path, name), value in entry.reads.items():
            reads.setdefault(path, []).append((name, value))
        for rel, sub in children:
            visits.extend((_join(rel, r), e) for r, e in sub.visits)
            for path, pairs in sub.reads.items():
                reads.setdefault(_join(rel, path), []).extend(pairs)
        visits.append(("", entry))  # after its children, as a first walk records them
        return cls(visits, reads)


@dataclasses.dataclass
class _Frame:
    """A module being visited: the subtrees of the children visited from it so far."""

    qualname: str
    children: list[tuple[str, _Subtree]] = dataclasses.field(default_factory=list)
    complete: bool = True
    visited: set[str] = dataclasses.field(default_factory=set)  # children's qualnames

    def add(self, child_q: str, entry: _Entry) -> None:
        self.visited.add(child_q)
        if entry.subtree is None:
            self.complete = False
            return
        rel = child_q[len(self.qualname) + 1:] if self.qualname else child_q
        self.children.append((rel, entry.subtree))


def _join(parent: str, rel: str) -> str:
    if not parent:
        return rel
    return f"{parent}.{rel}" if rel else parent


class TraceCache:
    """Traces keyed by module structure + input signature, validated by attribute reads."""

    def __init__(self, max_entries: int = 256) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[Any, list[_Entry]] = OrderedDict()

    def lookup(self, key: Any, module: nn.Module) -> _Entry | None:
        for entry in self._entries.get(key, ()):
            if entry.owner is not None and entry.owner() is not module:
                continue
            if all(_same(_read(module, p, n), v) for (p, n), v in entry.reads.items()):
                self._entries.move_to_end(key)
                return entry
        return None

    def store(self, key: Any, entry: _Entry) -> None:
        self._entries.setdefault(key, []).append(entry)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


_MISSING = object()


def _read(module: nn.Module, path: str, name: str) -> Any:
    try:
        return getattr(module.get_submodule(path) if path else module, name)
    except AttributeError:
        return _MISSING


DEFAULT_CACHE = TraceCache()


def _key_of(module: nn.Module, children: tuple[tuple[str, Any], ...]) -> Any:
    """A module's structure key from its children's: class, mode, own tensors' metadata."""
    own = tuple((n, tuple(t.shape), t.dtype, t.device.type)
                for n, t in itertools.chain(module._parameters.items(), module._buffers.items())
                if t is not None)
    return (type(module), module.training, own, children)


def _structure_key(module: nn.Module, memo: dict[int, Any] | None = None) -> Any:
    """Class, own tensors' shapes/dtypes and children's keys, recursively (memoised: O(tree))."""
    if memo is not None and id(module) in memo:
        return memo[id(module)]
    children = tuple((n, _structure_key(c, memo)) for n, c in module._modules.items()
                     if c is not None)
    key = _key_of(module, children)
    if memo is not None:
        memo[id(module)] = key
    return key


@dataclasses.dataclass
class TreeIndex:
    """One walk of a module tree: every module by path and every module's structure key."""

    paths: dict[str, nn.Module]  # as named_modules(remove_duplicate=False), parents first
    keys: dict[int, Any]  # id(module) -> _structure_key

    @classmethod
    def of(cls, root: nn.Module) -> "TreeIndex":
        paths: dict[str, nn.Module] = {}
        keys: dict[int, Any] = {}

        def walk(module: nn.Module, path: str) -> Any:
            paths[path] = module
            children = tuple((n, walk(c, f"{path}.{n}" if path else n))
                             for n, c in module._modules.items() if c is not None)
            key = keys.get(id(module))
            if key is None:
                key = keys[id(module)] = _key_of(module, children)
            return key

        walk(root, "")
        return cls(paths, keys)


def _inputs_key(args: tuple[Any, ...], kwargs: dict[str, Any], symbolic: set[int]) -> Any:
    leaves, treespec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    out: list[Any] = [str(treespec)]
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            # contiguity too: rules decide on it (a transposed input needs .contiguous())
            out.append(("T", tuple(leaf.shape), leaf.dtype, leaf.device.type,
                        leaf.is_contiguous()))
        elif type(leaf) is int and i in symbolic:
            out.append(("I", leaf))
        else:
            try:
                hash(leaf)
                out.append(("C", type(leaf), leaf))
            except TypeError:
                out.append(("C", type(leaf), id(leaf)))
    return tuple(out)


# -- the walk ----------------------------------------------------------------------------

def _clone_values(obj: Any) -> Any:
    """Copies of example tensors, so in-place ops while tracing leave the caller's intact."""
    return pytree.tree_map(
        lambda t: t.clone() if isinstance(t, torch.Tensor) and t.device.type != "meta" else t,
        obj)


def _finalize(graph: fx.Graph) -> None:
    """Replace the example values kept on nodes by small summaries; check the graph."""
    for node in graph.nodes:
        info = node.meta.get(meta.KEY)
        if info is None:
            continue
        value = info.pop("value", None)
        if isinstance(value, torch.Tensor):
            info["tensor"] = {
                "shape": tuple(value.shape),
                "dtype": value.dtype,
                "contiguous": value.is_contiguous(),
            }
        elif value is not None:
            info["pytype"] = type(value).__name__
    graph.lint()


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    """A copy whose nodes and fxpass annotations can be edited without touching ``graph``."""
    new = fx.Graph(tracer_cls=graph._tracer_cls)
    val_map: dict[fx.Node, fx.Node] = {}
    out = new.graph_copy(graph, val_map)
    new.output(out)
    for old_node, node in val_map.items():
        info = old_node.meta.get(meta.KEY)
        if info is not None:  # fx copies meta shallowly: give each copy its own annotations
            node.meta[meta.KEY] = {k: dict(v) if isinstance(v, dict) else
                                   list(v) if isinstance(v, list) else v
                                   for k, v in info.items()}
    return new


def _eager_captures(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                    on_first_call: Callable[[str, Capture], None]
                    ) -> tuple[dict[str, Capture], str | None, dict[str, str]]:
    """Run an untraceable module as Python, capturing the submodule calls it makes directly.

    Each such submodule is visited (traced, its graph installed) before it runs, as in a
    traced caller. Also returns, per ``nn.Linear`` below the module, what its own Python code
    did to it that a vLLM layer cannot serve (no graph will show or fix it): attributes read
    off the linear (``.weight``, ``.out_features``), a call with keywords (``input=x``) and a
    call whose input has stride(-1) != 1.
    """
    captures: dict[str, Capture] = {}
    paths = {m: n for n, m in module.named_modules() if n}
    linears = {m: n for m, n in paths.items() if isinstance(m, nn.Linear)}
    reads: dict[str, set[str]] = {}
    depth = [0]
    quiet = [0]  # >0 while a child is being visited (its own tracing reads don't count)
    raw_keywords: dict[str, tuple[str, ...]] = {}
    orig_call = nn.Module.__call__
    prev_getattribute = nn.Linear.__dict__.get("__getattribute__")

    def call(mod: nn.Module, *a: Any, **kw: Any) -> Any:
        path = paths.get(mod)
        if path is not None and depth[0] == 0 and path not in captures:
            ca, ckw = canonical_call(forward_signature(type(mod)), a, kw)
            leaves = pytree.tree_leaves((ca, ckw))
            captures[path] = cap = Capture(ca, ckw, set(range(len(leaves))))
            raw_keywords[path] = tuple(kw)  # as called: the canonical form names everything
            quiet[0] += 1
            try:
                on_first_call(path, cap)
            finally:
                quiet[0] -= 1
        depth[0] += path is not None
        try:
            return orig_call(mod, *a, **kw)
        finally:
            depth[0] -= path is not None

    def linear_getattribute(mod: nn.Module, name: str) -> Any:
        if name[0] != "_" and depth[0] == 0 and not quiet[0]:
            path = linears.get(mod)
            if path is not None:
                reads.setdefault(path, set()).add(name)
        if prev_getattribute is not None:
            return prev_getattribute(mod, name)
        return super(nn.Linear, mod).__getattribute__(name)

    error = None
    nn.Module.__call__ = call  # type: ignore[method-assign]
    if linears:
        nn.Linear.__getattribute__ = linear_getattribute  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            module(*_clone_values(args), **_clone_values(kwargs))
    except Exception as e:  # noqa: BLE001 - children reached before the failure still count
        error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    finally:
        nn.Module.__call__ = orig_call  # type: ignore[method-assign]
        if linears:
            if prev_getattribute is None:
                del nn.Linear.__getattribute__
            else:
                nn.Linear.__getattribute__ = prev_getattribute  # type: ignore[method-assign]
    uses = {path: f"reads {', '.join(f'.{n}' for n in sorted(names))} off it"
            for path, names in reads.items()}
    for path, cap in captures.items():
        if path in uses or path not in linears.values():
            continue
        if raw_keywords.get(path):
            uses[path] = (f"calls it with keywords ({', '.join(raw_keywords[path])}=...), which "
                          "ReplicatedLinear.forward(x) does not take")
            continue
        inp = next(iter(pytree.tree_leaves((cap.args, cap.kwargs))), None)
        if isinstance(inp, torch.Tensor) and inp.dim() and inp.stride(-1) != 1:
            uses[path] = (f"calls it with an input of stride(-1) == {inp.stride(-1)}, which "
                          "vLLM's CPU GEMM rejects (only graphs get a .contiguous() inserted)")
    return captures, error, uses


class _MetaMemo:
    """Outputs of graphs run on meta values while walking, keyed by the inputs' metadata.

    On meta tensors a graph computes metadata only, and that is a function of its inputs'
    metadata (parameters' shapes are part of the cache key that shares the graph): identical
    layers called with same-shaped inputs give same-shaped outputs. Walking a tower runs
    each layer's graph several times (for the caller's trace, the grand-caller's, the Python
    run of an untraced root); on meta the Python meta kernels make that the cold trace's
    largest cost, so the walk runs each (graph, input metadata) once and hands out fresh
    tensors of the recorded metadata after that. Anything it cannot describe exactly (real
    data, tensor subclasses, outputs that are the module's own tensors, inputs changed in
    place, unusual objects) runs the graph as before.
    """

    def __init__(self) -> None:
        self.outputs: dict[Any, Any] = {}
        self.keep: list[Any] = []  # objects keyed by id stay alive for the walk
        self.hits = 0

    def forward(self, inner: GraphForward) -> "_MemoForward":
        return _MemoForward(self, inner)

    def call(self, inner: GraphForward, module: nn.Module, args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> Any:
        leaves, treespec = pytree.tree_flatten((args, kwargs))
        key = self._key(inner, leaves, treespec)
        if key is None:
            return inner(module, *args, **kwargs)
        plan = self.outputs.get(key)
        if plan is not None:
            self.hits += 1
            out_leaves, out_spec = plan
            return pytree.tree_unflatten([_rebuild(x, leaves) for x in out_leaves], out_spec)
        before = [_meta_of(x) for x in leaves]
        out = inner(module, *args, **kwargs)
        if before == [_meta_of(x) for x in leaves]:  # nothing changed in place
            plan = _plan_outputs(out, leaves, module)
            if plan is not None:
                self.outputs[key] = plan
                # the key holds ids: keep those objects alive as long as the key
                self.keep.extend([inner, *(x for x in leaves if not isinstance(
                    x, (torch.Tensor, *_PLAIN)))])
        return out

    def _key(self, inner: GraphForward, leaves: list[Any], treespec: Any) -> Any:
        parts: list[Any] = [id(inner), treespec]
        for x in leaves:
            if isinstance(x, torch.Tensor):
                if type(x) is not torch.Tensor or x.device.type != "meta":
                    return None
                parts.append(_meta_of(x))
            elif isinstance(x, _PLAIN):
                parts.append((type(x), x))
            else:
                parts.append(("id", id(x)))
        return tuple(parts)


class _MemoForward:
    """The forward the walk installs: ``inner`` through the walk's meta memo."""

    __slots__ = ("memo", "inner")

    def __init__(self, memo: _MetaMemo, inner: GraphForward) -> None:
        self.memo = memo
        self.inner = inner

    def __call__(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.memo.call(self.inner, module, args, kwargs)


def _meta_of(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return (tuple(x.shape), x.stride(), x.storage_offset(), x.dtype)
    return None


def _plan_outputs(out: Any, inputs: list[Any], module: nn.Module) -> Any:
    """How to rebuild ``out`` on a memo hit, or None when it cannot be rebuilt exactly."""
    leaves, spec = pytree.tree_flatten(out)
    own = {id(t) for t in itertools.chain(module.parameters(), module.buffers())}
    plan: list[Any] = []
    for x in leaves:
        same = next((i for i, y in enumerate(inputs) if y is x), None)
        if same is not None:
            plan.append(("input", same))
        elif isinstance(x, torch.Tensor):
            if type(x) is not torch.Tensor or x.device.type != "meta" or id(x) in own:
                return None
            plan.append(("tensor", *_meta_of(x)))
        elif isinstance(x, _PLAIN):
            plan.append(("value", x))
        else:
            return None
    return plan, spec


def _rebuild(item: tuple[Any, ...], inputs: list[Any]) -> Any:
    kind = item[0]
    if kind == "input":
        return inputs[item[1]]
    if kind == "value":
        return item[1]
    _, shape, stride, offset, dtype = item
    extent = 1 + sum((n - 1) * s for n, s in zip(shape, stride) if n > 0)
    if 0 in shape:
        extent = 0
    base = torch.empty(offset + extent, dtype=dtype, device="meta")
    return base.as_strided(shape, stride, offset)


class _Walker:
    def __init__(self, result: Trace, cache: TraceCache | None, index: TreeIndex) -> None:
        self.result = result
        self.cache = cache
        self.index = index
        self.visited: set[str] = set()
        self.installed: list[nn.Module] = []  # graphs installed while walking, removed after
        self.keys = index.keys  # structure keys by module id, for this walk
        self.memo = _MetaMemo()
        self.frames: list[_Frame] = []  # modules being visited, innermost last

    def visit(self, module: nn.Module, qualname: str, args: tuple[Any, ...],
              kwargs: dict[str, Any], symbolic: set[int]) -> None:
        self.visited.add(qualname)
        entry = None
        key = None
        if self.cache is not None and not _foreign_forward(module):
            key = (_structure_key(module, self.keys), _inputs_key(args, kwargs, symbolic))
            entry = self.cache.lookup(key, module)
            if entry is not None and entry.subtree is not None and self._replay(
                    module, qualname, entry):
                return
        frame = _Frame(qualname)
        self.frames.append(frame)
        try:
            if entry is not None:
                self.result.cache_hits += 1
                reused: str | None = entry.qualname
            else:  # children are visited while tracing, as their calls are met
                entry = self._trace(module, qualname, args, kwargs, symbolic)
                if key is not None:
                    self.cache.store(key, entry)
                reused = None
            for rel, cap in entry.captures.items():
                if rel not in entry.linear_children(module):
                    self._visit_child(module, qualname, rel, cap)
            # after its children, whichever way they were reached: one order for the result
            self._record(module, qualname, entry, reused, install=True)
        finally:
            self.frames.pop()
        if entry.subtree is None and frame.complete and entry.owner is None:
            entry.subtree = _Subtree.build(entry, frame.children)
        if self.frames:
            self.frames[-1].add(qualname, entry)

    def _record(self, module: nn.Module, qualname: str, entry: _Entry, reused: str | None,
                install: bool) -> None:
        """Put what ``entry`` says of ``module`` into the result (and run its graph from now)."""
        if entry.graph is not None:
            assert entry.spec is not None
            if install:
                self._install(module, entry)
            # the graph stays shared with the cache until someone edits it (own())
            self.result.graphs[qualname] = ModuleGraph(
                qualname, type(module).__name__, entry.graph, entry.spec, reused, shared=True)
            # Linears whose weights the graph reads without calling them (F.linear(x, l.weight),
            # nn.MultiheadAttention's out_proj) are sites too: apply decides what to do.
            for owner in entry.weight_reads(module):
                self.result.linear_sites.setdefault(_join(qualname, owner), qualname)
            for rel in entry.linear_children(module):
                self.result.linear_sites[_join(qualname, rel)] = qualname
        else:
            self.result.untraced[qualname] = entry.reason or "not traced"
            if entry.eager_error:
                self.result.eager_errors[qualname] = entry.eager_error
            for rel, what in entry.linear_uses.items():
                self.result.python_linear_uses.setdefault(
                    _join(qualname, rel),
                    f"module {qualname or '<root>'} stays Python and its code {what}")

    def _replay(self, module: nn.Module, qualname: str, entry: _Entry) -> bool:
        """Record a whole subtree from the cache: every module below was traced before.

        Valid when the attributes read anywhere below are what they were (the structure key
        already matched), no module below carries a foreign forward, and none of them was
        visited yet in this walk. Otherwise the caller visits module by module.
        """
        subtree = entry.subtree
        assert subtree is not None
        mods = (self.index.paths if module is self.result.root
                else dict(module.named_modules(remove_duplicate=False)))
        compared: dict[tuple[int, int], bool] = {}  # identical layers share one config object
        for rel, names in subtree.reads.items():
            owner = mods.get(rel)
            for name, value in names:
                got = _read(module, rel, name) if owner is None else getattr(
                    owner, name, _MISSING)
                if got is value:
                    continue
                pair = (id(got), id(value))
                same = compared.get(pair)
                if same is None:
                    same = compared[pair] = _same(got, value)
                if not same:
                    return False
        for rel, _ in subtree.visits[:-1]:
            if _join(qualname, rel) in self.visited:
                return False
            fwd = mods[rel].__dict__.get("forward")
            if fwd is not None and not _is_graph_forward(fwd) and not (
                    isinstance(fwd, types.MethodType) and isinstance(fwd.__func__, _MemoForward)):
                return False
        install = bool(self.frames)  # at the top nothing runs the graphs any more
        for rel, sub_entry in subtree.visits:
            q = _join(qualname, rel)
            self.visited.add(q)
            self.result.cache_hits += 1
            self._record(mods[rel], q, sub_entry, sub_entry.qualname, install)
        if self.frames:
            self.frames[-1].add(qualname, entry)
        return True

    def _visit_child(self, parent: nn.Module, parent_q: str, rel: str, cap: Capture) -> None:
        child = parent.get_submodule(rel)
        child_q = f"{parent_q}.{rel}" if parent_q else rel
        if isinstance(child, nn.Linear):
            return
        if child_q in self.visited:
            frame = self.frames[-1] if self.frames else None
            if frame is not None and child_q not in frame.visited:
                frame.complete = False  # reached from elsewhere first: not self-contained
            return
        self.visit(child, child_q, cap.args, cap.kwargs, cap.symbolic_ints)

    def _install(self, module: nn.Module, entry: _Entry) -> None:
        if entry.compiled is None:  # the code is shared with every module the entry serves
            entry.compiled = GraphForward(ModuleGraph(
                entry.qualname, type(module).__name__, entry.graph, entry.spec, shared=True))
        if "forward" not in module.__dict__:
            module.forward = types.MethodType(self.memo.forward(entry.compiled), module)
            self.installed.append(module)

    def uninstall(self) -> None:
        for module in self.installed:
            module.__dict__.pop("forward", None)
        self.installed.clear()

    def _trace(self, module: nn.Module, qualname: str, args: tuple[Any, ...],
               kwargs: dict[str, Any], symbolic: set[int]) -> _Entry:
        tracer = ValueTracer()
        tracer.on_first_call = functools.partial(self._visit_child, module, qualname)
        spec = make_call_spec(forward_signature(type(module)), args, kwargs, symbolic)
        reason = None
        graph = None
        with _recording(module, tracer) as rec, torch.no_grad():
            try:
                if _foreign_forward(module):
                    raise TraceError(_FOREIGN_FORWARD)
                graph = tracer.trace_call(module, _clone_values(args), _clone_values(kwargs), spec)
                _finalize(graph)
                captures = tracer.captures
            except Exception as e:  # noqa: BLE001 - any failure keeps the module as Python
                reason = _reason(e)
                graph = None
        linear_uses: dict[str, str] = {}
        eager_error = None
        if graph is None:
            captures, eager_error, linear_uses = _eager_captures(
                module, args, kwargs, functools.partial(self._visit_child, module, qualname))
            if eager_error:
                reason += (f" (running it as Python on the example also failed: {eager_error}; "
                           f"submodules called after that point are not traced)")
        owner = None
        if graph is not None and any(n.op == "call_function" and is_constant(n.target)
                                     for n in graph.nodes):
            owner = weakref.ref(module)
        return _Entry(dict(rec.reads), graph, spec, captures, reason, qualname,
                      linear_uses=linear_uses, eager_error=eager_error, owner=owner)


def _reason(e: BaseException) -> str:
    if isinstance(e, TraceError):
        return e.reason
    return f"{type(e).__name__}: {e}".splitlines()[0][:500]


def _normalise_inputs(module: nn.Module, example_inputs: Any) -> Inputs:
    if example_inputs is None:
        from fxpass.zoo import example_inputs as build  # known HF tower types

        example_inputs = build(module)
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if (isinstance(example_inputs, tuple) and len(example_inputs) == 2
            and isinstance(example_inputs[0], tuple) and isinstance(example_inputs[1], dict)):
        return example_inputs[0], dict(example_inputs[1])
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise UsageError(
        f"example_inputs must be a dict of keyword arguments, a tuple of positional "
        f"arguments or an (args, kwargs) pair; got {type(example_inputs).__name__}")


def trace(module: nn.Module, example_inputs: Any = None, *,
          cache: TraceCache | None = DEFAULT_CACHE, index: TreeIndex | None = None) -> Trace:
    """Trace ``module`` into one fx graph per traceable submodule (see module docstring).

    ``example_inputs``: kwargs dict, args tuple, or ``(args, kwargs)``; None builds them for
    known HF tower types. Pass ``cache=None`` to trace everything afresh. ``index``: a
    ``TreeIndex.of(module)`` taken just before, by a caller that walked the tree already.
    """
    if not isinstance(module, nn.Module):
        raise UsageError(f"fxpass.trace expects an nn.Module, got {type(module).__name__}")
    start = time.perf_counter()
    args, kwargs = _normalise_inputs(module, example_inputs)
    try:
        args, kwargs = canonical_call(forward_signature(type(module)), args, kwargs)
    except TypeError as e:
        raise UsageError(f"example inputs do not fit {type(module).__name__}.forward: {e}; pass "
                         "the arguments a real call would") from e
    result = Trace(root=module, example_inputs=(args, kwargs))
    if index is None:
        index = TreeIndex.of(module)
    # Trace the class forward, not a previously installed graph.
    distinct = {id(m): m for m in index.paths.values()}.values()
    saved = {m: m.__dict__.pop("forward") for m in distinct
             if _is_graph_forward(m.__dict__.get("forward"))}
    walker = _Walker(result, cache, index)
    try:
        walker.visit(module, "", args, kwargs, set())
    finally:
        walker.uninstall()
        for m, fwd in saved.items():
            m.__dict__["forward"] = fwd
    result.elapsed_s = time.perf_counter() - start
    return result
