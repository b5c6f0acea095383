import subprocess
import sys
import textwrap

import pytest


def test_import_is_light():
    code = textwrap.dedent(
        """
        import sys
        import fxpass.weights, fxpass.vllm_context
        heavy = [m for m in ("vllm", "bitsandbytes", "vllm_bnb_plugin") if m in sys.modules]
        assert not heavy, heavy
        assert fxpass.vllm_context.runtime_active() is False
        assert "vllm" not in sys.modules
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_runtime_active_inside_fixture(vllm_rt):
    from fxpass.vllm_context import runtime_active

    assert runtime_active()


def test_reentrant_and_keeps_outer_config(vllm_rt):
    from vllm.config import get_current_vllm_config
    from vllm.distributed.parallel_state import get_tp_group, get_world_group

    from fxpass.vllm_context import runtime_active, vllm_runtime

    outer = get_current_vllm_config()
    world, tp = get_world_group(), get_tp_group()
    with vllm_runtime():
        with vllm_runtime():
            assert runtime_active()
            assert get_current_vllm_config() is outer
        assert get_current_vllm_config() is outer
    assert runtime_active()
    # process-wide groups are made once and kept
    assert get_world_group() is world and get_tp_group() is tp
    assert tp.world_size == 1 and tp.rank_in_group == 0


def test_sets_config_only_for_its_block(vllm_rt, monkeypatch):
    """Without a current config (as after an engine finished init), the block
    makes one current and restores "none" on exit; MP groups are reused."""
    import vllm.config.vllm as vllm_config_module
    from vllm.config import VllmConfig, get_current_vllm_config_or_none, set_current_vllm_config
    from vllm.distributed.parallel_state import get_world_group

    from fxpass.vllm_context import runtime_active, vllm_runtime

    monkeypatch.setattr(vllm_config_module, "_current_vllm_config", None)
    world = get_world_group()
    assert not runtime_active()
    with vllm_runtime():
        assert runtime_active()
        made = get_current_vllm_config_or_none()
        assert isinstance(made, VllmConfig)
        with vllm_runtime():
            assert get_current_vllm_config_or_none() is made
    assert get_current_vllm_config_or_none() is None
    assert not runtime_active()
    assert get_world_group() is world

    # an engine's own config is never replaced
    mine = made
    with set_current_vllm_config(mine), vllm_runtime():
        assert get_current_vllm_config_or_none() is mine


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_layer_built_standalone_runs(vllm_rt, dtype_name):
    import torch
    from vllm.model_executor.layers.linear import ReplicatedLinear

    dtype = getattr(torch, dtype_name)
    layer = ReplicatedLinear(
        8, 4, bias=False, params_dtype=dtype, return_bias=False, disable_tp=True
    )
    layer.weight.data.copy_(torch.eye(4, 8, dtype=dtype))
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.arange(8, dtype=dtype)[None]
    assert torch.equal(layer(x), x[:, :4])
