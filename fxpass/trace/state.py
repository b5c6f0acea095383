"""Module and config state a traced forward reads: recorded while tracing, checked per call.

A graph bakes in every plain value its forward read off the module tree (``self.training``,
``self.dropout``, ``self.config.output_hidden_states``, ``self.config._attn_implementation``):
Python read them once, while tracing. A user who changes one afterwards (``tower.train()``,
``layer.dropout = 0.3``, ``model.config.output_hidden_states = True``,
``model.set_attn_implementation("eager")``) changes what the original computes, so each such
read is recorded with its value and checked at every call, like a shape guard: a call whose
state differs is not served by that graph (it is traced again, or runs as Python).

Recording: while a module is traced, ``nn.Module.__getattribute__`` is patched (reads off the
traced module's tree), and each plain object reached through a module attribute (a config,
a nested ``vision_config``, a dataclass of options) has its class swapped for a recording
subclass until the trace ends, so reads through it are recorded as chains
(``config.output_hidden_states``). Reads made by children run for their example values are
not recorded: a child traced on its own has its own reads, a Python child reads live.

Checking costs one ``getattr`` chain per recorded read (``StateReads.hold``): a few per
module, compared by identity first.
"""

from __future__ import annotations

import copy
import enum
import functools
import threading
import types
from typing import Any, Iterator

import torch
from torch import nn

from fxpass.layers import is_vllm_gemm

_orig_getattribute = object.__getattribute__
_PLAIN = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device,
          torch.layout, torch.memory_format, enum.Enum, type)
_CALLABLE = (types.FunctionType, types.BuiltinFunctionType, functools.partial)
MISSING = object()  # the value of an attribute that did not exist when read


def _is_plain(value: Any) -> bool:
    """A value compared by equality: scalars, and containers of them (copied when recorded)."""
    if isinstance(value, _PLAIN):
        return True
    if type(value) in (tuple, list, set, frozenset):
        return all(_is_plain(v) for v in value)
    if type(value) is dict:
        return all(_is_plain(k) and _is_plain(v) for k, v in value.items())
    return False


def _is_state_object(value: Any) -> bool:
    """An object whose attributes are state a forward reads further (a config)."""
    if isinstance(value, (nn.Module, torch.Tensor, type, types.ModuleType, *_PLAIN, *_CALLABLE,
                          types.MethodType)) or callable(value):
        return False
    cls = type(value)
    return hasattr(value, "__dict__") and cls.__module__ not in ("builtins", "torch")


class _Recorder:
    """The reads of one trace: ``(module path, attribute chain) -> value``."""

    def __init__(self, root: nn.Module, eager: Any) -> None:
        # vLLM's layers are built once, their attributes fixed (tracing shows HF's logical
        # weights in their place); a linear's sizes are weight metadata, which the trace cache
        # key and the weight-probe rule cover (after apply the linear is a vLLM layer)
        self.paths = {id(m): p for p, m in root.named_modules() if not is_vllm_gemm(m)}
        self.linears = {id(m) for m in root.modules() if isinstance(m, nn.Linear)}
        # id(state object) -> (path, chain, how each step of the chain was read)
        self.objects: dict[int, tuple[str, str, tuple[str, ...]]] = {}
        self.eager = eager  # the tracer: reads while it runs children eagerly don't count
        self.thread = threading.get_ident()
        self.reads: dict[tuple[str, str], Any] = {}
        self.count = 0  # reads recorded so far (a property's getter that read some: derived)
        self.modes: dict[tuple[str, str], tuple[str, ...]] = {}  # see StateReads
        self.swapped: list[tuple[Any, type]] = []

    def active(self) -> bool:
        return threading.get_ident() == self.thread and not self.eager._eager

    def record(self, path: str, chain: str, modes: tuple[str, ...], value: Any) -> None:
        key = (path, chain)
        if key in self.reads:
            self.count += 1  # read again inside a getter: still a read it derives from
            return
        self.count += 1
        if value is MISSING or _is_plain(value):
            self.reads[key] = copy.deepcopy(value) if isinstance(
                value, (list, dict, set)) else value
            self.modes[key] = modes
        elif isinstance(value, (torch.Tensor, *_CALLABLE)):
            # by identity: a plain tensor attribute (not a buffer) the graph holds as a
            # constant, a function attribute (``self.act_fn``)
            self.reads[key] = value
            self.modes[key] = modes
        elif _is_state_object(value):
            self.track(value, path, chain, modes)

    def track(self, obj: Any, path: str, chain: str, modes: tuple[str, ...]) -> None:
        if id(obj) in self.objects:
            return
        cls = type(obj)
        try:
            obj.__class__ = _recording_class(cls)
        except TypeError:  # __slots__ or a C type: its reads are not seen (rare for configs)
            return
        self.objects[id(obj)] = (path, chain, modes)
        self.swapped.append((obj, cls))

    def restore(self) -> None:
        for obj, cls in reversed(self.swapped):
            obj.__class__ = cls
        self.swapped.clear()


_LINEAR_SIZES = frozenset({"in_features", "out_features"})
_RECORDERS: list[_Recorder] = []
_patch_lock = threading.RLock()


_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)
CHILDREN = "#children"  # a chain step: the names of a module container's children
_orig_module_getattr = nn.Module.__getattr__


def _module_getattr(self: nn.Module, name: str) -> Any:
    """``Module.__getattr__`` (children, parameters, buffers) while recording: a container
    of modules a forward iterates (``for layer in self.layers``) is state too; the graph
    calls each child by name, so a user trimming or extending it changes the call."""
    value = _orig_module_getattr(self, name)
    if _RECORDERS and isinstance(value, _CONTAINERS):
        rec = _RECORDERS[-1]
        path = rec.paths.get(id(self))
        if path is not None and rec.active():
            rec.record(path, f"{name}.{CHILDREN}", ("get", CHILDREN), tuple(value._modules))
    return value


def _module_getattribute(self: nn.Module, name: str) -> Any:
    value = _orig_getattribute(self, name)
    if _RECORDERS and not (name[0] == "_" and name[1:2] == "_"):
        rec = _RECORDERS[-1]
        path = rec.paths.get(id(self))
        if (path is not None and rec.active()
                and not isinstance(value, (nn.Module, types.MethodType))
                and not (name in _LINEAR_SIZES and id(self) in rec.linears)
                and (name[0] != "_" or isinstance(value, _PLAIN))):
            rec.record(path, name, (_mode(self, name, value),), value)
    return value


def _mode(obj: Any, name: str, value: Any) -> str:
    """How a read is repeated cheaply at check time: ``dict`` (the instance dict held the
    value), ``missing`` (absent, and the read failed), else ``get`` (a property, a class
    attribute: ``getattr``)."""
    try:
        d = _orig_getattribute(obj, "__dict__")
    except AttributeError:
        return "get"
    if name in d:
        return "dict" if d[name] is value else "get"
    return "missing" if value is MISSING else "get"


@functools.lru_cache(maxsize=None)
def _recording_class(cls: type) -> type:
    """``cls`` with attribute reads recorded (swapped in while a trace runs)."""
    base_getattr = getattr(cls, "__getattr__", None)

    def __getattribute__(self: Any, name: str) -> Any:
        before = _RECORDERS[-1].count if _RECORDERS else 0
        try:
            value = super(sub, self).__getattribute__(name)
        except AttributeError:
            if base_getattr is None:
                _record_object(self, name, MISSING)
            raise
        derived = bool(_RECORDERS) and _RECORDERS[-1].count > before
        _record_object(self, name, value, derived)
        return value

    namespace: dict[str, Any] = {"__getattribute__": __getattribute__,
                                 "__module__": cls.__module__, "__qualname__": cls.__qualname__}
    if base_getattr is not None:
        def __getattr__(self: Any, name: str) -> Any:
            try:
                value = base_getattr(self, name)
            except AttributeError:
                _record_object(self, name, MISSING)
                raise
            _record_object(self, name, value)
            return value

        namespace["__getattr__"] = __getattr__
    sub = type(cls.__name__, (cls,), namespace)
    return sub


def _record_object(obj: Any, name: str, value: Any, derived: bool = False) -> None:
    """Record a read off a tracked state object. ``derived``: a property whose getter read
    other attributes that were recorded meanwhile (HF's ``config._attn_implementation`` reads
    ``_attn_implementation_internal``): checking those is checking it, and HF's properties
    are the slow part of a check, so it is not recorded itself."""
    if not _RECORDERS or name[:2] == "__":
        return
    rec = _RECORDERS[-1]
    where = rec.objects.get(id(obj))
    if where is not None and rec.active() and not isinstance(value, types.MethodType):
        mode = _mode(obj, name, value)
        if derived and mode == "get":
            return
        path, chain, modes = where
        rec.record(path, f"{chain}.{name}", (*modes, mode), value)


class recording:
    """Record the state read off ``root``'s module tree while tracing it (see module docs).

    ``tracer`` is the ValueTracer: reads made while it runs submodules eagerly don't count.
    """

    def __init__(self, root: nn.Module, tracer: Any) -> None:
        self.rec = _Recorder(root, tracer)

    def __enter__(self) -> _Recorder:
        _patch_lock.acquire()
        if not _RECORDERS:
            nn.Module.__getattribute__ = _module_getattribute  # type: ignore[method-assign]
            nn.Module.__getattr__ = _module_getattr  # type: ignore[method-assign]
        _RECORDERS.append(self.rec)
        return self.rec

    def __exit__(self, *exc: Any) -> None:
        self.rec.restore()
        _RECORDERS.pop()
        if not _RECORDERS:
            del nn.Module.__getattribute__
            nn.Module.__getattr__ = _orig_module_getattr  # type: ignore[method-assign]
        _patch_lock.release()


def read(module: nn.Module, path: str, chain: str) -> Any:
    """The current value of a recorded read (``MISSING`` when it does not resolve)."""
    try:
        obj: Any = module.get_submodule(path) if path else module
        for name in chain.split("."):
            obj = tuple(obj._modules) if name == CHILDREN else getattr(obj, name)
    except AttributeError:
        return MISSING
    return obj


def same(a: Any, b: Any) -> bool:
    """Equal as a recorded read compares: identity, then equality of plain values."""
    if a is b:
        return True
    if type(a) is not type(b) or isinstance(a, torch.Tensor):
        return False
    if isinstance(a, functools.partial):  # partials compare by identity; compare their parts
        return (same(a.func, b.func) and len(a.args) == len(b.args)
                and all(same(x, y) for x, y in zip(a.args, b.args))
                and a.keywords.keys() == b.keywords.keys()
                and all(same(v, b.keywords[k]) for k, v in a.keywords.items()))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - incomparable objects are simply different
        return False


class StateReads:
    """The recorded reads of one graph, checked at each call (see module docs)."""

    __slots__ = ("items",)

    def __init__(self, reads: dict[tuple[str, str], Any],
                 modes: dict[tuple[str, str], tuple[str, ...]] | None = None) -> None:
        # (child path atoms, ((attribute, how it was read), ...), expected value)
        modes = modes or {}
        self.items: tuple[tuple[tuple[str, ...], tuple[tuple[str, str], ...], Any], ...] = tuple(
            (tuple(path.split(".")) if path else (),
             tuple(zip(chain.split("."), modes.get((path, chain))
                       or ("get",) * (chain.count(".") + 1))),
             value)
            for (path, chain), value in reads.items())

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[tuple[str, str, Any]]:
        for path, chain, value in self.items:
            yield ".".join(path), ".".join(n for n, _ in chain), value

    def hold(self, module: nn.Module) -> bool:
        """Whether every read gives what it gave while tracing.

        A step read from the instance dict at trace time is read from it again (one dict
        lookup, also for a config whose own ``__getattribute__`` is slow); one that is no
        longer there, a property or a class attribute goes through ``getattr``. Under
        torch.compile every step is a ``getattr``, which dynamo turns into its own guards.
        """
        if torch.compiler.is_compiling():
            return all(same(read(module, path, chain), expected) for path, chain, expected in self)
        for path, chain, expected in self.items:
            obj: Any = module
            try:
                for name in path:
                    obj = obj._modules[name]
            except (AttributeError, KeyError):
                return False
            for name, mode in chain:
                if mode == CHILDREN:
                    obj = tuple(obj._modules)
                    continue
                if mode != "get":
                    try:
                        d = _orig_getattribute(obj, "__dict__")
                    except AttributeError:
                        d = None
                    if d is not None:
                        if mode == "dict":
                            value = d.get(name, MISSING)
                            if value is not MISSING:
                                obj = value
                                continue
                        elif name not in d:
                            obj = MISSING
                            break
                obj = getattr(obj, name, MISSING)
                if obj is MISSING:
                    break
            if obj is not expected and not same(obj, expected):
                return False
        return True

    def why_not(self, module: nn.Module) -> str | None:
        """The first read that changed, as a person reads it, or None."""
        for path, chain, expected in self:
            got = read(module, path, chain)
            if got is not expected and not same(got, expected):
                where = f"{path}.{chain}" if path else chain
                return (f"module state changed since its graph was traced: .{where} is "
                        f"{_show(got)}, was {_show(expected)}")
        return None


def _show(value: Any) -> str:
    if value is MISSING:
        return "not set"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
