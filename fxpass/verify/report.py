"""The report ``fxpass.verify`` returns: per-node metrics, output metrics, the verdict."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from fxpass.verify.budgets import Budget
from fxpass.verify.metrics import Metrics, json_float

__all__ = ["NodeResult", "VerifyReport"]

REFERENCE = "reference"  # the original module
FAKE_QUANT = "fake_quant"  # the original module with fake-quantized weights


@dataclasses.dataclass
class NodeResult:
    """One compared tensor: a module call's output (one leaf of it) or a tower output.

    ``module`` is the called module's path in the tower, ``call`` its call number within one
    forward (0 for a module called once), ``graph`` / ``node`` the fx graph (its module's
    path) and node that make the call, when the reference's trace shows it. Tower outputs
    have ``kind == "output"`` and ``module == ""``; ``leaf`` names the tensor inside a
    structured value (``last_hidden_state``, ``0``, ...).

    ``sharded`` (tensor parallel): why the tensor was not compared — the candidate holds one
    rank's block of it that no split recorded by the tensor-parallel rule matches; its
    consumers (the tower output at least) are compared instead. Not a failure, and listed.
    """

    input: int
    order: int
    kind: str  # "layer" (a rewritten linear), "module", "output"
    module: str
    call: int = 0
    leaf: str = ""
    graph: str | None = None
    node: str | None = None
    quant_method: str | None = None
    metrics: dict[str, Metrics] = dataclasses.field(default_factory=dict)
    violations: list[str] = dataclasses.field(default_factory=list)
    sharded: str | None = None

    @property
    def passed(self) -> bool:
        return not self.violations

    @property
    def label(self) -> str:
        """``module[#call][:leaf]``, or ``<output>:leaf``."""
        base = "<output>" if self.kind == "output" else (self.module or "<root>")
        if self.call:
            base += f"#{self.call}"
        if self.leaf:
            base += f":{self.leaf}"
        return base

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "order": self.order,
            "kind": self.kind,
            "module": self.module,
            "call": self.call,
            "leaf": self.leaf,
            "graph": self.graph,
            "node": self.node,
            "quant_method": self.quant_method,
            "passed": self.passed,
            "violations": list(self.violations),
            "sharded": self.sharded,
            "metrics": {k: m.to_dict() for k, m in self.metrics.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "NodeResult":
        return cls(
            input=d["input"], order=d["order"], kind=d["kind"], module=d["module"],
            call=d.get("call", 0), leaf=d.get("leaf", ""), graph=d.get("graph"),
            node=d.get("node"), quant_method=d.get("quant_method"),
            metrics={k: Metrics.from_dict(m) for k, m in d.get("metrics", {}).items()},
            violations=list(d.get("violations", [])), sharded=d.get("sharded"),
        )


@dataclasses.dataclass
class VerifyReport:
    """What ``fxpass.verify`` found. ``passed`` is False if any node, any output or any run
    failed; ``first_divergence`` is the first failing node in execution order (inputs in the
    order given)."""

    mode: str
    dtype: str
    quant_method: str
    budget: Budget
    references: list[str]
    inputs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    nodes: list[NodeResult] = dataclasses.field(default_factory=list)
    outputs: list[NodeResult] = dataclasses.field(default_factory=list)
    errors: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    layer_methods: dict[str, str] = dataclasses.field(default_factory=dict)
    candidate_only: list[str] = dataclasses.field(default_factory=list)
    reference_only: list[str] = dataclasses.field(default_factory=list)
    # candidate modules a rule added where the reference makes a function call (vLLM's
    # encoder attention for SDPA) -> the module whose compared output holds theirs
    covered: dict[str, str] = dataclasses.field(default_factory=dict)
    elapsed_s: float = 0.0

    # -- verdict --------------------------------------------------------------------------

    @property
    def passed(self) -> bool:
        return not self.errors and all(n.passed for n in (*self.nodes, *self.outputs))

    @property
    def failures(self) -> list[NodeResult]:
        return [n for n in self._ordered() if not n.passed]

    def _ordered(self) -> list[NodeResult]:
        # per input: nodes in execution order, then that input's outputs
        return sorted((*self.nodes, *self.outputs),
                      key=lambda n: (n.input, n.kind == "output", n.order))

    @property
    def first_divergence(self) -> NodeResult | None:
        failures = self.failures
        if failures:
            return failures[0]
        return None

    def worst_output_sqnr_db(self, reference: str = REFERENCE) -> float | None:
        """Lowest SQNR over the floating output tensors of all inputs vs ``reference``."""
        values = [n.metrics[reference].sqnr_db for n in self.outputs
                  if reference in n.metrics and n.metrics[reference].sqnr_db is not None
                  and _is_float(n.metrics[reference].ref_dtype)]
        return min(values) if values else None

    def layer_summary(self) -> dict[str, dict[str, Any]]:
        """Per rewritten layer (module path): worst metrics over inputs and calls."""
        out: dict[str, dict[str, Any]] = {}
        for n in self.nodes:
            if n.kind != "layer":
                continue
            entry = out.setdefault(n.module, {"quant_method": n.quant_method, "passed": True})
            entry["passed"] = entry["passed"] and n.passed
            for ref, m in n.metrics.items():
                if m.sqnr_db is None:
                    continue
                key = f"{ref}_sqnr_db"
                entry[key] = min(entry.get(key, math.inf), m.sqnr_db)
        return out

    # -- presentation ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        first = self.first_divergence
        out = {
            "passed": self.passed,
            "mode": self.mode,
            "dtype": self.dtype,
            "quant_method": self.quant_method,
            "references": list(self.references),
            "budget": self.budget.to_dict(),
            "inputs": self.inputs,
            "output_sqnr_db": {r: json_float(self.worst_output_sqnr_db(r))
                               for r in self.references},
            "first_divergence": first.to_dict() if first is not None else None,
            "errors": list(self.errors),
            "counts": {
                "nodes": len(self.nodes),
                "failed_nodes": sum(not n.passed for n in self.nodes),
                "outputs": len(self.outputs),
                "failed_outputs": sum(not n.passed for n in self.outputs),
                "sharded": sum(n.sharded is not None for n in self.nodes),
                "layers": len(self.layer_methods),
                "candidate_only": len(self.candidate_only),
                "reference_only": len(self.reference_only),
                "covered": len(self.covered),
            },
            "layers": {k: {kk: json_float(v) if isinstance(v, float) else v
                           for kk, v in d.items()}
                       for k, d in self.layer_summary().items()},
            "layer_methods": dict(self.layer_methods),
            "candidate_only": list(self.candidate_only),
            "reference_only": list(self.reference_only),
            "covered": dict(self.covered),
            "nodes": [n.to_dict() for n in self.nodes],
            "outputs": [n.to_dict() for n in self.outputs],
            "elapsed_s": round(self.elapsed_s, 4),
        }
        json.dumps(out, allow_nan=False)  # fail here, not in a caller
        return out

    def summary_line(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        parts = [f"verify[{self.mode}, {self.dtype}, {self.quant_method}]: {verdict}",
                 f"{len(self.nodes)} node comparisons over {len(self.inputs)} input(s)",
                 f"{len(self.layer_methods)} rewritten layers"]
        sharded = sum(n.sharded is not None for n in self.nodes)
        if sharded:
            parts.append(f"{sharded} sharded (compared through their consumers)")
        for ref in self.references:
            s = self.worst_output_sqnr_db(ref)
            if s is not None:
                parts.append(f"output SQNR vs {ref} {_fmt_db(s)}")
        parts.append(f"{self.elapsed_s:.2f} s")
        return ", ".join(parts)

    def format(self, *, all_nodes: bool = False) -> str:
        """A table: one row per rewritten layer, failing node and output tensor (worst over
        inputs); ``all_nodes`` lists every compared module."""
        lines = [self.summary_line()]
        refs = self.references
        groups: dict[tuple[str, str, int, str], list[NodeResult]] = {}
        for n in self._ordered():
            if all_nodes or n.kind != "module" or not n.passed or n.sharded:
                groups.setdefault((n.kind, n.module, n.call, n.leaf), []).append(n)
        hidden = sum(1 for n in self.nodes if n.kind == "module" and n.passed
                     and not n.sharded) if not all_nodes else 0
        rows: list[list[str]] = []
        header = ["node", "kind", "quant"]
        for ref in refs:
            header += [f"max_abs[{ref}]", f"cos[{ref}]", f"sqnr_dB[{ref}]"]
        header.append("status")
        for items in groups.values():
            n0 = items[0]
            label = n0.label if n0.node is None else f"{n0.label} ({n0.node})"
            row = [label, n0.kind, n0.quant_method or ""]
            for ref in refs:
                ms = [n.metrics[ref] for n in items if ref in n.metrics]
                row += [
                    _fmt(max((m.max_abs for m in ms if m.max_abs is not None), default=None)),
                    _fmt(min((m.cosine for m in ms if m.cosine is not None), default=None),
                         cos=True),
                    _fmt_db(min((m.sqnr_db for m in ms if m.sqnr_db is not None),
                                default=None)),
                ]
            bad = [v for n in items for v in n.violations]
            row.append("FAIL" if bad else "sharded" if all(n.sharded for n in items)
                       else "ok")
            rows.append(row)
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines.append("  " + "  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for r in rows:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if hidden:
            lines.append(f"  (+{hidden} other module outputs within budget; "
                         "format(all_nodes=True) lists them)")
        sharded = next((n for n in self.nodes if n.sharded), None)
        if sharded is not None:
            lines.append(f"  {sharded.label} (and the other rows marked sharded): "
                         f"{sharded.sharded}")
        for e in self.errors:
            lines.append(f"  error on input {e['input']}: {e['error']}"
                         + (f" (after {e['after']})" if e.get("after") else ""))
        first = self.first_divergence
        if first is not None:
            where = first.label + (f", node {first.node} of graph {first.graph or '<root>'}"
                                   if first.node else "")
            lines.append(f"  first divergence: {where} (input {first.input}): "
                         + "; ".join(first.violations))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _is_float(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat"))


def _fmt(x: float | None, *, cos: bool = False) -> str:
    if x is None:
        return "-"
    if math.isinf(x) or math.isnan(x):
        return str(x)
    if cos:
        return f"{x:.6f}"
    return f"{x:.3g}"


def _fmt_db(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.1f}"
