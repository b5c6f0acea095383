"""Small numeric helpers the rule tests share: a tower's first output and SQNR in dB."""

from __future__ import annotations

from typing import Any

import torch


def first(out: Any) -> torch.Tensor:
    """The tensor an HF tower call answers with: the output itself, or its first field."""
    return out if isinstance(out, torch.Tensor) else out[0]


def sqnr_db(ref: torch.Tensor, got: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio of ``got`` against ``ref``, in dB (inf: equal)."""
    ref, got = ref.float(), got.float()
    err = (ref - got).pow(2).sum()
    return float(10 * torch.log10(ref.pow(2).sum() / err)) if err > 0 else float("inf")
