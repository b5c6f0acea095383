"""One rewrite session for every entry point: the rules it picks, the errors that name a rule,
and the report built from its events (read-only)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxpass
from fxpass import Report
from fxpass.errors import RewriteError, UsageError
from fxpass.rules import registry
from fxpass.rules.base import Mode, Options, Phase, RuleBase
from fxpass.rules.rope import MultidimRope

D = 8
X = torch.randn(2, 5, D)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(D, D)
        self.k = nn.Linear(D, D)
        self.o = nn.Linear(D, D)

    def forward(self, x):
        return self.o(torch.relu(self.q(x) + self.k(x)))


def _names(options: Options, mode: Mode) -> list[str]:
    return [r.name for r in registry.select(options, mode)]


def test_apply_runs_the_swap_then_the_fixes():
    assert _names(Options(), Mode.APPLY) == ["linear", "weight-probes", "contiguity",
                                             "sdpa-mask", "mm-attention"]


def test_fuse_adds_the_speed_rules_in_phase_order_and_after_their_inputs():
    names = _names(Options(fuse=True), Mode.APPLY)
    assert names[:2] == ["linear", "fusion"]
    # fp32-gemm measures loaded layers: at the first call only, after fusion
    assert set(registry.SPEED_RULES) - {"fp32-gemm"} <= set(names) and "fp32-gemm" not in names
    first_call = _names(Options(fuse=True), Mode.FIRST_CALL)
    assert first_call.index("fusion") < first_call.index("fp32-gemm")
    for first in ("rms-norm", "rope", "layout"):  # the in-place rule reads what they produce
        assert names.index(first) < names.index("elementwise")
    assert names.index("elementwise") < names.index("weight-probes")


def test_later_graphs_get_graph_rules_only():
    """Layers are swapped at apply; a first call may still shard and fuse (from the loaded
    layers), a re-specialised graph only regroups the fused slices (and is resharded)."""
    for mode in (Mode.FIRST_CALL, Mode.RESPECIALISE):
        names = _names(Options(fuse=True, tp=2), mode)
        assert "linear" not in names
        assert ("tensor-parallel" in names) is (mode is Mode.FIRST_CALL)
        assert ("fusion" in names) is (mode is Mode.FIRST_CALL) and "fused-slices" in names
        assert "rope" in names  # graph edits only: they run on new graphs too


def test_tensor_parallel_runs_only_when_sharding():
    assert "tensor-parallel" not in _names(Options(), Mode.APPLY)
    names = _names(Options(tp=2), Mode.APPLY)
    assert names[:2] == ["linear", "tensor-parallel"]


def test_rules_switched_off_by_name():
    names = _names(Options(fuse=True, disabled=frozenset({"rope", "contiguity"})), Mode.APPLY)
    assert "rope" not in names and "contiguity" not in names and "layout" in names
    with registry.disabled("layout"):
        assert "layout" not in _names(Options(fuse=True), Mode.APPLY)
    assert "layout" in _names(Options(fuse=True), Mode.APPLY)


def test_an_unknown_rule_name_says_which_exist():
    with pytest.raises(UsageError, match=r"unknown rule name\(s\) 'ropes'; the rules are: "
                                         r"linear, tensor-parallel, fusion"):
        with registry.disabled("ropes"):
            pass


def test_a_cycle_in_after_is_refused(monkeypatch):
    class A(RuleBase):
        name = "a"
        after = ("b",)

    class B(RuleBase):
        name = "b"
        after = ("a",)

    monkeypatch.setattr(registry, "RULES", (A, B))
    with pytest.raises(UsageError, match="form a cycle"):
        registry.select(Options(), Mode.APPLY)


def test_a_failing_rule_is_named_and_the_model_kept(monkeypatch):
    model = Block().eval()
    before = copy.deepcopy(model.state_dict())

    def boom(self, ctx):
        raise ValueError("no rope here")

    monkeypatch.setattr(MultidimRope, "match", boom)
    with pytest.raises(RewriteError, match=r"^rule 'rope' failed in match on Block: "
                                           r"ValueError: no rope here; the model was not "
                                           r"changed$") as info:
        fxpass.apply(model, None, fuse=True, load_weights=True, example_inputs=(X,))
    assert isinstance(info.value.__cause__, ValueError)
    assert all(type(m) is not RuleBase for m in model.modules())
    assert isinstance(model.q, nn.Linear) and isinstance(model.o, nn.Linear)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_report_is_built_from_events_and_read_only():
    model = Block().eval()
    ref = copy.deepcopy(model)
    report = fxpass.apply(model, None, fuse=True, load_weights=True, example_inputs=(X,))
    assert isinstance(report, Report)
    kinds = [e.kind for e in report.events]
    assert kinds.count("swap") == 3 and "fusion" in kinds and "fix" in kinds
    assert report.fused == {"fused__q__k": ["q", "k"]}
    assert report.replaced == ["o", "q", "k"]
    assert report.graph_rewrites == ["o"]  # q and k are called through the fused layer
    # what a field returns is a copy: changing it changes nothing
    report.replaced.append("x")
    report.skipped["x"] = "y"
    report.first_call["state"] = "z"
    assert "x" not in report.replaced and "x" not in report.skipped
    assert "state" not in report.first_call
    with pytest.raises(AttributeError):
        report.replaced = []  # type: ignore[misc]
    with torch.no_grad():
        torch.testing.assert_close(model(X), ref(X), atol=1e-5, rtol=0)


def test_the_first_call_adds_to_the_report_the_caller_holds():
    model = Block().eval()
    report = fxpass.apply(model, None, load_weights=True)
    assert report.traced_at == "first call" and report.first_call["state"] == "armed"
    assert report.graph_rewrites == [] and report.plain_swaps == {}
    with torch.no_grad():
        model(X)
    assert report.first_call["state"] == "traced"
    assert sorted(report.graph_rewrites) == ["k", "o", "q"]
    assert any(e.rule == "first call" and e.kind == "scope" for e in report.events)


def test_phases_are_ordered():
    assert Phase.SWAP < Phase.SHARD < Phase.SPEED < Phase.FIX
