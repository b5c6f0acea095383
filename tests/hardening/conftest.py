"""Fixtures for the hardening suite."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def clip_ckpt(tmp_path_factory):
    """A tiny random CLIPVisionModel checkpoint (save_pretrained, safetensors): the cheapest
    real HF directory for the CLI / loader rows of the bad-input table."""
    from fxpass import zoo

    path = tmp_path_factory.mktemp("clip_ckpt")
    zoo.build_tower("clip_vision").save_pretrained(path)
    return path
