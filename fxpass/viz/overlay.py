"""The diff overlay: ``fxpass.verify``'s report read into per-node metrics for the viz.

:func:`overlay_from_verify` is the one adapter between the verify stage and the writers; it
reads ``VerifyReport.to_dict()`` (a JSON dict; a VerifyReport object is converted first).
The keys it reads (everything else is ignored):

- ``passed`` (bool), ``mode``, ``dtype``, ``quant_method`` (str), ``references`` (list of
  reference names, e.g. ``["fake_quant", "reference"]``), ``output_sqnr_db``
  ({reference: float | "inf" | "-inf" | "nan" | None}), ``counts`` (dict of ints),
  ``errors`` (list of dicts with ``input``, ``error``);
- ``nodes`` and ``outputs``: lists of results, each with ``kind`` ("layer", "module" or
  "output"), ``module`` (the called module's path, "" for the tower output), ``graph`` and
  ``node`` (the fx graph -- its module path -- and the call_module node that makes the
  call; None when no graph shows the call), ``input``, ``call``, ``leaf``, ``passed``,
  ``violations`` (list of str), ``quant_method`` and ``metrics``: {reference name:
  {``sqnr_db``, ``cosine``, ``max_abs``, ``max_rel``, ... (floats; inf/nan as strings)}};
- ``first_divergence``: one such result, or None.

Tower outputs (``kind == "output"``, no graph node) are put on the root graph's ``output``
node; results with no node stay on their module.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from fxpass.errors import UsageError

# The reference the colour scale reads, in order of preference: the original float module
# (quantization cost), else whatever the report compared against first.
PRIMARY_REFERENCES = ("reference", "fake_quant")
_DTYPE_TAG = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


def as_float(x: Any) -> float | None:
    if x is None:
        return None
    try:
        return float(x)  # "inf", "-inf", "nan" included
    except (TypeError, ValueError):
        return None


@dataclasses.dataclass
class Overlay:
    nodes: dict[tuple[str, str], list[dict[str, Any]]]
    modules: dict[str, list[dict[str, Any]]]
    first: dict[str, Any] | None
    summary: dict[str, Any]
    references: list[str]

    @property
    def primary(self) -> str | None:
        for ref in PRIMARY_REFERENCES:
            if ref in self.references:
                return ref
        return self.references[0] if self.references else None

    def reference_text(self, ref: str | None) -> dict[str, str]:
        """What a number measured against ``ref`` is measured against, in words.

        ``tag``: a few words for a badge ("HF fp32", "fake-quant nf4"); ``short``: a phrase
        ("HF fp32 reference"); ``long``: what that reference is and what the comparison
        isolates (verify's ``compare`` docstring, "References"), with the mode.
        """
        dtype = str(self.summary.get("dtype") or "").removeprefix("torch.")
        dt = _DTYPE_TAG.get(dtype, dtype)
        qm = self.summary.get("quant_method") or ""
        mode = self.summary.get("mode") or ""
        how = {"propagated": "propagated mode: the candidate ran on its own outputs, so "
                             "errors carry downstream",
               "isolated": "isolated mode: each rewritten layer ran on the reference's input "
                           "to it, its own error only"}.get(mode, f"mode {mode}" if mode else "")
        if ref == "reference":
            tag = f"HF {dt}".strip()
            short = f"{tag} reference"
            long = (f"the original HF module{f' in {dtype}' if dtype else ''}, untouched by "
                    "fxpass: the whole cost of the rewrite, quantization included")
        elif ref == "fake_quant":
            tag = f"fake-quant {qm}".strip() if qm not in ("", "none", "mixed") else "fake-quant"
            short = f"{tag} reference"
            long = (f"the original HF module{f' in {dtype}' if dtype else ''} with the rewritten "
                    f"layers' weights fake-quantized{f' ({qm})' if qm else ''}: the vLLM "
                    "layers' own error (loader, kernel), quantization left out")
        else:
            tag = short = long = str(ref)
        if how:
            long += f"; {how}"
        return {"tag": tag, "short": short, "long": long}

    def node_sqnr(self, entries: list[dict[str, Any]]) -> float | None:
        """Lowest SQNR (dB) of ``entries`` against the primary reference."""
        ref = self.primary
        values = []
        for e in entries:
            m = e.get("metrics", {}).get(ref) if ref else None
            v = as_float(m.get("sqnr_db")) if m else None
            if v is not None and not math.isnan(v):
                values.append(v)
        return min(values) if values else None


def _entry(r: Mapping[str, Any]) -> dict[str, Any]:
    kind = r.get("kind", "module")
    module = r.get("module") or ""
    label = "<output>" if kind == "output" else (module or "<root>")
    if r.get("call"):
        label += f"#{r['call']}"
    if r.get("leaf"):
        label += f":{r['leaf']}"
    metrics = {}
    for ref, m in (r.get("metrics") or {}).items():
        metrics[str(ref)] = {str(k): (list(v) if isinstance(v, (list, tuple)) else v)
                             for k, v in (m or {}).items()}
    return {
        "label": label,
        "kind": kind,
        "module": module,
        "input": r.get("input", 0),
        "call": r.get("call", 0),
        "leaf": r.get("leaf", ""),
        "passed": bool(r.get("passed", not r.get("violations"))),
        "violations": [str(v) for v in r.get("violations", [])],
        "quant_method": r.get("quant_method"),
        "metrics": metrics,
    }


def _site(r: Mapping[str, Any]) -> tuple[str, str] | None:
    if r.get("kind") == "output" and r.get("node") is None:
        return ("", "output")
    if r.get("node") is not None and r.get("graph") is not None:
        return (str(r["graph"]), str(r["node"]))
    return None


def overlay_from_verify(verify: Any) -> Overlay:
    """The overlay of a VerifyReport or of its ``to_dict()`` (schema in the module doc)."""
    if hasattr(verify, "to_dict") and not isinstance(verify, Mapping):
        verify = verify.to_dict()
    if not isinstance(verify, Mapping):
        raise UsageError(f"verify must be a VerifyReport or its to_dict(), got {type(verify).__name__}")
    nodes: dict[tuple[str, str], list[dict[str, Any]]] = {}
    modules: dict[str, list[dict[str, Any]]] = {}
    for r in [*verify.get("nodes", []), *verify.get("outputs", [])]:
        e = _entry(r)
        site = _site(r)
        if site is not None:
            nodes.setdefault(site, []).append(e)
        else:
            modules.setdefault(e["module"], []).append(e)
    first = verify.get("first_divergence")
    if first is not None:
        site = _site(first)
        first = {**_entry(first), "graph": site[0] if site else None,
                 "node": site[1] if site else None}
    summary = {
        "passed": bool(verify.get("passed", first is None)),
        "mode": verify.get("mode"),
        "dtype": verify.get("dtype"),
        "quant_method": verify.get("quant_method"),
        "output_sqnr_db": dict(verify.get("output_sqnr_db") or {}),
        "counts": dict(verify.get("counts") or {}),
        "errors": [dict(e) for e in verify.get("errors", [])],
        "budget": dict(verify.get("budget") or {}),
    }
    return Overlay(nodes, modules, first, summary, [str(r) for r in verify.get("references", [])])
