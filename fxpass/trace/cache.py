"""The trace cache: identical modules (same class, structure, attributes read while tracing,
input signature) share one trace, and a module whose whole subtree was traced before is
recorded from the cache in one step.

The key is structural (:class:`TreeIndex` computes every module's key in one walk of the
tree); attribute reads recorded while tracing (``self.config.x``) validate an entry, since
they decide branches the structure does not show.
"""

from __future__ import annotations

import dataclasses
import itertools
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from fxpass.layers import is_linear
from fxpass.trace.state import read, same
from fxpass.trace.binding import CallSpec
from fxpass.trace.tracer import Capture

if TYPE_CHECKING:
    from fxpass.runtime.dispatch import GraphForward

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
        """The captured calls that are linear calls (sites, not modules to visit)."""
        if self._linear_children is None:
            self._linear_children = frozenset(
                rel for rel in self.captures if is_linear(module.get_submodule(rel)))
        return self._linear_children

    def weight_reads(self, module: nn.Module) -> tuple[str, ...]:
        """Linears whose weight or bias the graph reads with get_attr (relative paths)."""
        if self._weight_reads is None:
            owners = []
            for node in self.graph.nodes if self.graph is not None else ():
                if node.op == "get_attr" and "." in node.target:
                    owner, _, attr = node.target.rpartition(".")
                    if (attr in ("weight", "bias")
                            and is_linear(module.get_submodule(owner))):
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
            if all(same(read(module, p, n), v) for (p, n), v in entry.reads.items()):
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
