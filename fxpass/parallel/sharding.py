"""How a tensor split across tensor-parallel ranks flows through one fx graph.

The tensor-parallel rule (``tensor_parallel.py``) asks one question of a graph: if these
linears produce only their rank's block of output channels (column-parallel), does every op
downstream work on each rank's block alone, and does the block reach the row-parallel linear
as that linear's input block? This module answers it by abstract interpretation over the
traced graph, node by node, with the example shapes the tracer kept (``meta "tensor"``):

* every value is *replicated* (``R``: the same on every rank, as in the unsharded tower), a
  tensor *sharded* along one dim (``S``: rank r holds block r of it), a *per-rank* integer
  (``L``: a size read off a sharded dim, the full value divided by the TP size), a tuple of
  these (``T``), or *rank-dependent* in a way this analysis does not follow (``X``);
* an op whose inputs are all replicated is replicated, whatever it is;
* an op touching a sharded value must be on the whitelist below, with the axis reasoning
  done for it: elementwise ops and broadcasting (a replicated operand must be size 1 along
  the sharded dim), reductions and softmax over other dims, layout ops that move the sharded
  dim, reshapes that keep it leading its group, matmul / SDPA with it as a batch dim, slicing,
  splitting, concatenating and padding along other dims, shape reads;
* anything else touching a sharded value refuses, naming the op (conservative by design);
* graph constants that bake the full size of a sharded dim (``view(b, s, 8, 64)`` with 8
  heads) are recorded, to be rewritten to the per-rank value; a sharded dim whose size does
  not divide by the TP size refuses (vLLM replicates such towers: data parallel).

Submodules are followed into their own traced graphs (an RMSNorm over ``head_dim``, an
activation); a linear reached with a sharded input is reported (``NeedsRow``) so the caller
can make it row-parallel. The example shapes come from one trace: a reshape is matched by
its shapes there, which is how the tracer's graphs are specialised too.
"""

from __future__ import annotations

import builtins
import dataclasses
import math
import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
import torch.utils._pytree as pytree

from fxpass import meta

# ------------------------------------------------------------------------------ values


@dataclasses.dataclass(frozen=True)
class AV:
    """An abstract value: kind R / S / L / T / X (see the module docstring).

    ``dim`` is the sharded dim of an S tensor; ``value`` the full (traced) value of an R or L
    integer when known; ``items`` the members of a T; ``origins`` the column linears an S
    value derives from and ``unit`` how many of its origin's output channels one index of
    the sharded dim holds (1 right after the linear, ``head_dim`` after ``view(.., H, D)``).
    """

    kind: str
    dim: int = -1
    value: Any = None
    items: tuple["AV", ...] = ()
    origins: frozenset[str] = frozenset()
    unit: int | None = 1


REP = AV("R")
RANK_DEPENDENT = AV("X")


def rep(value: Any = None) -> AV:
    return AV("R", value=value)


def is_rep(av: AV) -> bool:
    if av.kind == "T":
        return all(is_rep(i) for i in av.items)
    return av.kind == "R"


def has_sharded(av: AV) -> bool:
    if av.kind == "T":
        return any(has_sharded(i) for i in av.items)
    return av.kind == "S"


class Refuse(Exception):
    """This graph cannot be sharded as asked; the message says which op and why."""


class NeedsRow(Exception):
    """A linear site that is not part of the pair receives a sharded input."""

    def __init__(self, node: str, av: AV) -> None:
        super().__init__(node)
        self.node = node
        self.av = av


@dataclasses.dataclass
class ConstantEdit:
    """A literal in a node's arguments that bakes the full size of a sharded dim."""

    node: str
    path: tuple[Any, ...]  # index path into (args, kwargs): (0, i, ...) args / (1, key, ...)
    old: int
    new: int
    why: str


@dataclasses.dataclass
class Analysis:
    """What propagating sharded values through one graph found."""

    env: dict[str, AV]
    output: AV
    edits: list[ConstantEdit]
    head_units: dict[str, int]  # column site -> channels per index where its dim was split
    # (graph qualname, call_module node, value) for every module call whose output is
    # sharded, in this graph and the submodule graphs entered (verify slices the reference)
    module_outputs: list[tuple[str, str, AV]] = dataclasses.field(default_factory=list)
    # (graph qualname, placeholder, value) where a submodule graph is fed a sharded value
    module_inputs: list[tuple[str, str, AV]] = dataclasses.field(default_factory=list)


def spec(av: AV) -> Any:
    """A JSON-able description of how a value is split: None (replicated), {"dim": d} for a
    tensor sharded along d, {"items": [...]} for a tuple."""
    if av.kind == "S":
        return {"dim": av.dim}
    if av.kind == "T" and has_sharded(av):
        return {"items": [spec(i) for i in av.items]}
    return None


# ------------------------------------------------------------------------------ helpers


def _shape(node: Any) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    t = meta.get(node, "tensor")
    if t:
        return tuple(t["shape"])
    if node.op == "call_method" and node.target in ("contiguous", "clone", "detach") \
            and node.args:  # inserted by a rule after tracing: its input's shape
        return _shape(node.args[0])
    return None


def _fmt(node: fx.Node) -> str:
    return node.format_node() or node.name


def _norm(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _target_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    return getattr(node.target, "__name__", str(node.target))


def _plain(obj: Any) -> Any:
    """fx's immutable containers as plain tuples / lists / dicts (for binding and flattening)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_plain(v) for v in obj)
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def _args_of(node: fx.Node, names: tuple[str, ...]) -> dict[str, Any]:
    """The node's arguments by parameter name (positional first, then keywords)."""
    out = dict(zip(names, node.args))
    out.update(node.kwargs)
    return out


# ops that map each element (or each aligned group of broadcast elements) on its own
_ELEMENTWISE_FUNCTIONS: frozenset[Any] = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
    operator.pow, operator.mod, operator.neg, operator.pos, operator.abs, operator.invert,
    operator.and_, operator.or_, operator.xor, operator.eq, operator.ne, operator.lt,
    operator.le, operator.gt, operator.ge,
    torch.add, torch.sub, torch.mul, torch.div, torch.true_divide, torch.pow, torch.neg,
    torch.abs, torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.tanh, torch.sigmoid,
    torch.sin, torch.cos, torch.erf, torch.clamp, torch.clip, torch.where, torch.maximum,
    torch.minimum, torch.reciprocal, torch.square, torch.logical_not, torch.logical_and,
    torch.logical_or, torch.eq, torch.ne, torch.lt, torch.gt, torch.le, torch.ge,
    torch.masked_fill, torch.nan_to_num, torch.relu, torch.exp2, torch.log1p, torch.expm1,
    F.gelu, F.silu, F.relu, F.mish, F.softplus, F.elu, F.leaky_relu, F.hardswish,
    F.hardsigmoid, F.relu6, F.selu, F.celu, F.tanhshrink, F.softsign, F.logsigmoid,
    F.dropout, F.sigmoid, F.tanh, F.hardtanh,
})
_ELEMENTWISE_METHODS = frozenset({
    "add", "sub", "mul", "div", "true_divide", "pow", "neg", "abs", "exp", "log", "sqrt",
    "rsqrt", "tanh", "sigmoid", "sin", "cos", "erf", "clamp", "clip", "clamp_min",
    "clamp_max", "where", "maximum", "minimum", "reciprocal", "square", "logical_not",
    "logical_and", "logical_or", "eq", "ne", "lt", "gt", "le", "ge", "masked_fill",
    "nan_to_num", "relu", "exp2", "log1p", "expm1", "__add__", "__mul__", "__sub__",
    "__truediv__", "__radd__", "__rmul__", "__rsub__", "__rtruediv__", "__neg__",
})
_INPLACE_METHODS = frozenset({"mul_", "add_", "sub_", "div_"})
# the data is the first argument; the rest only say dtype / device / memory format
_CAST_METHODS = frozenset({"float", "half", "bfloat16", "double", "to", "type_as", "type",
                           "contiguous", "clone", "detach", "cpu", "cuda", "int", "long",
                           "bool", "requires_grad_"})
_CAST_FUNCTIONS: frozenset[Any] = frozenset({torch.clone, torch.Tensor.contiguous})
_SDPA_NAMES = frozenset({"scaled_dot_product_attention"})
_REDUCTIONS = frozenset({"sum", "mean", "amax", "amin", "prod", "std", "var", "logsumexp",
                         "norm", "max", "min", "argmax", "argmin", "all", "any", "nansum",
                         "nanmean"})
_SOFTMAX = frozenset({"softmax", "log_softmax"})
_SAFE_ATTRS = frozenset({"dtype", "device", "ndim", "is_cuda", "is_meta", "layout",
                         "requires_grad", "is_floating_point", "itemsize", "is_nested",
                         "is_sparse", "is_quantized"})


class Propagator:
    """Run the abstract interpretation over one module graph (see the module docstring).

    ``mg``: the ModuleGraph; ``roles``: call_module node name -> "column" / "row" for the
    pair's linear sites (a direct linear or a thin wrapper around one); ``placeholders``:
    abstract values of the graph's placeholders (replicated by default). ``resolve(node, mg)``
    says what a call_module node of ``mg`` calls: ``(kind, payload)`` with kind "linear" (an
    nn.Linear or vLLM linear), "graph" (a traced module: payload ``(ModuleGraph, module)``),
    "opaque" (payload a description).
    """

    def __init__(self, mg: Any, tp: int, roles: dict[str, str],
                 resolve: Callable[[fx.Node, Any], tuple[str, Any]],
                 placeholders: dict[str, AV] | None = None, depth: int = 0) -> None:
        self.mg = mg
        self.graph = mg.graph
        self.tp = tp
        self.roles = roles
        self.resolve = resolve
        self.placeholders = placeholders or {}
        self.where = mg.qualname or "<root>"
        self.depth = depth
        self.env: dict[fx.Node, AV] = {}
        self.edits: list[ConstantEdit] = []
        self.head_units: dict[str, int] = {}
        self.module_outputs: list[tuple[str, str, AV]] = []
        self.module_inputs: list[tuple[str, str, AV]] = []

    # -- driver ------------------------------------------------------------------------------

    def run(self) -> Analysis:
        out = REP
        for node in self.graph.nodes:
            if node.op == "output":
                out = self._av_of(node.args[0])
                continue
            try:
                av = self._eval(node)
            except (Refuse, NeedsRow):
                raise
            except Exception as e:  # noqa: BLE001 - an op this analysis cannot follow
                if self._inputs_rep(node) and node.name not in self.roles \
                        and node.op != "call_module":
                    av = REP  # whatever it is, it computes the same on every rank
                else:
                    raise Refuse(f"{self._at(node)}: cannot follow the sharded value "
                                 f"({type(e).__name__}: {e})") from e
            self.env[node] = av
            if node.op == "call_module" and has_sharded(av):
                self.module_outputs.append((self.mg.qualname, node.name, av))
        return Analysis({n.name: v for n, v in self.env.items()}, out, self.edits,
                        self.head_units, self.module_outputs, self.module_inputs)

    def _at(self, node: fx.Node) -> str:
        return f"{self.where}: {_fmt(node)}"

    def _av_of(self, arg: Any) -> AV:
        if isinstance(arg, fx.Node):
            return self.env.get(arg, REP)
        if isinstance(arg, (tuple, list)):
            return AV("T", items=tuple(self._av_of(a) for a in arg))
        if isinstance(arg, dict):
            return AV("T", items=tuple(self._av_of(a) for a in arg.values()))
        if isinstance(arg, slice):
            return AV("T", items=(self._av_of(arg.start), self._av_of(arg.stop),
                                  self._av_of(arg.step)))
        if isinstance(arg, int) and not isinstance(arg, bool):
            return rep(arg)
        return REP

    def _inputs_rep(self, node: fx.Node) -> bool:
        return all(is_rep(self._av_of(a)) for a in (*node.args, *node.kwargs.values()))

    def _value(self, arg: Any) -> Any:
        """The full traced value of an int-ish argument, or None."""
        if isinstance(arg, fx.Node):
            av = self.env.get(arg)
            return av.value if av is not None and av.kind in ("R", "L") else None
        if isinstance(arg, (int, float)) and not isinstance(arg, bool):
            return arg
        return None

    # -- dispatch ----------------------------------------------------------------------------

    def _eval(self, node: fx.Node) -> AV:
        if node.op == "placeholder":
            return self.placeholders.get(node.name, REP)
        if node.op == "get_attr":
            return REP
        if node.op == "call_module":
            return self._call_module(node)
        if node.op == "call_function" and node.target is builtins.getattr:
            return self._getattr(node)
        if node.op == "call_function" and node.target is operator.getitem:
            return self._getitem(node)
        if node.op == "call_function" and node.target is builtins.len:
            return self._len(node)
        if node.op in ("call_function", "call_method"):
            name = _target_name(node)
            if name == "guard":
                value = self._av_of(node.args[0])
                if not is_rep(value):
                    raise Refuse(f"{self._at(node)}: a guard checks a value that differs per "
                                 "rank (it was read off the sharded dim)")
                return REP
            if self._inputs_rep(node):
                return self._replicated(node)
            return self._sharded_op(node, name)
        raise Refuse(f"{self._at(node)}: unexpected node kind {node.op}")

    def _replicated(self, node: fx.Node) -> AV:
        """An op on replicated values: replicated; ints are evaluated (shape arithmetic)."""
        if node.op == "call_function" and node.target in _INT_OPS:
            values = [self._value(a) for a in node.args]
            if all(v is not None for v in values) and not node.kwargs:
                try:
                    return rep(node.target(*values))
                except Exception:  # noqa: BLE001
                    return REP
        return REP

    # -- shapes and items --------------------------------------------------------------------

    def _shape_av(self, node: fx.Node, av: AV) -> AV:
        shape = _shape(node)
        if shape is None:
            if av.kind == "S":
                raise Refuse(f"{self._at(node)}: no example shape for a sharded value")
            return REP
        items = []
        for i, n in enumerate(shape):
            items.append(AV("L", value=n) if av.kind == "S" and i == av.dim else rep(n))
        return AV("T", items=tuple(items))

    def _getattr(self, node: fx.Node) -> AV:
        obj, attr = node.args[0], node.args[1]
        av = self._av_of(obj)
        if attr == "shape":
            if av.kind in ("R", "S") and _shape(obj) is not None:
                return self._shape_av(obj, av)
            return REP if is_rep(av) else self._refuse_read(node, av)
        if is_rep(av):
            return REP
        if av.kind == "S" and attr in _SAFE_ATTRS:
            return REP
        return self._refuse_read(node, av)

    def _refuse_read(self, node: fx.Node, av: AV) -> AV:
        raise Refuse(f"{self._at(node)}: reads {node.args[1]!r} off a sharded value")

    def _getitem(self, node: fx.Node) -> AV:
        obj, index = node.args[0], node.args[1]
        av = self._av_of(obj)
        if av.kind == "T":
            if isinstance(index, int):
                return av.items[index] if -len(av.items) <= index < len(av.items) else REP
            if isinstance(index, slice) and all(
                    isinstance(x, (int, type(None))) for x in (index.start, index.stop,
                                                              index.step)):
                return AV("T", items=av.items[index])
            if is_rep(av):
                return REP
            raise Refuse(f"{self._at(node)}: indexes a tuple holding sharded values with "
                         f"{index!r}")
        if av.kind == "R":
            if is_rep(self._av_of(index)):
                return self._replicated(node)
            raise Refuse(f"{self._at(node)}: indexes with a per-rank value")
        if av.kind == "S":
            return self._index_tensor(node, av, index)
        raise Refuse(f"{self._at(node)}: indexes a rank-dependent value")

    def _len(self, node: fx.Node) -> AV:
        av = self._av_of(node.args[0])
        if av.kind == "T":
            return rep(len(av.items))
        if av.kind == "S":
            shape = _shape(node.args[0])
            if shape is None:
                raise Refuse(f"{self._at(node)}: no example shape for a sharded value")
            return AV("L", value=shape[0]) if av.dim == 0 else rep(shape[0])
        return REP

    # -- modules -----------------------------------------------------------------------------

    def _call_module(self, node: fx.Node) -> AV:
        role = self.roles.get(node.name)
        args = [self._av_of(a) for a in (*node.args, *node.kwargs.values())]
        if role is None:
            kind, payload = self.resolve(node, self.mg)
            if kind == "linear":
                if all(is_rep(a) for a in args):
                    return REP
                raise NeedsRow(node.name, args[0] if args else REP)
            if all(is_rep(a) for a in args):
                return REP
            if kind == "graph":
                return self._enter(node, *payload)
            raise Refuse(f"{self._at(node)}: a sharded value enters {payload}, which fxpass "
                         "cannot see into")
        kind, payload = self.resolve(node, self.mg)
        if kind == "graph":  # a wrapper around the role's linear
            return self._enter(node, *payload, role=role)
        out_shape = _shape(node)
        if out_shape is None or len(node.args) != 1 or node.kwargs:
            raise Refuse(f"{self._at(node)}: expected a one-input linear call with a shape")
        inp = self._av_of(node.args[0])
        if role == "column":
            if not is_rep(inp):
                raise Refuse(f"{self._at(node)}: the column-parallel linear's input is itself "
                             "sharded")
            return self._sharded(node, len(out_shape) - 1, frozenset({node.name}), 1)
        in_shape = _shape(node.args[0])
        if inp.kind != "S" or in_shape is None or inp.dim != len(in_shape) - 1:
            raise Refuse(f"{self._at(node)}: the row-parallel linear's input is not split "
                         "along its last (input-channel) dim")
        if inp.unit not in (1, None):
            raise Refuse(f"{self._at(node)}: the row-parallel linear's input holds "
                         f"{inp.unit} channels per sharded index")
        return REP

    def _enter(self, node: fx.Node, mg: Any, module: Any, role: str | None = None) -> AV:
        """Propagate into a child's traced graph, its placeholders fed from this call."""
        from fxpass.trace.binding import bind_module_call

        if self.depth > 6:
            raise Refuse(f"{self._at(node)}: sharded value nested too deep in submodules")
        try:
            args, kwargs = bind_module_call(module, _plain(node.args), _plain(node.kwargs))
        except TypeError as e:
            raise Refuse(f"{self._at(node)}: cannot bind the call to its forward ({e})") from e
        leaves = pytree.tree_flatten((tuple(args), dict(kwargs)))[0]
        spec = mg.spec
        if len(leaves) != spec.treespec.num_leaves:
            raise Refuse(f"{self._at(node)}: the call does not match the traced call structure")
        for i, value in spec.constants.items():
            if not is_rep(self._av_of(leaves[i])):
                raise Refuse(f"{self._at(node)}: a sharded value is baked into "
                             f"{mg.qualname}'s graph")
        phs = [n for n in mg.graph.nodes if n.op == "placeholder"]
        feeds = {ph.name: self._av_of(leaves[i]) for ph, i in zip(phs, spec.placeholders)}
        inner_roles: dict[str, str] = {}
        if role is not None:
            linears = [n for n in mg.graph.nodes if n.op == "call_module"
                       and self.resolve(n, mg)[0] == "linear"]
            if len(linears) != 1:
                raise Refuse(f"{self._at(node)}: {mg.qualname} is not a one-linear wrapper")
            inner_roles[linears[0].name] = role

        sub = Propagator(mg, self.tp, inner_roles, self.resolve, feeds, depth=self.depth + 1)
        try:
            result = sub.run()
        except NeedsRow as e:
            raise Refuse(f"{self._at(node)}: inside {mg.qualname}, a sharded value reaches "
                         f"the linear {e.node}, which is not part of this pair") from e
        self.module_outputs += sub.module_outputs
        self.module_inputs += sub.module_inputs
        self.module_inputs += [(mg.qualname, name, av) for name, av in feeds.items()
                               if has_sharded(av)]
        if sub.edits:
            raise Refuse(f"{self._at(node)}: {mg.qualname} bakes the full size of a sharded "
                         f"dim into its graph ({sub.edits[0].why}), and its graph is shared")
        if role == "column":
            out = result.output
            if out.kind != "S":
                raise Refuse(f"{self._at(node)}: {mg.qualname} does not return its linear's "
                             "sharded output")
            return dataclasses.replace(out, origins=frozenset({node.name}))
        if role == "row" and has_sharded(result.output):
            raise Refuse(f"{self._at(node)}: {mg.qualname} returns a sharded value")
        return result.output

    # -- sharded tensors ---------------------------------------------------------------------

    def _sharded(self, node: fx.Node, dim: int, origins: frozenset[str],
                 unit: int | None) -> AV:
        shape = _shape(node)
        if shape is None:
            raise Refuse(f"{self._at(node)}: no example shape for a sharded value")
        if not 0 <= dim < len(shape):
            raise Refuse(f"{self._at(node)}: lost track of the sharded dim")
        size = shape[dim]
        if size % self.tp:
            what = ("heads" if unit and unit > 1 else "channels")
            raise Refuse(f"{self._at(node)}: the sharded dim {dim} holds {size} {what}, which "
                         f"do not divide by tp={self.tp} (vLLM runs such a tower data "
                         "parallel: it stays replicated)")
        return AV("S", dim=dim, origins=origins, unit=unit)

    def _sharded_op(self, node: fx.Node, name: str) -> AV:
        target = node.target
        if node.op == "call_function" and target in _INT_OPS and not self._tensor_args(node):
            return self._int_op(node)
        if node.op == "call_method":
            if name in _CAST_METHODS:
                return self._cast(node)
            if name in _ELEMENTWISE_METHODS:
                return self._elementwise(node)
            if name in _INPLACE_METHODS:  # the fuse rules' in-place forms, on fresh tensors
                if self._av_of(node.args[0]).kind != "S":
                    raise Refuse(f"{self._at(node)}: writes a sharded value into a replicated "
                                 "one in place")
                return self._elementwise(node)
            handler = _METHOD_HANDLERS.get(name)
        else:
            if target in _CAST_FUNCTIONS:
                return self._cast(node)
            if name in _SDPA_NAMES:
                return _h_sdpa(self, node)
            if target in _ELEMENTWISE_FUNCTIONS:
                return self._elementwise(node)
            handler = _FUNCTION_HANDLERS.get(target) or _FUNCTION_NAME_HANDLERS.get(name)
        if handler is None:
            raise Refuse(f"{self._at(node)}: {name} is not known to keep heads / channels "
                         "apart (not on the tensor-parallel whitelist)")
        return handler(self, node)

    def _tensor_args(self, node: fx.Node) -> bool:
        return any(_shape(a) is not None for a in (*node.args, *node.kwargs.values()))

    def _int_op(self, node: fx.Node) -> AV:
        avs = [self._av_of(a) for a in node.args]
        if node.target is operator.mul and len(avs) == 2:
            kinds = sorted(a.kind for a in avs)
            if kinds == ["L", "R"]:
                values = [self._value(a) for a in node.args]
                value = values[0] * values[1] if None not in values else None
                return AV("L", value=value)
        return RANK_DEPENDENT

    def _data(self, node: fx.Node) -> tuple[Any, AV]:
        x = node.args[0] if node.args else next(iter(node.kwargs.values()))
        return x, self._av_of(x)

    def _only_data_sharded(self, node: fx.Node, skip: int = 1) -> None:
        rest = [*node.args[skip:], *[v for k, v in node.kwargs.items()]]
        for a in rest:
            if not is_rep(self._av_of(a)):
                raise Refuse(f"{self._at(node)}: a sharded value is passed where only "
                             "replicated arguments are understood")

    def _cast(self, node: fx.Node) -> AV:
        """The data keeps its sharding; other arguments only give a dtype / device (also a
        tensor's, ``type_as(other)``, ``to(other)``: its sharding does not matter)."""
        x, av = self._data(node)
        if av.kind == "R":
            return REP
        if av.kind != "S":
            raise Refuse(f"{self._at(node)}: casts a value that differs per rank")
        return self._keep(node, av, av.dim)

    def _keep(self, node: fx.Node, av: AV, dim: int, unit: Any = "same") -> AV:
        return self._sharded(node, dim, av.origins, av.unit if unit == "same" else unit)

    def _elementwise(self, node: fx.Node) -> AV:
        out = _shape(node)
        if out is None:
            raise Refuse(f"{self._at(node)}: no example shape for a sharded result")
        nd = len(out)
        dims: set[int] = set()
        origins: frozenset[str] = frozenset()
        units: set[int | None] = set()
        operands = [*node.args, *node.kwargs.values()]
        for a in pytree.tree_leaves(_plain(operands)):
            av = self._av_of(a)
            if av.kind == "S":
                shape = _shape(a)
                if shape is None:
                    raise Refuse(f"{self._at(node)}: no example shape for a sharded operand")
                d = av.dim + nd - len(shape)
                if shape[av.dim] != out[d]:
                    raise Refuse(f"{self._at(node)}: the sharded operand {a} is broadcast "
                                 "along its sharded dim")
                dims.add(d)
                origins |= av.origins
                units.add(av.unit)
            elif av.kind != "R":
                raise Refuse(f"{self._at(node)}: combines a per-rank value "
                             f"({'size' if av.kind == 'L' else 'rank-dependent'}) elementwise")
        if len(dims) != 1:
            raise Refuse(f"{self._at(node)}: combines values sharded along different dims "
                         f"{sorted(dims)} (mixes heads / channels)")
        (d,) = dims
        for a in pytree.tree_leaves(_plain(operands)):
            if isinstance(a, fx.Node) and self._av_of(a).kind == "R":
                shape = _shape(a)
                if shape is None:
                    continue  # a scalar
                pos = d - (nd - len(shape))
                if 0 <= pos < len(shape) and shape[pos] != 1:
                    raise Refuse(f"{self._at(node)}: the replicated operand {a} has "
                                 f"{shape[pos]} entries along the sharded dim {d}: it would "
                                 "mix the full heads / channels into each rank's block")
        unit = units.pop() if len(units) == 1 else None
        return self._sharded(node, d, origins, unit)

    # reductions, softmax, norms ---------------------------------------------------------------

    def _reduce(self, node: fx.Node, dims: Any, keepdim: bool) -> AV:
        x, av = self._data(node)
        if av.kind != "S":
            raise Refuse(f"{self._at(node)}: reduces a value that differs per rank")
        shape = _shape(x)
        if shape is None:
            raise Refuse(f"{self._at(node)}: no example shape for a sharded value")
        nd = len(shape)
        if dims is None:
            raise Refuse(f"{self._at(node)}: reduces over every dim, the sharded one included "
                         "(mixes heads / channels)")
        dl = [dims] if isinstance(dims, int) else list(dims)
        dl = [_norm(d, nd) for d in dl]
        if av.dim in dl:
            raise Refuse(f"{self._at(node)}: reduces over the sharded dim {av.dim} "
                         "(mixes heads / channels)")
        out = av.dim if keepdim else av.dim - sum(1 for d in dl if d < av.dim)
        result = self._keep(node, av, out)
        if _target_name(node) in ("max", "min") and node.meta.get(meta.KEY, {}).get(
                "pytype") not in (None, "Tensor"):
            return AV("T", items=(result, result))
        return result

    # layouts ----------------------------------------------------------------------------------

    def _permuted(self, node: fx.Node, op: Callable[[torch.Tensor], torch.Tensor]) -> AV:
        x, av = self._data(node)
        self._only_data_sharded(node)
        shape = _shape(x)
        if av.kind != "S" or shape is None:
            raise Refuse(f"{self._at(node)}: cannot follow the sharded dim")
        probe = torch.empty([2] * len(shape), device="meta")
        moved = op(probe)
        stride = probe.stride()[av.dim]
        for i, s in enumerate(moved.stride()):
            if s == stride:
                return self._keep(node, av, i)
        raise Refuse(f"{self._at(node)}: cannot follow the sharded dim through "
                     f"{_target_name(node)}")

    def _reshape(self, node: fx.Node) -> AV:
        """view / reshape / flatten: the sharded dim must lead the group it ends up in.

        Rank r holds block r of the flattened dims from the sharded one on; the output dim
        whose outer dims hold as many elements as the input's outer dims gets that block, if
        the block is a whole number of its indices (else the blocks would interleave).
        """
        x, av = self._data(node)
        ins, outs = _shape(x), _shape(node)
        if av.kind != "S" or ins is None or outs is None:
            raise Refuse(f"{self._at(node)}: cannot follow the sharded dim")
        k = av.dim
        lead = math.prod(ins[:k])
        j = None
        for cand in range(len(outs)):
            if math.prod(outs[:cand]) == lead and outs[cand] != 1:
                j = cand
                break
        if j is None or math.prod(outs[j:]) != math.prod(ins[k:]):
            raise Refuse(f"{self._at(node)}: reshapes {ins} -> {outs} so that the sharded dim "
                         f"{k} no longer leads a dim of its own (its blocks would interleave "
                         "with other dims)")
        inner_in, inner_out = math.prod(ins[k + 1:]), math.prod(outs[j + 1:])
        unit = None
        if av.unit is not None and (av.unit * inner_out) % inner_in == 0:
            unit = av.unit * inner_out // inner_in
        if len(av.origins) == 1 and unit is not None and unit > 1:
            (origin,) = av.origins
            self.head_units[origin] = max(unit, self.head_units.get(origin, 1))
        return self._sharded(node, j, av.origins, unit)

    def _reshape_sizes(self, node: fx.Node, sizes: list[Any],
                       path_of: Callable[[int], tuple[Any, ...]]) -> AV:
        result = self._reshape(node)
        self._check_sizes(node, sizes, path_of, _shape(node), result.dim, _target_name(node))
        return result

    def _check_sizes(self, node: fx.Node, sizes: list[Any],
                     path_of: Callable[[int], tuple[Any, ...]], outs: tuple[int, ...], j: int,
                     what: str) -> None:
        """Each size argument of a view / expand gives the per-rank shape, or is recorded."""
        if len(sizes) != len(outs):
            raise Refuse(f"{self._at(node)}: cannot match its size arguments to the shape")
        for i, arg in enumerate(sizes):
            av = self._av_of(arg)
            if isinstance(arg, int) and not isinstance(arg, bool):
                if arg == -1:
                    continue
                if i == j:
                    if arg != outs[j]:
                        raise Refuse(f"{self._at(node)}: size {arg} at the sharded dim is not "
                                     f"its full size {outs[j]}")
                    self.edits.append(ConstantEdit(
                        node.name, path_of(i), arg, arg // self.tp,
                        f"{node.name}: {what} size {arg} at the sharded dim {j} -> "
                        f"{arg // self.tp} per rank (tp={self.tp})"))
                continue
            if i == j:
                if av.kind != "L" or (av.value is not None and av.value != outs[j]):
                    raise Refuse(f"{self._at(node)}: the size argument {arg} at the sharded "
                                 "dim is not the per-rank size")
            elif av.kind != "R":
                raise Refuse(f"{self._at(node)}: the size argument {arg} of a dim that is "
                             "not sharded differs per rank")

    def _index_tensor(self, node: fx.Node, av: AV, index: Any) -> AV:
        shape = _shape(node.args[0])
        if shape is None:
            raise Refuse(f"{self._at(node)}: no example shape for a sharded value")
        items = list(index) if isinstance(index, tuple) else [index]
        if any(isinstance(i, fx.Node) and _shape(i) is not None for i in items):
            raise Refuse(f"{self._at(node)}: indexes a sharded value with a tensor")
        consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
        if Ellipsis in items:
            at = items.index(Ellipsis)
            items = items[:at] + [slice(None)] * (len(shape) - consumed) + items[at + 1:]
        items += [slice(None)] * (len(shape) - sum(1 for i in items if i is not None))
        in_dim = out_dim = 0
        for item in items:
            if item is None:
                out_dim += 1
                continue
            if in_dim == av.dim:
                if item != slice(None):
                    raise Refuse(f"{self._at(node)}: indexes the sharded dim with {item!r} "
                                 "(picks heads / channels by their global index)")
                return self._keep(node, av, out_dim)
            if isinstance(item, slice):
                if not is_rep(self._av_of(item)):
                    raise Refuse(f"{self._at(node)}: slices with a per-rank bound")
                out_dim += 1
            elif not is_rep(self._av_of(item)):
                raise Refuse(f"{self._at(node)}: indexes with a per-rank value")
            in_dim += 1
        raise Refuse(f"{self._at(node)}: lost track of the sharded dim")


# int-valued ops (shape arithmetic) evaluated on replicated values
_INT_OPS: frozenset[Any] = frozenset({
    operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv,
    operator.mod, operator.neg, operator.pow, operator.lt, operator.le, operator.gt,
    operator.ge, operator.eq, operator.ne, builtins.max, builtins.min, math.ceil, math.floor,
})


# ------------------------------------------------------------------------------ op handlers


def _dim_arg(node: fx.Node, pos: int, name: str, default: Any = None) -> Any:
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def _h_reduction(p: Propagator, node: fx.Node) -> AV:
    dims = _dim_arg(node, 1, "dim")
    keep = _dim_arg(node, 2, "keepdim", False)
    return p._reduce(node, dims, bool(keep))


def _h_softmax(p: Propagator, node: fx.Node) -> AV:
    dim = _dim_arg(node, 1, "dim")
    x, av = p._data(node)
    shape = _shape(x)
    if av.kind != "S" or shape is None or dim is None or not isinstance(dim, int):
        raise Refuse(f"{p._at(node)}: softmax without a known dim over a sharded value")
    if _norm(dim, len(shape)) == av.dim:
        raise Refuse(f"{p._at(node)}: softmax over the sharded dim (mixes heads / channels)")
    return p._keep(node, av, av.dim)


def _h_layer_norm(p: Propagator, node: fx.Node) -> AV:
    x, av = p._data(node)
    shape = _shape(x)
    normalized = _dim_arg(node, 1, "normalized_shape")
    if av.kind != "S" or shape is None or not isinstance(normalized, (tuple, list)):
        raise Refuse(f"{p._at(node)}: normalises a sharded value over unknown dims")
    if av.dim >= len(shape) - len(normalized):
        raise Refuse(f"{p._at(node)}: normalises over the sharded dim (mixes heads / channels)")
    p._only_data_sharded(node)
    return p._keep(node, av, av.dim)


def _h_glu(p: Propagator, node: fx.Node) -> AV:
    x, av = p._data(node)
    shape = _shape(x)
    dim = _dim_arg(node, 1, "dim", -1)
    if av.kind != "S" or shape is None or _norm(dim, len(shape)) == av.dim:
        raise Refuse(f"{p._at(node)}: glu halves the sharded dim and gates one half with the "
                     "other (mixes channels across ranks' blocks)")
    return p._keep(node, av, av.dim)


def _h_transpose(p: Propagator, node: fx.Node) -> AV:
    a, b = node.args[1], node.args[2]
    return p._permuted(node, lambda t: t.transpose(a, b))


def _h_t(p: Propagator, node: fx.Node) -> AV:
    return p._permuted(node, lambda t: t.t())


def _h_permute(p: Propagator, node: fx.Node) -> AV:
    dims = node.args[1:] if node.op == "call_method" else node.args[1]
    if node.op == "call_method" and len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = dims[0]
    if "dims" in node.kwargs:
        dims = node.kwargs["dims"]
    dims = tuple(dims)
    return p._permuted(node, lambda t: t.permute(*dims))


def _h_movedim(p: Propagator, node: fx.Node) -> AV:
    src, dst = _dim_arg(node, 1, "source"), _dim_arg(node, 2, "destination")
    return p._permuted(node, lambda t: torch.movedim(t, src, dst))


def _h_unsqueeze(p: Propagator, node: fx.Node) -> AV:
    x, av = p._data(node)
    p._only_data_sharded(node)
    shape = _shape(x)
    d = _dim_arg(node, 1, "dim")
    if av.kind != "S" or shape is None or not isinstance(d, int):
        raise Refuse(f"{p._at(node)}: cannot follow the sharded dim")
    d = _norm(d, len(shape) + 1)
    return p._keep(node, av, av.dim + (1 if d <= av.dim else 0))


def _h_squeeze(p: Propagator, node: fx.Node) -> AV:
    x, av = p._data(node)
    shape = _shape(x)
    d = _dim_arg(node, 1, "dim")
    if av.kind != "S" or shape is None:
        raise Refuse(f"{p._at(node)}: cannot follow the sharded dim")
    if d is None:
        raise Refuse(f"{p._at(node)}: squeeze() without a dim could drop the sharded dim where "
                     "a rank holds one head")
    dl = [_norm(i, len(shape)) for i in ([d] if isinstance(d, int) else d)]
    if av.dim in dl:
        raise Refuse(f"{p._at(node)}: squeezes the sharded dim")
    dropped = sum(1 for i in dl if i < av.dim and shape[i] == 1)
    return p._keep(node, av, av.dim - dropped)


def _h_view(p: Propagator, node: fx.Node) -> AV:
    """view / reshape: sizes as varargs, one tuple, or one shape object (a T value)."""
    if node.op == "call_method":
        sizes = list(node.args[1:])
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            return p._reshape_sizes(node, list(sizes[0]), lambda i: (0, 1, i))
        if len(sizes) == 1 and isinstance(sizes[0], fx.Node):
            return _view_with_items(p, node, p._av_of(sizes[0]))
        if len(sizes) == 1 and isinstance(sizes[0], torch.dtype):
            raise Refuse(f"{p._at(node)}: views a sharded value as another dtype")
        return p._reshape_sizes(node, sizes, lambda i: (0, i + 1))
    sizes = node.args[1] if len(node.args) > 1 else node.kwargs.get("shape")
    if not isinstance(sizes, (tuple, list)):
        raise Refuse(f"{p._at(node)}: reshape with a size object that is not followed")
    return p._reshape_sizes(node, list(sizes), lambda i: (0, 1, i))


def _view_with_items(p: Propagator, node: fx.Node, av: AV) -> AV:
    if av.kind != "T":
        raise Refuse(f"{p._at(node)}: view with a size object that is not followed")
    result = p._reshape(node)
    for i, item in enumerate(av.items):
        if i == result.dim and item.kind != "L":
            raise Refuse(f"{p._at(node)}: the size at the sharded dim is not the per-rank size")
        if i != result.dim and item.kind != "R":
            raise Refuse(f"{p._at(node)}: a size of a dim that is not sharded differs per rank")
    return result


def _h_flatten(p: Propagator, node: fx.Node) -> AV:
    p._only_data_sharded(node)
    return p._reshape(node)


def _h_expand(p: Propagator, node: fx.Node) -> AV:
    x, av = p._data(node)
    ins, outs = _shape(x), _shape(node)
    if av.kind != "S" or ins is None or outs is None:
        raise Refuse(f"{p._at(node)}: cannot follow the sharded dim")
    sizes = list(node.args[1:])
    path_of: Callable[[int], tuple[Any, ...]] = lambda i: (0, i + 1)  # noqa: E731
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes, path_of = list(sizes[0]), (lambda i: (0, 1, i))
    d = av.dim + len(outs) - len(ins)
    if outs[d] != ins[av.dim]:
        raise Refuse(f"{p._at(node)}: expands the sharded dim")
    p._check_sizes(node, sizes, path_of, outs, d, "expand")
    return p._keep(node, av, d)


def _h_split(p: Propagator, node: fx.Node) -> AV:
    x, av = p._data(node)
    shape = _shape(x)
    name = _target_name(node)
    dim = _dim_arg(node, 2, "dim", 0)
    if name == "unbind":
        dim = _dim_arg(node, 1, "dim", 0)
    if av.kind != "S" or shape is None or not isinstance(dim, int):
        raise Refuse(f"{p._at(node)}: cannot follow the sharded dim")
    if _norm(dim, len(shape)) == av.dim:
        raise Refuse(f"{p._at(node)}: {name} along the sharded dim (each piece would take "
                     "the wrong heads / channels on each rank)")
    sizes = _dim_arg(node, 1, "split_size_or_sections")
    if not is_rep(p._av_of(sizes)):
        raise Refuse(f"{p._at(node)}: {name} with per-rank sizes")
    n = len(node.users) or 1
    if name == "unbind":
        out_dim = av.dim - (1 if _norm(dim, len(shape)) < av.dim else 0)
        item = AV("S", dim=out_dim, origins=av.origins, unit=av.unit)
    else:
        item = AV("S", dim=av.dim, origins=av.origins, unit=av.unit)
    count = max([u.args[1] + 1 for u in node.users if u.target is operator.getitem
                 and isinstance(u.args[1], int)] + [n])
    return AV("T", items=(item,) * count)


def _h_cat(p: Propagator, node: fx.Node) -> AV:
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = _dim_arg(node, 1, "dim", 0)
    out = _shape(node)
    if out is None or not isinstance(dim, int) or not isinstance(tensors, (tuple, list)):
        raise Refuse(f"{p._at(node)}: cannot follow the sharded dim")
    avs = [p._av_of(t) for t in tensors]
    if any(a.kind != "S" for a in avs):
        raise Refuse(f"{p._at(node)}: concatenates sharded with replicated values")
    stack = _target_name(node) == "stack"
    dims = set()
    for t, a in zip(tensors, avs):
        shape = _shape(t)
        if shape is None:
            raise Refuse(f"{p._at(node)}: no example shape for a sharded value")
        d = a.dim
        if stack and _norm(dim, len(shape) + 1) <= d:
            d += 1
        dims.add(d)
    if len(dims) != 1:
        raise Refuse(f"{p._at(node)}: concatenates values sharded along different dims")
    (d,) = dims
    if not stack and _norm(dim, len(out)) == d:
        raise Refuse(f"{p._at(node)}: concatenates along the sharded dim (the result's blocks "
                     "would not be heads / channels blocks)")
    origins = frozenset().union(*(a.origins for a in avs))
    units = {a.unit for a in avs}
    return p._sharded(node, d, origins, units.pop() if len(units) == 1 else None)


def _h_pad(p: Propagator, node: fx.Node) -> AV:
    x, av = p._data(node)
    shape = _shape(x)
    pad = _dim_arg(node, 1, "pad")
    if av.kind != "S" or shape is None or not isinstance(pad, (tuple, list)):
        raise Refuse(f"{p._at(node)}: cannot follow the sharded dim")
    touched = len(pad) // 2
    from_end = len(shape) - 1 - av.dim
    if from_end < touched:
        lo, hi = pad[2 * from_end], pad[2 * from_end + 1]
        if lo != 0 or hi != 0:
            raise Refuse(f"{p._at(node)}: pads the sharded dim")
    for i, v in enumerate(pad):
        if not is_rep(p._av_of(v)):
            raise Refuse(f"{p._at(node)}: pads by a per-rank amount")
    for k, v in node.kwargs.items():
        if k != "pad" and not is_rep(p._av_of(v)):
            raise Refuse(f"{p._at(node)}: a sharded pad value")
    return p._keep(node, av, av.dim)


def _along_other_dims(verb: str, dim_name: str) -> Callable[[Propagator, fx.Node], AV]:
    """A handler for an op taking one dim (argument 1): fine along any dim but the sharded one."""

    def handler(p: Propagator, node: fx.Node) -> AV:
        x, av = p._data(node)
        shape = _shape(x)
        dim = _dim_arg(node, 1, dim_name)
        if av.kind != "S" or shape is None or not isinstance(dim, int):
            raise Refuse(f"{p._at(node)}: cannot follow the sharded dim")
        if _norm(dim, len(shape)) == av.dim:
            raise Refuse(f"{p._at(node)}: {verb} the sharded dim")
        p._only_data_sharded(node)
        return p._keep(node, av, av.dim)

    return handler


_h_unfold = _along_other_dims("unfolds", "dimension")
_h_narrow = _along_other_dims("narrows", "dim")


def _h_repeat_interleave(p: Propagator, node: fx.Node) -> AV:
    x, av = p._data(node)
    shape = _shape(x)
    repeats = _dim_arg(node, 1, "repeats")
    dim = _dim_arg(node, 2, "dim")
    if av.kind != "S" or shape is None or dim is None or not isinstance(repeats, int):
        raise Refuse(f"{p._at(node)}: repeat_interleave without an int repeat and a dim")
    # each index repeated in place: block r of the result is block r of the input, repeated
    return p._keep(node, av, av.dim, unit=None if _norm(dim, len(shape)) == av.dim else "same")


def _h_matmul(p: Propagator, node: fx.Node) -> AV:
    a, b = node.args[0], node.args[1]
    sa, sb, out = _shape(a), _shape(b), _shape(node)
    if sa is None or sb is None or out is None or len(sa) < 2 or len(sb) < 2:
        raise Refuse(f"{p._at(node)}: matmul of a sharded value that is not a batch of "
                     "matrices")
    va, vb = p._av_of(a), p._av_of(b)
    nd = len(out)
    dims: set[int] = set()
    origins: frozenset[str] = frozenset()
    # (shape, value, its contracted dim, its kept matrix dim, where that lands in the output)
    for shape, av, contracted, kept, out_dim in ((sa, va, len(sa) - 1, len(sa) - 2, nd - 2),
                                                 (sb, vb, len(sb) - 2, len(sb) - 1, nd - 1)):
        if av.kind == "R":
            continue
        if av.kind != "S":
            raise Refuse(f"{p._at(node)}: matmul of a rank-dependent value")
        if av.dim == contracted:
            raise Refuse(f"{p._at(node)}: contracts over the sharded dim (sums across heads / "
                         "channels)")
        dims.add(out_dim if av.dim == kept else av.dim + nd - len(shape))
        origins |= av.origins
    if len(dims) != 1:
        raise Refuse(f"{p._at(node)}: the operands are sharded along different dims")
    (d,) = dims
    if d < nd - 2:
        for shape, av in ((sa, va), (sb, vb)):
            if av.kind == "R":
                pos = d - (nd - len(shape))
                if 0 <= pos < len(shape) - 2 and shape[pos] != 1:
                    raise Refuse(f"{p._at(node)}: a replicated operand has {shape[pos]} "
                                 "entries along the sharded batch dim")
    elif va.kind == "S" and vb.kind == "S":
        raise Refuse(f"{p._at(node)}: both operands sharded along their matrix dims")
    return p._sharded(node, d, origins, None)


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
              "enable_gqa")


def _h_sdpa(self: Propagator, node: fx.Node) -> AV:
    args = _args_of(node, _SDPA_ARGS)
    q, k, v = args.get("query"), args.get("key"), args.get("value")
    out = _shape(node)
    dims = set()
    origins: frozenset[str] = frozenset()
    for t in (q, k, v):
        av, shape = self._av_of(t), _shape(t)
        if av.kind != "S" or shape is None or out is None:
            raise Refuse(f"{self._at(node)}: attention with query / key / value not all "
                         "sharded along one batch (head) dim")
        if av.dim >= len(shape) - 2:
            raise Refuse(f"{self._at(node)}: attention with the sharded dim inside the "
                         "matrices (not a head dim)")
        dims.add(av.dim + len(out) - len(shape))
        origins |= av.origins
    if len(dims) != 1:
        raise Refuse(f"{self._at(node)}: query, key and value are sharded along different dims")
    (d,) = dims
    mask = args.get("attn_mask")
    if mask is not None:
        mav, mshape = self._av_of(mask), _shape(mask)
        if mav.kind == "S":
            if mav.dim + len(out) - len(mshape) != d:
                raise Refuse(f"{self._at(node)}: the mask is sharded along another dim")
        elif mav.kind == "R":
            if mshape is not None:
                pos = d - (len(out) - len(mshape))
                if 0 <= pos < len(mshape) and mshape[pos] != 1:
                    raise Refuse(f"{self._at(node)}: the replicated mask has {mshape[pos]} "
                                 "entries along the sharded head dim")
        else:
            raise Refuse(f"{self._at(node)}: a rank-dependent mask")
    for key in ("dropout_p", "is_causal", "scale", "enable_gqa"):
        if key in args and not is_rep(self._av_of(args[key])):
            raise Refuse(f"{self._at(node)}: a per-rank {key}")
    return self._sharded(node, d, origins, None)




def _h_size(p: Propagator, node: fx.Node) -> AV:
    x, av = p._data(node)
    shape_av = p._shape_av(x, av)
    d = _dim_arg(node, 1, "dim")
    if d is None:
        return shape_av
    if not isinstance(d, int):
        raise Refuse(f"{p._at(node)}: size() with a computed dim")
    return shape_av.items[d]


def _h_dim(p: Propagator, node: fx.Node) -> AV:
    x, _ = p._data(node)
    shape = _shape(x)
    return rep(len(shape) if shape is not None else None)


def _h_numel(p: Propagator, node: fx.Node) -> AV:
    x, av = p._data(node)
    shape = _shape(x)
    return AV("L", value=math.prod(shape) if shape is not None else None)


_METHOD_HANDLERS: dict[str, Callable[[Propagator, fx.Node], AV]] = {
    **{name: _h_reduction for name in _REDUCTIONS},
    **{name: _h_softmax for name in _SOFTMAX},
    "transpose": _h_transpose, "swapaxes": _h_transpose, "swapdims": _h_transpose,
    "t": _h_t, "permute": _h_permute, "movedim": _h_movedim, "moveaxis": _h_movedim,
    "unsqueeze": _h_unsqueeze, "squeeze": _h_squeeze, "view": _h_view, "reshape": _h_view,
    "flatten": _h_flatten, "expand": _h_expand, "split": _h_split, "chunk": _h_split,
    "unbind": _h_split, "tensor_split": _h_split, "unfold": _h_unfold, "narrow": _h_narrow,
    "repeat_interleave": _h_repeat_interleave, "matmul": _h_matmul, "bmm": _h_matmul,
    "size": _h_size, "dim": _h_dim, "ndimension": _h_dim, "numel": _h_numel,
    "nelement": _h_numel,
}
_FUNCTION_HANDLERS: dict[Any, Callable[[Propagator, fx.Node], AV]] = {
    operator.matmul: _h_matmul, torch.matmul: _h_matmul, torch.bmm: _h_matmul,
    torch.transpose: _h_transpose, torch.swapaxes: _h_transpose, torch.permute: _h_permute,
    torch.movedim: _h_movedim, torch.moveaxis: _h_movedim, torch.unsqueeze: _h_unsqueeze,
    torch.squeeze: _h_squeeze, torch.reshape: _h_view, torch.flatten: _h_flatten,
    torch.split: _h_split, torch.chunk: _h_split, torch.unbind: _h_split,
    torch.tensor_split: _h_split, torch.cat: _h_cat, torch.concat: _h_cat,
    torch.concatenate: _h_cat, torch.stack: _h_cat, F.pad: _h_pad, torch.narrow: _h_narrow,
    torch.repeat_interleave: _h_repeat_interleave, F.glu: _h_glu,
    F.layer_norm: _h_layer_norm, F.softmax: _h_softmax, F.log_softmax: _h_softmax,
    torch.softmax: _h_softmax, torch.log_softmax: _h_softmax, torch.t: _h_t,
    **{getattr(torch, name): _h_reduction for name in _REDUCTIONS if hasattr(torch, name)},
}
# the same functions reached under another module path (torch.functional.split, ...)
_FUNCTION_NAME_HANDLERS: dict[str, Callable[[Propagator, fx.Node], AV]] = {
    "split": _h_split, "pad": _h_pad, "glu": _h_glu, "layer_norm": _h_layer_norm,
    "rms_norm": _h_layer_norm, "softmax": _h_softmax, "log_softmax": _h_softmax,
}
if hasattr(F, "rms_norm"):
    _FUNCTION_HANDLERS[F.rms_norm] = _h_layer_norm
# the elementwise rule's in-place forms (fxpass.rules.elementwise), elementwise like the ops
# they stand for; by name, as the rules import this package
for _name in ("add_into_left", "sub_into_left", "mul_into_left", "div_into_left",
              "add_into_right", "mul_into_right"):
    _FUNCTION_NAME_HANDLERS[_name] = lambda p, node: p._elementwise(node)  # noqa: SLF001

