"""fxpass: rewrite HF towers onto vLLM layers with a torch.fx graph pass.

The stages, one folder each: ``trace`` (graphs) -> ``rewrite`` (the session that runs the
``rules``, with ``parallel`` for tensor parallelism) -> ``runtime`` (what runs after apply)
-> ``verify`` -> ``viz``; ``vllm_plugin`` runs ``apply`` inside vLLM's model init.
Importing fxpass does not import vLLM (it takes seconds): only the functions that build vLLM
layers do, so ``apply``, ``verify`` and ``vllm_runtime`` load on first use.
"""

from __future__ import annotations

import sys
import types
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

if TYPE_CHECKING:  # what the lazy names below are, for type checkers and IDEs
    from fxpass.trace import Trace, trace
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


class _Package(types.ModuleType):
    """``fxpass.trace`` and ``fxpass.Trace`` load on first use: they import torch, and
    ``import fxpass`` (so ``fxpass --help``) must not. ``fxpass.trace`` stays the function:
    the import system records the ``fxpass.trace`` subpackage as an attribute of ``fxpass``
    when it loads it, and this setter keeps the function in its place."""

    @property
    def trace(self) -> Any:
        from fxpass.trace import trace

        return trace

    @trace.setter
    def trace(self, value: Any) -> None:
        if not isinstance(value, types.ModuleType):
            raise AttributeError("fxpass.trace is the tracing function; it cannot be replaced")

    @property
    def Trace(self) -> Any:  # noqa: N802 - a class
        from fxpass.trace import Trace

        return Trace


sys.modules[__name__].__class__ = _Package
