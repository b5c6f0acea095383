"""``fxpass viz MODEL_DIR --tower ATTR -o OUT [--quant ...] [--diff] [--format html|svg|dot]``.

Loads the checkpoint's tower, traces it on the zoo's example inputs, keeps the "before"
graphs, applies the rewrite (weights loaded, quantized in flight), optionally runs
``fxpass.verify`` against an untouched copy, and writes the page. ``add_cli(subparsers)``
registers the command on the main CLI; ``python -m fxpass.viz`` runs it alone.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from fxpass.cli_options import (
    VIZ_DESCRIPTION,
    VIZ_EPILOG,
    VIZ_HELP,
    HelpFormatter,
    add_viz_arguments,
    subparser,
)
from fxpass.errors import FxpassError, UsageError


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``viz``'s arguments (fxpass.cli_options.add_viz_arguments: ``fxpass viz --help``
    imports no torch) and ``func``."""
    add_viz_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``viz`` on ``parser.add_subparsers()``; the command runs ``args.func(args)``,
    which returns 0 once the file is written (the page itself says whether verify passed)
    and raises UsageError (bad paths/arguments, Graphviz missing) or another FxpassError."""
    return configure(subparser(subparsers, "viz", VIZ_HELP, VIZ_DESCRIPTION, VIZ_EPILOG))


def _format_of(args: argparse.Namespace) -> str:
    if args.format:
        return args.format
    suffix = Path(args.output).suffix.lower().lstrip(".")
    return {"svg": "svg", "dot": "dot", "gv": "dot"}.get(suffix, "html")


def run(args: argparse.Namespace) -> int:
    from fxpass import zoo
    from fxpass.vllm_context import vllm_runtime

    fmt = _format_of(args)
    out = Path(args.output)
    if out.parent and not out.parent.exists():
        raise UsageError(f"cannot write {out}: directory {out.parent} does not exist")
    if fmt == "svg":
        from fxpass.viz.dot import dot_program

        dot_program()  # fail before the expensive part when Graphviz is missing
    t0 = time.perf_counter()
    if args.tp < 1:
        raise UsageError(f"--tp must be a positive number of ranks, got {args.tp}")
    if args.tp > 1 and args.lora:
        raise UsageError("--tp and --lora together are not supported (LoRA on sharded tower "
                         "layers is not verified); drop one")
    if args.tp > 1:
        zoo.load_tower(args.model_dir, args.tower)  # a bad path fails here, before any rank
        from fxpass.verify.ranks import run_on_ranks

        text, lines = run_on_ranks(_page, args.tp, args, fmt)[0]
    else:
        with vllm_runtime():
            text, lines = _page(0, args, fmt)
    out.write_text(text, encoding="utf-8")
    for line in lines:
        print(line)
    print(f"viz: wrote {out} ({fmt}, {len(text) / 1024:.0f} KiB) in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


def _page(rank: int, args: argparse.Namespace, fmt: str) -> tuple[str, list[str]]:
    """Trace, apply (sharded with ``--tp``), verify and render: (page, summary lines).
    Every rank of a tensor-parallel run does the same (the layers all-reduce); the page is
    rank 0's."""
    import torch

    import fxpass
    from fxpass import zoo
    from fxpass.viz import render, snapshot

    dtype = getattr(torch, args.dtype) if args.dtype else None
    tower = zoo.load_tower(args.model_dir, args.tower, dtype=dtype)
    inputs = zoo.example_inputs(tower, size_index=args.size_index)
    if args.lora:
        args.diff = True
    reference = copy.deepcopy(tower) if args.diff else None
    quant = None
    if args.quant != "none":
        from fxpass.weights import bnb_config

        quant = bnb_config(args.quant.removeprefix("bnb-"))
    tr = fxpass.trace(tower, inputs)
    before = snapshot(tr)
    report = fxpass.apply(tower, quant, prefix=args.prefix if args.prefix is not None
                          else args.tower, load_weights=True, trace_result=tr,
                          tp=args.tp if args.tp > 1 else None)
    verify = None
    if args.lora:
        verify = _lora_diff(reference, tower, inputs, args)
    elif args.diff:
        verify = fxpass.verify(reference, tower, inputs)
    title = (f"fxpass: {args.tower} of {Path(args.model_dir).name} ({args.quant}"
             + (f", tp={args.tp}, rank {rank}" if args.tp > 1 else "") + ")")
    if args.lora:
        title += f", LoRA {Path(args.lora).name} vs HF + PEFT"
    kw: dict[str, Any] = {"title": title}
    if fmt != "html":
        kw["view"] = args.view
    else:
        kw["layout"] = getattr(args, "layout", None)
    text = render(fmt, tr, report, verify, before, **kw)
    lines = [report.summary_line()] + ([verify.summary_line()] if verify is not None else [])
    return text, lines


def _lora_diff(original: Any, tower: Any, inputs: Any, args: argparse.Namespace) -> Any:
    """vLLM's LoRA layers with the adapter on the rewritten ``tower`` vs HF + PEFT."""
    import fxpass
    from fxpass.lora.adapter import read_adapter
    from fxpass.lora.layers import attach_lora
    from fxpass.lora.verify import peft_reference, tower_check
    from fxpass.verify.budgets import QUANT_ORDER, lora_budget
    from fxpass.verify.compare import rewritten_layers

    adapter = read_adapter(args.lora)
    check = tower_check(original, adapter, args.tower)
    if check.nowhere or not check.results:
        raise UsageError("adapter keys land on no layer of the tower (vLLM would ignore them "
                         "silently):\n" + check.format())
    reference = peft_reference(original, adapter.path, key_prefix=args.tower)
    state = attach_lora(tower, adapter.path, key_prefix=args.tower)
    methods = rewritten_layers(reference, tower)
    quant = [m for m in methods.values() if m != "none"]
    method = max(quant, key=QUANT_ORDER.index) if quant else "none"
    dtype = next(p.dtype for p in original.parameters() if p.is_floating_point())
    try:
        return fxpass.verify(reference, tower, inputs, budget=lora_budget(dtype, method))
    finally:
        state.remove_hooks()


def main(argv: Sequence[str] | None = None) -> int:
    parser = configure(argparse.ArgumentParser(
        prog="python -m fxpass.viz", description=VIZ_DESCRIPTION,
        epilog=VIZ_EPILOG.replace("fxpass viz", "python -m fxpass.viz"),
        formatter_class=HelpFormatter))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"fxpass viz: error: {e}", file=sys.stderr)
        return 2
    except FxpassError as e:
        print(f"fxpass viz: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
