"""The rewrite stage's side of re-specialisation: graphs traced after ``apply`` get the rules.

When an installed graph meets a call it does not cover, ``graph_runtime`` traces the module
again for that call. By then its linears are vLLM layers, so this policy

* shows the tracer each vLLM layer's *logical* weight (HF's dtype and ``[out, in]`` shape on
  a one-element tensor), so ``x.to(self.proj.weight.dtype)`` traces as it did at apply;
* runs vLLM GEMMs on contiguous inputs while tracing (the graph gets its ``.contiguous()``
  from the contiguity rule);
* runs the graph rules on the new graph (no layers are built: the linear swap and fusion
  happened at apply);
* guards the Python fallback: a graph fix Python would lose (a weight probe whose layer now
  reads otherwise) raises ``FallbackError`` naming the module and the fix, and so does a
  module sharded for tensor parallelism (never traced again either); vLLM GEMMs get
  positional, contiguous inputs through temporary hooks. (Fused members stay callable by
  name: ``fusion.FusedSlice``.)
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch import nn

from fxpass.errors import FallbackError, TraceError
from fxpass.layers import is_vllm_gemm
from fxpass.report import EventLog
from fxpass.rewrite.session import RewriteSession, gemm_input
from fxpass.rules.base import Mode, Options, is_vllm_linear
from fxpass.runtime.policy import Respecialiser
from fxpass.runtime.stats import RuntimeStats
from fxpass.trace.graph import ModuleGraph, graph_notes
from fxpass.trace.hierarchy import Trace


class RuleRespecialiser(Respecialiser):
    """Re-specialisation for a model ``apply`` rewrote (one per apply)."""

    def __init__(self, options: Options, stats: RuntimeStats) -> None:
        super().__init__(strict=options.strict, stats=stats)
        self.options = options
        self.prefix = options.prefix

    def specialise(self, module: nn.Module, qualname: str, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> Any:
        """A module that owns tensor-parallel pairs is traced again as its unsharded self
        (its sharded layers stood in for by full-size ``nn.Linear`` of zeros: its inputs are
        replicated, only shapes matter), then the sharding analysis runs on the new graph
        with the layers' roles
        (:func:`fxpass.parallel.rule.reshard`): the graph serves each rank's block,
        or the trace is refused (TraceError: the Python fallback refuses too)."""
        from fxpass.parallel.rule import StandIns, owns_pairs, runs_sharded
        from fxpass.runtime.install import installed_graph

        fwd = installed_graph(module)
        if fwd is None or not runs_sharded(fwd.graph):
            return super().specialise(module, qualname, args, kwargs)
        if not owns_pairs(fwd.graph):
            # fed a sharded value by its caller: a new trace would see per-rank shapes with
            # the full head counts of its Python code (the Python fallback refuses below)
            raise TraceError("it is fed a value sharded for tensor parallelism; it is not "
                             "traced again")
        stand_ins = StandIns(module)
        pending = self.__dict__.setdefault("_stand_ins", {})  # nested traces: one per module
        pending[id(module)] = stand_ins
        try:
            return super().specialise(module, qualname, args, kwargs)
        finally:
            stand_ins.restore()
            pending.pop(id(module), None)

    def trace_values(self, module: nn.Module) -> dict[str, Any]:
        from fxpass.weights import logical_weight_info

        values: dict[str, Any] = {}
        for name, sub in module.named_modules():
            if not is_vllm_linear(sub):
                continue
            dtype, shape, device = logical_weight_info(sub)
            values[f"{name}.weight" if name else "weight"] = _stand_in(shape, dtype, device)
            if getattr(sub, "bias", None) is not None:
                values[f"{name}.bias" if name else "bias"] = _stand_in(shape[:1], dtype, device)
        return values

    def leaf_inputs(self, module: nn.Module, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if is_vllm_gemm(module):
            return gemm_input(module, args, kwargs)
        return args, kwargs

    def rewrite(self, module: nn.Module, qualname: str, mg: ModuleGraph) -> ModuleGraph:
        stand_ins = self.__dict__.get("_stand_ins", {}).get(id(module))
        if stand_ins is not None:  # traced as the unsharded module: shard the new graph
            from fxpass.parallel.rule import reshard

            stand_ins.restore()
            reshard(module, mg)
        mg.qualname = ""  # the rules see the module as the model
        full = f"{self.prefix}.{qualname}" if self.prefix and qualname else (
            self.prefix or qualname)
        # the rules' records of a graph traced after apply are not the apply's report: they
        # are the graph's own annotations (verify and viz read them off the graph)
        session = RewriteSession(module, self.options, Mode.RESPECIALISE, EventLog(full),
                                 prefix=full)
        session.rewrite(Trace(root=module, graphs={"": mg}))
        mg.qualname = qualname
        return mg

    @contextlib.contextmanager
    def python_forward(self, module: nn.Module, qualname: str, graphs: list[fx.Graph],
                       why: str) -> Iterator[None]:
        from fxpass.parallel.rule import runs_sharded

        where = f"module {qualname or '<root>'!r} ({type(module).__name__})"
        if any(runs_sharded(g) for g in graphs):
            raise FallbackError(
                f"{where} needs its Python forward for this call ({why}), but it is sharded "
                "for tensor parallelism: its Python code would see each rank's block of heads / "
                "channels with the full counts (a wrong answer or an error). Call it as it was "
                "traced, or shard it as replicated (tp=None; inside vLLM: FXPASS_DISABLE=1, or "
                "mm_encoder_tp_mode='data' where the model supports it)")
        for rec in graph_notes(graphs, "probes"):
            layer = module.get_submodule(rec["linear"])
            actual = _read_probe(getattr(layer, rec["attr"]), rec["what"], rec["args"])
            if actual != rec["value"]:
                raise FallbackError(
                    f"{where} needs its Python forward for this call ({why}), but its graph "
                    f"folds {rec['linear']}.{rec['attr']}.{rec['what']} to {rec['value']!r} and "
                    f"Python would read {actual!r} off the {type(layer).__name__} (quantized or "
                    "emptied after loading): a wrong answer. Call it as it was traced, or "
                    "leave this module unquantized")
        # what the graphs did for vLLM's GEMMs (a positional, contiguous input), for every
        # vLLM layer Python may call here
        hooks = [sub.register_forward_pre_hook(gemm_input, with_kwargs=True)
                 for sub in module.modules() if is_vllm_gemm(sub)]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()




def _stand_in(shape: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor with HF's weight metadata on one element of storage."""
    return torch.empty((), dtype=dtype, device=device).expand(tuple(shape))


def _read_probe(tensor: torch.Tensor, what: str, args: tuple[Any, ...]) -> Any:
    value = getattr(tensor, what)
    return value(*args) if callable(value) else value

