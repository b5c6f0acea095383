"""One end-to-end case: start vLLM's LLM engine in this process, generate, record, exit.

Run by tests/e2e/test_vllm_e2e.py as ``python engine_case.py SPEC.json`` in a fresh process
(with the torchvision stand-in first on PYTHONPATH and the engine in-process:
VLLM_ENABLE_V1_MULTIPROCESSING=0), because a failed in-process engine can hang the next call.
SPEC holds: model (directory), quantization (null or "bitsandbytes"), batches (lists of prompt
names from PROMPTS, each list one generate() call, in order; a batch that raises ends the
run), max_tokens, out (a directory). Results go to OUT/result.json, written after every step,
and tensors captured inside the model to OUT/captures.pt. The process leaves with os._exit,
never through vLLM's shutdown, which is where a broken in-process engine can hang.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

T0 = time.perf_counter()

# Prompt texts. The tiny model is random: only the token ids matter, not what they say.
PROMPTS: dict[str, dict[str, Any]] = {
    "text": {"prompt": "hello world what is this", "modality": None},
    "text2": {"prompt": "tell me about the sound and the picture", "modality": None},
    "image": {"prompt": "describe this image <|image|> what is in the image", "modality": "image"},
    "audio": {"prompt": "what is this audio <|audio|> describe the sound", "modality": "audio"},
}


def make_image():
    """A fixed 96x64 RGB image (smooth gradients + noise), built with numpy only."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    h, w = 64, 96
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], axis=-1)
    rgb = rgb + rng.normal(0, 20, size=rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def make_audio(sr: int = 16000, seconds: float = 0.6):
    """A fixed waveform at the feature extractor's rate: two tones and a little noise."""
    import numpy as np

    rng = np.random.default_rng(2)
    t = np.arange(int(sr * seconds)) / sr
    wave = 0.4 * np.sin(2 * np.pi * 220 * t) + 0.2 * np.sin(2 * np.pi * 1330 * t)
    wave = wave + 0.02 * rng.standard_normal(t.shape)
    return wave.astype(np.float32), sr


def _request(name: str) -> dict[str, Any]:
    p = PROMPTS[name.partition("@")[0]]  # "image@good": the image prompt with LoRA "good"
    req: dict[str, Any] = {"prompt": p["prompt"]}
    if p["modality"] == "image":
        req["multi_modal_data"] = {"image": make_image()}
    elif p["modality"] == "audio":
        req["multi_modal_data"] = {"audio": make_audio()}
    return req


class Recorder:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.result: dict[str, Any] = {"steps": [], "batches": {}, "errors": {}}

    def step(self, name: str) -> None:
        self.result["steps"].append([name, round(time.perf_counter() - T0, 3)])
        self.flush()

    def flush(self) -> None:
        tmp = self.out / "result.json.tmp"
        tmp.write_text(json.dumps(self.result, indent=1, default=str))
        tmp.replace(self.out / "result.json")


# ------------------------------------------------------------------ inside the worker
# With VLLM_ENABLE_V1_MULTIPROCESSING=0 the worker is this process: the hooks below reach it.

LOADS: dict[str, dict[str, Any]] = {}  # "<layer prefix>.<weight|bias>" -> what the loader got


def record_weight_loads() -> None:
    """Wrap ReplicatedLinear.weight_loader (before any layer exists) to log what vLLM loads."""
    from vllm.model_executor.layers.linear import ReplicatedLinear

    orig = ReplicatedLinear.weight_loader

    def weight_loader(self, param, loaded_weight):
        which = "weight" if param is getattr(self, "weight", None) else (
            "bias" if param is getattr(self, "bias", None) else "other")
        w = loaded_weight.detach().float()
        LOADS[f"{self.prefix}.{which}"] = {
            "shape": list(loaded_weight.shape), "dtype": str(loaded_weight.dtype),
            "sum": float(w.sum()), "abs_sum": float(w.abs().sum()),
        }
        return orig(self, param, loaded_weight)

    ReplicatedLinear.weight_loader = weight_loader


def inspect_model(model) -> dict[str, Any]:
    """Which classes sit where in the towers, and how their weights look after loading."""
    from torch import nn
    from vllm.model_executor.layers.linear import LinearBase

    from fxpass.runtime import installed_graph

    out: dict[str, Any] = {"class": type(model).__name__, "towers": {}}
    for tower_name in ("vision_tower", "audio_tower"):
        tower = getattr(model, tower_name, None)
        if tower is None:
            continue
        info: dict[str, Any] = {"vllm_linears": {}, "nn_linears": [], "graph_modules": []}
        for name, mod in tower.named_modules():
            full = f"{tower_name}.{name}" if name else tower_name
            if installed_graph(mod) is not None:
                info["graph_modules"].append(full)
            if isinstance(mod, LinearBase):
                w = getattr(mod, "weight", None)
                entry = {
                    "class": type(mod).__name__,
                    "prefix": getattr(mod, "prefix", None),
                    "quant_method": type(getattr(mod, "quant_method", None)).__name__,
                    "weight_dtype": str(w.dtype) if w is not None else None,
                    "weight_shape": list(w.shape) if w is not None else None,
                    "bnb_quant_state": bool(getattr(w, "bnb_quant_state", None)),
                }
                if entry["bnb_quant_state"]:
                    entry["bnb_sqnr_db"] = _bnb_sqnr(mod, full)
                info["vllm_linears"][full] = entry
            elif isinstance(mod, nn.Linear):
                info["nn_linears"].append(full)
        out["towers"][tower_name] = info
    return out


_CHECKPOINT: dict[str, Any] = {}


def _bnb_sqnr(layer, full: str) -> float | None:
    """SQNR (dB) of the layer's dequantized 4-bit weight against the checkpoint's bf16 weight."""
    import math

    import torch
    from bitsandbytes.functional import dequantize_4bit

    ref = _CHECKPOINT.get(f"model.{full}.weight")
    if ref is None:
        return None
    from fxpass.weights import tp_style

    style = tp_style(layer)  # a sharded layer holds its rank's block of the weight
    if style == "column":
        n = layer.output_size_per_partition
        ref = ref[layer.tp_rank * n:(layer.tp_rank + 1) * n]
    elif style == "row":
        n = layer.input_size_per_partition
        ref = ref[:, layer.tp_rank * n:(layer.tp_rank + 1) * n]
    w = layer.weight
    states = w.bnb_quant_state
    offsets = w.bnb_shard_offsets
    parts = []
    for i, qs in sorted(states.items()):
        chunk = w[offsets[i]:offsets[i + 1]]
        parts.append(dequantize_4bit(chunk, qs).float().reshape(-1))
    deq = torch.cat(parts).reshape(ref.shape)
    r = ref.float()
    err = float(((deq - r) ** 2).sum())
    return math.inf if err == 0 else 10 * math.log10(float((r ** 2).sum()) / err)


def graph_modules(model) -> dict[str, list[str]]:
    """Per tower, the modules running an fxpass graph now (after generation: the towers
    are traced at their first call, which may come after model init)."""
    from fxpass.runtime import installed_graph

    out: dict[str, list[str]] = {}
    for tower_name in ("vision_tower", "audio_tower"):
        tower = getattr(model, tower_name, None)
        if tower is not None:
            out[tower_name] = [f"{tower_name}.{n}" if n else tower_name
                               for n, m in tower.named_modules()
                               if installed_graph(m) is not None]
    return out


def plugin_records(model) -> list[dict[str, Any]]:
    """The fxpass plugin's records of the process holding ``model`` (a TP worker's own)."""
    import fxpass.vllm_plugin as plugin

    return [r.to_dict() for r in plugin.records()]


def inspect_in_worker(model_dir: str, model) -> dict[str, Any]:
    """inspect_model in a TP worker process, which has no copy of the engine's _CHECKPOINT."""
    if not _CHECKPOINT:
        from safetensors.torch import load_file

        _CHECKPOINT.update(load_file(str(Path(model_dir) / "model.safetensors")))
    return inspect_model(model)


def hf_compare_in_worker(model_dir: str, out_dir: str, model) -> dict[str, Any]:
    """compare_with_hf in a TP worker, on the inputs its own towers got (each rank runs the
    whole sharded tower and ends with the all-reduced output)."""
    from fxpass.vllm_context import tp_rank

    out = Path(out_dir) / f"rank{tp_rank()}"
    out.mkdir(parents=True, exist_ok=True)
    return compare_with_hf(model_dir, out)


def save_captures_in_worker(out_dir: str, model) -> str:
    """A TP worker's CAPTURES (its towers' inputs and outputs) to OUT/rank<r>/captures.pt:
    the engine process holds none of them."""
    import torch

    from fxpass.vllm_context import tp_rank

    out = Path(out_dir) / f"rank{tp_rank()}"
    out.mkdir(parents=True, exist_ok=True)
    torch.save(CAPTURES, out / "captures.pt")
    return str(out / "captures.pt")


CAPTURES: dict[str, Any] = {}


def tower_frames(model) -> dict[str, dict[str, int]]:
    """Compiled frames dynamo holds per compiled entry of each tower (compile_mm_encoder)."""
    import fxpass.vllm_plugin as plugin
    from fxpass.runtime.compiled import compiled_frames

    out = {}
    for r in plugin.records():
        if r.compiled.get("entries"):
            out[r.prefix] = compiled_frames(model.get_submodule(r.prefix), r.compiled["entries"])
    return out


def install_capture_hooks(model) -> str:
    """Keep the inputs vLLM feeds the towers and what comes out, for the HF comparison."""
    vt = getattr(model, "vision_tower", None)
    at = getattr(model, "audio_tower", None)
    ev = getattr(model, "embed_vision", None)

    def clone(t):
        return t.detach().clone() if hasattr(t, "detach") else t

    if vt is not None and ev is not None:
        def patch_pre(mod, args, kwargs):
            CAPTURES.setdefault("vision_calls", []).append(
                {"pixel_values": clone(args[0]), "pixel_position_ids": clone(args[1])})

        def embed_pre(mod, args, kwargs):
            x = kwargs.get("inputs_embeds", args[0] if args else None)
            CAPTURES.setdefault("vision_out", []).append(clone(x))

        vt.patch_embedder.register_forward_pre_hook(patch_pre, with_kwargs=True)
        ev.register_forward_pre_hook(embed_pre, with_kwargs=True)
    if at is not None:
        def audio_hook(mod, args, kwargs, output):
            hs = output[0] if isinstance(output, tuple) else output.last_hidden_state
            mask = output[1] if isinstance(output, tuple) else output.attention_mask
            CAPTURES.setdefault("audio_calls", []).append({
                "input_features": clone(args[0]), "attention_mask": clone(args[1]),
                "out": clone(hs), "out_mask": clone(mask)})

        at.register_forward_hook(audio_hook, with_kwargs=True)
    return "ok"


# ------------------------------------------------------------------ HF reference


def metrics(candidate, reference) -> dict[str, Any]:
    """How far vLLM's tower output is from HF's (float32 maths on both)."""
    import math

    c, r = candidate.detach().float(), reference.detach().float()
    if c.shape != r.shape:
        return {"shape": list(c.shape), "ref_shape": list(r.shape), "shape_mismatch": True}
    diff = (c - r).abs()
    err = float((diff ** 2).sum())
    sig = float((r ** 2).sum())
    return {
        "shape": list(c.shape),
        "numel": c.numel(),
        "n_different": int((diff != 0).sum()),
        "max_abs": float(diff.max()),
        "ref_max_abs": float(r.abs().max()),
        "sqnr_db": math.inf if err == 0 else 10 * math.log10(sig / err),
        "cosine": float(torch_cos(c, r)),
        # torch.testing.assert_close's bf16 criterion as a number (<= 1 passes); information
        "assert_close_bf16_ratio": float((diff / (1e-5 + 1.6e-2 * r.abs())).max()),
    }


def torch_cos(a, b):
    import torch

    return torch.nn.functional.cosine_similarity(a.reshape(1, -1), b.reshape(1, -1))[0]


def compare_with_hf(model_dir: str, out_dir: Path) -> dict[str, Any]:
    """Run HF's own towers (loaded by transformers from the same checkpoint, bf16, nn.Linear)
    on the exact inputs vLLM fed its towers during generation; compare the outputs.

    The (vLLM, HF) output pairs go to OUT/tower_pairs.pt for the test's budget check."""
    import torch
    from transformers import Gemma4ForConditionalGeneration

    hf = Gemma4ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    out: dict[str, Any] = {}
    pairs: dict[str, Any] = {}
    with torch.no_grad():
        for i, (call, got) in enumerate(zip(CAPTURES.get("vision_calls", []),
                                            CAPTURES.get("vision_out", []))):
            # vLLM runs patch_embedder -> encoder -> pooler and strips padding itself; HF's
            # Gemma4VisionModel.forward does the same in one call.
            ref = hf.model.vision_tower(pixel_values=call["pixel_values"],
                                        pixel_position_ids=call["pixel_position_ids"])
            ref = ref.last_hidden_state
            pairs[f"vision[{i}]"] = (got.reshape(ref.shape), ref)
            out[f"vision[{i}]"] = metrics(got.reshape(ref.shape), ref)
            out[f"vision[{i}]"]["padding_patches"] = int(
                (call["pixel_position_ids"] == -1).all(-1).sum())
        for i, call in enumerate(CAPTURES.get("audio_calls", [])):
            ref = hf.model.audio_tower(call["input_features"], call["attention_mask"])
            mask = call["out_mask"]
            pairs[f"audio[{i}]"] = (call["out"][mask], ref.last_hidden_state[mask])
            m = metrics(*pairs[f"audio[{i}]"])
            m["mask_equal"] = bool((ref.attention_mask == mask).all())
            out[f"audio[{i}]"] = m
    torch.save(pairs, out_dir / "tower_pairs.pt")
    return out


def compare_with_peft(model_dir: str, adapters: dict[str, str], out_dir: Path,
                      calls: dict[str, list[int]]) -> dict[str, Any]:
    """Each captured vision-tower output against HF's tower with the request's adapter applied
    by PEFT (``fxpass.lora.peft_reference``), or without one, on the inputs vLLM fed it."""
    import torch
    from transformers import Gemma4ForConditionalGeneration

    from fxpass.lora.verify import peft_reference

    hf = Gemma4ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    refs = {"": hf.model.vision_tower}
    for name, d in adapters.items():
        try:
            refs[name] = peft_reference(hf.model.vision_tower, d,
                                        key_prefix="model.vision_tower")
        except Exception as e:  # noqa: BLE001 - e.g. the wrapper-keyed adapter: PEFT refuses
            refs[name] = None
            refs[f"{name}:error"] = f"{type(e).__name__}: {e}"[:300]
    result: dict[str, Any] = {"peft_errors": {k: v for k, v in refs.items()
                                              if k.endswith(":error")}}
    pairs: dict[str, Any] = {}
    with torch.no_grad():
        for label, (lo, hi) in calls.items():
            names = {"", *(n.partition("@")[2] for n in label.split("+"))}
            for j, i in enumerate(range(lo, hi)):
                call = CAPTURES["vision_calls"][i]
                got = CAPTURES["vision_out"][i]
                for ref_name in sorted(names):
                    model = refs.get(ref_name)
                    if model is None:
                        continue
                    ref = model(pixel_values=call["pixel_values"],
                                pixel_position_ids=call["pixel_position_ids"]).last_hidden_state
                    key = f"{label}[{j}] vs {'hf+' + ref_name if ref_name else 'hf'}"
                    pairs[key] = (got.reshape(ref.shape), ref)
                    result[key] = metrics(got.reshape(ref.shape), ref)
    torch.save(pairs, out_dir / "tower_pairs.pt")
    return result


# ------------------------------------------------------------------ the run


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    rec = Recorder(out)
    res = rec.result
    res["env"] = {k: os.environ.get(k) for k in ("FXPASS_DISABLE",
                                                 "VLLM_ENABLE_V1_MULTIPROCESSING")}
    try:
        from safetensors.torch import load_file

        _CHECKPOINT.update(load_file(str(Path(spec["model"]) / "model.safetensors")))
        import torch
        from vllm import LLM, SamplingParams

        import fxpass.vllm_plugin as plugin

        rec.step("imported")
        record_weight_loads()
        kwargs: dict[str, Any] = dict(
            model=spec["model"], dtype="bfloat16", max_model_len=512, enforce_eager=True,
            max_num_seqs=4, max_num_batched_tokens=512, seed=0,
            limit_mm_per_prompt=spec.get("limit_mm") or {"image": 1, "audio": 1, "video": 0},
        )
        if spec.get("quantization"):
            kwargs["quantization"] = spec["quantization"]
        if spec.get("compilation_config"):  # compile_mm_encoder: vLLM compiles nothing eagerly
            kwargs.update(enforce_eager=False, compilation_config=spec["compilation_config"])
        lora = spec.get("lora")  # {"max_loras": n, "adapters": {name: dir}}
        lora_requests: dict[str, Any] = {}
        if lora:
            from vllm.lora.request import LoRARequest

            kwargs.update(enable_lora=True, max_lora_rank=8, max_loras=lora["max_loras"],
                          enable_tower_connector_lora=True)
            lora_requests = {n: LoRARequest(n, i + 1, d)
                             for i, (n, d) in enumerate(sorted(lora["adapters"].items()))}
        if spec.get("additional_config"):  # the plugin's switches: {"fxpass": {...}}
            kwargs["additional_config"] = spec["additional_config"]
        tp = spec.get("tensor_parallel_size", 1)
        if tp > 1:  # the executor starts one worker process per rank, each with the plugin
            kwargs["tensor_parallel_size"] = tp
        llm = LLM(**kwargs)
        rec.step("engine_ready")
        res["plugin_records"] = [r.to_dict() for r in plugin.records()]
        if tp > 1:
            import functools

            res["plugin_records_ranks"] = llm.apply_model(plugin_records)
            res["plugin_records"] = res["plugin_records_ranks"][0]
            res["models_ranks"] = llm.apply_model(
                functools.partial(inspect_in_worker, spec["model"]))
            res["model"] = res["models_ranks"][0]
        else:
            res["model"] = llm.apply_model(inspect_model)[0]
        # the towers' first-call state when the engine is ready, before any request
        res["first_call_at_ready"] = {r["prefix"]: (r["report"] or {}).get(
            "first_call", {}).get("state") for r in res["plugin_records"]}
        res["weight_loads"] = dict(LOADS)
        res["frames_at_ready"] = llm.apply_model(tower_frames)[0]
        llm.apply_model(install_capture_hooks)
        rec.flush()

        params = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 8),
                                ignore_eos=True)
        for batch in spec["batches"]:
            label = "+".join(batch)
            mark = len(CAPTURES.get("vision_out", []))
            try:
                loras = [lora_requests.get(n.partition("@")[2]) for n in batch]
                outputs = llm.generate([_request(n) for n in batch], params, use_tqdm=False,
                                       **({"lora_request": loras} if lora_requests else {}))
            except Exception as e:  # noqa: BLE001 - recorded; the engine is not used again
                res["errors"][label] = _error_text(e)
                rec.step(f"failed:{label}")
                break
            for name, o in zip(batch, outputs):
                res["batches"].setdefault(label, {})[name] = {
                    "prompt_token_ids": list(o.prompt_token_ids),
                    "token_ids": list(o.outputs[0].token_ids),
                }
            res.setdefault("vision_calls_by_batch", {})[label] = [
                mark, len(CAPTURES.get("vision_out", []))]
            rec.step(f"generated:{label}")
        # guard fallbacks counted during generation, first-call traces
        res["plugin_records"] = [r.to_dict() for r in plugin.records()]
        res["frames_after"] = llm.apply_model(tower_frames)[0]
        if tp > 1:
            res["plugin_records_ranks"] = llm.apply_model(plugin_records)
            res["plugin_records"] = res["plugin_records_ranks"][0]
        res["graph_modules_after"] = llm.apply_model(graph_modules)[0]
        torch.save(CAPTURES, out / "captures.pt")
        if tp > 1:  # the towers ran in the worker processes
            import functools

            res["captures_ranks"] = llm.apply_model(
                functools.partial(save_captures_in_worker, str(out)))
        rec.flush()
        if lora and spec.get("hf_compare"):
            res["tower_vs_peft"] = compare_with_peft(spec["model"], lora["adapters"], out,
                                                     res.get("vision_calls_by_batch", {}))
            rec.step("peft_compared")
        elif spec.get("hf_compare") and tp > 1:  # the towers live in the worker processes
            import functools

            res["tower_vs_hf_ranks"] = llm.apply_model(
                functools.partial(hf_compare_in_worker, spec["model"], str(out)))
            rec.step("hf_compared")
        elif spec.get("hf_compare"):
            res["tower_vs_hf"] = compare_with_hf(spec["model"], out)
            rec.step("hf_compared")
        res["done"] = True
        rec.step("done")
    except BaseException as e:  # noqa: BLE001
        res["fatal"] = _error_text(e)
        rec.step("fatal")
    finally:
        rec.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _error_text(e: BaseException) -> str:
    chain = []
    cur: BaseException | None = e
    while cur is not None and len(chain) < 6:
        chain.append(f"{type(cur).__name__}: {cur}")
        cur = cur.__cause__ or cur.__context__
    return " <- ".join(chain) + "\n" + "".join(traceback.format_exception(e))[-6000:]


if __name__ == "__main__":
    main(sys.argv[1])
