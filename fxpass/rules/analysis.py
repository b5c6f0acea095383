"""Graph analysis the rules share: how each linear's weight is used in the graphs.

A read of ``lin.weight`` (or ``.bias``) is a *probe* when only metadata is taken from it
(dtype, shape, device, ``is_floating_point()``, ``size()``, ``dim()``): the rewrite can fold
it to the layer's logical value. Any other use reads the values (``F.linear(x, l.weight)``,
tied weights, ``l.weight.t()``), which a vLLM layer does not keep in HF's layout: such a
linear stays ``nn.Linear``.
"""

from __future__ import annotations

import builtins
import dataclasses
from collections import defaultdict

import torch.fx as fx
from torch import nn

from fxpass.rules.base import RewriteContext, Site, is_vllm_linear

PROBE_ATTRS = frozenset({"dtype", "shape", "device", "ndim", "is_cuda", "is_meta"})
PROBE_METHODS = frozenset({"is_floating_point", "size", "dim", "numel", "nelement",
                           "is_complex", "ndimension", "get_device"})


@dataclasses.dataclass
class WeightUse:
    linear: str  # qualified name of the linear module
    attr: str  # "weight" or "bias"
    site: Site  # the get_attr node
    probes: list[fx.Node]  # users that only read metadata
    value_users: list[fx.Node]  # users that read values


def is_probe(user: fx.Node) -> bool:
    if user.op == "call_function" and user.target is builtins.getattr:
        return user.args[1] in PROBE_ATTRS
    return user.op == "call_method" and user.target in PROBE_METHODS


def weight_uses(ctx: RewriteContext) -> list[WeightUse]:
    """Every get_attr of a linear's (or vLLM linear's) weight/bias in every graph."""
    uses = []
    for mg in ctx.graphs():
        for node in mg.nodes_of("get_attr"):
            if "." not in node.target:
                continue
            owner, _, attr = node.target.rpartition(".")
            if attr not in ("weight", "bias"):
                continue
            full = f"{mg.qualname}.{owner}" if mg.qualname else owner
            try:
                mod = ctx.module(full)
            except AttributeError:
                continue
            if not (isinstance(mod, nn.Linear) or is_vllm_linear(mod)):
                continue
            probes = [u for u in node.users if is_probe(u)]
            values = [u for u in node.users if not is_probe(u)]
            uses.append(WeightUse(full, attr, Site(mg, node), probes, values))
    return uses


def tied_linears(modules: dict[str, nn.Module]) -> dict[str, str]:
    """Linears sharing a weight/bias tensor with another parameter: name -> the other name.

    ``modules``: every module by qualified name (``named_modules(remove_duplicate=False)``).
    """
    owners: dict[int, list[str]] = defaultdict(list)
    for mod_name, mod in modules.items():
        for attr, p in mod._parameters.items():
            if p is not None:
                owners[id(p)].append(f"{mod_name}.{attr}" if mod_name else attr)
    out = {}
    for names in owners.values():
        if len(names) < 2:
            continue
        for n in names:
            mod_name, _, attr = n.rpartition(".")
            if attr in ("weight", "bias") and isinstance(modules[mod_name], nn.Linear):
                others = [o for o in names if o != n]
                out[mod_name] = others[0]
    return out


def mark_unsafe(ctx: RewriteContext) -> None:
    """Record in ``ctx.unsafe`` the linears that must stay ``nn.Linear``: their weight values
    read outside their call, a weight tied to another linear, a known owner that reads them
    without a call (``fxpass.quirks``), or Python code using them as nn.Linear."""
    from fxpass import quirks

    for use in weight_uses(ctx):
        if use.value_users and isinstance(ctx.module(use.linear), nn.Linear):
            users = ", ".join(u.format_node() for u in use.value_users[:2])
            ctx.unsafe.setdefault(
                use.linear,
                f"graph {use.site.graph.qualname or '<root>'} reads its {use.attr} values "
                f"outside its call ({users}); a vLLM layer does not keep them in HF's layout")
    for name, why in quirks.linears_read_without_a_call(ctx.modules).items():
        ctx.unsafe.setdefault(name, why)  # known without a graph (apply may have none yet)
    for name, other in tied_linears(ctx.modules).items():
        ctx.unsafe.setdefault(name, f"its weight is shared with {other} (tied weights)")
    for name, why in getattr(ctx.trace, "python_linear_uses", {}).items():
        ctx.unsafe.setdefault(name, f"{why}; a vLLM layer does not serve that as nn.Linear does")
