"""fxpass.lora.adapter: adapter directories read as vLLM reads them."""

from __future__ import annotations

import json

import pytest

from fxpass.errors import UsageError
from fxpass.lora.adapter import demo_targets, parse_key, read_adapter


def test_parse_key_like_vllm():
    assert parse_key("base_model.model.model.vision_tower.a.q_proj.linear.lora_A.weight") == (
        "model.vision_tower.a.q_proj.linear", "A")
    assert parse_key("base_model.model.x.lora_B.weight") == ("x", "B")
    assert parse_key("x.y.lora_B.weight") == ("x.y", "B")
    assert parse_key("base_model.model.x.weight") is None
    assert parse_key("base_model.model.x.lora_A.default.weight") is None


def test_read_adapter_groups_modules_with_ranks_and_scaling(vision_adapter):
    tower, path = vision_adapter
    a = read_adapter(path)
    targets = demo_targets(tower)
    assert set(a.modules) == {f"model.vision_tower.{p}" for p in targets}
    assert sorted(set(targets.values())) == [4, 8]  # several ranks
    for p, r in targets.items():
        m = a.modules[f"model.vision_tower.{p}"]
        lin = tower.get_submodule(p)
        assert m.rank == r and m.a.shape == (r, lin.in_features)
        assert m.b.shape == (lin.out_features, r)
        assert m.scaling == pytest.approx(16.0 / r)
        assert len(m.keys) == 2
    assert a.unparsed == []


def test_read_adapter_bad_input(tmp_path, vision_adapter):
    with pytest.raises(UsageError, match="does not exist"):
        read_adapter(tmp_path / "nope")
    with pytest.raises(UsageError, match="no adapter_config.json"):
        read_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8}))
    with pytest.raises(UsageError, match="no adapter_model.safetensors"):
        read_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UsageError, match="cannot read the adapter tensors"):
        read_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(UsageError, match="not readable JSON"):
        read_adapter(tmp_path)
