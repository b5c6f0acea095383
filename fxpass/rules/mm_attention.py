"""Rule: an HF tower's SDPA call runs through vLLM's ``MMEncoderAttention``.

vLLM's hand-written towers compute attention with ``MMEncoderAttention``
(``vllm/model_executor/layers/attention/mm_encoder_attention.py``), a CustomOp that picks its
kernel by ``mm_encoder_attn_backend`` (SDPA on the CPU, flash-attention / FlashInfer / ... on
GPUs) and takes q, k, v as ``[batch, seq, heads, head_dim]``. HF's attention modules call
``F.scaled_dot_product_attention`` on ``[batch, heads, seq, head_dim]``; in the traced graph
that is one ``call_function`` node. Each such site becomes, in the graph of the module that
made the call (e.g. ``SiglipAttention``), a call of a new ``MMEncoderAttention`` submodule
(``<module>.attn``, built with the site's heads, head size, scale and kv heads, the layer's
full prefix and the engine's configuration: its ``mm_encoder_attn_backend``): q, k, v are
transposed to vLLM's layout, the output back to HF's.

Only where the semantics are the same (otherwise the call is kept and the report says why):
``is_causal`` a constant False, ``dropout_p`` a constant 0 and the module in eval mode, a
constant ``scale``, heads equal (or ``enable_gqa=True`` with kv heads dividing them), no
other SDPA arguments. The site calls :func:`encoder_attention`, which decides at run time:
no mask (or, for a site with an ``attn_mask`` node, HF's padding mask materialised by the
trace, a mask that masks nothing) runs the layer on the whole batch; a key padding mask (every query row of a
sequence sees the same keys: HF's padding of text, audio frames or image patches) runs the
layer once per distinct number of attended keys on those keys, every query row kept (HF's
padded rows too); any other mask (a 2-D pattern, a sequence that sees no key) runs the very
SDPA call HF made, as does a call under autograd (q, k or v requiring grad: vLLM's op has
no backward of its own). Attention weights
(``output_attentions=True``) make HF take its eager path, which has no SDPA node: nothing
is rewritten there. Under tensor parallelism a site whose q / k / v the tensor-parallel rule
split by heads gets a layer with the heads of one rank (a sharded module traced again later
for another call keeps HF's call there, resharded).

Under torch.compile (``compile_mm_encoder``, ``fxpass.runtime.compiled``) the run-time
decision is one custom op, ``fxpass::encoder_attention``, which finds its layer by a key the
rule gave it: dynamo captures the tower without a graph break at each mask check, and the
compiled tower computes attention as the eager one does.

Layers are added at ``fxpass.apply`` with a trace and at a tower's first call; a graph
traced later only calls a layer already there. Switch it off by name:
``fxpass.apply(..., disable=["mm-attention"])``, the plugin's
``{"fxpass": {"disable": ["mm-attention"]}}`` or ``fxpass.rules.registry.disabled(...)``.
"""

from __future__ import annotations

import dataclasses
import itertools
import numbers
import weakref
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxpass import meta
from fxpass.rules import sdpa_mask
from fxpass.errors import RewriteError
from fxpass.rules.base import Mode, RewriteContext, RuleBase, Site

_SDPA = (F.scaled_dot_product_attention, sdpa_mask.scaled_dot_product_attention)
_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
_KNOWN = set(_ARGS) | {"scale", "enable_gqa"}
ATTR = "attn"  # the new layer's name under the module whose graph made the call

def key_padding(mask: torch.Tensor, batch: int, keys: int) -> torch.Tensor | None:
    """``[batch, keys]`` bool, True where a key is attended, when ``mask`` (SDPA's
    ``attn_mask``: bool, True keeps; or additive, 0 keeps and -inf / the dtype's minimum
    masks) lets every query row of every head of a sequence see the same keys (HF's padding
    masks, of text, audio frames or image patches); None for anything else (a pattern that
    differs by row or head, other additive values)."""
    if mask.dim() != 4 or mask.shape[-1] != keys or mask.shape[0] not in (1, batch):
        return None
    if mask.dtype == torch.bool:
        keep = mask
    elif mask.is_floating_point():
        keep = mask == 0
        if not bool((keep | (mask <= torch.finfo(mask.dtype).min / 2)).all()):
            return None
    else:
        return None
    row = keep[:, :1, :1, :]
    if not bool((keep == row).all()):  # the same keys for every head and query row
        return None
    return row[:, 0, 0, :].expand(batch, keys)


def encoder_attention(attn: nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attn_mask: torch.Tensor | None = None,
                      **sdpa_kwargs: Any) -> torch.Tensor:
    """SDPA on HF's ``[b, h, s, d]`` through ``attn`` (an ``MMEncoderAttention``) when
    ``attn_mask`` masks nothing, or masks keys only (:func:`key_padding`): then once per
    distinct number of attended keys, on those keys (a masked key adds exactly nothing to
    SDPA's softmax), every query row kept. Else the very SDPA call HF made (``sdpa_kwargs``:
    its ``dropout_p``, ``is_causal``, ``scale``, ``enable_gqa``), also under autograd: vLLM's
    op has no backward of its own (torch's deprecated fallback differentiates it today)."""
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad
                                    or value.requires_grad):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask,
                                              **sdpa_kwargs)
    if torch.compiler.is_compiling():  # the checks below look at data: one opaque op
        return torch.ops.fxpass.encoder_attention(
            query, key, value, attn_mask, _op_key(attn), sdpa_kwargs.get("scale"),
            bool(sdpa_kwargs.get("enable_gqa", False)))
    if attn_mask is None or sdpa_mask.masks_nothing(attn_mask):
        return _run(attn, query, key, value)
    keep = key_padding(attn_mask, query.shape[0], key.shape[-2])
    counts = keep.sum(-1) if keep is not None else None
    if counts is None or bool((counts == 0).any()):  # not key padding; or a row sees no key
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask,
                                              **sdpa_kwargs)
    positions = torch.arange(key.shape[-2], device=keep.device)
    out = None
    sizes = counts.tolist()
    for n in sorted(set(sizes)):
        rows = [i for i, c in enumerate(sizes) if c == n]
        every = len(rows) == len(sizes)
        idx = torch.tensor(rows, device=query.device)
        kept = keep if every else keep[idx]
        if bool((kept == (positions < n)).all()):  # the first n keys: a slice, no copy
            k, v = key[..., :n, :], value[..., :n, :]
            if not every:
                k, v = k[idx], v[idx]
            part = _run(attn, query if every else query[idx], k, v)
        else:  # gathered straight into vLLM's [b, s, h, d]
            cols = kept.nonzero()[:, 1].view(len(rows), n)
            r = idx[:, None]
            q = query if every else query[idx]
            part = attn(q.transpose(1, 2), key[r, :, cols], value[r, :, cols]).transpose(1, 2)
        if every:
            return part
        if out is None:
            out = part.new_empty(query.shape[:-1] + part.shape[-1:])
        out[idx] = part
    return out


# Under torch.compile: the layers by key (a string an op can take), and the op that runs
# encoder_attention as one step, so dynamo captures a tower without breaking its graph
# at each mask check (the layers hold no weights: a copy of a tower may call its original's)
_LAYERS: "weakref.WeakValueDictionary[str, nn.Module]" = weakref.WeakValueDictionary()
_keys = itertools.count()
_KEY = "_fxpass_op_key"


def _op_key(attn: nn.Module) -> str:
    key = getattr(attn, _KEY, None)
    if key is None:
        raise RewriteError(f"{type(attn).__name__} {getattr(attn, 'layer_name', '')!r} was "
                           "not built by the mm-attention rule; it has no op key")
    return key


def register(attn: nn.Module, prefix: str) -> None:
    """Give a layer the key the compiled op finds it by."""
    key = f"{prefix}#{next(_keys)}"
    setattr(attn, _KEY, key)
    _LAYERS[key] = attn


@torch.library.custom_op("fxpass::encoder_attention", mutates_args=())
def _attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attn_mask: torch.Tensor | None, layer: str, scale: float | None,
                  enable_gqa: bool) -> torch.Tensor:
    attn = _LAYERS.get(layer)
    if attn is None:
        raise RuntimeError(f"fxpass: the attention layer {layer!r} a compiled tower calls is "
                           "gone (its tower was freed); compile the tower again")
    kwargs: dict[str, Any] = {} if scale is None else {"scale": scale}
    if enable_gqa:
        kwargs["enable_gqa"] = True
    out = encoder_attention(attn, query, key, value, attn_mask, **kwargs)
    # one layout whatever path ran: heads-major strides over [b, s, h, d] memory, as vLLM's
    # layer returns it (HF transposes back to [b, s, h, d] next: then a view)
    return out if out.transpose(1, 2).is_contiguous() else (
        out.transpose(1, 2).contiguous().transpose(1, 2))


@_attention_op.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
      attn_mask: torch.Tensor | None, layer: str, scale: float | None,
      enable_gqa: bool) -> torch.Tensor:
    b, h, s, _ = query.shape
    return query.new_empty((b, s, h, value.shape[-1])).transpose(1, 2)


def _run(attn: nn.Module, query: torch.Tensor, key: torch.Tensor,
         value: torch.Tensor) -> torch.Tensor:
    out = attn(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
    return out.transpose(1, 2)


@dataclasses.dataclass
class AttentionSite:
    site: Site
    args: dict[str, Any]  # SDPA's arguments by name (nodes or constants)


def _bound(node: fx.Node) -> dict[str, Any]:
    named = dict(zip(_ARGS, node.args))
    named.update(node.kwargs)
    return named


def _shape(x: Any) -> tuple[int, ...] | None:
    if not isinstance(x, fx.Node):
        return None
    t = meta.get(x, "tensor")
    return tuple(t["shape"]) if t and "shape" in t else None


_ADDS = (Mode.APPLY, Mode.FIRST_CALL)  # sessions whose caller installs ctx.added


class MMEncoderAttentionRule(RuleBase):
    name = "mm-attention"
    after = ("sdpa-mask", "tensor-parallel")

    def describe(self, ctx: RewriteContext, m: AttentionSite) -> str:
        q = m.site.graph.qualname
        return f"{ctx.full_name(q) if q else ctx.prefix or '<root>'}: {m.site.name}"

    def match(self, ctx: RewriteContext) -> list[AttentionSite]:
        out = []
        for mg in ctx.graphs():
            for node in mg.nodes_of("call_function"):
                if node.target in _SDPA:
                    m = AttentionSite(Site(mg, node), _bound(node))
                    # a re-specialised graph cannot add a layer: only sites with one in place
                    if ctx.mode in _ADDS or self._existing(ctx, m) is not None:
                        out.append(m)
        return out

    def _params(self, ctx: RewriteContext, m: AttentionSite) -> tuple[int, int, Any, int]:
        """(heads, head size, scale, kv heads) of one rank."""
        (_, heads, _, head) = _shape(m.args["query"])
        kv = _shape(m.args["key"])[1]
        if self._split(ctx, m) == 1:
            heads, kv = heads // ctx.tp, kv // ctx.tp
        return heads, head, m.args.get("scale"), kv

    def _split(self, ctx: RewriteContext, m: AttentionSite) -> Any:
        """How the tensor-parallel rule split q, k, v here: None (replicated), one dim for all
        three, or a tuple when they differ."""
        if ctx.tp == 1:
            return None
        q = m.site.graph.qualname
        dims = {ctx.tp_split.get((q, x.name)) if isinstance(x, fx.Node) else None
                for x in (m.args.get("query"), m.args.get("key"), m.args.get("value"))}
        return dims.pop() if len(dims) == 1 else tuple(sorted(dims, key=str))

    def _existing(self, ctx: RewriteContext, m: AttentionSite) -> str | None:
        """The name (in the graph's module) of an MMEncoderAttention that an earlier session
        put there for this site, built with the site's parameters; None if there is none."""
        if any(len(_shape(m.args.get(k)) or ()) != 4 for k in ("query", "key")):
            return None
        if self._split(ctx, m) not in (None, 1):
            return None
        q = m.site.graph.qualname
        heads, head, scale, kv = self._params(ctx, m)
        for i in range(100):
            attr = ATTR if i == 0 else f"{ATTR}_{i}"
            layer = ctx.modules.get(f"{q}.{attr}" if q else attr)
            if layer is None:
                return None
            if (type(layer).__name__ == "MMEncoderAttention"
                    and (layer.num_heads, layer.head_size, layer.num_kv_heads) == (heads, head, kv)
                    and layer.scale == (1.0 / head ** 0.5 if scale is None else scale)):
                return attr
        return None

    def check(self, ctx: RewriteContext, m: AttentionSite) -> str | None:
        node, a = m.site.node, m.args
        call = node.format_node()
        extra = sorted(set(a) - _KNOWN)
        if extra:
            return f"{call}: SDPA arguments {extra} that MMEncoderAttention does not take"
        causal = a.get("is_causal", False)
        if causal is not False:
            return (f"{call}: is_causal is {causal}, not a constant False "
                    "(MMEncoderAttention is bidirectional)")
        owner = ctx.module(m.site.graph.qualname)
        if owner.training or ctx.model.training:
            return (f"{call}: {type(owner).__name__} is in training mode (dropout, autograd); "
                    "MMEncoderAttention is inference-only")
        dropout = a.get("dropout_p", 0.0)
        if not isinstance(dropout, numbers.Real) or dropout != 0:
            return f"{call}: dropout_p is {dropout}, not a constant 0"
        scale = a.get("scale")
        if scale is not None and not isinstance(scale, numbers.Real):
            return f"{call}: scale {scale} is computed at run time, not a constant"
        shapes = [_shape(a.get(k)) for k in ("query", "key", "value")]
        if any(s is None or len(s) != 4 for s in shapes):
            return f"{call}: q/k/v are not 4-d tensors of known shape ({shapes})"
        (_, heads, _, head), (_, kv, _, khead), (_, vkv, _, vhead) = shapes
        if not (head == khead == vhead and kv == vkv):
            return f"{call}: q/k/v head sizes or k/v heads differ ({shapes})"
        gqa = a.get("enable_gqa", False)
        if gqa not in (True, False):
            return f"{call}: enable_gqa {gqa} is not a constant"
        if kv != heads and not (gqa and heads % kv == 0):
            return f"{call}: {heads} query heads and {kv} kv heads without enable_gqa"
        split = self._split(ctx, m)
        if split not in (None, 1):
            return (f"{call}: the tensor-parallel rule split q / k / v along dims {split}, "
                    "not all three by heads (dim 1)")
        if split == 1 and (heads % ctx.tp or kv % ctx.tp):
            return f"{call}: {heads} heads / {kv} kv heads do not divide over tp={ctx.tp}"
        mask = a.get("attn_mask")
        if mask is not None and not isinstance(mask, fx.Node):
            return f"{call}: attn_mask {mask!r} is a constant"
        if ctx.mode in _ADDS and self._existing(ctx, m) is None and self._attr(ctx, m) is None:
            return f"{call}: {m.site.graph.qualname or '<root>'} has no free name for the layer"
        return None

    def _attr(self, ctx: RewriteContext, m: AttentionSite) -> str | None:
        """The new layer's name in the graph's module: ``attn``, else ``attn_<i>``."""
        q = m.site.graph.qualname
        owner = ctx.module(q)
        for i in range(100):
            attr = ATTR if i == 0 else f"{ATTR}_{i}"
            full = f"{q}.{attr}" if q else attr
            planned = ctx.added.get(full)
            if planned is not None and getattr(planned, "_fxpass_site", None) == m.site.name:
                return attr
            if planned is None and not hasattr(owner, attr):
                return attr
        return None

    def apply(self, ctx: RewriteContext, m: AttentionSite) -> None:
        a = m.args
        q = m.site.graph.qualname
        params = self._params(ctx, m)
        attr = self._existing(ctx, m)
        if attr is None:  # check() made sure a session that adds layers finds a name
            attr = self._attr(ctx, m)
            if attr is None:
                raise RewriteError(f"{self.describe(ctx, m)}: no free name for the layer")
            qualname = f"{q}.{attr}" if q else attr
            if qualname not in ctx.added:
                ctx.added[qualname] = self._build(ctx, m, qualname, *params)
        qualname = f"{q}.{attr}" if q else attr
        masked = isinstance(a.get("attn_mask"), fx.Node)
        rest = {k: a[k] for k in ("dropout_p", "is_causal", "scale", "enable_gqa") if k in a}
        self._edit(ctx, m, attr, qualname, masked, rest, params)

    def _build(self, ctx: RewriteContext, m: AttentionSite, qualname: str, heads: int,
               head: int, scale: float | None, kv: int) -> nn.Module:
        """The layer, built under the engine's configuration when apply ran inside one (its
        ``mm_encoder_attn_backend``), in the dtype of the site's query, on its module's
        device."""
        from fxpass.vllm_context import engine_config_scope

        info = meta.get(m.args["query"], "tensor") or {}
        dtype = info.get("dtype", torch.get_default_dtype())
        with engine_config_scope(ctx.options.vllm_config):
            from vllm.model_executor.layers.attention.mm_encoder_attention import (
                MMEncoderAttention,
            )

            previous = torch.get_default_dtype()
            torch.set_default_dtype(dtype)  # the layer reads its dtype from the default
            try:
                layer = MMEncoderAttention(heads, head, scale=scale, num_kv_heads=kv,
                                           prefix=ctx.full_name(qualname))
            finally:
                torch.set_default_dtype(previous)
        owner = ctx.module(m.site.graph.qualname)
        where = next(iter(owner.parameters()), None)
        if where is not None and where.device.type != "meta":
            layer.to(where.device)  # its buffers (fp8 scales), beside the module's weights
        layer._fxpass_site = m.site.name  # noqa: SLF001 - which site the layer serves
        register(layer, ctx.full_name(qualname))
        return layer

    def _edit(self, ctx: RewriteContext, m: AttentionSite, attr: str, qualname: str,
              masked: bool, rest: dict[str, Any], params: tuple[Any, ...]) -> None:
        heads, head, scale, kv = params
        layer = ctx.added.get(qualname) or ctx.modules.get(qualname)
        backend = getattr(getattr(layer, "attn_backend", None), "name", "?")

        def edit(graph: fx.Graph, node: fx.Node) -> None:
            b = _bound(node)
            qkv = [b["query"], b["key"], b["value"]]
            with graph.inserting_before(node):
                mod = graph.get_attr(attr)
                new = graph.call_function(
                    encoder_attention, (mod, *qkv, b["attn_mask"] if masked else None), rest)
                meta.info(new)["rewrite"] = {
                    "rule": self.name, "layer": "MMEncoderAttention",
                    "prefix": ctx.full_name(qualname), "backend": backend}
            if info := meta.get(node, "tensor"):
                meta.info(new)["tensor"] = {**info, "contiguous": False}
            meta.info(new)["inserted_by"] = self.name
            node.replace_all_uses_with(new)
            graph.erase_node(node)

        how = ("through encoder_attention (the layer when the mask masks nothing or masks "
               "keys only; the original SDPA for any other mask or under autograd)" if masked
               else "through encoder_attention (the layer; the original SDPA under autograd)")
        note = (f"{m.site.name}: MMEncoderAttention {attr}(heads={heads}, head_size={head}, "
                f"scale={scale}, kv_heads={kv}) {how}")
        ctx.fix(self.name, m.site, note, edit)


__all__ = ["ATTR", "MMEncoderAttentionRule", "encoder_attention", "key_padding"]
