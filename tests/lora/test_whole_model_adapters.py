"""Adapters as PEFT writes them for a whole model (issue 20, item 7).

A fine-tune of a multimodal model is saved by PEFT for the whole model: ``task_type``
``CAUSAL_LM`` (or ``SEQ_2_SEQ_LM``, ``FEATURE_EXTRACTION``, ...), ``target_modules`` as a
list of name suffixes or a regex over the full model's names, ``layers_to_transform``,
``rank_pattern`` / ``alpha_pattern`` keyed by full names, ``modules_to_save``. Here each is
written by real PEFT (``get_peft_model(...).save_pretrained``) on a tiny random
``Gemma4ForConditionalGeneration`` with two vision layers, and the tower's reference must be
exactly PEFT applied to that whole model, restricted to the tower.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from fxpass import zoo
from fxpass.errors import UsageError
from fxpass.lora.adapter import read_adapter
from fxpass.lora.check import check_adapter
from fxpass.lora.verify import peft_reference, tower_check, verify_lora

VISION = "model.vision_tower"
AUDIO = "model.audio_tower"
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture(scope="module")
def full_model() -> torch.nn.Module:
    """Tiny random Gemma4-MM (fp32) with two vision layers (layers_to_transform can pick)."""
    from transformers import Gemma4ForConditionalGeneration

    config = zoo._tiny_gemma4_config()
    config.vision_config.num_hidden_layers = 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Gemma4ForConditionalGeneration(config)
    return model.eval()


def _write(full: torch.nn.Module, out: Path, **config) -> Path:
    """An adapter written by PEFT for the whole model, with random A / B (and saved copies)."""
    from peft import LoraConfig, get_peft_model

    if (out / "adapter_config.json").is_file():
        return out
    model = get_peft_model(copy.deepcopy(full), LoraConfig(lora_dropout=0.0, **config))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name or ".modules_to_save." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (
                    1.0 if ".modules_to_save." in name else 0.0))
    model.save_pretrained(str(out))
    return out


ADAPTERS = {
    # list of suffixes; also a text layer, as a whole-model fine-tune has; rank by full name
    "causal_lm_list": dict(
        task_type="CAUSAL_LM", r=8, lora_alpha=16,
        target_modules=["q_proj.linear", "v_proj.linear",
                        "language_model.layers.0.self_attn.q_proj"],
        rank_pattern={f"{VISION}.encoder.layers.1.self_attn.v_proj.linear": 4}),
    # a regex over the full model's names (the wrapper's `.linear`: PEFT adapts nn.Linear only)
    "causal_lm_regex": dict(
        task_type="CAUSAL_LM", r=4, lora_alpha=8,
        target_modules=r".*(vision_tower.*\.(q_proj|k_proj|v_proj|o_proj)\.linear"
                       r"|language_model.*\.(q_proj|v_proj))",
        alpha_pattern={f"{VISION}.encoder.layers.0.self_attn.o_proj.linear": 32}),
    # layers_to_transform picks layer 1 of every "layers" list (the audio tower has only 0)
    "feature_extraction_layers": dict(
        task_type="FEATURE_EXTRACTION", r=4, lora_alpha=8,
        target_modules=["q_proj.linear", "up_proj.linear"], layers_to_transform=[1],
        layers_pattern="layers"),
    "seq2seq_regex_rslora": dict(
        task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=4, use_rslora=True,
        target_modules=r"model\.vision_tower\.encoder\.layers\.\d+\.mlp\..*\.linear"),
}


@pytest.fixture(scope="module")
def adapters(full_model, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("whole-model-lora")
    return {name: _write(full_model, out / name, **cfg) for name, cfg in ADAPTERS.items()}


def _whole_model_peft(full: torch.nn.Module, adapter: Path):
    """PEFT on the whole model, as the adapter's author loads it (its own task type)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(full), str(adapter)).eval()


def _vision_inputs(tower: torch.nn.Module) -> dict:
    return zoo.example_inputs(tower, size_index=1, seed=3)


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_reference_is_peft_on_the_whole_model_restricted_to_the_tower(name, full_model,
                                                                     adapters):
    tower = full_model.model.vision_tower
    whole = _whole_model_peft(full_model, adapters[name])
    assert type(whole).__name__ != "PeftModel"  # the task's subclass: needs the full model
    ref = peft_reference(tower, adapters[name], key_prefix=VISION)
    # the same modules adapted, with the same rank and scaling
    whole_targets = sorted(n[len(VISION) + 1:] for n in whole.base_model.targeted_module_names
                           if n.startswith(VISION + "."))
    assert whole_targets and ref._fxpass_peft_targets == whole_targets
    whole_tower = whole.base_model.model.model.vision_tower
    for path in whole_targets:
        a, b = whole_tower.get_submodule(path), ref.get_submodule(path)
        assert (a.r, a.scaling) == (b.r, b.scaling), path
    inp = _vision_inputs(tower)
    with torch.no_grad():
        got = ref(**inp).last_hidden_state
        want = whole_tower(**inp).last_hidden_state
        plain = tower(**inp).last_hidden_state
    assert torch.equal(got, want)  # bit for bit PEFT's own whole-model result
    assert not torch.allclose(got, plain, atol=1e-3)  # and the adapter does something


@pytest.fixture(scope="module")
def targets(full_model, adapters) -> dict[str, list[str]]:
    tower = full_model.model.vision_tower
    return {n: peft_reference(tower, p, key_prefix=VISION)._fxpass_peft_targets
            for n, p in adapters.items()}


def test_list_regex_and_layers_select_what_peft_selects(targets):
    layer = "encoder.layers.{}.{}.{}.linear"
    assert targets["causal_lm_list"] == sorted(
        layer.format(i, "self_attn", p) for i in (0, 1) for p in ("q_proj", "v_proj"))
    assert targets["causal_lm_regex"] == sorted(
        layer.format(i, "self_attn", p) for i in (0, 1) for p in ATTN)
    assert targets["feature_extraction_layers"] == [layer.format(1, "mlp", "up_proj"),
                                                    layer.format(1, "self_attn", "q_proj")]
    assert targets["seq2seq_regex_rslora"] == sorted(
        layer.format(i, "mlp", p) for i in (0, 1) for p in ("down_proj", "gate_proj", "up_proj"))


def test_read_adapter_ranks_and_scaling_are_pefts(full_model, adapters):
    """fxpass's own reading (rank / alpha patterns keyed by full names, rsLoRA) gives every
    module of the adapter the rank and scaling PEFT gives it on the whole model."""
    for name, path in adapters.items():
        whole = _whole_model_peft(full_model, path)
        inner = whole.base_model.model
        a = read_adapter(path)
        assert a.unparsed == []
        assert set(a.modules) == set(whole.base_model.targeted_module_names), name
        for module, lw in a.modules.items():
            layer = inner.get_submodule(module)
            assert lw.rank == layer.r["default"] == lw.a.shape[0], (name, module)
            assert lw.scaling == pytest.approx(layer.scaling["default"]), (name, module)
    ranks = {m: lw.rank for m, lw in read_adapter(adapters["causal_lm_list"]).modules.items()}
    assert ranks[f"{VISION}.encoder.layers.1.self_attn.v_proj.linear"] == 4
    assert ranks[f"{VISION}.encoder.layers.0.self_attn.v_proj.linear"] == 8


def test_key_check_on_the_whole_model_and_on_the_tower(full_model, adapters):
    path = adapters["causal_lm_regex"]
    res = check_adapter(path, full_model)
    assert res.ok, res.format()
    assert res.towers == [VISION, AUDIO]
    text = [r for r in res.results if r.tower is None]
    assert text and all(r.layer == "Linear" for r in text)  # the text layers land too
    tower = tower_check(full_model.model.vision_tower, read_adapter(path), VISION)
    assert tower.ok and len(tower.results) == 8  # 2 layers x q / k / v / o, nothing else


@pytest.mark.parametrize("name", ["causal_lm_list", "causal_lm_regex",
                                  "feature_extraction_layers"])
def test_verify_lora_passes_on_whole_model_adapters(name, full_model, adapters, targets,
                                                   vllm_rt):
    tower = full_model.model.vision_tower
    inputs = [zoo.example_inputs(tower, size_index=s, seed=s) for s in (0, 1)]
    res = verify_lora(tower, adapters[name], inputs, key_prefix=VISION)
    assert res.verify.passed, res.verify.format()
    assert res.verify.worst_output_sqnr_db() >= 100.0
    assert sorted(res.loaded) == targets[name]  # vLLM loaded exactly what PEFT adapted
    assert res.effect_db is not None and res.effect_db < 30.0


def test_adapter_that_targets_nothing_in_the_tower_is_a_clear_error(full_model, adapters,
                                                                   tmp_path, vllm_rt):
    audio = full_model.model.audio_tower
    inputs = [zoo.example_inputs(audio, size_index=0, seed=0)]
    # layers_to_transform=[1]: the one-layer audio tower has no layer 1
    with pytest.raises(UsageError, match=r"targets nothing in the tower at 'model\.audio_tower'"
                       r": no LoRA tensors for modules under 'model\.audio_tower'.*"
                       r"layers_to_transform=\[1\].*model\.vision_tower\.encoder\.layers\.1"):
        verify_lora(audio, adapters["feature_extraction_layers"], inputs, key_prefix=AUDIO)
    # a regex that matches only the text model: PEFT itself finds nothing in the tower
    text_only = _write(full_model, tmp_path / "text-only", task_type="CAUSAL_LM", r=4,
                       target_modules=r".*language_model.*\.(q_proj|v_proj)")
    with pytest.raises(UsageError, match=r"targets nothing in the tower at 'model\.vision_tower'"
                       r".*PEFT finds no module there to adapt \(Target modules .*not found"
                       r".*model\.language_model\.layers\.0\.self_attn\.q_proj") as e:
        peft_reference(full_model.model.vision_tower, text_only, key_prefix=VISION)
    assert type(e.value.__cause__).__name__ == "NoMatchingPeftModuleError"
    with pytest.raises(UsageError, match="targets nothing in the tower at 'model.vision_tower'"):
        verify_lora(full_model.model.vision_tower, text_only,
                    [_vision_inputs(full_model.model.vision_tower)], key_prefix=VISION)


def test_modules_to_save_in_the_tower(full_model, tmp_path, vllm_rt):
    """PEFT swaps in the saved copy (the reference does too); vLLM refuses such an adapter,
    and the key check says why its keys land on no LoRA layer."""
    norm = "vision_tower.encoder.layers.0.post_feedforward_layernorm"
    path = _write(full_model, tmp_path / "mts", task_type="CAUSAL_LM", r=4,
                  target_modules=["q_proj.linear"], modules_to_save=[norm])
    tower = full_model.model.vision_tower
    inp = _vision_inputs(tower)
    whole = _whole_model_peft(full_model, path)
    with torch.no_grad():
        want = whole.base_model.model.model.vision_tower(**inp).last_hidden_state
        got = peft_reference(tower, path, key_prefix=VISION)(**inp).last_hidden_state
    assert torch.equal(got, want)
    check = tower_check(tower, read_adapter(path), VISION)
    assert not check.ok and set(check.saved.values()) == {f"model.{norm}"}
    assert "a full copy of model." + norm + " (the adapter's modules_to_save)" in check.format()
    with pytest.raises(UsageError, match="vLLM refuses this adapter.*modules_to_save"):
        verify_lora(tower, path, [inp], key_prefix=VISION)
