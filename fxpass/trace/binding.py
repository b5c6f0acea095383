"""Call binding: one canonical form for the many ways a forward can be called.

vLLM calls ``tower(features, mask)`` where HF code uses keywords, users leave defaulted
arguments out, and decorated forwards accept renamed keywords. The tracer records a call in
canonical form (:class:`CallSpec`); the installed forwards map each later call onto it, with
a per-call-form plan for the fast path (:func:`plan_of`).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from fxpass.trace.state import StateReads


@dataclasses.dataclass
class CallSpec:
    """How a call's ``(args, kwargs)`` map to graph placeholders.

    Tensor leaves and integers become placeholders; other leaves (flags, None, configs) are
    baked in and checked at every call.
    """

    treespec: pytree.TreeSpec
    placeholders: list[int]  # leaf indices fed to the graph, in placeholder order
    constants: dict[int, Any]  # leaf index -> value baked into the graph
    names: list[str]
    training: bool | None = None  # the module's training flag when traced (None: unchecked)
    tensor_inputs: tuple[bool, ...] = ()  # per placeholder: a tensor (else an int)
    # module / config state the forward read while tracing, checked per call (see state.py)
    reads: StateReads | None = None


def _leaf_names(treespec: pytree.TreeSpec, sig: inspect.Signature | None) -> list[str]:
    """Readable placeholder names for each leaf: ``hidden_states``, ``position_embeddings_0``."""
    dummy = pytree.tree_unflatten(list(range(treespec.num_leaves)), treespec)
    names: dict[int, str] = {}
    args, kwargs = dummy
    positional = [n for n, p in (sig.parameters.items() if sig is not None else ())
                  if p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL)]

    def walk(obj: Any, path: str) -> None:
        for kp, leaf in pytree.tree_flatten_with_path(obj)[0]:
            suffix = "_".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                              for k in kp)
            names[leaf] = re.sub(r"\W", "_", f"{path}_{suffix}" if suffix else path)

    for i, a in enumerate(args):
        walk(a, positional[i] if i < len(positional) else f"arg{i}")
    for k, v in kwargs.items():
        walk(v, k)
    return [names.get(i, f"leaf{i}") for i in range(treespec.num_leaves)]


# per class (a plain dict, not lru_cache: torch.compile traces these calls too)
_SIGNATURES: dict[type, tuple[inspect.Signature | None, bool]] = {}


def _forward_info(cls: type) -> tuple[inspect.Signature | None, bool]:
    info = _SIGNATURES.get(cls)
    if info is None:
        fwd = getattr(cls, "forward", None)
        try:
            sig = inspect.signature(fwd)
            sig = sig.replace(parameters=list(sig.parameters.values())[1:])
        except (TypeError, ValueError):
            sig = None
        wrapped = fwd is not None and inspect.unwrap(fwd) is not fwd
        info = _SIGNATURES[cls] = (sig, wrapped)
    return info


def forward_signature(cls: type) -> inspect.Signature | None:
    """Signature of ``cls.forward`` without ``self`` (through decorators), or None."""
    return _forward_info(cls)[0]


def forward_is_wrapped(cls: type) -> bool:
    """Whether ``cls.forward`` is decorated (``functools.wraps``): the decorator may accept
    arguments the inner signature does not (HF's ``deprecate_kwarg`` renames keywords)."""
    return _forward_info(cls)[1]


def bind_call(sig: inspect.Signature | None, args: tuple[Any, ...], kwargs: dict[str, Any],
              *, raw: bool = False, defaults: bool = True
              ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The same call whether the caller passed arguments by position or by name, or left
    a defaulted argument out.

    vLLM calls ``tower(features, mask)`` where HF code and example inputs use keywords, and
    HF users call ``tower(pixel_values)`` where the traced call spelled out
    ``interpolate_pos_encoding=False``: each pair binds to the same parameters. Canonical
    form: positional-only and ``*args`` values as positionals, every other parameter by name
    in signature order (defaults filled in, ``**kwargs`` sorted). A call that does not bind
    raises TypeError, as the call itself would; with ``raw`` (a decorated forward, whose
    decorator may rename keywords) it is kept as given instead. ``defaults=False`` leaves
    an omitted argument omitted: a decorator may tell it from one passed as its default
    (HF's ``capture_outputs`` reads ``kwargs.get("output_hidden_states", config value)``).
    """
    if sig is None:
        return tuple(args), dict(kwargs)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError:
        if raw:
            return tuple(args), dict(kwargs)
        raise
    if defaults:
        bound.apply_defaults()
    pos: list[Any] = []
    named: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.POSITIONAL_ONLY:
            pos.append(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            pos.extend(value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            extra.update(value)
        else:
            named[name] = value
    named.update(sorted(extra.items()))
    return tuple(pos), named


def bind_module_call(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                     ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """:func:`bind_call` for a call of ``module`` (raw form allowed for decorated forwards)."""
    sig, wrapped = _forward_info(type(module))
    return bind_call(sig, args, kwargs, raw=wrapped, defaults=not wrapped)


def make_call_spec(sig: inspect.Signature | None, args: tuple[Any, ...], kwargs: dict[str, Any],
                   symbolic_ints: set[int] | None = None) -> CallSpec:
    """Spec of a call already in canonical form (see :func:`bind_call`)."""
    leaves, treespec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    names = _leaf_names(treespec, sig)
    placeholders, constants = [], {}
    for i, leaf in enumerate(leaves):
        symbolic = isinstance(leaf, torch.Tensor) or (
            type(leaf) is int and (symbolic_ints is None or i in symbolic_ints)
        )
        if symbolic:
            placeholders.append(i)
        else:
            constants[i] = leaf
    return CallSpec(treespec, placeholders, constants, [names[i] for i in placeholders],
                    tensor_inputs=tuple(isinstance(leaves[i], torch.Tensor)
                                        for i in placeholders))



class _Leaf:
    def __repr__(self) -> str:
        return "*"


def call_form(treespec: Any) -> str:
    """A call's argument structure as a person reads it: ``(*, mask=None, pos=(*, *))``."""
    try:
        args, kwargs = pytree.tree_unflatten([_Leaf()] * treespec.num_leaves, treespec)
    except Exception:  # noqa: BLE001 - an unusual structure: fx's own form
        return str(treespec)
    return "(" + ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())]) + ")"


def kinds_match(inputs: list[Any], spec: CallSpec) -> bool:
    """Each graph input is what it was traced as: a tensor, or an int (a None or a float in
    a tensor's place flattens to the same structure)."""
    for x, is_tensor in zip(inputs, spec.tensor_inputs):
        if (isinstance(x, torch.Tensor) if is_tensor else type(x) is int):
            continue
        return False
    return True



def call_key(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
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


def is_leaf(value: Any) -> bool:
    return type(value) in _LEAF_TYPES or pytree.tree_is_leaf(value)


class _Source:
    __slots__ = ("key",)

    def __init__(self, key: int | str) -> None:
        self.key = key


def plan_of(sig: Any, args: tuple[Any, ...], kwargs: dict[str, Any], *, defaults: bool = True
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
        if is_leaf(value):
            plan.append((key, None))
        elif type(value) in (tuple, list) and all(map(is_leaf, value)):
            if not isinstance(key, (int, str)):
                return None
            plan.append((key, (type(value), len(value))))
        else:
            return None
    return plan


def show_value(value: Any, limit: int = 80) -> str:
    """A value as a message shows it: a tensor as ``Tensor[2, 16] float32`` (never its
    data), anything else by its repr, cut at ``limit`` characters."""
    if isinstance(value, torch.Tensor):
        return f"Tensor[{', '.join(map(str, value.shape))}] {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
        inner = ", ".join(show_value(v, limit) for v in value)
        return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
