"""fxpass.lora.verify: vLLM's LoRA layers on the rewritten tower vs HF + PEFT, node by node."""

from __future__ import annotations

import pytest
import torch

from fxpass.errors import UsageError
from fxpass.lora.verify import verify_lora
from fxpass.weights import bnb_config

Q = "encoder.layers.0.self_attn.q_proj.linear"


def inputs_for(tower, dtype=torch.float32):
    from fxpass import zoo

    sizes = (1, 2) if "siglip" in type(tower).__name__.lower() else (0, 1, 2)
    return [zoo.example_inputs(tower.to(dtype), size_index=s, seed=s) for s in sizes]


def _run(adapter, dtype=torch.float32, **kw):
    tower, path = adapter
    prefix = "model.vision_tower" if "vision_tower" in path.name else (
        "model.audio_tower" if "audio_tower" in path.name else "")
    t = tower.to(dtype)
    return verify_lora(t, path, inputs_for(t, dtype), key_prefix=prefix, **kw)


@pytest.mark.parametrize("which", ["vision_adapter", "audio_adapter", "siglip_adapter"])
def test_fp32_matches_hf_plus_peft_above_100_db(which, request, vllm_rt):
    res = _run(request.getfixturevalue(which))
    vr = res.verify
    assert vr.passed, vr.format()
    assert vr.worst_output_sqnr_db() >= 100.0
    assert res.loaded and set(res.lora_layers.values()) == {"ReplicatedLinearWithLoRA"}
    # the adapter changes the output a lot: a LoRA that was dropped could not pass
    assert res.effect_db is not None and res.effect_db < 20.0
    # layers are compared at the LoRA wrapper's path (LoRA included)
    assert set(vr.layer_methods) == set(res.lora_layers)


def test_bf16_and_nf4_within_their_budgets(vision_adapter, vllm_rt):
    res = _run(vision_adapter, torch.bfloat16)
    assert res.verify.passed, res.verify.format()
    assert res.verify.budget.exact_sqnr_db == 30.0  # the calibrated bf16 tower-LoRA floor
    res = _run(vision_adapter, torch.bfloat16, quant_config=bnb_config("nf4"))
    vr = res.verify
    assert vr.passed, vr.format()
    assert vr.references == ["fake_quant", "reference"]  # fake-quant + PEFT, float + PEFT
    assert set(vr.layer_methods.values()) == {"nf4"}


def test_fused_qkv_loads_each_members_lora_into_its_slice(siglip_adapter, vllm_rt):
    res = _run(siglip_adapter, fuse=True)
    assert res.verify.passed, res.verify.format()
    assert res.verify.worst_output_sqnr_db() >= 100.0
    assert res.apply.fused  # q/k/v fused
    fused = [p for p in res.lora_layers if "fused__" in p]
    assert fused and all(res.lora_layers[p] == "MergedColumnParallelLinearVariableSliceWithLoRA"
                         for p in fused)
    # the adapter has q and v, not k: k's slice stays without LoRA
    assert all("k_proj: none" in res.loaded[p] for p in fused)


@pytest.mark.parametrize("kind", ["lora-scale", "lora-transpose", "lora-wrong-layer"])
def test_planted_fault_fails_and_names_the_layer(kind, vision_adapter, vllm_rt):
    res = _run(vision_adapter, fault=f"{kind}:{Q}")
    vr = res.verify
    assert not vr.passed and res.planted == Q
    assert vr.first_divergence.module == Q, vr.format()


def test_wrapper_keyed_adapter_is_refused_with_the_needed_key(wrapper_adapter, vision_adapter,
                                                             vllm_rt):
    tower, _ = vision_adapter
    with pytest.raises(UsageError, match=r"land on no layer(.|\n)*need base_model\.model\.model"
                       r"\.vision_tower\.encoder\.layers\.0\.self_attn\.q_proj\.linear\.lora_A"):
        verify_lora(tower, wrapper_adapter, inputs_for(tower), key_prefix="model.vision_tower")


def test_adapter_for_another_tower_is_refused(vision_adapter, audio_adapter, vllm_rt):
    tower, _ = audio_adapter
    with pytest.raises(UsageError, match="no LoRA tensors for modules under 'model.audio_tower'"):
        verify_lora(tower, vision_adapter[1], inputs_for(tower), key_prefix="model.audio_tower")
