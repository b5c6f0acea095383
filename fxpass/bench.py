"""Side-by-side benchmark: fxpass vs vLLM's module walk vs HF eager, in one run.

Everything is measured in the same process, interleaved, as medians (and interquartile
ranges) of ``torch.utils.benchmark`` Measurements (``fxpass.bench_stats``), and reported as
ratios (machines are noisy; ratios measured together are what carry over):

* pass time: ``fxpass.apply`` vs ``recursive_replace_linear`` on default-size Gemma4 vision
  and audio towers on the meta device, cold (empty trace cache) and warm (cache hit), next to
  the towers' own ``from_config`` time;
* tower forward latency: HF eager vs walk-rewritten vs fxpass vs fxpass ``fuse=True``, in fp32,
  bf16 and bnb nf4, on a full-width Gemma4 vision config with fewer layers;
* weight bytes of each variant and the peak memory a forward allocates;
* ``fxpass.verify`` cost relative to one forward of the original (when verify is available);
* the per-call overhead of an installed graph forward that hits its guards, against the
  module's own forward, for a layer-shaped call (tensor, ``(cos, sin)`` tuple, defaults);
* the first call's extra time after ``apply`` without example inputs (it traces and rewrites
  the tower) against the first call after ``apply`` on example inputs (``first_call``), on
  default-size Gemma4 vision and audio towers;
* peers (``peers``): SigLIP at so400m width and Gemma4 vision at full width, 4 layers, 729
  patches, fp32 / bf16 / bnb nf4: HF eager, vLLM's module walk, the walk under
  ``torch.compile``, vLLM's hand-written SigLIP tower (``vllm.model_executor.models.siglip``,
  same weights; Gemma4's vision tower in vLLM *is* HF's module + the walk), fxpass
  (``fuse=True``: the speed rules) and fxpass under ``torch.compile``; each row with its max
  abs diff to HF (nf4: to HF bf16) and, for compiled rows, the first call's time.

``--quick`` shrinks every size and timing so the suite can prove the benchmark runs (no
figures from it; no ``torch.compile`` rows: compiling costs seconds per tower). ``--only
peers`` (or another section name) runs one section; ``--dtype fp32`` (repeatable) keeps only
those rows of the forward / peers / rules sections.
Run: ``.venv/bin/python tools/bench.py [--quick] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from fxpass.bench_stats import (
    interleaved,
    interleaved_on_copies,
    iqrs,
    measure,
    medians,
    samples,
    time_once,
)
from fxpass.cli_options import BENCH_DTYPES, BENCH_SECTIONS, add_bench_arguments

# Seconds of calls each variant gets per interleaved round (Timer.blocked_autorange's
# min_run_time). --quick only proves the benchmark runs: one call per round (Timer.timeit),
# except for the per-call overhead (graph_call: microseconds a call, blocked_autorange).
MIN_RUN_TIME = 0.1
QUICK_MIN_RUN_TIME = 0.002


def _min_run_time(quick: bool) -> float | None:
    return None if quick else MIN_RUN_TIME


def _timed(fns: dict[str, Callable[[], Any]], repeats: int, quick: bool,
           min_run_time: float | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """(median seconds, IQR seconds) per variant, variants interleaved round by round."""
    ms = interleaved(fns, repeats, min_run_time or _min_run_time(quick))
    return medians(ms), iqrs(ms)


def _collect(quick: bool) -> None:
    """Free the last variants before the next are built (a full collection costs ~0.1-1 s
    in this heap: --quick's towers are small enough to skip it)."""
    if not quick:
        gc.collect()


def _peak_forward_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated by torch during ``fn`` (CPU allocator events, in time order)."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep the profiler's start/stop lines quiet
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.cpu_memory_usage),
                    key=lambda e: e.time_range.start)
    cur = peak = 0
    for e in events:
        cur += e.cpu_memory_usage
        peak = max(peak, cur)
    return peak


def _linear_bytes(m: nn.Module) -> int:
    """Bytes a linear layer holds: weight (packed or not), bias, bnb absmax scales.

    vLLM-CPU keeps an unquantized GEMM's weight in its oneDNN handler and empties
    ``.weight``: that one is counted from the logical shape, so variants stay comparable.
    """
    total = 0
    for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]:
        total += t.numel() * t.element_size()
    w = getattr(m, "weight", None)
    for state in (getattr(w, "bnb_quant_state", None) or {}).values():
        absmax = getattr(state, "absmax", state)
        if isinstance(absmax, torch.Tensor):
            total += absmax.numel() * absmax.element_size()
    if w is not None and w.numel() == 0 and hasattr(m, "params_dtype"):
        total += m.input_size * m.output_size * torch.finfo(m.params_dtype).bits // 8
    return total


def _weight_bytes(model: nn.Module) -> dict[str, int]:
    """{"total": every parameter/buffer/quant state, "linear": the linear layers only}."""
    linear_ids = set()
    linear = 0
    for m in model.modules():
        if isinstance(m, nn.Linear) or type(m).__name__ in (
                "ReplicatedLinear", "MergedColumnParallelLinear"):
            linear += _linear_bytes(m)
            linear_ids.update(id(t) for t in m.parameters(recurse=False))
    other = sum(t.numel() * t.element_size() for t in {id(t): t for t in
                [*model.parameters(), *model.buffers()]}.values() if id(t) not in linear_ids)
    return {"total": linear + other, "linear": linear}


def pass_time(quick: bool, repeats: int) -> dict[str, Any]:
    from vllm.model_executor.models.transformers.utils import recursive_replace_linear

    import fxpass
    from fxpass import zoo
    from fxpass.trace import DEFAULT_CACHE

    out = {}
    for name, prefix in (("gemma4_vision", "vision_tower"), ("gemma4_audio", "audio_tower")):
        size = "tiny" if quick else "default"
        base = zoo.build_tower(name, size=size, device="meta", dtype=torch.bfloat16)
        build_m = measure(lambda: zoo.build_tower(name, size=size, device="meta",
                                                  dtype=torch.bfloat16),
                          repeats, _min_run_time(quick))
        build = build_m.median
        DEFAULT_CACHE.clear()
        m = copy.deepcopy(base)
        cold = time_once(lambda: fxpass.apply(m, None, prefix=prefix))

        t = interleaved_on_copies(lambda: copy.deepcopy(base), {
            "walk": lambda m: recursive_replace_linear(m, None, prefix=prefix),
            "fxpass_warm": lambda m: fxpass.apply(m, None, prefix=prefix),
        }, repeats if quick else max(repeats, 15), collect=not quick)
        walk_s, warm_s = t["walk"].median, t["fxpass_warm"].median
        n_linear = sum(isinstance(x, nn.Linear) for x in base.modules())
        out[name] = {
            "linears": n_linear,
            "from_config_s": build,
            "walk_s": walk_s,
            "fxpass_cold_s": cold,
            "fxpass_warm_s": warm_s,
            "warm_over_walk": warm_s / walk_s,
            "cold_over_from_config": cold / build,
            "iqr_s": {"from_config": build_m.iqr, **iqrs(t)},
        }
    return out


def _vision_config(quick: bool) -> Any:
    from fxpass import zoo

    if quick:
        return zoo.tower_config("gemma4_vision"), 0
    cfg = zoo.tower_config("gemma4_vision", "default")
    cfg.num_hidden_layers = 4
    return cfg, None


def _vision_inputs(tower: nn.Module, patches: int) -> dict[str, torch.Tensor]:
    cfg = tower.config
    k = cfg.pooling_kernel_size
    side = int(round((patches // (k * k)) ** 0.5)) * k
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    pos = torch.stack([xs.flatten(), ys.flatten()], -1)[None]
    ref = next(tower.parameters())
    pixels = torch.rand(1, side * side, 3 * cfg.patch_size ** 2, generator=torch.Generator()
                        .manual_seed(0)).to(ref.dtype)
    return {"pixel_values": pixels, "pixel_position_ids": pos}


def _eager_rows(quick: bool, dtypes: tuple[str, ...]
                ) -> Iterator[tuple[str, str, torch.dtype, Any]]:
    """(peer tower, dtype name, dtype, config) for the eager rule sections: fp32, and bf16
    unless ``quick``, each only where ``dtypes`` names it."""
    rows = (("fp32", torch.float32),) + (() if quick else (("bf16", torch.bfloat16),))
    for name in PEER_TOWERS:
        cfg = _peer_config(name, quick)
        for dtype_name, dtype in rows:
            if dtype_name in dtypes:
                yield name, dtype_name, dtype, cfg


def _seeded_tower(cfg: Any, dtype: torch.dtype) -> nn.Module:
    """The HF tower of ``cfg`` with seed-0 random weights, in ``dtype``, eval mode."""
    from transformers import AutoModel

    torch.manual_seed(0)
    return AutoModel.from_config(cfg).to(dtype).eval()


def forward_latency(quick: bool, repeats: int,
                    dtypes: tuple[str, ...] = BENCH_DTYPES) -> dict[str, Any]:
    from vllm.model_executor.models.transformers.utils import recursive_replace_linear

    import fxpass
    from fxpass.weights import bnb_config, load_linear_weights

    cfg, _ = _vision_config(quick)
    patch_counts = (36,) if quick else (576, 256)
    results: dict[str, Any] = {}
    for dtype_name, dtype, quant in (("fp32", torch.float32, None),
                                     ("bf16", torch.bfloat16, None),
                                     ("nf4", torch.bfloat16, "nf4")):
        if dtype_name not in dtypes:
            continue
        hf = _seeded_tower(cfg, dtype)
        qc = bnb_config(quant) if quant else None
        # nf4 has no HF eager twin: its baseline is the bf16 HF tower
        variants: dict[str, nn.Module] = {"hf": hf}
        seed = copy.deepcopy(hf)
        old = {n: m for n, m in seed.named_modules() if isinstance(m, nn.Linear)}
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            recursive_replace_linear(seed, qc, prefix="vision_tower")
        finally:
            torch.set_default_dtype(default)
        for n, lin in old.items():
            load_linear_weights(seed.get_submodule(n), lin.weight, lin.bias, qc)
        variants["walk"] = seed
        for fuse in (False, True):
            m = copy.deepcopy(hf)
            x0 = _vision_inputs(m, patch_counts[0])
            fxpass.apply(m, qc, prefix="vision_tower", load_weights=True, fuse=fuse,
                         example_inputs=x0)
            variants["fxpass_fused" if fuse else "fxpass"] = m
        row: dict[str, Any] = {"weight_bytes": {k: _weight_bytes(v) for k, v in variants.items()}}
        for patches in patch_counts:
            x = _vision_inputs(hf, patches)
            fns = {k: (lambda v=v: v(**x)) for k, v in variants.items()}
            with torch.no_grad():
                t, iqr = _timed(fns, repeats, quick)
                peak = {k: _peak_forward_bytes(fn) for k, fn in fns.items()}
            row[f"patches_{patches}"] = {
                "median_s": t,
                "iqr_s": iqr,
                "speedup_vs_hf": {k: t["hf"] / v for k, v in t.items()},
                "peak_forward_bytes": peak,
            }
        results[dtype_name] = row
        del variants, hf, seed
        _collect(quick)
    return results


def verify_cost(quick: bool, repeats: int) -> dict[str, Any]:
    import fxpass
    from fxpass.verify import verify
    from fxpass import zoo

    tower = zoo.build_tower("gemma4_vision") if quick else None
    if tower is None:
        from transformers import AutoModel

        cfg, _ = _vision_config(False)
        torch.manual_seed(0)
        tower = AutoModel.from_config(cfg).eval()
    ref = copy.deepcopy(tower)
    x = _vision_inputs(tower, 36 if quick else 576)
    fxpass.apply(tower, None, load_weights=True, example_inputs=x)
    with torch.no_grad():
        fwd = measure(lambda: ref(**x), repeats, _min_run_time(quick))
    reports = []
    cost = time_once(lambda: reports.append(verify(ref, tower, [x], progress=False)))
    return {"forward_s": fwd.median, "forward_iqr_s": fwd.iqr, "verify_s": cost,
            "verify_over_forward": cost / fwd.median, "passed": bool(reports[0].passed)}


def first_call_overhead(quick: bool, repeats: int) -> dict[str, Any]:
    """What tracing at the first call costs (apply without example inputs, as in vLLM), on
    the default-size Gemma4 vision and audio towers (fp32, random weights): the first
    forward after that apply against the first forward after apply on example inputs
    (traced at init; both pay oneDNN's first-GEMM setup, and vLLM's walk cannot run the
    unquantized audio tower at all), and a warm forward; each repeat on fresh copies. A
    first-call trace runs on its own trace cache (the process-wide one would keep the real
    call's activations), so every repeat pays the whole trace."""
    import fxpass
    from fxpass import zoo

    size = "tiny" if quick else "default"
    out: dict[str, Any] = {}
    for name in ("gemma4_vision", "gemma4_audio"):
        torch.manual_seed(0)
        base = zoo.build_tower(name, size=size).eval()
        x = (_vision_inputs(base, 36 if quick else 256) if name == "gemma4_vision"
             else zoo.example_inputs(base, size_index=2))
        firsts, init_firsts, warms, traces = [], [], [], []
        for _ in range(max(1 if quick else 2, repeats // 2)):
            model = copy.deepcopy(base)
            report = fxpass.apply(model, None, load_weights=True, first_call=True)
            at_init = copy.deepcopy(base)
            fxpass.apply(at_init, None, load_weights=True, example_inputs=x)
            _collect(quick)
            with torch.no_grad():
                firsts.append(time_once(lambda: model(**x)))
                init_firsts.append(time_once(lambda: at_init(**x)))
                warms.extend(measure(lambda: model(**x), 1, _min_run_time(quick)).times)
            traces.append(report.first_call.get("trace_and_rewrite_s", 0.0))
            model = at_init = None  # freed before the next repeat
        stats = {"first": samples(firsts, "first"), "init_first": samples(init_firsts,
                                                                           "init_first"),
                 "warm": samples(warms, "warm"), "trace_and_rewrite": samples(traces, "trace")}
        first_s, init_first_s = stats["first"].median, stats["init_first"].median
        out[name] = {
            "layers": base.config.num_hidden_layers, "hidden": base.config.hidden_size,
            "warm_s": stats["warm"].median, "first_s": first_s,
            "init_first_s": init_first_s, "extra_s": first_s - init_first_s,
            "first_over_init_first": first_s / init_first_s,
            "trace_and_rewrite_s": stats["trace_and_rewrite"].median,
            "iqr_s": iqrs(stats),
        }
        del base
        _collect(quick)
    return out


class _LayerCall(nn.Module):
    """A call shaped as HF encoder layers are called, reading the state HF attention reads
    (its config's attention implementation and flags, the mode, plain attributes: each
    checked per call after apply); its body is one op, so the time around it is what a graph
    forward adds."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import PretrainedConfig

        self.config = PretrainedConfig()
        self.config._attn_implementation = "sdpa"
        self.scaling = 0.125
        self.dropout = 0.0

    def forward(self, hidden_states, position_embeddings, attention_mask=None, scale=1.0):
        cos, sin = position_embeddings
        if self.config._attn_implementation == "eager" or self.config.output_attentions:
            hidden_states = hidden_states * 2
        p = self.dropout if self.training else 0.0
        return (hidden_states * cos + sin) * (self.scaling + p)


def graph_call_overhead(quick: bool, repeats: int) -> dict[str, Any]:
    import fxpass

    x = torch.randn(1, 4)
    pe = (torch.randn(1, 4), torch.randn(1, 4))
    eager = _LayerCall()
    graph = fxpass.trace(eager, ((x, pe), {}), cache=None).build()
    forms = {"keywords": ((x, pe), {"attention_mask": None}), "defaults omitted": ((x, pe), {})}
    out: dict[str, Any] = {}
    with torch.no_grad():
        for form, (args, kwargs) in forms.items():
            def call(mod: nn.Module) -> Callable[[], None]:
                return lambda: mod(*args, **kwargs)
            # blocked_autorange times blocks of calls; Measurement's times are per call
            t, iqr = _timed({"module": call(eager), "graph": call(graph)}, repeats, quick,
                            QUICK_MIN_RUN_TIME if quick else None)
            out[form] = {"module_us": t["module"] * 1e6, "graph_us": t["graph"] * 1e6,
                         "overhead_us": (t["graph"] - t["module"]) * 1e6,
                         "module_iqr_us": iqr["module"] * 1e6,
                         "graph_iqr_us": iqr["graph"] * 1e6}
    return out


# -- peers: every way to run the tower, interleaved ----------------------------------------

PEER_TOWERS = ("siglip", "gemma4_vision")
PEER_PATCHES = 729  # SigLIP 384 px / patch 14; Gemma4: a 27 x 27 grid (pooled 3 x 3)


def _peer_config(name: str, quick: bool) -> Any:
    from transformers import SiglipVisionConfig

    from fxpass import zoo

    if name == "siglip":
        if quick:
            cfg = zoo.tower_config("siglip_vision")
            cfg.vision_use_head = False
        else:  # so400m width, no pooling head
            cfg = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304,
                                     num_attention_heads=16, num_hidden_layers=4,
                                     image_size=384, patch_size=14, vision_use_head=False)
        cfg._attn_implementation = "sdpa"
        return cfg
    cfg = zoo.tower_config("gemma4_vision", "tiny" if quick else "default")
    if not quick:
        cfg.num_hidden_layers = 4
    return cfg


def _peer_inputs(name: str, tower: nn.Module, dtype: torch.dtype, quick: bool
                 ) -> dict[str, torch.Tensor]:
    if name == "gemma4_vision":
        return _vision_inputs(tower, 36 if quick else PEER_PATCHES)
    cfg = tower.config
    gen = torch.Generator().manual_seed(0)
    px = torch.rand(1, cfg.num_channels, cfg.image_size, cfg.image_size, generator=gen)
    return {"pixel_values": px.to(dtype)}


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return _first_tensor(out[0])
    return out[0]  # a ModelOutput: its first field


def _walk_copy(hf: nn.Module, qc: Any, dtype: torch.dtype) -> nn.Module:
    from vllm.model_executor.models.transformers.utils import recursive_replace_linear

    from fxpass.weights import load_linear_weights

    seed = copy.deepcopy(hf)
    old = {n: m for n, m in seed.named_modules() if isinstance(m, nn.Linear)}
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        recursive_replace_linear(seed, qc, prefix="vision_tower")
    finally:
        torch.set_default_dtype(default)
    for n, lin in old.items():
        load_linear_weights(seed.get_submodule(n), lin.weight, lin.bias, qc)
    return seed


def vllm_siglip_tower(hf: nn.Module) -> nn.Module:
    """vLLM's hand-written SigLIP vision tower with ``hf``'s weights (inside vllm_runtime)."""
    from vllm.model_executor.models.siglip import SiglipVisionModel as VllmSiglip

    dtype = next(hf.parameters()).dtype
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        tower = VllmSiglip(hf.config, None, prefix="vision_tower").eval()
    finally:
        torch.set_default_dtype(default)
    weights = [(k.removeprefix("vision_model."), t) for k, t in hf.state_dict().items()
               if not k.startswith("vision_model.head.")]
    loaded = tower.vision_model.load_weights(weights)
    missing = {n for n, _ in tower.vision_model.named_parameters()} - set(loaded)
    if missing:
        raise RuntimeError(f"vLLM's SigLIP tower did not load {sorted(missing)[:4]}")
    for mod in tower.modules():
        method = getattr(mod, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(mod)
    return tower


def _compiled(model: nn.Module, x: dict[str, torch.Tensor]) -> tuple[Any, float]:
    """``torch.compile(model)`` and its first call's seconds (dynamo reset first: cold in
    this process; inductor's on-disk caches may be warm from an earlier run)."""
    torch._dynamo.reset()
    compiled = torch.compile(model)
    with torch.no_grad():
        first = time_once(lambda: compiled(**x))
    return compiled, first


def peers(quick: bool, repeats: int, dtypes: tuple[str, ...] = BENCH_DTYPES) -> dict[str, Any]:
    import fxpass
    from fxpass.weights import bnb_config

    results: dict[str, Any] = {}
    for name in PEER_TOWERS:
        cfg = _peer_config(name, quick)
        for dtype_name, dtype, quant in (("fp32", torch.float32, None),
                                         ("bf16", torch.bfloat16, None),
                                         ("nf4", torch.bfloat16, "nf4")):
            if dtype_name not in dtypes:
                continue
            hf = _seeded_tower(cfg, dtype)
            qc = bnb_config(quant) if quant else None
            x = _peer_inputs(name, hf, dtype, quick)
            variants: dict[str, Any] = {"hf": hf}
            notes: dict[str, str] = {}
            first_call_s: dict[str, float] = {}
            variants["walk"] = _walk_copy(hf, qc, dtype)
            if name == "siglip" and quant is None:
                variants["vllm"] = vllm_siglip_tower(hf)
            else:
                notes["vllm"] = ("vLLM's Gemma4 vision tower is HF's module + the walk (the walk row)"
                                 if name != "siglip" else
                                 "vLLM's SigLIP gets bnb weights only through its model loader")
            fx_model = copy.deepcopy(hf)
            report = fxpass.apply(fx_model, qc, prefix="vision_tower", load_weights=True,
                                  fuse=True, example_inputs=x)
            variants["fxpass"] = fx_model
            if quick:
                notes["compile"] = "not run with --quick"
            else:
                for base in ("walk", "fxpass"):
                    try:
                        variants[f"{base}+compile"], first_call_s[f"{base}+compile"] = (
                            _compiled(variants[base], x))
                    except Exception as e:  # noqa: BLE001 - reported, not fatal
                        notes[f"{base}+compile"] = f"{type(e).__name__}: {str(e)[:200]}"
            with torch.no_grad():
                ref = _first_tensor(hf(**x)).float()
                diffs = {k: (_first_tensor(v(**x)).float() - ref).abs().max().item()
                         for k, v in variants.items()}
                t, iqr = _timed({k: (lambda v=v: v(**x)) for k, v in variants.items()},
                                repeats, quick)
            others = {k: v for k, v in t.items() if k not in ("fxpass", "fxpass+compile")
                      and not (quant and k == "hf")}
            fastest_peer = min(others, key=others.get) if others else None
            results.setdefault(name, {})[dtype_name] = {
                "median_s": t,
                "iqr_s": iqr,
                "speedup_vs_hf": {k: t["hf"] / v for k, v in t.items()},
                "max_abs_diff_vs_hf": diffs,
                "max_abs_hf": ref.abs().max().item(),
                "first_call_s": first_call_s,
                "fastest_peer": fastest_peer,
                "fxpass_over_fastest_peer": (t[fastest_peer] / t["fxpass"]
                                             if fastest_peer else None),
                "compiled_fxpass_over_compiled_walk": (
                    t["walk+compile"] / t["fxpass+compile"]
                    if "walk+compile" in t and "fxpass+compile" in t else None),
                "speed_fixes": _count_fixes(report),
                "notes": notes,
            }
            del variants, hf, fx_model
            torch._dynamo.reset()
            _collect(quick)
    return results


def rule_gains(quick: bool, repeats: int,
               dtypes: tuple[str, ...] = BENCH_DTYPES) -> dict[str, Any]:
    """Each speed rule's gain: fxpass (fuse=True) against fxpass with that one rule left out
    (and against fuse=False: all of them), interleaved, eager, on both peer towers, each
    applied without example inputs (the rules run at the first call, as inside vLLM)."""
    import fxpass
    from fxpass.rules.registry import SPEED_RULES

    out: dict[str, Any] = {}
    for name, dtype_name, dtype, cfg in _eager_rows(quick, dtypes):
        hf = _seeded_tower(cfg, dtype)
        x = _peer_inputs(name, hf, dtype, quick)
        variants: dict[str, nn.Module] = {}
        fixes: dict[str, int] = {}
        for label, fuse, off in [("all rules", True, ()), ("fuse=False", False, ()),
                                 *((f"without {r}", True, (r,)) for r in SPEED_RULES)]:
            m = copy.deepcopy(hf)
            # as inside vLLM: no example inputs, the rules run at the first call
            report = fxpass.apply(m, None, prefix="vision_tower", load_weights=True,
                                  fuse=fuse, disable=list(off))
            with torch.no_grad():
                m(**x)
            if label == "all rules":
                fixes = _count_fixes(report)
            elif off and not fixes.get(off[0]):
                continue  # the rule does not apply to this tower
            variants[label] = m
        with torch.no_grad():
            t, iqr = _timed({k: (lambda v=v: v(**x)) for k, v in variants.items()},
                            repeats, quick)
        base = t["all rules"]
        out.setdefault(name, {})[dtype_name] = {
            "median_s": t, "iqr_s": iqr, "fixes": fixes,
            # > 1: the tower is that much faster with the rule (or all rules) than without
            "gain": {k: v / base for k, v in t.items() if k != "all rules"},
        }
        del variants, hf
        _collect(quick)
    return out


def attention_gain(quick: bool, repeats: int,
                   dtypes: tuple[str, ...] = BENCH_DTYPES) -> dict[str, Any]:
    """vLLM's encoder attention (rule ``mm-attention``) against the tower's own SDPA call:
    the same fxpass rewrite with the rule and without it, interleaved, eager, on both peer
    towers; Gemma4 vision also on a batch of two images where the second is padded (its
    padding patches masked: the rule's per-length path)."""
    import fxpass

    out: dict[str, Any] = {}
    for name, dtype_name, dtype, cfg in _eager_rows(quick, dtypes):
        hf = _seeded_tower(cfg, dtype)
        inputs = {"one image": _peer_inputs(name, hf, dtype, quick)}
        if name == "gemma4_vision":
            inputs["two, one padded"] = _padded_pair(inputs["one image"])
        with_rule, without = copy.deepcopy(hf), copy.deepcopy(hf)
        first = next(iter(inputs.values()))
        report = fxpass.apply(with_rule, None, prefix="vision_tower", load_weights=True,
                              example_inputs=first)
        fxpass.apply(without, None, prefix="vision_tower", load_weights=True,
                     example_inputs=first, disable=["mm-attention"])
        sites = sum(f.rule == "mm-attention" for f in report.fixes)
        for label, x in inputs.items():
            with torch.no_grad():
                t, iqr = _timed({"mm-attention": lambda x=x: with_rule(**x),
                                 "sdpa": lambda x=x: without(**x)}, repeats, quick)
            out.setdefault(name, {}).setdefault(dtype_name, {})[label] = {
                "median_s": t, "iqr_s": iqr, "sites": sites,
                # > 1: the tower is that much faster through vLLM's encoder attention
                "gain": t["sdpa"] / t["mm-attention"]}
        with_rule = without = hf = None  # (freed before the next tower)
        _collect(quick)
    return out


def _padded_pair(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gemma4 vision inputs for two images: the given one, and a copy whose last quarter of
    patches is padding (position -1, zero pixels), as the image processor pads a batch."""
    px, pos = x["pixel_values"], x["pixel_position_ids"]
    n = px.shape[1]
    k = n // 4
    px2, pos2 = px.clone(), pos.clone()
    px2[:, n - k:] = 0
    pos2[:, n - k:] = -1
    return {**x, "pixel_values": torch.cat([px, px2]), "pixel_position_ids": torch.cat([pos, pos2])}


def attention_table(r: dict[str, Any]) -> list[str]:
    lines = ["", "encoder attention: HF's SDPA call / vLLM's MMEncoderAttention (>1: the rule "
                 "helps), eager"]
    for name, by_dtype in r.items():
        for dt, rows in by_dtype.items():
            for label, row in rows.items():
                t = row["median_s"]
                lines.append(f"  {name:<13} {dt:<4} {label:<16} mm-attention "
                             f"{t['mm-attention'] * 1e3:.1f} ms  sdpa {t['sdpa'] * 1e3:.1f} ms  "
                             f"{row['gain']:.3f}x  ({row['sites']} sites)")
    return lines


def rules_table(r: dict[str, Any]) -> list[str]:
    lines = ["", "speed rules: time without the rule / time with all rules (>1: the rule helps)"]
    for name, by_dtype in r.items():
        for dt, row in by_dtype.items():
            cells = "  ".join(f"{k.removeprefix('without ')} {v:.3f}x"
                              for k, v in row["gain"].items())
            lines.append(f"  {name:<13} {dt:<4} all {row['median_s']['all rules'] * 1e3:.1f} ms"
                         f"  {cells}")
    return lines


def peers_markdown(result: dict[str, Any]) -> str:
    """The peers and rules sections as the README's markdown tables."""
    order = ["hf", "walk", "walk+compile", "vllm", "fxpass", "fxpass+compile"]
    lines = [f"machine: {result['machine']['processor']}, {result['machine']['threads']} "
             f"threads, torch {result['machine']['torch']}; medians of {result['repeats']}", ""]
    peers_result = result.get("peers", {})
    if peers_result:
        lines += ["| tower | dtype | " + " | ".join(order) + " | fxpass / fastest peer | "
                  "best fxpass (eager or compiled) / fastest peer | "
                  "compiled fxpass / compiled walk |",
                  "| --- | --- | " + " | ".join("---" for _ in order) + " | --- | --- | --- |"]
        for name, by_dtype in peers_result.items():
            for dt, r in by_dtype.items():
                cells = []
                for k in order:
                    if k not in r["median_s"]:
                        cells.append("n/a")
                        continue
                    cell = (f"{r['median_s'][k] * 1e3:.0f} ms ({r['speedup_vs_hf'][k]:.2f}x, "
                            f"{r['max_abs_diff_vs_hf'][k]:.1e})")
                    if k in r["first_call_s"]:
                        cell += f", 1st {r['first_call_s'][k]:.1f} s"
                    cells.append(cell)
                ratio = r["fxpass_over_fastest_peer"]
                comp = r["compiled_fxpass_over_compiled_walk"]
                t = r["median_s"]
                best = min(t[k] for k in ("fxpass", "fxpass+compile") if k in t)
                lines.append(f"| {name} | {dt} | " + " | ".join(cells)
                             + f" | {ratio:.3f}x ({r['fastest_peer']}) | "
                             + f"{t[r['fastest_peer']] / best:.3f}x | "
                             + (f"{comp:.3f}x" if comp else "n/a") + " |")
    gains = result.get("rules", {})
    if gains:
        names = sorted({k for t in gains.values() for r in t.values() for k in r["gain"]},
                       key=lambda k: (k != "fuse=False", k))
        lines += ["", "| tower | dtype | all rules | " + " | ".join(
            n.removeprefix("without ") for n in names) + " |",
                  "| --- | --- | --- | " + " | ".join("---" for _ in names) + " |"]
        for name, by_dtype in gains.items():
            for dt, r in by_dtype.items():
                lines.append(f"| {name} | {dt} | {r['median_s']['all rules'] * 1e3:.0f} ms | "
                             + " | ".join(f"{r['gain'][n]:.3f}x" if n in r["gain"] else "n/a"
                                          for n in names) + " |")
    return "\n".join(lines)


def _count_fixes(report: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for f in report.fixes:
        counts[f.rule] = counts.get(f.rule, 0) + 1
    return counts


def _ms(r: dict[str, Any], k: str, width: int = 0) -> str:
    """``r["median_s"][k]`` in ms, with its IQR when the result has one (older JSON not)."""
    text = f"{r['median_s'][k] * 1e3:{width}.1f} ms"
    iqr = r.get("iqr_s", {}).get(k)
    return text + (f" (IQR {iqr * 1e3:.1f})" if iqr is not None else "")


def peers_table(peers_result: dict[str, Any]) -> list[str]:
    lines = ["", "peers: tower forward, interleaved medians (speedup vs HF eager; max abs diff "
                 "vs HF; nf4: vs HF bf16)"]
    for name, by_dtype in peers_result.items():
        for dt, r in by_dtype.items():
            cells = "  ".join(
                f"{k} {_ms(r, k)} ({r['speedup_vs_hf'][k]:.2f}x, "
                f"{r['max_abs_diff_vs_hf'][k]:.1e})" for k in r["median_s"])
            lines.append(f"  {name:<13} {dt:<4} {cells}")
            extra = [f"fxpass / fastest peer ({r['fastest_peer']}): "
                     f"{r['fxpass_over_fastest_peer']:.3f}x"] if r["fastest_peer"] else []
            if r["compiled_fxpass_over_compiled_walk"]:
                extra.append(f"compiled fxpass / compiled walk: "
                             f"{r['compiled_fxpass_over_compiled_walk']:.3f}x")
            extra += [f"first call {k} {v:.1f} s" for k, v in r["first_call_s"].items()]
            extra += [f"{k}: {v}" for k, v in r["notes"].items()]
            lines.append(f"  {'':<13} {dt:<4} " + "; ".join(extra))
    return lines


SECTIONS = BENCH_SECTIONS
# run only when asked for (--only engine): it starts vLLM engines in their own processes
ON_REQUEST = ("engine",)
DTYPES = BENCH_DTYPES  # the forward / peers / rules rows
_BY_DTYPE = ("forward", "peers", "rules", "attention")


def run(quick: bool = False, repeats: int | None = None,
        only: tuple[str, ...] | None = None,
        dtypes: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Run the sections (``only``: these; ``dtypes``: only these rows of the forward / peers
    / rules sections) in one process, inside vLLM's runtime; ``repeats`` interleaved rounds
    per measurement (default 7; quick: 3)."""
    from fxpass.errors import UsageError
    from fxpass.vllm_context import vllm_runtime

    for name, given, valid in (("section", only, SECTIONS), ("dtype", dtypes, DTYPES)):
        bad = sorted(set(given or ()) - set(valid))
        if bad:
            raise UsageError(f"unknown bench {name} {', '.join(map(repr, bad))}; valid: "
                             f"{', '.join(valid)}")
    repeats = repeats or (3 if quick else 7)
    dtypes = tuple(dtypes) if dtypes else DTYPES
    sections = {"pass_time": pass_time, "forward": forward_latency, "peers": peers,
                "rules": rule_gains, "verify": verify_cost, "graph_call": graph_call_overhead,
                "first_call": first_call_overhead, "attention": attention_gain,
                "engine": engine_section}
    with vllm_runtime():
        result: dict[str, Any] = {
            "machine": {"platform": platform.platform(), "processor": _cpu_model(),
                        "threads": torch.get_num_threads(), "torch": torch.__version__},
            "quick": quick,
            "repeats": repeats,
            "stats": "torch.utils.benchmark: median and IQR of interleaved rounds",
        }
        if dtypes != DTYPES:
            result["dtypes"] = list(dtypes)
        for key in SECTIONS:
            if (only is None and key not in ON_REQUEST) or (only is not None and key in only):
                extra = {"dtypes": dtypes} if key in _BY_DTYPE else {}
                result[key] = sections[key](quick, repeats, **extra)
    return result


def engine_section(quick: bool, repeats: int) -> dict[str, Any]:
    """Encoder time per image / audio clip inside vLLM engines: the walk, the plugin, the
    plugin with compile_mm_encoder (``tools/engine_bench.py``: a source checkout's)."""
    import importlib.util

    from fxpass.errors import UsageError

    path = Path(__file__).resolve().parents[1] / "tools" / "engine_bench.py"
    if not path.is_file():
        raise UsageError(f"fxpass bench --only engine needs a source checkout of fxpass "
                         f"(tools/engine_bench.py and tests/e2e); not found at {path}")
    spec = importlib.util.spec_from_file_location("fxpass_engine_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if quick:
        res = module.run(items=2, rounds=1, dtypes=("bfloat16",), soft_tokens=70)
    else:
        res = module.run(items=6, rounds=max(1, min(repeats, 3)))
    return {**res, "table": module.table(res)}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} x {os.cpu_count()}"
    except OSError:
        pass
    return platform.processor()


def table(result: dict[str, Any]) -> str:
    lines = [f"machine: {result['machine']}  (medians of {result['repeats']} interleaved rounds; "
             f"quick={result['quick']})"]
    if "pass_time" in result:
        lines += ["", "pass time (meta towers, bf16)"]
    for name, r in result.get("pass_time", {}).items():
        lines.append(
            f"  {name:<14} {r['linears']:>4} linears  walk {r['walk_s'] * 1e3:7.1f} ms  "
            f"fxpass warm {r['fxpass_warm_s'] * 1e3:7.1f} ms ({r['warm_over_walk']:.2f}x walk)  "
            f"cold {r['fxpass_cold_s'] * 1e3:7.1f} ms ({r['cold_over_from_config']:.2f}x "
            f"from_config {r['from_config_s'] * 1e3:.1f} ms)")
    if "forward" in result:
        lines += ["", "vision tower forward (speedup vs HF eager; >1 is faster)"]
    for dt, row in result.get("forward", {}).items():
        for key, r in row.items():
            if not key.startswith("patches_"):
                continue
            cells = "  ".join(f"{k} {_ms(r, k, 7)} ({r['speedup_vs_hf'][k]:.2f}x)"
                              for k in r["median_s"])
            lines.append(f"  {dt:<4} {key:<12} {cells}")
        wb = row["weight_bytes"]
        lines.append(f"  {dt:<4} weight MiB (all / linears) " + "  ".join(
            f"{k} {v['total'] / 2**20:.1f} / {v['linear'] / 2**20:.1f}" for k, v in wb.items()))
        peak = next(v for k, v in row.items() if k.startswith("patches_"))["peak_forward_bytes"]
        lines.append(f"  {dt:<4} peak forward MiB ({next(k for k in row if k.startswith('patches_'))}) "
                     + "  ".join(f"{k} {v / 2**20:.1f}" for k, v in peak.items()))
    if "nf4" in result.get("forward", {}) and "bf16" in result.get("forward", {}):
        nf4 = result["forward"]["nf4"]["weight_bytes"]["fxpass"]
        bf16 = result["forward"]["bf16"]["weight_bytes"]["hf"]
        lines.append(f"  nf4 / bf16 weight bytes: linears {nf4['linear'] / bf16['linear']:.2f}x, "
                     f"whole tower {nf4['total'] / bf16['total']:.2f}x")
    for form, r in result.get("graph_call", {}).items():
        iqr = (f" (IQRs {r['graph_iqr_us']:.1f} / {r['module_iqr_us']:.1f} us)"
               if "graph_iqr_us" in r else "")
        lines.append(f"graph forward call ({form}): {r['graph_us']:.1f} us vs the module's own "
                     f"forward {r['module_us']:.1f} us: {r['overhead_us']:+.1f} us per call"
                     + iqr)
    fc = result.get("first_call") or {}
    if fc:
        lines += ["", "first call after apply without example inputs (trace + rewrite + the "
                      "call through the graphs) vs a warm forward, fp32"]
    for name, r in fc.items():
        lines.append(
            f"  {name:<14} {r['layers']} layers, hidden {r['hidden']}: first call "
            f"{r['first_s'] * 1e3:.1f} ms vs {r['init_first_s'] * 1e3:.1f} ms traced at init "
            f"({r['extra_s'] * 1e3:+.1f} ms, {r['first_over_init_first']:.2f}x; trace + "
            f"rewrite {r['trace_and_rewrite_s'] * 1e3:.1f} ms); warm {r['warm_s'] * 1e3:.1f} ms")
    if "peers" in result:
        lines += peers_table(result["peers"])
    if "rules" in result:
        lines += rules_table(result["rules"])
    if "attention" in result:
        lines += attention_table(result["attention"])
    if "engine" in result:
        lines += ["", result["engine"]["table"]]
    v = result.get("verify")
    if v:
        lines += ["", f"verify: {v['verify_s'] * 1e3:.1f} ms = {v['verify_over_forward']:.2f}x one "
                      f"forward of the original ({v['forward_s'] * 1e3:.1f} ms); passed={v['passed']}"]
    return "\n".join(lines)


def run_args(args: argparse.Namespace) -> int:
    """``fxpass bench`` with parsed arguments (fxpass.cli_options.add_bench_arguments)."""
    if args.markdown:
        with open(args.markdown) as f:
            print(peers_markdown(json.load(f)))
        return 0
    result = run(args.quick, args.repeats, tuple(args.only) if args.only else None,
                 tuple(args.dtypes) if args.dtypes else None)
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    from fxpass.cli_options import BENCH_DESCRIPTION, BENCH_EPILOG, HelpFormatter

    parser = argparse.ArgumentParser(prog="fxpass bench", description=BENCH_DESCRIPTION,
                                     epilog=BENCH_EPILOG, formatter_class=HelpFormatter)
    add_bench_arguments(parser)
    return run_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
