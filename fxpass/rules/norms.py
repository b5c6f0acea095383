"""Rule (opt-in, ``fuse=True``): RMSNorm modules run vLLM's CPU kernel ``_C.rms_norm``.

HF writes RMSNorm as a chain of elementwise ops (Gemma4: ``float``, ``pow``, ``mean``, ``add``,
``pow``, ``mul``, ``mul`` by the weight, ``type_as``): seven passes over the activation and
as many fresh tensors, seven times per Gemma4 vision layer (four on the hidden state, q/k/v
norms over the head dim). vLLM's ``torch.ops._C.rms_norm(out, x, weight, eps)`` is one pass.

Matched: a call of a module whose class name says RMSNorm. Applied only where the module is
shown to compute ``x * rsqrt(mean(x**2, -1) + eps) * weight`` (or without a weight): it has
no children, no hooks, no buffers, at most a 1-D ``weight``, an ``eps`` attribute, and a
numeric probe of its own forward (random weight, inputs at two scales so that a different
eps shows) agrees with that formula. Refused, with the reason, otherwise (Gemma3's
``1 + weight``, an eps the module does not expose, a module with other state, a
tensor-parallel tower: its sharding analysis reads the norms as traced).

Numerics: fp32 within ~1e-6 of HF (``rsqrt`` vs ``pow(-0.5)``); bf16 within one bf16 ulp
(vLLM's kernel rounds the normalised value to bf16 before the weight multiply; Gemma4
multiplies in fp32 and rounds once). Not bit-exact in bf16, hence opt-in. The kernel runs for
contiguous fp32/bf16 CPU tensors without autograd; anything else (and torch.compile, where
inductor fuses the plain formula with its neighbours) runs the formula in torch ops.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxpass import meta
from fxpass.rules.base import RewriteContext, Site, SpeedRule, module_sites

EPS_ATTRS = ("eps", "variance_epsilon", "epsilon")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
_op: Any = None


def _vllm_rms_norm() -> Any:
    global _op
    if _op is None:
        import vllm._custom_ops  # noqa: F401 - registers torch.ops._C on this platform

        _op = torch.ops._C.rms_norm
    return _op


def vllm_has_rms_norm() -> str | None:
    """None when vLLM's ``_C.rms_norm`` is usable here, else why not."""
    try:
        _vllm_rms_norm()
    except Exception as e:  # noqa: BLE001 - any failure means: not available
        return f"vLLM's torch.ops._C.rms_norm is not available ({type(e).__name__}: {e})"
    return None


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``x * rsqrt(mean(x**2, -1) + eps) * weight`` in fp32, cast back to ``x.dtype``."""
    h = x.float()
    out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        out = out * weight.float()
    return out.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim with vLLM's CPU kernel where it applies (see module)."""
    if (x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES
            and x.numel() and not torch.compiler.is_compiling()
            and (weight is None or (weight.dtype == x.dtype and weight.is_contiguous()
                                    and weight.device.type == "cpu"))
            and not (torch.is_grad_enabled() and (
                x.requires_grad or (weight is not None and weight.requires_grad)))):
        # a strided input (q of a fused q/k/v GEMM: a slice) is copied once: still two
        # passes where the formula takes seven
        x = x.contiguous()
        out = torch.empty_like(x)
        _vllm_rms_norm()(out, x, weight, eps)
        return out
    return rms_norm_reference(x, weight, eps)


@dataclasses.dataclass
class NormMatch:
    site: Site
    qualname: str  # the norm module


_probe_cache: dict[Any, str | None] = {}


def _probe_key(module: nn.Module, eps: float, dim: int, has_weight: bool) -> Any:
    attrs = tuple(sorted((k, v) for k, v in vars(module).items()
                         if not k.startswith("_") and type(v) in (int, float, bool, str)))
    return type(module), eps, dim, has_weight, attrs


def _probe(module: nn.Module, eps: float, dim: int, has_weight: bool) -> str | None:
    """Why ``module`` does not compute the RMSNorm formula (None: it does), by running it."""
    key = _probe_key(module, eps, dim, has_weight)
    if key in _probe_cache:
        return _probe_cache[key]
    gen = torch.Generator().manual_seed(0)
    weight = (torch.rand(dim, generator=gen) + 0.5) if has_weight else None
    why = None
    for scale in (1.0, 1e-3):  # at 1e-3, mean(x**2) ~ 1e-6: an eps of another size shows
        x = torch.randn(3, dim, generator=gen, dtype=torch.float64).float() * scale
        try:
            with torch.no_grad():
                params = {"weight": weight} if has_weight else {}
                got = torch.func.functional_call(module, params, (x,))
        except Exception as e:  # noqa: BLE001 - a module that cannot run alone is refused
            why = f"its forward does not run on a probe input ({type(e).__name__}: {e})"
            break
        if not isinstance(got, torch.Tensor) or got.shape != x.shape:
            why = "its forward does not return one tensor of its input's shape"
            break
        want = rms_norm_reference(x.double(), None if weight is None else weight.double(),
                                  eps)
        diff = (got.double() - want).abs().max().item()
        if not diff <= 1e-5 * want.abs().max().item():
            why = (f"it does not compute x * rsqrt(mean(x**2) + eps) * weight with eps={eps} "
                   f"(probe at scale {scale:g}: max diff {diff:.3g})")
            break
    _probe_cache[key] = why
    return why


def _is_rms_norm_class(module: nn.Module) -> bool:
    return "rmsnorm" in type(module).__name__.lower()


class RmsNormToVllm(SpeedRule):
    name = "rms-norm"

    def describe(self, ctx: RewriteContext, m: NormMatch) -> str:
        return ctx.full_name(m.qualname)

    def match(self, ctx: RewriteContext) -> list[NormMatch]:
        return [NormMatch(site, q) for site, q in module_sites(ctx, _is_rms_norm_class)]

    def check(self, ctx: RewriteContext, m: NormMatch) -> str | None:
        if ctx.tp > 1:
            return ("tensor-parallel tower: the sharding analysis reads the norms as traced "
                    "(q/k norms over a sharded head dim)")
        module = ctx.module(m.qualname)
        node = m.site.node
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            return f"called as {node.format_node()}, not on one tensor"
        if any(True for _ in module.children()):
            return f"{type(module).__name__} has submodules"
        if list(module.buffers(recurse=False)):
            return f"{type(module).__name__} holds buffers"
        if (module._forward_hooks or module._forward_pre_hooks  # noqa: SLF001
                or getattr(module, "_forward_hooks_with_kwargs", None)):
            return "it has forward hooks (a graph call of the kernel would skip them)"
        params = dict(module.named_parameters(recurse=False))
        if set(params) - {"weight"}:
            return f"it holds parameters other than weight: {sorted(set(params) - {'weight'})}"
        weight = params.get("weight")
        if weight is not None and weight.dim() != 1:
            return f"its weight is {weight.dim()}-D, not 1-D"
        eps = next((getattr(module, a) for a in EPS_ATTRS
                    if isinstance(getattr(module, a, None), float)), None)
        if eps is None:
            return f"no float eps attribute ({', '.join(EPS_ATTRS)})"
        tensor = meta.get(node.args[0], "tensor")
        if tensor is None:
            return "the input's shape and dtype are unknown"
        if not tensor["dtype"].is_floating_point:
            return f"the input is {tensor['dtype']}"
        dim = tensor["shape"][-1] if tensor["shape"] else None
        if not isinstance(dim, int) or (weight is not None and weight.shape[0] != dim):
            return f"the input's last dim {dim} is not the weight's size"
        if why := vllm_has_rms_norm():
            return why
        return _probe(module, eps, dim, weight is not None)

    def apply(self, ctx: RewriteContext, m: NormMatch) -> None:
        module = ctx.module(m.qualname)
        eps = next(getattr(module, a) for a in EPS_ATTRS
                   if isinstance(getattr(module, a, None), float))
        has_weight = getattr(module, "weight", None) is not None
        target = str(m.site.node.target)

        def swap(graph: fx.Graph, node: fx.Node) -> None:
            with graph.inserting_before(node):
                w = graph.get_attr(f"{target}.weight") if has_weight else None
                new = graph.call_function(rms_norm, (node.args[0], w, eps))
            new.meta[meta.KEY] = dict(node.meta.get(meta.KEY, {}))
            meta.info(new)["inserted_by"] = self.name
            node.replace_all_uses_with(new)
            graph.erase_node(node)

        ctx.fix(self.name, m.site, f"{m.site.name}: {target} -> vLLM _C.rms_norm(eps={eps}, "
                                   f"{'weight' if has_weight else 'no weight'})", swap)
