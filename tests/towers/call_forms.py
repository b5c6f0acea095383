"""A rewritten tower against its original, called every way the catalogue knows.

``check(entry)`` builds the tower, applies ``fxpass.apply(..., load_weights=True)`` with no
example inputs (the graphs come from the first call, as inside vLLM; ``first_call=False``:
the keyword call at size 0, batch 1 as the example instead), then makes every call form
(positional, keyword, omitted and explicit defaults, branches the first call did not take,
submodules called directly) at every size, batch 1 and 2, on both, and compares: the same
answer within the unquantized budget, or the same exception. ``check_nf4(entry)`` applies
with bitsandbytes nf4 (no inputs either) and compares the output's SQNR against the original
with that of a fake-quantized copy of the original (the same weights quantized and
dequantized, run by HF's own code). Used by ``tests/rewrite/test_tower_call_forms.py`` and by
``tools/call_forms_table.py`` (the table in docs/measurements.md).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import torch

import catalogue as cat

ATOL = 1e-4  # the unquantized fp32 budget (tests/rewrite/test_apply.py)


@dataclasses.dataclass
class Result:
    tower: str
    calls: int = 0
    worst: float = 0.0
    wrong: list[str] = dataclasses.field(default_factory=list)  # wrong answers / other errors
    forms: set[str] = dataclasses.field(default_factory=set)
    graph_sites: int = 0
    linears: int = 0
    specialisations: int = 0
    python_calls: int = 0
    first_call_ms: float = 0.0  # trace + rewrite + the first call through the graphs
    # calls where the rewritten tower raised what vLLM's walk raises on them (the original
    # does not): never worse than the walk, listed apart from wrong answers
    as_the_walk: list[str] = dataclasses.field(default_factory=list)
    untraced: dict[str, str] = dataclasses.field(default_factory=dict)
    python_reasons: dict[str, str] = dataclasses.field(default_factory=dict)
    site_reasons: dict[str, str] = dataclasses.field(default_factory=dict)
    fused: int = 0  # linears merged into a fused layer (fuse=True)


def _max_abs(out: Any) -> float:
    return max((float(v.detach().abs().max()) for _, v in cat._leaves(out)
                if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel()),
               default=0.0)


def _outcome(call: cat.Call, module: torch.nn.Module) -> Any:
    try:
        with torch.no_grad():
            return call(module)
    except Exception as e:  # noqa: BLE001 - the exception is the outcome
        return e


def check(entry: cat.Tower, *, first_call: bool = True, fuse: bool = False,
          forms: set[str] | None = None, rtol: float = 0.0,
          batches: tuple[int, ...] = (1, 2)) -> Result:
    """``fuse=True``: the speed rules too (vLLM's plugin default), fusion built at the first
    call from the loaded layers. ``forms``: only these call forms (``keyword``, ...).
    ``rtol``: a wrong answer is one further than ``ATOL + rtol * max|original|`` (merged
    GEMMs and a patch conv as a GEMM sum in another order; a random tower can amplify that)."""
    import fxpass

    res = Result(entry.name)
    ref = entry.build(0)
    model = copy.deepcopy(ref)
    if first_call:
        report = fxpass.apply(model, None, load_weights=True, first_call=True, fuse=fuse)
    else:
        report = fxpass.apply(model, None, load_weights=True, fuse=fuse,
                              example_inputs=entry.inputs(ref, 0, 1))
    walked = None  # vLLM's walk on the same tower, built when a call needs it
    for size in range(entry.sizes):
        for batch in batches:
            for call in entry.calls(ref, size, batch):
                if forms is not None and call.name.split(":")[0] not in forms:
                    continue
                res.calls += 1
                res.forms.add(call.name.split(":")[0])
                want, got = _outcome(call, ref), _outcome(call, model)
                where = f"{call.name} size {size} batch {batch}"
                if isinstance(want, Exception) or isinstance(got, Exception):
                    if type(want) is not type(got) or str(want) != str(got):
                        if isinstance(got, Exception) and not isinstance(want, Exception):
                            if walked is None:
                                walked = _walk(ref, None)
                            walk = _outcome(call, walked)
                            if isinstance(walk, Exception) and _text(walk) == _text(got):
                                res.as_the_walk.append(f"{where}: {_text(got)}")
                                continue
                        res.wrong.append(f"{where}: original {want!r:.200}, rewritten {got!r:.200}")
                    continue
                try:
                    diff = cat.compare(want, got)
                except AssertionError as e:
                    res.wrong.append(f"{where}: {e}")
                    continue
                res.worst = max(res.worst, diff)
                if diff > ATOL + (rtol * _max_abs(want) if rtol else 0.0):
                    res.wrong.append(f"{where}: max abs diff {diff:.2e}")
    if first_call and report.first_call.get("state") != "traced":
        res.wrong.append(f"the first call did not trace the tower: {report.first_call}")
    res.first_call_ms = report.first_call.get("elapsed_s", 0.0) * 1000
    res.linears = len(report.replaced) + len(report.skipped)
    res.fused = sum(len(m) for m in report.fused.values())
    res.graph_sites = len(report.graph_rewrites) + res.fused  # a fused member is in a graph
    res.site_reasons = {**report.plain_swaps, **report.skipped}
    res.untraced = dict(report.untraced)
    rt = report.runtime
    res.specialisations = sum(rt.specialisations.values())
    res.python_calls = sum(rt.fallbacks.values())
    res.python_reasons = {m: r["fallback"] for m, r in rt.reasons.items() if "fallback" in r}
    return res


@dataclasses.dataclass
class Nf4Result:
    tower: str
    sqnr_db: float  # the nf4 tower's output against the original's
    fake_quant_db: float  # the fake-quantized original's output against the original's
    methods: dict[str, str] = dataclasses.field(default_factory=dict)
    # when the nf4 tower raised: its error, and what vLLM's walk + the same weights raised
    error: str | None = None
    walk_error: str | None = None

    @property
    def gap_db(self) -> float:
        if math.isinf(self.sqnr_db) and math.isinf(self.fake_quant_db):
            return 0.0
        return abs(self.sqnr_db - self.fake_quant_db)

    @property
    def as_the_walk(self) -> bool:
        """It raised, and vLLM's walk raises the same on the same call (never worse)."""
        return self.error is not None and self.error == self.walk_error


def _float_leaves(out: Any) -> torch.Tensor:
    leaves = [v.double().flatten() for _, v in cat._leaves(out)
              if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel()]
    return torch.cat(leaves)


def sqnr_db(ref: Any, got: Any) -> float:
    r, g = _float_leaves(ref), _float_leaves(got)
    err = float(((r - g) ** 2).sum())
    return math.inf if err == 0 else 10 * math.log10(float((r ** 2).sum()) / err)


def check_nf4(entry: cat.Tower) -> Nf4Result:
    """nf4 through fxpass (no example inputs) against HF's code on fake-quantized weights."""
    import fxpass
    from fxpass.verify import fake_quant_reference
    from fxpass.weights import bnb_config

    ref = entry.build(0)
    model = copy.deepcopy(ref)
    report = fxpass.apply(model, bnb_config("nf4"), load_weights=True, first_call=True)
    prefix = report.prefix
    methods = {n.removeprefix(f"{prefix}.") if prefix else n: m
               for n, m in report.quant_methods.items()}
    fake = fake_quant_reference(ref, methods)
    call = entry.calls(ref, 0, 2)[0]  # the keyword call, batch 2
    with torch.no_grad():
        want, fq = call(ref), call(fake)
        got = _outcome(call, model)
    if not isinstance(got, Exception):
        return Nf4Result(entry.name, sqnr_db(want, got), sqnr_db(want, fq), methods)
    walked = _walk(ref, bnb_config("nf4"))
    walk = _outcome(call, walked)
    return Nf4Result(entry.name, math.nan, sqnr_db(want, fq), methods, error=_text(got),
                     walk_error=_text(walk) if isinstance(walk, Exception) else None)


def _text(e: Exception) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:300]


def _walk(ref: torch.nn.Module, quant_config: Any) -> torch.nn.Module:
    """What vLLM's module walk does to a copy of ``ref``: every nn.Linear becomes a
    ReplicatedLinear with the quant config (built and loaded with fxpass's layer builder and
    loader, which give the layer vLLM's loader would fill)."""
    from fxpass.weights import build_vllm_linear, load_linear_weights

    model = copy.deepcopy(ref)
    for name, lin in [(n, m) for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear)]:
        layer = build_vllm_linear(lin, quant_config, name)
        load_linear_weights(layer, lin.weight, lin.bias, quant_config)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    return model
