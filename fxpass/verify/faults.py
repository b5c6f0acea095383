"""Planted faults: corrupt one rewritten layer on purpose, to prove ``verify`` catches it.

Used by the tests and by the CLI's acceptance check; never by ``apply``. A spec is
``KIND:LAYER``, ``LAYER`` the layer's path in the tower (``encoder.layers.0.self_attn.q_proj
.linear``) or its full prefixed name as ``Report.replaced`` lists it. Kinds, each the kind
of bug a rewrite or a loader can make:

- ``drop-bias``: the layer's bias is zeroed (the layer must have one).
- ``transpose``: the layer is reloaded with its weight transposed, read back in [out, in]
  order (``w.t().reshape(out, in)``: what a loader that swaps the axes produces; for a square
  weight it is exactly ``w.t()``).
- ``wrong-weights``: the layer is reloaded with the weights of another linear of the same
  shape (the next one in module order, wrapping around); without one, with its own rows
  rolled by one (a shard offset by a row).
- ``wrong-dtype``: the layer's output is cast to float16 (bfloat16 for a float16 tower).

Reloading goes through the same ``build_vllm_linear`` / ``load_linear_weights`` as apply
(same quant config and prefix), so a quantized layer stays quantized. The CLI reads a spec
from ``--plant-fault`` (hidden) or the ``FXPASS_PLANT_FAULT`` environment variable.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from fxpass.errors import UsageError

__all__ = ["FAULT_KINDS", "LORA_FAULT_KINDS", "ENV_VAR", "parse_fault", "plant_fault", "planted"]

FAULT_KINDS = ("drop-bias", "transpose", "wrong-weights", "wrong-dtype")
# Faults of a tower LoRA (``fxpass diff --lora``), planted by ``fxpass.lora.verify``.
LORA_FAULT_KINDS = ("lora-scale", "lora-transpose", "lora-wrong-layer")
ENV_VAR = "FXPASS_PLANT_FAULT"


def parse_fault(spec: str) -> tuple[str, str]:
    kind, sep, layer = spec.partition(":")
    if not sep or kind not in (*FAULT_KINDS, *LORA_FAULT_KINDS) or not layer:
        raise UsageError(f"planted fault {spec!r}: expected KIND:LAYER with KIND one of "
                         f"{', '.join((*FAULT_KINDS, *LORA_FAULT_KINDS))}")
    return kind, layer


def _resolve(candidate: nn.Module, layer: str, prefix: str) -> str:
    from fxpass.layers import is_vllm_linear

    names = [n for n, m in candidate.named_modules() if is_vllm_linear(m)]
    for path in (layer, layer[len(prefix) + 1:] if prefix and layer.startswith(prefix + ".")
                 else None):
        if path in names:
            return path
    raise UsageError(f"planted fault: {layer!r} is not a rewritten (vLLM) layer of the "
                     f"candidate; rewritten layers: {', '.join(names) or '(none)'}")


def plant_fault(candidate: nn.Module, spec: str, reference: nn.Module, *,
                prefix: str = "") -> str:
    """Corrupt the rewritten layer named in ``spec`` (see the module docstring), in place.

    ``reference`` is the original module: its weights are the source for the reloading
    faults. Returns the layer's path in the tower.
    """
    from fxpass.weights import (
        build_parallel_linear,
        build_vllm_linear,
        load_linear_weights,
        tp_style,
    )

    kind, layer = parse_fault(spec)
    path = _resolve(candidate, layer, prefix)
    target = candidate.get_submodule(path)
    if kind == "drop-bias":
        if getattr(target, "bias", None) is None:
            raise UsageError(f"planted fault drop-bias: {path} has no bias")
        with torch.no_grad():
            target.bias.zero_()
        return path
    if kind == "wrong-dtype":
        dtype = getattr(target, "params_dtype", torch.float32)
        wrong = torch.bfloat16 if dtype == torch.float16 else torch.float16
        forward = target.forward

        def cast_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            return forward(*args, **kwargs).to(wrong)
        target.forward = types.MethodType(cast_forward, target)
        return path

    source = reference.get_submodule(path)
    if not isinstance(source, nn.Linear):
        raise UsageError(f"planted fault {kind}: the reference has no nn.Linear at {path}")
    w = source.weight.detach()
    if kind == "transpose":
        bad = w.t().contiguous().reshape(w.shape)
    else:  # wrong-weights
        linears = [(n, m) for n, m in reference.named_modules() if isinstance(m, nn.Linear)]
        idx = [n for n, _ in linears].index(path)
        bad = None
        for n, m in linears[idx + 1:] + linears[:idx]:
            if m.weight.shape == w.shape:
                bad = m.weight.detach().clone()
                break
        if bad is None:
            bad = torch.roll(w, 1, dims=0)
    style = tp_style(target)
    if style is not None:  # a sharded layer is rebuilt sharded (the loader keeps its block)
        layer_new = build_parallel_linear(source, getattr(target, "quant_config", None),
                                          getattr(target, "prefix", path), style)
    else:
        layer_new = build_vllm_linear(source, getattr(target, "quant_config", None),
                                      getattr(target, "prefix", path))
    load_linear_weights(layer_new, bad, source.bias, getattr(target, "quant_config", None))
    parent, _, child = path.rpartition(".")
    setattr(candidate.get_submodule(parent) if parent else candidate, child, layer_new)
    return path


@contextlib.contextmanager
def planted(candidate: nn.Module, spec: str, reference: nn.Module, *,
            prefix: str = "") -> Iterator[str]:
    """:func:`plant_fault` for the duration of a ``with`` block (yields the layer's path);
    the candidate is restored afterwards."""
    kind, layer = parse_fault(spec)
    path = _resolve(candidate, layer, prefix)
    parent_name, _, child = path.rpartition(".")
    parent = candidate.get_submodule(parent_name) if parent_name else candidate
    original = getattr(parent, child)
    had_forward = "forward" in original.__dict__
    saved_forward = original.__dict__.get("forward")
    bias = getattr(original, "bias", None)
    saved_bias = bias.detach().clone() if isinstance(bias, torch.Tensor) else None
    try:
        yield plant_fault(candidate, spec, reference, prefix=prefix)
    finally:
        setattr(parent, child, original)
        if had_forward:
            original.__dict__["forward"] = saved_forward
        else:
            original.__dict__.pop("forward", None)
        if saved_bias is not None:
            with torch.no_grad():
                original.bias.copy_(saved_bias)
