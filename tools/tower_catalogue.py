"""Print the tiny HF tower catalogue (tests/towers/catalogue.py) as a markdown table.

One row per catalogued tower: class, where it is imported from, #nn.Linear, input builder,
number of input sizes, the call forms it has (at size 0, batch 1) and the hint it needs (why).
``--sweep`` also tries every vision/audio encoder class transformers exports (not only the
catalogued ones), built from its shrunk default config and run once, and lists which build
and which fail (stage and error).

  .venv/bin/python tools/tower_catalogue.py            # the catalogue (~10 s)
  .venv/bin/python tools/tower_catalogue.py --sweep    # + every exported class (~1 min)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

# Nothing here may download: a config that wants a hub file (EdgeTam's timm backbone) fails
# at once instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "towers"))
import catalogue as cat  # noqa: E402


def _forms(names: list[str]) -> str:
    short = []
    for n in names:
        short.append(n.replace("other_branch:", "branch:").replace("submodule:", "sub:"))
    return ", ".join(short)


def catalogue_table() -> list[str]:
    rows = ["| tower | class (module) | #linears | inputs | sizes | call forms | hint |",
            "|---|---|---|---|---|---|---|"]
    for entry in cat.TOWERS:
        tower = entry.build()
        n_lin = sum(isinstance(m, nn.Linear) for m in tower.modules())
        calls = entry.calls(tower, 0, 1)
        hint = entry.hint.why if entry.hint else ""
        module = "" if entry.module == "transformers" else f" ({entry.module})"
        rows.append(f"| {entry.name} | {entry.model_class.__name__}{module} | {n_lin} | "
                    f"{entry.builder_name(tower)} | {entry.sizes} | "
                    f"{_forms([c.name for c in calls])} | {hint} |")
    return rows


def sweep_table() -> list[str]:
    results = cat.sweep()
    ok = [r for r in results if r.ok]
    rows = [f"\n{len(ok)} of {len(results)} exported vision/audio encoder classes build and run "
            "from a shrunk default config (catalogued ones included)\n",
            "| class | result | #linears | inputs | catalogued | error |",
            "|---|---|---|---|---|---|"]
    listed = {t.name for t in cat.TOWERS}
    for r in results:
        where = "yes" if r.tower.name in listed else ""
        err = r.error.replace("|", "\\|")
        rows.append(f"| {r.tower.name} | {r.stage} | {r.n_linear or ''} | {r.builder} | "
                    f"{where} | {err} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true",
                        help="also try every exported vision/audio encoder class")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    rows = catalogue_table()
    print(f"{len(cat.TOWERS)} towers, {len({t.model_class for t in cat.TOWERS})} classes, "
          f"{sum(1 for t in cat.TOWERS if t.hint)} with a hint\n")
    print("\n".join(rows))
    if args.sweep:
        print("\n".join(sweep_table()))
    print(f"\n({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
