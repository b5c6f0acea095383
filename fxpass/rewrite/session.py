"""One rewrite session: trace -> prepare -> rules -> settle -> install, in one of three modes.

Every entry point that puts graphs on a tower runs a session:

* ``Mode.APPLY`` (``fxpass.apply`` with a trace): the rules build vLLM layers and edit the
  graphs; ``apply.py`` loads weights and commits layers and graphs atomically;
* ``Mode.FIRST_CALL`` (``first_call.py``): a tower ``apply`` had no inputs for is traced at
  its first real call; its layers were swapped at init, so only graph rules run, and the
  graphs are installed before the call is computed through them;
* ``Mode.RESPECIALISE`` (``respecialise.py``): a call no installed graph covers; the runtime
  traced the module again, the session runs the graph rules on that one graph.

The session owns the options (:class:`~fxpass.rules.base.Options`) and the event log the
report is built from; the rules it runs are the registry's choice for its options and mode
(``fxpass.rules.registry.select``). A rule that fails raises :class:`RewriteError` naming it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fxpass.errors import FxpassError, RewriteError, TraceError
from fxpass.layers import is_vllm_gemm
from fxpass.report import EventLog
from fxpass.rules import registry
from fxpass.rules.analysis import mark_unsafe, weight_uses
from fxpass.rules.base import Mode, Options, RewriteContext, is_vllm_linear
from fxpass.trace.hierarchy import Trace


class RewriteSession:
    """The rules over one trace of ``model`` (at ``prefix``, its full name) for one mode."""

    def __init__(self, model: nn.Module, options: Options, mode: Mode, log: EventLog, *,
                 prefix: str | None = None, modules: dict[str, nn.Module] | None = None
                 ) -> None:
        self.model = model
        self.options = options
        self.mode = mode
        self.log = log
        self.prefix = options.prefix if prefix is None else prefix
        self.modules = modules

    def context(self, tr: Trace) -> RewriteContext:
        return RewriteContext(self.model, tr, self.options, self.log, self.mode,
                              prefix=self.prefix, modules=dict(self.modules or {}))

    def rewrite(self, tr: Trace) -> RewriteContext:
        """prepare -> rules -> settle on ``tr``'s graphs (nothing on the model changes)."""
        ctx = self.context(tr)
        self.prepare(ctx)
        run_rules(ctx)
        self.settle(ctx)
        return ctx

    # -- phases ---------------------------------------------------------------------------
    def prepare(self, ctx: RewriteContext) -> None:
        """What the rules need known before they run, per mode.

        At apply: which linears must stay ``nn.Linear`` (their weight read outside a call,
        tied, torch's MultiheadAttention). Later (layers already vLLM's): a graph that reads
        a vLLM layer's weight values cannot be served (first call: that module stays
        Python; re-specialisation: the trace is refused), and vLLM GEMMs get positional
        inputs."""
        if self.mode is Mode.APPLY:
            mark_unsafe(ctx)
            return
        for use in weight_uses(ctx):
            q = use.site.graph.qualname
            if not (use.value_users and is_vllm_linear(ctx.module(use.linear))):
                continue
            users = ", ".join(u.format_node() for u in use.value_users[:2])
            if self.mode is Mode.RESPECIALISE:
                raise TraceError(f"the new graph reads the values of {use.linear}.{use.attr} "
                                 f"({users}), which a vLLM layer does not keep in HF's layout")
            tr = ctx.trace
            if q not in tr.graphs:
                continue
            del tr.graphs[q]
            for linear in [n for n, owner in tr.linear_sites.items() if owner == q]:
                del tr.linear_sites[linear]
            tr.untraced[q] = (
                f"its graph reads the values of {use.linear}.{use.attr} ({users}), which "
                "the vLLM layer swapped at init does not keep in HF's layout; it runs as "
                "Python, as vLLM's walk leaves it")
        positional_gemm_inputs(ctx)

    def settle(self, ctx: RewriteContext) -> None:
        """Write pending annotations, lint what the rules edited."""
        for mg in ctx.graphs():
            mg.settle()
            if mg.qualname in ctx.edited or self.mode is Mode.RESPECIALISE:
                mg.graph.lint()


def run_rules(ctx: RewriteContext) -> None:
    """Each rule the registry selects, in order: match, then check each match, then apply
    or emit why not. A rule's failure is a RewriteError naming the rule (fxpass's own errors
    pass as they are: they already say what to do)."""
    for rule in registry.select(ctx.options, ctx.mode):
        step = "match"
        try:
            for m in rule.match(ctx):
                step = "check"
                reason = rule.check(ctx, m)
                if reason is None:
                    step = "apply"
                    rule.apply(ctx, m)
                else:
                    rule.refuse(ctx, m, reason)
                step = "match"
        except FxpassError:
            raise
        except Exception as e:
            where = ctx.prefix or type(ctx.model).__name__
            raise RewriteError(f"rule {rule.name!r} failed in {step} on {where}: "
                               f"{type(e).__name__}: {e}; the model was not changed") from e


def positional_gemm_inputs(ctx: RewriteContext) -> None:
    """``self.linear(input=x)`` calls a vLLM layer as ``linear(x)`` (at apply, the linear
    rule does this when it swaps the layer)."""
    from fxpass.rules.linear import positional_input

    for mg in ctx.graphs():
        for node in mg.nodes_of("call_module"):
            if (not node.args and set(node.kwargs) == {"input"}
                    and is_vllm_gemm(ctx.module(str(node.target)))):
                name = node.name
                mg.edit(("linear", "positional input", name),
                        lambda graph, name=name: positional_input(name, graph))


def gemm_input(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
               ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """nn.Linear's call forms as vLLM's linear takes them: ``input=`` positional, contiguous
    (a forward pre-hook for Python code calling a vLLM layer)."""
    if not args and "input" in kwargs:
        kwargs = dict(kwargs)
        args = (kwargs.pop("input"),)
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        args = (args[0].contiguous(), *args[1:])
    return args, kwargs


__all__ = ["Mode", "Options", "RewriteSession", "gemm_input", "positional_gemm_inputs",
           "run_rules"]
