"""Adapters for the tower-LoRA tests, written with PEFT on the zoo's tiny towers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fxpass import zoo
from fxpass.lora.adapter import demo_targets, rename_keys, write_adapter


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lora")


def _adapter(lora_dir: Path, name: str, key_prefix: str = "") -> tuple[torch.nn.Module, Path]:
    tower = zoo.build_tower(name, seed=0)
    out = lora_dir / f"{name}-{key_prefix or 'root'}"
    if not (out / "adapter_config.json").is_file():
        write_adapter(tower, out, demo_targets(tower), key_prefix=key_prefix, seed=5)
    return tower, out


@pytest.fixture(scope="session")
def vision_adapter(lora_dir):
    """(tiny Gemma4 vision tower fp32, adapter keyed as in Gemma4-MM: model.vision_tower.*)"""
    return _adapter(lora_dir, "gemma4_vision", "model.vision_tower")


@pytest.fixture(scope="session")
def audio_adapter(lora_dir):
    return _adapter(lora_dir, "gemma4_audio", "model.audio_tower")


@pytest.fixture(scope="session")
def siglip_adapter(lora_dir):
    return _adapter(lora_dir, "siglip_vision")


@pytest.fixture(scope="session")
def wrapper_adapter(vision_adapter, lora_dir):
    """The vision adapter keyed on the Gemma4ClippableLinear wrappers (no `.linear`)."""
    _, good = vision_adapter
    return rename_keys(good, lora_dir / "vision-wrapper", ".linear.lora_", ".lora_")
