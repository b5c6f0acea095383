"""fxpass.zoo: tiny towers, their example inputs, and the tiny Gemma4 checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fxpass import zoo
from fxpass.errors import UsageError


@pytest.fixture(scope="module")
def towers() -> dict[str, nn.Module]:
    return {name: zoo.build_tower(name) for name in zoo.KNOWN_TOWERS}


def _run(tower: nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = tower(**inputs)
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def _expected_shapes(name: str, tower: nn.Module, inputs: dict, batch: int) -> dict[str, tuple]:
    cfg = tower.config
    if name == "gemma4_vision":
        # pooled tokens of all images, padding stripped: (sum of valid pooled tokens, hidden)
        valid = int((inputs["pixel_position_ids"] != -1).all(-1).sum())
        return {"last_hidden_state": (valid // cfg.pooling_kernel_size**2, cfg.hidden_size)}
    if name == "gemma4_audio":
        frames = inputs["input_features"].shape[1]
        t = -(-(-(-frames // 2)) // 2)  # two stride-2 convs: ceil(ceil(T/2)/2)
        return {"last_hidden_state": (batch, t, cfg.output_proj_dims), "attention_mask": (batch, t)}
    side = inputs["pixel_values"].shape[-1]
    tokens = (side // cfg.patch_size) ** 2 + (1 if name == "clip_vision" else 0)
    return {
        "last_hidden_state": (batch, tokens, cfg.hidden_size),
        "pooler_output": (batch, cfg.hidden_size),
    }


@pytest.mark.parametrize("size_index", [0, 1, 2])
@pytest.mark.parametrize("name", zoo.KNOWN_TOWERS)
def test_tiny_tower_runs_at_every_size(towers, name, size_index):
    tower = towers[name]
    batch = 2
    inputs = zoo.example_inputs(tower, size_index=size_index, batch=batch)
    out = _run(tower, inputs)
    shapes = {k: tuple(v.shape) for k, v in out.items()}
    assert shapes == _expected_shapes(name, tower, inputs, batch)
    for v in out.values():
        if v.is_floating_point():
            assert torch.isfinite(v).all()
            assert v.abs().sum() > 0


@pytest.mark.parametrize("name", zoo.KNOWN_TOWERS)
def test_sizes_differ_and_grow(towers, name):
    shapes = [
        tuple(next(iter(zoo.example_inputs(towers[name], size_index=i).values())).shape)
        for i in range(3)
    ]
    sizes = [torch.Size(s).numel() for s in shapes]
    assert sizes[0] < sizes[1] < sizes[2], shapes


def test_example_inputs_deterministic_and_keyed_on_seed(towers):
    tower = towers["gemma4_audio"]
    a = zoo.example_inputs(tower, seed=3)
    b = zoo.example_inputs(tower, seed=3)
    c = zoo.example_inputs(tower, seed=4)
    assert torch.equal(a["input_features"], b["input_features"])
    assert not torch.equal(a["input_features"], c["input_features"])


def test_gemma4_vision_inputs_follow_the_processor_layout(towers):
    cfg = towers["gemma4_vision"].config
    inputs = zoo.example_inputs(towers["gemma4_vision"], size_index=1, batch=1)
    pv, pos = inputs["pixel_values"], inputs["pixel_position_ids"]
    assert pv.shape[-1] == 3 * cfg.patch_size**2
    assert pv.shape[1] % cfg.pooling_kernel_size**2 == 0
    assert pos.dtype == torch.long
    pad = (pos == -1).all(-1)
    assert pad.any() and not pad[0, 0]  # index 1 carries padding at the end
    assert (pv[pad] == 0).all()
    assert pos[0, 1].tolist() == [1, 0]  # (x, y), x fastest


def test_tiny_towers_stay_tiny(towers):
    """What keeps the suite fast is size, checked as size (never timed: machines are noisy;
    `fxpass bench` measures time): a few tens of thousands of parameters, and outputs of a
    few thousand values at the largest example size, batch 2."""
    for name, tower in towers.items():
        assert sum(p.numel() for p in tower.parameters()) < 100_000, name
        out = _run(tower, zoo.example_inputs(tower, size_index=2, batch=2))
        hidden = out["last_hidden_state"] if isinstance(out, dict) else out[0]
        assert hidden.numel() < 20_000, (name, tuple(hidden.shape))


def test_tiny_gemma4_has_every_linear_kind(towers):
    def names(tower, cls_name):
        return {n.split(".")[-1] for n, m in tower.named_modules() if type(m).__name__ == cls_name}

    vision, audio = towers["gemma4_vision"], towers["gemma4_audio"]
    assert type(vision.patch_embedder.input_proj) is nn.Linear
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= names(
        vision, "Gemma4ClippableLinear"
    )
    assert {"ffw_layer_1", "ffw_layer_2", "q_proj", "post", "linear_start", "linear_end"} <= names(
        audio, "Gemma4ClippableLinear"
    )
    for path in (
        "subsample_conv_projection.input_proj_linear",
        "layers.0.self_attn.relative_k_proj",
        "output_proj",
    ):
        assert type(audio.get_submodule(path)) is nn.Linear, path
    assert isinstance(towers["siglip_vision"].head.attention, nn.MultiheadAttention)


def test_tiny_gemma4_clamps_are_active(towers):
    """A rewrite that drops ClippableLinear's clamps must change the output."""
    tower = zoo.build_tower("gemma4_vision")
    inputs = zoo.example_inputs(tower, size_index=2)
    ref = _run(tower, inputs)["last_hidden_state"]
    for m in tower.modules():
        if type(m).__name__ == "Gemma4ClippableLinear":
            m.use_clipped_linears = False
    assert not torch.allclose(ref, _run(tower, inputs)["last_hidden_state"])


def test_build_is_deterministic_dtype_consistent_and_keeps_caller_rng():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a = zoo.build_tower("clip_vision", seed=5)
    assert torch.equal(torch.rand(1), expected)
    b = zoo.build_tower("clip_vision", seed=5)
    c = zoo.build_tower("clip_vision", seed=6)
    h = zoo.build_tower("clip_vision", seed=5, dtype=torch.bfloat16)
    sa, sb, sc, sh = (m.state_dict() for m in (a, b, c, h))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert all(torch.equal(sa[k].to(sh[k].dtype), sh[k]) for k in sa)
    assert not a.training


def test_bf16_tower_gets_bf16_inputs():
    tower = zoo.build_tower("gemma4_audio", dtype=torch.bfloat16)
    inputs = zoo.example_inputs(tower, size_index=1)
    assert inputs["input_features"].dtype == torch.bfloat16
    assert inputs["attention_mask"].dtype == torch.bool
    out = _run(tower, inputs)["last_hidden_state"]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("name", zoo.KNOWN_TOWERS)
def test_default_size_builds_on_meta(name):
    tower = zoo.build_tower(name, size="default", device="meta", dtype=torch.bfloat16)
    params = list(tower.parameters())
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in params)
    assert sum(p.numel() for p in params) > 50_000_000  # the config class's real sizes
    inputs = zoo.example_inputs(tower, size_index=2)
    for v in inputs.values():
        if isinstance(v, torch.Tensor):
            assert v.is_meta
            assert v.dtype in (torch.bfloat16, torch.long, torch.bool)


def test_default_size_also_builds_under_a_meta_device_context():
    with torch.device("meta"):
        tower = zoo.build_tower("siglip_vision", size="default", device="meta")
    assert next(tower.parameters()).is_meta


def test_pixel_values_fallback_for_other_vision_towers():
    class Tower(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(image_size=16, num_channels=1, patch_size=4)
            self.proj = nn.Linear(16, 2, dtype=torch.float64)

        def forward(self, pixel_values):
            return pixel_values

    tower = Tower()
    inputs = zoo.example_inputs(tower, batch=3)
    assert set(inputs) == {"pixel_values"}
    assert inputs["pixel_values"].shape == (3, 1, 16, 16)
    assert inputs["pixel_values"].dtype == torch.float64
    with pytest.raises(UsageError, match="size_index=0 or pass inputs explicitly"):
        zoo.example_inputs(tower, size_index=1)


# -- tiny Gemma4 checkpoint ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return zoo.write_tiny_gemma4_checkpoint(tmp_path_factory.mktemp("gemma4") / "ckpt")


def test_checkpoint_files_and_config(checkpoint):
    assert (checkpoint / "model.safetensors").is_file()
    cfg = json.loads((checkpoint / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma4ForConditionalGeneration"]
    assert cfg["dtype"] == "bfloat16"
    assert cfg["vision_config"]["default_output_length"] == 70
    assert cfg["audio_config"]["subsampling_conv_channels"][0] == 128
    for key, value in zoo.TINY_GEMMA4_TOKEN_IDS.items():
        assert cfg[key] == value, key
    from safetensors import safe_open

    with safe_open(checkpoint / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"}


@pytest.mark.parametrize("tower_name", ["gemma4_vision", "gemma4_audio"])
def test_checkpoint_round_trips(checkpoint, tower_name):
    attr = zoo.GEMMA4_TOWER_ATTRS[tower_name]
    loaded = zoo.load_tower(checkpoint, attr, dtype=torch.float32)
    assert type(loaded).__name__ == {"gemma4_vision": "Gemma4VisionModel",
                                     "gemma4_audio": "Gemma4AudioModel"}[tower_name]
    assert not loaded.training
    # the in-memory model with its weights rounded as the checkpoint stores them
    model = zoo.build_tiny_gemma4(seed=0)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.to(torch.bfloat16))
    reference = zoo.resolve_attr(model, attr)
    for size_index in range(3):
        inputs = zoo.example_inputs(reference, size_index=size_index, batch=2)
        got, want = _run(loaded, inputs), _run(reference, inputs)
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), (size_index, k)


def test_load_tower_keeps_checkpoint_dtype_by_default(checkpoint):
    tower = zoo.load_tower(checkpoint, "model.audio_tower")
    assert next(tower.parameters()).dtype == torch.bfloat16


# -- errors -------------------------------------------------------------------------------------


def test_unknown_tower_name():
    with pytest.raises(UsageError, match="unknown tower 'resnet'.*gemma4_vision"):
        zoo.build_tower("resnet")
    with pytest.raises(UsageError, match="size must be 'tiny', 'small' or 'default'"):
        zoo.build_tower("clip_vision", size="huge")


def test_small_towers_have_rows_of_64_per_tp_rank():
    """size="small": the tiny structure (one layer) at widths where each row-parallel shard
    of a linear still holds 64 inputs at TP=2 (bitsandbytes' 4-bit block)."""
    for name in zoo.KNOWN_TOWERS:
        tower = zoo.build_tower(name, size="small")
        linears = [m for n, m in tower.named_modules() if isinstance(m, nn.Linear)
                   and any(k in n for k in ("self_attn", "mlp", "feed_forward"))]
        assert tower.config.hidden_size == 128 and tower.config.num_hidden_layers == 1
        assert linears and min(m.in_features for m in linears) >= 128


def test_unknown_tower_type_for_inputs():
    with pytest.raises(UsageError, match="no example inputs known for Linear.*pass inputs expl"):
        zoo.example_inputs(nn.Linear(2, 2))


def test_bad_size_index_and_batch(towers):
    with pytest.raises(UsageError, match="size_index must be 0, 1 or 2"):
        zoo.example_inputs(towers["clip_vision"], size_index=3)
    with pytest.raises(UsageError, match="batch must be a positive int"):
        zoo.example_inputs(towers["clip_vision"], batch=0)


def test_bad_attr_path_names_path_and_children(checkpoint):
    with pytest.raises(UsageError) as err:
        zoo.load_tower(checkpoint, "model.vision_towr")
    msg = str(err.value)
    assert "'model.vision_towr'" in msg and "'vision_towr'" in msg
    for child in ("audio_tower", "embed_vision", "language_model", "vision_tower"):
        assert child in msg
    with pytest.raises(
        UsageError, match=r"at model\.vision_tower\.encoder has no submodule 'layerz'.*layers"
    ):
        zoo.load_tower(checkpoint, "model.vision_tower.encoder.layerz")
    with pytest.raises(UsageError, match="empty step"):
        zoo.load_tower(checkpoint, "model..vision_tower")


def test_missing_checkpoint_dir(tmp_path):
    with pytest.raises(UsageError, match="does not exist.*write_tiny_gemma4_checkpoint"):
        zoo.load_tower(tmp_path / "nope", "model.vision_tower")
    with pytest.raises(UsageError, match="has no config.json"):
        zoo.load_tower(tmp_path, "model.vision_tower")


def test_import_stays_light():
    code = (
        "import sys, fxpass, fxpass.zoo; "
        "assert 'transformers' not in sys.modules and 'vllm' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
