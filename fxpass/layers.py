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


def is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` or a vLLM linear layer: a call site, never a module to trace into."""
    return isinstance(module, nn.Linear) or _is_vllm_linear_type(type(module))


@functools.lru_cache(maxsize=None)
def _is_vllm_linear_type(cls: type) -> bool:
    return any(c.__name__ == "LinearBase" and c.__module__.startswith("vllm.")
               for c in cls.__mro__)
