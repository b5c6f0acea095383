"""One rank of the TP=2 verify checks (run by ``fxpass.verify.ranks.run_on_ranks`` from
tests/verify/test_verify_tp.py): the vision tower of the tiny Gemma4 checkpoint
(``zoo.build_tiny_gemma4``, float32; 2 heads of 32, one head per rank), verified against its
unsharded original in several set-ups; each returns the parts of the report the tests
assert on (pickled back to the test process).

The tower is traced at apply on size 0 (no padding, so HF's no-mask path); size 1 carries
padding, so its attention is traced again *during* verify (re-sharded on that rank), as it
is under ``fxpass diff --tp 2``.
"""

from __future__ import annotations

import copy
from typing import Any

ATTN = "encoder.layers.0.self_attn"
Q = f"{ATTN}.q_proj.linear"
SIZES = (0, 1, 2)


def _summary(report: Any) -> dict[str, Any]:
    first = report.first_divergence
    return {
        "passed": report.passed,
        "candidate_only": list(report.candidate_only),
        "reference_only": list(report.reference_only),
        "first": first.module if first is not None else None,
        "failed": sorted({n.module for n in report.failures}),
        "outputs": [(n.passed, n.metrics["reference"].sqnr_db) for n in report.outputs],
        "nodes": [{"input": n.input, "module": n.module, "sharded": n.sharded,
                   "passed": n.passed,
                   "shape": list(n.metrics["reference"].shape) if n.metrics else None,
                   "ref_shape": list(n.metrics["reference"].ref_shape) if n.metrics else None,
                   "sqnr_db": n.metrics["reference"].sqnr_db if n.metrics else None}
                  for n in report.nodes],
        "text": report.format(),
    }


def _strip_splits(model: Any, *, variants: bool = True) -> int:
    """Remove the tensor-parallel rule's ``tp_out`` records from the call nodes of the
    model's graphs (with ``variants``, from those traced again since apply too): what a
    graph without recorded splits looks like to verify. Returns how many were removed."""
    from fxpass.runtime import installed_graph

    removed = 0
    for mod in model.modules():
        fwd = installed_graph(mod)
        if fwd is None:
            continue
        graphs = [fwd.graph, *(v.graph for v in fwd.family.variants)] if variants \
            else [fwd.graph]
        for graph in graphs:
            for node in graph.nodes:
                info = node.meta.get("fxpass", {})
                if node.op == "call_module" and "tp_out" in info:
                    del info["tp_out"]
                    removed += 1
    return removed


def rank_checks(rank: int) -> dict[str, Any]:
    import torch

    import fxpass
    from fxpass import zoo
    from fxpass.verify.faults import planted

    ref = zoo.resolve_attr(zoo.build_tiny_gemma4(), "model.vision_tower")
    inputs = [zoo.example_inputs(ref, size_index=s, seed=s) for s in SIZES]

    def sharded() -> Any:
        cand = copy.deepcopy(ref)
        fxpass.apply(cand, tp=2, load_weights=True, prefix="tower", example_inputs=inputs[0])
        return cand

    out: dict[str, Any] = {"rank": rank}
    with torch.no_grad():
        cand = sharded()
        out["plain"] = _summary(fxpass.verify(ref, cand, inputs, progress=False))
        other = sharded()
        with planted(other, f"wrong-weights:{Q}", ref):
            out["fault"] = _summary(fxpass.verify(ref, other, inputs, progress=False))
        # Records are removed in place from graphs the trace cache shares between the
        # candidates of this process: the cases without them come last.
        # The apply-time graphs without records; the attention traced again during verify
        # (size 1 first) records its calls' splits, and verify reads them when it meets them.
        other = sharded()
        out["primary_removed"] = _strip_splits(other, variants=False)
        out["retraced"] = _summary(fxpass.verify(ref, other, [inputs[1]], progress=False))
        # no split recorded in any graph: the per-rank calls cannot be matched to a block
        out["stripped_removed"] = _strip_splits(cand)
        out["stripped"] = _summary(fxpass.verify(ref, cand, inputs, progress=False))
        with planted(cand, f"wrong-weights:{Q}", ref):
            out["stripped_fault"] = _summary(fxpass.verify(ref, cand, inputs, progress=False))
    return out
