"""A catalogue of tiny random-config HF vision/audio towers and the ways HF users call them.

Independent reference for the tower tests: only transformers and torch, never fxpass. Every
tower is built from its class's *default* config, made tiny by one generic :func:`shrink` that
walks the config's attributes by name (hidden sizes, layers, heads, image / patch sizes, ...);
``HINTS`` holds the few per-class corrections the generic shrink cannot know, each with why.

- ``TOWERS``: :class:`Tower` entries (>= 24 classes, incl. Gemma4VisionModel, Gemma4AudioModel,
  SiglipVisionModel, CLIPVisionModel) that build and run on CPU in float32.
- ``Tower.inputs(tower, size_index, batch)``: example keyword inputs at three sizes (0, 1, 2) and
  batch 1 or 2, from the tower's own config.
- ``Tower.calls(tower, size_index, batch)``: the call forms (:class:`Call`): ``positional``,
  ``keyword``, ``omitted_defaults``, ``explicit_defaults``, ``other_branch:*`` (a branch the
  keyword call does not take) and ``submodule:<path>`` (an inner module called directly with the
  inputs a forward hook saw during a real tower run).
- :func:`compare`: max abs difference of two HF outputs, leaf by leaf, same structure asserted.
- :func:`sweep`: every vision/audio encoder class transformers exports, built from a shrunk
  default config and run once (what ``tools/tower_catalogue.py --sweep`` prints).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "Call",
    "Hint",
    "Tower",
    "TOWERS",
    "NAMED",
    "HINTS",
    "shrink",
    "compare",
    "by_name",
    "sweep",
    "discover",
]

# The four towers the issues name: they must always be in the catalogue.
NAMED: tuple[str, ...] = ("Gemma4VisionModel", "Gemma4AudioModel", "SiglipVisionModel",
                          "CLIPVisionModel")

# Target sizes of the generic shrink.
HIDDEN = 32
FFN = 64
LAYERS = 2
HEADS = 2
HEAD_DIM = 16
IMAGE = 32
PATCH = 8
# A larger init than HF's 0.02: with hidden 32 a linear's output would otherwise be ~0.1 and
# numeric differences of a rewritten tower could hide in the noise.
INIT_RANGE = 0.1


# --------------------------------------------------------------------------------------------
# call forms
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Call:
    """One way to call a tower: ``module.get_submodule(target_path)(*args, **kwargs)``.

    ``target_path`` is ``""`` for the tower itself. For a ``submodule:*`` call, ``seen`` is the
    output the module produced inside the real tower run its inputs were captured from.
    """

    name: str
    target_path: str
    args: tuple
    kwargs: dict
    seen: Any = dataclasses.field(default=None, compare=False, repr=False)

    def __call__(self, module: nn.Module) -> Any:
        return module.get_submodule(self.target_path)(*self.args, **self.kwargs)


# --------------------------------------------------------------------------------------------
# generic shrink
# --------------------------------------------------------------------------------------------

_KEEP = object()


def _cap(limit: int) -> Callable[[int], int]:
    return lambda v: min(v, limit)


# (name pattern, rule for an int) in priority order; the first pattern that matches decides.
# Lists / tuples of ints get the rule element-wise (depths, hidden_sizes, conv_dim, ...).
_RULES: tuple[tuple[str, Callable[[int], int]], ...] = (
    (r"head_dim$", _cap(HEAD_DIM)),
    (r"(key_value_heads|kv_heads)$", _cap(HEADS)),
    (r"heads$", _cap(HEADS)),
    (r"(^|_)(depth|depths|layers|num_blocks)$", _cap(LAYERS)),
    (r"(intermediate_size|ffn_dim|mlp_dim|intermediate_dim|ffn_size|ff_dim)$", _cap(FFN)),
    (r"(hidden_size|hidden_sizes|hidden_dim|d_model|embed_dim|embed_dims|_dim|_dims|^dim|"
     r"^dims|^width|_width|projection_size|channel_size)$", _cap(HIDDEN)),
    (r"(image_size|img_size)$", _cap(IMAGE)),
    (r"patch_size$", _cap(PATCH)),
    (r"window_size$", _cap(4)),
    (r"num_experts$", _cap(4)),
)
# Lists of layer indices (Qwen2.5-VL fullatt_block_indexes, Mllama intermediate_layers_indices):
# clamped into the shrunk layer range.
_INDEX_LISTS = r"(indices|indexes|layer_ids)$"


def _shrink_value(name: str, value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return _KEEP
    if _is_config(value):
        return shrink(value)
    if re.search(_INDEX_LISTS, name) and isinstance(value, (list, tuple)) and value and all(
            isinstance(v, int) for v in value):
        return type(value)(sorted({min(v, LAYERS - 1) for v in value}))
    for pattern, rule in _RULES:
        if not re.search(pattern, name):
            continue
        if isinstance(value, int):
            return rule(value)
        if (isinstance(value, (list, tuple)) and value
                and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            return type(value)(rule(v) for v in value)
        return _KEEP
    return _KEEP


def _is_config(obj: Any) -> bool:
    from transformers import PretrainedConfig

    return isinstance(obj, PretrainedConfig)


def _init_params(config_cls: type) -> set[str]:
    try:
        params = inspect.signature(config_cls.__init__).parameters
    except (TypeError, ValueError):
        return set()
    return {n for n, p in params.items()
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n != "self"}


def shrink(config: Any, overrides: dict[str, Any] | None = None) -> Any:
    """A tiny copy of `config` (a config object or class; a class means its default config).

    Walks the attributes the config class's ``__init__`` takes and caps them by name (``_RULES``):
    hidden sizes to 32, feed-forward to 64, layers / depths to 2, heads to 2, head_dim 16, image
    32, patch 8, window 4; sub-configs recursively. The config is rebuilt through its
    constructor, so derived attributes (Swin's hidden_size, ...) are recomputed. `overrides`
    (a ``HINTS`` entry's config) win over the generic rules; a dict value for a sub-config is
    merged into that sub-config's shrink.
    """
    if isinstance(config, type):
        config = config()
    cls = type(config)
    overrides = dict(overrides or {})
    kwargs: dict[str, Any] = {}
    for name in sorted(_init_params(cls)):
        if not hasattr(config, name):
            continue
        value = getattr(config, name)
        if name in overrides and isinstance(overrides[name], dict) and _is_config(value):
            kwargs[name] = shrink(value, overrides.pop(name))
            continue
        new = _shrink_value(name, value)
        if new is not _KEEP and new != value:
            kwargs[name] = new
    kwargs.update(overrides)
    # keep heads dividing the hidden size and kv heads dividing the heads
    return cls(**{k: v for k, v in _reconcile(kwargs).items()})


def _reconcile(kw: dict[str, Any]) -> dict[str, Any]:
    heads = kw.get("num_attention_heads")
    kv = kw.get("num_key_value_heads")
    if isinstance(heads, int) and isinstance(kv, int) and heads % kv:
        kw["num_key_value_heads"] = math.gcd(heads, kv)
    return kw


# --------------------------------------------------------------------------------------------
# hints: what the generic shrink / generic inputs cannot know
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Hint:
    """Per-class corrections. `config`: overrides for :func:`shrink`; `inputs`: name of an input
    builder (``_BUILDERS``) when the generic choice is wrong; `sizes`: how many distinct input
    sizes the class accepts (1 when its input length is fixed); `no_branch`: ``other_branch:*``
    forms HF never takes for this class; `init`: a post-build tweak; `why`: the reason, shown
    in the table."""

    why: str
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    inputs: str | None = None
    sizes: int | None = None
    init: Callable[[nn.Module], None] | None = None
    no_branch: tuple[str, ...] = ()  # other_branch:* forms HF never takes for this class


def _gemma4_clip_bounds(tower: nn.Module) -> None:
    """Active (finite) clamp bounds in every Gemma4ClippableLinear, so dropping one shows."""
    with torch.no_grad():
        for mod in tower.modules():
            if type(mod).__name__ == "Gemma4ClippableLinear" and mod.use_clipped_linears:
                mod.input_min.fill_(-2.0)
                mod.input_max.fill_(2.0)
                mod.output_min.fill_(-1.0)
                mod.output_max.fill_(1.0)


HINTS: dict[str, Hint] = {
    "ConvNextModel": Hint(
        why="the default layer scale (1e-6) scales each block's MLP output to ~1e-6 of the "
            "residual: its linears would not show in the output (nf4 or not); 1.0 here",
        config={"layer_scale_init_value": 1.0}),
    "Gemma4VisionModel": Hint(
        why="inputs are pre-patchified (pixel_values (B, N, 3*p*p) + pixel_position_ids, "
            "padding at -1); clipped linears turned on (default off) so their clamps are "
            "exercised",
        config={"use_clipped_linears": True, "standardize": True, "patch_size": 4},
        inputs="gemma4_vision", init=_gemma4_clip_bounds),
    "Gemma4AudioModel": Hint(
        why="mel-bin count is implied by subsampling_conv_channels[0] (128) and there is no "
            "num_mel_bins attribute; output_proj_dims kept apart from hidden (48)",
        config={"output_proj_dims": 48}, inputs="gemma4_audio", init=_gemma4_clip_bounds),
    "WhisperEncoder": Hint(
        why="input length is fixed at 2*max_source_positions frames (checked in forward); "
            "shrunk to 32 frames",
        config={"max_source_positions": 16}, inputs="features_cf_fixed", sizes=1),
    "Qwen2AudioEncoder": Hint(
        why="Whisper-style fixed input length 2*max_source_positions; its attention_mask is "
            "the 4D additive mask over the pooled frames that Qwen2AudioForConditionalGeneration "
            "builds, not a (B, T) feature mask",
        config={"max_source_positions": 16}, inputs="qwen2_audio", sizes=1),
    "ASTModel": Hint(
        why="input (B, max_length, num_mel_bins) has a fixed length (absolute positions)",
        config={"max_length": 32, "num_mel_bins": 16}, inputs="ast", sizes=1),
    "MllamaVisionModel": Hint(
        why="vision_output_dim must be hidden*(len(intermediate_layers_indices)+1); tiled "
            "inputs with aspect-ratio ids",
        config={"vision_output_dim": HIDDEN * 3, "intermediate_layers_indices": [0, 1],
                "num_global_layers": 1},
        inputs="mllama", sizes=1),
    "Siglip2VisionModel": Hint(
        why="navit-style inputs (patches + pixel_attention_mask + spatial_shapes); num_patches "
            "sizes the position grid (kept a square: 16 = 4x4)",
        config={"num_patches": 16}, inputs="siglip2"),
    "Qwen2_5_VisionTransformerPretrainedModel": Hint(
        why="window_size is in pixels and must cover spatial_merge_size*patch_size (16); "
            "fullatt_block_indexes clamped generically",
        config={"window_size": 16}),
    "ClapAudioModel": Hint(
        why="Swin layers: the last of its 4 stages (spec_size / patch / 8 tokens a side) must "
            "be at least window_size, else the relative-position bias mismatches, and it must "
            "hold spec_size // num_mel_bins frequency bins: spec 64, mels 32, "
            "window 2; the input is a (B, 1, T, mels) spectrogram of fixed size",
        config={"spec_size": 64, "num_mel_bins": 32, "window_size": 2}, inputs="clap",
        sizes=1),
    "SwinModel": Hint(
        why="the last of 4 stages (image / patch / 8 tokens a side) must be at least "
            "window_size, else the relative-position bias mismatches: image 64, window 2",
        config={"image_size": 64, "window_size": 2}),
    "Aimv2VisionModel": Hint(
        why="learned absolute position table of image_size/patch_size squared and no "
            "interpolate_pos_encoding: one input size", sizes=1),
    "HieraModel": Hint(
        why="unroll/reroll into mask units is sized from config.image_size: one input size "
            "(interpolate_pos_encoding only resizes the position table)", sizes=1),
    "GroupViTVisionModel": Hint(
        why="absolute position table, no interpolate_pos_encoding: one input size", sizes=1),
    "SamVisionModel": Hint(
        why="checks the input against config.image_size (absolute positions): one input size",
        sizes=1),
    "Sam3VisionModel": Hint(
        why="windowed ViT backbone with a position table for config.image_size only: one "
            "input size", sizes=1),
    "Glm4vVisionModel": Hint(
        why="no t > 1 video branch: Glm4vModel splits a video into one (1, h, w) grid row per "
            "frame before the tower (its embeddings index grid rows per frame)",
        no_branch=("other_branch:video",)),
    "Gemma3nAudioEncoder": Hint(
        why="takes audio_mel / audio_mel_mask (B, T, input_feat_size)",
        inputs="gemma3n_audio"),
}


# --------------------------------------------------------------------------------------------
# example inputs
# --------------------------------------------------------------------------------------------

InputBuilder = Callable[[nn.Module, Any, int, int, torch.Generator], dict[str, Any]]


def _first(value: Any) -> int:
    return value[0] if isinstance(value, (list, tuple)) else value


def _accepts(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _patch_step(config: Any) -> int:
    """Pixels per token: the patch size, or the patch stride of strided stems (Hiera)."""
    return _first(getattr(config, "patch_stride", None) or getattr(config, "patch_size", 1))


def _image_sides(config: Any) -> list[int]:
    """Three square sides: native (32 for conv nets that have no image_size), ~1.5x, 2x,
    multiples of the patch size (or stride); at least one step apart."""
    side = _first(getattr(config, "image_size", IMAGE))
    step = _patch_step(config)
    sides = [max(step, round(side * s / step) * step) for s in (1.0, 1.5, 2.0)]
    for i in (1, 2):
        sides[i] = max(sides[i], sides[i - 1] + step)
    return sides


def _pixels(tower, config, size_index, batch, gen) -> dict[str, Any]:
    """(B, C, S, S) pixel_values; towers with `interpolate_pos_encoding` get it (True) away
    from the native size, as HF users must pass it there."""
    side = _image_sides(config)[size_index]
    channels = getattr(config, "num_channels", 3)
    inputs: dict[str, Any] = {
        "pixel_values": torch.randn(batch, channels, side, side, generator=gen)}
    if size_index and _accepts(tower.forward, "interpolate_pos_encoding"):
        inputs["interpolate_pos_encoding"] = True
    return inputs


# Packed-grid towers (Qwen2-VL & co): per-image (t, h, w) patch grids, in merge units.
_GRIDS = ((2, 2), (2, 3), (4, 4))


def _packed_grid(tower, config, size_index, batch, gen) -> dict[str, Any]:
    """Qwen2-VL style: hidden_states (sum t*h*w, C*T*p*p) + grid_thw (n_images, 3).

    Batch 2 packs two images of different grids (per-image attention via cu_seqlens)."""
    m = config.spatial_merge_size
    t = getattr(config, "temporal_patch_size", 1)
    channels = getattr(config, "in_channels", getattr(config, "num_channels", 3))
    dim = channels * t * config.patch_size ** 2
    grids = [_GRIDS[size_index]] + [_GRIDS[(size_index + 1) % 3]] * (batch - 1)
    grid_thw = torch.tensor([[1, gh * m, gw * m] for gh, gw in grids])
    n = int(grid_thw.prod(-1).sum())
    return {"hidden_states": torch.randn(n, dim, generator=gen), "grid_thw": grid_thw}


_SAMPLES = (1600, 2400, 3200)


def _waveform(tower, config, size_index, batch, gen) -> dict[str, Any]:
    """Raw audio (B, L); with batch 2 the second clip is shorter (zero-padded, mask 0)."""
    n = _SAMPLES[size_index]
    values = torch.randn(batch, n, generator=gen)
    inputs: dict[str, Any] = {"input_values": values}
    if _accepts(tower.forward, "attention_mask"):
        mask = torch.ones(batch, n, dtype=torch.long)
        if batch > 1:
            mask[1:, n * 3 // 4:] = 0
            values[1:, n * 3 // 4:] = 0
        inputs["attention_mask"] = mask
    return inputs


# Not multiples of 16, so a wrong (B, T, mels) vs (B, mels, T) guess cannot match a hidden size.
_FRAMES = (36, 52, 68)


def _mel_bins(config: Any) -> int:
    for name in ("num_mel_bins", "n_mels", "input_feat_size", "feature_size", "input_dim",
                 "num_mel_filters", "feature_projection_input_dim"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 1:
            return value
    raise LookupError(f"{type(config).__name__} names no mel-bin count")


def _features(layout: str) -> InputBuilder:
    """Mel features, (B, mels, T) ("cf", Whisper) or (B, T, mels) ("tf", conformers);
    "cf_fixed": Whisper-style encoders that check T == 2 * max_source_positions. Batch 2 pads
    the second item's tail (mask 0, features 0) as HF feature extractors do."""

    def build(tower, config, size_index, batch, gen) -> dict[str, Any]:
        mels = _mel_bins(config)
        frames = _FRAMES[size_index]
        if layout == "cf_fixed":
            frames = 2 * config.max_source_positions
        channels_first = layout.startswith("cf")
        shape = (batch, mels, frames) if channels_first else (batch, frames, mels)
        feats = torch.randn(*shape, generator=gen)
        params = inspect.signature(tower.forward).parameters
        mask_name = next((n for n in ("attention_mask", "input_features_mask") if n in params),
                         None)
        inputs: dict[str, Any] = {"input_features": feats}
        if mask_name is not None:
            mask = torch.ones(batch, frames, dtype=torch.long)
            if batch > 1:
                mask[1:, frames * 3 // 4:] = 0
                if channels_first:
                    feats[1:, :, frames * 3 // 4:] = 0
                else:
                    feats[1:, frames * 3 // 4:] = 0
            inputs[mask_name] = mask
        return inputs

    return build


def _qwen2_audio(tower, config, size_index, batch, gen) -> dict[str, Any]:
    """Whisper-length features + the 4D additive mask (B, 1, T', T') over the T' encoder
    frames, as Qwen2AudioForConditionalGeneration passes it; batch 2 pads the second clip."""
    inputs = _features("cf_fixed")(tower, config, size_index, batch, gen)
    inputs.pop("attention_mask", None)
    frames = config.max_source_positions
    valid = torch.ones(batch, frames, dtype=torch.bool)
    if batch > 1:
        valid[1:, frames * 3 // 4:] = False
        inputs["input_features"][1:, :, frames * 3 // 2:] = 0
    mask = torch.zeros(batch, 1, frames, frames)
    mask.masked_fill_(~valid[:, None, None, :], torch.finfo(torch.float32).min)
    inputs["attention_mask"] = mask
    return inputs


# Gemma4 vision, in pooling kernels: (grid width, grid height, padding kernels); index 1 has
# padding patches (position -1, zero pixels) as the image processor emits them.
_GEMMA4_GRIDS = ((2, 2, 0), (3, 2, 2), (4, 3, 0))


def _gemma4_vision(tower, config, size_index, batch, gen) -> dict[str, Any]:
    k = config.pooling_kernel_size
    kw, kh, pad = _GEMMA4_GRIDS[size_index]
    width, height = kw * k, kh * k
    n_patches = (kw * kh + pad) * k * k
    dim = 3 * config.patch_size ** 2
    n_valid = width * height
    pixel_values = torch.zeros(batch, n_patches, dim)
    pixel_values[:, :n_valid] = torch.rand(batch, n_valid, dim, generator=gen)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    grid = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)
    positions = torch.full((batch, n_patches, 2), -1, dtype=torch.long)
    positions[:, :n_valid] = grid
    return {"pixel_values": pixel_values, "pixel_position_ids": positions}


_GEMMA4_FRAMES = ((48, 48), (96, 80), (200, 200))


def _gemma4_audio(tower, config, size_index, batch, gen) -> dict[str, Any]:
    frames, valid = _GEMMA4_FRAMES[size_index]
    n_mels = config.subsampling_conv_channels[0] // 4 * 4
    feats = torch.randn(batch, frames, n_mels, generator=gen)
    mask = torch.zeros(batch, frames, dtype=torch.bool)
    mask[:, :valid] = True
    if batch > 1:
        mask[1:, valid * 3 // 4:] = False
    return {"input_features": feats * mask[..., None], "attention_mask": mask}


def _gemma3n_audio(tower, config, size_index, batch, gen) -> dict[str, Any]:
    frames = _FRAMES[size_index]
    feats = torch.randn(batch, frames, config.input_feat_size, generator=gen)
    mask = torch.zeros(batch, frames, dtype=torch.bool)  # True = padding in Gemma3n
    if batch > 1:
        mask[1:, frames * 3 // 4:] = True
    return {"audio_mel": feats, "audio_mel_mask": mask}


# Siglip2 / navit: (rows, cols) of the patch grid per size; index 1 is non-square and padded.
_NAVIT = ((4, 4), (3, 5), (6, 6))


def _siglip2(tower, config, size_index, batch, gen) -> dict[str, Any]:
    rows, cols = _NAVIT[size_index]
    n_max = max(r * c for r, c in _NAVIT[: size_index + 1]) + (2 if size_index == 1 else 0)
    dim = config.num_channels * config.patch_size ** 2
    shapes = [(rows, cols)] + [(2, 3)] * (batch - 1)  # later images smaller: padded
    pixel_values = torch.zeros(batch, n_max, dim)
    mask = torch.zeros(batch, n_max, dtype=torch.long)
    for i, (r, c) in enumerate(shapes):
        pixel_values[i, : r * c] = torch.randn(r * c, dim, generator=gen)
        mask[i, : r * c] = 1
    return {"pixel_values": pixel_values, "pixel_attention_mask": mask,
            "spatial_shapes": torch.tensor(shapes, dtype=torch.long)}


def _pixtral(tower, config, size_index, batch, gen) -> dict[str, Any]:
    """(B, C, H, W) padded to the largest image + image_sizes (h, w) per image."""
    p = config.patch_size
    sides = [(4 * p, 4 * p), (4 * p, 6 * p), (8 * p, 6 * p)]
    h, w = sides[size_index]
    sizes = [(h, w)] + [(2 * p, 3 * p)] * (batch - 1)
    pixel_values = torch.zeros(batch, config.num_channels, h, w)
    for i, (hh, ww) in enumerate(sizes):
        pixel_values[i, :, :hh, :ww] = torch.randn(config.num_channels, hh, ww, generator=gen)
    return {"pixel_values": pixel_values, "image_sizes": torch.tensor(sizes)}


def _idefics(tower, config, size_index, batch, gen) -> dict[str, Any]:
    """(B, C, S, S) + patch_attention_mask (B, S/p, S/p); batch 2's second image is padded."""
    p = config.patch_size
    side = _image_sides(config)[size_index]
    inputs = {"pixel_values": torch.randn(batch, config.num_channels, side, side, generator=gen)}
    g = side // p
    mask = torch.ones(batch, g, g, dtype=torch.bool)
    if batch > 1:
        mask[1:, g // 2:, :] = False
        inputs["pixel_values"][1:, :, (g // 2) * p:, :] = 0
    inputs["patch_attention_mask"] = mask
    return inputs


def _mllama(tower, config, size_index, batch, gen) -> dict[str, Any]:
    """(B, images=1, tiles, C, S, S) with aspect-ratio ids / masks (tiles in use = 1 or 2)."""
    tiles = config.max_num_tiles
    side = config.image_size
    pixel_values = torch.randn(batch, 1, tiles, config.num_channels, side, side, generator=gen)
    ids = torch.ones(batch, 1, dtype=torch.long)  # aspect ratio id 1 = (1, 1): one tile
    mask = torch.zeros(batch, 1, tiles, dtype=torch.long)
    mask[:, :, 0] = 1
    if batch > 1:
        ids[1:] = 2  # (1, 2): two tiles
        mask[1:, :, :2] = 1
    return {"pixel_values": pixel_values, "aspect_ratio_ids": ids, "aspect_ratio_mask": mask}


def _ast(tower, config, size_index, batch, gen) -> dict[str, Any]:
    return {"input_values": torch.randn(batch, config.max_length, config.num_mel_bins,
                                        generator=gen)}


def _clap(tower, config, size_index, batch, gen) -> dict[str, Any]:
    """(B, 1, T, mels) with T = spec_size * mels... as ClapFeatureExtractor: T*mels = spec^2."""
    frames = config.spec_size * config.spec_size // config.num_mel_bins
    return {"input_features": torch.randn(batch, 1, frames, config.num_mel_bins, generator=gen)}


_BUILDERS: dict[str, InputBuilder] = {
    "pixels": _pixels,
    "packed_grid": _packed_grid,
    "waveform": _waveform,
    "features_cf": _features("cf"),
    "features_tf": _features("tf"),
    "features_cf_fixed": _features("cf_fixed"),
    "gemma4_vision": _gemma4_vision,
    "gemma4_audio": _gemma4_audio,
    "gemma3n_audio": _gemma3n_audio,
    "siglip2": _siglip2,
    "pixtral": _pixtral,
    "idefics": _idefics,
    "mllama": _mllama,
    "qwen2_audio": _qwen2_audio,
    "ast": _ast,
    "clap": _clap,
}


def _generic_builders(cls: type, config: Any) -> list[str]:
    """Candidate input builders for a class, from its forward's first parameter and config."""
    params = list(inspect.signature(cls.forward).parameters)[1:]
    first = params[0] if params else ""
    if first == "pixel_values":
        if "image_sizes" in params:
            return ["pixtral"]
        if "patch_attention_mask" in params:
            return ["idefics"]
        if "grid_thw" in params:
            return []
        return ["pixels"]
    if first == "hidden_states" and "grid_thw" in params:
        return ["packed_grid"]
    if first == "input_values":
        return ["waveform"]
    if first == "input_features":
        fixed = ["features_cf_fixed"] if hasattr(config, "max_source_positions") else []
        return ["features_cf", "features_tf", *fixed]
    return []


# --------------------------------------------------------------------------------------------
# towers
# --------------------------------------------------------------------------------------------


def _tree_map(fn: Callable[[Tensor], Any], obj: Any) -> Any:
    from transformers.utils import ModelOutput

    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, ModelOutput):
        return type(obj)(**{k: _tree_map(fn, v) for k, v in obj.items()})
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_tree_map(fn, o) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tree_map(fn, o) for o in obj)
    if isinstance(obj, dict) and type(obj) is dict:
        return {k: _tree_map(fn, v) for k, v in obj.items()}
    return obj


def _clone(obj: Any) -> Any:
    return _tree_map(lambda t: t.detach().clone(), obj)


def _neutral(name: str, value: Any, default: Any) -> bool:
    """Whether omitting an optional argument means the same as passing `value`: it equals
    the default, or it is a mask with every position valid."""
    if value is default or (not isinstance(value, Tensor) and value == default):
        return True
    if (isinstance(value, Tensor) and default is None and "mask" in name
            and value.dtype in (torch.bool, torch.long)):
        return bool(value.all()) if value.numel() else False  # an all-valid mask
    return False


@dataclasses.dataclass(frozen=True)
class Tower:
    """One catalogued tower class: where it lives, its hint (if any), how it is fed."""

    name: str  # the class name
    module: str = "transformers"  # where the class is importable from
    builder: str | None = None  # input builder; None: chosen generically (probed once)

    @property
    def hint(self) -> Hint | None:
        return HINTS.get(self.name)

    @property
    def model_class(self) -> type:
        return getattr(importlib.import_module(self.module), self.name)

    @property
    def sizes(self) -> int:
        """How many distinct input sizes (size_index values) this tower accepts."""
        return self.hint.sizes if self.hint and self.hint.sizes else 3

    def config(self) -> Any:
        cls = self.model_class
        return shrink(cls.config_class, self.hint.config if self.hint else None)

    def build(self, seed: int = 0) -> nn.Module:
        """The tower with random weights (seeded; caller's RNG untouched), float32, eval.

        Linear biases and norm weights are randomised too (HF inits them to 0 / 1), so a
        dropped bias or norm scale changes the output."""
        config = self.config()
        if hasattr(config, "initializer_range"):
            config.initializer_range = INIT_RANGE
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with torch.device("cpu"):
                tower = self.model_class(config)
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for mod in tower.modules():
                if isinstance(mod, nn.Linear) and mod.bias is not None:
                    mod.bias.copy_(INIT_RANGE * torch.randn(mod.bias.shape, generator=gen))
                elif isinstance(mod, (nn.LayerNorm, nn.GroupNorm)) and mod.weight is not None:
                    mod.weight.copy_(1 + INIT_RANGE * torch.randn(mod.weight.shape,
                                                                  generator=gen))
        if self.hint and self.hint.init:
            self.hint.init(tower)
        return tower.float().eval()

    # ---- inputs --------------------------------------------------------------------------

    def _builder_name(self, tower: nn.Module) -> str:
        if self.builder:
            return self.builder
        if self.hint and self.hint.inputs:
            return self.hint.inputs
        names = _generic_builders(type(tower), tower.config)
        if len(names) == 1:
            return names[0]
        if not names:
            raise LookupError(f"{self.name}: no generic input builder; add a HINTS entry")
        cached = _PROBED.get(self.name)
        if cached:
            return cached
        errors = []
        for name in names:  # several layouts possible: the first the tower runs with
            try:
                with torch.no_grad():
                    tower(**_BUILDERS[name](tower, tower.config, 0, 1,
                                            torch.Generator().manual_seed(0)))
            except Exception as e:  # noqa: BLE001 - a wrong layout fails in many ways
                errors.append(f"{name}: {type(e).__name__}: {e}")
                continue
            _PROBED[self.name] = name
            return name
        raise LookupError(f"{self.name}: no input layout runs: {'; '.join(errors)}")

    def builder_name(self, tower: nn.Module) -> str:
        return self._builder_name(tower)

    def inputs(self, tower: nn.Module, size_index: int = 0, batch: int = 1,
               seed: int = 0) -> dict[str, Any]:
        """Keyword inputs as HF users pass them, at size `size_index` (< self.sizes)."""
        if not 0 <= size_index < self.sizes:
            raise ValueError(f"{self.name} takes size_index 0..{self.sizes - 1}, "
                             f"got {size_index}")
        build = _BUILDERS[self._builder_name(tower)]
        return build(tower, tower.config, size_index, batch,
                     torch.Generator().manual_seed(seed + 1000 * size_index + batch))

    # ---- call forms ----------------------------------------------------------------------

    def calls(self, tower: nn.Module, size_index: int = 0, batch: int = 1) -> list[Call]:
        """Every call form for this tower at one size / batch (see the module docstring)."""
        inputs = self.inputs(tower, size_index, batch)
        sig = inspect.signature(tower.forward)
        params = [p for p in sig.parameters.values()
                  if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        var_kw = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
        calls = [Call("keyword", "", (), dict(inputs))]

        # positional: signature order, gaps filled with the defaults
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY,
                                                      p.POSITIONAL_OR_KEYWORD)]
        last = max((i for i, p in enumerate(positional) if p.name in inputs), default=-1)
        args = tuple(inputs[p.name] if p.name in inputs else p.default
                     for p in positional[: last + 1])
        rest = {k: v for k, v in inputs.items()
                if k not in {p.name for p in positional[: last + 1]}}
        calls.append(Call("positional", "", args, rest))

        # omitted defaults: drop optional inputs that mean the same as leaving them out
        by_name = {p.name: p for p in params}
        omitted = {k: v for k, v in inputs.items()
                   if k not in by_name or by_name[k].default is inspect.Parameter.empty
                   or not _neutral(k, v, by_name[k].default)}
        calls.append(Call("omitted_defaults", "", (), omitted))

        # explicit defaults: every other named parameter spelled out with its default
        explicit = dict(inputs)
        for p in params:
            if p.name not in explicit and p.default is not inspect.Parameter.empty:
                explicit[p.name] = p.default
        calls.append(Call("explicit_defaults", "", (), explicit))

        skip = self.hint.no_branch if self.hint else ()
        calls.extend(c for c in self._other_branches(tower, inputs, by_name, var_kw,
                                                     size_index, batch) if c.name not in skip)
        calls.extend(self._submodule_calls(tower, inputs))
        return calls

    def _other_branches(self, tower, inputs, by_name, var_kw, size_index, batch) -> list[Call]:
        out = []
        if ("interpolate_pos_encoding" in by_name and self._builder_name(tower) == "pixels"
                and self.sizes > 1):
            # a size none of the three sizes uses, native + one patch, interpolated
            config = tower.config
            side = _image_sides(config)[0] + _patch_step(config)
            gen = torch.Generator().manual_seed(7)
            out.append(Call("other_branch:interpolate", "", (), {
                "pixel_values": torch.randn(batch, getattr(config, "num_channels", 3), side,
                                            side, generator=gen),
                "interpolate_pos_encoding": True}))
        if self._builder_name(tower) == "packed_grid":
            # a video: two temporal patches per position (t = 2), rotary / windows over t too
            m = tower.config.spatial_merge_size
            grid = torch.tensor([[2, 2 * m, 2 * m]] * batch)
            dim = inputs["hidden_states"].shape[-1]
            gen = torch.Generator().manual_seed(7)
            out.append(Call("other_branch:video", "", (), {
                "hidden_states": torch.randn(int(grid.prod(-1).sum()), dim, generator=gen),
                "grid_thw": grid}))
        if "output_hidden_states" in by_name or var_kw:
            out.append(Call("other_branch:hidden_states", "", (),
                            {**inputs, "output_hidden_states": True}))
        for mask in ("attention_mask", "input_features_mask", "patch_attention_mask"):
            if mask in by_name and by_name[mask].default is None:
                if mask in inputs:  # the example passes a mask: the no-mask path
                    out.append(Call(f"other_branch:no_{mask}", "", (),
                                    {k: v for k, v in inputs.items() if k != mask}))
        return out

    def _submodule_calls(self, tower: nn.Module, inputs: dict[str, Any]) -> list[Call]:
        """Direct calls of up to two inner modules, with the args / kwargs a forward hook saw
        in a real run of the tower on `inputs`: the first one called (usually the embeddings)
        and the one holding most linears (usually the encoder). Candidates are the children
        and grandchildren of the trunk (the tower, or the wrapper that holds all of its
        parameters: CLIP's vision_model, CLAP's audio_encoder) called exactly once."""
        def n_params(mod: nn.Module) -> int:
            return sum(p.numel() for p in mod.parameters())

        total = n_params(tower)
        trunk = ""
        while True:  # descend through wrappers holding every parameter
            inner = [(n, c) for n, c in tower.get_submodule(trunk).named_children()
                     if n_params(c) == total]
            if len(inner) != 1:
                break
            trunk = f"{trunk}.{inner[0][0]}" if trunk else inner[0][0]
        started: list[str] = []
        seen: dict[str, list] = {}
        hooks = []
        for rel, mod in tower.get_submodule(trunk).named_modules():
            if not rel or rel.count(".") > 1 or isinstance(mod, (nn.ModuleList, nn.ModuleDict)):
                continue
            if n_params(mod) in (0, total):
                continue
            path = f"{trunk}.{rel}" if trunk else rel

            def pre(module, args, kwargs, path=path):
                started.append(path)

            def post(module, args, kwargs, output, path=path):
                seen.setdefault(path, []).append((_clone(args), _clone(kwargs), _clone(output)))

            hooks.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
            hooks.append(mod.register_forward_hook(post, with_kwargs=True))
        try:
            with torch.no_grad():
                tower(**inputs)
        finally:
            for h in hooks:
                h.remove()
        once = [p for p in dict.fromkeys(started) if len(seen.get(p, ())) == 1]
        if not once:
            return []
        chosen = [once[0]]
        n_lin = {p: sum(isinstance(m, nn.Linear) for m in tower.get_submodule(p).modules())
                 for p in once}
        most = max(once, key=lambda p: (n_lin[p], -p.count("."), -once.index(p)))
        if most not in chosen and n_lin[most]:
            chosen.append(most)
        return [Call(f"submodule:{p}", p, *seen[p][0]) for p in chosen]


_PROBED: dict[str, str] = {}


# The catalogue. Classes importable from `transformers` unless a module is given.
_MOD = "transformers.models.{0}.modeling_{0}"
TOWERS: list[Tower] = [
    # the four named towers
    Tower("Gemma4VisionModel"),
    Tower("Gemma4AudioModel"),
    Tower("SiglipVisionModel"),
    Tower("CLIPVisionModel"),
    # ViT family (interpolate_pos_encoding / absolute positions)
    Tower("ViTModel"),
    Tower("DeiTModel"),
    Tower("BeitModel"),
    Tower("Data2VecVisionModel"),
    Tower("Dinov2Model"),
    Tower("Dinov2WithRegistersModel"),
    Tower("CLIPSegVisionModel"),
    Tower("AltCLIPVisionModel"),
    Tower("BlipVisionModel"),
    Tower("Blip2VisionModel"),
    Tower("InstructBlipVisionModel"),
    Tower("GitVisionModel"),
    Tower("ChineseCLIPVisionModel"),
    Tower("MetaClip2VisionModel"),
    Tower("Aimv2VisionModel"),
    Tower("IJepaModel"),
    # navit / variable resolution
    Tower("Siglip2VisionModel"),
    Tower("PixtralVisionModel"),
    Tower("Idefics2VisionTransformer", _MOD.format("idefics2")),
    Tower("Idefics3VisionTransformer"),
    Tower("Qwen2VisionTransformerPretrainedModel", _MOD.format("qwen2_vl")),
    Tower("Qwen2_5_VisionTransformerPretrainedModel", _MOD.format("qwen2_5_vl")),
    Tower("Qwen3VLVisionModel"),
    Tower("MllamaVisionModel"),
    Tower("Phi4MultimodalVisionModel"),
    Tower("SmolVLMVisionTransformer"),
    Tower("Glm4vVisionModel"),
    Tower("Qwen3_5VisionModel"),
    Tower("Qwen3VLMoeVisionModel"),
    # more ViT-style
    Tower("ViTMSNModel"),
    Tower("OwlViTVisionModel"),
    Tower("Owlv2VisionModel"),
    Tower("GroupViTVisionModel"),
    Tower("InternVLVisionModel"),
    Tower("JanusVisionModel"),
    Tower("MLCDVisionModel"),
    Tower("Tipsv2VisionModel"),
    Tower("InstructBlipVideoVisionModel"),
    Tower("SamVisionModel"),
    Tower("Sam3VisionModel"),
    # hierarchical / conv
    Tower("SwinModel"),
    Tower("Swinv2Model"),
    Tower("FocalNetModel"),
    Tower("PvtV2Model"),
    Tower("ConvNextV2Model"),
    Tower("ConvNextModel"),
    Tower("MobileViTModel"),
    Tower("HieraModel"),
    # audio
    Tower("WhisperEncoder", _MOD.format("whisper")),
    Tower("Qwen2AudioEncoder"),
    Tower("Wav2Vec2Model"),
    Tower("HubertModel"),
    Tower("WavLMModel"),
    Tower("Data2VecAudioModel"),
    Tower("SEWModel"),
    Tower("UniSpeechModel"),
    Tower("UniSpeechSatModel"),
    Tower("SEWDModel"),
    Tower("Wav2Vec2ConformerModel"),
    Tower("Wav2Vec2BertModel"),
    Tower("ParakeetEncoder"),
    Tower("LasrEncoder"),
    Tower("GlmAsrEncoder"),
    Tower("ASTModel"),
    Tower("ClapAudioModel"),
    Tower("Gemma3nAudioEncoder"),
]


def by_name(name: str) -> Tower:
    for tower in TOWERS:
        if tower.name == name:
            return tower
    raise KeyError(f"{name} is not in the catalogue; known: {', '.join(t.name for t in TOWERS)}")


# --------------------------------------------------------------------------------------------
# comparing outputs
# --------------------------------------------------------------------------------------------


def _leaves(obj: Any, path: str = "") -> list[tuple[str, Any]]:
    from transformers.utils import ModelOutput

    if isinstance(obj, ModelOutput):
        return [leaf for k, v in obj.items() for leaf in _leaves(v, f"{path}.{k}")]
    if isinstance(obj, dict):
        return [leaf for k, v in obj.items() for leaf in _leaves(v, f"{path}[{k!r}]")]
    if isinstance(obj, (list, tuple)):
        return [leaf for i, v in enumerate(obj) for leaf in _leaves(v, f"{path}[{i}]")]
    return [(path or "<out>", obj)]


def compare(out_a: Any, out_b: Any) -> float:
    """Max abs difference between two HF outputs (ModelOutput / tuple / dict / tensor, nested).

    Asserts the same structure: same leaf paths, and per tensor leaf the same shape and dtype;
    non-tensor leaves must be equal. Integer / bool tensors count their max abs difference too.
    """
    a, b = _leaves(out_a), _leaves(out_b)
    paths_a, paths_b = [p for p, _ in a], [p for p, _ in b]
    assert paths_a == paths_b, f"different output structure: {paths_a} vs {paths_b}"
    worst = 0.0
    for (path, x), (_, y) in zip(a, b, strict=True):
        if isinstance(x, Tensor) or isinstance(y, Tensor):
            assert isinstance(x, Tensor) and isinstance(y, Tensor), f"{path}: tensor vs not"
            assert x.shape == y.shape, f"{path}: shape {tuple(x.shape)} vs {tuple(y.shape)}"
            assert x.dtype == y.dtype, f"{path}: dtype {x.dtype} vs {y.dtype}"
            if x.numel():
                d = (x.double() - y.double()).abs()
                nan_same = torch.isnan(x) & torch.isnan(y) if x.is_floating_point() else None
                if nan_same is not None:
                    d = torch.where(nan_same, torch.zeros_like(d), d)
                worst = max(worst, float(d.nan_to_num(nan=math.inf).max()))
        else:
            assert x == y, f"{path}: {x!r} vs {y!r}"
    return worst


# --------------------------------------------------------------------------------------------
# sweep: every exported vision/audio encoder class
# --------------------------------------------------------------------------------------------

_PRIMARY = {"pixel_values", "input_values", "input_features", "audio_mel", "flattened_patches",
            "pixel_values_videos"}


def discover() -> list[Tower]:
    """Vision/audio encoder classes transformers exports: names ending in VisionModel,
    VisionTransformer, AudioModel, AudioEncoder, Encoder, or the base model of an image / audio
    classification mapping; kept when their forward's first input is pixels / audio (or
    Qwen-style packed patches) and their config_class is not a composite with a text model."""
    import transformers as tf
    from transformers.models.auto import modeling_auto as ma

    names: set[str] = set()
    for n in dir(tf):
        if re.search(r"(VisionModel|VisionTransformer|AudioModel|AudioEncoder|Encoder)$", n):
            names.add(n)
    for mapping in ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
                    "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES",
                    "MODEL_FOR_CTC_MAPPING_NAMES"):
        for model_type in getattr(ma, mapping, {}):
            base = ma.MODEL_MAPPING_NAMES.get(model_type)
            base = base[0] if isinstance(base, (tuple, list)) else base
            if base:
                names.add(base)
    found = {t.name: t for t in TOWERS}
    for n in sorted(names):
        if n in found:
            continue
        try:
            cls = getattr(tf, n)
            params = list(inspect.signature(cls.forward).parameters)[1:]
        except Exception:  # noqa: BLE001 - lazy import of an optional backend, not a module
            continue
        if not isinstance(cls, type) or not issubclass(cls, nn.Module) or not params:
            continue
        if getattr(getattr(cls, "config_class", None), "is_encoder_decoder", False) is True:
            continue  # a seq2seq model (WhisperModel): its encoder is the tower
        if params[0] in _PRIMARY or (params[0] == "hidden_states" and "grid_thw" in params):
            found[n] = Tower(n)
    return sorted(found.values(), key=lambda t: t.name)


@dataclasses.dataclass
class SweepResult:
    tower: Tower
    ok: bool
    stage: str  # "ok", or where it failed: config / build / inputs / forward
    error: str = ""
    n_linear: int = 0
    builder: str = ""


def try_tower(entry: Tower) -> SweepResult:
    """Build `entry` from its shrunk default config and run it once at size 0, batch 1."""
    stage = "config"
    try:
        entry.config()
        stage = "build"
        tower = entry.build()
        n_lin = sum(isinstance(m, nn.Linear) for m in tower.modules())
        stage = "inputs"
        builder = entry.builder_name(tower)
        inputs = entry.inputs(tower, 0, 1)
        stage = "forward"
        with torch.no_grad():
            tower(**inputs)
    except Exception as e:  # noqa: BLE001 - reported, not raised: this is a survey
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        return SweepResult(entry, False, stage, f"{type(e).__name__}: {msg}")
    return SweepResult(entry, True, "ok", "", n_lin, builder)


def sweep() -> list[SweepResult]:
    return [try_tower(t) for t in discover()]
