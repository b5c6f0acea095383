"""fxpass.trace on toy modules that mimic HF patterns, plus the negative cases."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from toys import MLP, assert_same_outcome

import fxpass
from fxpass.errors import GuardError, UsageError
from fxpass.trace import TraceCache


class DataDependent(nn.Module):
    """`if x.sum() > 0`: a branch on tensor data, which no graph can specialise on safely."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = MLP()
        self.neg = MLP()

    def forward(self, x):
        if x.sum() > 0:
            return self.pos(x)
        return self.neg(x)


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = DataDependent()
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.inner(x))


def test_data_dependent_module_stays_python_children_traced():
    m = Outer().eval()
    x = torch.rand(2, 5, 8)  # sum > 0: `pos` is called
    t = fxpass.trace(m, (x,), cache=None)
    assert "data-dependent" in t.untraced["inner"]
    assert "" in t.graphs and "inner.pos" in t.graphs
    assert t.linear_sites == {"head": "", "inner.pos.fc1": "inner.pos", "inner.pos.fc2": "inner.pos"}
    b = t.build()
    for sign in (1, -1):  # the Python module still takes both branches
        y = sign * torch.rand(2, 7, 8)
        assert torch.equal(b(y), m(y))


@dataclasses.dataclass
class Cfg:
    heads: int = 2
    use_scale: bool = True


class HFStyle(nn.Module):
    """Shape unpacking, len(), *splat, item assignment, finfo(x.dtype), **kwargs, config branch."""

    def __init__(self, cfg: Cfg) -> None:
        super().__init__()
        self.cfg = cfg
        self.q = nn.Linear(8, 8)
        self.o = nn.Linear(8, 8)

    def forward(self, hidden, mask=None, **kwargs):
        b, n, d = hidden.shape
        assert len(hidden.shape) == 3
        q = self.q(hidden).view(*hidden.shape[:-1], self.cfg.heads, -1)
        q = q.transpose(1, 2)
        scores = q @ q.transpose(-1, -2)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
        probs = scores.softmax(-1)
        out = (probs @ q).transpose(1, 2).reshape(b, n, d)
        out[:, 0] = 0.0  # item assignment
        if self.cfg.use_scale:
            out = out * kwargs.get("scale", 1.0)
        return self.o(out)


def test_hf_patterns_trace_and_stay_exact_across_sizes():
    m = HFStyle(Cfg()).eval()
    mk = lambda n: dict(hidden=torch.randn(2, n, 8), mask=torch.rand(2, n) > 0.2, scale=0.5)  # noqa: E731
    t = fxpass.trace(m, mk(6), cache=None)
    assert t.untraced == {} and set(t.linear_sites) == {"q", "o"}
    b = t.build()
    for n in (6, 9, 13):
        x = mk(n)
        assert torch.equal(b(**x), m(**x))


class SizedFactories(nn.Module):
    """Factories sized by the input's shape (``torch.ones(n, n)``), which torch's argument
    parser rejects for plain fx proxies, plus ``torch.full`` with a size tuple."""

    def forward(self, x):
        b, n, d = x.shape
        mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        bias = torch.zeros(b, n, d, dtype=x.dtype) + torch.full((n, d), 0.5)
        eye = torch.eye(n, dtype=x.dtype)
        return (x + bias).masked_fill(~mask[None, :, :1], 0.0) + eye[None, :, :1]


def test_factories_sized_by_shapes_trace_and_follow_the_size():
    m = SizedFactories()
    t = fxpass.trace(m, (torch.randn(2, 5, 3),), cache=None)
    assert t.untraced == {}, t.untraced
    targets = {n.target for n in t.graphs[""].graph.nodes if n.op == "call_function"}
    assert {torch.ones, torch.zeros, torch.full, torch.eye} <= targets
    b = t.build()
    for n in (5, 7):
        x = torch.randn(2, n, 3)
        assert torch.equal(b(x), m(x))


class ShapeBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        if x.shape[1] > 4:  # decided on a shape: specialised, with a guard
            x = x * 2
        return self.lin(x)


def test_guard_raises_on_the_other_branch_in_strict_mode():
    m = ShapeBranch().eval()
    t = fxpass.trace(m, (torch.randn(1, 6, 8),), cache=None)
    assert "" in t.graphs and len(t.graphs[""].guards) == 1
    b = t.build(strict=True)
    x = torch.randn(1, 10, 8)
    assert torch.equal(b(x), m(x))
    with pytest.raises(GuardError, match=r"bool\(\.\.\.\) was True, but this input gives False"):
        b(torch.randn(1, 3, 8))


def test_the_other_branch_re_specialises_by_default():
    m = ShapeBranch().eval()
    t = fxpass.trace(m, (torch.randn(1, 6, 8),), cache=None)
    b = t.build()
    for n in (3, 10, 2, 4, 5):  # 3: a new graph; 10: the first; 2, 4: the new one again
        x = torch.randn(1, n, 8)
        assert torch.equal(b(x), m(x))
    from fxpass.runtime import installed_graph

    fwd = installed_graph(b)
    assert len(fwd.family.variants) == 1
    assert fwd.runtime.stats.specialisations == {"<root>": 1}
    assert fwd.runtime.stats.fallbacks == {}


def test_call_structure_guard():
    m = HFStyle(Cfg()).eval()
    t = fxpass.trace(m, dict(hidden=torch.randn(1, 4, 8)), cache=None)
    # the mask was left out, so its default (None) is part of the traced call
    with pytest.raises(GuardError, match="traced with None baked in"):
        t.build(strict=True)(hidden=torch.randn(1, 4, 8), mask=torch.ones(1, 4, dtype=torch.bool))
    b = t.build()
    for kwargs in (dict(hidden=torch.randn(1, 4, 8), mask=torch.ones(1, 4, dtype=torch.bool)),
                   dict(hidden=torch.randn(2, 4, 8)), dict(hidden=torch.randn(1, 4, 8))):
        assert_same_outcome(m, b, **kwargs)


class RotaryUser(nn.Module):
    """Takes (cos, sin) as one tuple argument, as HF attention layers do."""

    def forward(self, x, position_embeddings, scale=1.0):
        cos, sin = position_embeddings
        return (x * cos + x * sin) * scale


@pytest.mark.parametrize("bad, match", [
    (lambda c, s: (c, s, c), "traced for"),  # another length
    (lambda c, s: [c, s], "traced for"),  # a list, not a tuple
    (lambda c, s: ((c,), s), "traced for"),  # nested one level deeper
], ids=["longer", "list", "nested"])
def test_fast_path_with_tuple_arguments_still_checks_their_structure(bad, match):
    m = RotaryUser()
    x, c, s = (torch.randn(2, 4) for _ in range(3))
    t = fxpass.trace(m, ((x, (c, s)), {"scale": 1.0}), cache=None)
    b = t.build(strict=True)
    for _ in range(2):  # the second call of this form takes the fast path
        assert torch.equal(b(x, (c, s), scale=1.0), m(x, (c, s)))
        assert torch.equal(b(x, position_embeddings=(c, s), scale=1.0), m(x, (c, s)))
    with pytest.raises(GuardError, match=match):
        b(x, bad(c, s), scale=1.0)
    with pytest.raises(GuardError, match="baked in"):
        b(x, (c, s), scale=2.0)  # a constant of the trace, given another value
    assert torch.equal(b(x, (c, s), scale=1.0), m(x, (c, s)))
    # not strict: the original's answer, or the original's exception
    lenient = t.build()
    for call in ((x, bad(c, s)), (x, (c, s))):
        assert_same_outcome(m, lenient, *call, scale=1.0)
        assert_same_outcome(m, lenient, *call, scale=2.0)


def test_trace_does_not_modify_module_and_rejects_non_modules():
    m = HFStyle(Cfg())
    before = {k: v.clone() for k, v in m.state_dict().items()}
    fxpass.trace(m, dict(hidden=torch.randn(1, 4, 8)), cache=TraceCache())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert "forward" not in m.__dict__ and not hasattr(m, "_tensor_constant0")
    with pytest.raises(UsageError, match="expects an nn.Module"):
        fxpass.trace(lambda x: x)


def test_positional_and_keyword_calls_share_one_graph():
    """vLLM calls towers positionally where HF code and example inputs use keywords."""
    m = HFStyle(Cfg()).eval()
    t = fxpass.trace(m, dict(hidden=torch.randn(1, 4, 8), mask=torch.ones(1, 4, dtype=torch.bool)),
                     cache=None)
    b = t.build()
    x, mask = torch.randn(2, 5, 8), torch.rand(2, 5) > 0.3
    assert torch.equal(b(x, mask), m(x, mask))
    assert torch.equal(b(x, mask=mask), m(hidden=x, mask=mask))
    with pytest.raises(TypeError):
        b(x, mask, x, x)  # does not bind, as for the original forward


class BufferUser(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("bias", torch.randn(8, generator=g).to(torch.bfloat16))
        self.plain = torch.randn(8, generator=g)  # a tensor attribute, neither buffer nor param

    def forward(self, x):
        return x + self.bias.float() + self.plain * 2


def test_module_state_is_read_at_run_time_not_baked():
    shared = TraceCache()
    a, b = BufferUser(0), BufferUser(1)
    x = torch.randn(2, 8)
    fxpass.trace(a, (x,), cache=shared)
    tb = fxpass.trace(b, (x,), cache=shared)
    assert torch.equal(tb.build()(x), b(x))
    # a trace whose graph holds tensors made while tracing serves its own module only
    assert tb.cache_hits == 0
    built = tb.build()
    with torch.no_grad():
        built.bias.add_(1.0)  # e.g. weights loaded after apply, as in vLLM's model init
        b.bias.add_(1.0)
    assert torch.equal(built(x), b(x))


@dataclasses.dataclass
class Settings:
    scale: float = 2.0


class Child(nn.Module):
    def forward(self, x, settings):
        return x * settings.scale


class PassesConfig(nn.Module):
    """A config object (a dataclass in transformers 5) handed to a submodule call."""

    def __init__(self) -> None:
        super().__init__()
        self.settings = Settings()
        self.child = Child()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(self.child(x, settings=self.settings))


def test_config_objects_passed_to_submodules_stay_the_same_object():
    m = PassesConfig()
    x = torch.randn(2, 4)
    t = fxpass.trace(m, (x,), cache=None)
    assert t.untraced == {} and "" in t.graphs
    b = t.build(strict=True)
    assert torch.equal(b(x), m(x))
    # the root hands the child its own module's config object (a get_attr, not a copy)
    assert any(n.op == "get_attr" and n.target == "settings" for n in t.graphs[""].graph.nodes)
    # the child specialised on the config's values: a changed config is refused, not ignored
    b.settings.scale = 3.0
    with pytest.raises(GuardError, match=r"Settings\(scale=3.0\).*Settings\(scale=2.0\)"):
        b(x)
    # not strict: a call with another config object is traced again for it (a config
    # changed in place after apply is not seen: configs are compared by identity first)
    lenient = t.build()
    lenient.settings = m.settings = Settings(scale=3.0)
    assert torch.equal(lenient(x), m(x))
