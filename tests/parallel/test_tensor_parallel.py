"""The tensor-parallel rule's analysis on one process: which pairs each graph gives, which it
refuses and why, and the errors of asking for TP without a group. Running sharded towers on
two ranks is tests/parallel/test_tensor_parallel_ranks.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxpass
from fxpass import zoo
from fxpass.errors import UsageError
from fxpass.rules.base import is_vllm_linear
from fxpass.parallel.rule import plan
from fxpass.vllm_plugin import tp_for

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tp_toys import build_toy, toy_input  # noqa: E402

TRACE_SIZE = {"gemma4_vision": 0, "gemma4_audio": 0, "siglip_vision": 1, "clip_vision": 1}


def _plan(name: str, tp: int = 2) -> list[dict]:
    tower = zoo.build_tower(name)
    return plan(tower, tp, example_inputs=zoo.example_inputs(tower,
                                                             size_index=TRACE_SIZE[name]))


def _pairs(plans: list[dict]) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    return [(tuple(p["columns"]), tuple(p["rows"])) for p in plans if p["refusal"] is None]


def test_gemma4_vision_pairs(vllm_rt):
    pairs = _pairs(_plan("gemma4_vision"))
    attn = "encoder.layers.{i}.self_attn.{p}_proj.linear"
    mlp = "encoder.layers.{i}.mlp.{p}_proj.linear"
    assert pairs == [x for i in (0, 1) for x in (
        (tuple(attn.format(i=i, p=p) for p in "qkv"), (attn.format(i=i, p="o"),)),
        ((mlp.format(i=i, p="gate"), mlp.format(i=i, p="up")), (mlp.format(i=i, p="down"),)))]


def test_gemma4_audio_pairs_constants_and_the_glu_refusal(vllm_rt):
    plans = _plan("gemma4_audio")
    attn = next(p for p in plans if "layers.0.self_attn.post.linear" in p["rows"])
    assert attn["refusal"] is None
    # relative_k_proj reads the position embeddings, not hidden_states: it is a column of the
    # same pair because its output meets the heads of q in a matmul
    assert attn["columns"] == [f"layers.0.self_attn.{p}_proj.linear" for p in "qkv"] + [
        "layers.0.self_attn.relative_k_proj"]
    assert [c.split(":")[0] for c in attn["constants"]] == [
        "view", "view_1", "view_2", "view_3", "reshape_1", "reshape_2"]
    assert all("size 2 at the sharded dim" in c and "-> 1 per rank (tp=2)" in c
               for c in attn["constants"])
    lconv = next(p for p in plans if "layers.0.lconv1d.linear_end.linear" in p["rows"])
    assert "glu halves the sharded dim" in lconv["refusal"]
    assert lconv["refusal"].startswith("layers.0.lconv1d: %glu")
    ffw = [p for p in plans if "feed_forward" in p["rows"][0]]
    assert len(ffw) == 2 and all(p["refusal"] is None for p in ffw)


@pytest.mark.parametrize("name", ["siglip_vision", "clip_vision"])
def test_siglip_and_clip_pairs_need_no_constant_rewritten(name, vllm_rt):
    plans = _plan(name)
    assert all(p["refusal"] is None and p["constants"] == [] for p in plans)
    rows = sorted(r for p in plans for r in p["rows"])
    expected = [f"encoder.layers.{i}.{m}" for i in (0, 1)
                for m in ("mlp.fc2", "self_attn.out_proj")]
    if name == "siglip_vision":
        expected.append("head.mlp.fc2")  # the head's MultiheadAttention stays nn.Linear
    assert rows == sorted(expected)


def test_head_count_must_divide(vllm_rt):
    plans = _plan("siglip_vision", tp=4)  # 2 heads of 16 do not divide by 4
    attn = [p for p in plans if "self_attn.out_proj" in p["rows"][0]]
    assert attn and all("holds 2 heads, which do not divide by tp=4" in p["refusal"]
                        for p in attn)
    assert "vLLM runs such a tower data parallel" in attn[0]["refusal"]
    # the MLPs (64 channels) still split four ways
    assert all(p["refusal"] is None for p in plans if "mlp" in p["rows"][0])


@pytest.mark.parametrize("toy,reason", [
    ("head_mixing", "%softmax : [num_users=1] = call_method[target=softmax](args = "
                    "(%transpose,), kwargs = {dim: 1}): softmax over the sharded dim (mixes "
                    "heads / channels)"),
    ("odd_heads", "the sharded dim 2 holds 3 heads, which do not divide by tp=2"),
    ("tied", "fc2: it stays nn.Linear (its weight is shared with proj.weight (tied weights))"),
])
def test_refusals_name_the_op_and_the_reason(toy, reason, vllm_rt):
    plans = plan(build_toy(toy), 2, example_inputs=(toy_input(toy),))
    assert plans and all(p["refusal"] for p in plans)
    assert any(reason in p["refusal"] for p in plans), plans


class _Probe(nn.Module):
    """A shape read of a linear's weight between the pair: a sharded layer's differs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc1(x))
        return self.fc2(h) * (self.fc2.weight.shape[1] / 32)


class _Chunked(nn.Module):
    """A fused projection chunked into q/k: splits the sharded dim (wrong blocks per rank)."""

    def __init__(self) -> None:
        super().__init__()
        self.qk = nn.Linear(16, 32)
        self.o = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k = self.qk(x).chunk(2, dim=-1)
        return self.o(q * k)


class _Escapes(nn.Module):
    """The sharded activation is returned: it would leave the module per rank."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.gelu(self.fc1(x))
        return self.fc2(h), h


@pytest.mark.parametrize("module,reason", [
    (_Probe, "reads its weight outside its call (%getattr"),
    (_Chunked, "chunk along the sharded dim"),
    (_Escapes, "<root> returns a sharded value and no traced graph calls it"),
])
def test_more_refusals(module, reason, vllm_rt):
    torch.manual_seed(0)
    plans = plan(module().eval(), 2, example_inputs=(torch.randn(2, 3, 16),))
    assert plans and all(reason in p["refusal"] for p in plans), plans


def test_apply_tp_without_a_group_of_that_size_is_a_usage_error(vllm_rt):
    tower = zoo.build_tower("clip_vision")
    state = {k: v.clone() for k, v in tower.state_dict().items()}
    with pytest.raises(UsageError, match=r"fxpass.apply\(tp=2\): this process's vLLM "
                                         r"tensor-parallel group has 1 rank\(s\); .*"
                                         r"fxpass.vllm_runtime\(tp=2, rank=r"):
        fxpass.apply(tower, tp=2, example_inputs=zoo.example_inputs(tower, size_index=1))
    assert all(torch.equal(v, state[k]) for k, v in tower.state_dict().items())
    assert not any(is_vllm_linear(m) for m in tower.modules())  # left as it was


@pytest.mark.parametrize("tp", [0, -1, 1.5, "2", True])
def test_apply_tp_must_be_a_positive_int(tp):
    with pytest.raises(UsageError, match="tp must be a positive int or None"):
        fxpass.apply(nn.Sequential(nn.Linear(2, 2)), tp=tp)


def test_vllm_runtime_cannot_join_a_second_group(vllm_rt):
    with pytest.raises(UsageError, match=r"vllm_runtime\(tp=2\): this process already has a "
                                         r"tensor-parallel group of 1 rank"):
        with fxpass.vllm_runtime(tp=2, rank=0, init_method="file:///tmp/x"):
            pass


def test_plugin_shards_under_weights_mode_only():
    assert tp_for(2, "weights") == 2
    assert tp_for(2, None) == 2  # vLLM's default mode
    assert tp_for(2, "data") == 1
    assert tp_for(1, "weights") == 1


def test_replicated_report_has_no_tp_section_noise(vllm_rt):
    tower = zoo.build_tower("clip_vision")
    report = fxpass.apply(tower, example_inputs=zoo.example_inputs(tower, size_index=1))
    d = report.to_dict()
    assert d["tp"] == {"size": 1, "layers": {}, "pairs": [], "sharded_fraction": 0.0}
    assert "tp=" not in report.summary_line()
