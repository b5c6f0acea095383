"""fxpass: rewrite HF towers onto vLLM layers with a torch.fx graph pass.

The stages, one folder each: ``trace`` (graphs) -> ``rewrite`` (the session that runs the
``rules``, with ``parallel`` for tensor parallelism) -> ``runtime`` (what runs after apply)
-> ``verify`` -> ``viz``; ``vllm_plugin`` runs ``apply`` inside vLLM's model init.
Importing fxpass does not import vLLM (it takes seconds): only the functions that build vLLM
layers do, so ``apply``, ``verify`` and ``vllm_runtime`` load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
from fxpass.report import Event, Fix, Report
from fxpass.trace import Trace, trace

if TYPE_CHECKING:  # what the lazy names below are, for type checkers and IDEs
    from fxpass.rewrite import apply
    from fxpass.verify import verify
    from fxpass.vllm_context import vllm_runtime

__all__ = [
    "Event", "FallbackError", "Fix", "FxpassError", "GuardError", "QuantConfigError", "Report",
    "RewriteError", "Trace", "TraceError", "UsageError", "WeightLoadError", "apply", "trace",
    "verify", "vllm_runtime",
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
        from fxpass.vllm_context import vllm_runtime
        return vllm_runtime
    raise AttributeError(f"module 'fxpass' has no attribute {name!r}")
