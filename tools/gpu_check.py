"""GPU check of vLLM's encoder attention on HF towers (issue #23): verify and speed, per
backend. Run by tools/gpu_check.sh on a machine with a CUDA GPU; the project builds and
passes its tests without one.

For each backend in --backends (default FLASH_ATTN, FLASHINFER, TORCH_SDPA) and each tower
(SigLIP so400m width, 4 layers; Gemma4 vision default width, 4 layers), bf16 on cuda:
``fxpass.apply`` with the ``mm-attention`` rule (the backend chosen as vLLM's
``mm_encoder_attn_backend`` would choose it) and without it; ``fxpass.verify`` of the
rewritten tower against HF (node by node, bf16 budget) on one image and on two (the second
padded, for Gemma4); median latency of both. Prints a table; ``--json`` writes it. A backend
this machine cannot build (FlashInfer missing, ...) is reported as skipped with the reason.
Exit status 1 when a verify fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from typing import Any

import torch


def _backend_scope(name: str) -> Any:
    """Make vLLM's ViT backend choice see ``mm_encoder_attn_backend=name`` (what an engine's
    multimodal config says), without building an engine's model config."""
    from unittest import mock

    from vllm.config.multimodal import MultiModalConfig
    from vllm.model_executor.models import vision

    cfg = MultiModalConfig(mm_encoder_attn_backend=name)
    return mock.patch.object(vision, "get_multimodal_config", lambda: cfg)


def _towers() -> dict[str, Any]:
    from transformers import AutoModel, SiglipVisionConfig

    from fxpass import zoo

    siglip = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_attention_heads=16,
                                num_hidden_layers=4, image_size=384, patch_size=14,
                                vision_use_head=False)
    siglip._attn_implementation = "sdpa"
    gemma = zoo.tower_config("gemma4_vision", "default")
    gemma.num_hidden_layers = 4
    return {"siglip": lambda: AutoModel.from_config(siglip),
            "gemma4_vision": lambda: AutoModel.from_config(gemma)}


def _inputs(name: str, tower: Any) -> dict[str, dict[str, torch.Tensor]]:
    from fxpass import bench

    x = {k: v.cuda() for k, v in bench._peer_inputs(name, tower, torch.bfloat16, False).items()}
    out = {"one image": x}
    if name == "gemma4_vision":
        out["two, one padded"] = bench._padded_pair(x)
    return out


def _median_ms(fn: Any, n: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[n // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+",
                        default=["FLASH_ATTN", "FLASHINFER", "TORCH_SDPA"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; nothing to check")
        return 0
    import fxpass
    from fxpass.vllm_context import vllm_runtime

    rows, failed = [], False
    with vllm_runtime():
        for backend in args.backends:
            for name, build in _towers().items():
                torch.manual_seed(0)
                hf = build().to(device="cuda", dtype=torch.bfloat16).eval()
                inputs = _inputs(name, hf)
                first = next(iter(inputs.values()))
                try:
                    with _backend_scope(backend):
                        rewritten = copy.deepcopy(hf)
                        report = fxpass.apply(rewritten, None, load_weights=True,
                                              example_inputs=first)
                except Exception as e:  # noqa: BLE001 - a backend this machine lacks
                    rows.append({"backend": backend, "tower": name,
                                 "skipped": f"{type(e).__name__}: {e}"[:300]})
                    continue
                plain = copy.deepcopy(hf)
                fxpass.apply(plain, None, load_weights=True, example_inputs=first,
                             disable=["mm-attention"])
                sites = sum(f.rule == "mm-attention" for f in report.fixes)
                for label, x in inputs.items():
                    vr = fxpass.verify(hf, rewritten, [x])
                    failed |= not vr.passed
                    with torch.no_grad():
                        t_rule = _median_ms(lambda: rewritten(**x))
                        t_sdpa = _median_ms(lambda: plain(**x))
                    rows.append({"backend": backend, "tower": name, "input": label,
                                 "sites": sites, "verify_passed": vr.passed,
                                 "summary": vr.summary_line(), "mm_attention_ms": t_rule,
                                 "sdpa_ms": t_sdpa, "gain": t_sdpa / t_rule})
                hf = rewritten = plain = None  # freed before the next tower
                torch.cuda.empty_cache()
    print(f"gpu_check on {torch.cuda.get_device_name()}")
    for r in rows:
        if "skipped" in r:
            print(f"  {r['backend']:<11} {r['tower']:<13} skipped: {r['skipped']}")
        else:
            print(f"  {r['backend']:<11} {r['tower']:<13} {r['input']:<16} verify "
                  f"{'ok' if r['verify_passed'] else 'FAILED'}  mm-attention "
                  f"{r['mm_attention_ms']:.2f} ms  sdpa {r['sdpa_ms']:.2f} ms  "
                  f"{r['gain']:.2f}x  ({r['sites']} sites)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
