"""Tensor-parallel towers on 2 real ranks (two CPU processes, one vLLM TP group).

One pair of worker processes (tp_worker.py) runs every check (the four towers sharded with
and without fusion at three input sizes, verify in both modes, bnb nf4 per shard, per-rank
bytes, the refusal toys, load_checkpoint); the tests below read their results. Budgets: the
unquantized fp32 budget of fxpass.verify (docs/verify.md), and the issue's 0.5 dB for nf4.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fxpass import zoo
from fxpass.verify.budgets import resolve_budget

WORKER = Path(__file__).resolve().parent / "tp_worker.py"
REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 420

pytestmark = pytest.mark.processes  # two rank processes
ATOL = 1.42e-5  # the unquantized fp32 budget (fxpass/verify/budgets.py): outputs are O(1)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("tp")
    init = out / "store"
    env = dict(os.environ)
    env.pop("VLLM_DIST_IDENT", None)  # vllm_runtime(tp=2) sets it from the init file
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # the workers import fxpass from this checkout, as the tests do
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    procs = []
    for rank in range(2):
        log = open(out / f"rank{rank}.log", "wb")
        procs.append((subprocess.Popen(
            [sys.executable, str(WORKER), str(rank), str(init), str(out)], env=env,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log))
    failed = []
    for rank, (proc, log) in enumerate(procs):
        try:
            rc = proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for p, _ in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            rc = -9
        log.close()
        if rc != 0:
            failed.append(rank)
    if failed:
        logs = "\n".join(f"--- rank {r} ---\n" + (out / f"rank{r}.log").read_text()[-6000:]
                         for r in failed)
        pytest.fail(f"tensor-parallel worker rank(s) {failed} failed:\n{logs}")
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r in results:
        r["_out"] = str(out)
    for r in results:
        print(f"rank {r['rank']} timings (s):", {k: round(v, 1) for k, v in
                                                 r["timings_s"].items()})
    return results


def test_each_worker_joined_one_group_of_two(ranks):
    assert [r["group"] for r in ranks] == [[0, 2], [1, 2]]


# The styles each tower gets (the TP=2 layers of one encoder layer; names without "tower.").
EXPECTED = {
    "gemma4_vision": {
        "encoder.layers.0.self_attn.q_proj.linear": "ColumnParallelLinear",
        "encoder.layers.0.self_attn.o_proj.linear": "RowParallelLinear",
        "encoder.layers.0.mlp.up_proj.linear": "ColumnParallelLinear",
        "encoder.layers.0.mlp.down_proj.linear": "RowParallelLinear",
    },
    "gemma4_audio": {
        "layers.0.self_attn.q_proj.linear": "ColumnParallelLinear",
        "layers.0.self_attn.relative_k_proj": "ColumnParallelLinear",
        "layers.0.self_attn.post.linear": "RowParallelLinear",
        "layers.0.feed_forward1.ffw_layer_1.linear": "ColumnParallelLinear",
        "layers.0.feed_forward2.ffw_layer_2.linear": "RowParallelLinear",
    },
    "siglip_vision": {
        "encoder.layers.0.self_attn.k_proj": "ColumnParallelLinear",
        "encoder.layers.0.self_attn.out_proj": "RowParallelLinear",
        "encoder.layers.1.mlp.fc1": "ColumnParallelLinear",
        "head.mlp.fc2": "RowParallelLinear",
    },
    "clip_vision": {
        "encoder.layers.0.self_attn.v_proj": "ColumnParallelLinear",
        "encoder.layers.1.self_attn.out_proj": "RowParallelLinear",
        "encoder.layers.0.mlp.fc2": "RowParallelLinear",
    },
}
REPLICATED = {  # what stays replicated, and a word of why
    "gemma4_vision": {"patch_embedder.input_proj": "not in a column -> row pair"},
    "gemma4_audio": {"layers.0.lconv1d.linear_start.linear": "glu halves the sharded dim",
                     "layers.0.lconv1d.linear_end.linear": "glu halves the sharded dim",
                     "output_proj": "not in a column -> row pair",
                     "subsample_conv_projection.input_proj_linear": "not in a column -> row"},
    "siglip_vision": {},
    "clip_vision": {},
}


@pytest.mark.parametrize("fuse", ["plain", "fused"])
@pytest.mark.parametrize("name", zoo.KNOWN_TOWERS)
def test_sharded_tower_gives_the_unsharded_answer_on_both_ranks(ranks, name, fuse):
    for r in ranks:
        entry = r[f"{name}/{fuse}"]
        assert sorted(entry["max_abs"]) == ["0", "1", "2"], entry["max_abs"]
        for size, err in entry["max_abs"].items():
            assert err <= ATOL, (r["rank"], name, fuse, size, err)
        for run, v in entry["verify"].items():
            assert v["passed"], (r["rank"], name, fuse, run, v["first_divergence"])
        tp = entry["report"]["tp"]
        assert tp["size"] == 2
        styles = {n.removeprefix("tower."): d["style"] for n, d in tp["layers"].items()}
        for layer, style in EXPECTED[name].items():
            if fuse == "fused" and style == "ColumnParallelLinear" and name in (
                    "siglip_vision", "clip_vision") and "self_attn" in layer:
                style = "QKVParallelLinear"
            assert styles.get(layer) == style, (name, fuse, layer, styles.get(layer))
        replicated = {n.removeprefix("tower."): d.get("reason", "") for n, d in
                      tp["layers"].items() if d["style"] == "replicated"}
        assert set(replicated) == set(REPLICATED[name]), replicated
        for layer, why in REPLICATED[name].items():
            assert why in replicated[layer], (layer, replicated[layer])
        assert "tp=2:" in entry["summary"] and "linears sharded" in entry["summary"]


@pytest.mark.parametrize("name", zoo.KNOWN_TOWERS)
def test_towers_applied_without_inputs_shard_and_fuse_at_their_first_call(ranks, name):
    """No example inputs (vLLM's model init): replicated layers at apply, filled by the
    loader; the first call shards them (q/k/v fused into one QKVParallelLinear) from the
    loaded weights, each rank keeping its block, and answers as the unsharded tower."""
    for r in ranks:
        entry = r[f"{name}/first_call"]
        assert entry["traced_at"] == "first call"
        before = entry["styles_before"]
        assert "ReplicatedLinear" in before and not any("Parallel" in s for s in before), before
        for size, err in entry["max_abs"].items():
            assert err <= ATOL, (r["rank"], name, size, err)
        layers = entry["report"]["tp"]["layers"]
        styles = {n.removeprefix("tower."): d["style"] for n, d in layers.items()}
        for layer, style in EXPECTED[name].items():
            if style == "ColumnParallelLinear" and name in (
                    "siglip_vision", "clip_vision") and "self_attn" in layer:
                style = "QKVParallelLinear"
            assert styles.get(layer) == style, (name, layer, styles.get(layer), styles)
        replicated = {n.removeprefix("tower."): d.get("reason", "") for n, d in
                      layers.items() if d["style"] == "replicated"}
        assert set(replicated) == set(REPLICATED[name]), replicated
        assert "tp=2:" in entry["summary"] and "linears sharded" in entry["summary"]


def test_same_answer_on_both_ranks(ranks):
    """Both ranks end with the full (all-reduced) output: the same shapes everywhere."""
    for key, entry in ranks[0].items():
        if isinstance(entry, dict) and "shapes" in entry:
            assert entry["shapes"] == ranks[1][key]["shapes"], key


def test_gemma4_audio_head_count_constants_rewritten_per_rank(ranks):
    report = ranks[0]["gemma4_audio/plain"]["report"]
    consts = [c for p in report["tp"]["pairs"] for c in p["constants"]]
    assert len(consts) == 6, consts  # the four views of (.., num_heads, head_dim) and two more
    assert all("size 2 at the sharded dim" in c and "-> 1 per rank (tp=2)" in c for c in consts)
    fixes = [f for f in report["fixes"] if f["rule"] == "tensor-parallel"]
    assert len(fixes) == 6


def test_fused_columns_are_one_qkv_layer(ranks):
    report = ranks[0]["siglip_vision/fused"]["report"]
    fused = {k.removeprefix("tower."): v for k, v in report["fused"].items()}
    assert fused["encoder.layers.0.self_attn.fused__q_proj__k_proj__v_proj"] == [
        "tower.encoder.layers.0.self_attn.q_proj", "tower.encoder.layers.0.self_attn.k_proj",
        "tower.encoder.layers.0.self_attn.v_proj"]
    # Gemma4's projections clip their inputs (per layer): each stays its own column layer
    g = ranks[0]["gemma4_vision/fused"]["report"]
    assert not g["fused"]


def test_nf4_per_shard_within_half_a_db_of_replicated_nf4(ranks):
    for r in ranks:
        for name in zoo.KNOWN_TOWERS:
            got = r[f"{name}/nf4"]
            assert got["verify_passed"], (name, got["verify_first_divergence"])
            for size, tp1 in got["tp1"].items():
                tp2 = got["tp2"][size]
                assert math.isfinite(tp2) and tp2 >= tp1 - 0.5, (r["rank"], name, size, tp1,
                                                                  tp2)


def test_per_rank_bytes_of_sharded_linears_halve(ranks):
    for r in ranks:
        for name in zoo.KNOWN_TOWERS:
            for quant, b in r[f"{name}/bytes"].items():
                assert b["n_sharded"] > 0
                ratio = b["sharded_weight_bytes"] / b["replicated_weight_bytes"]
                assert abs(ratio - 0.5) < 0.02, (name, quant, ratio)
                # row-parallel biases stay whole on every rank
                total = b["sharded_bytes"] / b["replicated_bytes"]
                assert 0.5 <= total < 0.55, (name, quant, total)
                assert 0.4 < b["sharded_fraction"] < 1.0


@pytest.mark.parametrize("toy,reason", [
    ("head_mixing", "softmax over the sharded dim (mixes heads / channels)"),
    ("odd_heads", "holds 3 heads, which do not divide by tp=2 (vLLM runs such a tower data "
                  "parallel"),
    ("tied", "it stays nn.Linear (its weight is shared with"),
])
def test_refused_pairs_stay_replicated_and_correct(ranks, toy, reason):
    for r in ranks:
        entry = r[f"toy/{toy}"]
        report = entry["report"]
        refusals = [x for x in report["refusals"] if x["rule"] == "tensor-parallel"]
        assert refusals and all(reason in x["reason"] for x in refusals), refusals
        assert not report["tp"]["pairs"]
        layers = report["tp"]["layers"]
        assert all(d["style"] == "replicated" for d in layers.values()), layers
        assert all(reason in d["reason"] for n, d in layers.items() if n != "proj"
                   or toy != "tied"), layers
        assert max(entry["max_abs"]) <= ATOL, entry["max_abs"]


def test_control_toy_shards(ranks):
    entry = ranks[1]["toy/per_head_mlp"]
    assert entry["report"]["tp"]["layers"] == {"fc1": {"style": "ColumnParallelLinear"},
                                               "fc2": {"style": "RowParallelLinear"}}
    assert max(entry["max_abs"]) <= ATOL


@pytest.mark.parametrize("fuse", ["plain", "fused"])
def test_load_checkpoint_fills_sharded_layers_from_original_names(ranks, fuse):
    for r in ranks:
        entry = r[f"checkpoint/{fuse}"]
        assert entry["loose"] == []
        assert entry["max_abs"] <= ATOL, entry


def test_budget_used_is_the_unquantized_fp32_one():
    import torch

    b = resolve_budget(None, torch.float32, "none")
    assert b.atol == ATOL


@pytest.mark.parametrize("spec,style", [
    ("wrong-weights:encoder.layers.0.self_attn.out_proj", "RowParallelLinear"),
    ("transpose:encoder.layers.1.mlp.fc1", "ColumnParallelLinear"),
])
def test_verify_on_each_rank_names_a_planted_fault_in_a_sharded_layer(ranks, spec, style):
    layer = spec.partition(":")[2]
    for r in ranks:
        got = r[f"fault/{spec}"]
        assert got["style"] == style and got["layer"] == layer
        assert not got["passed"]
        assert got["first"]["module"] == layer, got["first"]


def test_viz_marks_column_row_layers_and_refused_pairs(ranks, tmp_path_factory):
    out = Path(ranks[0]["_out"])
    html = (out / "audio_tp.html").read_text()
    dot = (out / "audio_tp.dot").read_text()
    assert 'id="count-tp-sharded">9<' in html
    assert 'id="count-tp-refused">1<' in html
    assert "Tensor-parallel pairs refused (1)" in html
    assert "glu halves the sharded dim" in html
    assert '"tp":{"style":"RowParallelLinear"' in html
    assert '"tp":{"style":"ColumnParallelLinear"' in html
    assert '"tpr":"pair refused:' in html
    assert dot.count("tp-column") >= 6 and dot.count("tp-row") >= 3
    assert "tp-refused" in dot and "glu halves the sharded dim" in dot


@pytest.mark.parametrize("step", ["match", "check", "apply", "build_parallel_linear",
                                  "build_fused_parallel_linear", "load_linear_weights",
                                  "load_fused_weights"])
def test_tensor_parallel_failures_leave_the_model_untouched(ranks, step):
    """Each step of the rule and each parallel layer build / load fails in turn (in the
    worker): an FxpassError naming it, the model exactly as before (modules, state_dict,
    forwards, output), and a clean sharded apply afterwards."""
    for r in ranks:
        got = r["atomic"][step]
        assert got["error"] is not None and f"injected into {step}" in got["error"], got
        assert got["unchanged_output"]
        assert got["clean_apply_sharded"] == 14 and got["clean_max_abs"] <= ATOL, got


def test_sharded_attention_traced_again_for_a_masked_call(ranks):
    """Gemma4 vision traced without padding takes HF's no-mask shortcut; a padded input gives
    its attention a mask: the sharded attention is traced again as its unsharded self and
    re-sharded (fxpass.parallel.rule.reshard), never run as Python; the results
    above (size 1 has padding) hold on both ranks."""
    for r in ranks:
        entry = r["gemma4_vision/plain"]
        spec = entry.get("specialisations", {})
        assert any(m.endswith("self_attn") for m in spec), entry.get("specialisations")
        assert not any(m.endswith("self_attn") for m in entry.get("fallbacks", {}))
