"""Print the README's table: every catalogue tower rewritten by fxpass and called every way.

For each tower of tests/towers/catalogue.py: apply (load_weights, fp32, the keyword call at
size 0 batch 1 as the example), then every call form at every size, batch 1 and 2, compared
with the original (tests/towers/call_forms.py). Columns: calls made, worst max abs diff,
wrong answers / errors the original does not raise (must be 0), linear sites inside graphs,
graphs traced after apply, calls Python served, and why Python served them.

  .venv/bin/python tools/call_forms_table.py            # ~1-2 min on 2 cores
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
                       ("in place", "changes an input in place")):
        if key in text:
            return short
    return text[:60]


def main() -> int:
    warnings.filterwarnings("ignore")
    logging.getLogger("fxpass").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    import fxpass

    rows = []
    with fxpass.vllm_runtime():
        for entry in cat.TOWERS:
            r = call_forms.check(entry)
            why = sorted({_why(t) for t in r.python_reasons.values()})
            rows.append(f"| {r.tower} | {r.calls} | {r.worst:.1e} | {len(r.wrong)} | "
                        f"{r.graph_sites}/{r.linears} | {r.specialisations} | {r.python_calls} | "
                        f"{', '.join(why)} |")
            print(rows[-1], file=sys.stderr, flush=True)
    total = [len(rows)]
    print("| tower | calls | worst abs diff | wrong | linear sites in graphs | new graphs | "
          "Python calls | why Python |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\n{total[0]} towers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
