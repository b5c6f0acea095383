"""Guards on vLLM-CPU's unquantized GEMM handle: right or loud, never silently wrong.

On the CPU, ``UnquantizedLinearMethod.process_weights_after_loading`` packs a layer's weight
into a native GEMM handle (oneDNN on x86; sgl-kernel on AMX; zentorch on Zen builds), stores
the call as ``layer.cpu_linear`` and empties ``layer.weight``. Every unquantized vLLM linear
computes through it (``ReplicatedLinear``, the merged / sharded layers, vLLM's LoRA wrappers
via ``base_layer.quant_method.apply``), and so does vLLM's own module walk. The handle is
wrong in ways HF's ``nn.Linear`` is not:

* **threads**: vLLM's oneDNN helper (``csrc/cpu/dnnl_helper.cpp``) writes each call's data
  pointers and M into the handle itself, shares one primitive cache (an LRU list, reordered
  on every lookup) between all layers of the same (N, K), and runs every primitive on one
  process-wide scratchpad that a new M can reallocate. Two threads in any two such GEMMs
  give wrong answers or corrupt the heap (``malloc_consolidate(): invalid chunk size``). So
  every guarded GEMM takes one **process-wide** lock: a per-layer lock would leave the
  shared cache and scratchpad racing (measured: different layers of one shape still abort).
* **autograd**: the handle has none; backward silently dropped the GEMM's contribution to the
  input gradient. With grad mode on and an input that requires grad, the output carries a
  ``grad_fn`` whose backward raises :class:`~fxpass.errors.GemmBackwardError` (the forward
  still works; a bias-only gradient is computed, it needs no weight).
* **dtype**: the handle was built for the dtype the weights loaded in. A tower converted
  afterwards (``tower.to(torch.bfloat16)``), an input of another dtype, or autocast to
  another dtype reached oneDNN as raw memory of the wrong type (an error deep in oneDNN, or
  a wrong answer with no error): :class:`~fxpass.errors.GemmDtypeError` /
  :class:`~fxpass.errors.GemmAutocastError` now. Autocast *to* the loaded dtype is served:
  the input is cast, as ``nn.Linear`` under autocast does.
* **pickling**: the handle is a closure over native memory; ``torch.save(tower)`` failed
  with "Can't pickle local object". The guard refuses with
  :class:`~fxpass.errors.GemmPickleError` saying what to save instead; ``copy.deepcopy``
  shares the handle, as it shared the closure before.

:func:`guard` wraps ``layer.cpu_linear`` once, at load (``fxpass.weights`` calls it after
``process_weights_after_loading``); layers vLLM left holding their weight (the ``F.linear``
fallback) and quantized layers (bitsandbytes: correct autograd, thread-safe, convertible)
are left alone. Under ``torch.compile`` the GEMM runs as the opaque custom op
``fxpass::vllm_cpu_gemm`` (dynamo cannot enter a lock), which takes the same lock.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fxpass.errors import (
    GemmAutocastError,
    GemmBackwardError,
    GemmDtypeError,
    GemmPickleError,
)

__all__ = ["CpuGemmGuard", "GEMM_LOCK", "guard", "is_guarded"]

# One lock for every guarded GEMM of the process: the native helper's primitive cache and
# scratchpad are shared across layers (see the module docstring).
GEMM_LOCK = threading.Lock()

_GUARDS: weakref.WeakValueDictionary[int, CpuGemmGuard] = weakref.WeakValueDictionary()
_KEYS = itertools.count()

# Bound once: the uncontended guard is a few such calls and a lock (~1 us per GEMM).
_is_compiling = torch.compiler.is_compiling  # dynamo folds it to True by identity
_any_autocast = torch._C._is_any_autocast_enabled  # noqa: SLF001 - cheap; details in _checked
_grad_enabled = torch.is_grad_enabled

_HANDLE = ("vLLM-CPU packed this layer's weight into a native GEMM handle (oneDNN on x86) when "
           "the weights loaded and emptied .weight")


class CpuGemmGuard:
    """``layer.cpu_linear`` with the checks and the lock (see the module docstring).

    Called as vLLM calls ``cpu_linear``: ``(x, weight, bias)``, ``weight`` being the layer's
    (emptied) parameter, whose dtype says whether the module was converted since loading.
    """

    __slots__ = ("gemm", "name", "dtype", "in_features", "out_features", "key", "__weakref__")

    def __init__(self, gemm: Any, name: str, dtype: torch.dtype, in_features: int,
                 out_features: int) -> None:
        self.gemm = gemm
        self.name = name
        self.dtype = dtype
        self.in_features = in_features
        self.out_features = out_features
        self.key = next(_KEYS)
        _GUARDS[self.key] = self

    def __call__(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if _is_compiling():
            return _vllm_cpu_gemm(self._checked(x, weight), weight, bias, self.key)
        dtype = self.dtype
        if x.dtype is not dtype or weight.dtype is not dtype or _any_autocast():
            x = self._checked(x, weight)
        if _grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
            return _NoInputBackward.apply(x, weight, bias, self)
        with GEMM_LOCK:
            return self.gemm(x, weight, bias)

    def _checked(self, x: Tensor, weight: Tensor) -> Tensor:
        """``x`` as the handle can take it, or the error saying why it cannot."""
        want = self.dtype
        if weight.dtype != want:
            raise GemmDtypeError(
                f"{self.name}: this layer's GEMM was built for {_n(want)} and its parameters "
                f"are now {_n(weight.dtype)} (the module was converted after its weights "
                f"loaded, e.g. tower.to({weight.dtype})); {_HANDLE}, so the weight cannot be "
                f"converted. Convert the HF module before fxpass.apply (model.to({weight.dtype})"
                f", then apply with load_weights=True), or convert the tower back to "
                f"{_n(want)}")
        device = x.device.type
        if torch.is_autocast_enabled(device):
            cast = torch.get_autocast_dtype(device)
            if cast != want:
                raise GemmAutocastError(
                    f"{self.name}: torch.autocast({device!r}, dtype={cast}) is active, but this "
                    f"layer's GEMM was built for {_n(want)}: {_HANDLE}, so it cannot compute in "
                    f"{_n(cast)} as nn.Linear does under autocast. Run the tower without "
                    f"autocast, or convert the HF module to {_n(cast)} before fxpass.apply "
                    "(autocast to the tower's own dtype works), or run the HF module under "
                    "autocast")
            return x.to(want)
        if x.dtype != want:
            raise GemmDtypeError(
                f"{self.name}: the input is {_n(x.dtype)} but this layer's GEMM was built for "
                f"{_n(want)} ({_HANDLE}; it would read the input as {_n(want)}). Pass "
                f"{_n(want)} inputs (nn.Linear rejects mixed dtypes too), or apply fxpass to a "
                f"{_n(x.dtype)} copy of the HF module")
        return x

    def backward_message(self) -> str:
        return (
            f"{self.name}: backward through vLLM-CPU's unquantized oneDNN GEMM is not "
            f"possible: {_HANDLE}, and the handle has no backward, so the gradient of this "
            "layer's input would be wrong. For input gradients (saliency, adversarial inputs) "
            "or training, run the original HF module, keep this tower in HF (do not rewrite "
            "it), or apply fxpass with a bitsandbytes quant config (its layers have a correct "
            "backward). Forward passes with inputs that require grad work; only backward "
            "raises")

    # copies share the native handle, as they shared vLLM's closure before
    def __copy__(self) -> CpuGemmGuard:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> CpuGemmGuard:
        return self

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise GemmPickleError(
            f"{self.name}: cannot pickle (torch.save) a tower whose unquantized vLLM-CPU layers "
            f"hold native GEMM handles: {_HANDLE}, so neither the module nor its state_dict "
            "holds the weights. Save the original HF module (or its state_dict) before "
            "fxpass.apply and apply again after loading it (towers under a bitsandbytes quant "
            "config pickle); copy.deepcopy works in-process")

    def __repr__(self) -> str:
        return f"CpuGemmGuard({self.name!r}, {_n(self.dtype)})"


def _n(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _NoInputBackward(torch.autograd.Function):
    """The guarded GEMM under autograd: a grad_fn whose backward refuses an input gradient
    (it needs the weight the handle holds) and computes a bias gradient (it needs none)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None,
                guard: CpuGemmGuard) -> Tensor:
        ctx.guard = guard
        ctx.bias_dtype = bias.dtype if bias is not None else None
        with GEMM_LOCK:
            return guard.gemm(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.needs_input_grad[0]:
            raise GemmBackwardError(ctx.guard.backward_message())
        grad_bias = None
        if ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
        return None, None, grad_bias, None


# ------------------------------------------------------------------ under torch.compile


@torch.library.custom_op("fxpass::vllm_cpu_gemm", mutates_args=())
def _vllm_cpu_gemm(x: Tensor, weight: Tensor, bias: Tensor | None, key: int) -> Tensor:
    guard_ = _GUARDS[key]
    with GEMM_LOCK:
        return guard_.gemm(x, weight, bias)


@_vllm_cpu_gemm.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None, key: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], _GUARDS[key].out_features))


@torch.library.custom_op("fxpass::vllm_cpu_gemm_backward", mutates_args=())
def _vllm_cpu_gemm_backward(grad: Tensor, key: int) -> Tensor:
    raise GemmBackwardError(_GUARDS[key].backward_message())


@_vllm_cpu_gemm_backward.register_fake
def _(grad: Tensor, key: int) -> Tensor:
    return grad.new_empty((*grad.shape[:-1], _GUARDS[key].in_features))


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    ctx.key = inputs[3]
    ctx.bias_dtype = inputs[2].dtype if inputs[2] is not None else None


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    grad_x = _vllm_cpu_gemm_backward(grad, ctx.key) if ctx.needs_input_grad[0] else None
    grad_bias = None
    if ctx.needs_input_grad[2]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, grad_bias, None


_vllm_cpu_gemm.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------ installing


_VLLM_LAMBDA = "dispatch_cpu_unquantized_gemm.<locals>.<lambda>"


def is_guarded(layer: nn.Module) -> bool:
    """Whether the layer's ``cpu_linear`` is fxpass's guard."""
    return isinstance(layer.__dict__.get("cpu_linear"), CpuGemmGuard)


def guard(layer: nn.Module, name: str | None = None) -> bool:
    """Wrap a loaded layer's ``cpu_linear`` in a :class:`CpuGemmGuard` (once; idempotent).

    Only where vLLM-CPU emptied the weight into a native handle: a layer without
    ``cpu_linear`` (quantized, not loaded, not on the CPU), with ``F.linear`` itself (meta
    weights) or still holding its weight is left alone (vLLM's fallback, ``F.linear`` in a
    closure, becomes ``F.linear`` itself so that the tower pickles; autograd, dtypes and
    threads work there). Returns whether the layer is guarded.
    ``name``: the layer's full prefix for messages (default ``layer.prefix``).
    """
    gemm = layer.__dict__.get("cpu_linear")
    if isinstance(gemm, CpuGemmGuard):
        return True
    weight = getattr(layer, "weight", None)
    if gemm is None or gemm is F.linear or not isinstance(weight, Tensor):
        return False
    if weight.numel() != 0:
        if getattr(gemm, "__qualname__", "") == _VLLM_LAMBDA:
            # vLLM's fallback where oneDNN refused the shape / dtype (bf16 without
            # avx512_bf16): F.linear in a closure, which pickle refuses; F.linear itself
            # computes the same and pickles
            layer.cpu_linear = F.linear
        return False
    where = name or getattr(layer, "prefix", "") or type(layer).__name__
    layer.cpu_linear = CpuGemmGuard(
        gemm, f"{where} ({type(layer).__name__})", weight.dtype,
        getattr(layer, "input_size_per_partition", None) or layer.input_size,
        getattr(layer, "output_size_per_partition", None) or layer.output_size)
    return True
