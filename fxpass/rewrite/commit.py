"""Committing a rewrite session: the one step that changes the model.

``apply`` and a tower's first call both end here: modules fusion consumed are removed, the
planned layers (``ctx.new_layers``) and added ones (``ctx.added``) put in place, a
``FusedSlice`` left at each fused member's path, and every graph installed as its module's
forward. All or nothing: on any failure everything is put back as it was.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fxpass.errors import RewriteError
from fxpass.rewrite.respecialise import RuleRespecialiser
from fxpass.rules.base import RewriteContext
from fxpass.rules.fusion import FusedSlice
from fxpass.runtime.dispatch import Family, GraphForward
from fxpass.runtime.install import install


def commit(ctx: RewriteContext, runtime: RuleRespecialiser) -> None:
    """Swap modules and install graphs; on any failure put everything back."""
    swapped: list[tuple[nn.Module, str, nn.Module | None]] = []
    installed: list[tuple[nn.Module, Any]] = []
    swapped_kernels: list[tuple[nn.Module, Any]] = []
    # each touched parent's children as they were, in order (re-adding a deleted child
    # would append it: named_modules / state_dict order would change)
    children: dict[int, tuple[nn.Module, dict[str, Any]]] = {}
    try:
        for qualname in ctx.removed:  # consumed by fusion
            parent_name, _, child = qualname.rpartition(".")
            parent = ctx.module(parent_name)
            children.setdefault(id(parent), (parent, dict(parent._modules)))
            swapped.append((parent, child, getattr(parent, child)))
            delattr(parent, child)
        for qualname, layer in ctx.new_layers.items():
            parent_name, _, child = qualname.rpartition(".")
            parent = ctx.module(parent_name)
            children.setdefault(id(parent), (parent, dict(parent._modules)))
            old = getattr(parent, child, None)
            setattr(parent, child, layer)
            swapped.append((parent, child, old))
        for qualname, module in ctx.added.items():
            parent_name, _, child = qualname.rpartition(".")
            parent = ctx.module(parent_name)
            if child in parent._modules or hasattr(parent, child):
                raise RewriteError(f"{qualname}: a rule adds a module there, but "
                                   f"{type(parent).__name__} already has {child!r}")
            children.setdefault(id(parent), (parent, dict(parent._modules)))
            setattr(parent, child, module)
            swapped.append((parent, child, None))
        for qualname, (fused_q, start, end) in ctx.fused_slices.items():
            parent_name, _, child = qualname.rpartition(".")
            parent = ctx.module(parent_name)
            setattr(parent, child, FusedSlice(ctx.new_layers[fused_q], start, end))
            swapped.append((parent, child, None))
        for qualname, kernel in ctx.kernels.items():
            layer = ctx.layer_after(qualname)
            swapped_kernels.append((layer, layer.__dict__.get("cpu_linear")))
            layer.cpu_linear = kernel
        families: dict[int, Family] = {}  # identical modules share their later graphs
        for qualname, mg in ctx.trace.graphs.items():
            sub = ctx.module(qualname)
            installed.append((sub, sub.__dict__.get("forward")))
            # Each module gets its own forward (its errors name it); the generated code of a
            # shared graph is compiled once for all the modules running it.
            family = families.setdefault(id(mg.graph), Family())
            install(sub, GraphForward(mg, runtime, family))
    except Exception as e:
        for sub, previous in reversed(installed):
            if previous is None:
                sub.__dict__.pop("forward", None)
            else:
                sub.__dict__["forward"] = previous
        for layer, kernel in reversed(swapped_kernels):
            layer.cpu_linear = kernel
        for parent, child, old in reversed(swapped):
            if old is None:
                delattr(parent, child)
            else:
                setattr(parent, child, old)
        for parent, saved in children.values():
            parent._modules.clear()
            parent._modules.update(saved)
        raise RewriteError(f"committing the rewrite failed at {type(e).__name__}: {e}; "
                           "the model was restored") from e


__all__ = ["commit"]
