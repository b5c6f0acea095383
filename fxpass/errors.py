"""fxpass's documented errors. Every user-facing failure is one of these.

Each error names the module path / node it is about and what to do; callers can
catch :class:`FxpassError` to handle them all.
"""

from __future__ import annotations

import pickle


class FxpassError(Exception):
    """Base of every error fxpass raises on purpose."""


class UsageError(FxpassError, ValueError):
    """Bad input from the caller: wrong type, unknown option, missing path."""


class TraceError(FxpassError):
    """A module could not be traced. `trace` catches it per module and records the reason."""

    def __init__(self, message: str, *, module: str | None = None, node: str | None = None):
        self.module = module
        self.node = node
        where = f"module {module!r}" if module is not None else "module"
        if node:
            where += f", at node {node}"
        super().__init__(f"{where}: {message}")
        self.reason = message


class GuardError(FxpassError, RuntimeError):
    """A traced graph was called with an input that would have taken another branch.

    The graph was specialised on a value seen at trace time (a shape, a dtype, a flag);
    running it on this input could compute something else, so it refuses instead.
    """


class FallbackError(FxpassError, RuntimeError):
    """A call no graph covers, whose Python forward would lose a fix the graph carried.

    Raised instead of a wrong answer: a weight probe folded under 4-bit, linears fused away.
    """


class QuantConfigError(FxpassError):
    """The quant config cannot serve a layer (get_quant_method returned None or raised)."""


class RewriteError(FxpassError):
    """A rewrite step failed; `apply` rolls the model back before raising it."""


class WeightLoadError(FxpassError):
    """Moving a weight into a vLLM layer failed (meta tensors, shape mismatch, ...)."""


class NotLoadedError(WeightLoadError, RuntimeError):
    """A vLLM layer that ``apply(load_weights=False)`` swapped in was called before any loader
    filled it (vLLM's loader inside an engine, ``load_weights=True`` or
    ``fxpass.weights.load_checkpoint`` outside one)."""


class GemmError(FxpassError, RuntimeError):
    """What a vLLM-CPU unquantized layer cannot do: vLLM packed its weight into a native GEMM
    handle at load and emptied ``.weight`` (``fxpass.cpu_gemm``). Names the layer's prefix."""


class GemmBackwardError(GemmError):
    """Backward to the input of a vLLM-CPU unquantized GEMM (the handle has no backward)."""


class GemmDtypeError(GemmError):
    """A vLLM-CPU unquantized GEMM called in another dtype than its weights loaded in (the
    module converted after loading, or an input of another dtype)."""


class GemmAutocastError(GemmDtypeError):
    """A vLLM-CPU unquantized GEMM under autocast to another dtype than it was loaded in."""


class GemmPickleError(GemmError, pickle.PicklingError):
    """Pickling (``torch.save``) a tower whose vLLM-CPU layers hold native GEMM handles."""
