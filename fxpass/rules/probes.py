"""Rule: fold reads of a rewritten linear's weight metadata to the layer's logical values.

HF code reads ``self.proj.weight.dtype`` (``x.to(...)``, ``torch.finfo(...)``) and
``.shape``. A vLLM layer's weight is packed uint8 under bnb 4-bit and emptied after loading
on vLLM-CPU, so those reads would give uint8 / (0,). The graph shows each read: it is
replaced by the constant HF expects (params dtype, ``[out, in]``). Device reads are kept: the
stored tensor's device is the layer's device.
"""

from __future__ import annotations

import builtins
from typing import Any

import torch
import torch.fx as fx

from fxpass import meta
from fxpass.rules.analysis import WeightUse, weight_uses
from fxpass.rules.base import RewriteContext, RuleBase, Site, is_vllm_linear

_KEEP = frozenset({"device", "is_cuda", "is_meta", "get_device"})


class WeightProbes(RuleBase):
    name = "weight-probes"

    def refuse(self, ctx: RewriteContext, m: WeightUse, reason: str) -> None:
        pass  # a read it leaves is the linear rule's business (it keeps nn.Linear)

    def match(self, ctx: RewriteContext) -> list[WeightUse]:
        return [u for u in weight_uses(ctx) if u.probes]

    def check(self, ctx: RewriteContext, use: WeightUse) -> str | None:
        layer = ctx.layer_after(use.linear)
        if not is_vllm_linear(layer):
            return "linear stays nn.Linear: its weight reads are left as they are"
        return None

    def apply(self, ctx: RewriteContext, use: WeightUse) -> None:
        from fxpass.weights import logical_weight_info

        dtype, shape, _ = logical_weight_info(ctx.layer_after(use.linear))
        if use.attr == "bias":
            shape = torch.Size(shape[:1])
        mg = use.site.graph
        getattr_name = use.site.name
        for probe in [mg.node(p.name) for p in use.probes]:
            what = probe.args[1] if probe.target is builtins.getattr else probe.target
            if what in _KEEP:
                continue
            value = _logical(probe, what, dtype, shape)

            record = {"linear": use.site.node.target.rpartition(".")[0], "attr": use.attr,
                      "what": what, "args": tuple(probe.args[1:]) if probe.op == "call_method"
                      else (), "value": value}

            def fold(graph: fx.Graph, node: fx.Node, value: Any = value,
                     record: dict[str, Any] = record) -> None:
                source = node.all_input_nodes[0]
                for user in list(node.users):
                    user.replace_input_with(node, value)
                graph.erase_node(node)
                if source.name == getattr_name and not source.users:
                    graph.erase_node(source)
                # kept for the Python fallback (graph_runtime): it must not lose this fold
                meta.info(graph.output_node()).setdefault("probes", []).append(record)

            # the note (graph-relative: the same in every identical layer) names the edit
            ctx.fix(self.name, Site(mg, probe), f"{use.site.node.target}.{what} -> {value!r}", fold)


def _logical(probe: fx.Node, what: str, dtype: torch.dtype, shape: torch.Size) -> Any:
    args = probe.args[1:] if probe.op == "call_method" else ()
    if what == "dtype":
        return dtype
    if what in ("shape",):
        return shape
    if what == "size":
        return shape[args[0]] if args else shape
    if what in ("ndim", "dim", "ndimension"):
        return len(shape)
    if what in ("numel", "nelement"):
        return int(torch.Size(shape).numel())
    if what == "is_floating_point":
        return dtype.is_floating_point
    if what == "is_complex":
        return dtype.is_complex
    raise ValueError(f"unhandled weight probe {what}")
