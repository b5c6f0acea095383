"""Tracing one module into an fx graph, with example values propagated beside the proxies.

Plain ``torch.fx`` knows nothing about the values flowing through a graph, so HF code that
unpacks shapes, calls ``len()``, splats ``*shape``, assigns into tensors or reads
``torch.finfo(x.dtype)`` stops it. Here every proxy carries the value its node computed on
the example inputs (real tensors for a real model, meta tensors for a meta model), which
answers those questions:

* structural reads (``x.shape``, ``x.dtype``, ``len(t)``, ``x.size(1)``) stay nodes in the
  graph, so the graph stays shape-generic;
* where Python needs a concrete value (``if``, ``range(n)``, ``int(...)``), the value is
  taken from the example and a guard node is left in the graph (see ``guards.py``);
* where that value depends on tensor *data* (``if x.sum() > 0``), tracing stops with a
  :class:`TraceError`: the module stays Python, with that reason.

Every submodule is a leaf: it becomes a ``call_module`` node and runs eagerly on the example
values; its inputs are captured so the caller can trace it in turn.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import dataclasses
import functools
import inspect
import operator
import os
import random
import sys
import threading
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch.fx.node import map_aggregate

from fxpass import meta, quirks
from fxpass.errors import TraceError
from fxpass.trace.guards import guard
from fxpass.trace.binding import (
    CallSpec,
    bind_module_call,
    forward_signature,
    make_call_spec,
)
from fxpass.trace.state import StateReads, recording

# Reads of these give tensor metadata, never data: fine to specialise on (with a guard).
_METADATA_ATTRS = frozenset(
    {"shape", "dtype", "device", "ndim", "is_nested", "is_cuda", "is_meta", "layout", "requires_grad",
     "is_sparse", "is_quantized", "is_floating_point", "itemsize"}
)
_METADATA_METHODS = frozenset(
    {"size", "dim", "ndimension", "numel", "nelement", "stride", "is_floating_point",
     "is_complex", "is_contiguous", "element_size", "get_device", "is_signed",
     "storage_offset"}
)
_METADATA_FUNCTIONS = frozenset(
    {len, torch.is_floating_point, torch.is_complex, torch.numel, torch.is_tensor}
)
# Reading these makes a Python value out of tensor data.
_DATA_METHODS = frozenset({"item", "tolist", "__bool__", "__int__", "__float__"})

_FXPASS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))



# torch functions whose arguments are sizes or dtypes, not tensors: torch's argument parser
# rejects a proxy there (``torch.ones(n, n)`` with ``n = x.shape[1]``: "ones() takes 1
# positional argument but 2 were given") before __torch_function__ could record it, so while
# tracing they are replaced by wrappers that record a node when handed a proxy.
_PROXY_ARG_FUNCTIONS = ("finfo", "iinfo", "ones", "zeros", "empty", "full", "rand", "randn",
                        "tensor", "as_tensor", "scalar_tensor",
                        "randint", "randperm", "eye", "linspace", "logspace", "tril_indices",
                        "triu_indices")
_ORIGINALS = {name: getattr(torch, name) for name in _PROXY_ARG_FUNCTIONS}
_RANDOM_FACTORIES = frozenset({"rand", "randn", "randint", "randperm"})


def _host_rng_state() -> Any:
    """Python's and (when imported) numpy's global RNG states, comparable with ``==``."""
    np_random = getattr(sys.modules.get("numpy"), "random", None)
    if np_random is None:
        return random.getstate()
    kind, keys, pos, has_gauss, cached = np_random.get_state()
    return random.getstate(), (kind, keys.tobytes(), pos, has_gauss, cached)


def _records_proxies(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` that records a node when a proxy is among its arguments (nested included)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        proxy = next((a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, fx.Proxy)),
                     None)
        if proxy is None:
            return fn(*args, **kwargs)
        return proxy.tracer.create_proxy("call_function", fn, args, kwargs)

    return wrapper


class _BroadcastVmap:
    """``torch.vmap`` while tracing: over proxies, nested vmaps of an index function become one
    broadcast call.

    HF builds attention masks by vmapping index functions (``mask(b, h, q, kv)``) over 1-D
    index tensors, which proxies cannot go through. For such elementwise index functions,
    vmapping each argument over its own output axis equals calling the function once on
    broadcast views (HF's own non-vmap mask path relies on the same identity). Only that form
    is accepted: each argument mapped at most once, at dim 0, output at dim 0, and the result
    must have the broadcast shape; anything else stops tracing with a reason.
    """

    def __init__(self, orig: Callable[..., Any], func: Callable[..., Any], in_dims: Any = 0,
                 out_dims: Any = 0, *rest: Any, **kw: Any) -> None:
        self.orig = orig
        self.func = func
        self.in_dims = in_dims
        self.out_dims = out_dims
        self.real = orig(func, in_dims, out_dims, *rest, **kw)

    def _levels(self) -> list["_BroadcastVmap"]:
        levels: list[_BroadcastVmap] = [self]
        while isinstance(levels[-1].func, _BroadcastVmap):
            levels.append(levels[-1].func)
        return levels

    def __call__(self, *args: Any) -> Any:
        if not _has_proxy(args):
            return self.real(*args)
        levels = self._levels()
        depth = len(levels)
        mapped: dict[int, int] = {}
        for level, vm in enumerate(levels):
            dims = vm.in_dims if isinstance(vm.in_dims, tuple) else (vm.in_dims,) * len(args)
            if vm.out_dims != 0 or len(dims) != len(args):
                raise TraceError("torch.vmap with out_dims != 0 or mismatched in_dims")
            for i, d in enumerate(dims):
                if d is None:
                    continue
                if d != 0 or i in mapped:
                    raise TraceError("torch.vmap mapping an argument twice or at dim != 0")
                mapped[i] = level
        new_args = list(args)
        for i, level in mapped.items():
            shape = [1] * depth
            shape[level] = -1
            new_args[i] = args[i].reshape(shape)
        out = levels[-1].func(*new_args)
        expected = tuple(int(value_of(args[i]).shape[0]) for i, _ in
                         sorted(mapped.items(), key=lambda kv: kv[1]))
        got = tuple(value_of(out).shape) if isinstance(value_of(out), torch.Tensor) else None
        if got is None or len(mapped) != depth or got != expected:
            raise TraceError(f"torch.vmap of a non-elementwise function (broadcast gave {got}, "
                             f"vmap needs {expected})")
        return out


def _traced_vmap(orig: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(orig)
    def vmap(func: Callable[..., Any], in_dims: Any = 0, out_dims: Any = 0, *rest: Any,
             **kw: Any) -> Any:
        return _BroadcastVmap(orig, func, in_dims, out_dims, *rest, **kw)

    return vmap


def value_of(x: Any) -> Any:
    """The example value behind a proxy (recursively through containers)."""
    if isinstance(x, ValueAttribute):
        return x.value
    if isinstance(x, fx.Proxy):
        return meta.info(x.node)["value"]
    return x


def _values(args: Any) -> Any:
    return map_aggregate(args, value_of) if _has_proxy(args) else args


def _has_proxy(args: Any) -> bool:
    found = False

    def visit(a: Any) -> Any:
        nonlocal found
        if isinstance(a, fx.Proxy):
            found = True
        return a

    map_aggregate(args, visit)
    return found


def _proxies_in(args: Any) -> list[fx.Proxy]:
    out: list[fx.Proxy] = []
    map_aggregate(args, lambda a: out.append(a) if isinstance(a, fx.Proxy) else None)
    return out


def _contains_tensor(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    if isinstance(v, (list, tuple)):
        return any(_contains_tensor(x) for x in v)
    if isinstance(v, dict):
        return any(_contains_tensor(x) for x in v.values())
    return False


def _is_static(node: fx.Node) -> bool:
    return bool(meta.get(node, "static", False))


def error_location(e: BaseException) -> str:
    """file:line of the innermost traceback frame outside torch and fxpass."""
    where = "<unknown>"
    tb = e.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        fname = os.path.abspath(code.co_filename)
        if not fname.startswith((_FXPASS_DIR, _TORCH_DIR)) and "functools" not in fname:
            where = f"{os.path.basename(fname)}:{tb.tb_lineno} in {code.co_name}"
        tb = tb.tb_next
    return where


def _user_location() -> str:
    """file:line of the innermost frame outside torch and fxpass (for guard messages)."""
    frame = inspect.currentframe()
    while frame is not None:
        fname = os.path.abspath(frame.f_code.co_filename)
        if not fname.startswith((_FXPASS_DIR, _TORCH_DIR)) and "functools" not in fname:
            return f"{os.path.basename(fname)}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back
    return "<unknown>"


class ValueProxy(fx.Proxy):
    """A proxy whose node knows its example value (``node.meta['fxpass']['value']``)."""

    @property
    def value(self) -> Any:
        return meta.info(self.node)["value"]

    def __getattr__(self, k: str) -> "ValueAttribute | None":
        if k.startswith("__") and k.endswith("__"):
            raise AttributeError(k)
        if getattr(meta.info(self.node).get("value"), k, _NOT_NONE) is None:
            # `out.attentions is None` must hold in traced code as in eager: a guarded None
            attr = ValueAttribute(self, k)
            return self.tracer.none(attr.node)
        return ValueAttribute(self, k)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not args and not kwargs and not callable(meta.info(self.node).get("value")):
            # `if callable(cond): cond = cond()` (HF's torch_compilable_check): every proxy
            # looks callable; calling a non-callable value gives the value back
            return self
        return super().__call__(*args, **kwargs)

    def __iter__(self) -> Iterator[Any]:
        return self.tracer.iter(self)

    def __len__(self) -> int:
        return self.tracer.concretize_len(self)

    def __bool__(self) -> bool:
        return self.tracer.to_bool(self)

    def __int__(self) -> int:
        return self.tracer.concretize(self, "int")

    def __index__(self) -> int:
        return self.tracer.concretize(self, "index")

    def __float__(self) -> float:
        return self.tracer.concretize(self, "float")

    def __setitem__(self, key: Any, value: Any) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    def __contains__(self, item: Any) -> bool:
        return self.tracer.to_bool(
            self.tracer.create_proxy("call_function", operator.contains, (self, item), {})
        )


class ValueAttribute(ValueProxy):
    """``proxy.attr``: a method call when called, a ``getattr`` node when used as a value."""

    def __init__(self, root: ValueProxy, attr: str) -> None:
        self.root = root
        self.attr = attr
        self.tracer = root.tracer
        self._node: fx.Node | None = None

    @property
    def node(self) -> fx.Node:  # type: ignore[override]
        if self._node is None:
            self._node = self.tracer.create_proxy(
                "call_function", builtins.getattr, (self.root, self.attr), {}
            ).node
        return self._node

    @property
    def value(self) -> Any:
        return meta.info(self.node)["value"]

    def __call__(self, *args: Any, **kwargs: Any) -> ValueProxy:
        return self.tracer.create_proxy("call_method", self.attr, (self.root, *args), kwargs)


def _make_constant(value: Any) -> Callable[[], Any]:
    """A graph target returning a tensor (or object) met while tracing, kept off the module."""

    def fxpass_constant() -> Any:
        return value

    fxpass_constant.__module__ = __name__
    fxpass_constant._fxpass_constant = True  # type: ignore[attr-defined]
    return fxpass_constant


def is_constant(target: Any) -> bool:
    """Whether a call_function target is a constant (tensor or object) made by the tracer."""
    return getattr(target, "_fxpass_constant", False) is True


@dataclasses.dataclass
class Capture:
    """The first call of a submodule seen while tracing its caller."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    symbolic_ints: set[int]  # leaf indices that were graph values (not constants) in the caller


class ValueTracer(fx.Tracer):
    """Traces one module; every submodule is a leaf (see module docstring)."""

    def __init__(self) -> None:
        super().__init__(autowrap_modules=(__import__("math"),))
        # Buffers read in forward become get_attr nodes, never values baked into the graph
        # (a baked `self.std_bias.float()` would carry one module's buffer to every module
        # sharing the trace, and miss checkpoint loads).
        self.proxy_buffer_attributes = True
        self._eager = 0
        self.captures: dict[str, Capture] = {}
        self.guard_count = 0
        self._constants: dict[int, fx.Node] = {}
        self._objects: dict[int, str] | None = None
        # Called with (relative path, capture) at a submodule's first call, before it runs on
        # the example values: the hierarchy traces the child there and installs its graph, so
        # the child runs its trace-safe graph (HF skips data-dependent shortcuts for proxies).
        self.on_first_call: Callable[[str, Capture], None] | None = None
        # get_attr target -> the value tracing sees for it (a vLLM layer's logical weight)
        self.values: dict[str, Any] = {}
        # what a leaf submodule runs on while tracing (a vLLM GEMM needs contiguous input)
        self.leaf_inputs: Callable[..., tuple[tuple[Any, ...], dict[str, Any]]] | None = None
        self._external: set[int] | None = None  # storages of the inputs and the module's tensors
        self._computed: set[int] = set()  # storages of every value a node computed
        self._real_values = False  # example values hold data (not meta)
        self._host_rng: Any = None  # Python's and numpy's RNG states between eager runs
        self._thread = threading.get_ident()  # the thread tracing (see _elsewhere)

    # -- entry point ------------------------------------------------------------------
    def trace_call(self, root: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                   spec: CallSpec) -> fx.Graph:
        self._call = (args, kwargs, spec)
        self._thread = threading.get_ident()
        tensors = _tensors_in((args, kwargs))
        self._real_values = bool(tensors) and all(_is_real(t) for t in tensors)
        patches = [*((torch, name, self._random(fn) if name in _RANDOM_FACTORIES
                      else _records_proxies(fn)) for name, fn in _ORIGINALS.items()),
                   (torch, "vmap", _traced_vmap(torch.vmap)),
                   (torch.func, "vmap", _traced_vmap(torch.func.vmap))]
        patches.append((nn.Module, "__setattr__", self._state_write(nn.Module.__setattr__)))
        for name in ("_check", "_check_with"):  # torch._check(cond, ...) on a traced bool
            patches.append((torch, name, self._checked(getattr(torch, name))))
        if self._real_values:  # HF's eager path on real values (see quirks)
            patches += quirks.hf_trace_patches(lambda x: isinstance(x, ValueProxy))
        with contextlib.ExitStack() as stack:
            for owner, name, new in patches:
                old = getattr(owner, name)
                setattr(owner, name, new)
                stack.callback(setattr, owner, name, old)
            self._host_rng = _host_rng_state() if self._real_values else None
            graph = self.trace(root)
            if self._host_rng is not None:
                self._host_rng_check("in its own code")
            return graph

    def _elsewhere(self) -> bool:
        """A call from another thread than the one tracing. fx patches ``Module.__call__``
        and ``__getattr__`` process-wide while it traces: another thread's model calls must
        run as plain Python, not land in this graph (and get proxies back)."""
        return threading.get_ident() != self._thread

    def _random(self, orig: Callable[..., Any]) -> Callable[..., Any]:
        """``torch.rand`` & co while tracing: always a node, proxies among the arguments or
        not. A call with plain sizes (HF's LayerDrop: ``torch.rand([]) < self.layerdrop``)
        would otherwise run once here and be baked into the graph as a constant, the same
        "random" numbers at every call and a shifted random stream for what follows."""
        tracer = self

        @functools.wraps(orig)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if tracer._eager or kwargs.get("generator") is not None or tracer._elsewhere():
                return orig(*args, **kwargs)
            return tracer.create_proxy("call_function", orig, args, kwargs)

        return wrapper

    def _host_rng_check(self, where: str) -> None:
        """Python's and numpy's global RNGs are only drawn from by the submodules run for
        their values (nodes of this graph): a draw by the traced code itself would be a
        constant in the graph (HF's SpecAugment masks come from numpy)."""
        state = _host_rng_state()
        if self._host_rng is not None and state != self._host_rng:
            raise TraceError(
                f"it draws random numbers from Python's or numpy's global RNG ({where}); a graph "
                "would replay them as constants, so the module runs as Python")
        self._host_rng = state

    def _checked(self, orig: Callable[..., None]) -> Callable[..., None]:
        """``torch._check`` / ``_check_with`` given a traced condition: the condition is made
        concrete (guarded), as eager checks it, then checked."""
        tracer = self

        @functools.wraps(orig)
        def check(*args: Any, **kwargs: Any) -> None:
            args = tuple(tracer.to_bool(a) if isinstance(a, ValueProxy) else a for a in args)
            kwargs = {k: tracer.to_bool(v) if isinstance(v, ValueProxy) else v
                      for k, v in kwargs.items()}
            return orig(*args, **kwargs)

        return check

    def _state_write(self, orig: Callable[..., None]) -> Callable[..., None]:
        """``Module.__setattr__`` while tracing: a graph does not replay attribute writes.

        HF code stores sizes computed from the input on the module (Swin's window size) and
        reads them back: a static value is guarded and stored concrete (the graph then holds
        for inputs that store the same); anything else (a tensor, data) would leave a proxy
        on the module and be lost at run time, so tracing stops.
        """
        tracer = self

        def setattr_(mod: nn.Module, name: str, value: Any) -> None:
            if not tracer._eager and _has_proxy(value):
                proxy = value if isinstance(value, fx.Proxy) else None
                if proxy is None or isinstance(value_of(proxy), torch.Tensor) or not _is_static(
                        proxy.node):
                    raise TraceError(
                        f"it stores a value computed from its input on a module "
                        f"({type(mod).__name__}.{name} = ..., at {_user_location()}); a graph "
                        "does not replay such writes, so the module runs as Python")
                value = tracer.concretize(proxy, "int" if type(value_of(proxy)) is int
                                          else "bool" if type(value_of(proxy)) is bool
                                          else "float")
            orig(mod, name, value)

        return setattr_

    def create_args_for_root(self, root_fn: Callable[..., Any], is_module: bool,
                             concrete_args: Any = None) -> tuple[Callable[..., Any], list[Any]]:
        args, kwargs, spec = self._call
        leaves, treespec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        proxies = []
        for idx, name in zip(spec.placeholders, spec.names):
            p = self.create_proxy("placeholder", name, (), {})
            info = meta.info(p.node)
            info["value"] = leaves[idx]
            info["static"] = not isinstance(leaves[idx], torch.Tensor)
            self._computed.update(_storage(t) for t in _tensor_leaves(leaves[idx]))
            proxies.append(p)

        def flat_forward(root: nn.Module, *ph: Any) -> Any:
            flat = list(leaves)
            for idx, p in zip(spec.placeholders, ph):
                flat[idx] = p
            a, kw = pytree.tree_unflatten(flat, treespec)
            return root_fn(root, *a, **kw)

        return flat_forward, [self.root, *proxies]

    # -- proxies and values -----------------------------------------------------------
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ValueProxy(node, self)

    def create_proxy(self, kind: str, target: Any, args: tuple[Any, ...],
                     kwargs: dict[str, Any], name: str | None = None,
                     type_expr: Any | None = None,
                     proxy_factory_fn: Callable[[fx.Node], fx.Proxy] | None = None) -> fx.Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, None)
        if kind in ("placeholder", "output"):
            return proxy
        node = proxy.node
        tensors = _tensors_in((args, kwargs)) if kind != "get_attr" else []
        versions = [_version(t) for t in tensors]
        try:
            value = self._compute(kind, target, args, kwargs)
        except TraceError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure on example values stops tracing
            raise TraceError(
                f"{_describe(node)} at {_user_location()} failed on the example values: "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                node=node.name) from e
        info = meta.info(node)
        changed = [t for t, v in zip(tensors, versions) if v is not None and _version(t) != v]
        if changed and any(_storage(t) in self._external_storages() for t in changed):
            info["mutates_input"] = _user_location()
        info["value"] = value
        self._computed.update(_storage(t) for t in _tensor_leaves(value))
        info["static"] = self._static(kind, target, args, kwargs, value)
        if value is None and kind in ("call_module", "call_method") or (
                value is None and kind == "call_function"
                and target not in (builtins.getattr, guard, operator.setitem)
                and not is_constant(target)):
            return self.none(node)  # `x is None` in traced code, as in eager
        return proxy

    def none(self, node: fx.Node) -> None:
        """A None computed by the graph, handed to Python as None (``is None`` checks), with a
        guard that it is None at run time too."""
        where = f"guard at {_user_location()}"
        g = self.create_node("call_function", guard, (node, True, "none", where), {})
        meta.info(g).update(guard={"kind": "none", "expected": True, "where": where},
                            static=True)
        self.guard_count += 1
        return None

    def _external_storages(self) -> set[int]:
        """Storages a graph run does not own: its inputs' and the module's own tensors'."""
        if self._external is None:
            args, kwargs, _ = self._call
            tensors = [*_tensors_in((args, kwargs)), *self.root.parameters(),
                       *self.root.buffers()]
            self._external = {_storage(t) for t in tensors}
        return self._external

    def _compute(self, kind: str, target: Any, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> Any:
        vargs, vkwargs = _values(args), _values(kwargs)
        if kind == "call_function":
            return target(*vargs, **vkwargs)
        if kind == "call_method":
            self_obj, *rest = vargs
            return getattr(self_obj, target)(*rest, **vkwargs)
        if kind == "get_attr":
            if target in self.values:
                return self.values[target]
            obj: Any = self.root
            with self.eager():  # plain attribute reads, not proxies
                for atom in target.split("."):
                    obj = getattr(obj, atom)
            return obj
        if kind == "call_module":
            mod = self.root.get_submodule(target)
            if target not in self.captures:
                pargs, pkwargs = bind_module_call(mod, args, kwargs)
                cap = Capture(_values(pargs), _values(pkwargs),
                              _symbolic_int_leaves(pargs, pkwargs))
                self.captures[target] = cap
                if self.on_first_call is not None:
                    # Eager: the visit may run the child as plain Python (when it does not
                    # trace); its calls and attribute reads must not land in this graph.
                    with self.eager():
                        self.on_first_call(target, cap)
            if self.leaf_inputs is not None:
                vargs, vkwargs = self.leaf_inputs(mod, vargs, vkwargs)
            self._host_rng_check(f"before calling {target!r}, at {_user_location()}")
            with self.eager():
                out = mod(*vargs, **vkwargs)
            self._host_rng = _host_rng_state()
            return out
        raise TraceError(f"unexpected node kind {kind}")

    def _static(self, kind: str, target: Any, args: Any, kwargs: Any, value: Any) -> bool:
        """True when ``value`` derives from shapes/dtypes/constants only, not tensor data."""
        if _contains_tensor(value) or kind in ("get_attr", "call_module"):
            return False
        inputs = _proxies_in((args, kwargs))
        if kind == "call_method":
            if target in _METADATA_METHODS:
                return True
            if target in _DATA_METHODS:
                return False
        if kind == "call_function":
            if target is builtins.getattr and args[1] in _METADATA_ATTRS:
                return True
            if target in _METADATA_FUNCTIONS:
                return True
        return all(_is_static(p.node) for p in inputs)

    @contextlib.contextmanager
    def eager(self) -> Iterator[None]:
        """Run submodules as plain Python (for their example values)."""
        self._eager += 1
        try:
            yield
        finally:
            self._eager -= 1

    # -- concretisation -> guards -------------------------------------------------------
    def concretize(self, proxy: fx.Proxy, kind: str) -> Any:
        node = proxy.node
        value = value_of(proxy)
        if not _is_static(node):
            raise TraceError(
                f"data-dependent control flow at {_user_location()}: {kind}() of a value "
                f"computed from tensor data ({_describe(node)}); the module runs as Python "
                "(its submodules are still traced)", node=node.name)
        conv = {"bool": bool, "int": int, "index": operator.index, "float": float,
                "len": len, "keys": tuple}[kind]
        try:
            result = conv(value)
        except Exception as e:  # noqa: BLE001
            raise TraceError(f"cannot take {kind}() of {node.format_node()}: {e}",
                             node=node.name) from e
        where = f"guard at {_user_location()}"
        g = self.create_proxy("call_function", guard,
                              (proxy, result, "int" if kind == "index" else kind, where), {})
        meta.info(g.node)["guard"] = {"kind": kind, "expected": result, "where": where}
        self.guard_count += 1
        return result

    def to_bool(self, obj: fx.Proxy) -> bool:
        return self.concretize(obj, "bool")

    def concretize_len(self, obj: fx.Proxy) -> int:
        # Always a node and a guard, also for a list a call returned: its length can depend
        # on the input (``torch.split(x, lengths.tolist())``, ``unbind``, ``chunk``), and a
        # length fixed by the code costs one cheap check.
        length = self.create_proxy("call_function", len, (obj,), {})
        meta.info(length.node)["static"] = True  # a count of items, never tensor data
        return self.concretize(length, "int")

    def iter(self, obj: fx.Proxy) -> Iterator[Any]:
        value = value_of(obj)
        if isinstance(value, dict):
            return iter([obj[k] for k in self.keys(obj)])
        n = self.concretize_len(obj)
        return iter([obj[i] for i in range(n)])

    def keys(self, obj: fx.Proxy) -> Any:
        value = value_of(obj)
        if isinstance(value, dict):
            keys = self.create_proxy("call_function", _key_tuple, (obj,), {})
            meta.info(keys.node)["static"] = True
            return list(self.concretize(keys, "keys"))
        raise TraceError(f"** on a non-dict value {type(value).__name__}", node=obj.node.name)

    # -- module access ----------------------------------------------------------------
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m is not self.root

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        if self._elsewhere():
            return forward(*args, **kwargs)
        if self._eager:
            # a module run for its values: what goes in and out may be recorded around the
            # trace (forward hooks), so it counts as computed by this trace
            out = forward(*args, **kwargs)
            self._computed.update(_storage(t) for t in _tensor_leaves((args, kwargs, out)))
            return out
        if m is self.root:
            return forward(*args, **kwargs)
        if m not in self.submodule_paths:
            # A module outside the tree (built in forward, kept in a plain list): inline it.
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self._eager or self._elsewhere():
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter):
            if a not in self.tensor_attrs and not any(a is b for _, b in self._buffers()):
                # A tensor made during tracing: a graph constant, not an attribute on the module.
                return self._constant(a, static=False)
        if dataclasses.is_dataclass(a) and not isinstance(a, type):
            with self.eager():  # the tracer's own reads: not state the forward read
                fields = {f.name: getattr(a, f.name) for f in dataclasses.fields(a)}
            if _has_proxy(fields):
                # ModelOutput & co built from graph values: rebuild the same type at run
                # time, not a plain dict; a ModelOutput keeps its keys' order (code that
                # sets a field after construction puts it last, and to_tuple() follows it)
                if isinstance(a, collections.OrderedDict):
                    keys = tuple(a.keys())
                    return self.create_node("call_function", _model_output(type(a)),
                                            (keys, *self.create_arg([a[k] for k in keys])), {})
                return self.create_node("call_function", type(a), (), self.create_arg(fields))
            # A dataclass holding no graph values (a transformers 5 config): the object itself.
            return self._object_constant(a)
        try:
            return super().create_arg(a)
        except NotImplementedError:
            # Any other object fx has no argument form for: passed by reference.
            return self._object_constant(a)

    def _object_constant(self, a: Any) -> fx.Node:
        path = self._object_attrs().get(id(a))
        if path is not None:  # an attribute of the module tree (self.config): read at run time
            return self.create_proxy("get_attr", path, (), {}).node
        return self._constant(a, static=True)

    def _constant(self, a: Any, *, static: bool) -> fx.Node:
        """One ``fxpass_constant`` node per object met while tracing (see _make_constant)."""
        node = self._constants.get(id(a))
        if node is None:
            if isinstance(a, torch.Tensor) and _storage(a) in self._computed:
                raise TraceError(
                    f"a tensor this trace computed reached the graph outside its calls, at "
                    f"{_user_location()} (a forward hook, a context variable or a global "
                    "recorded it: HF's output capturing for output_hidden_states / "
                    "output_attentions works this way); a graph would return this example's "
                    "values for every call, so the module runs as Python for such calls")
            node = self.create_node("call_function", _make_constant(a), (), {})
            meta.info(node).update(value=a, static=static)
            self._constants[id(a)] = node
        return node

    def _object_attrs(self) -> dict[int, str]:
        """id -> qualified path of the plain objects held as attributes in the module tree."""
        if self._objects is None:
            self._objects = {}
            for prefix, mod in self.root.named_modules():
                for k, v in vars(mod).items():
                    if (not k.startswith("_") and not isinstance(v, (torch.Tensor, nn.Module))
                            and not isinstance(v, (int, float, str, bool, type(None)))):
                        self._objects.setdefault(id(v), f"{prefix}.{k}" if prefix else k)
        return self._objects

    def _buffers(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self.root.named_buffers()


def _symbolic_int_leaves(args: tuple[Any, ...], kwargs: dict[str, Any]) -> set[int]:
    """Leaf indices (of the call's flattened *values*) that came from graph values.

    Ints among them were shape-derived in the caller, so the callee keeps them symbolic.
    """
    leaves, _ = pytree.tree_flatten((tuple(args), dict(kwargs)))
    out: set[int] = set()
    index = 0
    for leaf in leaves:
        if isinstance(leaf, fx.Proxy):
            n = len(pytree.tree_leaves(value_of(leaf)))
            out.update(range(index, index + n))
            index += n
        else:
            index += 1
    return out


_OUTPUT_BUILDERS: dict[type, Callable[..., Any]] = {}


def _model_output(cls: type) -> Callable[..., Any]:
    """A graph target building a ``cls`` ModelOutput with its keys set in a given order."""
    build = _OUTPUT_BUILDERS.get(cls)
    if build is None:
        def build(keys: tuple[str, ...], *values: Any) -> Any:
            try:
                out = cls()
            except TypeError:  # a field without a default: keyword construction
                return cls(**dict(zip(keys, values)))
            for k, v in zip(keys, values):
                if v is not None:  # as construction leaves None fields out of the keys
                    out[k] = v
            return out

        build.__name__ = build.__qualname__ = f"build_{cls.__name__}"
        build.__module__ = __name__
        _OUTPUT_BUILDERS[cls] = build
    return build


def _is_real(value: Any) -> bool:
    """A value with data: not on the meta device (nor holding meta tensors)."""
    if isinstance(value, torch.Tensor):
        return value.device.type != "meta"
    return True


_NOT_NONE = object()


def _key_tuple(d: dict[Any, Any]) -> tuple[Any, ...]:
    """The keys of a dict, in order (what ``**d`` and iteration specialise on)."""
    return tuple(d)


def _tensor_leaves(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple, dict)) or dataclasses.is_dataclass(value):
        try:
            return [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]
        except Exception:  # noqa: BLE001 - an unusual container: nothing to track
            return []
    return []


def _tensors_in(obj: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []

    def visit(a: Any) -> Any:
        v = value_of(a) if isinstance(a, fx.Proxy) else a
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)) and isinstance(a, fx.Proxy):
            out.extend(x for x in v if isinstance(x, torch.Tensor))
        return a

    map_aggregate(obj, visit)
    return out


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except Exception:  # noqa: BLE001 - inference tensors keep no version counter
        return None


def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage()._cdata
    except Exception:  # noqa: BLE001 - sparse & co: its own identity
        return id(t)


def _describe(node: fx.Node) -> str:
    """A node as a person reads it: what it calls, not fx's dump."""
    target = node.target
    if node.op == "call_module":
        return f"calling submodule {target!r}"
    if node.op == "call_method":
        return f"the method call .{target}()"
    if node.op == "get_attr":
        return f"reading attribute {target!r}"
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or target
    module = getattr(target, "__module__", None)
    return f"the call {module + '.' if module and module != 'builtins' else ''}{name}()"


def clone_values(obj: Any) -> Any:
    """Copies of example tensors, so in-place ops while tracing leave the caller's intact."""
    return pytree.tree_map(
        lambda t: t.clone() if isinstance(t, torch.Tensor) and t.device.type != "meta" else t,
        obj)


def finalize(graph: fx.Graph) -> None:
    """Replace the example values kept on nodes by small summaries; check the graph.

    Refuses (TraceError) a graph that changes an input, or the module's own tensors, in
    place before a guard: a call that guard rejects has then already changed them, so it
    could not be served again by another graph.
    """
    mutated: str | None = None
    for node in graph.nodes:
        if node.name == "self":  # a submodule named `self` (HF's ClapAudioAttention.self):
            node._rename("self_module")  # its node would rebind the forward's `self`
        info = node.meta.get(meta.KEY)
        if info is None:
            continue
        if mutated is None and info.get("mutates_input"):
            mutated = f"{_describe(node)} at {info['mutates_input']}"
        elif mutated is not None and info.get("guard"):
            raise TraceError(
                f"it changes an input or its own tensors in place ({mutated}) before a "
                f"specialisation guard ({info['guard']['where']}); a call that guard rejects "
                "could not be served again, so this module stays Python", node=node.name)
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


def trace_module(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *,
                 values: dict[str, Any] | None = None,
                 leaf_inputs: Callable[..., tuple[tuple[Any, ...], dict[str, Any]]] | None = None,
                 ) -> tuple[fx.Graph, CallSpec]:
    """One module's graph for one call (its submodules are leaves running as installed).

    Used when an installed graph meets a call it does not cover: integers among the
    arguments stay graph inputs (guarded where made concrete), so nearby sizes share it.
    """
    args, kwargs = bind_module_call(module, args, kwargs)
    spec = make_call_spec(forward_signature(type(module)), args, kwargs, None)
    spec.training = module.training
    tracer = ValueTracer()
    tracer.values = dict(values or {})
    tracer.leaf_inputs = leaf_inputs
    with trace_session(module), recording(module, tracer) as rec, torch.no_grad():
        graph = tracer.trace_call(module, clone_values(args), clone_values(kwargs), spec)
    spec.reads = StateReads(rec.reads, rec.modes)
    finalize(graph)
    return graph, spec


# Tracing patches process-wide names (torch factories, ``nn.Module.__setattr__`` /
# ``__getattribute__``, config classes): two traces at once would restore each other's
# patches out of order, and a Python forward running beside a trace would be recorded into
# it. Every trace of the process holds this lock; take it before any lock of your own that a
# trace may need (a graph family's, a first call's), never after.
TRACE_LOCK = threading.RLock()


@contextlib.contextmanager
def trace_session(module: nn.Module | None = None) -> Iterator[None]:
    """One trace (or a walk of traces): under :data:`TRACE_LOCK`, leaving no trace behind.

    Tracing runs the forward on example values: dropout and random ops draw from torch's,
    Python's and numpy's RNGs (HF's SpecAugment masks use numpy), and in training mode
    batch norms update their running statistics. All of it is put back afterwards, so a call
    traced on the way (a first call, a re-specialisation) draws the random numbers and sees
    the buffers the original module would, and its graph run is the call's only effect.
    """
    with TRACE_LOCK:
        devices = (list(range(torch.cuda.device_count()))
                   if torch.cuda.is_available() and torch.cuda.is_initialized() else [])
        py_state = random.getstate()
        np_random = getattr(sys.modules.get("numpy"), "random", None)
        np_state = np_random.get_state() if np_random is not None else None
        buffers = _buffer_snapshot(module) if module is not None else []
        try:
            with torch.random.fork_rng(devices=devices, enabled=True):
                yield
        finally:
            random.setstate(py_state)
            if np_state is not None:
                np_random.set_state(np_state)
            with torch.no_grad():
                for buf, saved in buffers:
                    buf.copy_(saved)  # (batch norm's in-place update keeps the version count)


def _buffer_snapshot(module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The module tree's real buffers, each with a copy to restore."""
    out = []
    seen: set[int] = set()
    for buf in module.buffers():
        if id(buf) in seen or buf.device.type == "meta" or buf.is_inference():
            continue
        seen.add(id(buf))
        out.append((buf, buf.detach().clone()))
    return out
