"""Error metrics between a candidate tensor and a reference tensor.

Every metric is computed on float32 copies of both tensors, whatever their dtype (bf16,
fp16, integer, bool); sums of squares and the dot product accumulate in float64 so that
large tensors do not lose digits. Non-finite values are counted, not compared: the numeric
metrics use the positions where both tensors are finite, and a candidate whose NaN/Inf
positions differ from the reference's is reported through ``nonfinite_mismatch``.

Definitions (``c`` candidate, ``r`` reference, over finite positions):

- ``max_abs``  = max |c - r|
- ``max_rel``  = max |c - r| / |r| over positions with r != 0 (inf if c != r where r == 0)
- ``ref_max_abs`` = max |r| (the scale ``max_abs`` is read against)
- ``cosine``   = <c, r> / (|c| |r|); 1.0 when both are all zero, 0.0 when only one is
- ``sqnr_db``  = 10 log10(sum r^2 / sum (c - r)^2); inf when c == r, -inf when r == 0 != c
- ``tol_ratio`` = max |c - r| / (atol * s + rtol |r|) for a given (atol, rtol), with
  s = max(1, rms(r)): the ``torch.testing.assert_close`` criterion as a number (<= 1 means it
  passes). assert_close's atol is meant for values of order 1; rounding error carried
  through a tower grows with the activations' magnitude (Gemma4's pooler scales by
  sqrt(hidden)), so the absolute part scales with the reference's RMS where that exceeds 1.
  Measured on the full-width Gemma4 vision tower (fp32, 4 layers, 576 patches): the pooler
  output differs by 1.3e-4 at RMS ~30 (SQNR 130 dB), 5x the unscaled atol.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

__all__ = ["Metrics", "compare_tensors", "json_float"]


def json_float(x: float | None) -> float | str | None:
    """A float as JSON allows it: inf / -inf / nan become the strings "inf", "-inf", "nan"."""
    if x is None:
        return None
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def _from_json(x: Any) -> float | None:
    if x is None:
        return None
    if isinstance(x, str):
        return float(x)
    return float(x)


@dataclasses.dataclass
class Metrics:
    """The comparison of one candidate tensor with one reference tensor."""

    shape: tuple[int, ...]
    ref_shape: tuple[int, ...]
    dtype: str
    ref_dtype: str
    numel: int = 0
    max_abs: float | None = None
    max_rel: float | None = None
    ref_max_abs: float | None = None
    cosine: float | None = None
    sqnr_db: float | None = None
    tol_ratio: float | None = None
    nan: int = 0
    inf: int = 0
    ref_nan: int = 0
    ref_inf: int = 0
    nonfinite_mismatch: int = 0  # positions finite in one tensor and not in the other

    @property
    def shape_mismatch(self) -> bool:
        return self.shape != self.ref_shape

    @property
    def dtype_mismatch(self) -> bool:
        return self.dtype != self.ref_dtype

    @property
    def exact(self) -> bool:
        return (not self.shape_mismatch and not self.dtype_mismatch
                and self.nonfinite_mismatch == 0 and self.max_abs == 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "ref_shape": list(self.ref_shape),
            "dtype": self.dtype,
            "ref_dtype": self.ref_dtype,
            "shape_mismatch": self.shape_mismatch,
            "dtype_mismatch": self.dtype_mismatch,
            "numel": self.numel,
            "max_abs": json_float(self.max_abs),
            "max_rel": json_float(self.max_rel),
            "ref_max_abs": json_float(self.ref_max_abs),
            "cosine": json_float(self.cosine),
            "sqnr_db": json_float(self.sqnr_db),
            "tol_ratio": json_float(self.tol_ratio),
            "nan": self.nan,
            "inf": self.inf,
            "ref_nan": self.ref_nan,
            "ref_inf": self.ref_inf,
            "nonfinite_mismatch": self.nonfinite_mismatch,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Metrics":
        floats = ("max_abs", "max_rel", "ref_max_abs", "cosine", "sqnr_db", "tol_ratio")
        return cls(
            shape=tuple(d["shape"]), ref_shape=tuple(d["ref_shape"]),
            dtype=d["dtype"], ref_dtype=d["ref_dtype"], numel=d.get("numel", 0),
            **{k: _from_json(d.get(k)) for k in floats},
            **{k: int(d.get(k, 0)) for k in ("nan", "inf", "ref_nan", "ref_inf",
                                             "nonfinite_mismatch")},
        )


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def compare_tensors(candidate: torch.Tensor, reference: torch.Tensor, *,
                    atol: float | None = None, rtol: float | None = None) -> Metrics:
    """Metrics of ``candidate`` against ``reference`` (see the module docstring).

    Shapes that differ give a :class:`Metrics` with only shapes/dtypes filled in. With
    ``atol`` and ``rtol`` given, ``tol_ratio`` is filled in too.
    """
    m = Metrics(shape=tuple(candidate.shape), ref_shape=tuple(reference.shape),
                dtype=_dtype_name(candidate), ref_dtype=_dtype_name(reference))
    if m.shape_mismatch:
        return m
    with torch.no_grad():
        c = candidate.detach().to(device="cpu", dtype=torch.float32).reshape(-1)
        r = reference.detach().to(device="cpu", dtype=torch.float32).reshape(-1)
        m.numel = c.numel()
        # fp32 dot products (BLAS blocks the accumulation): relative error ~1e-6, far below
        # what a dB or a six-digit cosine shows. Finite sums of squares also prove every
        # element finite, which spares the isfinite passes in the common case.
        signal, c_sq = float(torch.dot(r, r)), float(torch.dot(c, c))
        m.nan = m.ref_nan = m.inf = m.ref_inf = m.nonfinite_mismatch = 0
        if not (math.isfinite(signal) and math.isfinite(c_sq)):
            c_fin, r_fin = torch.isfinite(c), torch.isfinite(r)
            m.nan, m.ref_nan = int(torch.isnan(c).sum()), int(torch.isnan(r).sum())
            m.inf, m.ref_inf = int(torch.isinf(c).sum()), int(torch.isinf(r).sum())
            both = c_fin & r_fin
            # Same non-finite value in the same place (e.g. -inf in masked scores) is a match.
            same_nonfinite = ~c_fin & ~r_fin & ((c == r) | (torch.isnan(c) & torch.isnan(r)))
            m.nonfinite_mismatch = int((~both & ~same_nonfinite).sum())
            c, r = c[both], r[both]
            signal, c_sq = float(torch.dot(r, r)), float(torch.dot(c, c))
        if c.numel() == 0:
            m.max_abs = m.ref_max_abs = 0.0
            m.max_rel = 0.0
            m.cosine, m.sqnr_db = 1.0, math.inf
            m.tol_ratio = 0.0 if atol is not None else None
            return m
        cross = float(torch.dot(c, r))
        diff = c - r
        noise = float(torch.dot(diff, diff))
        diff.abs_()
        r_abs = r.abs()
        m.max_abs = float(diff.max())
        m.ref_max_abs = float(r_abs.max())
        # |d| / |r|: inf where r == 0 != c (as defined above), nan where both are 0 -> 0
        # (max propagates nan: the nan pass runs only when there is one)
        ratio = torch.div(diff, r_abs)
        m.max_rel = float(ratio.max())
        if math.isnan(m.max_rel):
            m.max_rel = float(ratio.nan_to_num_(nan=0.0, posinf=math.inf).max())
        c_norm, r_norm = math.sqrt(c_sq), math.sqrt(signal)
        if c_norm == 0.0 and r_norm == 0.0:
            m.cosine = 1.0
        elif c_norm == 0.0 or r_norm == 0.0:
            m.cosine = 0.0
        else:
            m.cosine = min(1.0, cross / (c_norm * r_norm))
        if noise == 0.0:
            m.sqnr_db = math.inf
        elif signal == 0.0:
            m.sqnr_db = -math.inf
        else:
            m.sqnr_db = 10.0 * math.log10(signal / noise)
        if atol is not None and rtol is not None:
            scale = max(1.0, math.sqrt(signal / max(m.numel, 1)))
            a = atol * scale
            if rtol == 0 and a > 0:  # the bound is one number
                m.tol_ratio = m.max_abs / a
            elif rtol > 0 and (a > 0 or bool((r_abs > 0).all())):
                # |d| / (a + rtol|r|) = (|d| / (a / rtol + |r|)) / rtol: one pass for the bound
                bound = r_abs.add_(a / rtol)  # r_abs is not needed after this
                m.tol_ratio = float(torch.div(diff, bound, out=ratio).max()) / rtol
            else:  # atol = rtol = 0: exact comparison
                m.tol_ratio = 0.0 if m.max_abs == 0.0 else math.inf
    return m
