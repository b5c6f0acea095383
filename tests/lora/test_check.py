"""fxpass.lora.check: which keys land on which layers, and which land nowhere."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from fxpass import zoo
from fxpass.lora.adapter import read_adapter
from fxpass.lora.check import check_adapter, check_model_dir, check_modules, find_towers


def test_good_adapter_lands_on_the_linears(vision_adapter):
    tower, path = vision_adapter
    res = check_adapter(path, torch.nn.ModuleDict({"model": torch.nn.ModuleDict(
        {"vision_tower": tower})}))
    assert res.ok and res.towers == ["model.vision_tower"]
    assert {r.layer for r in res.results} == {"Linear"}
    assert all(r.tower == "model.vision_tower" for r in res.results)
    assert "all keys land on a layer" in res.format()


def test_wrapper_keyed_adapter_lands_nowhere_with_the_key_vllm_needs(wrapper_adapter,
                                                                     vision_adapter):
    tower, _ = vision_adapter
    res = check_adapter(wrapper_adapter, torch.nn.ModuleDict({"model": torch.nn.ModuleDict(
        {"vision_tower": tower})}))
    assert not res.ok and len(res.nowhere) == len(res.results) == 6  # 2 layers x q, v, up
    for r in res.nowhere:
        assert r.suggestion == r.module + ".linear"
        assert "Gemma4ClippableLinear, not a linear layer" in r.reason
        assert r.suggested_keys() == [k.replace(".lora_", ".linear.lora_") for k in r.keys]
    text = res.format()
    assert "NOWHERE" in text and "need base_model.model.model.vision_tower." in text
    assert "land nowhere: vLLM would ignore them silently" in text


def test_missing_module_and_wrong_shape(vision_adapter, tmp_path):
    tower, path = vision_adapter
    tensors = load_file(str(path / "adapter_model.safetensors"))
    bad = {}
    for k, v in tensors.items():
        if "q_proj" in k:
            k = k.replace("layers.0", "layers.7")  # no such layer
        elif "up_proj" in k and "lora_A" in k:
            v = torch.zeros(v.shape[0], v.shape[1] + 1)  # wrong fan-in
        bad[k] = v.contiguous()
    (tmp_path / "adapter_config.json").write_text((path / "adapter_config.json").read_text())
    save_file(bad, str(tmp_path / "adapter_model.safetensors"))
    holder = torch.nn.ModuleDict({"model": torch.nn.ModuleDict({"vision_tower": tower})})
    res = check_adapter(tmp_path, holder)
    reasons = {r.module.rsplit(".", 2)[-2]: r.reason for r in res.nowhere}
    assert "no module" in reasons["q_proj"] and "layers.7" in res.format()
    assert "lora_A has shape" in reasons["up_proj"]


def test_fused_member_lands_on_its_slice(siglip_adapter):
    tower, path = siglip_adapter
    a = read_adapter(path)
    q = next(m for m in a.modules if m.endswith("self_attn.q_proj"))
    parent = q.rpartition(".")[0]
    fused = {f"{parent}.fused__q_proj__k_proj__v_proj":
             [f"{parent}.q_proj", f"{parent}.k_proj", f"{parent}.v_proj"]}
    holder = torch.nn.Module()  # the fused tower has no q_proj any more
    res = check_modules({q: a.modules[q]}, holder, towers=[""], fused=fused)
    (r,) = res.results
    assert r.lands and r.slice_of == next(iter(fused))


def test_check_model_dir_on_a_checkpoint(tmp_path):
    from fxpass.lora.adapter import demo_targets, rename_keys, write_adapter

    ckpt = zoo.write_tiny_gemma4_checkpoint(tmp_path / "ckpt")
    tower = zoo.load_tower(ckpt, "model.vision_tower", dtype=torch.float32)
    good = write_adapter(tower, tmp_path / "good", demo_targets(tower),
                         key_prefix="model.vision_tower")
    res = check_model_dir(ckpt, good)
    assert res.ok and res.towers == ["model.vision_tower", "model.audio_tower"]
    wrapper = rename_keys(good, tmp_path / "wrapper", ".linear.lora_", ".lora_")
    res = check_model_dir(ckpt, wrapper)
    assert not res.ok
    assert {r.suggestion for r in res.nowhere} == {
        f"model.vision_tower.{p}" for p in demo_targets(tower)}
    # a zoo adapter (hidden 32) on the checkpoint's tower (hidden 64): shapes do not fit
    other = write_adapter(zoo.build_tower("gemma4_vision"), tmp_path / "other",
                          ["encoder.layers.0.self_attn.q_proj.linear"],
                          key_prefix="model.vision_tower")
    (r,) = check_model_dir(ckpt, other).nowhere
    assert "lora_A has shape [8, 32], the layer takes 64 inputs" in r.reason


def test_find_towers():
    tower = zoo.build_tower("siglip_vision")
    assert find_towers(tower) == [""]
