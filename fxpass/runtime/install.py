"""Installing a forward on a module: a plain function bound to it.

``copy.deepcopy``, hooks and ``torch.compile`` see an ordinary method; ``inspect.signature``
of the module's forward is the class forward's (HF and users read it).
"""

from __future__ import annotations

import functools
import inspect
import types
from typing import Any, Callable

from torch import nn

from fxpass.runtime.dispatch import GraphForward

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


