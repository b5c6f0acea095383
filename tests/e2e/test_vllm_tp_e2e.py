"""vLLM-CPU with tensor_parallel_size=2 serves the tiny Gemma4-MM with sharded towers.

Engine cases (conftest.py): bf16_tp2 and bnb_kv2_tp2, each an engine whose executor starts
two worker processes; in each worker the plugin shards the vision and audio towers over the
TP group (mm_encoder_tp_mode="weights", vLLM's default). What fxpass controls is checked:
the towers against HF's (and the walk's) within the bf16 tensor-parallel budget, and greedy
token ids against vLLM's own TP=2 run that differs only in fxpass (bf16_tp2_off:
FXPASS_DISABLE=1), where the tokens depend on nothing fxpass changes. Never against a TP=1
run: the TP=2 language model's bf16 partial sums alone change token ids, differently on each
CPU (a Xeon with avx512_bf16 only: the audio prompt's 5th token against TP=1).
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.processes]

TOWERS = ("vision_tower", "audio_tower")
# as test_vllm_e2e.py: bnb 4-bit towers against HF's bf16 towers
BNB_MIN_TOWER_SQNR_DB = {"vision": 15.0, "audio": 8.0}
# each rank's dequantized block against the checkpoint's block. Measured: 20.5-21.0 dB, except
# the attention output projections' row shards (o_proj / post: 64 inputs / 2 ranks = rows of
# 32), 13.6-15.1 dB: bitsandbytes' CPU 4-bit quantizer is inaccurate on rows shorter than its
# 64-value block (the same weight quantized whole: 20.7 dB); the towers' outputs still clear
# the TP=1 floors (measured vision 16.9 dB, audio 13.3 dB vs HF's bf16 towers).
BNB_MIN_SHARD_SQNR_DB = {"ReplicatedLinear": 18.0, "ColumnParallelLinear": 18.0,
                         "RowParallelLinear": 12.0}
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


def _tokens(case, prompts=PROMPTS) -> dict[str, list[int]]:
    res = case.result
    assert res["errors"] == {}, case.explain()
    tokens = case.tokens()
    assert sorted(tokens) == sorted(prompts), case.explain()
    assert all(len(t) == case.max_tokens for t in tokens.values())
    return tokens


FUSED_COLUMNS = ("QKVParallelLinear", "MergedColumnParallelLinear")


def _check_sharded(case, quant_class: str) -> None:
    """Each pair sharded on both ranks, column members fused where they read one input (the
    speed rules are on in the engine: sharded and fused together at the first call)."""
    res = case.result
    ranks = res["plugin_records_ranks"]
    assert len(ranks) == 2, case.explain()
    fused_any = False
    for rank, records in enumerate(ranks):
        by_tower = {r["prefix"]: r for r in records}
        assert set(by_tower) == set(TOWERS), (rank, records)
        model = res["models_ranks"][rank]  # the layers vLLM built and loaded in this rank
        for tower in TOWERS:
            rec = by_tower[tower]
            assert rec["fallback"] is None and rec["fallbacks"] == {}, rec
            assert rec["tp_mode"] == {"world_size": 2, "mm_encoder_tp_mode": "weights",
                                      "tp": 2}, rec["tp_mode"]
            report = rec["report"]
            tp = report["tp"]
            assert tp["size"] == 2
            styles = {n.removeprefix(tower + "."): d["style"] for n, d in tp["layers"].items()}
            fused_at = {m: f for f, ms in report["fused"].items() for m in ms}
            linears = model["towers"][tower]["vllm_linears"]
            for layer, style in SHARDED[tower].items():
                got = styles.get(layer)
                if style == "ColumnParallelLinear" and got in FUSED_COLUMNS:
                    fused_any = True
                    style = got
                assert got == style, (rank, tower, layer, got, styles)
                entry = linears[fused_at.get(f"{tower}.{layer}", f"{tower}.{layer}")]
                assert entry["class"] == style and entry["quant_method"] == quant_class, entry
    assert fused_any, "no sharded column layer was fused"
    # the INFO line of each tower in each worker says how many linears were sharded
    lines = [ln for ln in case.log.splitlines() if "fxpass[" in ln and "tp=2:" in ln]
    for tower in TOWERS:
        mine = [ln for ln in lines if f"fxpass[{tower}]: " in ln]
        for worker in ("Worker_TP0", "Worker_TP1"):  # after each first call, in each rank
            assert any(worker in ln for ln in mine), (worker, lines)
        assert all("linears sharded (" in ln and " column, " in ln and " row), " in ln
                   and " replicated" in ln for ln in mine), mine


def _towers_vs_hf(case, floors: dict[str, float]) -> None:
    """Each rank's towers (sharded, all-reduced) against HF's own towers on the inputs vLLM
    gave them during generation."""
    ranks = case.result["tower_vs_hf_ranks"]
    assert len(ranks) == 2
    for rank, got in enumerate(ranks):
        kinds = {k.split("[")[0] for k in got}
        assert kinds == {"vision", "audio"}, got
        for key, m in got.items():
            assert not m.get("shape_mismatch"), (rank, key, m)
            assert m["sqnr_db"] >= floors[key.split("[")[0]], (rank, key, m)


def _rank_captures(case) -> list[dict]:
    """What each worker's towers got and gave during generation (engine_case.py)."""
    import torch

    paths = case.result.get("captures_ranks") or []
    assert len(paths) == 2, case.explain()
    return [torch.load(p) for p in paths]


def _sqnr_db(got, ref) -> float:
    import math

    got, ref = got.float(), ref.float()
    err = float(((got - ref) ** 2).sum())
    return math.inf if err == 0 else 10 * math.log10(float((ref ** 2).sum()) / err)


def test_bf16_tp2_shards_the_towers_and_matches_the_walk_where_fxpass_changes_nothing(
        engine_cases):
    """Against vLLM's own TP=2 run with the plugin off (towers replicated by its walk), on
    the same batches. The text prompt meets no tower: its token ids must be equal. The image
    and audio prompts meet the towers, which fxpass shards: a row-parallel layer rounds each
    rank's bf16 partial product before the all-reduce, so they are not bit-identical to the
    walk's towers, and greedy decoding of the random tiny model can then take another token.
    Measured (AMD EPYC, avx2 only): the vision output differs from the walk's in 973 of 3840
    elements (52.9 dB, as against HF's: the walk's is HF's bit for bit) and the image
    prompt's 5th token differs (140 vs 20). So their token ids are not compared; their
    towers are, in each worker, against the walk's and HF's within the bf16 TP budget."""
    from fxpass.verify.budgets import tp_budget

    tp2 = engine_cases.get("bf16_tp2").require_done()
    walk = engine_cases.get("bf16_tp2_off").require_done()
    _check_sharded(tp2, "UnquantizedLinearMethod")
    # vLLM's encoder attention on the sharded heads: one of the two per rank, on each rank
    for rank, recs in enumerate(tp2.result["plugin_records_ranks"]):
        vision = {r["prefix"]: r for r in recs}["vision_tower"]["report"]
        attention = [f["detail"] for f in vision["fixes"] if f["rule"] == "mm-attention"]
        assert len(attention) == 1 and "attn(heads=1, head_size=32" in attention[0], (
            rank, attention)
    assert walk.result["plugin_records_ranks"] == [[], []]  # FXPASS_DISABLE=1 in the workers
    got, ref = _tokens(tp2), _tokens(walk, ("text", "image"))
    assert got["text"] == ref["text"]
    for label, batch in walk.result["batches"].items():  # the same inputs reached the model
        for p, gen in batch.items():
            assert tp2.result["batches"][label][p]["prompt_token_ids"] == gen["prompt_token_ids"]
    floor = tp_budget("bfloat16").exact_sqnr_db
    _towers_vs_hf(tp2, {"vision": floor, "audio": floor})
    for rank, (mine, theirs) in enumerate(zip(_rank_captures(tp2), _rank_captures(walk))):
        assert len(mine["vision_out"]) == len(theirs["vision_out"]) == 1, rank
        for a, b in zip(mine["vision_calls"], theirs["vision_calls"]):  # the same pixels
            assert all(a[k].equal(b[k]) for k in ("pixel_values", "pixel_position_ids"))
        for a, b in zip(mine["vision_out"], theirs["vision_out"]):
            assert a.shape == b.shape and _sqnr_db(a, b) >= floor, (rank, _sqnr_db(a, b))


def test_bnb_tp2_keeps_the_towers_replicated_and_generates(engine_cases):
    """On the checkpoint variant with 2 text KV heads (conftest.py). The towers are sharded
    at their first call, from the layers vLLM's loader filled; bnb-quantized layers hold
    packed 4-bit weights, which are not re-sliced, so a bnb tower stays replicated (as
    vLLM's walk leaves it), and the report says why. vLLM's bnb loader quantizes the
    language model per shard at TP=2, which changes even the text prompt's token ids against
    TP=1 (measured, with or without fxpass): the towers are checked against HF's instead, at
    the nf4 floors of the TP=1 test."""
    tp2 = engine_cases.get("bnb_kv2_tp2").require_done()
    for rank, records in enumerate(tp2.result["plugin_records_ranks"]):
        by_tower = {r["prefix"]: r for r in records}
        for tower in TOWERS:
            rec = by_tower[tower]
            assert rec["fallback"] is None and rec["fallbacks"] == {}, rec
            layers = rec["report"]["tp"]["layers"]
            assert layers and all(d["style"] == "replicated" for d in layers.values()), layers
            assert all("quantized by vLLM's loader" in d["reason"]
                       for n, d in layers.items() if n.removeprefix(tower + ".")
                       in SHARDED[tower]), layers
    _tokens(tp2)
    _towers_vs_hf(tp2, BNB_MIN_TOWER_SQNR_DB)
    for rank, model in enumerate(tp2.result["models_ranks"]):
        for tower in TOWERS:
            for name, entry in model["towers"][tower]["vllm_linears"].items():
                assert entry["bnb_quant_state"], (rank, name)
                assert entry["bnb_sqnr_db"] is not None and entry["bnb_sqnr_db"] > \
                    BNB_MIN_SHARD_SQNR_DB[entry["class"]], (rank, name, entry)
