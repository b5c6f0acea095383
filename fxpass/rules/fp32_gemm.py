"""Rule: a half-precision vLLM-CPU GEMM computed in fp32 where this machine does that faster.

vLLM-CPU runs an unquantized bf16 / fp16 layer through oneDNN, sgl-kernel or, where oneDNN
refuses the dtype (a CPU without avx512_bf16), ``F.linear`` in bf16, which on such a CPU is
several times slower than fp32 (measured: a 4-layer Gemma4 vision tower at 1260 patches spends
94% of its 8.4 s in bf16 ``aten::mm`` on an avx2 EPYC; fp32, 1.6 s). vLLM's own towers pay
the same. The products of two bf16 / fp16 values are exact in fp32 and vLLM's half GEMMs
accumulate in fp32 too, so computing in fp32 and rounding the result once changes only the
order of the sums (ulp-level, as fusion does).

Decided per layer shape at the first call, where the loaded weights and this machine's own
kernel can be measured: the layer's kernel against the fp32 one on a 256-row input, best of
three; fp32 is used when it is at least ``MIN_GAIN`` times faster (AMX machines keep their bf16
kernels). The decision is reported either way (a fix, or a refusal with both times).

What the layer computes with afterwards (``layer.cpu_linear``, the hook vLLM-CPU calls):

* a layer that still holds its weight (vLLM's ``F.linear`` fallback): :class:`Fp32Gemm`
  converts the live parameter per call (a few percent of the GEMM), so weight updates, dtype
  conversions, autograd and pickling behave as before; mixed dtypes and autocast take
  ``F.linear`` itself, as before;
* a layer whose weight vLLM packed into a native handle and emptied: an fp32 copy of the
  loaded weight (kept for this at apply: ``fxpass.weights.keep_loaded_weight``), behind
  fxpass's GEMM guard (dtype, autocast, backward, pickling and threads as before). The native
  handle is dropped: memory is the fp32 copy, twice the bf16 weight.

Only unquantized, replicated layers (a sharded or quantized layer keeps vLLM's kernel), at the
first call (``apply`` with example inputs builds the layers before their weights load: the
rule has nothing to measure there).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fxpass.rules.base import Mode, Options, Phase, RewriteContext, RuleBase, Site

MIN_GAIN = 1.2  # fp32 must be this much faster: below it, machine noise decides
PROBE_ROWS = 256
HALF = (torch.bfloat16, torch.float16)

# (kernel kind, out, in, dtype, bias, threads) -> (use fp32, half s, fp32 s): one probe per
# shape and kernel for the process (layers of one shape share their decision)
_DECISIONS: dict[tuple[Any, ...], tuple[bool, float, float]] = {}


class Fp32Gemm:
    """``layer.cpu_linear`` computing a half-precision layer's GEMM in fp32 (see the module
    docstring). ``weight32``: the fp32 copy of an emptied layer's weight; None: convert the
    weight vLLM passes (the layer's live parameter) per call."""

    __slots__ = ("weight32", "bias32")

    def __init__(self, weight32: Tensor | None = None, bias32: Tensor | None = None) -> None:
        self.weight32 = weight32
        self.bias32 = bias32

    def __call__(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        w = self.weight32
        if w is None:
            if x.dtype is not weight.dtype or x.dtype not in HALF or (
                    torch.is_autocast_enabled(x.device.type)):
                return F.linear(x, weight, bias)  # the fallback's own answer or error
            w = weight.float()
        b = None
        if bias is not None:
            b = self.bias32 if self.bias32 is not None and w is self.weight32 else bias.float()
        return F.linear(x.float(), w, b).to(x.dtype)

    def __repr__(self) -> str:
        return f"Fp32Gemm({'fp32 copy' if self.weight32 is not None else 'per call'})"


@dataclasses.dataclass
class GemmSite:
    site: Site
    layer_name: str
    layer: nn.Module
    weight32: Tensor | None = None  # set by check: what apply installs
    times: tuple[float, float] = (0.0, 0.0)  # (the layer's kernel s, fp32 s)


def _kind(gemm: Any) -> str:
    gemm = _inner(gemm)
    return getattr(gemm, "__qualname__", type(gemm).__name__)


def _best(fn: Any, reps: int = 3) -> float:
    fn()  # warm: oneDNN builds its primitive for this M on the first call
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def decide(layer: nn.Module, loaded: Tensor | None) -> tuple[bool, float, float]:
    """(fp32 is faster here, the layer's kernel s, fp32 s) for the layer's shape; measured
    once per shape and kernel in this process. ``loaded``: an emptied layer's loaded weight
    (the fp32 side computes with its fp32 copy), None where the layer holds its weight."""
    weight = layer.weight
    dtype = layer.params_dtype
    n, k = layer.output_size, layer.input_size
    bias = getattr(layer, "bias", None)
    key = (_kind(layer.cpu_linear), n, k, dtype, bias is not None, torch.get_num_threads())
    if key not in _DECISIONS:
        x = torch.randn(PROBE_ROWS, k, generator=torch.Generator().manual_seed(0)).to(dtype)
        fp32 = Fp32Gemm(None if loaded is None else loaded.detach().float(),
                        None if bias is None else bias.float())
        with torch.no_grad():
            half_s = _best(lambda: layer.cpu_linear(x, weight, bias))
            fp32_s = _best(lambda: fp32(x, weight, bias))
        _DECISIONS[key] = (half_s >= MIN_GAIN * fp32_s, half_s, fp32_s)
    return _DECISIONS[key]


class Fp32CpuGemm(RuleBase):
    name = "fp32-gemm"
    phase = Phase.SPEED
    after = ("fusion",)  # a fused layer's GEMM is measured as the one it is

    def enabled(self, options: Options, mode: Mode) -> bool:
        return options.fuse and mode is Mode.FIRST_CALL

    def describe(self, ctx: RewriteContext, m: GemmSite) -> str:
        return ctx.full_name(m.layer_name)

    def match(self, ctx: RewriteContext) -> list[GemmSite]:
        from fxpass.layers import is_vllm_linear

        out, seen = [], set()
        for mg in ctx.graphs():
            for node in mg.nodes_of("call_module"):
                site = Site(mg, node)
                q = site.full_target()
                layer = ctx.layer_after(q)
                if (q in seen or not is_vllm_linear(layer)
                        or "cpu_linear" not in layer.__dict__
                        or getattr(layer, "params_dtype", None) not in HALF
                        or isinstance(_inner(layer.cpu_linear), Fp32Gemm)):  # done already
                    continue
                seen.add(q)
                out.append(GemmSite(site, q, layer))
        return out

    def check(self, ctx: RewriteContext, m: GemmSite) -> str | None:
        from fxpass.weights import tp_style

        layer = m.layer
        method = type(getattr(layer, "quant_method", None)).__name__
        if method != "UnquantizedLinearMethod":
            return f"quantized ({method}): vLLM's kernel stays"
        if tp_style(layer) is not None:
            return "sharded: vLLM's kernel stays"
        loaded, why = self._packed_weight(layer)
        if why:
            return why
        faster, half_s, fp32_s = decide(layer, loaded)
        if not faster:
            return (f"this machine's {layer.params_dtype} kernel is fast enough: "
                    f"{half_s * 1e3:.2f} ms against fp32's {fp32_s * 1e3:.2f} ms at "
                    f"{PROBE_ROWS} rows")
        # the fp32 copy only for a layer that will compute with it
        m.weight32 = None if loaded is None else loaded.detach().float()
        m.times = (half_s, fp32_s)
        return None

    @staticmethod
    def _packed_weight(layer: nn.Module) -> tuple[Tensor | None, str]:
        """(the loaded weight of a layer vLLM emptied into a native handle, or None where
        the layer holds its weight; why there is none)."""
        from fxpass.weights import loaded_weight

        if layer.weight.numel() != 0:
            return None, ""
        return loaded_weight(layer)

    def apply(self, ctx: RewriteContext, m: GemmSite) -> None:
        from fxpass.cpu_gemm import CpuGemmGuard

        layer = m.layer
        weight32 = m.weight32
        bias = getattr(layer, "bias", None)
        kernel: Any = Fp32Gemm(weight32, None if bias is None or weight32 is None
                               else bias.detach().float())
        if weight32 is not None:  # the parameter is empty: the guard checks dtypes for it
            kernel = CpuGemmGuard(kernel, f"{ctx.full_name(m.layer_name)} "
                                  f"({type(layer).__name__})", layer.params_dtype,
                                  layer.input_size, layer.output_size)
        ctx.kernels[m.layer_name] = kernel
        half_s, fp32_s = m.times
        ctx.fix(self.name, m.site,
                f"{m.site.node.target}: {layer.params_dtype} GEMM computed in fp32 "
                f"({half_s / fp32_s:.1f}x faster here: {half_s * 1e3:.2f} -> "
                f"{fp32_s * 1e3:.2f} ms at {PROBE_ROWS} rows)")


def _inner(gemm: Any) -> Any:
    from fxpass.cpu_gemm import CpuGemmGuard

    return gemm.gemm if isinstance(gemm, CpuGemmGuard) else gemm
