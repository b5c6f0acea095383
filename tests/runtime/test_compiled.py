"""Compiled towers (``fxpass.runtime.compiled``): torch.compile over a rewritten tower's entry
points, as the plugin does under vLLM's ``compile_mm_encoder``.

Dynamo's "eager" backend: it captures exactly what inductor would be handed (graph breaks,
guards, recompiles are dynamo's), in seconds; inductor's own time is the engine benchmark's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fxpass
from fxpass import zoo
from fxpass.rules import mm_attention
from fxpass.runtime import installed_graph
from fxpass.runtime.compiled import compile_entries, dynamo_counts, freeze, settle

pytestmark = pytest.mark.usefixtures("vllm_rt")

# (size index, batch) of every call after the warm-up: each catalogue size, padded (index 1)
# and not, one and two at a time
CALLS = [(0, 1), (2, 2), (1, 2)]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _vllm_vision_call(vt, inputs):
    """Gemma4's vision tower as vLLM's gemma4_mm calls it: patch embedder, then encoder."""
    pv, pp = inputs["pixel_values"], inputs["pixel_position_ids"]
    pad = (pp == -1).all(dim=-1)
    embeds = vt.patch_embedder(pv, pp, pad)
    return vt.encoder(inputs_embeds=embeds, attention_mask=~pad,
                      pixel_position_ids=pp).last_hidden_state


def _settle(fn, tower, batches=(1, 2)):
    """The plugin's warm-up: the largest input, one then two at a time, as the calls after."""
    def call(n):
        with torch.no_grad():
            fn(tower, zoo.example_inputs(tower, size_index=2, batch=n))
    return settle(call, batches=batches)


def _outputs(fn, tower, calls):
    with torch.no_grad():
        return [fn(tower, zoo.example_inputs(tower, size_index=s, batch=b)) for s, b in calls]


def test_gemma4_vision_compiles_once_for_every_image_size_without_a_graph_break():
    """The entries vLLM calls compile at the warm-up (batch 1, then 2); afterwards no image
    size, padded or not, compiles anything, and the compiled tower gives the eager
    rewritten tower's bits (dynamo's eager backend runs the same ops)."""
    vt = zoo.build_tower("gemma4_vision")
    reference = _outputs(_vllm_vision_call, vt, CALLS)
    fxpass.apply(vt, None, fuse=True, load_weights=True, first_call=True)
    largest = zoo.example_inputs(vt, size_index=2)
    with torch.no_grad():
        _vllm_vision_call(vt, largest)  # the first call traces the entries
    eager = _outputs(_vllm_vision_call, vt, CALLS)
    entries = compile_entries(vt, ["patch_embedder", "encoder"], backend="eager")
    assert entries == ["patch_embedder", "encoder"]
    assert compile_entries(vt, entries, backend="eager") == []  # once
    # the fxpass forward keeps its mark (installed_graph) with a code object of its own
    assert installed_graph(vt.patch_embedder) is not None
    assert (vt.patch_embedder.forward.__func__.__code__
            is not vt.encoder.layers[0].forward.__func__.__code__)
    stats = _settle(_vllm_vision_call, vt)
    assert stats["breaks"] == 0 and stats["graphs"] >= 2, stats
    freeze(vt, entries)
    assert vt.encoder._fxpass_compile_stance == "eager_on_recompile"
    for name in entries:  # a call no compiled code covers would raise, not run eagerly
        vt.get_submodule(name)._fxpass_compile_stance = "fail_on_recompile"
    before = dynamo_counts()
    compiled = _outputs(_vllm_vision_call, vt, CALLS)
    assert dynamo_counts() == before, "a call after the warm-up compiled again"
    for (s, b), got, want, ref in zip(CALLS, compiled, eager, reference):
        assert torch.equal(got, want), (s, b)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_an_audio_length_no_compiled_code_covers_runs_the_graphs_eagerly():
    """Gemma4's audio attention makes dynamo guard on length classes: after freeze a length
    outside them runs the installed graphs eagerly, never a compile inside a request."""
    tower = zoo.build_tower("gemma4_audio")

    def call(t, inputs):
        return t(**inputs).last_hidden_state

    calls = [(0, 1), (1, 1)]  # shorter than the warm-up's, one padded (a masked tail)
    reference = _outputs(call, tower, calls)
    fxpass.apply(tower, None, fuse=True, load_weights=True, first_call=True)
    with torch.no_grad():
        call(tower, zoo.example_inputs(tower, size_index=2))
    compile_entries(tower, ["<root>"], backend="eager")
    stats = _settle(call, tower, batches=(1,))  # (batch 2: the vision test's)
    assert stats["breaks"] == 0, stats
    freeze(tower, ["<root>"])
    before = dynamo_counts()
    got = _outputs(call, tower, calls)
    assert dynamo_counts() == before
    for (s, b), out, ref in zip(calls, got, reference):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=f"{(s, b)}")
    # the stance, not luck, kept it eager: unfrozen, such a length compiles (a raising
    # stance here, "fail_on_recompile", left torch's dispatch state broken for later tests)
    tower._fxpass_compile_stance = "default"
    _outputs(call, tower, calls[:1])
    assert dynamo_counts()["graphs"] > before["graphs"]


@pytest.mark.parametrize("mask", ["none", "padding", "scattered", "causal"])
def test_encoder_attention_is_one_op_under_compile_with_eager_semantics(mask):
    """Under dynamo the mask checks run inside one custom op (fullgraph: no graph break),
    with the eager path's result and the layout its fake promises (torch.library.opcheck)."""
    from vllm.model_executor.layers.attention.mm_encoder_attention import MMEncoderAttention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 7, 8, generator=g) for _ in range(3))
    masks = {"none": None, "causal": torch.ones(2, 1, 7, 7, dtype=torch.bool).tril()}
    keep = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    keep[1, ..., 5:] = False
    masks["padding"] = keep.expand(2, 1, 7, 7)
    scattered = keep.clone()
    scattered[0, ..., 2] = False
    masks["scattered"] = scattered
    m = masks[mask]
    attn = MMEncoderAttention(4, 8, scale=0.3)
    mm_attention.register(attn, "test.attn")

    def f(q, k, v, m):
        return mm_attention.encoder_attention(attn, q, k, v, m, scale=0.3)

    eager = f(q, k, v, m)
    compiled = torch.compile(f, backend="eager", fullgraph=True, dynamic=True)(q, k, v, m)
    assert torch.equal(compiled, eager)
    torch.testing.assert_close(eager, F.scaled_dot_product_attention(q, k, v, attn_mask=m,
                                                                     scale=0.3))
    torch.library.opcheck(torch.ops.fxpass.encoder_attention.default,
                          (q, k, v, m, attn._fxpass_op_key, 0.3, False))


def test_a_layer_the_rule_did_not_build_leaves_dynamo_and_runs_eagerly():
    """No op key (a layer built by hand): dynamo cannot capture the call, and the frame runs
    eagerly with the eager path's answer."""
    from vllm.model_executor.layers.attention.mm_encoder_attention import MMEncoderAttention

    attn = MMEncoderAttention(2, 4)
    q = torch.randn(1, 2, 3, 4)

    def f(x):
        return mm_attention.encoder_attention(attn, x, x, x)

    torch.testing.assert_close(torch.compile(f, backend="eager")(q),
                               F.scaled_dot_product_attention(q, q, q))
