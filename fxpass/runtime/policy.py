"""The policy for a call no installed graph covers: trace again (and how), or Python."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxpass.trace.graph import ModuleGraph
from fxpass.trace.tracer import trace_module
from fxpass.runtime.stats import RuntimeStats

MAX_VARIANTS = 8  # graphs per module family beyond the first, then Python


class Respecialiser:
    """What happens on a call a graph does not cover (one per ``apply`` / ``install``).

    This base traces the module again for the call and installs the new graph as it is (what
    ``fxpass.trace`` gives). The rewrite stage subclasses it to run its rules on the new
    graph, to show the tracer the logical weights of vLLM layers, and to refuse a Python
    fallback that would lose a graph fix.
    """

    def __init__(self, *, strict: bool = False, max_variants: int = MAX_VARIANTS,
                 stats: RuntimeStats | None = None) -> None:
        self.strict = strict
        self.max_variants = max_variants
        self.stats = stats if stats is not None else RuntimeStats()

    # hooks for the rewrite stage ---------------------------------------------------------
    def trace_values(self, module: nn.Module) -> dict[str, Any]:
        """get_attr target -> the value the tracer should see for it (default: the real one)."""
        return {}

    def leaf_inputs(self, module: nn.Module, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The inputs a leaf submodule runs on while tracing (default: as given)."""
        return args, kwargs

    def rewrite(self, module: nn.Module, qualname: str, mg: ModuleGraph) -> ModuleGraph:
        """The graph to install for a new specialisation (default: as traced)."""
        return mg

    def python_forward(self, module: nn.Module, qualname: str, graphs: list[fx.Graph],
                       why: str) -> contextlib.AbstractContextManager[None]:
        """Context for running ``module``'s Python forward (``why``: the call its graphs do
        not cover); raises FallbackError where Python would lose a graph fix."""
        return contextlib.nullcontext()

    # -------------------------------------------------------------------------------------
    def specialise(self, module: nn.Module, qualname: str, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> ModuleGraph:
        """A graph for this call of ``module``: traced again, then :meth:`rewrite`."""
        # In a fresh context: the trace runs the submodules on this call's values, and a
        # caller's context variables (HF's output collector for output_hidden_states) must
        # not see those runs; the graph's own run of this call is what they see.
        graph, spec = contextvars.Context().run(
            trace_module, module, args, kwargs, values=self.trace_values(module),
            leaf_inputs=self.leaf_inputs)
        mg = ModuleGraph(qualname, type(module).__name__, graph, spec)
        return self.rewrite(module, qualname, mg)


def why_no_trace() -> str | None:
    """Why a call must not be traced now (dynamo tracing, CUDA graph capture), or None."""
    if torch.compiler.is_compiling():
        return "torch.compile is tracing it (fxpass never traces inside dynamo)"
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return "a CUDA graph is being captured (fxpass never traces during capture)"
    return None


