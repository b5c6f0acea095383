"""Encoder time per image / audio clip inside a vLLM engine: the walk against fxpass's plugin.

``fxpass bench --only engine`` runs this (it needs a source checkout: the tokenizer, the
processor and the torchvision stand-in come from ``tests/e2e``). It builds, offline, a
Gemma4-MM checkpoint whose vision tower is full width (Gemma4VisionConfig's defaults, 4
layers, ``--soft-tokens`` soft tokens per image: 140 = 1260 patches) and whose audio tower is
full width (2 layers), with a tiny language model. Then, per dtype and round, three engines,
each in its own process, one after the other (interleaved across rounds):

* ``walk``: ``FXPASS_DISABLE=1`` (vLLM's own ``recursive_replace_linear``);
* ``plugin``: fxpass's plugin with its defaults (every rule, warm-up at engine start);
* ``plugin+compile``: the same with ``compilation_config={"compile_mm_encoder": True}`` and
  without ``enforce_eager`` (under it vLLM compiles no encoder, nor does fxpass).

Each engine answers, one request at a time with ``max_tokens=1``: text-only prompts (the
baseline), then ``--items`` distinct images and audio clips (distinct, so vLLM's encoder
cache cannot serve them). Encoder time per item = its latency minus the median text-only
latency. The first image / audio request after the engine starts is reported apart (what a
user pays when tracing is not brought forward). Token ids are compared with the walk's run.
Prints a table; ``--json`` writes everything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
E2E = ROOT / "tests" / "e2e"
VARIANTS = ("walk", "plugin", "plugin+compile")
ENV = {
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def build_checkpoint(path: Path, soft_tokens: int) -> Path:
    """The benchmark's Gemma4-MM directory (bf16 weights, tokenizer, processor)."""
    sys.path[:0] = [str(E2E / "standin"), str(E2E)]
    import torch
    import transformers as tf

    import tiny_mm
    from fxpass import zoo

    config = zoo._tiny_gemma4_config(1)  # noqa: SLF001 - the tiny text model and token ids
    vision = tf.Gemma4VisionConfig(num_hidden_layers=4)
    vision.default_output_length = soft_tokens
    audio = tf.Gemma4AudioConfig(num_hidden_layers=2)
    config.vision_config, config.audio_config = vision, audio
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tf.Gemma4ForConditionalGeneration(config).eval()
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(path)
    tok = tiny_mm.build_tokenizer()
    from transformers.models.gemma4 import (
        Gemma4AudioFeatureExtractor,
        Gemma4ImageProcessor,
        Gemma4Processor,
        Gemma4VideoProcessor,
    )

    proc = Gemma4Processor(feature_extractor=Gemma4AudioFeatureExtractor(),
                           image_processor=Gemma4ImageProcessor(max_soft_tokens=soft_tokens),
                           tokenizer=tok, video_processor=Gemma4VideoProcessor(),
                           image_seq_length=soft_tokens)
    proc.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# ------------------------------------------------------------------ one engine (subprocess)


def _image(seed: int, side: int) -> Any:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, size=(side, side, 3), dtype=np.uint8), "RGB")


def _audio(seed: int) -> Any:
    import numpy as np

    rng = np.random.default_rng(1000 + seed)
    t = np.arange(16000) / 16000
    wave = 0.3 * np.sin(2 * np.pi * (200 + 40 * seed) * t) + 0.05 * rng.standard_normal(t.shape)
    return wave.astype(np.float32), 16000


def engine_main(spec: dict[str, Any]) -> dict[str, Any]:
    """Start one engine, time the requests, return the measurements."""
    t0 = time.perf_counter()
    from vllm import LLM, SamplingParams

    kwargs: dict[str, Any] = dict(
        model=spec["model"], dtype=spec["dtype"], max_model_len=1024, enforce_eager=True,
        max_num_seqs=1, max_num_batched_tokens=1024, seed=0,
        limit_mm_per_prompt={"image": 1, "audio": 1, "video": 0})
    if spec["variant"] == "plugin+compile":
        # vLLM compiles no encoder under enforce_eager (compilation mode NONE): this engine
        # runs vLLM-CPU's default compilation (its language model compiled too; the text-only
        # baseline takes that out of the encoder time)
        kwargs.update(enforce_eager=False, compilation_config={"compile_mm_encoder": True})
    llm = LLM(**kwargs)
    started = time.perf_counter() - t0
    params = SamplingParams(max_tokens=1, temperature=0.0)

    def timed(req: dict[str, Any]) -> tuple[float, list[int]]:
        t = time.perf_counter()
        out = llm.generate([req], params, use_tqdm=False)[0]
        return time.perf_counter() - t, list(out.outputs[0].token_ids)

    res: dict[str, Any] = {"engine_start_s": started, "text_s": [], "image_s": [],
                           "audio_s": [], "tokens": {}}
    side = spec["image_side"]
    first_image = {"prompt": "describe <|image|> this", "multi_modal_data": {
        "image": _image(999, side)}}
    first_audio = {"prompt": "what <|audio|> sound", "multi_modal_data": {"audio": _audio(999)}}
    res["first_image_s"], _ = timed(first_image)
    for i in range(spec["items"]):
        s, _ = timed({"prompt": f"hello world {i} what is this"})
        res["text_s"].append(s)
    for i in range(spec["items"]):
        s, tok = timed({"prompt": "describe <|image|> this",
                        "multi_modal_data": {"image": _image(i, side)}})
        res["image_s"].append(s)
        res["tokens"][f"image{i}"] = tok
    try:  # last: the walk's unquantized audio fails where vLLM-CPU's GEMM is oneDNN's
        res["first_audio_s"], _ = timed(first_audio)
        for i in range(spec["items"]):
            s, tok = timed({"prompt": "what <|audio|> sound",
                            "multi_modal_data": {"audio": _audio(i)}})
            res["audio_s"].append(s)
            res["tokens"][f"audio{i}"] = tok
    except Exception as e:  # noqa: BLE001 - recorded; nothing runs after it
        res["audio_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return res


# ------------------------------------------------------------------ the orchestration


def _run_engine(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    env.update(ENV)
    env["PYTHONPATH"] = os.pathsep.join([str(E2E / "standin"), str(ROOT)]
                                        + [p for p in env.get("PYTHONPATH", "").split(
                                            os.pathsep) if p])
    env.pop("FXPASS_DISABLE", None)
    if spec["variant"] == "walk":
        env["FXPASS_DISABLE"] = "1"
    with tempfile.TemporaryDirectory() as d:
        spec_path, out_path = Path(d) / "spec.json", Path(d) / "out.json"
        spec_path.write_text(json.dumps({**spec, "out": str(out_path)}))
        proc = subprocess.run([sys.executable, __file__, "--engine", str(spec_path)],
                              env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out_path.exists():
            raise RuntimeError(f"engine {spec['variant']} {spec['dtype']} failed "
                               f"(exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(out_path.read_text())


def run(items: int = 6, rounds: int = 2, dtypes: tuple[str, ...] = ("bfloat16", "float32"),
        soft_tokens: int = 140, timeout: float = 900.0) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="fxpass-engine-bench-"))
    model = build_checkpoint(work / "gemma4-full-towers", soft_tokens)
    side = 768  # the processor resizes to its patch budget: every image the same size
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in range(rounds):
        for dtype in dtypes:
            order = VARIANTS if r % 2 == 0 else tuple(reversed(VARIANTS))
            for variant in order:
                spec = {"model": str(model), "dtype": dtype, "variant": variant,
                        "items": items, "image_side": side}
                runs.setdefault(dtype, {}).setdefault(variant, []).append(
                    _run_engine(spec, timeout))
    return {"machine": _machine(), "items": items, "rounds": rounds,
            "soft_tokens": soft_tokens, "summary": summarise(runs), "runs": runs}


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarise(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dtype, by_variant in runs.items():
        rows: dict[str, Any] = {}
        walk_tokens = by_variant.get("walk", [{}])[0].get("tokens", {})
        for variant, rs in by_variant.items():
            text = _median([s for r in rs for s in r["text_s"]])
            image = _median([s for r in rs for s in r["image_s"]]) - text
            audio = _median([s for r in rs for s in r["audio_s"]]) - text
            rows[variant] = {
                "image_encoder_s": image, "audio_encoder_s": audio, "text_s": text,
                "first_image_s": _median([r["first_image_s"] for r in rs]),
                "first_audio_s": _median([r["first_audio_s"] for r in rs
                                          if "first_audio_s" in r]),
                "audio_error": next((r["audio_error"] for r in rs if "audio_error" in r), None),
                "engine_start_s": _median([r["engine_start_s"] for r in rs]),
                "tokens_equal_walk": all(
                    r["tokens"].get(k) == v for r in rs for k, v in walk_tokens.items()),
            }
        walk = rows.get("walk")
        if walk:
            for variant, row in rows.items():
                row["image_speedup"] = walk["image_encoder_s"] / row["image_encoder_s"]
                row["audio_speedup"] = walk["audio_encoder_s"] / row["audio_encoder_s"]  # nan: no walk
                row["first_image_over_walk"] = row["first_image_s"] / walk["first_image_s"]
                row["first_audio_over_walk"] = row["first_audio_s"] / walk["first_audio_s"]
        out[dtype] = rows
    return out


def _machine() -> dict[str, Any]:
    import platform

    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"processor": model, "cpus": os.cpu_count(), "platform": platform.platform()}


def table(result: dict[str, Any]) -> str:
    lines = [f"engine: {result['machine']['processor']} x {result['machine']['cpus']}; "
             f"{result['items']} images + {result['items']} clips per engine, "
             f"{result['rounds']} rounds; encoder time = latency - text-only latency"]
    for dtype, rows in result["summary"].items():
        for variant, r in rows.items():
            lines.append(
                f"  {dtype:<8} {variant:<15} image {r['image_encoder_s'] * 1e3:7.0f} ms "
                f"({r.get('image_speedup', float('nan')):.2f}x walk)  audio "
                f"{r['audio_encoder_s'] * 1e3:6.0f} ms ({r.get('audio_speedup', float('nan')):.2f}x)"
                f"  first image {r['first_image_s']:.2f} s "
                f"({r.get('first_image_over_walk', float('nan')):.2f}x walk's)  first audio "
                f"{r['first_audio_s']:.2f} s  start {r['engine_start_s']:.1f} s  tokens "
                f"{'= walk' if r['tokens_equal_walk'] else 'differ'}"
                + (f"  audio failed: {r['audio_error']}" if r.get("audio_error") else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--items", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", action="append", choices=("bfloat16", "float32"))
    parser.add_argument("--soft-tokens", type=int, default=140)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.engine:
        spec = json.loads(Path(args.engine).read_text())
        res = engine_main(spec)
        Path(spec["out"]).write_text(json.dumps(res))
        os._exit(0)  # never through vLLM's shutdown (an in-process engine can hang there)
    result = run(args.items, args.rounds, tuple(args.dtype or ("bfloat16", "float32")),
                 args.soft_tokens)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
