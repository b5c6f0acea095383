"""``fxpass.verify``: run a reference and a rewritten candidate, compare them node by node.

Matching
    Every module call is a ``call_module`` node of its caller's graph (or a Python call when
    the caller stayed Python). Forward hooks on every submodule of both models report each
    call's output when it completes; a call is identified by the module's path and its call
    number within the forward, never by position in the run, so calls that exist on one side
    only (a vLLM layer's internals, a fused layer) are listed, not mis-paired; a layer a rule
    added in place of a function call (vLLM's encoder attention for HF's SDPA) is listed in
    ``covered`` with the module whose compared output holds it. The reference's trace names
    the fx graph and node that make each call (``NodeResult.graph/.node``).

Streaming (propagated mode)
    The candidate runs on the calling thread; each reference runs on a worker thread, and the
    threads hand control to each other (only one runs at a time): when the candidate finishes a
    call, the reference runs until it finishes the same call, the two outputs are compared, and
    both are dropped. Memory stays near that of the forwards themselves; a small buffer (a few
    calls) covers reference calls the candidate does not make.

Isolated mode
    Only the references run. At each rewritten layer, the candidate's layer is called on the
    reference's input to that layer (made contiguous, as the contiguity rule does in the
    candidate's graph) and compared with the reference layer's output: each layer's own error,
    however errors would pile up downstream. Tower outputs are not compared in this mode.

Tensor parallel
    On a candidate sharded by ``apply(..., tp=N)`` (one rank of it, in its rank process),
    every call is compared like with like: where the tensor-parallel rule recorded that a
    call's output is split (``tp_out`` on its call node, in the graphs traced at apply and
    those traced again since), the rank's block of the reference's output is cut out and
    compared; a call holding a block no recorded split matches is marked ``sharded`` (not
    a failure) and checked through its consumers; everything else, the tower output
    included, is compared whole.

References
    Unquantized candidates are compared with ``reference`` itself, against the near-exact
    budget. Quantized candidates (a rewritten layer with a bitsandbytes method) also get a
    fake-quant reference: a deep copy of ``reference`` whose rewritten weights are replaced by
    ``fxpass.weights.fake_quantize(w, method)``. The candidate must match it near-exactly
    (a loader or kernel fault shows there), and stays above the quantization SQNR floors
    against ``reference``.
"""

from __future__ import annotations

import copy
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from fxpass.errors import UsageError
from fxpass.layers import is_vllm_linear
from fxpass.verify.budgets import QUANT_ORDER, Budget, dtype_name, resolve_budget
from fxpass.verify.metrics import Metrics, compare_tensors
from fxpass.verify.report import FAKE_QUANT, REFERENCE, NodeResult, VerifyReport

__all__ = ["verify", "fake_quant_reference", "rewritten_layers", "tp_layout"]

Inputs = tuple[tuple[Any, ...], dict[str, Any]]
Key = tuple[str, int]  # (module path, call number)

_MODES = ("propagated", "isolated")
_BUFFER_CALLS = 32  # reference calls kept while the candidate looks for a call it lacks


# ------------------------------------------------------------------------------ helpers


def rewritten_layers(reference: nn.Module, candidate: nn.Module) -> dict[str, str]:
    """Paths (relative to the tower) of vLLM linear layers in ``candidate`` that stand where
    ``reference`` has an ``nn.Linear``, with each one's quant method ("none", "nf4", ...).

    With tower LoRA on both sides (``fxpass.lora``), a layer is the LoRA wrapper's path: vLLM's
    ``...WithLoRA`` around the vLLM linear in the candidate, PEFT's LoRA layer (or the plain
    ``nn.Linear`` where the adapter has nothing) in the reference; its method is the wrapped
    base layer's.
    """
    from fxpass.weights import quant_method_name

    ref_modules = dict(reference.named_modules())
    out: dict[str, str] = {}
    for path, mod in candidate.named_modules():
        base = _lora_base(mod)
        if base is not None and _linear_or_lora(ref_modules.get(path)):
            out[path] = quant_method_name(getattr(base, "quant_config", None), base)
        elif (is_vllm_linear(mod) and isinstance(ref_modules.get(path), nn.Linear)
              and _lora_base(candidate.get_submodule(path.rpartition(".")[0])
                             if path.endswith(".base_layer") else None) is None):
            out[path] = quant_method_name(getattr(mod, "quant_config", None), mod)
    return out


def fused_members(reference: nn.Module, candidate: nn.Module) -> dict[str, str]:
    """Paths of fused members in ``candidate`` (a ``FusedSlice`` of a merged vLLM layer where
    ``reference`` has an ``nn.Linear``), with the merged layer's quant method: their weights
    are shards of it, each quantized as the merged layer quantizes its shards, so the
    fake-quant reference quantizes them too (the merged layer sits at its own path, which
    the reference does not have)."""
    from fxpass.weights import quant_method_name

    ref_modules = dict(reference.named_modules())
    out: dict[str, str] = {}
    for path, mod in candidate.named_modules():
        merged = mod.__dict__.get("merged") if type(mod).__name__ == "FusedSlice" else None
        if merged is not None and is_vllm_linear(merged) and isinstance(
                ref_modules.get(path), nn.Linear):
            out[path] = quant_method_name(getattr(merged, "quant_config", None), merged)
    return out


def _lora_base(mod: nn.Module | None) -> nn.Module | None:
    """The vLLM linear inside a vLLM LoRA wrapper (``...WithLoRA``), else None."""
    if mod is None or not type(mod).__name__.endswith("WithLoRA"):
        return None
    base = getattr(mod, "base_layer", None)
    return base if base is not None and is_vllm_linear(base) else None


def _linear_or_lora(mod: nn.Module | None) -> bool:
    """An nn.Linear, or a PEFT LoRA layer around one (``base_layer``)."""
    return isinstance(mod, nn.Linear) or isinstance(getattr(mod, "base_layer", None), nn.Linear)


def fake_quant_reference(reference: nn.Module, methods: dict[str, str],
                         shards: dict[str, tuple[str, int]] | None = None) -> nn.Module:
    """A deep copy of ``reference`` whose linears at ``methods``' paths carry
    ``fake_quantize(weight, method)`` (paths with method "none" keep their weights).

    ``shards``: path -> (tensor-parallel style "column" / "row", TP size) for layers a
    sharded candidate quantizes block by block (each rank its block): each block is
    fake-quantized on its own, as the ranks together compute."""
    from fxpass.weights import BNB_METHODS, fake_quantize

    fq = copy.deepcopy(reference)
    with torch.no_grad():
        for path, method in methods.items():
            if method == "none":
                continue
            if method not in BNB_METHODS:
                raise UsageError(f"{path}: no fake-quant reference for quant method {method!r} "
                                 f"(known: {', '.join(BNB_METHODS)})")
            lin = fq.get_submodule(path)
            if not isinstance(lin, nn.Linear):  # a PEFT LoRA layer: quantize its base
                lin = lin.base_layer
            style, tp = (shards or {}).get(path, (None, 1))
            if style is None or tp <= 1:
                lin.weight.data = fake_quantize(lin.weight, method)
                continue
            dim = 0 if style == "column" else 1
            blocks = lin.weight.chunk(tp, dim=dim)
            lin.weight.data = torch.cat([fake_quantize(b.contiguous(), method) for b in blocks],
                                        dim=dim)
    return fq


def tp_layout(candidate: nn.Module
              ) -> tuple[dict[str, list[Any]], dict[str, tuple[str, int]]]:
    """How a tensor-parallel candidate splits what it computes, from the annotations the
    tensor-parallel rule left in its graphs: module path -> the splits of that call's output
    (``fxpass.parallel.sharding.spec``; one per distinct annotation over the module's caller's
    graphs, the graphs traced again after apply included), and path -> (style, TP size) of
    its sharded layers. Both empty for a replicated candidate."""
    from fxpass import meta
    from fxpass.runtime.install import installed_graph
    from fxpass.weights import tp_style

    outputs: dict[str, list[Any]] = {}
    layers: dict[str, tuple[str, int]] = {}
    for path, mod in candidate.named_modules():
        style = tp_style(mod) if is_vllm_linear(mod) else None
        if style is not None:
            layers[path] = (style, mod.tp_size)
        for graph in _graphs_of(installed_graph(mod)):
            for node in graph.nodes:
                split = meta.get(node, "tp_out") if node.op == "call_module" else None
                if split is not None:
                    known = outputs.setdefault(
                        f"{path}.{node.target}" if path else str(node.target), [])
                    if split not in known:
                        known.append(split)
    return outputs, layers


def _graphs_of(fwd: Any) -> list[Any]:
    """The graphs an installed forward runs: the one traced at apply and those traced again
    for calls it did not cover (re-specialisation), whose call nodes carry their own
    tensor-parallel annotations (``tensor_parallel.reshard``)."""
    if fwd is None:
        return []
    family = getattr(fwd, "family", None)
    return [fwd.graph, *(v.graph for v in getattr(family, "variants", ()))]


def _leaf_split(split: Any, leaf: str) -> Any:
    """The split of one output leaf (``0``, ``0.1``, ``""``) of a call split as ``split``."""
    for part in [p for p in leaf.split(".") if p] if leaf else []:
        if split is None or "items" not in split or not part.isdigit():
            return split if split is not None and "dim" in split else None
        items = split["items"]
        split = items[int(part)] if int(part) < len(items) else None
    return split if split is not None and "dim" in split else None


def _rank_block(ref: torch.Tensor, cand: torch.Tensor, split: Any) -> torch.Tensor | None:
    """This rank's block of the reference's ``ref`` along ``split``'s dim, when ``cand`` has
    a block's shape there (its size along the dim divides the reference's, every other dim
    equal); else None."""
    if split is None or not isinstance(ref, torch.Tensor):
        return None
    from fxpass.vllm_context import tp_rank

    d = split["dim"]
    if ref.dim() != cand.dim() or not 0 <= d < ref.dim():
        return None
    n = cand.shape[d]
    if (n == 0 or ref.shape[d] == n or ref.shape[d] % n
            or any(a != b for i, (a, b) in enumerate(zip(ref.shape, cand.shape)) if i != d)):
        return None
    return ref.narrow(d, tp_rank() * n, n)


def _block_dim(ref: torch.Tensor, cand: torch.Tensor, tp: int) -> int | None:
    """The one dim along which ``cand`` is shaped as 1/``tp`` of ``ref`` (the rest equal)."""
    if not isinstance(ref, torch.Tensor) or ref.dim() != cand.dim():
        return None
    diff = [i for i, (a, b) in enumerate(zip(ref.shape, cand.shape)) if a != b]
    if len(diff) == 1 and cand.shape[diff[0]] * tp == ref.shape[diff[0]]:
        return diff[0]
    return None


def _normalise_inputs(inputs: Any) -> list[Inputs]:
    """A list of inputs; each a kwargs dict, an args tuple/tensor, or an (args, kwargs) pair."""
    def one(x: Any) -> Inputs:
        if isinstance(x, dict):
            return (), dict(x)
        if isinstance(x, torch.Tensor):
            return (x,), {}
        if (isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)
                and isinstance(x[1], dict)):
            return tuple(x[0]), dict(x[1])
        if isinstance(x, tuple):
            return tuple(x), {}
        raise UsageError(
            f"each input must be a kwargs dict, an args tuple, a tensor or an (args, kwargs) "
            f"pair; got {type(x).__name__}")

    if isinstance(inputs, list):
        if not inputs:
            raise UsageError("inputs is an empty list; give at least one example input")
        return [one(x) for x in inputs]
    return [one(inputs)]


def _describe(inp: Inputs) -> dict[str, Any]:
    def d(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return {"shape": list(v.shape), "dtype": dtype_name(v.dtype)}
        if isinstance(v, (bool, int, float, str)) or v is None:
            return v
        return type(v).__name__
    args, kwargs = inp
    out: dict[str, Any] = {k: d(v) for k, v in kwargs.items()}
    for i, a in enumerate(args):
        out[f"arg{i}"] = d(a)
    return out


def _leaves(value: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """Tensor leaves of a module's output, named by their place (``0``, ``last_hidden_state``)."""
    if isinstance(value, torch.Tensor):
        return [(prefix, value)]
    items: Iterable[tuple[Any, Any]]
    if isinstance(value, dict):  # ModelOutput is an OrderedDict
        items = value.items()
    elif isinstance(value, (tuple, list)):
        items = enumerate(value)
    else:
        return []
    out: list[tuple[str, torch.Tensor]] = []
    for k, v in items:
        out.extend(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _float_dtype(module: nn.Module) -> torch.dtype:
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _node_names(reference: nn.Module, example: Inputs) -> dict[str, list[tuple[str, str]]]:
    """module path -> [(graph qualname, node name)] of the call_module nodes calling it."""
    from fxpass.trace.hierarchy import trace

    try:
        tr = trace(reference, example)
    except Exception:  # noqa: BLE001 - names are labels only; matching does not need them
        return {}
    names: dict[str, list[tuple[str, str]]] = {}
    for q, mg in tr.graphs.items():
        for node in mg.graph.nodes:
            if node.op == "call_module":
                full = f"{q}.{node.target}" if q else str(node.target)
                names.setdefault(full, []).append((q, node.name))
    return names


class _Tap:
    """Forward hooks on every submodule: ``on_call(path, call_number, module, args, kwargs,
    output)`` when each call completes.

    Calls made while fx traces are not the model's computation and are not counted: a graph
    traced at a module's first call, or again for a call its graph does not cover, runs the
    module's submodules eagerly on the call's values while tracing (at tensor parallel, on
    full-size stand-ins of zeros for its sharded layers), then computes the call through
    the new graph. Counting those would pair the trace's outputs with the reference's
    calls and leave the real ones unmatched (``candidate_only``).
    """

    def __init__(self, model: nn.Module, on_call: Callable[..., None],
                 paths: Iterable[str] | None = None) -> None:
        self.on_call = on_call
        self.counts: dict[str, int] = {}
        self.handles = []
        wanted = set(paths) if paths is not None else None
        for path, mod in model.named_modules():
            if not path or (wanted is not None and path not in wanted):
                continue
            self.handles.append(mod.register_forward_hook(
                self._hook(path), with_kwargs=True))

    def _hook(self, path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            if is_fx_symbolic_tracing():
                return
            k = self.counts.get(path, 0)
            self.counts[path] = k + 1
            self.on_call(path, k, module, args, kwargs, output)
        return hook

    def reset(self) -> None:
        self.counts.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


class _Abort(BaseException):
    """Unwinds a reference run the candidate no longer needs."""


class _ReferenceFailed(BaseException):
    """The reference raised: raised through the candidate's forward to ``verify`` (a
    BaseException, so the candidate's own ``except Exception`` blocks do not swallow it)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(error)
        self.error = error


_MISSING = object()


class _ReferenceRun:
    """One forward of a reference model on a worker thread, advanced call by call on demand.

    ``get(key)`` runs the reference until it completes call ``key`` and returns that output
    (or ``_MISSING`` when the forward ends without it); calls completed on the way that the
    candidate skipped are recorded in ``skipped``. The worker only runs while the calling
    thread waits, so the two never run at once.
    """

    def __init__(self, model: nn.Module, inp: Inputs, tap: _Tap) -> None:
        self.model = model
        self.inp = inp
        self.buffer: OrderedDict[Key, Any] = OrderedDict()
        self.skipped: list[Key] = []
        self.want: Key | None = None
        self.done = False
        self.abort = False
        self.error: BaseException | None = None
        self.output: Any = None
        self._go = threading.Semaphore(0)
        self._back = threading.Semaphore(0)
        tap.on_call = self._on_call
        tap.reset()
        self.thread = threading.Thread(target=self._main, name="fxpass-verify-ref", daemon=True)
        self.thread.start()

    def _main(self) -> None:
        self._go.acquire()
        try:
            if not self.abort:
                with torch.no_grad():
                    self.output = self.model(*self.inp[0], **self.inp[1])
        except _Abort:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the calling thread
            self.error = e
        finally:
            self.done = True
            self._back.release()

    def _on_call(self, path: str, k: int, module: nn.Module, args: Any, kwargs: Any,
                 output: Any) -> None:
        if self.abort:
            raise _Abort
        key = (path, k)
        self.buffer[key] = output
        while len(self.buffer) > _BUFFER_CALLS:
            self.skipped.append(self.buffer.popitem(last=False)[0])
        if key == self.want:
            self.want = None
            self._back.release()
            self._go.acquire()
            if self.abort:
                raise _Abort

    def _resume(self) -> None:
        self._go.release()
        self._back.acquire()
        if self.error is not None:
            err, self.error = self.error, None
            raise _ReferenceFailed(err)

    def get(self, key: Key) -> Any:
        if key not in self.buffer and not self.done:
            self.want = key
            self._resume()
        if key not in self.buffer:
            return _MISSING
        while True:
            k, v = self.buffer.popitem(last=False)
            if k == key:
                return v
            self.skipped.append(k)

    def finish(self) -> Any:
        if not self.done:
            self.want = None
            self._resume()
        self.thread.join()
        self.skipped.extend(self.buffer)
        self.buffer.clear()
        return self.output

    def cancel(self) -> None:
        self.abort = True
        if not self.done:
            self._go.release()
            self._back.acquire()
        self.thread.join()
        self.buffer.clear()


# ------------------------------------------------------------------------------ checks


class _Checker:
    """Applies the budget to each comparison and builds the NodeResults."""

    def __init__(self, budget: Budget, methods: dict[str, str],
                 names: dict[str, list[tuple[str, str]]], exact_ref: str) -> None:
        self.budget = budget
        self.methods = methods
        self.names = names
        self.exact_ref = exact_ref
        self.tol = (budget.atol, budget.rtol) if (
            budget.atol is not None and budget.rtol is not None) else (None, None)
        # tensor parallel: path -> splits of the call's output, path -> (style, TP size)
        self.splits: dict[str, list[Any]] = {}
        self.shards: dict[str, tuple[str, int]] = {}
        self.tp = 1
        self.candidate: nn.Module | None = None
        self.refreshed: set[str] = set()  # paths whose layout was read again this input

    def set_layout(self, candidate: nn.Module, splits: dict[str, list[Any]],
                   shards: dict[str, tuple[str, int]]) -> None:
        """``tp_layout(candidate)``'s result; ``candidate`` to read it again from."""
        self.candidate, self.splits, self.shards = candidate, splits, shards
        self.tp = max((n for _, n in shards.values()), default=1)

    def block(self, path: str, leaf: str, cand: torch.Tensor, ref: torch.Tensor
              ) -> tuple[torch.Tensor | None, str | None]:
        """The reference's tensor as this rank holds it, and None; or (None, why) where the
        candidate holds one rank's block of the call's output that no recorded split
        matches (not compared here: its consumers, the tower output at least, are).

        A block is taken along a split the tensor-parallel rule recorded for the call
        (``tp_out``); graphs traced during the run (first calls, re-specialisations) bring
        their own, so the layout is read again once per input where none matches."""
        if (self.tp > 1 and cand.shape != ref.shape and path not in self.refreshed
                and self.candidate is not None):
            self.refreshed.add(path)
            self.splits, _ = tp_layout(self.candidate)
        recorded = [s for s in (_leaf_split(x, leaf) for x in self.splits.get(path, ()))
                    if s is not None]
        for split in recorded:
            got = _rank_block(ref, cand, split)
            if got is not None:
                return got, None
        if self.tp <= 1 or cand.shape == ref.shape:
            return ref, None
        d = _block_dim(ref, cand, self.tp)
        if d is None:  # not shaped as any rank's block: compared, and fails on its shape
            return ref, None
        known = ", ".join(f"dim {s['dim']}" for s in recorded) or "none"
        return None, (f"sharded: holds one rank's block ({list(cand.shape)} of "
                      f"{list(ref.shape)}, 1/{self.tp} along dim {d}) where no recorded split "
                      f"matches (recorded: {known}); compared through its consumers")

    def compare(self, cand: torch.Tensor, ref: torch.Tensor) -> Metrics:
        return compare_tensors(cand, ref, atol=self.tol[0], rtol=self.tol[1])

    def node(self, input_index: int, order: int, path: str, k: int, leaf: str) -> NodeResult:
        names = self.names.get(path)
        graph = node = None
        if names:
            graph, node = names[k % len(names)]
        kind = "layer" if path in self.methods else "module"
        return NodeResult(input=input_index, order=order, kind=kind, module=path, call=k,
                          leaf=leaf, graph=graph, node=node,
                          quant_method=self.methods.get(path))

    def check(self, n: NodeResult) -> None:
        b = self.budget
        if not n.metrics and not n.violations and not n.sharded:
            n.violations.append("the reference's output has no tensor at this place")
        for ref, m in n.metrics.items():
            if m.shape_mismatch:
                n.violations.append(f"vs {ref}: shape {list(m.shape)} != {list(m.ref_shape)}")
                continue
            if m.dtype_mismatch:
                n.violations.append(f"vs {ref}: dtype {m.dtype} != {m.ref_dtype}")
            if m.nonfinite_mismatch:
                n.violations.append(
                    f"vs {ref}: {m.nonfinite_mismatch} NaN/Inf values where the other is "
                    f"finite (NaN {m.nan} vs {m.ref_nan}, Inf {m.inf} vs {m.ref_inf})")
            if ref == self.exact_ref:
                if m.tol_ratio is not None and m.tol_ratio > 1.0:
                    n.violations.append(
                        f"vs {ref}: max abs {m.max_abs:.3g} (max rel {m.max_rel:.3g}) is "
                        f"{m.tol_ratio:.3g}x the near-exact tolerance atol={b.atol:g}"
                        f"*max(1, rms(ref)) + rtol={b.rtol:g}*|ref|")
                if (b.exact_sqnr_db is not None and m.sqnr_db is not None
                        and _is_float(m.ref_dtype) and m.sqnr_db < b.exact_sqnr_db):
                    n.violations.append(
                        f"vs {ref}: SQNR {m.sqnr_db:.1f} dB < near-exact floor "
                        f"{b.exact_sqnr_db:g} dB")
            if ref == REFERENCE and b.quantized and m.sqnr_db is not None \
                    and _is_float(m.ref_dtype):
                floor, what = None, ""
                if n.kind == "output":
                    floor, what = b.output_sqnr_db, "output"
                elif n.kind == "layer" and n.quant_method not in (None, "none"):
                    floor, what = b.layer_sqnr_db, "per-layer"
                if floor is not None and m.sqnr_db < floor:
                    n.violations.append(
                        f"vs {ref}: SQNR {m.sqnr_db:.1f} dB < {b.method} {what} floor "
                        f"{floor:g} dB")


def _is_float(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat"))


# ------------------------------------------------------------------------------ verify


def verify(reference: nn.Module, candidate: nn.Module, inputs: Any, *,
           budget: Budget | dict[str, Any] | None = None, mode: str = "propagated",
           fake_quant: bool = True, progress: bool | None = None) -> VerifyReport:
    """Compare ``candidate`` (rewritten by ``fxpass.apply``) with ``reference`` (the original
    module, or a copy of it taken before ``apply``), node by node and at the output.

    ``inputs``: a list of example inputs (kwargs dicts, args tuples, tensors or
    ``(args, kwargs)`` pairs; several shapes allowed), or one of them. ``budget``: a
    :class:`~fxpass.verify.budgets.Budget`, a dict of overrides for the default one, or None
    for the default of the tower's dtype and quant method. ``mode``: "propagated" (each model
    runs on its own activations) or "isolated" (each rewritten layer of the candidate gets the
    reference's input). ``fake_quant``: for quantized candidates, also compare with the
    fake-quant reference (near-exact). ``progress``: a progress bar on stderr (None: only on
    a terminal, and only when the run lasts more than a couple of seconds).

    vLLM layers need a vLLM runtime: call this inside ``fxpass.vllm_runtime()``.
    """
    if not isinstance(reference, nn.Module) or not isinstance(candidate, nn.Module):
        raise UsageError("verify expects two nn.Modules (reference, candidate), got "
                         f"{type(reference).__name__} and {type(candidate).__name__}")
    if reference is candidate:
        raise UsageError("reference and candidate are the same object; keep a copy of the "
                         "module before fxpass.apply (copy.deepcopy) and pass that as reference")
    if mode not in _MODES:
        raise UsageError(f"mode must be one of {_MODES}, got {mode!r}")
    start = time.perf_counter()
    runs = _normalise_inputs(inputs)
    methods = rewritten_layers(reference, candidate)
    quant = [m for m in methods.values() if m != "none"]
    method = max(quant, key=lambda m: QUANT_ORDER.index(m) if m in QUANT_ORDER
                 else len(QUANT_ORDER)) if quant else "none"
    dtype = _float_dtype(reference)
    splits, shards = tp_layout(candidate)
    budget = resolve_budget(budget, dtype, method,
                            tp=max((n for _, n in shards.values()), default=1))

    references: list[tuple[str, nn.Module]] = [(REFERENCE, reference)]
    if quant and fake_quant:
        fq_methods = {**fused_members(reference, candidate), **methods}
        references.insert(0, (FAKE_QUANT, fake_quant_reference(reference, fq_methods,
                                                                shards)))
    # The near-exact limits hold against the fake-quant reference for quantized candidates
    # (skipped with fake_quant=False) and against the original module otherwise.
    exact_ref = FAKE_QUANT if quant else REFERENCE
    checker = _Checker(budget, methods, _node_names(reference, runs[0]), exact_ref)
    checker.set_layout(candidate, splits, shards)
    report = VerifyReport(mode=mode, dtype=dtype_name(dtype), quant_method=method,
                          budget=budget, references=[name for name, _ in references],
                          inputs=[_describe(r) for r in runs], layer_methods=dict(methods))
    bar = _progress(progress, len(runs))
    try:
        with torch.no_grad():
            for i, inp in enumerate(runs):
                checker.refreshed.clear()
                if mode == "propagated":
                    _propagated(report, checker, candidate, references, inp, i, bar)
                else:
                    _isolated(report, checker, candidate, references, methods, inp, i, bar)
    finally:
        if bar is not None:
            bar.close()
    for nr in (*report.nodes, *report.outputs):
        checker.check(nr)
    report.elapsed_s = time.perf_counter() - start
    return report


def _progress(progress: bool | None, n_inputs: int) -> Any:
    if progress is False:
        return None
    if progress is None and not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        return None
    return tqdm(total=None, unit=" nodes", desc=f"verify 1/{n_inputs}", leave=False,
                delay=0.0 if progress else 2.0, file=sys.stderr)


def _propagated(report: VerifyReport, checker: _Checker, candidate: nn.Module,
                references: list[tuple[str, nn.Module]], inp: Inputs, i: int, bar: Any) -> None:
    ref_paths = [{p for p, _ in model.named_modules() if p} for _, model in references]
    taps = [_Tap(model, lambda *a: None) for _, model in references]
    state = {"order": 0, "last": None}
    ref_runs: list[_ReferenceRun] = []
    seen_cand_only: set[str] = set(report.candidate_only)

    def on_call(path: str, k: int, module: nn.Module, args: Any, kwargs: Any,
                output: Any) -> None:
        state["last"] = f"{path}#{k}" if k else path
        got: dict[str, Any] = {}
        for (name, _), run, paths in zip(references, ref_runs, ref_paths):
            if path not in paths:
                continue
            value = run.get((path, k))
            if value is not _MISSING:
                got[name] = value
        if not got:
            if getattr(module, "_fxpass_site", None) is not None:  # a layer a rule added
                report.covered.setdefault(path, path.rpartition(".")[0])
                return
            if path not in seen_cand_only:
                seen_cand_only.add(path)
                report.candidate_only.append(path)
            return
        ref_leaves = {name: dict(_leaves(v)) for name, v in got.items()}
        for leaf, tensor in _leaves(output):
            nr = checker.node(i, state["order"], path, k, leaf)
            state["order"] += 1
            for name, leaves in ref_leaves.items():
                if leaf in leaves:
                    ref, why = checker.block(path, leaf, tensor, leaves[leaf])
                    if ref is not None:
                        nr.metrics[name] = checker.compare(tensor, ref)
                    else:
                        nr.sharded = why
            report.nodes.append(nr)
        if bar is not None:
            bar.update(1)

    cand_tap = _Tap(candidate, on_call)
    try:
        ref_runs.extend(_ReferenceRun(model, inp, tap) for (_, model), tap in
                        zip(references, taps))
        if bar is not None:
            bar.set_description(f"verify {i + 1}/{len(report.inputs)}")
        try:
            cand_out = candidate(*inp[0], **inp[1])
        except _ReferenceFailed as e:
            raise _reference_error(e.error, i) from e.error
        except Exception as e:  # noqa: BLE001 - a failing candidate is a finding...
            try:  # ...unless the reference fails on this input too
                for run in ref_runs:
                    run.finish()
            except _ReferenceFailed as ref_e:
                raise _reference_error(ref_e.error, i) from ref_e.error
            report.errors.append({"input": i, "error": f"{type(e).__name__}: {e}"[:500],
                                  "after": state["last"]})
            return
        try:
            ref_outs = [run.finish() for run in ref_runs]
        except _ReferenceFailed as e:
            raise _reference_error(e.error, i) from e.error
        seen_ref_only = set(report.reference_only)
        for run in ref_runs:
            for path, k in run.skipped:
                if path not in seen_ref_only:
                    seen_ref_only.add(path)
                    report.reference_only.append(path)
        ref_leaves = {name: dict(_leaves(out)) for (name, _), out in zip(references, ref_outs)}
        order = 0
        for leaf, tensor in _leaves(cand_out):
            nr = NodeResult(input=i, order=order, kind="output", module="", leaf=leaf)
            order += 1
            for name, leaves in ref_leaves.items():
                if leaf in leaves:
                    nr.metrics[name] = checker.compare(tensor, leaves[leaf])
            report.outputs.append(nr)
        missing = set().union(*ref_leaves.values()) - {leaf for leaf, _ in _leaves(cand_out)}
        for leaf in sorted(missing):
            report.errors.append({"input": i, "error": f"output {leaf!r} is missing from the "
                                  "candidate's output", "after": None})
    finally:
        for run in ref_runs:
            if not run.done:
                run.cancel()
        cand_tap.remove()
        for tap in taps:
            tap.remove()


def _reference_error(e: BaseException, i: int) -> UsageError:
    return UsageError(f"the reference raised {type(e).__name__} on input {i}: {e}; the inputs "
                      "must be valid for the original module")


def _isolated(report: VerifyReport, checker: _Checker, candidate: nn.Module,
              references: list[tuple[str, nn.Module]], methods: dict[str, str], inp: Inputs,
              i: int, bar: Any) -> None:
    if bar is not None:
        bar.set_description(f"verify {i + 1}/{len(report.inputs)}")
    results: dict[Key, list[NodeResult]] = {}
    order = [0]

    for name, model in references:
        def on_call(path: str, k: int, module: nn.Module, args: Any, kwargs: Any,
                    output: Any, name: str = name) -> None:
            layer = candidate.get_submodule(path)
            fed = [a.contiguous() if isinstance(a, torch.Tensor) else a
                   for a in (*args, *kwargs.values())]
            style, _ = checker.shards.get(path, (None, 1))
            if style == "row":  # the layer takes this rank's block of its input channels
                from fxpass.vllm_context import tp_rank

                n = layer.input_size_per_partition
                fed = [a.narrow(-1, tp_rank() * n, n).contiguous()
                       if isinstance(a, torch.Tensor) else a for a in fed]
            key = (path, k)
            if key not in results:
                results[key] = []
                for leaf, _ in _leaves(output):
                    results[key].append(checker.node(i, order[0], path, k, leaf))
                    order[0] += 1
                report.nodes.extend(results[key])
            try:
                got = layer(*fed)
            except Exception as e:  # noqa: BLE001 - a failing layer is a finding
                for nr in results[key]:
                    nr.violations.append(f"vs {name}: the candidate layer raised "
                                         f"{type(e).__name__}: {e}"[:300])
                return
            ref_leaves = dict(_leaves(output))
            for nr, (leaf, tensor) in zip(results[key], _leaves(got)):
                if leaf in ref_leaves:
                    ref = ref_leaves[leaf]
                    if style == "column":  # the layer gives this rank's output channels
                        got = _rank_block(ref, tensor, {"dim": ref.dim() - 1})
                        ref = got if got is not None else ref  # else: fails on its shape
                    nr.metrics[name] = checker.compare(tensor, ref)
            if bar is not None:
                bar.update(1)

        tap = _Tap(model, on_call, paths=methods)
        try:
            model(*inp[0], **inp[1])
        except Exception as e:
            raise _reference_error(e, i) from e
        finally:
            tap.remove()
    for nodes in results.values():
        nodes.sort(key=lambda n: n.order)
    report.nodes.sort(key=lambda n: (n.input, n.order))
