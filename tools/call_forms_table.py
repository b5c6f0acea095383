"""Print the README's table: every catalogue tower rewritten by fxpass and called every way.

For each tower of tests/towers/catalogue.py: apply with no example inputs (load_weights,
fp32: the graphs come from the first call, as inside vLLM), then every call form at every
size, batch 1 and 2, compared with the original (tests/towers/call_forms.py); then once
with bnb nf4 against HF's code on fake-quantized weights. Columns: calls made, worst max abs
diff, wrong answers / errors the original does not raise (must be 0), linear sites inside
graphs, the first call's time (trace + rewrite + the call), graphs traced after the first,
calls Python served and why, and the nf4 output SQNR vs the fake-quant reference's.

  .venv/bin/python tools/call_forms_table.py            # ~3-4 min on 2 cores
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "towers"))

import torch  # noqa: E402

import call_forms  # noqa: E402
import catalogue as cat  # noqa: E402


def _why(text: str) -> str:
    for key, short in (("computed reached the graph outside", "output capturing (hooks)"),
                       ("do not cover this call either", "past the bound"),
                       ("data-dependent", "data-dependent"),
                       ("in place", "changes an input in place"),
                       ("baked in", "an argument traced as a constant changed")):
        if key in text:
            return short
    # a value's repr in a reason (a tensor's runs over lines) is cut to its first line
    return text.split("\n", 1)[0][:60]


def main() -> int:
    warnings.filterwarnings("ignore")
    logging.getLogger("fxpass").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    import fxpass

    rows = []
    totals = {"calls": 0, "wrong": 0, "walk": 0, "sites": 0, "linears": 0, "nf4_ok": 0,
              "nf4_walk": 0}
    reasons: dict[str, str] = {}
    with fxpass.vllm_runtime():
        for entry in cat.TOWERS:
            r = call_forms.check(entry)
            q = call_forms.check_nf4(entry)
            why = sorted({_why(t) for t in r.python_reasons.values()})
            nf4 = (f"{q.sqnr_db:.1f} / {q.fake_quant_db:.1f}" if q.error is None else
                   "walk's error" if q.as_the_walk else f"ERROR {q.error[:60]}")
            totals["calls"] += r.calls
            totals["wrong"] += len(r.wrong)
            totals["walk"] += len(r.as_the_walk)
            totals["sites"] += r.graph_sites
            totals["linears"] += r.linears
            totals["nf4_ok"] += q.error is None and q.gap_db <= 0.5
            totals["nf4_walk"] += q.as_the_walk
            reasons.update({f"{r.tower}: {k}": v for k, v in r.site_reasons.items()})
            wrong = f"{len(r.wrong)}" + (f" ({len(r.as_the_walk)} the walk's error)"
                                         if r.as_the_walk else "")
            rows.append(f"| {r.tower} | {r.calls} | {r.worst:.1e} | {wrong} | "
                        f"{r.graph_sites}/{r.linears} | {r.first_call_ms:.0f} ms | "
                        f"{r.specialisations} | {r.python_calls} | {', '.join(why)} | {nf4} |")
            print(rows[-1], file=sys.stderr, flush=True)
    print("| tower | calls | worst abs diff | wrong | linear sites in graphs | first call | "
          "new graphs | Python calls | why Python | nf4 SQNR dB / fake-quant |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\n{len(rows)} towers, {totals['calls']} calls, {totals['wrong']} wrong, "
          f"{totals['walk']} raising what vLLM's walk raises; linear "
          f"sites in graphs {totals['sites']}/{totals['linears']} "
          f"({totals['sites'] / totals['linears']:.1%}); nf4 within 0.5 dB of fake-quant: "
          f"{totals['nf4_ok']}, the walk's own error: {totals['nf4_walk']}")
    print("\nLinear sites outside graphs:")
    for k, v in reasons.items():
        print(f"- {k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
