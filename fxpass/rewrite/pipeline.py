"""``fxpass.apply``: trace, run a rewrite session, load weights, then commit all at once.

The session (``session.py``, ``Mode.APPLY``) only edits the Trace's graphs (not yet
installed) and plans module swaps; weights are loaded into the new layers before anything on
the model changes. The commit swaps modules and installs the graphs' forwards; if any step
fails the model is restored and the error is raised with its cause, so a tower is never left
half-rewritten. Without example inputs the graphs come at the first call
(``first_call.py``).
"""

from __future__ import annotations

import contextlib
import itertools
import time
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.utils._pytree
from torch import nn

from fxpass.errors import FxpassError, RewriteError, UsageError, WeightLoadError
from fxpass.parallel.rule import report_sharding
from fxpass.report import EventLog, Report
from fxpass.rewrite.commit import commit as _commit
from fxpass.rewrite.respecialise import RuleRespecialiser
from fxpass.rewrite.session import RewriteSession
from fxpass.rules.base import Mode, Options, RewriteContext, is_vllm_linear
from fxpass.rules.registry import check_names
from fxpass.vllm_context import current_engine_config, vllm_runtime

if TYPE_CHECKING:
    from vllm.model_executor.layers.quantization import QuantizationConfig
from fxpass.runtime.install import is_graph_forward
from fxpass.runtime.stats import RuntimeStats
from fxpass.trace.cache import TreeIndex
from fxpass.trace.hierarchy import Trace, trace


def apply(model: nn.Module, quant_config: QuantizationConfig | None = None, *,
          prefix: str = "", load_weights: bool = False, fuse: bool = False,
          example_inputs: Any = None, strict: bool = False, trace_result: Trace | None = None,
          tp: int | None = None, first_call: bool | None = None,
          on_first_call: Callable[[Report], None] | None = None,
          disable: Iterable[str] = ()) -> Report:
    """Rewrite every nn.Linear of ``model`` to a vLLM ReplicatedLinear, in place.

    ``prefix`` is the model's checkpoint prefix (``vision_tower``): layers are built with
    ``"<prefix>.<qualified name>"`` so quant skip lists and loaders match. ``load_weights``
    moves the model's current tensors into the new layers (quantizing in flight); leave it
    False in vLLM's model init, where the loader fills them (until a loader has, calling a new
    layer raises NotLoadedError: ``fxpass.rewrite.unloaded``). ``quant_config``: vLLM's
    ``QuantizationConfig`` or None (anything else is a UsageError). ``example_inputs`` are the
    tracing inputs, as a real call would pass them (kwargs dict, args tuple or (args,
    kwargs)). Without them (or with ``first_call=True``) the graphs come from the model's
    first real call:
    apply swaps the linears at once (``report.traced_at == "first call"``), and the first
    forward traces with its real arguments, runs the graph rules, installs the graphs and
    computes its result through them (``fxpass.rewrite.first_call``; ``on_first_call(report)``
    runs after it). ``first_call=False`` insists on tracing now. ``tp=N`` (N > 1) shards the
    column -> row linear pairs the graphs show over this process's vLLM tensor-parallel
    group of N ranks (inside vLLM: the engine's; outside: ``fxpass.vllm_runtime(tp=N, ...)``
    in each rank's process), every rank applying to the same tower; the rest stays
    replicated. None or 1: everything replicated. Without example inputs the sharding comes
    at the first call (every rank must make it with the same call, as vLLM's ranks do): the
    replicated layers the loader filled are rebuilt sharded, each rank keeping its block of
    the loaded weight (memory until then: the replicated tower, as vLLM's walk keeps it;
    quantized layers stay replicated, their packed weights are not re-sliced).

    ``disable`` names rules to leave out (``fxpass.rules.registry.names()``; an unknown name
    is a UsageError), e.g. ``["mm-attention"]`` keeps HF's attention calls.

    After apply, a call an installed graph does not cover is traced again and rewritten
    (or served by the module's Python forward); ``strict=True`` raises GuardError for it
    instead, which is how tests prove what the graphs cover. ``report.runtime`` counts both,
    per module, as calls come. A module that owns tensor-parallel pairs is traced again as its
    unsharded self and sharded again (``respecialise.py``); one fed a sharded value by its
    caller is neither traced again nor run as Python (it would see per-rank shapes): such a
    call raises.
    """
    if not isinstance(model, nn.Module):
        raise UsageError(f"fxpass.apply expects an nn.Module, got {type(model).__name__}")
    if not isinstance(prefix, str):
        raise UsageError(f"prefix must be a str, got {type(prefix).__name__}")
    if tp is not None and (not isinstance(tp, int) or isinstance(tp, bool) or tp < 1):
        raise UsageError(f"tp must be a positive int or None, got {tp!r}")
    if first_call and (example_inputs is not None or trace_result is not None):
        raise UsageError("fxpass.apply: first_call=True traces at the model's first real "
                         "call; do not pass example_inputs or trace_result with it")
    _check_quant_config(quant_config)
    if isinstance(disable, str):
        disable = [disable]
    check_names(disable, "fxpass.apply(disable=...)")
    options = Options(quant_config=quant_config, prefix=prefix, fuse=bool(fuse), tp=tp or 1,
                      load_weights=bool(load_weights), strict=bool(strict),
                      disabled=frozenset(disable), vllm_config=current_engine_config())
    log = EventLog(prefix, tp or 1)
    report = log.report()
    t0 = time.perf_counter()
    index = TreeIndex.of(model)
    modules = index.paths
    settings = {"quant_config": quant_config, "prefix": prefix, "fuse": bool(fuse),
                "tp": tp or 1, "load_weights": bool(load_weights)}
    if any(is_graph_forward(m.__dict__.get("forward")) or APPLIED in m.__dict__
           for m in modules.values()):
        log.set("already_applied", True)
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear):
                log.emit("skip", "apply", f"{prefix}.{name}" if prefix else name, reason=(
                    "left by the earlier fxpass.apply; applying again changes nothing"))
        _explain_already_applied(log, modules, settings)
        log.update("timings_s", total=time.perf_counter() - t0)
        return report

    has_linears = any(isinstance(m, nn.Linear) for m in modules.values())
    if load_weights and has_linears:
        _check_loadable(model)
    deferred = trace_result is None and example_inputs is None and has_linears
    if deferred:  # the linear rule alone matches on an empty trace: the walk's swap
        _check_may_wait(model, first_call)
        trace_result = Trace(root=model)
        log.set("traced_at", "first call")
    elif trace_result is None:
        if has_linears:
            try:
                trace_result = trace(model, example_inputs, index=index)
            except FxpassError:
                raise
            except Exception as e:  # trace keeps per-module failures; this is anything else
                raise RewriteError(f"tracing {type(model).__name__} failed: "
                                   f"{type(e).__name__}: {e}; the model was not changed") from e
        else:
            trace_result = Trace(root=model)
    if not deferred:
        _check_examples_ran(model, trace_result)
    for name, why in trace_result.untraced.items():
        log.emit("untraced", "trace", name, reason=why)
    log.update("timings_s", trace=time.perf_counter() - t0)

    session = RewriteSession(model, options, Mode.APPLY, log, modules=modules)
    t1 = time.perf_counter()
    try:
        with vllm_runtime() if has_linears else contextlib.nullcontext():
            if options.tp > 1:
                _check_tp_group(options.tp)
            ctx = session.rewrite(trace_result)
        if options.tp > 1 and not deferred:  # deferred: the first call shards
            report_sharding(ctx)
    except FxpassError:
        raise
    except Exception as e:
        raise RewriteError(f"planning the rewrite of {type(model).__name__} failed: "
                           f"{type(e).__name__}: {e}; the model was not changed") from e
    log.update("timings_s", rewrite=time.perf_counter() - t1)

    if deferred and (options.tp > 1 or (
            options.fuse and not {"fusion", "fp32-gemm"} <= options.disabled)):
        from fxpass.weights import keep_loaded_weight

        # the first call shards them (each rank keeps its block), fusion merges them,
        # fp32-gemm copies them to fp32
        for layer in ctx.new_layers.values():
            keep_loaded_weight(layer)
    t2 = time.perf_counter()
    if load_weights:
        for qualname, layer in ctx.new_layers.items():
            try:
                _load(ctx, qualname, layer)
            except FxpassError:
                raise
            except Exception as e:
                raise WeightLoadError(f"{ctx.full_name(qualname)}: loading its weights failed: "
                                      f"{type(e).__name__}: {e}; the model was not changed"
                                      ) from e
        log.set("weights_loaded", True)
    log.update("timings_s", weights=time.perf_counter() - t2)

    t3 = time.perf_counter()
    stats = RuntimeStats()
    log.set("runtime", stats)
    runtime = RuleRespecialiser(options, stats)
    _commit(ctx, runtime)
    if not load_weights:  # vLLM's loader fills them; until then a call says so (unloaded.py)
        from fxpass.rewrite.unloaded import guard_unloaded

        for qualname, layer in ctx.new_layers.items():
            guard_unloaded(layer, ctx.full_name(qualname) or type(layer).__name__)
    model.__dict__[APPLIED] = dict(settings, first_call=deferred)
    if deferred:
        from fxpass.rewrite.first_call import FirstCall, arm

        # which linears the graphs call is known at the first call
        log.emit("placements-reset", "apply")
        arm(model, FirstCall(log, runtime, options,
                             swapped={q: ctx.full_name(q) for q in ctx.new_layers},
                             on_traced=on_first_call))
    log.update("timings_s", commit=time.perf_counter() - t3)
    return report


APPLIED = "_fxpass_applied"  # on the module apply rewrote: the settings it was given


def _check_quant_config(quant_config: Any) -> None:
    """A quant config is what vLLM passes to the model it builds: an object with
    ``get_quant_method(layer, prefix)`` (vLLM's ``QuantizationConfig``), or None."""
    if quant_config is None or callable(getattr(quant_config, "get_quant_method", None)):
        return
    from fxpass.weights import BNB_METHODS

    got = type(quant_config).__name__
    hint = ""
    if isinstance(quant_config, str):
        got = f"the string {quant_config!r}"
        name = quant_config.lower().removeprefix("bnb-").removeprefix("bnb_")
        if name in BNB_METHODS:
            hint = (f" For bitsandbytes {name} (the CLI's --quant {'bnb-' + name}): "
                    f"quant_config=fxpass.weights.bnb_config({name!r}).")
        elif name in ("none", ""):
            hint = " For no quantization: quant_config=None."
    elif isinstance(quant_config, dict):
        hint = (" A dict such as a checkpoint's quantization_config becomes vLLM's config "
                "through vLLM's class for its method: vllm.model_executor.layers.quantization"
                ".get_quantization_config(d['quant_method']).from_config(d).")
    elif type(quant_config).__module__.split(".")[0] == "transformers":
        hint = (f" {got} is transformers' config, not vLLM's: for bitsandbytes use "
                "fxpass.weights.bnb_config('nf4' | 'fp4' | 'int8').")
    raise UsageError(
        f"fxpass.apply: quant_config must be a vLLM quantization config (a "
        "QuantizationConfig from vllm.model_executor.layers.quantization: an object with "
        "get_quant_method(layer, prefix), the one vLLM passes to the model it builds) or None "
        f"for no quantization; got {got}. Build one with fxpass.weights.bnb_config('nf4' | "
        "'fp4' | 'int8') for bitsandbytes, or with vLLM's config classes (e.g. "
        "get_quantization_config(name).from_config(checkpoint_quantization_config))." + hint)


def describe_quant_config(quant_config: Any) -> str:
    """A short, comparable description of a quant config (None: unquantized)."""
    if quant_config is None:
        return "None (unquantized)"
    name = type(quant_config).__name__
    if hasattr(quant_config, "load_in_8bit") and hasattr(quant_config, "bnb_4bit_quant_type"):
        bnb = "int8" if quant_config.load_in_8bit else quant_config.bnb_4bit_quant_type
        skip = list(getattr(quant_config, "llm_int8_skip_modules", None) or [])
        return f"{name}({bnb}{f', skip={skip}' if skip else ''})"  # vllm-bnb-plugin
    text = repr(quant_config)
    if text.startswith("<") or len(text) > 200:  # object.__repr__ or a huge dump
        return name
    return text


def _explain_already_applied(log: EventLog, modules: dict[str, nn.Module],
                             settings: dict[str, Any]) -> None:
    """``report.already_applied_with``: the settings of the apply that rewrote the model;
    where this call asks for others, a note (report and warning) that nothing changed, why,
    and what to do."""
    path, before = next(((p, m.__dict__[APPLIED]) for p, m in modules.items()
                         if APPLIED in m.__dict__), ("", None))
    if before is None:
        return
    log.set("already_applied_with", {
        "module": path or "<root>",
        "quant_config": describe_quant_config(before["quant_config"]),
        "prefix": before["prefix"], "fuse": before["fuse"], "tp": before["tp"],
        "load_weights": before["load_weights"], "first_call": before.get("first_call", False)})
    differ = []
    old_q, new_q = before["quant_config"], settings["quant_config"]
    if old_q is not new_q and describe_quant_config(old_q) != describe_quant_config(new_q):
        differ.append(("quant_config", describe_quant_config(old_q),
                       describe_quant_config(new_q)))
    for key in ("prefix", "fuse", "tp"):
        if path == "" and before[key] != settings[key]:
            differ.append((key, repr(before[key]), repr(settings[key])))
    if settings["load_weights"] and not before["load_weights"]:
        from fxpass.rewrite.unloaded import unloaded_layers

        if unloaded_layers(modules[""]):  # and no loader has filled them since
            differ.append(("load_weights", "False", "True"))
    if not differ:
        return
    where = "the model" if not path else f"its submodule {path!r}"
    note = (f"fxpass.apply: already applied; nothing changed: {where} was rewritten by an "
            f"earlier fxpass.apply with {', '.join(f'{k}={old}' for k, old, _ in differ)}; "
            f"this call asked for "
            f"{', '.join(f'{k}={new}' for k, _, new in differ)}, which needs the original "
            "nn.Linear layers, and those are gone. Rebuild the tower from the original module "
            "(from_pretrained / from_config and its weights again, or a copy taken before the "
            "first apply) and apply once with the settings you want.")
    log.set("already_applied_note", note)
    warnings.warn(note, UserWarning, stacklevel=3)


def _check_may_wait(model: nn.Module, first_call: bool | None) -> None:
    """Without example inputs the graphs come from the model's first real call (fusion and
    sharding too: their layers are built then from the replicated ones the loader filled,
    ``fxpass.parallel.rule``), unless the caller insists on tracing now."""
    if first_call is False:
        raise UsageError(
            f"fxpass.apply(first_call=False) traces now, so it needs example inputs for "
            f"{type(model).__name__}: pass example_inputs= as a real call of its forward "
            "would, or let apply trace at the first call")


def _check_tp_group(tp: int) -> None:
    from fxpass.vllm_context import tp_world_size

    have = tp_world_size()
    if have != tp:
        raise UsageError(
            f"fxpass.apply(tp={tp}): this process's vLLM tensor-parallel group has {have} "
            f"rank(s); shard inside a vLLM engine with tensor_parallel_size={tp}, or start "
            f"{tp} processes that each enter fxpass.vllm_runtime(tp={tp}, rank=r, "
            "init_method='file://<shared path>') before apply")


def _check_examples_ran(model: nn.Module, tr: Trace) -> None:
    """Refuse example inputs the model itself cannot run: nothing learnt from them holds.

    On meta values data-dependent ops (``nonzero``) fail after the submodules were reached,
    which is expected (vLLM's model init); a failure with real values, or before reaching
    any submodule, means the inputs do not fit the model.
    """
    error = getattr(tr, "eager_errors", {}).get("")
    if not error:
        return
    leaves = torch.utils._pytree.tree_leaves(tr.example_inputs or ())
    on_meta = any(isinstance(t, torch.Tensor) and t.is_meta
                  for t in itertools.chain(leaves, model.parameters()))
    reached = len(tr.graphs) + len(tr.untraced) > 1
    if on_meta and reached:
        return
    raise UsageError(
        f"fxpass.apply: {type(model).__name__} does not run on the example inputs ({error}); "
        "pass example_inputs that its forward accepts, as a real call would (kwargs dict, "
        "args tuple or (args, kwargs)), or none: apply then traces at the first real call")


def _check_loadable(model: nn.Module) -> None:
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and mod.weight.device.type == "meta":
            raise WeightLoadError(
                f"{name}: load_weights=True needs real weights, but this linear is on the meta "
                "device; materialise the model (to_empty + load a checkpoint) or use "
                "load_weights=False and let vLLM's loader fill the layers")


def _load(ctx: RewriteContext, qualname: str, layer: nn.Module) -> None:
    from fxpass.weights import load_fused_weights, load_linear_weights

    if qualname in ctx.fused:
        members = [ctx.module(m) for m in ctx.fused[qualname]]
        load_fused_weights(layer, [(m.weight, m.bias) for m in members], ctx.quant_config)
        return
    old = ctx.module(qualname)
    load_linear_weights(layer, old.weight, old.bias, ctx.quant_config)


def vllm_linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the vLLM linear layers in ``model`` (for parity checks)."""
    return [n for n, m in model.named_modules() if is_vllm_linear(m)]


__all__ = ["apply", "describe_quant_config", "vllm_linear_names"]
