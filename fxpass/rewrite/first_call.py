"""Tracing at the model's first real call, for a tower ``apply`` had no example inputs for.

vLLM's model init never has example inputs; it has the real call a moment later (the profile
run's dummy batch, then requests). So, as torch.compile does, ``apply`` without inputs:

1. at init, swaps every ``nn.Linear`` for its vLLM layer at once (``pipeline.apply`` with an
   empty Trace: the linear rule alone matches), so vLLM's loaders fill them exactly as they
   fill the walk's, and arms a :class:`FirstCall` forward on the root;
2. at the first call (:meth:`FirstCall.__call__`), traces the tower with that call's real
   arguments, the vLLM layers as leaves that show the tracer HF's logical weights (the
   re-specialisation policy, :class:`~fxpass.rewrite.respecialise.RuleRespecialiser`), runs
   the graph rules, installs the graphs and only then computes the call through them, so the
   weight-probe and contiguity fixes already hold for it. Later calls of other structures
   re-specialise like any graph's.

A graph that reads a vLLM layer's weight values stays Python (its module runs as the walk
leaves it); a call the model itself rejects installs nothing (the module's own error is
raised, and the next call is the first call again). If tracing or the rules fail, nothing is
installed either: the tower runs its Python forward from then on (the walk's state, with
vLLM GEMM inputs made positional and contiguous), and the report and a warning say why. The
trace never runs inside dynamo or a CUDA-graph capture: such a call runs Python, and the
next one is the first call.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from torch import nn

from fxpass.errors import FxpassError, RewriteError
from fxpass.report import Report
from fxpass.rewrite.base import RewriteContext, is_vllm_linear
from fxpass.trace import GraphForward, TreeIndex, install, trace
from fxpass.trace.graph_runtime import _Family, _why_no_trace, fxpass_forward

logger = logging.getLogger("fxpass")


class FirstCall:
    """The forward armed on a root whose graphs come from its first real call."""

    def __init__(self, report: Report, runtime: Any, quant_config: Any, prefix: str, *,
                 swapped: dict[str, str], strict: bool = False,
                 on_traced: Callable[[Report], None] | None = None) -> None:
        self.report = report
        self.runtime = runtime  # RuleRespecialiser: tracing policy and the graphs' runtime
        self.quant_config = quant_config
        self.prefix = prefix
        self.swapped = swapped  # qualified name -> full name, the linears swapped at init
        self.strict = strict
        self.on_traced = on_traced
        self.lock = threading.RLock()
        self.python = False  # the first-call trace failed: Python serves every call

    def __call__(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.python:
            return self._python_call(module, args, kwargs, "the first-call trace failed")
        blocked = _why_no_trace()
        if blocked:
            return self._python_call(module, args, kwargs, blocked)
        with self.lock:
            if fxpass_forward(module.__dict__.get("forward")) is not self:
                return module.forward(*args, **kwargs)  # another thread traced it meanwhile
            del module.__dict__["forward"]
            t0 = time.perf_counter()
            try:
                traced = self._trace_and_install(module, args, kwargs)
            except Exception as e:  # noqa: BLE001 - the model keeps working (the walk's state)
                self._failed(module, e)
                if self.strict:
                    raise RewriteError(
                        f"fxpass: tracing {type(module).__name__} at its first call failed: "
                        f"{type(e).__name__}: {e}") from e
                return self._python_call(module, args, kwargs, "the first-call trace failed")
            if not traced:  # the model rejects this call: its own error, armed again
                install(module, self)
                return self._python_call(module, args, kwargs, "")
            t1 = time.perf_counter()
            out = module.forward(*args, **kwargs)
            done = time.perf_counter()
            self.report.first_call.update(
                state="traced", elapsed_s=done - t0, trace_and_rewrite_s=t1 - t0,
                graph_call_s=done - t1)
        if self.on_traced is not None:
            try:
                self.on_traced(self.report)
            except Exception as e:  # noqa: BLE001 - a log callback must never break the call
                logger.debug("fxpass: first-call callback failed: %s", e)
        return out

    # ------------------------------------------------------------------------------------
    def _trace_and_install(self, module: nn.Module, args: tuple[Any, ...],
                           kwargs: dict[str, Any]) -> bool:
        """Trace, rewrite and install; False when the model itself rejects the call."""
        from fxpass.rewrite.analysis import weight_uses
        from fxpass.rewrite.pipeline import run_rules
        from fxpass.rewrite.respecialise import _gemm_input, _positional_gemm_inputs

        t0 = time.perf_counter()
        index = TreeIndex.of(module)
        # Python parts of the tower (modules that do not trace) call the vLLM layers directly
        hooks = [sub.register_forward_pre_hook(_gemm_input, with_kwargs=True)
                 for sub in index.paths.values() if is_vllm_linear(sub)]
        try:
            tr = trace(module, (args, kwargs), index=index, policy=self.runtime)
        finally:
            for h in hooks:
                h.remove()
        if "" in tr.eager_errors and "" in tr.untraced:
            return False
        t1 = time.perf_counter()
        scratch = Report(prefix=self.prefix)
        ctx = RewriteContext(module, tr, self.quant_config, self.prefix, scratch,
                             modules=index.paths, respecialising=True)
        # A graph reading a vLLM layer's weight values would read vLLM's storage (packed,
        # emptied after loading): that module runs as Python, as the walk leaves it.
        for use in weight_uses(ctx):
            q = use.site.graph.qualname
            if use.value_users and q in tr.graphs and is_vllm_linear(ctx.module(use.linear)):
                users = ", ".join(u.format_node() for u in use.value_users[:2])
                del tr.graphs[q]
                for linear in [n for n, owner in tr.linear_sites.items() if owner == q]:
                    del tr.linear_sites[linear]
                tr.untraced[q] = (
                    f"its graph reads the values of {use.linear}.{use.attr} ({users}), which "
                    "the vLLM layer swapped at init does not keep in HF's layout; it runs as "
                    "Python, as vLLM's walk leaves it")
        _positional_gemm_inputs(ctx)
        run_rules(ctx)
        for mg in ctx.graphs():
            mg.settle()
            if mg.qualname in ctx.edited:
                mg.graph.lint()
        t2 = time.perf_counter()
        installed: list[nn.Module] = []
        try:
            families: dict[int, _Family] = {}
            for qualname, mg in tr.graphs.items():
                sub = index.paths[qualname]
                family = families.setdefault(id(mg.graph), _Family())
                install(sub, GraphForward(mg, self.runtime, family))
                installed.append(sub)
        except Exception:
            for sub in installed:
                sub.__dict__.pop("forward", None)
            raise
        self._record(ctx, tr, scratch, t1 - t0, t2 - t1)
        return True

    def _record(self, ctx: RewriteContext, tr: Any, scratch: Report, trace_s: float,
                rewrite_s: float) -> None:
        from fxpass.rewrite.linear import _why_no_graph

        report = self.report
        report.untraced = dict(tr.untraced)
        report.fixes = list(scratch.fixes)
        report.contiguity_checks = scratch.contiguity_checks
        report.refusals = list(scratch.refusals)
        report.graph_rewrites = [full for q, full in self.swapped.items()
                                 if q in tr.linear_sites]
        report.plain_swaps = {full: _why_no_graph(ctx, q).replace(
            "the example inputs", "the first call") for q, full in self.swapped.items()
            if q not in tr.linear_sites}
        report.first_call.update(trace_s=trace_s, rewrite_s=rewrite_s, graphs=len(tr.graphs),
                                 cache_hits=tr.cache_hits)

    def _failed(self, module: nn.Module, e: BaseException) -> None:
        self.python = True
        install(module, self)
        reason = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        self.report.first_call.update(state="python", error=reason)
        where = self.prefix or type(module).__name__
        if not isinstance(e, FxpassError):
            logger.debug("fxpass: first-call trace of %s failed", where, exc_info=e)
        logger.warning("fxpass[%s]: tracing the first call failed, so the tower runs as "
                       "Python with its swapped vLLM layers (as vLLM's walk leaves it): %s",
                       where, reason)

    def _python_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                     why: str) -> Any:
        with self.runtime.python_forward(module, "", [], why):
            return type(module).forward(module, *args, **kwargs)


def arm(model: nn.Module, first_call: FirstCall) -> None:
    """Install the first-call trace as the root's forward (a plain bound function)."""
    install(model, first_call)
    first_call.report.first_call["state"] = "armed"


def armed(model: nn.Module) -> FirstCall | None:
    fc = fxpass_forward(model.__dict__.get("forward"))
    return fc if isinstance(fc, FirstCall) else None


__all__ = ["FirstCall", "arm", "armed"]
