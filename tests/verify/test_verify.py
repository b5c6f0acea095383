"""fxpass.verify on the four tiny towers: clean rewrites pass, planted faults are caught and
located, the fake-quant reference catches what the float SQNR floor cannot."""

from __future__ import annotations

import copy
import json
from typing import Any, NamedTuple

import pytest
import torch
from torch import nn

import fxpass
from fxpass import zoo
from fxpass.errors import GuardError, UsageError
from fxpass.verify import Budget, VerifyReport, verify
from fxpass.verify.faults import planted
from fxpass.verify.report import FAKE_QUANT, REFERENCE

# Configs: dtype, bnb method (None: unquantized), random biases.
CONFIGS: dict[str, tuple[torch.dtype, str | None, bool]] = {
    "fp32": (torch.float32, None, False),
    "bf16-nf4": (torch.bfloat16, "nf4", False),
    "bf16-int8": (torch.bfloat16, "int8", False),
    # HF initialises biases to zero, so the zoo's towers have all-zero biases and a dropped
    # bias would change nothing: this config draws them at random.
    "fp32-bias": (torch.float32, None, True),
}


class Rewritten(NamedTuple):
    reference: nn.Module
    # (candidate, inputs it serves): SigLIP/CLIP take another branch at their native size,
    # which a graph traced at another size refuses (GuardError): it gets its own candidate.
    groups: list[tuple[nn.Module, list[dict[str, Any]]]]
    replaced: list[str]

    @property
    def candidate(self) -> nn.Module:
        return self.groups[0][0]

    @property
    def inputs(self) -> list[dict[str, Any]]:
        return self.groups[0][1]


def _rewrite(name: str, config: str) -> Rewritten:
    from fxpass.weights import bnb_config

    dtype, method, biases = CONFIGS[config]
    tower = zoo.build_tower(name, dtype=dtype)
    if biases:
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in tower.modules():
                if isinstance(m, nn.Linear) and m.bias is not None:
                    m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
    inputs = [zoo.example_inputs(tower, size_index=s, seed=s + 1) for s in (0, 1, 2)]
    qc = bnb_config(method) if method else None
    groups: list[tuple[nn.Module, list[dict[str, Any]]]] = []
    replaced: list[str] = []
    pending = inputs
    while pending:
        cand = copy.deepcopy(tower)
        report = fxpass.apply(cand, qc, prefix=name, load_weights=True,
                              example_inputs=pending[0])
        replaced = replaced or report.replaced
        served, refused = [], []
        for x in pending:
            try:
                with torch.no_grad():
                    cand(**x)
                served.append(x)
            except GuardError:
                refused.append(x)
        assert served, f"{name}: the candidate refuses the input it was traced on"
        groups.append((cand, served))
        pending = refused
    return Rewritten(tower, groups, replaced)


@pytest.fixture(scope="module")
def rewrite(vllm_rt):
    cache: dict[tuple[str, str], Rewritten] = {}

    def get(name: str, config: str) -> Rewritten:
        if (name, config) not in cache:
            cache[name, config] = _rewrite(name, config)
        return cache[name, config]

    return get


def _check_clean(vr: VerifyReport, layers: set[str], quantized: bool, mode: str) -> None:
    assert vr.passed, vr.format()
    assert vr.first_divergence is None and not vr.errors
    assert set(vr.layer_methods) == layers
    assert vr.references == ([FAKE_QUANT, REFERENCE] if quantized else [REFERENCE])
    compared = [n for n in vr.nodes if n.kind == "layer"]
    assert {n.module for n in compared} == layers  # every rewritten layer compared
    for n in compared:  # named by the fx node that calls it
        assert n.node is not None and n.graph is not None
        assert set(n.metrics) == set(vr.references)
    if mode == "propagated":
        assert vr.outputs and all(n.passed for n in vr.outputs)
        assert len(vr.nodes) > len(compared)  # every module call, not only the layers
    else:
        assert not vr.outputs and len(vr.nodes) == len(compared)


@pytest.mark.parametrize("config", ["fp32", "bf16-nf4", "bf16-int8"])
@pytest.mark.parametrize("name", zoo.KNOWN_TOWERS)
def test_clean_rewrite_passes_at_three_sizes(rewrite, name, config):
    rw = rewrite(name, config)
    layers = {n.removeprefix(name + ".") for n in rw.replaced}
    quantized = CONFIGS[config][1] is not None
    sizes = 0
    for cand, inputs in rw.groups:
        for mode in ("propagated", "isolated"):
            vr = verify(rw.reference, cand, inputs, mode=mode, progress=False)
            _check_clean(vr, layers, quantized, mode)
            assert {n.input for n in vr.nodes} == set(range(len(inputs)))
        sizes += len(inputs)
    assert sizes == 3


# kind, tower, config, faulty layer (never the tower's first layer)
FAULTS = [
    ("drop-bias", "clip_vision", "fp32-bias", "encoder.layers.1.mlp.fc1"),
    ("transpose", "gemma4_vision", "bf16-nf4", "encoder.layers.1.self_attn.k_proj.linear"),
    ("wrong-weights", "gemma4_audio", "bf16-nf4", "layers.0.self_attn.v_proj.linear"),
    ("wrong-weights", "gemma4_vision", "bf16-int8", "encoder.layers.0.mlp.up_proj.linear"),
    ("wrong-dtype", "siglip_vision", "fp32", "encoder.layers.0.mlp.fc2"),
]


@pytest.mark.parametrize("kind,name,config,layer", FAULTS,
                         ids=[f"{k}-{n}-{c}" for k, n, c, _ in FAULTS])
def test_planted_fault_is_caught_and_located(rewrite, kind, name, config, layer):
    rw = rewrite(name, config)
    first = rw.replaced[0].removeprefix(name + ".")
    assert layer != first
    with planted(rw.candidate, f"{kind}:{name}.{layer}", rw.reference, prefix=name) as path:
        assert path == layer
        prop = verify(rw.reference, rw.candidate, rw.inputs, progress=False)
        iso = verify(rw.reference, rw.candidate, rw.inputs, mode="isolated", progress=False)
    for vr in (prop, iso):
        assert not vr.passed
        fd = vr.first_divergence
        assert fd is not None and fd.module == layer and fd.kind == "layer", vr.format()
        assert fd.input == 0 and fd.violations
        if kind == "wrong-dtype":
            assert any("dtype" in v for v in fd.violations)
    # isolated: only the faulty layer is outside its budget, whatever follows it
    assert {n.module for n in iso.failures} == {layer}
    # the fault is undone on leaving the block
    assert verify(rw.reference, rw.candidate, rw.inputs, progress=False).passed


def test_isolated_mode_pins_each_layer_when_errors_pile_up(rewrite):
    rw = rewrite("gemma4_vision", "bf16-nf4")
    early = "encoder.layers.0.self_attn.v_proj.linear"
    late = "encoder.layers.1.mlp.down_proj.linear"
    with planted(rw.candidate, f"transpose:{early}", rw.reference), \
            planted(rw.candidate, f"wrong-weights:{late}", rw.reference):
        prop = verify(rw.reference, rw.candidate, rw.inputs, progress=False)
        iso = verify(rw.reference, rw.candidate, rw.inputs, mode="isolated", progress=False)
    assert prop.first_divergence.module == early
    downstream = {n.module for n in prop.failures if n.kind == "layer"}
    assert len(downstream) > 2 and late in downstream  # propagated: everything after it too
    assert {n.module for n in iso.failures} == {early, late}  # isolated: exactly the two


def test_fake_quant_reference_catches_what_the_sqnr_floor_misses(rewrite):
    """A loader fault that scales one nf4 layer's weight by 1.1 (like a wrong absmax) stays
    above the loose SQNR floors against the float model, but not against fake-quant."""
    from fxpass.weights import build_vllm_linear, load_linear_weights

    rw = rewrite("gemma4_vision", "bf16-nf4")
    path = "encoder.layers.0.mlp.gate_proj.linear"
    parent = rw.candidate.get_submodule(path.rpartition(".")[0])
    original = parent.linear
    src = rw.reference.get_submodule(path)
    bad = build_vllm_linear(src, original.quant_config, original.prefix)
    load_linear_weights(bad, src.weight * 1.1, src.bias, original.quant_config)
    parent.linear = bad
    try:
        loose = verify(rw.reference, rw.candidate, rw.inputs, fake_quant=False, progress=False)
        strict = verify(rw.reference, rw.candidate, rw.inputs, progress=False)
    finally:
        parent.linear = original
    assert loose.passed, loose.format()
    assert loose.references == [REFERENCE]
    assert not strict.passed
    assert strict.first_divergence.module == path
    assert any("near-exact" in v for v in strict.first_divergence.violations)


def test_report_dict_json_and_table(rewrite):
    rw = rewrite("gemma4_audio", "bf16-nf4")
    vr = verify(rw.reference, rw.candidate, rw.inputs, progress=False)
    d = vr.to_dict()
    d2 = json.loads(json.dumps(d, allow_nan=False))
    assert d2["passed"] is True and d2["first_divergence"] is None
    assert d2["quant_method"] == "nf4" and d2["dtype"] == "bfloat16"
    assert d2["references"] == [FAKE_QUANT, REFERENCE]
    assert d2["output_sqnr_db"][FAKE_QUANT] is not None
    assert isinstance(d2["output_sqnr_db"][REFERENCE], float)
    assert d2["budget"]["method"] == "nf4" and d2["budget"]["exact_sqnr_db"] is not None
    assert len(d2["inputs"]) == 3 and d2["counts"]["layers"] == len(rw.replaced)
    node = next(n for n in d2["nodes"] if n["kind"] == "layer")
    assert {"module", "node", "graph", "input", "metrics", "violations", "passed"} <= set(node)
    assert {"max_abs", "max_rel", "cosine", "sqnr_db", "nan", "inf", "shape_mismatch",
            "dtype_mismatch"} <= set(node["metrics"][REFERENCE])
    assert set(d2["layers"]) == set(vr.layer_methods)
    text = str(vr)
    assert "PASSED" in text and "layers.0.self_attn.q_proj.linear" in text
    assert "<output>:last_hidden_state" in text
    assert len(vr.format(all_nodes=True).splitlines()) > len(text.splitlines())


def test_budget_overrides(rewrite):
    rw = rewrite("gemma4_audio", "bf16-nf4")
    vr = verify(rw.reference, rw.candidate, rw.inputs, budget={"output_sqnr_db": 80.0},
                progress=False)
    assert not vr.passed
    fd = vr.first_divergence
    assert fd.kind == "output" and "output floor 80" in " ".join(fd.violations)
    assert vr.budget.output_sqnr_db == 80.0 and vr.budget.exact_sqnr_db is not None
    custom = Budget(dtype="bfloat16", method="nf4")  # every check off
    assert verify(rw.reference, rw.candidate, rw.inputs, budget=custom, progress=False).passed
    with pytest.raises(UsageError, match="unknown budget field"):
        verify(rw.reference, rw.candidate, rw.inputs, budget={"nope": 1})


def test_graph_carries_no_stale_buffer_values():
    """Regression: `self.std_bias.float()` (bf16 buffer) was baked into the graph as a constant."""
    from fxpass.trace import TraceCache

    cache = TraceCache()  # private: leaves the shared cache alone
    first = zoo.build_tower("gemma4_vision", dtype=torch.bfloat16, seed=0)
    fxpass.trace(first, zoo.example_inputs(first), cache=cache)
    other = zoo.build_tower("gemma4_vision", dtype=torch.bfloat16, seed=1)
    inputs = [zoo.example_inputs(other, size_index=s) for s in (0, 1, 2)]
    built = fxpass.trace(other, inputs[0], cache=cache).build()
    vr = verify(other, built, inputs, progress=False)
    assert vr.passed, vr.format()


# ------------------------------------------------------------------- toy modules, no vLLM


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.fc(x))


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block() for _ in range(3)])
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        for b in self.blocks:
            x = b(x)
        return {"out": self.head(x), "hidden": x}


class ToyExtra(Toy):
    """Calls a module the reference does not have, then everything else as usual."""

    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Identity()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return super().forward(self.extra(x))


def _toy_pair(cls: type[Toy] = Toy) -> tuple[Toy, Toy]:
    torch.manual_seed(0)
    ref = Toy().eval()
    cand = cls().eval()
    cand.load_state_dict(ref.state_dict(), strict=False)
    return ref, cand


def test_matching_by_path_and_call_not_position():
    ref, cand = _toy_pair(ToyExtra)
    inputs = [torch.randn(2, 8), (torch.randn(3, 5, 8),)]
    vr = verify(ref, cand, inputs, progress=False)
    assert vr.passed, vr.format()
    assert vr.candidate_only == ["extra"] and vr.reference_only == []
    assert not vr.layer_methods  # no vLLM layers: nothing was rewritten
    mods = [n.module for n in vr.nodes if n.input == 0]
    assert mods.index("blocks.0.fc") < mods.index("blocks.0") < mods.index("head")
    assert {n.leaf for n in vr.outputs} == {"out", "hidden"}
    assert vr.to_dict()["output_sqnr_db"][REFERENCE] == "inf"


def test_reference_calls_the_candidate_skips_are_listed():
    ref, cand = _toy_pair()
    cand.blocks[1].act = nn.Identity()  # same path, but now a different computation
    cand.blocks[1].forward = lambda x: x + cand.blocks[1].fc(x)  # never calls .act
    vr = verify(ref, cand, torch.randn(2, 8), progress=False)
    assert "blocks.1.act" in vr.reference_only
    assert not vr.passed and vr.first_divergence.module == "blocks.1"


def test_a_failing_candidate_is_a_finding_and_a_failing_reference_a_usage_error():
    ref, cand = _toy_pair()

    def boom(x):
        raise RuntimeError("kernel exploded")
    cand.blocks[2].fc.forward = boom
    vr = verify(ref, cand, torch.randn(2, 8), progress=False)
    assert not vr.passed and vr.errors
    assert "kernel exploded" in vr.errors[0]["error"]
    assert vr.errors[0]["after"] == "blocks.1"
    ref2, cand2 = _toy_pair()
    with pytest.raises(UsageError, match="the reference raised"):
        verify(ref2, cand2, torch.randn(2, 7), progress=False)  # wrong width


def test_usage_errors():
    ref, cand = _toy_pair()
    with pytest.raises(UsageError, match="same object"):
        verify(ref, ref, torch.randn(2, 8))
    with pytest.raises(UsageError, match="mode"):
        verify(ref, cand, torch.randn(2, 8), mode="sideways")
    with pytest.raises(UsageError, match="empty"):
        verify(ref, cand, [])
    with pytest.raises(UsageError, match="input"):
        verify(ref, cand, [42])
    with pytest.raises(UsageError, match="no default budget"):
        verify(ref.double(), copy.deepcopy(ref).double(), torch.randn(2, 8).double())


def test_progress_bar(capsys):
    ref, cand = _toy_pair()
    vr = verify(ref, cand, [torch.randn(2, 8), torch.randn(4, 8)], progress=True)
    assert vr.passed
    assert "verify" in capsys.readouterr().err


def test_verify_is_callable_under_both_names():
    import fxpass.verify as pkg

    ref, cand = _toy_pair()
    assert pkg.verify is verify
    assert fxpass.verify(ref, cand, torch.randn(2, 8), progress=False).passed
    assert pkg(ref, cand, torch.randn(2, 8), progress=False).passed


def test_fused_members_are_fake_quantized_in_the_reference():
    """With fuse=True a member's weights are a shard of the merged nf4 layer: the fake-quant
    reference quantizes every member (it used to quantize only the merged layer's own path,
    and SigLIP's out_proj failed the floor at 17 dB)."""
    from fxpass.verify.compare import fused_members
    from fxpass.weights import bnb_config

    tower = zoo.build_tower("siglip_vision").eval()
    ref = copy.deepcopy(tower)
    x = zoo.example_inputs(tower)
    report = fxpass.apply(tower, bnb_config("nf4"), load_weights=True, fuse=True,
                          example_inputs=x)
    members = [m for ms in report.fused.values() for m in ms]  # each a FusedSlice now
    assert members
    methods = fused_members(ref, tower)
    assert set(methods) == set(members)
    assert set(methods.values()) == {"nf4"}
    result = fxpass.verify(ref, tower, [x])
    assert result.passed, result.first_divergence
