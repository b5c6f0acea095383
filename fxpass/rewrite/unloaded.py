"""vLLM layers swapped in without weights: fxpass's own error at their call, nothing once loaded.

``apply(load_weights=False)`` (the default) leaves each new vLLM layer as vLLM's model init
does: parameters allocated but not filled, and not yet through
``quant_method.process_weights_after_loading``, which every loader runs after filling (on the
CPU it builds the oneDNN handle the GEMM reads). Called like that, vLLM's own code fails with
``AttributeError: 'ReplicatedLinear' object has no attribute 'cpu_linear'`` (bitsandbytes: a
missing quant state) or, on a GPU, computes on uninitialised memory.

So until it is loaded, each such layer carries:

* a forward pre-hook (:class:`_Unloaded`) that raises :class:`~fxpass.errors.NotLoadedError`
  naming the layer and what to do, at the layer's call, whoever calls it (an installed graph,
  the first-call trace, HF Python code calling a layer swapped without a graph);
* on its quant method, an instance-level ``process_weights_after_loading``
  (:class:`_ClearOnLoad`) that runs the method's own and then removes both. Every loader ends
  with that call on each layer (vLLM's ``model_loader.utils.process_weights_after_loading``,
  fxpass's ``load_linear_weights`` / ``load_fused_weights`` / ``load_checkpoint``), so inside a
  vLLM engine the hook is gone before the first forward, and a loaded layer holds nothing of
  fxpass's: its calls take torch's hook-free path, with no check at all.

Independent of anything else wrapped around the layer or its quant method's ``apply``: only
``process_weights_after_loading`` is observed, and only until it has run once.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fxpass.cpu_gemm import guard
from fxpass.errors import NotLoadedError

__all__ = ["guard_unloaded", "mark_loaded", "not_loaded_message", "unloaded_layers"]


def not_loaded_message(name: str, more: int = 0, where: str = "") -> str:
    """The error for layer ``name`` (full name) called unloaded; ``more``: how many other
    unloaded layers the call of ``where`` reaches."""
    what = f"{name}: this vLLM layer was called before its weights were loaded" + (
        f" ({more} more vLLM layer{'s' if more > 1 else ''} under {where or '<root>'} "
        f"hold{'' if more > 1 else 's'} no weights either)" if more else "")
    return (
        f"{what}. fxpass.apply(load_weights=False), the default, swaps in empty vLLM layers "
        "for vLLM's loader to fill, as in vLLM's model init; outside a vLLM engine nothing "
        "fills them (vLLM's own code would fail here, e.g. AttributeError: 'ReplicatedLinear' "
        "object has no attribute 'cpu_linear'). Outside vLLM, pass load_weights=True to "
        "fxpass.apply on the original module (rebuild it: this one no longer holds the "
        "nn.Linear weights), or fill these layers first with "
        "fxpass.weights.load_checkpoint(model, state_dict_with_the_original_names, "
        "quant_config) or vLLM's loader")


class _Unloaded:
    """Forward pre-hook of a layer no loader has filled yet."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, module: nn.Module, args: Any) -> None:
        raise NotLoadedError(not_loaded_message(self.name))


class _ClearOnLoad:
    """``process_weights_after_loading`` of one quant method until it has run once: the
    method's own, then the layer's guard goes (see the module docstring)."""

    def __init__(self, method: Any, previous: Any) -> None:
        self.method = method
        self.previous = previous  # an instance-level override that was already there

    def __call__(self, layer: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.previous is not None:
            out = self.previous(layer, *args, **kwargs)
        else:
            out = type(self.method).process_weights_after_loading(self.method, layer, *args,
                                                                  **kwargs)
        mark_loaded(layer)
        # vLLM's loader (inside an engine) just built the CPU GEMM handle: the same guard as
        # fxpass's own loaders put on it (threads, backward, dtype, pickling: cpu_gemm.py)
        guard(layer)
        return out


def guard_unloaded(layer: nn.Module, name: str) -> bool:
    """Give a layer built without weights its guard (see the module docstring); False when
    the layer has no quant method whose loading could be observed (left alone)."""
    method = getattr(layer, "quant_method", None)
    if method is None or not callable(getattr(type(method), "process_weights_after_loading",
                                              None)):
        return False
    current = method.__dict__.get("process_weights_after_loading")
    if isinstance(current, _ClearOnLoad):
        return True  # guarded already
    method.process_weights_after_loading = _ClearOnLoad(method, current)
    layer.register_forward_pre_hook(_Unloaded(name))
    return True


def mark_loaded(layer: nn.Module) -> None:
    """Remove a layer's guard: its weights are in."""
    hooks = layer._forward_pre_hooks  # noqa: SLF001 - removing our own hook by its type
    for key in [k for k, h in hooks.items() if isinstance(h, _Unloaded)]:
        del hooks[key]
    method = getattr(layer, "quant_method", None)
    patch = method.__dict__.get("process_weights_after_loading") if method is not None else None
    if isinstance(patch, _ClearOnLoad):
        if patch.previous is None:
            del method.__dict__["process_weights_after_loading"]
        else:
            method.__dict__["process_weights_after_loading"] = patch.previous


def unloaded_layers(module: nn.Module) -> list[str]:
    """Full names (as the guards were given them) of the layers under ``module`` that no
    loader has filled yet."""
    return [h.name for m in module.modules()
            for h in m._forward_pre_hooks.values()  # noqa: SLF001
            if isinstance(h, _Unloaded)]
