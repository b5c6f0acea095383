"""CI numeric-diff check: fxpass diff on a tiny Gemma4 checkpoint against committed baselines.

Writes the tiny random Gemma4-MM checkpoint (fxpass.zoo.write_tiny_gemma4_checkpoint, seed 0,
bf16 safetensors) to a temporary directory and runs ``fxpass diff`` on its vision and audio
towers with quant none / bnb-nf4 / bnb-int8 (bfloat16, propagated mode), each against
``tools/baselines/tiny-gemma4-<tower>-<quant>.json``. The build fails (exit 1) when a run is
outside its budget or worse than its baseline: any output or per-layer SQNR more than
``fxpass.cli.BASELINE_MARGIN_DB`` (1 dB) below the baseline (values above 60 dB count as 60),
or fewer layers rewritten. A usage problem (missing baseline, ...) exits 2.

  .venv/bin/python tools/ci_numeric_check.py            # check (what .ci/run runs)
  .venv/bin/python tools/ci_numeric_check.py --update   # regenerate the baselines

All runs share one process (vLLM is imported once); about a minute on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BASELINES = ROOT / "tools" / "baselines"
TOWERS = {"vision": "model.vision_tower", "audio": "model.audio_tower"}
QUANTS = ("none", "bnb-nf4", "bnb-int8")


def baseline_path(tower: str, quant: str) -> Path:
    return BASELINES / f"tiny-gemma4-{tower}-{quant}.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--update", action="store_true", help="rewrite the baselines from this run")
    args = p.parse_args(argv)

    from fxpass import zoo
    from fxpass.cli import baseline_view
    from fxpass.cli import main as fxpass_main

    failures: list[str] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fxpass-ci-") as tmp:
        ckpt = zoo.write_tiny_gemma4_checkpoint(Path(tmp) / "tiny-gemma4")
        for short, attr in TOWERS.items():
            for quant in QUANTS:
                base = baseline_path(short, quant)
                out = Path(tmp) / f"{short}-{quant}.json"
                cmd = ["diff", str(ckpt), "--tower", attr, "--quant", quant,
                       "--dtype", "bfloat16", "--json", str(out)]
                if not args.update:
                    if not base.is_file():
                        print(f"ci_numeric_check: missing baseline {base}; run with --update",
                              file=sys.stderr)
                        return 2
                    cmd += ["--baseline", str(base)]
                print(f"\n### fxpass {' '.join(cmd)}", flush=True)
                code = fxpass_main(cmd)
                if code == 2:
                    return 2
                if code != 0:
                    failures.append(f"{attr} {quant}: exit {code}")
                    continue
                if args.update:
                    doc = json.loads(out.read_text())
                    BASELINES.mkdir(parents=True, exist_ok=True)
                    base.write_text(json.dumps(baseline_view(doc), indent=1) + "\n")
                    print(f"ci_numeric_check: wrote {base.relative_to(ROOT)}")
    took = time.perf_counter() - start
    if failures:
        print(f"\nci_numeric_check: FAILED ({took:.0f} s): " + "; ".join(failures),
              file=sys.stderr)
        return 1
    print(f"\nci_numeric_check: {'baselines written' if args.update else 'PASSED'}: "
          f"{len(TOWERS) * len(QUANTS)} runs in {took:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
