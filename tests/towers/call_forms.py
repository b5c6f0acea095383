"""A rewritten tower against its original, called every way the catalogue knows.

``check(entry)`` builds the tower, applies ``fxpass.apply(..., load_weights=True)`` with the
keyword call at size 0, batch 1 as the example, then makes every call form (positional,
keyword, omitted and explicit defaults, branches the example did not take, submodules called
directly) at every size, batch 1 and 2, on both, and compares: the same answer within the
unquantized budget, or the same exception. Used by ``tests/rewrite/test_tower_call_forms.py``
and by ``tools/call_forms_table.py`` (the README's table).
"""

from __future__ import annotations

import copy
import dataclasses
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
    untraced: dict[str, str] = dataclasses.field(default_factory=dict)
    python_reasons: dict[str, str] = dataclasses.field(default_factory=dict)
    site_reasons: dict[str, str] = dataclasses.field(default_factory=dict)


def _outcome(call: cat.Call, module: torch.nn.Module) -> Any:
    try:
        with torch.no_grad():
            return call(module)
    except Exception as e:  # noqa: BLE001 - the exception is the outcome
        return e


def check(entry: cat.Tower) -> Result:
    import fxpass

    res = Result(entry.name)
    ref = entry.build(0)
    model = copy.deepcopy(ref)
    report = fxpass.apply(model, None, load_weights=True, example_inputs=entry.inputs(ref, 0, 1))
    res.linears = len(report.replaced) + len(report.skipped)
    res.graph_sites = len(report.graph_rewrites)
    res.site_reasons = {**report.plain_swaps, **report.skipped}
    res.untraced = dict(report.untraced)
    for size in range(entry.sizes):
        for batch in (1, 2):
            for call in entry.calls(ref, size, batch):
                res.calls += 1
                res.forms.add(call.name.split(":")[0])
                want, got = _outcome(call, ref), _outcome(call, model)
                where = f"{call.name} size {size} batch {batch}"
                if isinstance(want, Exception) or isinstance(got, Exception):
                    if type(want) is not type(got) or str(want) != str(got):
                        res.wrong.append(f"{where}: original {want!r:.200}, rewritten {got!r:.200}")
                    continue
                try:
                    diff = cat.compare(want, got)
                except AssertionError as e:
                    res.wrong.append(f"{where}: {e}")
                    continue
                res.worst = max(res.worst, diff)
                if diff > ATOL:
                    res.wrong.append(f"{where}: max abs diff {diff:.2e}")
    rt = report.runtime
    res.specialisations = sum(rt.specialisations.values())
    res.python_calls = sum(rt.fallbacks.values())
    res.python_reasons = {m: r["fallback"] for m, r in rt.reasons.items() if "fallback" in r}
    return res
