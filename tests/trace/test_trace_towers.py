"""fxpass.trace on tiny random-config HF towers: coverage, exactness, nothing lost."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxpass
from fxpass import zoo
from fxpass.trace import TraceCache

# SigLIP/CLIP take another branch at their native image size (size 0): trace where the
# interpolating branch is taken, so sizes 1 and 2 share the graph.
TRACE_SIZE = {"gemma4_vision": 0, "gemma4_audio": 0, "siglip_vision": 1, "clip_vision": 1}
CHECK_SIZES = {"gemma4_vision": (0, 1, 2), "gemma4_audio": (0, 1, 2),
               "siglip_vision": (1, 2), "clip_vision": (1, 2)}


def _first(out):
    if isinstance(out, torch.Tensor):
        return out
    return out[0]


@pytest.fixture(scope="module", params=zoo.KNOWN_TOWERS)
def traced(request):
    name = request.param
    tower = zoo.build_tower(name)
    t = fxpass.trace(tower, zoo.example_inputs(tower, size_index=TRACE_SIZE[name]))
    return name, tower, t


def test_every_linear_is_a_site(traced):
    _, tower, t = traced
    linears = {n for n, m in tower.named_modules() if isinstance(m, nn.Linear)}
    assert linears and set(t.linear_sites) == linears
    for lin, caller in t.linear_sites.items():
        assert caller in t.graphs, (lin, caller)


def test_graph_backed_module_is_exact(traced):
    name, tower, t = traced
    built = t.build()
    assert built is not tower
    inputs = [zoo.example_inputs(tower, size_index=s, seed=s + 1) for s in CHECK_SIZES[name]]
    if "pixel_values" in inputs[0] and inputs[0]["pixel_values"].dim() == 4:
        # SigLIP/CLIP: a third size on the traced branch (2.5x the native image size)
        side = int(tower.config.image_size * 2.5)
        inputs.append(dict(inputs[0], pixel_values=torch.rand(1, 3, side, side)))
    assert len(inputs) == 3  # the trace size and two others
    with torch.no_grad():
        for x in inputs:
            ref, got = _first(tower(**x)), _first(built(**x))
            assert torch.equal(ref, got), (name, {k: getattr(v, "shape", v) for k, v in x.items()})


def test_module_tree_unchanged(traced):
    _, tower, t = traced
    before = {n: type(m) for n, m in tower.named_modules()}
    keys = list(tower.state_dict())
    built = t.build()
    assert {n: type(m) for n, m in built.named_modules()} == before
    assert list(built.state_dict()) == keys
    # trace itself leaves the module alone: no instance forward, same tree
    assert not any("forward" in m.__dict__ for m in tower.modules())


def test_gemma4_vision_attention_and_layers_are_graphs():
    tower = zoo.build_tower("gemma4_vision")
    t = fxpass.trace(tower, zoo.example_inputs(tower))
    for name, mod in tower.named_modules():
        if type(mod).__name__ in ("Gemma4VisionAttention", "Gemma4VisionEncoderLayer"):
            assert name in t.graphs and name not in t.untraced


def test_trace_without_inputs_says_how_to_pass_them():
    """The trace stage knows no model: no inputs is a usage error naming the ways out."""
    tower = zoo.build_tower("gemma4_vision")
    with pytest.raises(fxpass.UsageError, match=r"fxpass.trace\(Gemma4VisionModel\) needs "
                       r"example inputs.*kwargs dict.*first real call"):
        fxpass.trace(tower)


def test_identical_layers_traced_once():
    tower = zoo.build_tower("gemma4_vision")
    t = fxpass.trace(tower, zoo.example_inputs(tower), cache=TraceCache())
    layers = [n for n, m in tower.named_modules() if type(m).__name__ == "Gemma4VisionEncoderLayer"]
    assert len(layers) >= 2
    assert t.graphs[layers[0]].reused_from is None
    for other in layers[1:]:
        assert t.graphs[other].reused_from == layers[0]
    assert t.cache_hits > 0


def test_default_size_vision_on_meta_traces_layers():
    tower = zoo.build_tower("gemma4_vision", size="default", device="meta")
    t = fxpass.trace(tower, zoo.example_inputs(tower))
    linears = {n for n, m in tower.named_modules() if isinstance(m, nn.Linear)}
    assert set(t.linear_sites) == linears
    # The root strips padding with a boolean mask: its output shape depends on data, which
    # meta tensors do not have. It stays Python, with that reason; everything below traces.
    assert set(t.untraced) <= {""}
    if t.untraced:
        assert "nonzero" in t.untraced[""] or "data" in t.untraced[""]


@pytest.mark.parametrize("name", zoo.KNOWN_TOWERS)
def test_warm_trace_replays_the_cold_one_exactly(name):
    """A second identical tower comes whole from the cache (subtree replay): same result."""
    cache = TraceCache()
    size = 1 if name in ("siglip_vision", "clip_vision") else 0
    tower = zoo.build_tower(name)
    x = zoo.example_inputs(tower, size_index=size)
    cold = fxpass.trace(tower, x, cache=cache)
    warm = fxpass.trace(copy.deepcopy(tower), x, cache=cache)
    assert list(warm.graphs) == list(cold.graphs)
    assert (warm.untraced, warm.linear_sites, warm.python_linear_uses) == (
        cold.untraced, cold.linear_sites, cold.python_linear_uses)
    assert warm.cache_hits == len(warm.graphs) + len(warm.untraced)  # every module replayed
    assert all(warm.graphs[q].graph is cold.graphs[q].graph for q in cold.graphs)
    x2 = zoo.example_inputs(tower, size_index=2)
    a, b = cold.build(), warm.build()
    with torch.no_grad():
        assert torch.equal(_first(a(**x2)), _first(b(**x2)))


@pytest.mark.parametrize("name", ["gemma4_vision", "gemma4_audio"])
def test_meta_memo_changes_nothing_but_the_time(name, monkeypatch):
    """On meta values identical layers run once while walking; the result is the same as
    running every call (the memo turned off)."""
    from fxpass.trace import memo as memo_mod

    config = zoo.tower_config(name, "default")  # default widths; 3 identical layers suffice
    config.num_hidden_layers = 3
    with torch.device("meta"):
        tower = zoo._from_config(config, name).eval()  # noqa: SLF001 - meta, layer count
    hits = []
    real_rebuild = memo_mod._rebuild
    monkeypatch.setattr(memo_mod, "_rebuild", lambda *a: hits.append(1) or real_rebuild(*a))
    x = zoo.example_inputs(tower)
    memo = fxpass.trace(tower, x, cache=None)
    assert hits, "the memo never served a call"
    monkeypatch.setattr(memo_mod.MetaMemo, "_key", lambda self, *a: None)
    plain = fxpass.trace(tower, x, cache=None)
    assert (memo.untraced, memo.linear_sites, memo.python_linear_uses) == (
        plain.untraced, plain.linear_sites, plain.python_linear_uses)
    code = {q: mg.graph.python_code("self").src for q, mg in memo.graphs.items()}
    assert code == {q: mg.graph.python_code("self").src for q, mg in plain.graphs.items()}


def test_meta_memo_keeps_identity_and_refuses_what_it_cannot_rebuild():
    from fxpass.trace.memo import MetaMemo

    memo, mod = MetaMemo(), nn.Linear(2, 2, device="meta")
    x = torch.empty(3, 2, device="meta")
    same = lambda m, t: t  # noqa: E731 - returns its input: a hit must return the new input
    assert memo.call(same, mod, (x,), {}) is x
    y = torch.empty(3, 2, device="meta")
    assert memo.call(same, mod, (y,), {}) is y and memo.hits == 1
    view = lambda m, t: t[1:].t()  # noqa: E731 - a strided view with an offset
    a = memo.call(view, mod, (x,), {})
    b = memo.call(view, mod, (y,), {})
    assert (b.shape, b.stride(), b.storage_offset()) == (a.shape, a.stride(), a.storage_offset())
    assert memo.hits == 2
    own = lambda m, t: m.weight  # noqa: E731 - the module's own tensor: never memoised
    assert memo.call(own, mod, (x,), {}) is mod.weight
    assert memo.call(own, mod, (y,), {}) is mod.weight and memo.hits == 2
    grow = lambda m, t: t.unsqueeze_(0)  # noqa: E731 - changes its input in place
    memo.call(grow, mod, (torch.empty(3, 2, device="meta"),), {})
    z = torch.empty(3, 2, device="meta")
    assert memo.call(grow, mod, (z,), {}).shape == (1, 3, 2) and z.shape == (1, 3, 2)
    real = torch.zeros(3, 2)
    assert memo.call(same, mod, (real,), {}) is real and memo.hits == 2  # real data: no memo
