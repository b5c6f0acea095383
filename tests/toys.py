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


def outcome(fn, *args, **kwargs):
    """What a call gives: ``("ok", output)`` or ``("raised", type, first line of message)``."""
    try:
        return ("ok", fn(*args, **kwargs))
    except Exception as e:  # noqa: BLE001 - the exception is the outcome
        return ("raised", type(e), str(e).splitlines()[0] if str(e) else "")


def assert_same_outcome(reference, candidate, *args, atol: float = 0.0, **kwargs):
    """``candidate(*args)`` gives ``reference(*args)``'s answer (within ``atol``) or raises
    the same exception type with the same message: never worse than the original."""
    want, got = outcome(reference, *args, **kwargs), outcome(candidate, *args, **kwargs)
    assert want[0] == got[0], f"original {want[:3]!r}, rewritten {got[:3]!r}"
    if want[0] == "raised":
        assert want[1:] == got[1:], f"original raised {want[1:]}, rewritten {got[1:]}"
        return
    flat_w = torch.utils._pytree.tree_leaves(want[1])
    flat_g = torch.utils._pytree.tree_leaves(got[1])
    assert len(flat_w) == len(flat_g)
    for w, g in zip(flat_w, flat_g):
        if isinstance(w, torch.Tensor):
            assert w.shape == g.shape and w.dtype == g.dtype
            assert (w.float() - g.float()).abs().max().item() <= atol if w.numel() else True
        else:
            assert w == g
