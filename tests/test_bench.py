"""The benchmark's quick mode runs end to end (figures come from its full mode, never asserts)."""

from __future__ import annotations

import pytest

from fxpass import bench

pytestmark = pytest.mark.usefixtures("vllm_rt")


def test_quick_benchmark_runs_and_reports_ratios():
    result = bench.run(quick=True, repeats=1)
    for name in ("gemma4_vision", "gemma4_audio"):
        r = result["pass_time"][name]
        assert r["walk_s"] > 0 and r["fxpass_warm_s"] > 0 and r["warm_over_walk"] > 0
    for dt in ("fp32", "bf16", "nf4"):
        row = result["forward"][dt]
        assert set(row["weight_bytes"]) == {"hf", "walk", "fxpass", "fxpass_fused"}
        cell = next(v for k, v in row.items() if k.startswith("patches_"))
        assert set(cell["speedup_vs_hf"]) == {"hf", "walk", "fxpass", "fxpass_fused"}
        assert all(v > 0 for v in cell["peak_forward_bytes"].values())
    assert result["verify"]["passed"] is True
    for name in ("gemma4_vision", "gemma4_audio"):
        r = result["first_call"][name]
        assert r["first_s"] > 0 and r["init_first_s"] > 0 and r["trace_and_rewrite_s"] > 0
    for tower in bench.PEER_TOWERS:
        for dt in ("fp32", "bf16", "nf4"):
            r = result["peers"][tower][dt]
            want = {"hf", "walk", "fxpass"} | ({"vllm"} if tower == "siglip" and dt != "nf4"
                                               else set())
            assert set(r["median_s"]) == want  # no torch.compile rows with --quick
            assert set(r["max_abs_diff_vs_hf"]) == want
            if dt != "nf4":  # unquantized: every row within the budget's reach of HF
                assert all(d <= 0.02 * max(r["max_abs_hf"], 1.0)
                           for d in r["max_abs_diff_vs_hf"].values()), r
            assert r["fastest_peer"] in want - {"fxpass"}
    gains = result["rules"]["gemma4_vision"]["fp32"]
    assert {"rms-norm", "rope"} <= set(gains["fixes"]) and gains["gain"]["fuse=False"] > 0
    assert "without rope" in gains["gain"] and "without rms-norm" in gains["gain"]
    text = bench.table(result)
    assert "pass time" in text and "verify:" in text and "peers:" in text
    assert "speed rules:" in text and "first call after apply" in text
    md = bench.peers_markdown(result)
    assert "| siglip | fp32 |" in md and "| gemma4_vision | fp32 | " in md
