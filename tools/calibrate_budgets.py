"""Measure what fxpass.verify's budgets are calibrated from (fxpass/verify/budgets.py).

For every tiny tower of fxpass.zoo, dtype, quant method, seed and mode, the tower is
rewritten with fxpass.apply(load_weights=True) and verified with every check switched off;
the worst numbers per (dtype, method) are printed (and written as JSON with --json):

  unquantized, vs the original module, over every node and output:
    max_abs, max_rel, worst tol_ratio at assert_close's default (rtol, atol)
    and the atol that would be needed at the default rtol
  quantized, vs the fake-quant reference, over every node and output: lowest SQNR, max_abs
  quantized, vs the original module: lowest SQNR at a rewritten layer, at an output

Usage: .venv/bin/python tools/calibrate_budgets.py [--seeds 0 1 2] [--json out.json]
Takes a few minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fxpass  # noqa: E402
from fxpass import zoo  # noqa: E402
from fxpass.verify.budgets import ASSERT_CLOSE_DEFAULTS, Budget  # noqa: E402
from fxpass.verify.metrics import json_float  # noqa: E402

SIZES = {"gemma4_vision": (0, 1, 2), "gemma4_audio": (0, 1, 2),
         "siglip_vision": (1, 2), "clip_vision": (1, 2)}


def _needed_atol(cand: torch.Tensor, ref: torch.Tensor, rtol: float) -> float:
    c, r = cand.float(), ref.float()
    fin = torch.isfinite(c) & torch.isfinite(r)
    if not bool(fin.any()):
        return 0.0
    return max(0.0, float(((c - r).abs() - rtol * r.abs())[fin].max()))


def measure(name: str, dtype: torch.dtype, method: str, seed: int, modes: list[str]) -> dict:
    from fxpass.trace import DEFAULT_CACHE
    from fxpass.weights import bnb_config

    # Fresh traces per tower: a trace reused from another seed's tower can carry that tower's
    # values (tensors made from buffers during tracing are baked in as constants), which is a
    # trace bug to measure separately, not GEMM or kernel noise.
    DEFAULT_CACHE.clear()
    tower = zoo.build_tower(name, dtype=dtype, seed=seed)
    inputs = [zoo.example_inputs(tower, size_index=s, seed=seed + s) for s in SIZES[name]]
    ref = copy.deepcopy(tower)
    qc = bnb_config(method) if method != "none" else None
    fxpass.apply(tower, qc, prefix=name, load_weights=True, example_inputs=inputs[0])
    dname = str(dtype).removeprefix("torch.")
    rtol, atol = ASSERT_CLOSE_DEFAULTS[dname]
    off = Budget(dtype=dname, method=method, atol=atol, rtol=rtol)  # only measures tol_ratio
    out: dict = {}
    for mode in modes:
        vr = fxpass.verify(ref, tower, inputs, budget=off, mode=mode, progress=False)
        if vr.errors:
            raise RuntimeError(f"{name} {dname} {method} {mode}: {vr.errors[0]}")
        exact = vr.references[0]
        nodes = [*vr.nodes, *vr.outputs]
        stats = {
            "exact_max_abs": max(n.metrics[exact].max_abs or 0.0 for n in nodes),
            "exact_max_rel": max((n.metrics[exact].max_rel or 0.0) for n in nodes),
            "exact_tol_ratio": max((n.metrics[exact].tol_ratio or 0.0) for n in nodes),
            "exact_sqnr_db": min((n.metrics[exact].sqnr_db for n in nodes
                                  if n.metrics[exact].ref_dtype.startswith(("float", "bfloat"))),
                                 default=math.inf),
        }
        if method != "none":
            layers = [n.metrics["reference"].sqnr_db for n in vr.nodes if n.kind == "layer"]
            stats["layer_sqnr_db"] = min(layers)
            stats["output_sqnr_db"] = vr.worst_output_sqnr_db("reference")
        out[mode] = stats
    if method == "none":  # the atol needed at the default rtol, on the outputs
        with torch.no_grad():
            need = 0.0
            for x in inputs:
                a, b = ref(**x), tower(**x)
                for k, v in a.items():
                    if isinstance(v, torch.Tensor) and v.is_floating_point():
                        need = max(need, _needed_atol(b[k], v, rtol))
        out["propagated"]["output_needed_atol"] = need
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--towers", nargs="+", default=list(zoo.KNOWN_TOWERS))
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"])
    p.add_argument("--methods", nargs="+", default=["none", "nf4", "fp4", "int8"])
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    rows = []
    with fxpass.vllm_runtime():
        for dname in args.dtypes:
            for method in args.methods:
                for name in args.towers:
                    for seed in args.seeds:
                        t = time.perf_counter()
                        try:
                            res = measure(name, getattr(torch, dname), method, seed,
                                          ["propagated", "isolated"])
                        except Exception as e:  # noqa: BLE001 - report and go on
                            print(f"{dname:9} {method:5} {name:14} seed {seed}: "
                                  f"{type(e).__name__}: {e}", flush=True)
                            continue
                        rows.append({"dtype": dname, "method": method, "tower": name,
                                     "seed": seed, **res})
                        p_, i_ = res["propagated"], res["isolated"]
                        extra = ""
                        if method != "none":
                            extra = (f" fq_sqnr {p_['exact_sqnr_db']:.1f}/{i_['exact_sqnr_db']:.1f}"
                                     f" layer {p_['layer_sqnr_db']:.1f}/{i_['layer_sqnr_db']:.1f}"
                                     f" out {p_['output_sqnr_db']:.1f}")
                        else:
                            extra = (f" need_atol {p_['output_needed_atol']:.3g}"
                                     f" ratio {p_['exact_tol_ratio']:.3g}/"
                                     f"{i_['exact_tol_ratio']:.3g}")
                        print(f"{dname:9} {method:5} {name:14} seed {seed}: max_abs "
                              f"{p_['exact_max_abs']:.3g}/{i_['exact_max_abs']:.3g}{extra}"
                              f"  ({time.perf_counter() - t:.1f} s)", flush=True)
    print("\nworst per (dtype, method) [propagated / isolated]:")
    summary: dict = {}
    for r in rows:
        key = f"{r['dtype']}/{r['method']}"
        s = summary.setdefault(key, {})
        for mode in ("propagated", "isolated"):
            for k, v in r[mode].items():
                kk = f"{mode}.{k}"
                if v is None:
                    continue
                if k.endswith("sqnr_db"):
                    s[kk] = min(s.get(kk, math.inf), v)
                else:
                    s[kk] = max(s.get(kk, 0.0), v)
    for key, s in summary.items():
        print(f"  {key}: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(s.items())))
    if args.json:
        args.json.write_text(json.dumps(
            {"rows": rows, "summary": summary},
            default=json_float, indent=1,
        ).replace("Infinity", '"inf"'))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
