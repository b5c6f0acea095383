"""Hierarchical tracing: one fx graph per module that traces, Python for the rest.

The root is traced first with the example inputs; each submodule it calls is traced next
with the inputs captured during that trace, and so on down. A module that cannot be traced
is recorded with its reason and kept as Python; its children are still reached, through a
plain run of it with capture hooks. Identical modules (same class, structure, attributes
read while tracing and input signature) are traced once: the cache shares their graph, and a
module whose whole subtree was traced before is recorded from the cache in one step (its
attribute reads checked), so a second identical tower costs one tree walk. On meta values a
graph's outputs depend on its inputs' metadata only, so while walking each (graph, input
metadata) runs once (``memo.MetaMemo``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
import types
import weakref
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from torch import nn

from fxpass.errors import TraceError, UsageError
from fxpass.layers import is_linear
from fxpass.trace.cache import (
    DEFAULT_CACHE,
    TraceCache,
    TreeIndex,
    _Entry,
    _Frame,
    _inputs_key,
    _join,
    _structure_key,
    _Subtree,
)
from fxpass.runtime.dispatch import Family, GraphForward
from fxpass.runtime.install import foreign_forward, install, is_graph_forward
from fxpass.runtime.policy import Respecialiser
from fxpass.trace.binding import bind_module_call, forward_signature, make_call_spec
from fxpass.trace.graph import ModuleGraph
from fxpass.trace.memo import MemoForward, MetaMemo
from fxpass.trace.state import StateReads, read, recording, same
from fxpass.trace.tracer import (
    Capture,
    ValueTracer,
    clone_values,
    error_location,
    finalize,
    is_constant,
    trace_session,
)

Inputs = tuple[tuple[Any, ...], dict[str, Any]]


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

    def install(self, module: nn.Module | None = None, *, strict: bool = False,
                runtime: Respecialiser | None = None) -> nn.Module:
        """Make each traced module of ``module`` (default: the traced one) run its graph.

        The tree, classes and state_dict stay as they are: only the instance ``forward``
        of traced modules is set. A call a graph does not cover is traced again (see
        ``fxpass.runtime``); ``strict=True`` raises GuardError for it instead.
        """
        target = self.root if module is None else module
        runtime = runtime if runtime is not None else Respecialiser(strict=strict)
        families: dict[int, Family] = {}
        for qualname, mg in self.graphs.items():
            family = families.setdefault(id(mg.graph), Family())
            install(target.get_submodule(qualname), GraphForward(mg, runtime, family))
        return target

    def build(self, *, strict: bool = False) -> nn.Module:
        """A deep copy of the traced module running its graphs (the original is untouched)."""
        return self.install(copy.deepcopy(self.root), strict=strict)

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


_FOREIGN_FORWARD = ("it has an instance forward fxpass did not install (accelerate hooks, a "
                    "monkeypatch); a graph of its class forward would replace it")


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
    # nn.Linear, and vLLM layers already swapped in (a tower traced at its first call)
    linears = {m: n for m, n in paths.items() if is_linear(m)}
    reads: dict[str, set[str]] = {}
    depth = [0]
    quiet = [0]  # >0 while a child is being visited (its own tracing reads don't count)
    raw_keywords: dict[str, tuple[str, ...]] = {}
    orig_call = nn.Module.__call__
    classes = {type(m) for m in linears} | {nn.Linear}
    prev = {cls: cls.__dict__.get("__getattribute__") for cls in classes}

    def call(mod: nn.Module, *a: Any, **kw: Any) -> Any:
        path = paths.get(mod)
        if path is not None and depth[0] == 0 and path not in captures:
            ca, ckw = bind_module_call(mod, a, kw)
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

    def getattribute_for(cls: type) -> Callable[[nn.Module, str], Any]:
        before = prev[cls]

        def linear_getattribute(mod: nn.Module, name: str) -> Any:
            if name[0] != "_" and depth[0] == 0 and not quiet[0]:
                path = linears.get(mod)
                if path is not None:
                    reads.setdefault(path, set()).add(name)
            if before is not None:
                return before(mod, name)
            return super(cls, mod).__getattribute__(name)

        return linear_getattribute

    error = None
    nn.Module.__call__ = call  # type: ignore[method-assign]
    if linears:
        for cls in classes:
            cls.__getattribute__ = getattribute_for(cls)  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            module(*clone_values(args), **clone_values(kwargs))
    except Exception as e:  # noqa: BLE001 - children reached before the failure still count
        error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    finally:
        nn.Module.__call__ = orig_call  # type: ignore[method-assign]
        if linears:
            for cls, before in prev.items():
                if before is None:
                    del cls.__getattribute__
                else:
                    cls.__getattribute__ = before  # type: ignore[method-assign]
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


class _Walker:
    def __init__(self, result: Trace, cache: TraceCache | None, index: TreeIndex,
                 policy: Respecialiser | None = None) -> None:
        self.result = result
        self.cache = cache
        self.index = index
        self.policy = policy  # what the tracer sees of vLLM layers already in the tree
        self.visited: set[str] = set()
        self.installed: list[nn.Module] = []  # graphs installed while walking, removed after
        self.keys = index.keys  # structure keys by module id, for this walk
        self.memo = MetaMemo()
        self.frames: list[_Frame] = []  # modules being visited, innermost last

    def visit(self, module: nn.Module, qualname: str, args: tuple[Any, ...],
              kwargs: dict[str, Any], symbolic: set[int]) -> None:
        self.visited.add(qualname)
        entry = None
        key = None
        if self.cache is not None and not foreign_forward(module):
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
                got = read(owner if owner is not None else module,
                           "" if owner is not None else rel, name)
                if got is value:
                    continue
                pair = (id(got), id(value))
                equal = compared.get(pair)
                if equal is None:
                    equal = compared[pair] = same(got, value)
                if not equal:
                    return False
        for rel, _ in subtree.visits[:-1]:
            if _join(qualname, rel) in self.visited:
                return False
            fwd = mods[rel].__dict__.get("forward")
            if fwd is not None and not is_graph_forward(fwd) and not (
                    isinstance(fwd, types.MethodType) and isinstance(fwd.__func__, MemoForward)):
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
        if is_linear(child):
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
            module.forward = types.MethodType(MemoForward(self.memo, entry.compiled), module)
            self.installed.append(module)

    def uninstall(self) -> None:
        for module in self.installed:
            module.__dict__.pop("forward", None)
        self.installed.clear()

    def _trace(self, module: nn.Module, qualname: str, args: tuple[Any, ...],
               kwargs: dict[str, Any], symbolic: set[int]) -> _Entry:
        tracer = ValueTracer()
        tracer.on_first_call = functools.partial(self._visit_child, module, qualname)
        if self.policy is not None:
            tracer.values = self.policy.trace_values(module)
            tracer.leaf_inputs = self.policy.leaf_inputs
        spec = make_call_spec(forward_signature(type(module)), args, kwargs, symbolic)
        spec.training = module.training
        reason = None
        graph = None
        with recording(module, tracer) as rec, torch.no_grad():
            try:
                if foreign_forward(module):
                    raise TraceError(_FOREIGN_FORWARD)
                graph = tracer.trace_call(module, clone_values(args), clone_values(kwargs), spec)
                finalize(graph)
                captures = tracer.captures
            except Exception as e:  # noqa: BLE001 - any failure keeps the module as Python
                reason = _reason(e)
                cls = type(module)
                if cls.__module__.startswith("torch.nn.") and not isinstance(e, TraceError):
                    # torch's own code checks isinstance(x, Tensor), which fx proxies fail
                    reason = (f"{cls.__module__}.{cls.__qualname__} is torch's own module and "
                              f"does not trace with fx proxies ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}); it runs as is, and what its "
                              "code does to its linears is checked on the example run")
                graph = None
        linear_uses: dict[str, str] = {}
        eager_error = None
        if graph is None:
            captures, eager_error, linear_uses = _eager_captures(
                module, args, kwargs, functools.partial(self._visit_child, module, qualname))
            if eager_error:
                reason += (f" (running it as Python on the example also failed: {eager_error}; "
                           f"submodules called after that point are not traced)")
        spec.reads = StateReads(rec.reads, rec.modes)
        owner = None
        if graph is not None and any(n.op == "call_function" and is_constant(n.target)
                                     for n in graph.nodes):
            owner = weakref.ref(module)
        return _Entry(dict(rec.reads), graph, spec, captures, reason, qualname,
                      linear_uses=linear_uses, eager_error=eager_error, owner=owner)


def _reason(e: BaseException) -> str:
    """Why a module stays Python, for a person: the construct, where, and what happens."""
    if isinstance(e, TraceError):
        return e.reason
    text = str(e).splitlines()[0][:400] if str(e) else ""
    return (f"tracing stopped at {error_location(e)} on {type(e).__name__}: {text}; the "
            "module runs as Python (its submodules are still traced)")


def _normalise_inputs(module: nn.Module, example_inputs: Any) -> Inputs:
    if example_inputs is None:
        raise UsageError(
            f"fxpass.trace({type(module).__name__}) needs example inputs: pass "
            "example_inputs= as a real call of its forward would (a kwargs dict, an args tuple "
            "or an (args, kwargs) pair; fxpass.zoo.example_inputs(tower) builds them for the "
            "built-in towers), or use fxpass.apply(model, quant_config), which traces at the "
            "model's first real call when it has none")
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
          cache: TraceCache | None = DEFAULT_CACHE, index: TreeIndex | None = None,
          policy: Respecialiser | None = None) -> Trace:
    """Trace ``module`` into one fx graph per traceable submodule (see module docstring).

    ``example_inputs``: kwargs dict, args tuple, or ``(args, kwargs)``, as a real call would
    pass them (required: the trace stage knows no model). Pass ``cache=None`` to trace
    everything afresh. ``index``: a ``TreeIndex.of(module)`` taken just before, by a caller
    that walked the tree already. ``policy``: what the tracer sees of vLLM layers already in
    the tree (their logical weights, their GEMM inputs): the rewrite stage's, when a tower
    whose linears were swapped at init is traced at its first real call.
    """
    if not isinstance(module, nn.Module):
        raise UsageError(f"fxpass.trace expects an nn.Module, got {type(module).__name__}")
    start = time.perf_counter()
    args, kwargs = _normalise_inputs(module, example_inputs)
    try:
        args, kwargs = bind_module_call(module, args, kwargs)
    except TypeError as e:
        raise UsageError(f"example inputs do not fit {type(module).__name__}.forward: {e}; pass "
                         "the arguments a real call would") from e
    result = Trace(root=module, example_inputs=(args, kwargs))
    if index is None:
        index = TreeIndex.of(module)
    with trace_session(module):
        # Trace the class forward, not a previously installed graph.
        distinct = {id(m): m for m in index.paths.values()}.values()
        saved = {m: m.__dict__.pop("forward") for m in distinct
                 if is_graph_forward(m.__dict__.get("forward"))}
        walker = _Walker(result, cache, index, policy)
        try:
            walker.visit(module, "", args, kwargs, set())
        finally:
            walker.uninstall()
            for m, fwd in saved.items():
                m.__dict__["forward"] = fwd
    result.elapsed_s = time.perf_counter() - start
    return result
