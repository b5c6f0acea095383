"""vLLM serves the tiny Gemma4-MM checkpoint with fxpass-rewritten towers (issue 5).

Four engine cases (see conftest.py), greedy, 8 new tokens per prompt, prompts text / image /
audio: bf16 unquantized and in-flight bitsandbytes 4-bit, each with the fxpass plugin on and
switched off (FXPASS_DISABLE=1, i.e. vLLM's own recursive_replace_linear: "the seed's walk").
"""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.slow

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
        # every linear of the tower is a vLLM layer, and fxpass placed each one in a graph
        assert info["nn_linears"] == []
        assert sorted(report["replaced"]) == sorted(linears)
        assert sorted(report["graph_rewrites"]) == sorted(linears)
        assert report["plain_swaps"] == {} and report["skipped"] == {}
        # the towers' submodules run their graphs (a root whose mask HF builds through its
        # data-dependent "nothing padded" shortcut runs as Python, as eager decides)
        graphs = res["graph_modules_after"][tower]
        assert len(graphs) > 10, graphs
        for name, layer in linears.items():
            assert layer["class"] == "ReplicatedLinear"
            assert layer["prefix"] == name  # the checkpoint-style prefix loaders match on
            assert layer["quant_method"] == quant_method, (name, layer)
            # vLLM's loader fed this layer the checkpoint's tensor (weight and bias)
            for part in ("weight", "bias"):
                ref = checkpoint.get(f"model.{name}.{part}")
                if ref is None:
                    continue
                load = res["weight_loads"].get(f"{name}.{part}")
                assert load is not None, f"vLLM's loader never filled {name}.{part}"
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


def _same_towers(on, off, kinds) -> None:
    """Token ids of two runs are compared only where the towers fed the language model the
    same bits: then nothing but fxpass differs, and any token difference is fxpass's. At
    TP=1 fxpass's graphs run the walk's own layers and ops, so they must be bit-identical
    (measured: vision and audio, bf16 and bnb, on AMD EPYC avx2)."""
    mine, theirs = _tower_outputs(on), _tower_outputs(off)
    for kind in kinds:
        assert len(mine[kind]) == len(theirs[kind]) > 0, (kind, len(mine[kind]))
        for a, b in zip(mine[kind], theirs[kind]):
            assert a.equal(b), (kind, int((a != b).sum()), a.numel())


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
    # the audio fix that makes it work: fxpass made lconv1d.linear_end's input contiguous
    audio = {r["prefix"]: r for r in case.result["plugin_records"]}["audio_tower"]["report"]
    assert [f["module"] for f in audio["fixes"] if f["rule"] == "contiguity"] == [
        "layers.0.lconv1d.linear_end"]


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
    # where the seed's walk works, the towers give the same bits and the token ids are equal
    _same_towers(on, off, kinds)
    for p in off_tokens:
        assert on_tokens[p] == off_tokens[p], p


def test_bf16_tower_outputs_match_hf(engine_cases):
    import torch

    case = _case(engine_cases, "bf16_on")
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
    _same_towers(on, off, ("vision", "audio"))
    for p in PROMPTS:
        assert on_tokens[p] == off_tokens[p], p
    # the seed's walk built the same layers at the same prefixes with the same quant method
    for tower in TOWERS:
        a = on.result["model"]["towers"][tower]["vllm_linears"]
        b = off.result["model"]["towers"][tower]["vllm_linears"]
        assert sorted(a) == sorted(b)
        for n in a:
            for k in ("class", "prefix", "quant_method", "weight_shape", "bnb_sqnr_db"):
                assert a[n][k] == b[n][k], (n, k)


def test_report_in_vllm_log(engine_cases):
    on = _case(engine_cases, "bnb_on")  # runs with VLLM_LOGGING_LEVEL=DEBUG
    lines = on.log.splitlines()
    for tower in TOWERS:
        # at INFO: the report's summary line at init (the swap), then after each first call
        # of a part of the tower (the graphs, their fixes and the first calls' time); vLLM
        # calls the vision tower's patch_embedder and encoder, the audio tower itself
        info = [ln for ln in lines if " INFO " in ln and f"fxpass[{tower}]: " in ln]
        assert len(info) == (3 if tower == "vision_tower" else 2), info
        assert "linears -> vLLM at init" in info[0] and "come at the first call" in info[0]
        assert "graphs traced at the first call" in info[1], info
        # the table at DEBUG: one row per replaced layer, with how and the quant type
        assert any(" DEBUG " in ln and f"fxpass[{tower}] report:" in ln for ln in lines)
    rows = [ln for ln in lines if " DEBUG " in ln and "mlp.down_proj.linear" in ln
            and "vllm_plugin.py" in ln]
    # the table after the encoder's first call (after patch_embedder's it still says "swap")
    assert rows and "graph" in rows[-1], rows
    off = _case(engine_cases, "bnb_off")
    assert "linears -> vLLM" not in off.log
