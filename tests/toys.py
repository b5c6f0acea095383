"""Toy modules shared by several test folders (importable: tests/conftest.py's folder is on sys.path)."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """fc1 -> relu -> fc2: the smallest HF-style block with two linear call sites."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))
