"""What runs after apply (``fxpass/trace/graph_runtime.py``): every Python value the trace
took is static or guarded, a call a graph does not cover re-specialises (or runs Python),
and the rewritten module is one the ecosystem's tools accept.

Property checked throughout: a call the original accepts returns the original's answer, or
raises the original's exception (``toys.assert_same_outcome``).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from toys import assert_same_outcome
from transformers.utils.deprecation import deprecate_kwarg

import fxpass
from fxpass.errors import FallbackError, GuardError
from fxpass.runtime import installed_graph


def _lenient_and_strict(model: nn.Module, example) -> tuple[nn.Module, nn.Module]:
    t = fxpass.trace(model, example, cache=None)
    assert t.untraced == {}, t.untraced
    return t.build(), t.build(strict=True)


# -- sequences whose length depends on the input -----------------------------------------

class PerImageAttention(nn.Module):
    """Attention over packed images, split per image by sizes read from tensor data
    (``torch.split(q, lengths.tolist())``, then a loop over the pieces)."""

    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x, lengths):
        seq, d = x.shape
        q, k, v = self.qkv(x).reshape(seq, 3, self.heads, -1).permute(1, 2, 0, 3).unbind(0)
        sizes = lengths.tolist()
        outs = [F.scaled_dot_product_attention(qs, ks, vs) for qs, ks, vs in zip(
            torch.split(q, sizes, dim=1), torch.split(k, sizes, dim=1),
            torch.split(v, sizes, dim=1))]
        return self.proj(torch.cat(outs, dim=1).permute(1, 0, 2).reshape(seq, d))


class UnbindLoop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        acc = torch.zeros_like(x[0])
        for row in x.unbind(0):  # as many rows as the batch
            acc = acc + self.lin(row)
        return acc


class ChunkLoop(nn.Module):
    def forward(self, x):
        return [c.sum() for c in x.chunk(3, dim=0)]  # chunk gives fewer pieces for small x


class NonzeroLoop(nn.Module):
    def forward(self, x):
        idx = (x > 0).nonzero()
        return [x[tuple(i)] * 2 for i in idx]  # as many items as positive entries


class UniqueLoop(nn.Module):
    def forward(self, x, labels):
        return torch.stack([x[labels == u].mean(0) for u in labels.unique().tolist()])


class DictChild(nn.Module):
    def forward(self, x):
        out = {"a": x + 1}
        if x.shape[0] > 1:
            out["b"] = x * 2
        return out


class IteratesChildDict(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.child = DictChild()

    def forward(self, x):
        return sum(v.sum() for v in self.child(x).values())


SEQUENCES = {
    "split by data sizes": (PerImageAttention, lambda: ((torch.randn(16, 8), torch.tensor([16])),),
                            [lambda: (torch.randn(16, 8), torch.tensor([6, 10])),
                             lambda: (torch.randn(16, 8), torch.tensor([10, 6])),
                             lambda: (torch.randn(12, 8), torch.tensor([4, 4, 4])),
                             lambda: (torch.randn(9, 8), torch.tensor([9]))]),
    "unbind over the batch": (UnbindLoop, lambda: ((torch.randn(2, 4),),),
                              [lambda: (torch.randn(3, 4),), lambda: (torch.randn(1, 4),)]),
    "chunk of a small tensor": (ChunkLoop, lambda: ((torch.randn(6, 2),),),
                                [lambda: (torch.randn(2, 2),), lambda: (torch.randn(7, 2),)]),
    "nonzero": (NonzeroLoop, lambda: ((torch.tensor([1.0, -1.0, 2.0]),),),
                [lambda: (torch.tensor([1.0, 3.0, 2.0]),), lambda: (torch.tensor([-1.0, -3.0]),)]),
    "unique values": (UniqueLoop, lambda: ((torch.randn(4, 2), torch.tensor([0, 0, 1, 1])),),
                      [lambda: (torch.randn(4, 2), torch.tensor([0, 1, 2, 2])),
                       lambda: (torch.randn(4, 2), torch.tensor([3, 3, 5, 5]))]),
    "dict of a child's output": (IteratesChildDict, lambda: ((torch.randn(1, 2),),),
                                 [lambda: (torch.randn(2, 2),), lambda: (torch.randn(1, 2),)]),
}


@pytest.mark.parametrize("name", SEQUENCES)
def test_data_sized_sequences_are_guarded_and_re_specialise(name):
    cls, example, calls = SEQUENCES[name]
    torch.manual_seed(0)
    model = cls().eval()
    t = fxpass.trace(model, example()[0], cache=None)
    assert any(meta_guard for mg in t.graphs.values() for meta_guard in mg.guards), \
        "the sequence's length must be guarded"
    lenient, strict = t.build(), t.build(strict=True)
    with torch.no_grad():
        for make in calls:
            args = make()
            assert_same_outcome(model, lenient, *args, atol=1e-6)
            try:
                assert_same_outcome(model, strict, *args, atol=1e-6)
            except AssertionError:
                with pytest.raises(GuardError):  # strict: covered, or refused: never wrong
                    strict(*args)


def test_per_image_attention_rewritten_serves_any_image_count(vllm_rt):
    """The case that gave a silently wrong answer (12-16 dB): traced with one image, called
    with two, in fp32 against the original."""
    torch.manual_seed(0)
    model = PerImageAttention().eval()
    ref = copy.deepcopy(model)
    report = fxpass.apply(model, None, load_weights=True,
                          example_inputs=(torch.randn(16, 8), torch.tensor([16])))
    assert len(report.graph_rewrites) == 2
    with torch.no_grad():
        for lengths in ([6, 10], [16], [3, 5, 8], [8, 8]):
            x = torch.randn(sum(lengths), 8)
            got, want = model(x, torch.tensor(lengths)), ref(x, torch.tensor(lengths))
            assert (got - want).abs().max() < 1e-4, lengths
    assert report.runtime.specialisations == {"<root>": 2}  # two and three images
    assert report.runtime.fallbacks == {}


# -- call binding ------------------------------------------------------------------------

class Embeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, pixel_values, interpolate_pos_encoding: bool = False, scale=None):
        x = self.proj(pixel_values)
        if interpolate_pos_encoding:
            x = x * 0.5
        return x if scale is None else x * scale


def test_omitted_default_positional_and_keyword_are_one_call():
    model = Embeddings().eval()
    x = torch.randn(2, 4)
    lenient, strict = _lenient_and_strict(model, ((x, False), {}))
    for call in ((x,), (x, False)):
        assert torch.equal(strict(*call), model(*call))
    assert torch.equal(strict(pixel_values=x), model(x))
    assert torch.equal(strict(x, interpolate_pos_encoding=False, scale=None), model(x))
    # another value of a defaulted flag: a branch the example did not take
    assert_same_outcome(model, lenient, x, True)
    assert_same_outcome(model, lenient, x, scale=2.0)
    stats = installed_graph(lenient).runtime.stats
    assert stats.specialisations == {"<root>": 2} and stats.fallbacks == {}


class RenamedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    @deprecate_kwarg("hidden_state", version="99.0", new_name="hidden_states")
    def forward(self, hidden_states, scale: float = 1.0):
        return self.lin(hidden_states) * scale


class CallsWithOldName(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([RenamedLayer(), RenamedLayer()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(hidden_state=x)  # the name deprecate_kwarg renames
        return x


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_decorator_renamed_keyword_binds_as_the_decorated_forward():
    model = CallsWithOldName().eval()
    x = torch.randn(2, 4)
    t = fxpass.trace(model, (x,), cache=None)
    assert t.untraced == {} and set(t.linear_sites) == {"layers.0.lin", "layers.1.lin"}
    lenient = t.build()
    assert torch.equal(lenient(x), model(x))
    layer, ref_layer = lenient.layers[0], model.layers[0]
    for args, kwargs in (((x,), {}), ((), {"hidden_states": x}), ((), {"hidden_state": x}),
                         ((x,), {"scale": 2.0}), ((), {"hidden_state": x, "scale": 0.5})):
        assert_same_outcome(ref_layer, layer, *args, **kwargs)
    # a call that does not bind raises what the original raises
    assert_same_outcome(ref_layer, layer, x, 1.0, 2.0)
    assert_same_outcome(model, lenient, x, x)


# -- branches, training mode, the bound ----------------------------------------------------

class TrainBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        x = self.lin(x)
        return x * 2 if self.training else x


def test_training_mode_is_part_of_what_a_graph_covers():
    model = TrainBranch().eval()
    x = torch.randn(2, 4)
    lenient, strict = _lenient_and_strict(model, (x,))
    strict.train()
    with pytest.raises(GuardError, match="training mode"):
        strict(x)
    lenient.train(), model.train()
    assert torch.equal(lenient(x), model(x))
    lenient.eval(), model.eval()
    assert torch.equal(lenient(x), model(x))


class LoopOverBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.stack([self.lin(x[i]) * i for i in range(x.shape[0])])


def test_past_the_bound_python_serves_with_one_warning(caplog):
    model = LoopOverBatch().eval()
    lenient, _ = _lenient_and_strict(model, (torch.randn(1, 4),))
    with caplog.at_level(logging.WARNING, logger="fxpass"), torch.no_grad():
        for n in range(2, 14):
            x = torch.randn(n, 4)
            assert torch.equal(lenient(x), model(x))
        for n in range(2, 14):  # served again without tracing: each size has its graph or Python
            x = torch.randn(n, 4)
            assert torch.equal(lenient(x), model(x))
    stats = installed_graph(lenient).runtime.stats
    assert stats.specialisations == {"<root>": 8}
    assert stats.fallbacks == {"<root>": 8}  # sizes 10..13, twice each
    assert "do not cover" in stats.reasons["<root>"]["fallback"]
    warnings = [r for r in caplog.records if r.name == "fxpass"]
    assert len(warnings) == 1 and "'<root>' (LoopOverBatch)" in warnings[0].getMessage()


class MutatesThenBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        x.mul_(2)  # the caller's tensor changes ...
        if x.shape[0] > 1:  # ... before a guard: a refused call could not be served again
            return self.lin(x) + 1
        return self.lin(x)


class BranchesThenMutates(MutatesThenBranches):
    def forward(self, x):
        y = self.lin(x) + 1 if x.shape[0] > 1 else self.lin(x)
        x.mul_(2)
        return y


def test_in_place_change_of_an_input_before_a_guard_stays_python():
    x = torch.randn(2, 4)
    t = fxpass.trace(MutatesThenBranches().eval(), (x.clone(),), cache=None)
    assert "changes an input or its own tensors in place" in t.untraced[""]
    assert "mul_" in t.untraced[""]
    after = fxpass.trace(BranchesThenMutates().eval(), (x.clone(),), cache=None)
    assert after.untraced == {}
    model = BranchesThenMutates().eval()
    lenient = fxpass.trace(model, (x.clone(),), cache=None).build()
    for n in (2, 1, 3):
        a, b = torch.randn(n, 4), None
        b = a.clone()
        assert torch.equal(lenient(a), model(b)) and torch.equal(a, b)


# -- the Python fallback keeps the graph's fixes ----------------------------------------

class ProbeThenData(nn.Module):
    """Reads its linear's weight dtype (folded under 4-bit); batch > 2 takes a data branch."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(64, 64)

    def forward(self, x):
        x = x.to(self.proj.weight.dtype)
        if x.shape[0] > 2 and x.sum() > 0:
            x = x * 1.0
        return self.proj(x)


def test_python_fallback_that_would_lose_a_probe_fix_raises(vllm_rt):
    from fxpass.weights import bnb_config

    model = ProbeThenData().to(torch.bfloat16).eval()
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    report = fxpass.apply(model, bnb_config("nf4"), load_weights=True, example_inputs=(x,))
    assert len(report.probes) == 1
    with torch.no_grad():
        assert model(x.float()).dtype == torch.bfloat16  # the folded probe: HF's dtype
        assert model(x[:1].float()).dtype == torch.bfloat16  # re-specialised, fold kept
        with pytest.raises(FallbackError, match=r"'<root>' \(ProbeThenData\).*proj\.weight"
                                                r"\.dtype to torch\.bfloat16.*torch\.uint8"):
            model(torch.randn(3, 64).abs())  # data-dependent: only Python could serve it


class TransposedThenData(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 6)

    def forward(self, x):  # x: (batch, 6, seq)
        if x.shape[0] > 2 and x.sum() > 0:
            x = x * 1.0
        return self.proj(x.transpose(1, 2))  # a non-contiguous input for vLLM's CPU GEMM


def test_python_fallback_keeps_the_contiguity_fix(vllm_rt):
    model = TransposedThenData().eval()
    ref = copy.deepcopy(model)
    report = fxpass.apply(model, None, load_weights=True,
                          example_inputs=(torch.randn(2, 6, 5),))
    assert len(report.contiguity) == 1
    with torch.no_grad():
        for n in (2, 3, 1):  # 3: data-dependent, Python with the fix
            x = torch.randn(n, 6, 5).abs()
            assert (model(x) - ref(x)).abs().max() < 1e-4
    assert report.runtime.fallbacks == {"<root>": 1}


# -- a module the ecosystem's tools accept ---------------------------------------------------

@pytest.fixture(scope="module")
def siglip(vllm_rt):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, image_size=16, patch_size=8)
    torch.manual_seed(0)
    ref = SiglipVisionModel(cfg).eval()
    model = copy.deepcopy(ref)
    fxpass.apply(model, None, load_weights=True,
                 example_inputs={"pixel_values": torch.randn(1, 3, 16, 16)})
    return ref, model


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("warm", [True, False], ids=["after-eager-call", "first-call-compiled"])
def test_torch_compile_of_tower_and_layer(siglip, backend, warm):
    ref, model = siglip
    model = copy.deepcopy(model)
    pix = torch.randn(2, 3, 16, 16)
    torch._dynamo.reset()
    with torch.no_grad():
        if warm:
            model(pix)
        compiled = torch.compile(model, backend=backend)
        want = ref(pix).last_hidden_state
        assert (compiled(pix).last_hidden_state - want).abs().max() < 1e-4
        layer, ref_layer = model.encoder.layers[0], ref.encoder.layers[0]
        h = torch.randn(2, 4, 32)
        got = torch.compile(layer, backend=backend)(h, None)
        assert (got - ref_layer(h, None)).abs().max() < 1e-4
    assert installed_graph(model.encoder.layers[0]).runtime.stats.fallbacks == {}


class _MaskedAttention(nn.Module):
    """Traced without a mask (None baked in); compiled callers pass one (HF builds a mask
    where dynamo traces it: its eager no-padding shortcut needs the data)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x, mask=None):
        y = self.proj(x)
        if mask is not None:
            y = y.masked_fill(~mask, 0.0)
        return y


class _Stack(nn.Module):
    def __init__(self, n: int = 10) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_MaskedAttention() for _ in range(n))

    def forward(self, x, mask=None):
        for layer in self.layers:
            x = layer(x, mask)
        return x


def test_compiled_calls_the_graphs_do_not_cover_run_as_in_eager_mode():
    """A call missing its graph inside torch.compile leaves the compiled region (one graph
    traced for it, outside dynamo, shared by the identical layers; the next call compiles
    it), instead of dynamo tracing the fallback's bookkeeping and recompiling it per module
    past its limit."""
    torch.manual_seed(0)
    ref = _Stack().eval()
    model = copy.deepcopy(ref)
    x = torch.randn(2, 3, 8)
    report = fxpass.apply(model, None, load_weights=True, example_inputs=((x,), {}))
    mask = torch.rand(2, 3, 8) > 0.3
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(model, backend="eager")
        for m in (mask, None, mask):
            torch.testing.assert_close(compiled(x, m), ref(x, m))
    stats = report.runtime
    assert not stats.fallbacks, stats  # served by a new graph, not Python
    # the root and one layer family, each traced once (ten identical layers share it)
    assert stats.specialisations == {"<root>": 1, "layers.0": 1}, stats


def test_deepcopy_hooks_and_state_dict_round_trip(siglip):
    ref, model = siglip
    pix = torch.randn(1, 3, 16, 16)
    twin = copy.deepcopy(model)
    assert installed_graph(twin) is not None and twin.forward.__self__ is twin
    with torch.no_grad():
        want = ref(pix).last_hidden_state
        assert (twin(pix).last_hidden_state - want).abs().max() < 1e-4
        seen = []
        handle = twin.encoder.layers[1].register_forward_hook(
            lambda mod, args, out: seen.append(out.shape) or out * 0)
        assert torch.equal(twin.post_layernorm(torch.zeros(1, 4, 32)),
                           twin(pix).last_hidden_state)  # the hook's zeros went on
        handle.remove()
        assert seen == [(1, 4, 32)]
    # the original's state_dict loads into a rewritten tower (same keys and shapes) and comes
    # back out unchanged; then vLLM's post-loading step, as its loader does
    other = copy.deepcopy(ref)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    fxpass.apply(other, None)
    other.load_state_dict(ref.state_dict())
    back = other.state_dict()
    assert list(back) == list(ref.state_dict())
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())
    for m in other.modules():
        if hasattr(m, "quant_method"):
            m.quant_method.process_weights_after_loading(m)
    with torch.no_grad():
        assert (other(pix).last_hidden_state - want).abs().max() < 1e-4
