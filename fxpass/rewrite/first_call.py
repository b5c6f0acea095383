"""Tracing at a tower's first real call, for a tower ``apply`` had no example inputs for.

vLLM's model init never has example inputs; it has the real calls a moment later (the
profile run's dummy batch, then requests). So, as torch.compile does, ``apply`` without
inputs:

1. at init, swaps every ``nn.Linear`` for its vLLM layer at once (``pipeline.apply`` with an
   empty Trace: the linear rule alone matches), so vLLM's loaders fill them exactly as they
   fill the walk's, and arms a first-call forward on every module above a swapped linear;
2. at the first call of an armed module (the root, or a part the caller calls directly:
   vLLM's Gemma4 calls ``vision_tower.patch_embedder`` and ``vision_tower.encoder``, never the
   root), traces that module's subtree with the call's real arguments, the vLLM layers as
   leaves that show the tracer HF's logical weights (the re-specialisation policy,
   :class:`~fxpass.rewrite.respecialise.RuleRespecialiser`), runs a rewrite session in
   ``Mode.FIRST_CALL`` (graph rules only: the layers exist), installs
   the graphs and only then computes the call through them, so the weight-probe and
   contiguity fixes already hold for it. Later calls of other structures re-specialise like
   any graph's; an enclosing module called later is traced with its whole subtree.

A graph that reads a vLLM layer's weight values stays Python (its module runs as the walk
leaves it). A call the module itself rejects installs nothing: its own error is raised and
the next call is a first call again; after ``REJECTIONS_BEFORE_PYTHON`` rejections in a row
the next calls run as Python first (a tower that raises on every call, as after the walk,
no longer pays a trace per call), and the call after the first one that runs traces. If
tracing or the rules fail, nothing is installed for that subtree: it runs its Python
forward from then on (the walk's state, with vLLM GEMM inputs made positional and
contiguous), and the report and a warning say why. Under torch.compile the first call runs
outside dynamo (traced there; dynamo compiles the graphs from the next call on); nothing is
traced during a CUDA-graph capture (such a call runs Python).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import torch
from torch import nn

from fxpass.errors import FxpassError, NotLoadedError, RewriteError
from fxpass.layers import is_linear, is_vllm_gemm
from fxpass.report import EventLog, Fix, Report
from fxpass.rewrite.commit import commit
from fxpass.parallel.rule import report_sharding
from fxpass.rewrite.session import RewriteSession, gemm_input
from fxpass.rules.base import Mode, Options, is_vllm_linear
from fxpass.rewrite.unloaded import not_loaded_message, unloaded_layers
from fxpass.runtime.install import fxpass_forward, install
from fxpass.runtime.policy import why_no_trace
from fxpass.trace.cache import TraceCache, TreeIndex
from fxpass.trace.hierarchy import trace
from fxpass.trace.tracer import TRACE_LOCK

logger = logging.getLogger("fxpass")

# Rejected first calls in a row after which an armed module runs its calls as Python until
# one of them runs (the next call then traces): a rejected trace costs a whole trace.
REJECTIONS_BEFORE_PYTHON = 2


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _inside(name: str, path: str) -> bool:
    return not path or name == path or name.startswith(path + ".")


class FirstCall:
    """What the armed forwards of one ``apply`` share: the report they complete, the
    rewrite policy, and what the traced entry points learnt (root-relative names)."""

    def __init__(self, log: EventLog, runtime: Any, options: Options, *,
                 swapped: dict[str, str],
                 on_traced: Callable[[Report], None] | None = None) -> None:
        self.log = log  # the apply's: the report the caller holds is built from it
        self.runtime = runtime  # RuleRespecialiser: tracing policy and the graphs' runtime
        self.options = options
        self.prefix = options.prefix
        self.swapped = swapped  # qualified name -> full name, the linears swapped at init
        self.strict = options.strict
        self.on_traced = on_traced
        self.lock = threading.RLock()
        self.sites: dict[str, str] = {}  # linear -> the graph that calls it
        self.untraced: dict[str, str] = {}
        self.plain: dict[str, str] = {}  # linear -> why no graph calls it
        self.traced: dict[str, float] = {}  # entry path -> seconds (trace + rewrite + call)

    # ------------------------------------------------------------------------------------
    def call(self, armed: "Armed", module: nn.Module, args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> Any:
        if armed.python:
            return self._python_call(module, args, kwargs, "its first-call trace failed")
        unloaded = unloaded_layers(module)  # armed calls only: until the first call traces
        if unloaded:  # fxpass's error now, still armed (tracing would meet it in vLLM's code)
            raise NotLoadedError(not_loaded_message(
                unloaded[0], len(unloaded) - 1, _join(self.prefix, armed.path)))
        blocked = why_no_trace()
        if blocked:
            return self._python_call(module, args, kwargs, blocked)
        if armed.rejections >= REJECTIONS_BEFORE_PYTHON:
            out = self._python_call(module, args, kwargs, "its last first calls raised")
            armed.rejections = 0  # this call ran: the next one traces
            return out
        with TRACE_LOCK, self.lock:  # the trace lock first (see tracer.TRACE_LOCK)
            if fxpass_forward(module.__dict__.get("forward")) is not armed:
                return module.forward(*args, **kwargs)  # another thread traced it meanwhile
            disarmed = _disarm(module)
            t0 = time.perf_counter()
            try:
                traced = self._trace_and_install(armed.path, module, args, kwargs)
            except Exception as e:  # noqa: BLE001 - the model keeps working (the walk's state)
                armed.python = True
                install(module, armed)
                self._failed(armed.path, module, e)
                if self.strict:
                    raise RewriteError(
                        f"fxpass: tracing {type(module).__name__} at its first call failed: "
                        f"{type(e).__name__}: {e}") from e
                return self._python_call(module, args, kwargs, "its first-call trace failed")
            if not traced:  # the module rejects this call: its own error, armed again
                for sub, a in disarmed:
                    install(sub, a)
                armed.rejections += 1
                return self._python_call(module, args, kwargs, "")
            t1 = time.perf_counter()
            out = module.forward(*args, **kwargs)
            done = time.perf_counter()
            self.traced[armed.path] = done - t0
            with self.log.lock:
                fc = self.log.facts["first_call"]
                self.log.update("first_call", state="traced", entries={
                    p or "<root>": round(s, 6) for p, s in self.traced.items()},
                    elapsed_s=sum(self.traced.values()),
                    trace_and_rewrite_s=fc.get("trace_and_rewrite_s", 0.0) + (t1 - t0),
                    graph_call_s=fc.get("graph_call_s", 0.0) + (done - t1))
        if self.on_traced is not None:
            try:
                self.on_traced(self.log.report())
            except Exception as e:  # noqa: BLE001 - a log callback must never break the call
                logger.debug("fxpass: first-call callback failed: %s", e)
        return out

    def _trace_and_install(self, path: str, module: nn.Module, args: tuple[Any, ...],
                           kwargs: dict[str, Any]) -> bool:
        """Trace ``module`` (at ``path``) on this call, rewrite and install; False when the
        module itself rejects the call."""
        t0 = time.perf_counter()
        tr, index = self._trace(module, args, kwargs)
        # HF code that reads a swapped layer's weight itself (Python a graph does not cover,
        # or a graph reading its values) would read vLLM's storage: such a layer goes back to
        # nn.Linear holding the weight it computes with (dequantized under bitsandbytes),
        # then the subtree is traced again with it.
        back = self._weight_readers(module, tr, index)
        if back:
            self._unswap(path, module, back)
            tr, index = self._trace(module, args, kwargs)
        if "" in tr.eager_errors and "" in tr.untraced:
            self._rejected(path, tr.eager_errors[""])
            return False
        t1 = time.perf_counter()
        # Python code calling a vLLM layer with a keyword or a non-contiguous input (vLLM's
        # GEMM takes neither): the layer keeps the graphs' positional, contiguous input
        for linear, why in tr.python_linear_uses.items():
            layer = index.paths.get(linear)
            if layer is not None and is_vllm_gemm(layer) and "calls it" in why and not getattr(
                    layer, "_fxpass_gemm_input", False):
                layer.register_forward_pre_hook(gemm_input, with_kwargs=True)
                layer._fxpass_gemm_input = True
        scratch = EventLog(_join(self.prefix, path))
        session = RewriteSession(module, self.options, Mode.FIRST_CALL, scratch,
                                 prefix=_join(self.prefix, path), modules=index.paths)
        ctx = session.rewrite(tr)
        if self.options.tp > 1:
            report_sharding(ctx)
        for qualname, mg in tr.graphs.items():
            mg.qualname = _join(path, qualname)  # root-relative, for errors and stats
        commit(ctx, self.runtime)  # layers built from the loaded ones (fusion), added ones
        from fxpass.weights import release_loaded_weights

        release_loaded_weights(module)  # the weights kept for fusion: merged or not, done
        self._record(path, ctx, tr, scratch, t1 - t0, time.perf_counter() - t1)
        return True

    def _trace(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
               ) -> tuple[Any, TreeIndex]:
        index = TreeIndex.of(module)
        # Python parts of the tower (modules that do not trace) call the vLLM layers directly
        hooks = [sub.register_forward_pre_hook(gemm_input, with_kwargs=True)
                 for sub in index.paths.values() if is_vllm_gemm(sub)]
        try:
            # A private trace cache: its entries hold the captured inputs of every module,
            # here the real call's activations (a profile batch), which the process-wide
            # cache would keep alive; identical layers still share one trace within it.
            return trace(module, (args, kwargs), index=index, policy=self.runtime,
                         cache=TraceCache()), index
        finally:
            for h in hooks:
                h.remove()

    def _weight_readers(self, module: nn.Module, tr: Any, index: TreeIndex
                        ) -> dict[str, tuple[nn.Linear, str]]:
        """Swapped layers whose weight HF code reads itself, each with a dense nn.Linear
        that serves the read and why (only those that can go back)."""
        from fxpass.rules.analysis import weight_uses
        from fxpass.weights import dense_linear

        why: dict[str, str] = {}
        for linear, use in tr.python_linear_uses.items():
            if ".weight" in use:
                why[linear] = use
        ctx = RewriteSession(module, self.options, Mode.FIRST_CALL, EventLog(),
                             modules=index.paths).context(tr)
        for use in weight_uses(ctx):
            if use.value_users and use.attr == "weight":
                users = ", ".join(u.format_node() for u in use.value_users[:2])
                why.setdefault(use.linear, f"graph {use.site.graph.qualname or '<root>'} reads "
                                           f"its weight values ({users})")
        out = {}
        for linear, reason in why.items():
            layer = index.paths.get(linear)
            if layer is None or not is_vllm_linear(layer):
                continue
            owner = index.paths.get(linear.rpartition(".")[0])
            if owner is not None and is_vllm_gemm(owner) and not is_vllm_linear(owner):
                continue  # the base layer of vLLM's LoRA wrapper: the wrapper needs it as is
            dense, no = dense_linear(layer)
            if dense is not None:
                out[linear] = (dense, reason)
            else:
                with self.log.lock:
                    kept = self.log.facts["first_call"].setdefault("kept", {})
                    kept[_join(self.prefix, linear)] = f"{reason}; it cannot go back: {no}"
                    self.log.update("first_call")
        return out

    def _unswap(self, path: str, module: nn.Module,
                back: dict[str, tuple[nn.Linear, str]]) -> None:
        for linear, (dense, why) in back.items():
            parent, _, child = linear.rpartition(".")
            setattr(module.get_submodule(parent), child, dense)
            q = _join(path, linear)
            full = self.swapped.pop(q, _join(self.prefix, q))
            self.plain.pop(q, None)
            self.sites.pop(q, None)
            self.log.emit("skip", "first call", full, reason=(
                f"{why}; back to nn.Linear at the first call, holding the weight its vLLM "
                "layer computed with (bitsandbytes: dequantized)"))

    def _record(self, path: str, ctx: Any, tr: Any, scratch: EventLog,
                trace_s: float, rewrite_s: float) -> None:
        """Append what tracing ``path`` learnt to the apply's log: it replaces what an earlier
        trace of a module inside it said (a ``scope`` event), names made root-relative."""
        from fxpass.rules.linear import why_no_graph

        self.sites = {k: v for k, v in self.sites.items() if not _inside(k, path)}
        self.sites.update({_join(path, k): _join(path, v) for k, v in tr.linear_sites.items()})
        log = self.log
        with log.lock:
            log.emit("scope", "first call", path)
            for k, why in tr.untraced.items():
                log.emit("untraced", "first call", _join(path, k), reason=why)
            fused = [e for e in scratch.events if e.kind == "fusion"]
            for e in fused:  # members are slices of the fused layer now: not placed alone
                full = set(e.data["members"])
                self.swapped = {q: f for q, f in self.swapped.items() if f not in full}
            for e in scratch.events:
                if e.kind == "fix":
                    f = e.data["fix"]
                    fix = Fix(f.rule, _join(path, f.module), f.node, _join(path, f.detail))
                    log.emit("fix", e.rule, fix.module, fix=fix)
                elif e.kind in ("check", "refusal", "shard", "replicated", "tp-pair"):
                    log.extend([e])  # full names already
            if "tp_sharded_fraction" in scratch.facts and self.options.tp > 1:
                log.set("tp_sharded_fraction", scratch.facts["tp_sharded_fraction"])
            for q in self.swapped:
                if q in self.sites:
                    self.plain.pop(q, None)
                elif _inside(q, path):
                    rel = q[len(path) + 1:] if path else q
                    self.plain[q] = why_no_graph(ctx, rel).replace("the example inputs",
                                                                   "the first call")
                elif q not in self.plain:
                    self.plain[q] = ("no module above it has been called yet (its graph "
                                     "comes at its first call)")
            self._placements()
            log.extend(fused)
            fc = log.facts["first_call"]
            log.update("first_call", trace_s=fc.get("trace_s", 0.0) + trace_s,
                       rewrite_s=fc.get("rewrite_s", 0.0) + rewrite_s,
                       graphs=fc.get("graphs", 0) + len(tr.graphs))

    def _placements(self) -> None:
        """Where every swapped linear stands now: called from a graph, or why not."""
        self.log.emit("placements-reset", "first call")
        for q, full in self.swapped.items():
            if q in self.sites:
                self.log.emit("placement", "first call", full, graph=True)
            elif q in self.plain:
                self.log.emit("placement", "first call", full, why=self.plain[q])

    def _rejected(self, path: str, error: str) -> None:
        """The module raised on this call (its own error, or one of vLLM's layers as after
        the walk): nothing installed, armed again; the report says so."""
        with self.log.lock:
            self.log.facts["first_call"].setdefault("rejected", {})[path or "<root>"] = error
            self.log.update("first_call")
        why = (f"every call of {path or '<root>'} so far raised ({error}); it stays armed "
               "(its graph comes at its first call that runs, or, after "
               f"{REJECTIONS_BEFORE_PYTHON} calls that raised in a row, at the call after it)")
        for q in self.swapped:
            if _inside(q, path) and q not in self.sites and not any(
                    _inside(q, p) for p in self.traced):
                self.plain[q] = why
        self._placements()

    def _failed(self, path: str, module: nn.Module, e: BaseException) -> None:
        reason = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        where = _join(self.prefix, path) or type(module).__name__
        with self.log.lock:
            self.log.facts["first_call"].setdefault("failed", {})[path or "<root>"] = reason
            self.log.update("first_call", state="python", error=reason)
        if not isinstance(e, FxpassError):
            logger.debug("fxpass: first-call trace of %s failed", where, exc_info=e)
        logger.warning("fxpass[%s]: tracing its first call failed, so it runs as Python with "
                       "its swapped vLLM layers (as vLLM's walk leaves it): %s", where, reason)

    def _python_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                     why: str) -> Any:
        with self.runtime.python_forward(module, "", [], why):
            return type(module).forward(module, *args, **kwargs)


class Armed:
    """The forward armed on one module: its first call traces its subtree."""

    def __init__(self, first_call: FirstCall, path: str) -> None:
        self.first_call = first_call
        self.path = path  # root-relative
        self.python = False  # its first-call trace failed: Python serves its calls
        self.rejections = 0  # first calls the module rejected in a row

    def __call__(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            # torch.compile of an armed tower: the first call traces outside dynamo, and
            # dynamo compiles the installed graphs from the next call on
            return _call_eagerly(self, module, args, kwargs)
        return self.first_call.call(self, module, args, kwargs)


@torch.compiler.disable
def _call_eagerly(armed: Armed, module: nn.Module, args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> Any:
    return armed.first_call.call(armed, module, args, kwargs)


def _disarm(module: nn.Module) -> list[tuple[nn.Module, Armed]]:
    out = []
    for sub in module.modules():
        armed = fxpass_forward(sub.__dict__.get("forward"))
        if isinstance(armed, Armed):
            del sub.__dict__["forward"]
            out.append((sub, armed))
    return out


def arm(model: nn.Module, first_call: FirstCall) -> int:
    """Arm every module above a swapped linear (the root included); returns how many."""
    paths = dict(model.named_modules())
    targets: set[str] = set()
    for q in first_call.swapped:
        parts = q.split(".")
        targets.update(".".join(parts[:i]) for i in range(len(parts)))
    count = 0
    for path in sorted(targets, key=lambda p: (p.count("."), p)):
        module = paths.get(path)
        if module is None or is_linear(module) or "forward" in module.__dict__:
            continue
        install(module, Armed(first_call, path))
        count += 1
    first_call.log.update("first_call", state="armed", armed_modules=count)
    return count


def armed(model: nn.Module) -> Armed | None:
    a = fxpass_forward(model.__dict__.get("forward"))
    return a if isinstance(a, Armed) else None


__all__ = ["Armed", "FirstCall", "arm", "armed"]
