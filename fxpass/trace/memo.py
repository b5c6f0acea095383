"""The walk's meta memo: graphs run on meta values compute metadata only, so each (graph,
input metadata) runs once while walking (see :class:`MetaMemo`)."""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from fxpass.runtime.dispatch import GraphForward

# values a memo key holds as they are (hashable, compared by equality)
_PLAIN = (bool, int, float, str, type(None), torch.dtype, torch.device)

class MetaMemo:
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

    def forward(self, inner: GraphForward) -> "MemoForward":
        return MemoForward(self, inner)

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


class MemoForward:
    """The forward the walk installs: ``inner`` through the walk's meta memo."""

    __slots__ = ("memo", "inner")

    def __init__(self, memo: MetaMemo, inner: GraphForward) -> None:
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
