"""The benchmark's quick mode runs end to end (figures come from its full mode, never asserts)
and its statistics come from torch.utils.benchmark Measurements."""

from __future__ import annotations

import math
import time

import pytest

from fxpass import bench
from fxpass.bench_stats import interleaved, interleaved_on_copies, samples
from fxpass.errors import UsageError

pytestmark = pytest.mark.usefixtures("vllm_rt")

# bf16 rows run the fp32 rows' code in another dtype: the quick test leaves them out (a
# third of the forward and peers sections' cost); fp32 and nf4 (bitsandbytes) stay.
DTYPES = ("fp32", "nf4")


def _finite_positive(values) -> bool:
    return all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in values)


def test_quick_benchmark_runs_and_reports_ratios():
    result = bench.run(quick=True, repeats=1, dtypes=DTYPES)
    assert result["dtypes"] == list(DTYPES) and "torch.utils.benchmark" in result["stats"]
    assert set(bench.SECTIONS) - set(bench.ON_REQUEST) <= set(result)
    assert "engine" not in result  # starts vLLM engines: only with --only engine
    for name in ("gemma4_vision", "gemma4_audio"):
        r = result["pass_time"][name]
        assert r["walk_s"] > 0 and r["fxpass_warm_s"] > 0 and r["warm_over_walk"] > 0
        assert _finite_positive([r["warm_over_walk"], r["cold_over_from_config"]])
        assert set(r["iqr_s"]) == {"from_config", "walk", "fxpass_warm"}
    assert set(result["forward"]) == set(DTYPES)  # bf16 left out as asked
    for dt in DTYPES:
        row = result["forward"][dt]
        assert set(row["weight_bytes"]) == {"hf", "walk", "fxpass", "fxpass_fused"}
        cell = next(v for k, v in row.items() if k.startswith("patches_"))
        assert set(cell["speedup_vs_hf"]) == {"hf", "walk", "fxpass", "fxpass_fused"}
        assert _finite_positive(cell["speedup_vs_hf"].values())
        assert set(cell["iqr_s"]) == set(cell["median_s"])
        assert all(v > 0 for v in cell["peak_forward_bytes"].values())
    assert result["verify"]["passed"] is True
    for name in ("gemma4_vision", "gemma4_audio"):
        r = result["first_call"][name]
        assert r["first_s"] > 0 and r["init_first_s"] > 0 and r["trace_and_rewrite_s"] > 0
    for form, r in result["graph_call"].items():
        assert _finite_positive([r["module_us"], r["graph_us"]]), form
        assert r["graph_iqr_us"] >= 0 and r["module_iqr_us"] >= 0
    assert _finite_positive([result["verify"]["verify_over_forward"]])
    for tower in bench.PEER_TOWERS:
        assert set(result["peers"][tower]) == set(DTYPES)
        for dt in DTYPES:
            r = result["peers"][tower][dt]
            want = {"hf", "walk", "fxpass"} | ({"vllm"} if tower == "siglip" and dt != "nf4"
                                               else set())
            assert set(r["median_s"]) == want  # no torch.compile rows with --quick
            assert set(r["max_abs_diff_vs_hf"]) == want
            if dt != "nf4":  # unquantized: every row within the budget's reach of HF
                assert all(d <= 0.02 * max(r["max_abs_hf"], 1.0)
                           for d in r["max_abs_diff_vs_hf"].values()), r
            assert r["fastest_peer"] in want - {"fxpass"}
            assert _finite_positive(r["speedup_vs_hf"].values())
            assert _finite_positive([r["fxpass_over_fastest_peer"]])
    gains = result["rules"]["gemma4_vision"]["fp32"]
    assert {"rms-norm", "rope"} <= set(gains["fixes"]) and gains["gain"]["fuse=False"] > 0
    assert "without rope" in gains["gain"] and "without rms-norm" in gains["gain"]
    for tower in bench.PEER_TOWERS:  # vLLM's encoder attention against the tower's SDPA
        rows = result["attention"][tower]["fp32"]
        assert all(r["sites"] > 0 and _finite_positive([r["gain"]]) for r in rows.values())
    assert set(result["attention"]["gemma4_vision"]["fp32"]) == {"one image", "two, one padded"}
    text = bench.table(result)
    assert "encoder attention:" in text
    assert "pass time" in text and "verify:" in text and "peers:" in text
    assert "speed rules:" in text and "first call after apply" in text
    assert "graph forward call (keywords)" in text and "IQR" in text
    md = bench.peers_markdown(result)
    assert "| siglip | fp32 |" in md and "| gemma4_vision | fp32 | " in md


def test_statistics_are_torch_benchmark_measurements():
    """Interleaved rounds merge into one Measurement per variant (median, IQR, every
    round's times); one-at-a-time timings (fresh copies, first calls) are Measurements too."""
    calls = {"a": 0, "b": 0}

    def work(name, seconds):
        def fn():
            calls[name] += 1
            time.sleep(seconds)
        return fn

    ms = interleaved({"a": work("a", 0.002), "b": work("b", 0.004)}, rounds=3,
                     min_run_time=0.01)
    assert set(ms) == {"a", "b"} and ms["a"].median < ms["b"].median
    assert len(ms["a"].times) >= 3 and ms["a"].iqr >= 0 and ms["a"].number_per_run == 1
    quick = interleaved({"a": work("a", 0.001)}, rounds=2, min_run_time=None)
    assert len(quick["a"].times) == 2  # Timer.timeit(1) per round
    copies = interleaved_on_copies(list, {"append": lambda xs: xs.append(1)}, rounds=4,
                                   collect=False)
    assert len(copies["append"].times) == 4
    assert samples([1.0, 2.0, 3.0, 4.0], "x").median == 2.5
    assert samples([1.0, 2.0, 3.0, 4.0], "x").iqr == 1.5


def test_bench_cli_validates_sections_and_dtypes(capsys):
    from fxpass.cli import main

    assert main(["bench", "--only", "nope"]) == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    assert main(["bench", "--dtype", "int4"]) == 2
    assert "invalid choice: 'int4'" in capsys.readouterr().err
    with pytest.raises(UsageError, match=r"unknown bench dtype 'int4'; valid: fp32, bf16, nf4"):
        bench.run(quick=True, dtypes=("int4",))
