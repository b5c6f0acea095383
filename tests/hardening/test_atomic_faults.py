"""Injected faults: whatever step of ``fxpass.apply`` fails, the model is exactly as before.

Each rewrite step is made to fail in turn (monkeypatched): every rule registered in
``fxpass.rules.registry`` (its ``match``, ``check`` and ``apply``; the list is read from the
registry, so a new rule is covered without editing this file), building the vLLM layers,
loading each layer's weights, and every single module swap and forward install of the commit.
After each failure: the same module objects at the same paths with the same classes, a
bit-identical state_dict, no installed forwards, a bit-identical output, and an error that is
an :class:`fxpass.errors.FxpassError` naming the step. Then a clean ``apply`` on the same
model must still work (the failure left nothing behind, in the model or in the trace cache).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxpass
import fxpass.weights as weights
from fxpass.errors import FxpassError, QuantConfigError, RewriteError, WeightLoadError
from fxpass.rewrite import pipeline
from fxpass.rules import registry
from fxpass.rules.base import Mode, Options, is_vllm_linear
from unchanged import Unchanged

pytestmark = pytest.mark.usefixtures("vllm_rt")

D = 8


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(D, 2 * D)
        self.down = nn.Linear(2 * D, D)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))


class ToyRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, x):
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
                * self.weight.float()).type_as(x)


def _rope(x, cos, sin):
    """HF's apply_multidimensional_rope for two axes (unsqueeze_dim=2)."""
    xs = torch.split(x, [D // 2, D // 2], dim=-1)
    cs = torch.split(cos, [D // 2, D // 2], dim=-1)
    ss = torch.split(sin, [D // 2, D // 2], dim=-1)
    out = []
    for k in range(2):
        a, c, s = xs[k], cs[k].unsqueeze(2), ss[k].unsqueeze(2)
        half = a.shape[-1] // 2
        out.append(a * c + torch.cat((-a[..., half:], a[..., :half]), dim=-1) * s)
    return torch.cat(out, dim=-1)


class FaultToy(nn.Module):
    """Gives every registered rule something to do: q/k/v siblings (fusion), a weight dtype
    probe (weight-probes), a transposed input (contiguity), an SDPA mask built in forward
    (sdpa-mask), plain linears, nested graphs, an RMSNorm (rms-norm), a multidimensional
    rotation (rope), a patch conv (patch-conv) whose flattened, transposed output is added
    (layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D)
        self.proj = nn.Linear(D, D)
        self.lconv = nn.Linear(D, D, bias=False)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.norm = ToyRMSNorm(D)
        self.patch = nn.Conv2d(D, D, kernel_size=1, stride=1)

    def forward(self, hidden_states):
        x = hidden_states.to(self.proj.weight.dtype)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        n = x.shape[1]
        mask = torch.ones(n, n, dtype=torch.bool, device=x.device)
        att = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], attn_mask=mask)
        h = self.proj(q * torch.sigmoid(k) + v + att[:, 0])
        b, n, d = h.shape
        cols = h.reshape(b * n, d).t().contiguous()  # channels-first detour (lconv1d style)
        h = self.lconv(cols.t()).view(b, n, d)
        for block in self.blocks:
            h = block(h)
        h = self.norm(h)
        ang = torch.cat([h[..., : d // 2], h[..., : d // 2]], dim=-1)
        h = _rope(h.view(b, n, 1, d), ang.cos(), ang.sin()).view(b, n, d)
        g = self.patch(h.transpose(1, 2).unsqueeze(-1))  # (b, d, n, 1)
        return g.flatten(2).transpose(1, 2) + h


X = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(0))


def _toy() -> FaultToy:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return FaultToy().eval()


class Snapshot(Unchanged):
    """Unchanged, plus the toy's output on X, bit for bit."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        with torch.no_grad():
            self.out = model(X)

    def check(self) -> None:
        super().check()
        with torch.no_grad():
            assert torch.equal(self.model(X), self.out)


def _apply(model: nn.Module):
    return fxpass.apply(model, None, load_weights=True, fuse=True, example_inputs=(X,))


FAULT_OPTIONS = Options(fuse=True, load_weights=True)  # what _apply asks for


def _assert_clean_apply_still_works(model: nn.Module, snap: Snapshot) -> None:
    report = _apply(model)
    assert report.replaced
    with torch.no_grad():
        torch.testing.assert_close(model(X), snap.out, atol=1e-4, rtol=0)


class Injected(RuntimeError):
    pass


# Rules that only fire inside a tensor-parallel group of several ranks (apply(..., tp=N)):
# one process cannot run them; their match / check / apply and layer builds fail in turn on
# two ranks in tests/parallel/test_tensor_parallel_ranks.py
# (test_tensor_parallel_failures_leave_the_model_untouched). Here only their match runs.
ALL_RULES = [cls() for cls in registry.RULES]
TP_RULES = {r.name for r in ALL_RULES if getattr(r, "needs_tp_group", False)}


def test_fault_toy_exercises_every_registered_rule():
    """The fault tests below only prove something if each rule really runs on the toy."""
    report = _apply(_toy())
    by_rule = {f.rule for f in report.fixes}
    names = [r.name for r in registry.select(FAULT_OPTIONS, Mode.APPLY)]
    assert report.replaced and "linear" in names
    assert TP_RULES == {"tensor-parallel"}, TP_RULES
    for name in names:
        if name == "linear" or name in TP_RULES:
            continue
        fired = name in by_rule or (name == "fusion" and report.fused) or any(
            r["rule"] == name for r in report.refusals)
        assert fired, (f"rule {name!r} does nothing on FaultToy: extend the toy so the "
                       f"injected-fault tests cover it (report: {report.to_dict()})")


RULE_STEPS = [(type(r), step) for r in registry.select(FAULT_OPTIONS, Mode.APPLY)
              for step in ("match", "check", "apply")
              if step == "match" or r.name not in TP_RULES]


def _count_rule_calls(monkeypatch, rule_cls, step) -> int:
    real = getattr(rule_cls, step)
    calls = []

    def counting(self, *a, **kw):
        calls.append(1)
        return real(self, *a, **kw)

    monkeypatch.setattr(rule_cls, step, counting)
    _apply(_toy())
    monkeypatch.setattr(rule_cls, step, real)
    return len(calls)


@pytest.mark.parametrize("rule_cls,step", RULE_STEPS,
                         ids=[f"{c.__name__}.{s}" for c, s in RULE_STEPS])
@pytest.mark.parametrize("exc", [Injected, QuantConfigError], ids=["RuntimeError", "fxpass"])
def test_rule_step_failure_leaves_model_untouched(monkeypatch, rule_cls, step, exc):
    n = _count_rule_calls(monkeypatch, rule_cls, step)
    assert n >= 1, f"{rule_cls.__name__}.{step} is never called on FaultToy: extend the toy"
    real = getattr(rule_cls, step)
    for k in sorted({1, n}):  # the first and the last call fail
        model = _toy()
        snap = Snapshot(model)
        calls = []

        def failing(self, *a, **kw):
            calls.append(1)
            if len(calls) == k:
                raise exc(f"injected into {rule_cls.__name__}.{step} call {k}")
            return real(self, *a, **kw)

        monkeypatch.setattr(rule_cls, step, failing)
        expected = RewriteError if exc is Injected else exc
        with pytest.raises(expected, match=f"injected into {rule_cls.__name__}.{step} call {k}"
                           ) as info:
            _apply(model)
        if exc is Injected:
            assert "the model was not changed" in str(info.value)
            assert isinstance(info.value.__cause__, Injected)
        snap.check()
        monkeypatch.setattr(rule_cls, step, real)
        _assert_clean_apply_still_works(model, snap)


def _count_calls(monkeypatch, module, name) -> int:
    real = getattr(module, name)
    calls = []

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(module, name, counting)
    _apply(_toy())
    monkeypatch.setattr(module, name, real)
    return len(calls)


@pytest.mark.parametrize("name", ["build_vllm_linear", "build_fused_linear", "load_linear_weights",
                                  "load_fused_weights"])
@pytest.mark.parametrize("exc", [Injected, WeightLoadError], ids=["RuntimeError", "fxpass"])
def test_layer_build_or_weight_load_failure_leaves_model_untouched(monkeypatch, name, exc):
    n = _count_calls(monkeypatch, weights, name)
    assert n >= 1, f"{name} is never called on the toy"
    real = getattr(weights, name)
    for k in sorted({1, n}):  # the first and the last call fail
        model = _toy()
        snap = Snapshot(model)
        calls = []

        def flaky(*a, **kw):
            calls.append(1)
            if len(calls) == k:
                raise exc(f"injected into {name} call {k}")
            return real(*a, **kw)

        monkeypatch.setattr(weights, name, flaky)
        with pytest.raises(FxpassError, match=f"injected into {name} call {k}") as info:
            _apply(model)
        if exc is Injected:
            assert isinstance(info.value.__cause__, Injected)
        snap.check()
        monkeypatch.setattr(weights, name, real)
        _assert_clean_apply_still_works(model, snap)


def _commit_events(monkeypatch, fail_at: int | None) -> list[str]:
    """Count (and fail at) the commit's steps: every nn.Module.__setattr__ of a vLLM layer or
    of ``forward``, and every __delattr__ (fusion's removals), made inside pipeline._commit."""
    real = nn.Module.__setattr__
    real_commit = pipeline._commit
    seen: list[str] = []
    active = [False]

    def commit(ctx, runtime):
        active[0] = True
        try:
            return real_commit(ctx, runtime)
        finally:
            active[0] = False

    def setattr_(self, name, value):
        if active[0] and (name == "forward"
                          or (isinstance(value, nn.Module) and is_vllm_linear(value))):
            seen.append(f"{type(self).__name__}.{name}")
            if fail_at is not None and len(seen) == fail_at:
                raise Injected(f"injected at commit step {fail_at} ({seen[-1]})")
        return real(self, name, value)

    real_del = nn.Module.__delattr__

    def delattr_(self, name):  # fusion removes its member linears
        if active[0]:
            seen.append(f"del {type(self).__name__}.{name}")
            if fail_at is not None and len(seen) == fail_at:
                raise Injected(f"injected at commit step {fail_at} ({seen[-1]})")
        return real_del(self, name)

    monkeypatch.setattr(nn.Module, "__setattr__", setattr_)
    monkeypatch.setattr(nn.Module, "__delattr__", delattr_)
    monkeypatch.setattr(pipeline, "_commit", commit)
    return seen


def test_every_commit_step_failure_restores_the_model(monkeypatch):
    seen = _commit_events(monkeypatch, None)
    _apply(_toy())
    monkeypatch.undo()
    steps = list(seen)
    assert any(s.endswith(".forward") for s in steps), steps  # forward installs
    assert any(s.startswith("del ") for s in steps), steps  # fusion's removals
    assert any(not s.endswith(".forward") and not s.startswith("del ") for s in steps), steps
    for k in range(1, len(steps) + 1):
        model = _toy()
        snap = Snapshot(model)
        _commit_events(monkeypatch, k)
        with pytest.raises(RewriteError, match=f"injected at commit step {k} ") as info:
            _apply(model)
        monkeypatch.undo()
        assert "the model was restored" in str(info.value), k
        snap.check()
    _assert_clean_apply_still_works(model, snap)


def test_failed_apply_leaves_trace_cache_usable(monkeypatch):
    """A failure after the rules edited graphs must not leave edited graphs in the cache."""
    from fxpass.trace import DEFAULT_CACHE, trace

    model = _toy()
    fresh = copy.deepcopy(model)

    def boom(*a, **kw):
        raise Injected("injected after planning")

    monkeypatch.setattr(weights, "load_linear_weights", boom)
    with pytest.raises(FxpassError):
        _apply(model)
    monkeypatch.undo()
    cached = trace(fresh, (X,), cache=DEFAULT_CACHE)
    clean = trace(copy.deepcopy(fresh), (X,), cache=None)
    assert {q: g.graph.python_code("self").src for q, g in cached.graphs.items()} == {
        q: g.graph.python_code("self").src for q, g in clean.graphs.items()}
