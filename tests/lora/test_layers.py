"""fxpass.lora.layers: vLLM's own LoRA layers on a rewritten tower, outside an engine; and the
vLLM-CPU bug that an item without LoRA next to one with LoRA gets it when max_loras=1."""

from __future__ import annotations

import copy

import pytest
import torch

import fxpass
from fxpass import zoo
from fxpass.lora.layers import attach_lora


def test_every_tower_linear_is_wrapped_as_vllm_does(vision_adapter, vllm_rt):
    tower, path = vision_adapter
    cand = copy.deepcopy(tower)
    fxpass.apply(cand, None, prefix="vision_tower", load_weights=True)
    state = attach_lora(cand, path, key_prefix="model.vision_tower")
    n_linears = sum(isinstance(m, torch.nn.Linear) for m in tower.modules())
    assert len(state.modules) == n_linears and state.unwrapped == {}
    assert {type(m).__name__ for m in state.modules.values()} == {"ReplicatedLinearWithLoRA"}
    assert type(state.punica).__name__ == "PunicaWrapperCPU"
    assert set(state.loaded) == {p for p in state.modules
                                 if f"model.vision_tower.{p}" in state.adapter.modules}
    # the slot holds alpha/r * B (vLLM folds the scaling into B)
    p = next(iter(state.loaded))
    lw = state.adapter.modules[f"model.vision_tower.{p}"]
    b = state.modules[p].lora_b_stacked[0][0, 0, :, :lw.rank]
    torch.testing.assert_close(b, lw.b * lw.scaling)


def _two_items(max_loras: int, vllm_rt):
    """One ReplicatedLinearWithLoRA; rows 0..3 without LoRA (-1), rows 4..7 with slot 0."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.layers import LoRAMapping, LoRAMappingType
    from vllm.lora.punica_wrapper import get_punica_wrapper
    from vllm.lora.utils import from_layer

    from fxpass.weights import build_vllm_linear, load_linear_weights

    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8, bias=False)
    layer = build_vllm_linear(lin, None, "t")
    load_linear_weights(layer, lin.weight.detach(), None, None)
    cfg = LoRAConfig(max_lora_rank=8, max_loras=max_loras, lora_dtype=torch.float32)
    wrapped = from_layer(layer, max_loras, cfg, [], None)
    wrapped.set_lora(0, torch.randn(8, 16), torch.randn(8, 8))
    punica = get_punica_wrapper(8, max_batches=2, device="cpu", lora_config=cfg)
    wrapped.set_mapping(punica)
    ids = [None] * max_loras
    ids[0] = 1
    punica.update_metadata(LoRAMapping((0,) * 4 + (1,) * 4, (0, 1), is_prefill=True,
                                       type=LoRAMappingType.TOWER), ids, max_loras + 1, 0)
    x = torch.randn(8, 16)
    with torch.no_grad():
        return wrapped(x), lin(x)


def test_no_lora_rows_stay_base_with_max_loras_2(vllm_rt):
    out, base = _two_items(2, vllm_rt)
    torch.testing.assert_close(out[:4], base[:4], atol=1e-5, rtol=1e-5)
    assert (out[4:] - base[4:]).abs().max() > 0.1


@pytest.mark.xfail(strict=True, reason=(
    "vLLM-CPU 0.32: with max_loras=1 the torch LoRA ops (vllm/lora/ops/torch_ops) index the "
    "'no LoRA' slot -1 as the last slot, so an item without LoRA batched next to one with "
    "LoRA gets it too (upstream fix open as vLLM PR #48421). Workaround: max_loras >= 2 (the "
    "slot -1 then is an empty one). When this passes, vLLM fixed it: drop the xfail."))
def test_no_lora_rows_stay_base_with_max_loras_1(vllm_rt):
    out, base = _two_items(1, vllm_rt)
    torch.testing.assert_close(out[:4], base[:4], atol=1e-5, rtol=1e-5)


def test_tower_lora_leaves_the_model_of_the_test_alone(vllm_rt):
    tower = zoo.build_tower("gemma4_vision")
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    cand = copy.deepcopy(tower)
    fxpass.apply(cand, None, load_weights=True)
    assert all(torch.equal(v, tower.state_dict()[k]) for k, v in before.items())
