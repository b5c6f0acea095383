"""Measure what the tower-LoRA budgets are calibrated from (``lora_budget`` in
fxpass/verify/budgets.py): vLLM's LoRA layers on the rewritten tower vs HF + PEFT.

For every tiny tower of fxpass.zoo, dtype (float32, bfloat16), quant method (none, nf4), seed
and mode, a random adapter (``fxpass.lora.adapter.demo_targets``: q / v / first MLP
projection, ranks 8 and 4, alpha 16) is written with PEFT, the tower is verified with
``fxpass.lora.verify_lora`` with every check switched off, and the worst numbers per
(dtype, method) are printed (and written as JSON with --json): unquantized, vs HF + PEFT:
lowest SQNR and worst assert_close ratio over every node and output; quantized: lowest SQNR
vs the fake-quant + PEFT reference, and vs the float + PEFT tower at a layer and at an output.

Usage: .venv/bin/python tools/calibrate_lora_budgets.py [--seeds 0 1 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fxpass  # noqa: E402
from fxpass import zoo  # noqa: E402
from fxpass.lora.adapter import demo_targets, write_adapter  # noqa: E402
from fxpass.verify.budgets import ASSERT_CLOSE_DEFAULTS, Budget  # noqa: E402

SIZES = {"gemma4_vision": (0, 1, 2), "gemma4_audio": (0, 1, 2),
         "siglip_vision": (1, 2), "clip_vision": (1, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    from fxpass.lora.verify import verify_lora
    from fxpass.weights import bnb_config

    worst: dict[str, dict[str, float]] = {}
    t0 = time.time()
    with fxpass.vllm_runtime(), tempfile.TemporaryDirectory() as tmp:
        for name, sizes in SIZES.items():
            for seed in args.seeds:
                base = zoo.build_tower(name, seed=seed)
                adir = write_adapter(base, Path(tmp) / f"{name}-{seed}", demo_targets(base),
                                     alpha=16.0, seed=seed + 10)
                for dtype in ("float32", "bfloat16"):
                    tower = base.to(getattr(torch, dtype))
                    rtol, atol = ASSERT_CLOSE_DEFAULTS[dtype]
                    inputs = [zoo.example_inputs(tower, size_index=s, seed=s) for s in sizes]
                    for method in ("none", "nf4"):
                        for mode in ("propagated", "isolated"):
                            budget = Budget(dtype=dtype, method=method,
                                            atol=atol if method == "none" else None,
                                            rtol=rtol if method == "none" else None)
                            res = verify_lora(
                                tower, adir, inputs,
                                quant_config=bnb_config(method) if method != "none" else None,
                                mode=mode, budget=budget)
                            w = worst.setdefault(f"{dtype}/{method}", {})
                            vr = res.verify
                            for n in (*vr.nodes, *vr.outputs):
                                for ref, m in n.metrics.items():
                                    if m.sqnr_db is None or not m.ref_dtype.startswith(
                                            ("float", "bfloat")):
                                        continue
                                    if method == "none":
                                        w["sqnr_db"] = min(w.get("sqnr_db", 1e9), m.sqnr_db)
                                        if m.tol_ratio is not None:
                                            w["tol_ratio"] = max(w.get("tol_ratio", 0.0),
                                                                 m.tol_ratio)
                                    elif ref == "fake_quant":
                                        w["fq_sqnr_db"] = min(w.get("fq_sqnr_db", 1e9),
                                                              m.sqnr_db)
                                    elif n.kind == "layer":
                                        w["layer_sqnr_db"] = min(w.get("layer_sqnr_db", 1e9),
                                                                 m.sqnr_db)
                                    elif n.kind == "output":
                                        w["output_sqnr_db"] = min(
                                            w.get("output_sqnr_db", 1e9), m.sqnr_db)
                print(f"{name} seed {seed}: {time.time() - t0:.0f} s", flush=True)
    for k, v in sorted(worst.items()):
        print(k, {kk: round(vv, 3) for kk, vv in v.items()})
    if args.json:
        args.json.write_text(json.dumps(worst, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
