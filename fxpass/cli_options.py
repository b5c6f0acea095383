"""Option values and help texts of the ``fxpass`` command line, light enough for ``--help``.

Building the parsers (``fxpass --help``, ``fxpass diff --help``, ...) imports this module,
``argparse`` and :mod:`fxpass.errors` only: no torch, transformers or vLLM. Every command
imports what it needs when it runs, and every choice list here is static (names that need the
zoo or a registry to list are checked by the command itself, with an error naming the valid
ones). ``tests/test_cli.py`` checks that building the parsers imports no torch.
"""

from __future__ import annotations

import argparse
from typing import Any

# Quantization methods, by their canonical names (what reports and JSON results carry), and
# the other spellings the command line accepts for them. Matching ignores case, surrounding
# blanks, and "-" vs "_" ("BNB_NF4" is "bnb-nf4").
QUANTS: tuple[str, ...] = ("none", "bnb-nf4", "bnb-fp4", "bnb-int8")
QUANT_ALIASES: dict[str, str] = {
    "nf4": "bnb-nf4", "bitsandbytes-nf4": "bnb-nf4",
    "fp4": "bnb-fp4", "bitsandbytes-fp4": "bnb-fp4",
    "int8": "bnb-int8", "bitsandbytes-int8": "bnb-int8", "llm-int8": "bnb-int8",
    "8bit": "bnb-int8", "bnb-8bit": "bnb-int8",
    "off": "none", "no": "none", "unquantized": "none",
}

# Load dtypes, canonical names (torch's attribute names) and their short spellings.
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
DTYPE_ALIASES: dict[str, str] = {
    "fp32": "float32", "f32": "float32", "float": "float32",
    "bf16": "bfloat16",
    "fp16": "float16", "f16": "float16", "half": "float16",
}

# `fxpass bench` sections (fxpass.bench.SECTIONS is this tuple) and its dtype rows.
BENCH_SECTIONS: tuple[str, ...] = ("pass_time", "forward", "peers", "rules", "verify",
                                   "graph_call", "first_call", "attention", "engine")
BENCH_DTYPES: tuple[str, ...] = ("fp32", "bf16", "nf4")


def _key(text: str) -> str:
    return text.strip().lower().replace("_", "-")


def _aliases_of(canonical: str, aliases: dict[str, str]) -> list[str]:
    return [a for a, c in aliases.items() if c == canonical]


def canonical_quant(name: str) -> str:
    """``name``'s canonical quantization name ("nf4", "BNB_NF4" -> "bnb-nf4"); a ValueError
    naming the valid names (and pointing to ``--dtype`` for a dtype) otherwise."""
    key = _key(name)
    if key in QUANTS:
        return key
    if key in QUANT_ALIASES:
        return QUANT_ALIASES[key]
    if key in DTYPES or key in DTYPE_ALIASES:
        dtype = DTYPE_ALIASES.get(key, key)
        raise ValueError(f"{name!r} is a dtype, not a quantization: use --dtype {dtype} "
                         f"(and --quant none, the default); quantizations: {quant_names()}")
    raise ValueError(f"invalid choice: {name!r} {_choose_from(QUANTS, QUANT_ALIASES)}")


def canonical_dtype(name: str) -> str:
    """``name``'s canonical dtype name ("bf16" -> "bfloat16"); a ValueError naming the valid
    names otherwise."""
    key = _key(name).removeprefix("torch.")
    if key in DTYPES:
        return key
    if key in DTYPE_ALIASES:
        return DTYPE_ALIASES[key]
    if key in QUANTS or key in QUANT_ALIASES:
        raise ValueError(f"{name!r} is a quantization, not a dtype: use --quant "
                         f"{canonical_quant(key)}; dtypes: {dtype_names()}")
    raise ValueError(f"invalid choice: {name!r} {_choose_from(DTYPES, DTYPE_ALIASES)}")


def _choose_from(names: tuple[str, ...], aliases: dict[str, str]) -> str:
    # argparse's own wording first (scripts and tests match it), then the aliases
    short = [_aliases_of(n, aliases)[0] for n in names]
    return (f"(choose from {', '.join(map(repr, names))}); also accepted: {', '.join(short)} "
            "(case and -/_ do not matter)")


def quant_names() -> str:
    """The canonical quantization names, each with its short alias, for help and errors:
    "none (or off), bnb-nf4 (or nf4), ..."."""
    return ", ".join(f"{q} (or {_aliases_of(q, QUANT_ALIASES)[0]})" for q in QUANTS)


def dtype_names() -> str:
    return ", ".join(f"{d} (or {_aliases_of(d, DTYPE_ALIASES)[0]})" for d in DTYPES)


def quant_arg(text: str) -> str:
    """argparse ``type=`` for ``--quant``: the canonical name."""
    try:
        return canonical_quant(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def dtype_arg(text: str) -> str:
    """argparse ``type=`` for ``--dtype``: the canonical name."""
    try:
        return canonical_dtype(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


QUANT_HELP = ("quantize the rewritten layers with bitsandbytes: " + quant_names()
              + "; case and -/_ do not matter")
DTYPE_HELP = "dtype to load the tower in: " + dtype_names()


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs keep their line breaks (examples stay one per line);
    argument help is wrapped as usual."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)


# ------------------------------------------------------------------------------ help texts

MAIN_DESCRIPTION = """\
Rewrite the linear layers of a HuggingFace vision or audio tower onto vLLM's layers
(optionally quantized with bitsandbytes), then check the rewritten tower against the
original, layer by layer."""

MAIN_EPILOG = """\
examples:
  fxpass diff --demo                     try it on a tiny generated Gemma4 checkpoint
  fxpass diff ./ckpt --tower model.vision_tower --quant nf4
  fxpass viz ./ckpt --tower model.vision_tower -o tower.html --diff
  fxpass lora-check ./ckpt ./my-adapter
  fxpass bench --quick

Run `fxpass COMMAND --help` for a command's options."""

DIFF_HELP = "rewrite a tower onto vLLM layers and check it numerically against the original"
DIFF_DESCRIPTION = """\
Load a tower from a local checkpoint, rewrite a copy of it onto vLLM layers (weights
loaded, quantized on the fly with --quant), run both on example inputs and compare them
layer by layer. Prints what was rewritten and a table of differences (max abs, cosine,
SQNR in dB) with the first layer where they go past the budget.

exit status: 0 within budget (and not worse than --baseline), 1 a numeric failure,
2 a usage error (bad arguments, missing files, a quantization the tower cannot take)."""

DIFF_EPILOG = """\
examples:
  fxpass diff --demo
  fxpass diff ./ckpt --tower model.vision_tower
  fxpass diff ./ckpt --tower model.audio_tower --quant nf4 --json out.json
  fxpass diff ./ckpt --tower model.audio_tower --quant nf4 --baseline out.json
  fxpass diff ./ckpt --tower model.vision_tower --lora ./adapter --dtype fp32
  fxpass diff ./ckpt --tower model.vision_tower --tp 2

MODEL_DIR is a directory written by save_pretrained (config.json and weights)."""

LORA_CHECK_HELP = "check which LoRA adapter keys land on which tower layers"
LORA_CHECK_DESCRIPTION = """\
Check a PEFT LoRA adapter against a local checkpoint, without reading its weights: for
each module the adapter targets, the layer it lands on, or that it lands nowhere (vLLM
would ignore it without a word) and the key vLLM would need instead.

exit status: 0 every key lands on a layer, 1 one lands nowhere, 2 a usage error."""

LORA_CHECK_EPILOG = """\
example:
  fxpass lora-check ./ckpt ./my-adapter --json check.json"""

VIZ_HELP = "draw a tower's graphs before and after the rewrite (HTML, SVG or DOT)"
VIZ_DESCRIPTION = """\
Draw a tower as fxpass sees it: its module tree and each traced module's graph, before and
after the rewrite, with the rewritten layers highlighted and the modules left as Python
shown as boxes. With --diff, each node is coloured by how close the rewritten tower stays
to the original (SQNR), and the first divergence is marked. Writes one self-contained HTML
page (or SVG / DOT for Graphviz)."""

VIZ_EPILOG = """\
examples:
  fxpass viz ./ckpt --tower model.vision_tower -o tower.html
  fxpass viz ./ckpt --tower model.audio_tower -o audio.html --quant nf4 --diff
  fxpass viz ./ckpt --tower model.vision_tower -o tower.svg --view before"""

BENCH_HELP = "time fxpass against HF eager, vLLM's own path and torch.compile"
BENCH_DESCRIPTION = """\
Measure, in one run and side by side: the rewrite's own time, the tower's forward latency
(HF eager, vLLM's module walk, vLLM's own tower, fxpass, with and without torch.compile),
weight bytes, peak memory and the cost of a numeric check. Times are medians (with their
interquartile range) of interleaved runs, measured with torch.utils.benchmark; the ratios
are what carries over between machines."""

BENCH_EPILOG = """\
examples:
  fxpass bench --quick                   tiny sizes: proves it runs (no figures)
  fxpass bench --only peers --only rules --json out.json
  fxpass bench --markdown out.json       the README's tables from a --json result
  fxpass bench --only engine --json e.json  walk vs plugin inside vLLM engines (minutes)"""


# ------------------------------------------------------------------------------ arguments


def add_viz_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``fxpass viz``'s arguments (the command itself is fxpass.viz.cli.run)."""
    parser.add_argument("model_dir", metavar="MODEL_DIR",
                        help="local checkpoint directory (save_pretrained layout)")
    parser.add_argument("--tower", required=True, metavar="ATTR",
                        help="the tower's attribute path in the loaded model, e.g. "
                             "model.vision_tower")
    parser.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="file to write (.html, .svg or .dot)")
    parser.add_argument("--quant", type=quant_arg, default="none", metavar="QUANT",
                        help=QUANT_HELP + " (default: none)")
    parser.add_argument("--diff", action="store_true",
                        help="also compare the rewritten tower with the original and colour "
                             "each node by the result (SQNR), marking the first divergence")
    parser.add_argument("--lora", default=None, metavar="ADAPTER_DIR",
                        help="put vLLM's LoRA layers with this PEFT adapter on the rewritten "
                             "tower and compare it with HF + PEFT (implies --diff)")
    parser.add_argument("--format", choices=("html", "svg", "dot"), default=None,
                        help="output format (default: from OUT's suffix, else html); svg "
                             "needs Graphviz's dot")
    parser.add_argument("--view", choices=("after", "before"), default="after",
                        help="which graphs svg/dot show (html shows both)")
    parser.add_argument("--layout", choices=("auto", "dot", "python"), default=None,
                        help="how the html page lays out its graphs: Graphviz's dot, a "
                             "layered layout in Python, or auto (dot when installed; default: "
                             "$FXPASS_VIZ_LAYOUT, else auto)")
    parser.add_argument("--prefix", default=None,
                        help="checkpoint prefix of the tower's layers (default: --tower)")
    parser.add_argument("--dtype", type=dtype_arg, default=None, metavar="DTYPE",
                        help=DTYPE_HELP + " (default: the checkpoint's)")
    parser.add_argument("--size-index", type=int, default=0, choices=(0, 1, 2),
                        help="which of the three example input sizes to trace with "
                             "(default: 0, the smallest)")
    parser.add_argument("--tp", type=int, default=1, metavar="N",
                        help="shard the tower over N tensor-parallel ranks (N CPU processes; "
                             "the page shows rank 0, column / row layers and refused pairs "
                             "marked; --diff checks rank 0 against the original)")
    return parser


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``fxpass bench``'s arguments (the command itself is fxpass.bench.run_args)."""
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and short timings: proves it runs, no figures")
    parser.add_argument("--repeats", type=int, default=None, metavar="N",
                        help="interleaved rounds per measurement (default: 7; --quick: 3)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON here")
    parser.add_argument("--only", action="append", choices=BENCH_SECTIONS, metavar="SECTION",
                        help="run only this section (repeatable): "
                             + ", ".join(BENCH_SECTIONS) + " (engine runs only when named: it "
                             "starts vLLM engines with full-width Gemma4 towers, minutes)")
    parser.add_argument("--dtype", action="append", choices=BENCH_DTYPES, dest="dtypes",
                        metavar="DTYPE",
                        help="time only these rows of the forward / peers / rules / "
                             "attention sections (repeatable): " + ", ".join(BENCH_DTYPES) + " (default: all)")
    parser.add_argument("--markdown", metavar="JSON",
                        help="print the peers / rules tables of a --json result as markdown")
    return parser


def subparser(sub: Any, name: str, help: str, description: str,
              epilog: str | None = None) -> argparse.ArgumentParser:
    """A subcommand's parser with the CLI's help formatter."""
    return sub.add_parser(name, help=help, description=description, epilog=epilog,
                          formatter_class=HelpFormatter)
