"""The report ``fxpass.apply`` returns; the CLI, CI and the visualisation all read this one."""

from __future__ import annotations

import dataclasses
import json
from typing import Any


@dataclasses.dataclass
class Fix:
    """One graph edit a rule made besides the linear swap (a probe folded, a contiguous())."""

    rule: str
    module: str  # qualified name of the graph's module
    node: str  # the node as fx formats it, before the edit
    detail: str

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Report:
    """What apply replaced, what it left alone and why, and what else it fixed.

    ``replaced`` holds full prefixed names (``<prefix>.<qualified name>``), as vLLM's loaders
    and quant skip lists see them; the other dicts are keyed the same way.
    """

    prefix: str = ""
    replaced: list[str] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    graph_rewrites: list[str] = dataclasses.field(default_factory=list)
    plain_swaps: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> why no graph
    quant_methods: dict[str, str] = dataclasses.field(default_factory=dict)
    fixes: list[Fix] = dataclasses.field(default_factory=list)
    # vLLM GEMM inputs given a .contiguous() as a precaution (strides may change with shape)
    contiguity_checks: int = 0
    fused: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # fused -> members
    refusals: list[dict[str, str]] = dataclasses.field(default_factory=list)  # rule, target, why
    untraced: dict[str, str] = dataclasses.field(default_factory=dict)
    # tensor parallelism (apply(..., tp=N)): the TP size, each rewritten linear's parallel
    # style (ColumnParallelLinear, RowParallelLinear, QKVParallelLinear,
    # MergedColumnParallelLinear), why the others stayed replicated, the pairs sharded, and
    # the share of the tower's parameter bytes in sharded layers
    tp: int = 1
    tp_styles: dict[str, str] = dataclasses.field(default_factory=dict)
    tp_replicated: dict[str, str] = dataclasses.field(default_factory=dict)
    tp_pairs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    tp_sharded_fraction: float = 0.0
    already_applied: bool = False
    # for already_applied: the settings of the apply that rewrote the model ("module": where
    # it was applied, "quant_config", "prefix", "fuse", "tp", "load_weights", "first_call"),
    # and, where this call asked for others, why nothing changed and what to do
    already_applied_with: dict[str, Any] = dataclasses.field(default_factory=dict)
    already_applied_note: str = ""
    weights_loaded: bool = False
    # "apply": traced on example inputs inside apply; "first call": apply had none, so the
    # linears were swapped at init and the graphs come from the model's first real call
    traced_at: str = "apply"
    # for traced_at == "first call": state ("armed" until the first call, then "traced", or
    # "python" when that trace failed: the tower runs as vLLM's walk left it), the call's
    # form, its wall time (trace + rewrite + the call through the graphs) and any error
    first_call: dict[str, Any] = dataclasses.field(default_factory=dict)
    timings_s: dict[str, float] = dataclasses.field(default_factory=dict)
    # live: graphs traced after apply (calls the first graphs did not cover) and calls served
    # by Python, per module (fxpass.trace.RuntimeStats)
    runtime: Any = None

    @property
    def probes(self) -> list[Fix]:
        return [f for f in self.fixes if f.rule == "weight-probes"]

    @property
    def contiguity(self) -> list[Fix]:
        return [f for f in self.fixes if f.rule == "contiguity"]

    def counts(self) -> dict[str, int]:
        return {
            "replaced": len(self.replaced),
            "graph_rewrites": len(self.graph_rewrites),
            "plain_swaps": len(self.plain_swaps),
            "skipped": len(self.skipped),
            "probes": len(self.probes),
            "contiguity": len(self.contiguity),
            "contiguity_checks": self.contiguity_checks,
            "fused_groups": len(self.fused),
            "untraced_modules": len(self.untraced),
            "tp_column": sum(1 for v in self.tp_styles.values() if v != "RowParallelLinear"),
            "tp_row": sum(1 for v in self.tp_styles.values() if v == "RowParallelLinear"),
            "tp_replicated": len(self.tp_replicated),
        }

    def tp_dict(self) -> dict[str, Any]:
        """Each rewritten linear's parallel style, or "replicated" with the reason."""
        layers = {n: {"style": s} for n, s in self.tp_styles.items()}
        layers.update({n: {"style": "replicated", "reason": r}
                       for n, r in self.tp_replicated.items()})
        return {"size": self.tp, "layers": layers, "pairs": [dict(p) for p in self.tp_pairs],
                "sharded_fraction": round(self.tp_sharded_fraction, 6)}

    def to_dict(self) -> dict[str, Any]:
        out = {
            "prefix": self.prefix,
            "counts": self.counts(),
            "replaced": list(self.replaced),
            "skipped": dict(self.skipped),
            "graph_rewrites": list(self.graph_rewrites),
            "plain_swaps": dict(self.plain_swaps),
            "quant_methods": dict(self.quant_methods),
            "fixes": [f.to_dict() for f in self.fixes],
            "fused": {k: list(v) for k, v in self.fused.items()},
            "refusals": [dict(r) for r in self.refusals],
            "untraced": dict(self.untraced),
            "tp": self.tp_dict(),
            "already_applied": self.already_applied,
            "already_applied_with": dict(self.already_applied_with),
            "already_applied_note": self.already_applied_note,
            "weights_loaded": self.weights_loaded,
            "traced_at": self.traced_at,
            "first_call": dict(self.first_call),
            "timings_s": {k: round(v, 6) for k, v in self.timings_s.items()},
            "runtime": (self.runtime.to_dict() if self.runtime is not None else
                        {"specialisations": {}, "fallbacks": {}, "reasons": {}}),
        }
        json.dumps(out)  # fail here, not in a caller, if something is not serialisable
        return out

    def summary_line(self) -> str:
        c = self.counts()
        total = sum(self.timings_s.values())
        head = (self.already_applied_note.removeprefix("fxpass.apply: ")
                or "already applied; nothing changed") if self.already_applied else (
            f"{c['replaced']} linears -> vLLM ({c['graph_rewrites']} in graphs, "
            f"{c['plain_swaps']} plain swaps), {c['skipped']} skipped, "
            f"{c['probes']} weight probes folded, {c['contiguity']} contiguity fixes"
            + (f", {c['fused_groups']} fused groups" if self.fused else "")
            + (f", tp={self.tp}: {c['tp_column'] + c['tp_row']} linears sharded "
               f"({c['tp_column']} column, {c['tp_row']} row), {c['tp_replicated']} "
               f"replicated ({self.tp_sharded_fraction:.0%} of the tower's parameter bytes "
               "sharded)" if self.tp > 1 else ""))
        state = self.first_call.get("state")
        if self.traced_at == "first call" and not self.already_applied:
            if state == "armed":
                head = (f"{c['replaced']} linears -> vLLM at init, {c['skipped']} skipped; no "
                        "example inputs, so the graphs (and their fixes) come at the first call")
            elif state == "python":
                head = (f"{head}; tracing the first call failed, so the tower runs as Python "
                        f"with its swapped layers (as vLLM's walk leaves it): "
                        f"{self.first_call.get('error', '')}")
            else:
                head += (f"; linears swapped at init, graphs traced at the first call "
                         f"({self.first_call.get('elapsed_s', 0.0) * 1000:.1f} ms)")
        return f"fxpass[{self.prefix or '<root>'}]: {head}, {total * 1000:.1f} ms"

    def __str__(self) -> str:
        lines = [self.summary_line()]
        width = max((len(n) for n in [*self.replaced, *self.skipped]), default=10)
        if self.replaced:
            lines.append(f"  {'layer':<{width}}  how    quant")
            for name in self.replaced:
                how = ("graph" if name in self.graph_rewrites else
                       "fused" if any(name in m for m in self.fused.values()) else "swap")
                lines.append(f"  {name:<{width}}  {how:<5}  {self.quant_methods.get(name, '')}")
        for name, style in self.tp_styles.items():
            lines.append(f"  tp: {name}: {style}")
        for name, why in self.tp_replicated.items():
            lines.append(f"  tp: {name}: replicated: {why}")
        for name, members in self.fused.items():
            lines.append(f"  fused: {name} <- {', '.join(members)}")
        for r in self.refusals:
            lines.append(f"  {r['rule']} refused: {r['target']}: {r['reason']}")
        for name, why in self.plain_swaps.items():
            lines.append(f"  swap without graph: {name}: {why}")
        for name, why in self.skipped.items():
            lines.append(f"  skipped: {name}: {why}")
        for fix in self.fixes:
            lines.append(f"  {fix.rule}: {fix.module or '<root>'}: {fix.detail}")
        for name, why in self.untraced.items():
            lines.append(f"  python: {name or '<root>'}: {why}")
        if self.runtime is not None:
            rt = self.runtime
            for name in sorted({*rt.specialisations, *rt.fallbacks}):
                lines.append(f"  since apply: {name}: {rt.specialisations.get(name, 0)} new "
                             f"graphs, {rt.fallbacks.get(name, 0)} Python calls "
                             f"(first: {'; '.join(rt.reasons.get(name, {}).values())})")
        return "\n".join(lines)
