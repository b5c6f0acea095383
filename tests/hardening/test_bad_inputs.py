"""One test per row of ``tests/hardening/BAD_INPUTS.md`` (the README's bad-input table).

Each checks the exact error type and the message: what is wrong, where (the module path /
layer prefix / file), and what to do. Rows that change nothing also check the model is left
exactly as it was.
"""

from __future__ import annotations

import copy
import json
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxpass
from fxpass import zoo
from fxpass.cli import main
from fxpass.errors import NotLoadedError, QuantConfigError, UsageError, WeightLoadError
from fxpass.rules.base import is_vllm_linear
from fxpass.weights import bnb_config, load_checkpoint, load_linear_weights
from unchanged import Unchanged

pytestmark = pytest.mark.usefixtures("vllm_rt")

D = 8
X = torch.randn(2, 3, D, generator=torch.Generator().manual_seed(1))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D, 2 * D)
        self.fc2 = nn.Linear(2 * D, D)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Tower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(D, D)
        self.layers = nn.ModuleList([Block(), Block()])

    def forward(self, hidden_states):
        h = self.embed(hidden_states)
        for layer in self.layers:
            h = h + layer(h)
        return h


def _tower() -> Tower:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Tower().eval()


def _bnb_subclass(behaviour: str):
    from vllm_bnb_plugin.bitsandbytes import BitsAndBytesConfig

    class BadConfig(BitsAndBytesConfig):
        def get_quant_method(self, layer, prefix):
            if behaviour == "none":
                return None
            raise KeyError(f"no scheme for {prefix}")

    return BadConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")


def _walk(model: nn.Module, prefix: str) -> None:
    """vLLM 0.32's recursive_replace_linear on ``model``, then the original weights loaded."""
    from vllm.model_executor.models.transformers.utils import recursive_replace_linear

    old = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    recursive_replace_linear(model, None, prefix=prefix)
    for n, lin in old.items():
        load_linear_weights(model.get_submodule(n), lin.weight, lin.bias, None)


# ---------------------------------------------------------------------------- the API


def test_not_an_nn_module():
    with pytest.raises(UsageError, match=r"^fxpass\.apply expects an nn\.Module, got function$"):
        fxpass.apply(lambda x: x)
    with pytest.raises(UsageError, match=r"^fxpass\.trace expects an nn\.Module, got dict$"):
        fxpass.trace({"weight": torch.zeros(2, 2)})


def test_prefix_not_a_string():
    with pytest.raises(UsageError, match=r"^prefix must be a str, got int$"):
        fxpass.apply(_tower(), prefix=3)


def test_model_with_no_linears_gives_an_empty_report():
    model = nn.Sequential(nn.LayerNorm(D), nn.GELU()).eval()
    same = Unchanged(model)
    report = fxpass.apply(model, None, load_weights=True, example_inputs=(X,))
    assert report.replaced == [] and report.skipped == {} and report.fixes == []
    assert report.summary_line().startswith("fxpass[<root>]: 0 linears -> vLLM")
    same.check()


def test_model_that_is_itself_a_linear_is_left_alone_with_a_reason():
    model = nn.Linear(D, D).eval()
    same = Unchanged(model)
    report = fxpass.apply(model, None, load_weights=True, example_inputs=(X,))
    assert report.replaced == []
    assert report.skipped == {"": "the model itself is an nn.Linear: there is no parent to swap "
                                  "it in; apply fxpass to the module that holds it"}
    assert type(model) is nn.Linear and torch.equal(model.weight, same.state["weight"])


@pytest.mark.parametrize("behaviour", ["none", "raise"])
def test_quant_config_that_cannot_serve_a_layer(behaviour):
    model = _tower()
    same = Unchanged(model)
    with pytest.raises(QuantConfigError) as info:
        fxpass.apply(model, _bnb_subclass(behaviour), prefix="vision_tower", load_weights=True,
                     example_inputs=(X,))
    msg = str(info.value)
    if behaviour == "none":
        assert msg.startswith("vision_tower.embed: BadConfig.get_quant_method returned None for "
                              "a ReplicatedLinear (vLLM requires a method for every linear layer)")
    else:
        assert msg.startswith("vision_tower.embed: BadConfig.get_quant_method raised KeyError: "
                              "'no scheme for vision_tower.embed'")
        assert isinstance(info.value.__cause__, KeyError)
    assert "'vision_tower.embed' to" in msg and "skip list" in msg and "quant_config=None" in msg
    same.check()


def test_unknown_quant_method_api():
    with pytest.raises(UsageError, match=r"^unknown bitsandbytes method 'nf3'; expected one of "
                                         r"\('nf4', 'fp4', 'int8'\)$"):
        bnb_config("nf3")


@pytest.mark.parametrize("given, hint", [
    ("nf4", "For bitsandbytes nf4 (the CLI's --quant bnb-nf4): "
            "quant_config=fxpass.weights.bnb_config('nf4')."),
    ("bnb-int8", "For bitsandbytes int8 (the CLI's --quant bnb-int8): "
                 "quant_config=fxpass.weights.bnb_config('int8')."),
    ("fp8", ""),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "get_quantization_config("
     "d['quant_method']).from_config(d)."),
])
def test_quant_config_that_is_not_a_quant_config(given, hint):
    same = Unchanged(_tower())
    got = f"the string {given!r}" if isinstance(given, str) else type(given).__name__
    with pytest.raises(UsageError) as info:
        fxpass.apply(same.model, given, example_inputs=(X,))
    msg = str(info.value)
    assert msg.startswith(
        "fxpass.apply: quant_config must be a vLLM quantization config (a QuantizationConfig "
        "from vllm.model_executor.layers.quantization: an object with get_quant_method(layer, "
        "prefix), the one vLLM passes to the model it builds) or None for no quantization; "
        f"got {got}. Build one with fxpass.weights.bnb_config('nf4' | 'fp4' | 'int8') for "
        "bitsandbytes, or with vLLM's config classes")
    assert msg.endswith(hint)
    same.check()


def test_transformers_quant_config_is_not_vllms():
    from transformers import BitsAndBytesConfig

    same = Unchanged(_tower())
    with pytest.raises(UsageError, match=r"got BitsAndBytesConfig\. .* BitsAndBytesConfig is "
                                         r"transformers' config, not vLLM's: for bitsandbytes "
                                         r"use fxpass\.weights\.bnb_config"):
        fxpass.apply(same.model, BitsAndBytesConfig(load_in_4bit=True), example_inputs=(X,))
    same.check()


class DataDependent(nn.Module):
    """A root that stays Python (a branch on tensor data): its linears are swapped without a
    graph and called by HF-style Python code."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _tower()
        self.head = nn.Linear(D, D)

    def forward(self, hidden_states):
        h = self.head(hidden_states)
        if h.sum() > 0:
            h = h * 2
        return self.inner(h)


def _how(model: nn.Module, how: str, **kw):
    if how == "graph":
        return fxpass.apply(model, example_inputs=(X,), **kw)
    if how == "first call":
        return fxpass.apply(model, **kw)  # Tower: no example inputs known, traced at the call
    return fxpass.apply(model, example_inputs=(X,), **kw)  # DataDependent: root stays Python


@pytest.mark.parametrize("how, first", [("graph", "embed"), ("first call", "embed"),
                                        ("plain swap", "head")])
def test_calling_layers_no_loader_filled(how, first):
    """README's first snippet outside vLLM without load_weights=True: the call raises
    fxpass's error naming the layer and load_weights=True, where vLLM's code raised
    AttributeError: 'ReplicatedLinear' object has no attribute 'cpu_linear'; once a loader has
    filled the layers, the same model computes the original's answer."""
    ref = DataDependent().eval() if how == "plain swap" else _tower()
    model = copy.deepcopy(ref)
    state = ref.state_dict()
    report = _how(model, how, prefix="vision_tower")
    assert not report.weights_loaded
    if how == "plain swap":
        assert "vision_tower.head" in report.plain_swaps and "" in report.untraced
    for _ in range(2):  # and again: a first call stays armed, a graph is not dropped
        with pytest.raises(NotLoadedError) as info, torch.no_grad():
            model(X)
        assert str(info.value).startswith(f"vision_tower.{first}: ")
        assert isinstance(info.value, WeightLoadError)
    msg = str(info.value)
    assert "called before its weights were loaded" in msg and "pass load_weights=True to "\
        "fxpass.apply on the original module" in msg and "vLLM's loader" in msg
    if how == "first call":
        assert report.first_call["state"] == "armed"
    assert load_checkpoint(model, state, None) == []
    with torch.no_grad():
        torch.testing.assert_close(model(X), ref(X), atol=1e-5, rtol=0)
    if how == "first call":
        assert report.first_call["state"] == "traced"
    # loaded: nothing of the guard is left on the layers or their quant methods
    for m in model.modules():
        assert not m._forward_pre_hooks
        if is_vllm_linear(m):
            assert "process_weights_after_loading" not in vars(m.quant_method)


def test_vllms_own_loader_fills_the_layers_and_nothing_fires():
    """Inside vLLM the loader fills each parameter through its weight_loader, then runs
    vLLM's process_weights_after_loading over the model: no fxpass error afterwards, no
    hook left, the original's answer."""
    import types

    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    ref = _tower()
    model = copy.deepcopy(ref)
    fxpass.apply(model, None, prefix="vision_tower")  # as in vLLM's model init
    params = dict(model.named_parameters())
    for name, tensor in ref.state_dict().items():
        param = params[name]
        param.weight_loader(param, tensor)
    config = types.SimpleNamespace(word_embeddings_untied_by_checkpoint=False,
                                   dtype=torch.float32, quantization=None)
    process_weights_after_loading(model, config, torch.device("cpu"))
    assert all(not m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(X), ref(X), atol=1e-5, rtol=0)


def test_apply_again_with_other_settings_says_nothing_changed_and_why():
    model = _tower()
    fxpass.apply(model, None, prefix="vision_tower", load_weights=True, example_inputs=(X,))
    same = Unchanged(model)
    with torch.no_grad():
        before = model(X)
    with pytest.warns(UserWarning) as caught:
        again = fxpass.apply(model, bnb_config("nf4"), prefix="vision_tower",
                             load_weights=True, example_inputs=(X,))
    note = ("fxpass.apply: already applied; nothing changed: the model was rewritten by an "
            "earlier fxpass.apply with quant_config=None (unquantized); this call asked for "
            "quant_config=BitsAndBytesConfig(nf4), which needs the original nn.Linear layers, "
            "and those are gone. Rebuild the tower from the original module (from_pretrained "
            "/ from_config and its weights again, or a copy taken before the first apply) and "
            "apply once with the settings you want.")
    assert [str(w.message) for w in caught] == [note]
    assert again.already_applied and again.already_applied_note == note
    assert again.already_applied_with == {
        "module": "<root>", "quant_config": "None (unquantized)", "prefix": "vision_tower",
        "fuse": False, "tp": 1, "load_weights": True, "first_call": False}
    assert again.summary_line().startswith("fxpass[vision_tower]: " + note.removeprefix(
        "fxpass.apply: "))
    assert again.to_dict()["already_applied_with"]["quant_config"] == "None (unquantized)"
    same.check()
    with torch.no_grad():
        assert torch.equal(model(X), before)
    # other prefix / fusion: named the same way
    with pytest.warns(UserWarning, match=r"with prefix='vision_tower', fuse=False; this call "
                                         r"asked for prefix='tower', fuse=True, "):
        fxpass.apply(model, None, prefix="tower", fuse=True, example_inputs=(X,))
    # the same settings (an equal config object): nothing to explain
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = fxpass.apply(model, None, prefix="vision_tower", example_inputs=(X,))
    assert plain.already_applied and plain.already_applied_note == ""
    assert plain.summary_line().startswith("fxpass[vision_tower]: already applied; nothing "
                                           "changed, ")
    same.check()


def test_apply_again_with_load_weights_after_an_apply_without():
    """load_weights=True the second time loads nothing either: the note says so, and the
    call still raises the not-loaded error."""
    model = _tower()
    fxpass.apply(model, None, first_call=True)
    with pytest.warns(UserWarning, match=r"with load_weights=False; this call asked for "
                                         r"load_weights=True, which needs the original"):
        again = fxpass.apply(model, None, load_weights=True)
    assert again.already_applied_with["first_call"] is True
    with pytest.raises(NotLoadedError, match=r"^embed: "), torch.no_grad():
        model(X)


def test_model_already_rewritten_by_fxpass_is_left_alone():
    model = _tower()
    fxpass.apply(model, None, load_weights=True, example_inputs=(X,))
    same = Unchanged(model)
    with torch.no_grad():
        before = model(X)
    again = fxpass.apply(model, None, load_weights=True, example_inputs=(X,))
    assert again.already_applied and again.replaced == [] and again.skipped == {}
    assert again.summary_line().startswith("fxpass[<root>]: already applied; nothing changed")
    same.check()
    with torch.no_grad():
        assert torch.equal(model(X), before)


def test_model_already_rewritten_keeps_its_refusals_listed():
    """Linears the first apply refused stay nn.Linear; the second apply says why."""
    class WithMHA(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(D, D)
            self.attn = nn.MultiheadAttention(D, 2, batch_first=True)

        def forward(self, x):
            return self.attn(self.proj(x), x, x, need_weights=False)[0]

    model = WithMHA().eval()
    first = fxpass.apply(model, None, load_weights=True, example_inputs=(X,))
    assert "attn.out_proj" in first.skipped
    again = fxpass.apply(model, None, load_weights=True, example_inputs=(X,))
    assert again.already_applied
    assert again.skipped == {"attn.out_proj": "left by the earlier fxpass.apply; applying again "
                                              "changes nothing"}


def test_model_partly_rewritten_by_the_vllm_walk():
    ref = _tower()
    model = copy.deepcopy(ref)
    _walk(model.layers[0], "tower.layers.0")
    walked = {n: m for n, m in model.named_modules() if is_vllm_linear(m)}
    assert set(walked) == {"layers.0.fc1", "layers.0.fc2"}
    report = fxpass.apply(model, None, prefix="tower", load_weights=True, example_inputs=(X,))
    assert sorted(report.replaced) == ["tower.embed", "tower.layers.1.fc1", "tower.layers.1.fc2"]
    assert report.skipped == {}
    assert all(model.get_submodule(n) is m for n, m in walked.items())  # kept, not rebuilt
    with torch.no_grad():
        torch.testing.assert_close(model(X), ref(X), atol=1e-4, rtol=0)


def test_model_fully_rewritten_by_the_vllm_walk_gives_an_empty_report():
    model = _tower()
    _walk(model, "tower")
    same = Unchanged(model)
    report = fxpass.apply(model, None, prefix="tower", load_weights=True, example_inputs=(X,))
    assert report.replaced == [] and report.skipped == {} and not report.already_applied
    same.check()


def test_meta_linears_with_load_weights():
    with torch.device("meta"):
        model = _tower()
    same = Unchanged(model)
    with pytest.raises(WeightLoadError, match=(
            r"^embed: load_weights=True needs real weights, but this linear is on the meta "
            r"device; materialise the model \(to_empty \+ load a checkpoint\) or use "
            r"load_weights=False and let vLLM's loader fill the layers$")):
        fxpass.apply(model, None, load_weights=True, example_inputs=(X.to("meta"),))
    same.check()


def test_mixed_devices_some_linears_on_meta():
    model = _tower()
    model.layers[1].fc2.to("meta")
    same = Unchanged(model)
    with pytest.raises(WeightLoadError, match=r"^layers\.1\.fc2: load_weights=True needs real "
                                              r"weights, but this linear is on the meta device"):
        fxpass.apply(model, None, load_weights=True, example_inputs=(X,))
    same.check()


class MixedDtypes(nn.Module):
    """An fp32 projection in front of a bf16 head, cast the HF way (weight.dtype)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)
        self.head = nn.Linear(D, D).to(torch.bfloat16)

    def forward(self, x):
        h = self.proj(x)
        return self.head(h.to(self.head.weight.dtype)).float()


def test_mixed_dtypes_each_layer_keeps_its_own_dtype():
    torch.manual_seed(0)
    model = MixedDtypes().eval()
    ref = copy.deepcopy(model)
    report = fxpass.apply(model, None, load_weights=True, example_inputs=(X,))
    assert sorted(report.replaced) == ["head", "proj"]
    assert model.proj.params_dtype == torch.float32 and model.head.params_dtype == torch.bfloat16
    assert "head.weight.dtype -> torch.bfloat16" in " ".join(f.detail for f in report.probes)
    with torch.no_grad():
        torch.testing.assert_close(model(X), ref(X), atol=1e-2, rtol=0)


def test_example_inputs_that_do_not_fit_the_forward_signature():
    model = _tower()
    same = Unchanged(model)
    with pytest.raises(UsageError, match=(
            r"^example inputs do not fit Tower\.forward: missing a required argument: "
            r"'hidden_states'; pass the arguments a real call would$")):
        fxpass.apply(model, None, load_weights=True, example_inputs={"pixel_values": X})
    with pytest.raises(UsageError, match=r"^example inputs do not fit Tower\.forward: too many "
                                         r"positional arguments"):
        fxpass.apply(model, None, load_weights=True, example_inputs=(X, X))
    same.check()


def test_example_inputs_the_model_cannot_run():
    for bad, why in [((X[..., :5],), "RuntimeError: mat1 and mat2 shapes cannot be multiplied"),
                     ((X.double(),), "RuntimeError: mat1 and mat2 must have the same dtype")]:
        model = _tower()
        same = Unchanged(model)
        with pytest.raises(UsageError) as info:
            fxpass.apply(model, None, load_weights=True, example_inputs=bad)
        msg = str(info.value)
        assert msg.startswith(f"fxpass.apply: Tower does not run on the example inputs ({why}")
        assert msg.endswith("pass example_inputs that its forward accepts, as a real call would "
                            "(kwargs dict, args tuple or (args, kwargs)), or none: apply then "
                            "traces at the first real call")
        same.check()


def test_example_inputs_of_the_wrong_kind():
    with pytest.raises(UsageError, match=r"^example_inputs must be a dict of keyword arguments, "
                                         r"a tuple of positional arguments or an \(args, kwargs\) "
                                         r"pair; got str$"):
        fxpass.apply(_tower(), example_inputs="pixel_values")


def test_no_example_inputs_when_insisting_on_tracing_now():
    """Without inputs apply traces at the first call; first_call=False refuses that."""
    same = Unchanged(_tower())
    with pytest.raises(UsageError, match=r"^fxpass\.apply\(first_call=False\) traces now, so it "
                                         r"needs example inputs for Tower: pass "
                                         r"example_inputs= as a real call of its forward would, "
                                         r"or let apply trace at the first call$"):
        fxpass.apply(same.model, first_call=False)
    same.check()


@pytest.mark.parametrize("inputs", ["none (sharded at the first call)", "example inputs"])
def test_tp_outside_a_tensor_parallel_group_of_that_size(inputs):
    same = Unchanged(_tower())
    x = None if inputs.startswith("none") else {"hidden_states": torch.randn(2, 5, D)}
    with pytest.raises(UsageError, match=r"^fxpass\.apply\(tp=2\): this process's vLLM "
                                         r"tensor-parallel group has 1 rank\(s\); shard inside "
                                         r"a vLLM engine with tensor_parallel_size=2, or start 2 "
                                         r"processes"):
        fxpass.apply(same.model, tp=2, example_inputs=x)
    same.check()


def test_first_call_with_example_inputs_is_a_contradiction():
    same = Unchanged(_tower())
    with pytest.raises(UsageError, match=r"^fxpass\.apply: first_call=True traces at the "
                                         r"model's first real call; do not pass "
                                         r"example_inputs or trace_result with it$"):
        fxpass.apply(same.model, first_call=True, example_inputs=(X,))
    same.check()


def test_meta_tower_stays_allowed():
    """The one failing Python run that is fine: meta values in vLLM's model init."""
    tower = zoo.build_tower("gemma4_vision", device="meta")
    report = fxpass.apply(tower, None, prefix="vision_tower")
    assert report.replaced and not report.weights_loaded


# ---------------------------------------------------------------------------- loader / CLI


def _cli(capsys, *argv):
    code = main(["diff", *map(str, argv)])
    err = capsys.readouterr().err
    return code, err


def test_cli_unknown_quant(capsys, clip_ckpt):
    code, err = _cli(capsys, clip_ckpt, "--tower", "encoder", "--quant", "bnb-nf3")
    assert code == 2
    assert ("fxpass diff: error: argument --quant: invalid choice: 'bnb-nf3' (choose from "
            "'none', 'bnb-nf4', 'bnb-fp4', 'bnb-int8')") in err


def test_tower_attribute_path_that_does_not_exist(capsys, clip_ckpt):
    expected = ("attribute path 'encodr': CLIPVisionModel at <root> has no submodule 'encodr'; "
                "its children are: embeddings, encoder, post_layernorm, pre_layrnorm")
    with pytest.raises(UsageError) as info:
        zoo.load_tower(clip_ckpt, "encodr")
    assert str(info.value) == expected
    with pytest.raises(UsageError, match=r"^attribute path 'encoder\.layers\.7': ModuleList at "
                                         r"encoder\.layers has no submodule '7'; its children "
                                         r"are: 0, 1$"):
        zoo.load_tower(clip_ckpt, "encoder.layers.7")
    with pytest.raises(UsageError, match=r"^attribute path 'encoder\.\.layers' is empty or has "
                                         r"an empty step; e\.g\. 'model\.vision_tower'$"):
        zoo.load_tower(clip_ckpt, "encoder..layers")
    code, err = _cli(capsys, clip_ckpt, "--tower", "encodr")
    assert code == 2 and f"fxpass diff: error: {expected}" in err


def test_checkpoint_directory_missing(capsys, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(UsageError, match=(
            rf"^checkpoint directory {missing} does not exist; write one with "
            r"write_tiny_gemma4_checkpoint\(path\) or pass a local model directory$")):
        zoo.load_tower(missing, "model.vision_tower")
    code, err = _cli(capsys, missing, "--tower", "model.vision_tower")
    assert code == 2 and f"fxpass diff: error: MODEL_DIR {missing} is not a directory" in err


def test_checkpoint_directory_not_hf(capsys, tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(UsageError, match=rf"^{tmp_path} has no config\.json; pass a directory "
                                         r"written by save_pretrained$"):
        zoo.load_tower(tmp_path, "model.vision_tower")
    code, err = _cli(capsys, tmp_path, "--tower", "model.vision_tower")
    assert code == 2
    assert (f"fxpass diff: error: MODEL_DIR {tmp_path} has no config.json (not a "
            "save_pretrained directory)") in err


@pytest.mark.parametrize("config,cause", [
    ("not json", "OSError: It looks like the config file at"),
    ({}, "ValueError: Unrecognized model in"),
    ({"model_type": "not_a_model"}, "ValueError: The checkpoint you are trying to load has "
                                    "model type `not_a_model`"),
], ids=["not-json", "no-model-type", "unknown-model-type"])
def test_checkpoint_config_transformers_cannot_read(capsys, tmp_path, config, cause):
    (tmp_path / "config.json").write_text(config if isinstance(config, str) else
                                          json.dumps(config))
    with pytest.raises(UsageError) as info:
        zoo.load_tower(tmp_path, "encoder")
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path}: reading config.json failed ({cause}")
    assert msg.endswith("pass a save_pretrained directory of an architecture transformers "
                        "implements (checkpoints are loaded offline with trust_remote_code="
                        "False: code shipped in a checkpoint never runs)")
    code, err = _cli(capsys, tmp_path, "--tower", "encoder")
    assert code == 2 and f"fxpass diff: error: {tmp_path}: reading config.json failed" in err


def test_checkpoint_without_weights(capsys, clip_ckpt, tmp_path):
    (tmp_path / "config.json").write_text((clip_ckpt / "config.json").read_text())
    with pytest.raises(UsageError) as info:
        zoo.load_tower(tmp_path, "encoder")
    assert str(info.value).startswith(
        f"{tmp_path}: loading the weights with AutoModel failed (OSError: Error no file named "
        "model.safetensors")


def test_input_file_that_does_not_match_the_tower(capsys, clip_ckpt, tmp_path):
    from safetensors.torch import save_file

    wrong_keys = tmp_path / "pixels.safetensors"
    save_file({"pixel_values": torch.randn(1, 3, 32, 32)}, str(wrong_keys))
    code, err = _cli(capsys, clip_ckpt, "--tower", "encoder", "--inputs", wrong_keys,
                     "--dtype", "float32")
    assert code == 2
    assert ("fxpass diff: error: example inputs do not fit CLIPEncoder.forward: missing a "
            "required argument: 'inputs_embeds'; pass the arguments a real call would") in err

    wrong_size = tmp_path / "embeds.safetensors"
    save_file({"inputs_embeds": torch.randn(1, 5, 7)}, str(wrong_size))  # wrong hidden size
    code, err = _cli(capsys, clip_ckpt, "--tower", "encoder", "--inputs", wrong_size,
                     "--dtype", "float32")
    assert code == 2
    assert ("fxpass diff: error: fxpass.apply: CLIPEncoder does not run on the example inputs "
            "(RuntimeError: ") in err
    assert "pass example_inputs that its forward accepts" in err


def test_input_file_missing_or_unreadable(capsys, clip_ckpt, tmp_path):
    code, err = _cli(capsys, clip_ckpt, "--tower", "encoder", "--inputs", tmp_path / "x.pt")
    assert code == 2 and f"fxpass diff: error: --inputs {tmp_path / 'x.pt'}: no such file" in err
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"definitely not a torch file")
    code, err = _cli(capsys, clip_ckpt, "--tower", "encoder", "--inputs", garbage)
    assert code == 2 and f"fxpass diff: error: --inputs {garbage}: cannot read it: " in err
    not_kwargs = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], not_kwargs)
    code, err = _cli(capsys, clip_ckpt, "--tower", "encoder", "--inputs", not_kwargs)
    assert code == 2 and (f"fxpass diff: error: --inputs {not_kwargs}: expected a dict of "
                          "keyword-argument tensors (or a list of such dicts)") in err


def test_input_file_pickle_is_refused_not_run(capsys, clip_ckpt, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(_Evil(str(marker)), protocol=2))
    code, err = _cli(capsys, clip_ckpt, "--tower", "encoder", "--inputs", path)
    assert code == 2 and "cannot read it: UnpicklingError" in err
    assert not marker.exists()


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_unknown_rule_name_to_disable():
    same = Unchanged(_tower())
    with pytest.raises(UsageError, match=r"^fxpass\.apply\(disable=\.\.\.\): unknown rule name\(s\) "
                                         r"'mm-atention'; the rules are: linear, "):
        fxpass.apply(same.model, disable=["mm-atention"])
    same.check()
