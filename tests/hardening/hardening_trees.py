"""Generated module trees in the styles of HF modelling code, for the hypothesis suite.

A tree is described by a *spec*: nested tuples drawn by :func:`specs`, turned into modules by
:func:`build`. Every module here is ordinary eager PyTorch with real Python in its forward
(``if self.config.flag``, ``for layer in self.layers``, ``b, n, d = x.shape``,
``x.to(self.proj.weight.dtype)``, ``if x.mean() > 0``, kwargs-only signatures, ...), so the
tracer meets what it meets in HF code, not an fx-friendly imitation.

All blocks map ``(B, N, D) -> (B, N, D)``; dims are tiny so hundreds of trees run in seconds.

Kinds and what they exercise (``PLAIN`` kinds have no direct weight / layout reads and may sit
where code runs that fxpass may never see: a data-dependent branch's arms, and under a module
that stays Python (``patched``), whose ``if x.shape...`` is not guarded; see
``test_hypothesis_trees.py``):

=========  ======================================================================
lin        a bare ``nn.Linear`` child (with/without bias)
linsub     an ``nn.Linear`` subclass whose ``forward`` adds code (``* alpha``)
hook       an ``nn.Linear`` carrying a forward hook
wrap       Gemma4ClippableLinear-like wrapper (config clamp; ``linear(input=x)``: not plain)
mlp        fc1 -> act (a plain function attribute) -> fc2
seq        ``nn.ModuleList`` loop, residual chosen by a config dataclass
qkv        q/k/v siblings reading one input, then o_proj
heads      ``b, n, d = x.shape``; view into heads; transpose; buffer; reshape back
tpose      child called on ``x.transpose(0, 1)`` (non-contiguous, last dim dense)
star       ``*lead, d = x.shape``; child on ``x.reshape(1, -1, d)``; ``reshape(*lead, d)``
cfg        ``if self.config.flag`` branch between two children
shape      ``if x.shape[axis] > self.threshold`` branch on the sequence or the batch (guarded;
           logged in DECISIONS)
split      per-segment child calls, segment sizes read from tensor data
           (``torch.split(x, counts[counts > 0].tolist(), dim=1)``: a data-sized list)
renamed    caller uses the keyword a ``functools.wraps`` decorator renames (``hidden_state=``)
defaults   caller omits, spells out or passes positionally the callee's defaulted arguments
data       ``if x[..., 0].mean() > 0`` branch: the module stays Python
ops        an interpreter: ``for op in self.ops: if op == ...`` over a generated op list
kwonly     caller of a block whose forward is ``(self, *, hidden_states, scale)``
norm       ``nn.LayerNorm``
wattr      reads ``proj.weight.dtype/.shape/.size()``, ``torch.finfo``, ``out_features``
flin       ``F.linear(x, proj.weight, proj.bias)``, ``+ proj(x)``, ``x @ proj.weight.T``
tied       two linears sharing one weight
shared     one ``nn.Linear`` object registered under two names
chan2d     2-D channels-first detour: the linear's input is ``h.t()`` (stride(-1) != 1)
strided    the linear's input is ``cat(...)[..., ::2]`` (stride(-1) == 2)
pydata     Python module (data-dependent) that reads its linear's attributes directly
pyT        Python module (data-dependent) feeding its linear a 2-D transposed input
patched    accelerate-style instance ``forward`` (``functools.partial``) around a child
=========  ======================================================================
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

# Outcomes of every `shape` branch, in call order: the test compares the reference model's
# decisions on two inputs to know whether a GuardError is the documented answer.
DECISIONS: list[tuple[int, bool]] = []

ACTS = {"gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


@dataclasses.dataclass
class Cfg:
    flag: bool = True
    residual: bool = False


# ------------------------------------------------------------------------------ blocks


class ScaledLinear(nn.Linear):
    """A linear subclass with its own forward (LoRA-style scaling)."""

    def __init__(self, d: int, bias: bool, alpha: float) -> None:
        super().__init__(d, d, bias=bias)
        self.alpha = alpha

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input) * self.alpha


class Drop(nn.Module):
    """Dropout read off plain state (``self.p``, ``self.training``), as HF attention does."""

    def __init__(self, d: int, bias: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d, bias=bias)
        self.p = 0.0

    def forward(self, x):
        return F.dropout(self.lin(x), p=self.p, training=self.training)


class Clippable(nn.Module):
    def __init__(self, d: int, bias: bool, clip: bool, kw: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(d, d, bias=bias)
        self.use_clip = clip
        self.kw_call = kw
        self.min_val, self.max_val = -1.5, 1.5

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.use_clip:
            hidden_states = torch.clamp(hidden_states, self.min_val, self.max_val)
        if self.kw_call:
            out = self.linear(input=hidden_states)
        else:
            out = self.linear(hidden_states)
        if self.use_clip:
            out = torch.clamp(out, self.min_val, self.max_val)
        return out


class MLP(nn.Module):
    def __init__(self, d: int, bias: bool, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d, bias=bias)
        self.fc2 = nn.Linear(2 * d, d, bias=bias)
        self.act_fn = ACTS[act]  # a plain function attribute, as many HF models keep it

    def forward(self, x):
        return self.fc2(self.act_fn(self.fc1(x)))


class Seq(nn.Module):
    def __init__(self, layers: list[nn.Module], residual: bool) -> None:
        super().__init__()
        self.config = Cfg(residual=residual)
        self.layers = nn.ModuleList(layers)

    def forward(self, hidden_states):
        for idx, layer in enumerate(self.layers):
            out = layer(hidden_states)
            if self.config.residual:
                hidden_states = hidden_states + out / (idx + 1)
            else:
                hidden_states = out
        return hidden_states


class QKV(nn.Module):
    def __init__(self, d: int, bias: bool) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.k_proj = nn.Linear(d, d, bias=bias)
        self.v_proj = nn.Linear(d, d, bias=bias)
        self.o_proj = nn.Linear(d, d, bias=not bias)
        self.scale = d ** -0.5

    def forward(self, hidden_states):
        bsz, seq, _ = hidden_states.size()
        q = self.q_proj(hidden_states)
        k = self.k_proj(hidden_states)
        v = self.v_proj(hidden_states)
        attn = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        assert attn.shape == (bsz, seq, seq)
        attn = attn.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        return self.o_proj(torch.matmul(attn, v))


class Heads(nn.Module):
    def __init__(self, d: int, inner: nn.Module, heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.inner = inner
        self.register_buffer("head_scale", torch.linspace(0.5, 1.5, heads))

    def forward(self, x):
        b, n, d = x.shape
        h = x.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)
        h = h * self.head_scale.view(1, -1, 1, 1)
        h = h.transpose(1, 2).reshape(b, n, d)
        return self.inner(h)


class Transposed(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.transpose(0, 1)).transpose(0, 1)


class Star(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        *lead, d = x.shape
        y = self.inner(x.reshape(1, -1, d))
        return y.reshape(*lead, d)


class ConfigBranch(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module, flag: bool) -> None:
        super().__init__()
        self.config = Cfg(flag=flag)
        self.a, self.b = a, b

    def forward(self, x):
        if self.config.flag:
            return self.a(x)
        return self.b(x)


class ShapeBranch(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module, threshold: int, tag: int,
                 axis: int = 1) -> None:
        super().__init__()
        self.threshold = threshold
        self.tag = tag
        self.axis = axis
        self.a, self.b = a, b

    def forward(self, x):
        take_a = x.shape[self.axis] > self.threshold
        DECISIONS.append((self.tag, bool(take_a)))
        if take_a:
            return self.a(x)
        return self.b(x) * 0.5


class DataBranch(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        if x[..., 0].mean() > 0:  # (not x.mean(): after a layer norm that is ~1e-8)
            return self.a(x)
        return -self.b(-x)


class DataSplit(nn.Module):
    """Per-segment calls of a child, with segment sizes read from tensor data (packed images
    whose per-image lengths come from a grid tensor)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        col = x[0, :, 0]
        counts = torch.bincount((col > 0).long() + (col > 0.5).long(), minlength=3)
        sizes = counts[counts > 0].tolist()
        return torch.cat([self.inner(p) for p in torch.split(x, sizes, dim=1)], dim=1)


def renames(old: str, new: str):
    """A keyword-renaming decorator in the style of HF's ``deprecate_kwarg``."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(self, *args, **kwargs):
            if old in kwargs:
                kwargs[new] = kwargs.pop(old)
            return fn(self, *args, **kwargs)

        return wrapper

    return deco


class RenamedBlock(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    @renames("hidden_state", "hidden_states")
    def forward(self, hidden_states, scale: float = 1.0):
        return self.inner(hidden_states) * scale


class RenamedCaller(nn.Module):
    def __init__(self, inner: nn.Module, form: str) -> None:
        super().__init__()
        self.block = RenamedBlock(inner)
        self.form = form

    def forward(self, x):
        if self.form == "old":
            return self.block(hidden_state=x)
        if self.form == "new":
            return self.block(hidden_states=x, scale=1.0)
        return self.block(x)


class DefaultsBlock(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x, scale=None, negate: bool = False):
        out = self.inner(x)
        if scale is not None:
            out = out * scale
        return -out if negate else out


class DefaultsCaller(nn.Module):
    def __init__(self, inner: nn.Module, form: str) -> None:
        super().__init__()
        self.block = DefaultsBlock(inner)
        self.form = form

    def forward(self, x):
        if self.form == "omit":
            return self.block(x)
        if self.form == "explicit":
            return self.block(x, scale=None, negate=False)
        return self.block(x, None, False)


class Interp(nn.Module):
    """An op-list interpreter: Python dispatch on plain attributes, as config-heavy HF code."""

    def __init__(self, d: int, ops: tuple[str, ...], bias: bool) -> None:
        super().__init__()
        self.ops = ops
        self.lin = nn.Linear(d, d, bias=bias)
        self.norm = nn.LayerNorm(d)
        self.gain = 0.7

    def forward(self, x):
        for op in self.ops:
            if op == "lin":
                x = self.lin(x)
            elif op == "res":
                x = x + self.lin(x)
            elif op == "gelu":
                x = F.gelu(x)
            elif op == "norm":
                x = self.norm(x)
            elif op == "fnorm":
                x = F.layer_norm(x, x.shape[-1:])
            elif op == "scale":
                x = x * self.gain
            elif op == "swap":
                a, b = x.chunk(2, dim=-1)
                x = torch.cat([b, a], dim=-1)
            elif op == "loop":
                for dim in range(len(x.shape) - 1):
                    x = x - 0.1 * x.mean(dim=dim, keepdim=True)
            elif op == "setitem":
                x = x.clone()
                x[:, 0] = x[:, 0] * 2
            else:
                raise ValueError(op)
        return x


class KwOnlyBlock(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *, hidden_states, scale=1.0, output_attentions=False):
        out = self.inner(hidden_states) * scale
        if output_attentions:
            return out, None
        return out


class KwCaller(nn.Module):
    def __init__(self, inner: nn.Module, scale: float) -> None:
        super().__init__()
        self.block = KwOnlyBlock(inner)
        self.scale = scale

    def forward(self, x):
        return self.block(hidden_states=x, scale=self.scale, output_attentions=False)


class WeightAttr(nn.Module):
    def __init__(self, d: int, bias: bool, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.proj = nn.Linear(d, d, bias=bias)

    def forward(self, x):
        if self.kind == "dtype":
            return self.proj(x.to(self.proj.weight.dtype))
        if self.kind == "finfo":
            big = torch.finfo(self.proj.weight.dtype).max
            return torch.clamp(self.proj(x), min=-big, max=big)
        if self.kind == "shape":
            out_dim = self.proj.weight.shape[0]
            return self.proj(x).view(*x.shape[:-1], out_dim)
        if self.kind == "size":
            assert self.proj.weight.size(1) == x.shape[-1]
            return self.proj(x).reshape(x.shape[0], -1, self.proj.weight.size(0))
        if self.kind == "feat":
            return self.proj(x)[..., : self.proj.out_features]
        raise ValueError(self.kind)


class FLinear(nn.Module):
    def __init__(self, d: int, bias: bool, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.proj = nn.Linear(d, d, bias=bias)

    def forward(self, x):
        if self.mode == "pure":
            return F.linear(x, self.proj.weight, self.proj.bias)
        if self.mode == "mix":
            return F.linear(x, self.proj.weight) + self.proj(x)
        return x @ self.proj.weight.T


class Tied(nn.Module):
    def __init__(self, d: int, bias: bool) -> None:
        super().__init__()
        self.a = nn.Linear(d, d, bias=bias)
        self.b = nn.Linear(d, d, bias=bias)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class Shared(nn.Module):
    def __init__(self, d: int, bias: bool) -> None:
        super().__init__()
        self.a = nn.Linear(d, d, bias=bias)
        self.b = self.a

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class Chan2d(nn.Module):
    """Channels-first detour on 2-D rows (HF lconv style): the linear sees ``h.t()``."""

    def __init__(self, d: int, bias: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d, bias=bias)
        self.register_buffer("gain", torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        b, n, d = x.shape
        h = x.reshape(b * n, d).t()
        h = h * self.gain[:, None]
        return self.proj(h.t()).view(b, n, -1)


class Strided(nn.Module):
    def __init__(self, d: int, bias: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d, bias=bias)

    def forward(self, x):
        both = torch.stack([x, -x], dim=-1).flatten(-2)
        return self.proj(both[..., ::2])


class PyData(nn.Module):
    """Stays Python (data-dependent), and reads its linear's attributes itself."""

    def __init__(self, d: int, bias: bool, read: str) -> None:
        super().__init__()
        self.read = read
        self.proj = nn.Linear(d, d, bias=bias)

    def forward(self, x):
        if self.read == "dtype":
            x = x.to(self.proj.weight.dtype)
            n = x.shape[-1]
        elif self.read == "shape":
            n = self.proj.weight.shape[0]
        else:
            n = self.proj.out_features
        if bool((x > 10).any()):  # a data-dependent shortcut, never taken on these inputs
            return x
        return self.proj(x)[..., :n]


class PyTransposed(nn.Module):
    """Stays Python (data-dependent) and hands its linear a 2-D transposed input."""

    def __init__(self, d: int, bias: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d, bias=bias)

    def forward(self, x):
        if bool((x > 10).any()):
            return x
        b, n, d = x.shape
        cols = x.reshape(b * n, d).t().contiguous()
        return self.proj(cols.t()).view(b, n, -1)


@dataclasses.dataclass
class Output:
    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None = None


class Root(nn.Module):
    def __init__(self, body: nn.Module, out: str) -> None:
        super().__init__()
        self.body = body
        self.out = out

    def forward(self, x):
        h = self.body(x)
        if self.out == "tuple":
            return h, h.mean(dim=1)
        if self.out == "dataclass":
            return Output(last_hidden_state=h, pooler_output=h[:, 0])
        return h


class KwRoot(Root):
    def forward(self, *, pixel_values, output_hidden_states=False):
        h = self.body(pixel_values)
        if output_hidden_states:
            return h, (pixel_values, h)
        return Output(last_hidden_state=h) if self.out == "dataclass" else h


def _hooked_forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return module._old_forward(*args, **kwargs) * 0.5


def patch_forward(module: nn.Module) -> nn.Module:
    """What accelerate's ``add_hook_to_module`` does: an instance ``forward`` wrapping the old."""
    if "_old_forward" in vars(module):  # already hooked: accelerate keeps one _old_forward too
        return module
    module._old_forward = module.forward
    module.forward = functools.update_wrapper(functools.partial(_hooked_forward, module),
                                              module._old_forward)
    return module


# ------------------------------------------------------------------------------ specs

BIAS = st.booleans()
PLAIN_LEAVES = st.one_of(
    st.tuples(st.just("lin"), BIAS),
    st.tuples(st.just("linsub"), BIAS, st.sampled_from([0.5, 2.0])),
    st.tuples(st.just("hook"), BIAS),
    st.tuples(st.just("wrap"), BIAS, st.booleans(), st.just(False)),
    st.tuples(st.just("mlp"), BIAS, st.sampled_from(sorted(ACTS))),
    st.tuples(st.just("qkv"), BIAS),
    st.tuples(st.just("norm")),
    st.tuples(st.just("drop"), BIAS),
    st.tuples(st.just("tied"), BIAS),
    st.tuples(st.just("shared"), BIAS),
    st.tuples(st.just("ops"),
              st.lists(st.sampled_from(["lin", "res", "gelu", "norm", "fnorm", "scale", "swap",
                                        "loop", "setitem"]), min_size=1, max_size=4).map(tuple),
              BIAS),
)
READING_LEAVES = st.one_of(
    st.tuples(st.just("wrap"), BIAS, st.booleans(), st.just(True)),
    st.tuples(st.just("wattr"), BIAS, st.sampled_from(["dtype", "finfo", "shape", "size", "feat"])),
    st.tuples(st.just("flin"), BIAS, st.sampled_from(["pure", "mix", "T"])),
    st.tuples(st.just("chan2d"), BIAS),
    st.tuples(st.just("strided"), BIAS),
    st.tuples(st.just("pydata"), BIAS, st.sampled_from(["dtype", "shape", "feat"])),
    st.tuples(st.just("pyT"), BIAS),
)


def _extend(children: st.SearchStrategy, plain: st.SearchStrategy | None) -> st.SearchStrategy:
    arms = plain if plain is not None else children
    return st.one_of(
        st.tuples(st.just("seq"), st.lists(children, min_size=1, max_size=3).map(tuple),
                  st.booleans()),
        st.tuples(st.just("heads"), children, st.sampled_from([1, 2])),
        st.tuples(st.just("tpose"), children),
        st.tuples(st.just("star"), children),
        st.tuples(st.just("cfg"), children, children, st.booleans()),
        # a shape branch's untaken arm runs for the first time after apply: drawn like a data
        # branch's arms (see the known limit in test_hypothesis_trees.py)
        st.tuples(st.just("shape"), arms, arms, st.sampled_from([2, 4])),
        st.tuples(st.just("shape"), arms, arms, st.just(1), st.just(0)),  # on batch
        st.tuples(st.just("split"), children),
        st.tuples(st.just("renamed"), children, st.sampled_from(["old", "new", "pos"])),
        st.tuples(st.just("defaults"), children, st.sampled_from(["omit", "explicit", "pos"])),
        st.tuples(st.just("data"), arms, arms),
        st.tuples(st.just("kwonly"), children, st.sampled_from([1.0, 0.5])),
        # stays Python (not traced): what it wraps is drawn like a data branch's arms
        st.tuples(st.just("patched"), arms),
    )


# Arms of a data-dependent branch: no direct weight / layout reads anywhere below.
plain_trees = st.recursive(PLAIN_LEAVES, lambda c: _extend(c, None), max_leaves=4)


def specs() -> st.SearchStrategy:
    leaves = st.one_of(PLAIN_LEAVES, READING_LEAVES)
    body = st.recursive(leaves, lambda c: _extend(c, plain_trees), max_leaves=6)
    return st.tuples(body, st.sampled_from(["tensor", "tuple", "dataclass"]), st.booleans())


_tags = iter(range(1 << 62))


def build_block(spec: tuple[Any, ...], d: int) -> nn.Module:
    kind, *a = spec
    if kind == "lin":
        return nn.Linear(d, d, bias=a[0])
    if kind == "linsub":
        return ScaledLinear(d, a[0], a[1])
    if kind == "hook":
        lin = nn.Linear(d, d, bias=a[0])
        lin.register_forward_hook(lambda mod, inp, out: out * 0.5)
        return lin
    if kind == "wrap":
        return Clippable(d, *a)
    if kind == "mlp":
        return MLP(d, *a)
    if kind == "qkv":
        return QKV(d, a[0])
    if kind == "norm":
        return nn.LayerNorm(d)
    if kind == "drop":
        return Drop(d, a[0])
    if kind == "tied":
        return Tied(d, a[0])
    if kind == "shared":
        return Shared(d, a[0])
    if kind == "ops":
        return Interp(d, a[0], a[1])
    if kind == "wattr":
        return WeightAttr(d, a[0], a[1])
    if kind == "flin":
        return FLinear(d, a[0], a[1])
    if kind == "chan2d":
        return Chan2d(d, a[0])
    if kind == "strided":
        return Strided(d, a[0])
    if kind == "pydata":
        return PyData(d, a[0], a[1])
    if kind == "pyT":
        return PyTransposed(d, a[0])
    if kind == "seq":
        return Seq([build_block(c, d) for c in a[0]], a[1])
    if kind == "heads":
        return Heads(d, build_block(a[0], d), a[1])
    if kind == "tpose":
        return Transposed(build_block(a[0], d))
    if kind == "star":
        return Star(build_block(a[0], d))
    if kind == "cfg":
        return ConfigBranch(build_block(a[0], d), build_block(a[1], d), a[2])
    if kind == "shape":
        return ShapeBranch(build_block(a[0], d), build_block(a[1], d), a[2], next(_tags), *a[3:])
    if kind == "split":
        return DataSplit(build_block(a[0], d))
    if kind == "renamed":
        return RenamedCaller(build_block(a[0], d), a[1])
    if kind == "defaults":
        return DefaultsCaller(build_block(a[0], d), a[1])
    if kind == "data":
        return DataBranch(build_block(a[0], d), build_block(a[1], d))
    if kind == "kwonly":
        return KwCaller(build_block(a[0], d), a[1])
    if kind == "patched":
        return patch_forward(build_block(a[0], d))
    raise ValueError(kind)


def build(spec: tuple[Any, ...], d: int, seed: int) -> nn.Module:
    body, out, kw_root = spec
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        block = build_block(body, d)
        root = (KwRoot if kw_root else Root)(block, out)
        for p in root.parameters():  # larger than default init: errors must not hide in noise
            with torch.no_grad():
                p.uniform_(-1.0, 1.0).mul_(1.0 / math.sqrt(d))
    return root.eval()


def call(model: nn.Module, x: torch.Tensor, kw_root: bool) -> Any:
    return model(pixel_values=x) if kw_root else model(x)


def example_inputs(x: torch.Tensor, kw_root: bool) -> Any:
    return {"pixel_values": x} if kw_root else (x,)


def tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Output):
        return [t for t in (out.last_hidden_state, out.pooler_output) if t is not None]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in tensors(o)]
    raise TypeError(type(out))


# ------------------------------------------------------------------------------ state knobs

# Plain state a forward reads, and what a user may set it to after apply. ``kw_call`` is left
# out: a linear called by keyword only after apply is the documented known limit above.
_OUTS = ("tensor", "tuple", "dataclass")
_FORMS = {RenamedCaller: ("old", "new", "pos"), DefaultsCaller: ("omit", "explicit", "pos")}


def knobs(model: nn.Module) -> list[tuple[str, str, tuple[Any, ...]]]:
    """``(module path, attribute chain, values)`` a user could set between calls: training
    mode, plain attributes (bools, floats, forms), dropout rates and config-object fields."""
    out: list[tuple[str, str, tuple[Any, ...]]] = []
    for path, m in model.named_modules():
        out.append((path, "training", (True, False)))
        for k, v in vars(m).items():
            if k.startswith("_") or k in ("training", "kw_call"):
                continue
            if isinstance(v, bool):
                out.append((path, k, (True, False)))
            elif k == "p" and isinstance(m, Drop):
                out.append((path, k, (0.0, 0.5)))
            elif isinstance(v, float):
                out.append((path, k, (v, v * 1.5, -v)))
            elif k == "form":
                out.append((path, k, _FORMS[type(m)]))
            elif k == "out":
                out.append((path, k, _OUTS))
            elif isinstance(v, Cfg):
                for f in dataclasses.fields(v):
                    out.append((path, f"{k}.{f.name}", (True, False)))
                out.append((path, f"{k}=", (True, False)))  # a new config object
    return out


def set_knob(model: nn.Module, path: str, chain: str, value: Any) -> None:
    """Set a knob as a user would: ``.train()`` / ``.eval()`` for the mode (recursive), an
    attribute in place, or (``config=``) a new config object with one field changed."""
    m = model.get_submodule(path)
    if chain == "training":
        m.train(value)
    elif chain.endswith("="):
        name = chain[:-1]
        old = getattr(m, name)
        setattr(m, name, dataclasses.replace(old, flag=value))
    elif "." in chain:
        name, field = chain.split(".")
        setattr(getattr(m, name), field, value)
    else:
        setattr(m, chain, value)
