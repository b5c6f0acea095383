"""Tiny, locally built HF towers and their example inputs.

Nothing here downloads: every model is built from a config with random weights, so tests, the
CLI demo, the CI numeric check and benchmarks run offline. transformers is imported inside the
functions only, so ``import fxpass`` stays light.

Towers (``KNOWN_TOWERS``), built with ``AutoModel.from_config`` as vLLM does:

- ``gemma4_vision``: ``Gemma4VisionModel``. Plain ``nn.Linear`` at
  ``patch_embedder.input_proj``; every encoder projection is a ``Gemma4ClippableLinear`` holding
  ``.linear``. The tiny config turns on the two optional features the default config leaves off
  (``use_clipped_linears`` with finite, active clamp bounds; ``standardize``), so a pass that drops
  a clamp changes the output.
- ``gemma4_audio``: ``Gemma4AudioModel`` (``.post_init()`` after ``from_config``, as vLLM does).
  ClippableLinear in feed-forward / attention / lconv1d; plain ``nn.Linear`` in
  ``subsample_conv_projection.input_proj_linear``, ``self_attn.relative_k_proj`` and
  ``output_proj`` (the only one with a bias).
- ``siglip_vision``: ``SiglipVisionModel`` with its attention-pooling ``head`` (an
  ``nn.MultiheadAttention``, whose ``out_proj`` is an ``nn.Linear`` subclass that is never called:
  ``F.multi_head_attention_forward`` reads its weight).
- ``clip_vision``: ``CLIPVisionModel``.

Tower attribute paths in a loaded ``Gemma4ForConditionalGeneration`` (see :func:`load_tower`):
``model.vision_tower``, ``model.audio_tower`` (also ``model.embed_vision`` /
``model.embed_audio``, the projections into the text model, and ``model.language_model``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from fxpass.errors import UsageError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = [
    "KNOWN_TOWERS",
    "TINY_GEMMA4_TOKEN_IDS",
    "GEMMA4_TOWER_ATTRS",
    "tower_config",
    "build_tower",
    "example_inputs",
    "has_input_builder",
    "input_builders",
    "build_tiny_gemma4",
    "write_tiny_gemma4_checkpoint",
    "load_tower",
    "resolve_attr",
]

KNOWN_TOWERS: tuple[str, ...] = ("gemma4_vision", "gemma4_audio", "siglip_vision", "clip_vision")

# Where the towers sit in a Gemma4ForConditionalGeneration (HF, not vLLM: vLLM's own model class
# maps the checkpoint's `model.vision_tower.*` onto `vision_tower.*`).
GEMMA4_TOWER_ATTRS: dict[str, str] = {
    "gemma4_vision": "model.vision_tower",
    "gemma4_audio": "model.audio_tower",
}

# Special-token ids of the tiny checkpoint (vocab 320: 0 pad, 1 eos, 2 bos, 256.. specials), so a
# locally built tokenizer can use the same ids.
TINY_GEMMA4_TOKEN_IDS: dict[str, int] = {
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
    "boi_token_id": 256,  # <|image>
    "eoi_token_id": 257,  # <image|>
    "image_token_id": 258,  # <|image|>
    "boa_token_id": 259,  # <|audio>
    "eoa_token_index": 260,  # <audio|>
    "audio_token_id": 261,  # <|audio|>
    "video_token_id": 262,  # <|video|>
}
_TINY_VOCAB = 320

# Active (finite) clamp bounds for the tiny Gemma4 towers' ClippableLinears: measured on the
# tiny towers, +-2.0 clips 0-5% of a projection's inputs and +-1.0 clips 3-13% of the outputs of
# most projections.
_TINY_CLIP_IN = 2.0
_TINY_CLIP_OUT = 1.0
# Tiny towers use a larger init than HF's 0.02 so activations are not vanishingly small: with
# 0.02 and hidden 32 a linear's output is ~0.1 and quantization errors would hide in the noise.
_TINY_INIT_RANGE = 0.1


# --------------------------------------------------------------------------------------------
# configs and builders
# --------------------------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if name not in KNOWN_TOWERS:
        raise UsageError(f"unknown tower {name!r}; pick one of {', '.join(KNOWN_TOWERS)}")


# "small": the tiny towers' structure, one layer, at widths where each linear's rows hold at
# least 64 inputs per tensor-parallel rank (TP=2): bitsandbytes' CPU 4-bit quantizer is
# inaccurate on rows shorter than its 64-value block (nf4 on a random 32-wide weight: ~8-13
# dB instead of ~20.7 dB), which would swamp any comparison of quantized towers.
_SMALL = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 1,
          "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 32}


def tower_config(name: str, size: str = "tiny") -> PretrainedConfig:
    """The config `build_tower(name, size=size)` builds from (a fresh object each call)."""
    _check_name(name)
    if size not in ("tiny", "small", "default"):
        raise UsageError(f"size must be 'tiny', 'small' or 'default', got {size!r}")
    if size == "small":
        config = tower_config(name, "tiny")
        for key, value in _SMALL.items():
            if hasattr(config, key):
                setattr(config, key, value)
        return config
    import transformers as tf

    tiny = size == "tiny"
    if name == "gemma4_vision":
        if not tiny:
            return tf.Gemma4VisionConfig()
        return tf.Gemma4VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
            patch_size=4,  # patch vectors of 3*4*4 = 48
            position_embedding_size=64,
            pooling_kernel_size=3,
            use_clipped_linears=True,
            standardize=True,
            initializer_range=_TINY_INIT_RANGE,
        )
    if name == "gemma4_audio":
        if not tiny:
            return tf.Gemma4AudioConfig()
        return tf.Gemma4AudioConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            # [0] = 128 ties the mel-bin count to HF's 128-mel feature extractor (the projection
            # input is (channels[0] // 4) * channels[1]); [1] only sets the projection's width.
            subsampling_conv_channels=[128, 8],
            conv_kernel_size=5,
            output_proj_dims=48,  # differs from hidden so in/out swaps show up as shape errors
            initializer_range=_TINY_INIT_RANGE,
        )
    if name == "siglip_vision":
        if not tiny:
            return tf.SiglipVisionConfig()
        return tf.SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    # clip_vision
    if not tiny:
        return tf.CLIPVisionConfig()
    return tf.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )


def _set_tiny_clip_bounds(tower: nn.Module) -> None:
    """Make the ClippableLinears' clamps active, so losing one during a rewrite is visible."""
    with torch.no_grad():
        for module in tower.modules():
            if type(module).__name__ == "Gemma4ClippableLinear" and module.use_clipped_linears:
                module.input_min.fill_(-_TINY_CLIP_IN)
                module.input_max.fill_(_TINY_CLIP_IN)
                module.output_min.fill_(-_TINY_CLIP_OUT)
                module.output_max.fill_(_TINY_CLIP_OUT)


def _set_tiny_standardize(tower: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial std_bias / std_scale (HF initialises them to 0 / 1, a no-op)."""
    if getattr(tower.config, "standardize", False) and hasattr(tower, "std_bias"):
        with torch.no_grad():
            n = tower.std_bias.numel()
            tower.std_bias.copy_(0.1 * torch.randn(n, generator=generator))
            tower.std_scale.copy_(1.0 + 0.1 * torch.randn(n, generator=generator))


def _set_random_biases(model: nn.Module, generator: torch.Generator) -> None:
    """Non-zero linear biases (HF initialises them to 0): a dropped bias must show."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Linear) and mod.bias is not None:
                mod.bias.copy_(_TINY_INIT_RANGE * torch.randn(mod.bias.shape, generator=generator))


def _from_config(config: PretrainedConfig, name: str) -> nn.Module:
    from transformers import AutoModel

    tower = AutoModel.from_config(config)
    if name == "gemma4_audio":
        # vLLM does this too: post_init fills buffers absent from checkpoints (inv_timescales, ...)
        tower.post_init()
    return tower


def build_tower(
    name: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    size: str = "tiny",
    seed: int = 0,
) -> nn.Module:
    """Build one of `KNOWN_TOWERS` with random weights, in eval mode.

    Weights are drawn in float32 on the CPU from `seed` and then cast/moved, so one seed gives the
    same weights (rounded) in every dtype and on every device; the caller's RNG state is left
    untouched. `size="small"` is the tiny structure (one layer) at widths bitsandbytes' CPU
    4-bit quantizer handles well, also per rank at TP=2. `device="meta"` builds directly on
    the meta device (no memory, no init cost) — the
    way to get `size="default"` towers quickly for speed checks of the pass itself.
    """
    config = tower_config(name, size)
    device = torch.device(device)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise UsageError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if device.type == "meta":
            with torch.device("meta"):
                tower = _from_config(config, name)
        else:
            with torch.device("cpu"):  # an ambient torch.device("meta") context must not win
                tower = _from_config(config, name)
            if size in ("tiny", "small"):
                _set_tiny_clip_bounds(tower)
                _set_tiny_standardize(tower, torch.Generator().manual_seed(seed + 1))
                _set_random_biases(tower, torch.Generator().manual_seed(seed + 2))
    return tower.to(device=device, dtype=dtype).eval()


# --------------------------------------------------------------------------------------------
# example inputs
# --------------------------------------------------------------------------------------------

# One input builder per HF class name: (tower, config, size_index, batch, generator) -> kwargs.
# Builders make CPU float32 / integer tensors; `example_inputs` casts and moves them.
InputBuilder = Callable[[nn.Module, Any, int, int, torch.Generator], dict[str, Any]]

# Gemma4 vision, in pooling kernels: (grid width, grid height, padding kernels). With k=3 that is
# 6x6 = 36 patches, 9x6 = 54 (+18 padding = 72), 12x9 = 108. Index 1 carries padding rows
# (position -1, zero pixels) as the image processor emits for images below the patch budget.
_GEMMA4_GRIDS: tuple[tuple[int, int, int], ...] = ((2, 2, 0), (3, 2, 2), (4, 3, 0))
# Gemma4 audio: (mel frames, valid frames). Index 1 has a padded tail (mask False, features 0).
_GEMMA4_AUDIO_FRAMES: tuple[tuple[int, int], ...] = ((48, 48), (96, 80), (200, 200))
# Image-size multipliers for pixel_values towers (index 0 = the config's image_size).
_IMAGE_SCALES: tuple[float, ...] = (1.0, 1.5, 2.0)


def _gemma4_vision_inputs(tower, config, size_index, batch, gen) -> dict[str, Any]:
    k = config.pooling_kernel_size
    kw, kh, pad = _GEMMA4_GRIDS[size_index]
    width, height = kw * k, kh * k  # pool-aligned, so every pooled token is whole
    n_patches = (kw * kh + pad) * k * k  # a multiple of k**2, as the pooler requires
    if max(width, height) > config.position_embedding_size:
        raise UsageError(
            f"position_embedding_size={config.position_embedding_size} is too small for a "
            f"{width}x{height} patch grid; pass inputs explicitly"
        )
    dim = 3 * config.patch_size**2
    n_valid = width * height
    pixel_values = torch.zeros(batch, n_patches, dim)
    pixel_values[:, :n_valid] = torch.rand(batch, n_valid, dim, generator=gen)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    grid = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)  # (x, y), row-major like HF
    positions = torch.full((batch, n_patches, 2), -1, dtype=torch.long)
    positions[:, :n_valid] = grid
    return {"pixel_values": pixel_values, "pixel_position_ids": positions}


def _gemma4_audio_inputs(tower, config, size_index, batch, gen) -> dict[str, Any]:
    frames, valid = _GEMMA4_AUDIO_FRAMES[size_index]
    # the mel-bin count is implied by the projection: ceil(ceil(F/2)/2) == channels[0] // 4
    n_mels = config.subsampling_conv_channels[0] // 4 * 4
    features = torch.randn(batch, frames, n_mels, generator=gen)
    mask = torch.zeros(batch, frames, dtype=torch.bool)
    mask[:, :valid] = True
    features = features * mask[..., None]  # the feature extractor zeroes padded frames
    return {"input_features": features, "attention_mask": mask}


def _accepts(tower: nn.Module, arg: str) -> bool:
    try:
        return arg in inspect.signature(tower.forward).parameters
    except (TypeError, ValueError):
        return False


def _pixel_inputs(tower, config, size_index, batch, gen) -> dict[str, Any]:
    """General rule for HF vision towers: square `pixel_values` at the config's image size."""
    image_size = config.image_size
    if isinstance(image_size, (list, tuple)):
        if len(set(image_size)) != 1:
            raise UsageError(f"non-square image_size {image_size!r}; pass inputs explicitly")
        image_size = image_size[0]
    patch = getattr(config, "patch_size", 1)
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    interpolate = _accepts(tower, "interpolate_pos_encoding")
    if size_index and not interpolate:
        raise UsageError(
            f"{type(tower).__name__} takes only image_size={image_size} (no "
            "interpolate_pos_encoding); use size_index=0 or pass inputs explicitly"
        )
    side = max(patch, round(image_size * _IMAGE_SCALES[size_index] / patch) * patch)
    inputs: dict[str, Any] = {
        "pixel_values": torch.randn(batch, config.num_channels, side, side, generator=gen)
    }
    if interpolate:
        # Always passed (also at the native size, where HF takes its no-interpolation early
        # return), so every size_index calls the tower with the same keyword set.
        inputs["interpolate_pos_encoding"] = True
    return inputs


_INPUT_BUILDERS: dict[str, InputBuilder] = {
    "Gemma4VisionModel": _gemma4_vision_inputs,
    "Gemma4AudioModel": _gemma4_audio_inputs,
    "SiglipVisionModel": _pixel_inputs,
    "CLIPVisionModel": _pixel_inputs,
}


def input_builders() -> tuple[str, ...]:
    """The tower classes the built-in input table knows by name."""
    return tuple(_INPUT_BUILDERS)


def has_input_builder(tower: nn.Module) -> bool:
    """True when the built-in table has a builder for this tower's class (or a base class)
    and it has a ``.config``: ``fxpass.apply`` without inputs then traces on them at once.
    The generic pixel rule of :func:`example_inputs` is a guess, not a known builder: a tower
    only it fits is traced at its first real call instead."""
    return getattr(tower, "config", None) is not None and any(
        cls.__name__ in _INPUT_BUILDERS for cls in type(tower).__mro__)


def _float_param(module: nn.Module) -> Tensor | None:
    for t in module.parameters():
        if t.is_floating_point():
            return t
    for t in module.buffers():
        if t.is_floating_point():
            return t
    return None


def example_inputs(
    tower: nn.Module, *, size_index: int = 0, batch: int = 1, seed: int = 0
) -> dict[str, Any]:
    """Keyword arguments for `tower(**inputs)`, from the tower's own config.

    `size_index` 0, 1, 2 give three different valid sizes (0 the smallest), so shape-specialised
    graphs can be tested against other shapes; for Gemma4, index 1 also carries padding (patches
    at position -1 / masked audio frames), the data-dependent path. Float tensors take the dtype
    and device of the tower's first floating parameter (meta included). Towers whose forward
    takes `interpolate_pos_encoding` (SigLIP, CLIP) get it as True at every size: needed away
    from the native image size, and one keyword set for all sizes.
    """
    if size_index not in (0, 1, 2):
        raise UsageError(f"size_index must be 0, 1 or 2, got {size_index!r}")
    if not isinstance(batch, int) or batch < 1:
        raise UsageError(f"batch must be a positive int, got {batch!r}")
    config = getattr(tower, "config", None)
    builder = None
    for cls in type(tower).__mro__:
        builder = _INPUT_BUILDERS.get(cls.__name__)
        if builder is not None:
            break
    if builder is None and all(hasattr(config, a) for a in ("image_size", "num_channels")):
        builder = _pixel_inputs
    if builder is None:
        raise UsageError(
            f"no example inputs known for {type(tower).__name__} (known: "
            f"{', '.join(_INPUT_BUILDERS)}, or any tower whose .config has image_size and "
            "num_channels); pass inputs explicitly"
        )
    if config is None:
        raise UsageError(
            f"{type(tower).__name__} has no .config to size example inputs from; "
            "pass inputs explicitly"
        )
    ref = _float_param(tower)
    dtype = ref.dtype if ref is not None else torch.float32
    device = ref.device if ref is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(seed)
    inputs = builder(tower, config, size_index, batch, gen)
    return {
        k: (v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
            if isinstance(v, Tensor) else v)
        for k, v in inputs.items()
    }


# --------------------------------------------------------------------------------------------
# tiny Gemma4 multimodal checkpoint
# --------------------------------------------------------------------------------------------


def _tiny_gemma4_config(text_kv_heads: int = 1) -> Any:
    import transformers as tf

    text = tf.Gemma4TextConfig(
        vocab_size=_TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"],  # one of each; HF forces the last full
        num_attention_heads=2,
        num_key_value_heads=text_kv_heads,
        head_dim=32,
        global_head_dim=32,  # default 512 would dwarf the rest
        max_position_embeddings=1024,
        sliding_window=64,
        vocab_size_per_layer_input=_TINY_VOCAB,
        hidden_size_per_layer_input=16,
        pad_token_id=TINY_GEMMA4_TOKEN_IDS["pad_token_id"],
        eos_token_id=TINY_GEMMA4_TOKEN_IDS["eos_token_id"],
        bos_token_id=TINY_GEMMA4_TOKEN_IDS["bos_token_id"],
    )
    vision = tf.Gemma4VisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        patch_size=16,  # the real value: the image processor reads it
        position_embedding_size=1024,
        pooling_kernel_size=3,
    )
    vision.default_output_length = 70  # vLLM sizes its image budget from this
    audio = tf.Gemma4AudioConfig(
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        subsampling_conv_channels=[128, 32],  # [0] must be 128 (128 mel bins)
        output_proj_dims=64,
    )
    top_level = ("pad_token_id", "eos_token_id", "bos_token_id")
    ids = {k: v for k, v in TINY_GEMMA4_TOKEN_IDS.items() if k not in top_level}
    config = tf.Gemma4Config(text_config=text, vision_config=vision, audio_config=audio, **ids)
    for k in top_level:  # on the top-level config too, where generate() and vLLM look first
        setattr(config, k, TINY_GEMMA4_TOKEN_IDS[k])
    return config


def build_tiny_gemma4(*, seed: int = 0, text_kv_heads: int = 1) -> nn.Module:
    """The tiny random `Gemma4ForConditionalGeneration` (float32, eval) that the checkpoint holds.

    ``text_kv_heads=2``: a variant whose text model's KV heads split over two tensor-parallel
    ranks (with one, vLLM replicates it per rank, which vllm-bnb-plugin 0.0.3's loader cannot
    load: an AssertionError in ``load_qkv_weight``, with or without fxpass); its weights are
    other random draws.

    The checkpoint stores its weights rounded to bfloat16. Loading recomputes non-persistent
    buffers (the vision rotary `inv_freq`) in float32, while `model.to(torch.bfloat16)` would round
    them too: to reproduce a loaded tower exactly, round only `state_dict()` entries.
    """
    from transformers import Gemma4ForConditionalGeneration

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gemma4ForConditionalGeneration(_tiny_gemma4_config(text_kv_heads))
    _set_random_biases(model, torch.Generator().manual_seed(seed + 2))
    return model.eval()


def write_tiny_gemma4_checkpoint(path: str | Path, *, seed: int = 0,
                                 text_kv_heads: int = 1) -> Path:
    """Save the tiny Gemma4 multimodal model (bfloat16 safetensors + config.json) to `path`.

    Text 2 layers / vision 1 / audio 1, hidden 64: small enough for vLLM-CPU end-to-end runs.
    Special-token ids are `TINY_GEMMA4_TOKEN_IDS`; no tokenizer or processor is written.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path} exists and is not a directory; pass a directory path")
    path.mkdir(parents=True, exist_ok=True)
    model = build_tiny_gemma4(seed=seed, text_kv_heads=text_kv_heads).to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(path)
    return path


def _auto_class_for(config: Any) -> Any:
    """The first Auto class whose mapping knows the config type (ImageTextToText first)."""
    import transformers as tf

    for name in ("AutoModelForImageTextToText", "AutoModelForCausalLM", "AutoModel"):
        auto = getattr(tf, name)
        if type(config) in auto._model_mapping:
            return auto
    raise UsageError(
        f"no transformers Auto class loads a {type(config).__name__}; load the model yourself"
    )


def resolve_attr(root: nn.Module, attr: str) -> nn.Module:
    """`root.<attr>` for a dotted path; a wrong step is a UsageError listing the children there."""
    if not attr or any(not part for part in attr.split(".")):
        raise UsageError(
            f"attribute path {attr!r} is empty or has an empty step; e.g. 'model.vision_tower'"
        )
    node = root
    walked: list[str] = []
    for part in attr.split("."):
        child = getattr(node, part, None)
        if not isinstance(child, nn.Module):
            where = ".".join(walked) or "<root>"
            children = sorted(name for name, _ in node.named_children())
            raise UsageError(
                f"attribute path {attr!r}: {type(node).__name__} at {where} has no submodule "
                f"{part!r}; its children are: {', '.join(children) or '(none)'}"
            )
        node = child
        walked.append(part)
    return node


def load_tower(model_dir: str | Path, attr: str, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a local checkpoint and return the submodule at dotted path `attr` (eval mode).

    For Gemma4ForConditionalGeneration the towers are at `model.vision_tower` and
    `model.audio_tower`. `dtype=None` keeps the checkpoint's dtype. Loads offline and with
    `trust_remote_code=False`: only architectures transformers itself implements.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UsageError(
            f"checkpoint directory {model_dir} does not exist; write one with "
            "write_tiny_gemma4_checkpoint(path) or pass a local model directory"
        )
    if not (model_dir / "config.json").is_file():
        raise UsageError(
            f"{model_dir} has no config.json; pass a directory written by save_pretrained"
        )
    from transformers import AutoConfig

    def not_loadable(what: str, e: Exception) -> UsageError:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return UsageError(
            f"{model_dir}: {what} failed ({type(e).__name__}: {first}); pass a save_pretrained "
            "directory of an architecture transformers implements (checkpoints are loaded "
            "offline with trust_remote_code=False: code shipped in a checkpoint never runs)")

    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False,
                                            local_files_only=True)
    except Exception as e:  # noqa: BLE001 - not JSON, no model_type, custom code, ...
        raise not_loadable("reading config.json", e) from e
    auto = _auto_class_for(config)
    try:
        model = auto.from_pretrained(
            model_dir,
            dtype=dtype if dtype is not None else "auto",
            trust_remote_code=False,
            local_files_only=True,
        )
    except Exception as e:  # noqa: BLE001 - missing / mismatched weight files, ...
        raise not_loadable(f"loading the weights with {auto.__name__}", e) from e
    return resolve_attr(model, attr).eval()
