"""The check every refusal and injected fault ends with: the model exactly as it was."""

from __future__ import annotations

import torch
from torch import nn


class Unchanged:
    """What ``model`` is now, to compare with later: the module object and class at each path
    (shared modules at each of their paths), a bit-identical state_dict (meta tensors: the
    same shape and dtype), and the same instance forwards (none installed by fxpass)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = _modules(model)
        self.state = {k: v.clone() for k, v in model.state_dict().items()}
        self.forwards = _forwards(model)

    def check(self) -> None:
        now = _modules(self.model)
        assert [(n, t) for n, _, t in now] == [(n, t) for n, _, t in self.modules]
        assert all(a is b for (_, a, _), (_, b, _) in zip(now, self.modules))
        state = self.model.state_dict()
        assert list(state) == list(self.state)
        for k, v in self.state.items():
            if v.is_meta:
                assert (state[k].shape, state[k].dtype) == (v.shape, v.dtype), k
            else:
                assert torch.equal(state[k], v), k
        assert _forwards(self.model) == self.forwards


def _modules(model: nn.Module) -> list[tuple[str, nn.Module, type]]:
    return [(n, m, type(m)) for n, m in model.named_modules(remove_duplicate=False)]


def _forwards(model: nn.Module) -> dict[str, object]:
    return {n: m.__dict__.get("forward") for n, m in model.named_modules()}
