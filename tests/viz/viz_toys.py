"""Toy towers for the viz tests: hostile module names, a module left as Python, fixes."""

from __future__ import annotations

import torch
from torch import nn
from toys import MLP

XSS_NAME = "<img src=x onerror=alert(1)>"
XSS_REASON = "<script>alert(2)</script> & <b onmouseover=alert(3)>not traceable</b>"


class Stubborn(nn.Module):
    """Refuses to be traced with an error message full of HTML; runs fine as Python."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = MLP()

    def forward(self, x):
        if not isinstance(x, torch.Tensor):
            raise RuntimeError(XSS_REASON)
        return self.mlp(x) + 1.0


class Toy(nn.Module):
    """Exercises every marking: an XSS-named traced child, a Python-left child whose reason
    is HTML, a weight-dtype probe (folded) and a transposed linear input (contiguity)."""

    def __init__(self) -> None:
        super().__init__()
        self.add_module(XSS_NAME, MLP())
        self.stubborn = Stubborn()
        self.mix = nn.Linear(5, 5)  # applied over the sequence axis: input transposed
        self.head = nn.Linear(8, 4)

    def forward(self, x):  # x: [b, 5, 8]
        h = getattr(self, XSS_NAME)(x)
        h = self.stubborn(h)
        h = self.mix(h.transpose(1, 2)).transpose(1, 2)
        return self.head(h.to(self.head.weight.dtype))


def toy_inputs(seed: int = 0) -> tuple[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 5, 8, generator=g),)
