"""Toy modules for the tensor-parallel rule: one column -> row pair each, and each with the
one thing that must make the rule refuse it (it then stays replicated, and correct)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HeadMixingAttention(nn.Module):
    """q/k/v -> o, with a softmax over the heads between them: mixes heads."""

    def __init__(self, hidden: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.o_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        shape = (b, s, self.heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        q = q.softmax(dim=1)  # over the heads
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class OddHeadsAttention(HeadMixingAttention):
    """Per-head attention with 3 heads: they do not divide by TP=2."""

    def __init__(self) -> None:
        super().__init__(hidden=24, heads=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        shape = (b, s, self.heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class TiedMLP(nn.Module):
    """fc1 -> gelu -> fc2 and proj, where fc2 and proj share one weight (tied)."""

    def __init__(self, hidden: int = 16, inter: int = 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, inter)
        self.fc2 = nn.Linear(inter, hidden)
        self.proj = nn.Linear(inter, hidden, bias=False)
        self.proj.weight = self.fc2.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc1(x))
        return self.fc2(h) + self.proj(h * 0.5)


class PerHeadMLP(nn.Module):
    """A pair that shards: fc1 -> per-channel scale and silu -> fc2 (the control)."""

    def __init__(self, hidden: int = 16, inter: int = 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, inter)
        self.fc2 = nn.Linear(inter, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)) * 2.0)


TOYS = {"head_mixing": HeadMixingAttention, "odd_heads": OddHeadsAttention,
        "tied": TiedMLP, "per_head_mlp": PerHeadMLP}
# the width of each toy's input
TOY_WIDTH = {"head_mixing": 32, "odd_heads": 24, "tied": 16, "per_head_mlp": 16}


def build_toy(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TOYS[name]().eval()


def toy_input(name: str, seq: int = 5, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, seq, TOY_WIDTH[name], generator=g)
