"""The sdpa-mask rule: SDPA drops a mask that masks nothing, as HF eager does."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxpass
from fxpass import zoo
from fxpass.rules import sdpa_mask as attention
from fxpass.runtime import installed_graph

pytestmark = pytest.mark.usefixtures("vllm_rt")


def _qkv(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, 8, 4, generator=g) for _ in range(3)]


@pytest.mark.parametrize("mask, nothing", [
    (torch.ones(1, 1, 8, 8, dtype=torch.bool), True),
    (torch.ones(1, 1, 8, 8, dtype=torch.bool).tril(), False),
    (torch.zeros(1, 1, 8, 8), True),
    (torch.zeros(1, 1, 8, 8).masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1),
                                         float("-inf")), False),
], ids=["bool-all", "bool-causal", "float-zero", "float-causal"])
def test_replacement_equals_sdpa_and_drops_only_empty_masks(mask, nothing):
    q, k, v = _qkv()
    assert attention.masks_nothing(mask) is nothing
    got = attention.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=None if nothing else mask)
    assert torch.equal(got, want)  # the very call SDPA would make without the mask
    assert torch.allclose(got, F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                          atol=1e-6)


def test_mask_check_is_redone_after_an_in_place_change():
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    assert attention.masks_nothing(mask)
    mask[..., 0, 1] = False  # same tensor object, new version
    assert not attention.masks_nothing(mask)
    q, k, v = _qkv()
    assert torch.equal(attention.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                       F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_inference_mode_masks_are_checked_without_a_version_counter():
    """vLLM runs towers under inference_mode: its tensors have no version counter."""
    q, k, v = _qkv()
    with torch.inference_mode():
        full = torch.ones(1, 1, 8, 8, dtype=torch.bool)
        causal = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
        assert attention.masks_nothing(full) and not attention.masks_nothing(causal)
        got = attention.scaled_dot_product_attention(q, k, v, attn_mask=causal)
        assert torch.equal(got, F.scaled_dot_product_attention(q, k, v, attn_mask=causal))


def test_gemma4_vision_attention_gets_the_rule_and_matches_hf_eager():
    tower = zoo.build_tower("gemma4_vision")
    ref = copy.deepcopy(tower)
    # traced on a padded input: HF builds a mask, as eager does (unpadded, eager builds none,
    # and neither does the trace on real values; the layers then get the rule when a padded
    # call re-specialises them)
    # (this rule alone: vLLM's encoder attention would take the call over after it)
    report = fxpass.apply(tower, None, load_weights=True, disable=["mm-attention"],
                          example_inputs=zoo.example_inputs(tower, size_index=1))
    sites = [f.module for f in report.fixes if f.rule == "sdpa-mask"]
    assert sites == [f"encoder.layers.{i}.self_attn" for i in range(2)], report.fixes
    for module in sites:  # each site's graph now calls the replacement
        fwd = installed_graph(tower.get_submodule(module))
        assert fwd is not None and "fxpass_rules_sdpa_mask" in fwd.src, fwd.src
    # size index 1 pads (its mask masks something and is kept), 0 and 2 do not
    for index in (0, 1, 2):
        x = zoo.example_inputs(ref, size_index=index)
        with torch.no_grad():
            want, got = ref(**x), tower(**x)
        want = want[0] if not isinstance(want, torch.Tensor) else want
        got = got[0] if not isinstance(got, torch.Tensor) else got
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_attention_without_a_mask_is_not_touched():
    """SigLIP calls SDPA with attn_mask=None: nothing to drop, no fix reported."""
    tower = zoo.build_tower("siglip_vision")
    report = fxpass.apply(tower, None, example_inputs=zoo.example_inputs(tower, size_index=1))
    assert [f for f in report.fixes if f.rule == "sdpa-mask"] == []
    assert report.refusals == []


class _ShapeCausalToy(nn.Module):
    """is_causal computed from shapes (False on these inputs) next to a mask."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, q, k, v, mask):
        causal = q.shape[-2] > 100
        return self.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                        is_causal=causal))


def test_sdpa_without_a_constant_is_causal_is_refused_with_a_reason():
    toy = _ShapeCausalToy()
    q, k, v = _qkv()
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    report = fxpass.apply(toy, None, load_weights=True, example_inputs=(q, k, v, mask))
    assert not [f for f in report.fixes if f.rule == "sdpa-mask"]
    (refusal,) = [r for r in report.refusals if r["rule"] == "sdpa-mask"]
    assert "is_causal is" in refusal["reason"] and "not a constant False" in refusal["reason"]
    assert "fxpass_rules_sdpa_mask" not in installed_graph(toy).src
