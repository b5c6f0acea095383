"""fxpass: rewrite HF towers onto vLLM layers with a torch.fx graph pass.

The pipeline, one module per stage: ``trace`` -> ``rewrite`` (via ``apply``) -> ``verify``
-> ``viz``; ``vllm_plugin`` runs ``apply`` inside vLLM's model init. Importing fxpass does
not import vLLM: only the functions that build vLLM layers do.
"""

from __future__ import annotations

from typing import Any

from fxpass.errors import (
    FallbackError,
    FxpassError,
    GuardError,
    QuantConfigError,
    RewriteError,
    TraceError,
    UsageError,
    WeightLoadError,
)
from fxpass.trace import Trace, trace

__all__ = [
    "FallbackError", "FxpassError", "GuardError", "QuantConfigError", "RewriteError", "TraceError",
    "UsageError", "WeightLoadError", "Trace", "trace", "apply", "verify", "vllm_runtime",
]


def __getattr__(name: str) -> Any:
    # Stages that pull in heavier dependencies load on first use.
    if name == "apply":
        from fxpass.rewrite import apply
        return apply
    if name == "verify":
        from fxpass.verify import verify
        return verify
    if name == "vllm_runtime":
        from fxpass.runtime import vllm_runtime
        return vllm_runtime
    raise AttributeError(f"module 'fxpass' has no attribute {name!r}")
