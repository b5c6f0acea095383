"""One rank of the 2-rank tensor-parallel checks: ``python tp_worker.py RANK INIT_FILE OUT``.

Run twice, in parallel, by tests/rewrite/test_tensor_parallel_ranks.py (real processes: one
vLLM tensor-parallel group of 2 over gloo and vLLM's shared-memory CPU all-reduce). Every
check that needs the two ranks runs here, in one process per rank (vLLM's import is paid
once); the results go to OUT/rank<RANK>.json and the tests assert on them.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hardening"))  # unchanged.py

TP = 2
# SigLIP / CLIP take another branch at their native size (index 0) than at 1 and 2: index 0
# is checked on a tower traced there, 1 and 2 on one traced at 1 (as tests/rewrite does).
TRACE_SIZES = {"gemma4_vision": ((0, (0, 1, 2)),), "gemma4_audio": ((0, (0, 1, 2)),),
               "siglip_vision": ((1, (1, 2)), (0, (0,))),
               "clip_vision": ((1, (1, 2)), (0, (0,)))}


def _first(out: Any) -> Any:
    import torch

    if isinstance(out, torch.Tensor):
        return out
    return out[0]


def _sqnr(ref: Any, got: Any) -> float:
    ref, got = ref.float(), got.float()
    err = (ref - got).pow(2).sum()
    return float(10 * math.log10(ref.pow(2).sum() / err)) if err > 0 else float("inf")


def _param_bytes(module: Any, weights_only: bool = False) -> int:
    return sum(p.numel() * p.element_size() for n, p in module.named_parameters()
               if not weights_only or n.endswith("weight"))


def towers(out: dict[str, Any]) -> None:
    """Each tower sharded (fuse off / on) against the unsharded original, three sizes."""
    import torch

    import fxpass
    from fxpass import zoo

    for name in zoo.KNOWN_TOWERS:
        for fuse in (False, True):
            key = f"{name}/{'fused' if fuse else 'plain'}"
            entry: dict[str, Any] = {"max_abs": {}, "verify": {}}
            for trace_size, sizes in TRACE_SIZES[name]:
                ref = zoo.build_tower(name)
                cand = copy.deepcopy(ref)
                report = fxpass.apply(cand, tp=TP, load_weights=True, fuse=fuse,
                                      prefix="tower",
                                      example_inputs=zoo.example_inputs(ref, size_index=trace_size))
                if trace_size == TRACE_SIZES[name][0][0]:
                    entry["report"] = report.to_dict()
                    entry["summary"] = report.summary_line()
                inputs = [zoo.example_inputs(ref, size_index=s, seed=7) for s in sizes]
                with torch.no_grad():
                    for s, x in zip(sizes, inputs):
                        r, o = _first(ref(**x)), _first(cand(**x))
                        entry["max_abs"][str(s)] = float((r - o).abs().max())
                        entry.setdefault("shapes", {})[str(s)] = list(o.shape)
                rt = report.runtime.to_dict() if report.runtime is not None else {}
                for kind in ("specialisations", "fallbacks"):
                    for mod, n in (rt.get(kind) or {}).items():
                        entry.setdefault(kind, {})[mod] = entry.get(kind, {}).get(mod, 0) + n
                for mode in ("propagated", "isolated"):
                    vr = fxpass.verify(ref, cand, inputs, mode=mode, progress=False)
                    d = vr.to_dict()
                    entry["verify"][f"{mode}@{trace_size}"] = {
                        "passed": vr.passed, "first_divergence": d["first_divergence"],
                        "nodes": len(vr.nodes)}
            out[key] = entry


def first_call(out: dict[str, Any]) -> None:
    """Each tower applied without example inputs (as inside vLLM): loaded replicated at
    apply, sharded and fused at its first call from the loaded layers."""
    import torch

    import fxpass
    from fxpass import zoo
    from fxpass.layers import is_vllm_linear

    for name in zoo.KNOWN_TOWERS:
        trace_size, sizes = TRACE_SIZES[name][0]
        ref = zoo.build_tower(name)
        cand = copy.deepcopy(ref)
        report = fxpass.apply(cand, tp=TP, load_weights=True, fuse=True, prefix="tower")
        entry: dict[str, Any] = {"traced_at": report.traced_at, "max_abs": {},
                                 "styles_before": sorted({
                                     type(m).__name__ for m in cand.modules()
                                     if isinstance(m, torch.nn.Linear) or is_vllm_linear(m)})}
        with torch.no_grad():
            for s in (trace_size, *(x for x in sizes if x != trace_size)):
                x = zoo.example_inputs(ref, size_index=s, seed=7)
                entry["max_abs"][str(s)] = float((_first(ref(**x)) - _first(cand(**x))).abs()
                                                 .max())
        entry["report"] = report.to_dict()
        entry["summary"] = report.summary_line()
        out[f"{name}/first_call"] = entry


def nf4(out: dict[str, Any]) -> None:
    """bnb nf4 sharded (quantized per shard) vs nf4 replicated: SQNR vs the float tower.

    On the "small" towers: bitsandbytes' CPU 4-bit quantizer is inaccurate on rows shorter
    than its 64-value block, which the tiny towers' 32-wide rows (16 per rank) are.
    """
    import torch

    import fxpass
    from fxpass import zoo
    from fxpass.weights import bnb_config

    for name in zoo.KNOWN_TOWERS:
        trace_size, sizes = TRACE_SIZES[name][0]
        ref = zoo.build_tower(name, dtype=torch.bfloat16, size="small")
        examples = zoo.example_inputs(ref, size_index=trace_size)
        got: dict[str, Any] = {}
        for label, tp in (("tp1", None), ("tp2", TP)):
            cand = copy.deepcopy(ref)
            fxpass.apply(cand, bnb_config("nf4"), tp=tp, load_weights=True, prefix="tower",
                         example_inputs=examples)
            with torch.no_grad():
                got[label] = {str(s): _sqnr(_first(ref(**x)), _first(cand(**x))) for s, x in
                              ((s, zoo.example_inputs(ref, size_index=s, seed=3))
                               for s in sizes)}
            if tp is not None:
                vr = fxpass.verify(ref, cand, [zoo.example_inputs(ref, size_index=s, seed=3)
                                               for s in sizes], progress=False)
                got["verify_passed"] = vr.passed
                got["verify_first_divergence"] = vr.to_dict()["first_divergence"]
        out[f"{name}/nf4"] = got


def sizes(out: dict[str, Any]) -> None:
    """Per-rank bytes of the sharded linears against the same linears replicated."""
    import torch

    import fxpass
    from fxpass import zoo
    from fxpass.weights import bnb_config

    for name in zoo.KNOWN_TOWERS:
        trace_size = TRACE_SIZES[name][0][0]
        entry: dict[str, Any] = {}
        for quant in ("bf16", "nf4"):
            ref = zoo.build_tower(name, dtype=torch.bfloat16)
            examples = zoo.example_inputs(ref, size_index=trace_size)
            qc = bnb_config("nf4") if quant == "nf4" else None
            # unquantized: vLLM-CPU moves loaded weights into oneDNN handles, so the layers'
            # own allocation is measured before loading; nf4: the packed weights as loaded
            load = quant == "nf4"
            one, two = copy.deepcopy(ref), copy.deepcopy(ref)
            fxpass.apply(one, qc, load_weights=load, example_inputs=examples)
            report = fxpass.apply(two, qc, tp=TP, load_weights=load, example_inputs=examples)
            sharded = list(report.tp_styles)
            entry[quant] = {
                "sharded_weight_bytes": sum(_param_bytes(two.get_submodule(n), True)
                                            for n in sharded),
                "replicated_weight_bytes": sum(_param_bytes(one.get_submodule(n), True)
                                               for n in sharded),
                "sharded_bytes": sum(_param_bytes(two.get_submodule(n)) for n in sharded),
                "replicated_bytes": sum(_param_bytes(one.get_submodule(n)) for n in sharded),
                "sharded_fraction": report.tp_sharded_fraction,
                "n_sharded": len(sharded),
            }
        out[f"{name}/bytes"] = entry


def toys(out: dict[str, Any]) -> None:
    """The refusal toys (and a control that shards): reasons, and still the right answer."""
    import torch

    import fxpass
    from tp_toys import TOYS, build_toy, toy_input

    for name in TOYS:
        ref = build_toy(name)
        cand = copy.deepcopy(ref)
        report = fxpass.apply(cand, tp=TP, load_weights=True,
                              example_inputs=(toy_input(name),))
        with torch.no_grad():
            errs = [float((ref(x) - cand(x)).abs().max())
                    for x in (toy_input(name, seq=s, seed=s) for s in (3, 5, 8))]
        out[f"toy/{name}"] = {"report": report.to_dict(), "max_abs": errs}


def checkpoint(out: dict[str, Any]) -> None:
    """Sharded layers filled by load_checkpoint from the original names (plain and fused)."""
    import torch

    import fxpass
    from fxpass import zoo
    from fxpass.weights import load_checkpoint

    for fuse in (False, True):
        ref = zoo.build_tower("siglip_vision")
        state = {k: v.clone() for k, v in ref.state_dict().items()}
        cand = zoo.build_tower("siglip_vision", seed=5)  # other weights: all must be loaded
        examples = zoo.example_inputs(ref, size_index=1)
        report = fxpass.apply(cand, tp=TP, fuse=fuse, example_inputs=examples)
        fused = {k.removeprefix(""): v for k, v in report.fused.items()}
        loose = load_checkpoint(cand, state, None, fused=fused)
        with torch.no_grad():
            x = zoo.example_inputs(ref, size_index=2, seed=4)
            err = float((_first(ref(**x)) - _first(cand(**x))).abs().max())
        out[f"checkpoint/{'fused' if fuse else 'plain'}"] = {"max_abs": err, "loose": loose}


def faults(out: dict[str, Any]) -> None:
    """verify on each rank catches a planted fault in a sharded layer and names it."""
    import fxpass
    from fxpass import zoo
    from fxpass.verify.faults import plant_fault

    for spec in ("wrong-weights:encoder.layers.0.self_attn.out_proj",
                 "transpose:encoder.layers.1.mlp.fc1"):
        ref = zoo.build_tower("clip_vision")
        cand = copy.deepcopy(ref)
        fxpass.apply(cand, tp=TP, load_weights=True,
                     example_inputs=zoo.example_inputs(ref, size_index=1))
        layer = plant_fault(cand, spec, ref)
        vr = fxpass.verify(ref, cand, [zoo.example_inputs(ref, size_index=1)], progress=False)
        out[f"fault/{spec}"] = {"layer": layer, "passed": vr.passed,
                                "first": vr.to_dict()["first_divergence"],
                                "style": type(cand.get_submodule(layer)).__name__}


def viz(out: dict[str, Any], out_dir: Path, rank: int) -> None:
    """The page and DOT of a sharded Gemma4 audio tower (one pair refused)."""
    import fxpass
    from fxpass import viz as fviz
    from fxpass import zoo

    tower = zoo.build_tower("gemma4_audio")
    inputs = zoo.example_inputs(tower)
    tr = fxpass.trace(tower, inputs)
    before = fviz.snapshot(tr)
    report = fxpass.apply(tower, tp=TP, load_weights=True, trace_result=tr, prefix="audio")
    if rank == 0:
        (out_dir / "audio_tp.html").write_text(fviz.render_html(tr, report, None, before))
        (out_dir / "audio_tp.dot").write_text(fviz.render_dot(tr, report, None, before))
    out["viz"] = {"written": rank == 0}


def atomic(out: dict[str, Any]) -> None:
    """Each step of the tensor-parallel rule (match, check, apply) and each parallel layer
    build / load fails in turn: the model is exactly as before, then a clean apply works
    (as tests/hardening/test_atomic_faults.py does for the rules one process can run)."""
    import torch

    import fxpass
    import fxpass.weights as weights
    from fxpass import zoo
    from fxpass.errors import FxpassError
    from fxpass.parallel.rule import TensorParallel
    from unchanged import Unchanged

    class Injected(RuntimeError):
        pass

    targets = [(TensorParallel, step) for step in ("match", "check", "apply")] + [
        (weights, name) for name in ("build_parallel_linear", "build_fused_parallel_linear",
                                     "load_linear_weights", "load_fused_weights")]
    results = {}
    for owner, name in targets:
        real = getattr(owner, name)
        is_method = owner is TensorParallel

        def failing(*a: Any, _name: str = name, **kw: Any) -> Any:
            raise Injected(f"injected into {_name}")

        model = zoo.build_tower("siglip_vision")
        x = zoo.example_inputs(model, size_index=1)
        with torch.no_grad():
            before = model(**x).last_hidden_state
        snap = Unchanged(model)
        setattr(owner, name, failing if not is_method else (lambda self, *a, _f=failing, **k:
                                                            _f(*a, **k)))
        try:
            try:
                fxpass.apply(model, tp=TP, load_weights=True, fuse=True, example_inputs=x)
                error = None
            except FxpassError as e:
                error = f"{type(e).__name__}: {e}"
        finally:
            setattr(owner, name, real)
        snap.check()
        with torch.no_grad():
            same = torch.equal(model(**x).last_hidden_state, before)
        report = fxpass.apply(model, tp=TP, load_weights=True, fuse=True, example_inputs=x)
        with torch.no_grad():
            err = float((model(**x).last_hidden_state - before).abs().max())
        results[name] = {"error": error, "unchanged_output": same,
                         "clean_apply_sharded": len(report.tp_styles), "clean_max_abs": err}
    out["atomic"] = results


def main() -> None:
    rank, init_file, out_dir = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    t0 = time.perf_counter()
    import fxpass

    results: dict[str, Any] = {"rank": rank, "timings_s": {}}
    with fxpass.vllm_runtime(tp=TP, rank=rank, init_method=f"file://{init_file}"):
        from fxpass.vllm_context import tp_rank, tp_world_size

        results["group"] = [tp_rank(), tp_world_size()]
        results["timings_s"]["start"] = time.perf_counter() - t0
        steps = (towers, first_call, nf4, sizes, toys, checkpoint, faults, atomic,
                 lambda r: viz(r, out_dir, rank))
        for step in steps:
            t = time.perf_counter()
            try:
                step(results)
            except Exception:  # the tests show it; the other rank may hang without us
                results.setdefault("errors", {})[getattr(step, "__name__", "viz")] = (
                    traceback.format_exc())
                (out_dir / f"rank{rank}.json").write_text(json.dumps(results, default=str))
                raise
            name = step.__name__ if step.__name__ != "<lambda>" else "viz"
            results["timings_s"][name] = time.perf_counter() - t
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results, default=str))


if __name__ == "__main__":
    main()
