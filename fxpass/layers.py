"""What counts as a linear layer, for every stage, without importing vLLM.

A tower holds ``nn.Linear`` before ``fxpass.apply`` and vLLM ``LinearBase`` layers after it
(or after the module walk). The tracer treats both as leaves: a call site to rewrite, or one
already rewritten (traced at the first real call, when the layers were swapped at init).
"""

from __future__ import annotations

import functools

from torch import nn


def is_vllm_linear(module: nn.Module) -> bool:
    """A vLLM LinearBase layer (ReplicatedLinear, ColumnParallelLinear, ...)."""
    return _is_vllm_linear_type(type(module))


def is_vllm_gemm(module: nn.Module) -> bool:
    """A vLLM linear layer, or vLLM's LoRA wrapper around one (``...LinearWithLoRA``, put in
    place by vLLM's LoRA manager after model init): what runs vLLM's GEMM on its input."""
    cls = type(module)
    return _is_vllm_linear_type(cls) or _is_vllm_lora_linear_type(cls)


def is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear``, a vLLM linear layer or vLLM's LoRA wrapper around one: a call site,
    never a module to trace into (tracing into a LoRA wrapper would bake in the adapters
    active while tracing)."""
    return isinstance(module, nn.Linear) or is_vllm_gemm(module)


@functools.lru_cache(maxsize=None)
def _is_vllm_linear_type(cls: type) -> bool:
    return any(c.__name__ == "LinearBase" and c.__module__.startswith("vllm.")
               for c in cls.__mro__)


@functools.lru_cache(maxsize=None)
def _is_vllm_lora_linear_type(cls: type) -> bool:
    return any(c.__name__ == "BaseLinearLayerWithLoRA" and c.__module__.startswith("vllm.")
               for c in cls.__mro__)
