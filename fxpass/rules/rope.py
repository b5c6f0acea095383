"""Rule (opt-in, ``fuse=True``): multidimensional RoPE as one rotation instead of one per axis.

Gemma4's vision attention rotates q and k with ``apply_multidimensional_rope``: the head dim is
split into one part per position axis (x, y), each part is rotated by ``x * cos + rotate_half(x)
* sin`` (``rotate_half``: ``cat(-x2, x1)``), and the parts are concatenated again. Traced, that
is ~25 small ops per tensor (three splits, slices, two ``neg``/``cat`` per part, the muls and
adds, a final ``cat``), each a pass over q or k, twice per layer.

The same values come out of one rotation over the whole head dim: viewed as ``(parts, 2,
half)``, ``rotate_half`` of every part at once is one ``stack`` of the negated second halves and
the first halves, and cos / sin need no split. :func:`multidim_rope` computes ``x * cos + rot *
sin`` with the same operations in the same order for every element, so the result is bit for
bit HF's (fp32 and bf16). The graph pattern must match exactly (the splits of x, cos and sin by
one size list along the last dim, per part ``x_k * cos_k.unsqueeze(d) + cat(-x_k[..., h:],
x_k[..., :h]) * sin_k.unsqueeze(d)`` with ``h = x_k.shape[-1] // 2``, the parts concatenated
along the last dim) and no intermediate value may be used elsewhere; otherwise nothing
matches. Where the sizes are unequal or odd at run time, the function loops over the parts as
HF does.

vLLM's ``_C.rotary_embedding`` (``rope_dim_offset`` per axis) was the other candidate; it works
in place on a per-position cos/sin cache and assumes cos's two halves are equal; this form
needs neither and is exact.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.fx as fx

from fxpass.rules.base import RewriteContext, Site, SpeedRule

_SPLITS = (torch.functional.split, torch.split)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def multidim_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sizes: Any,
                  unsqueeze_dim: int) -> torch.Tensor:
    """HF's ``apply_multidimensional_rope(x, cos, sin, ...)`` for split ``sizes``, in one pass
    per operation (see module)."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    sizes = list(sizes)
    n = len(sizes)
    if (n and all(s == sizes[0] for s in sizes) and sizes[0] % 2 == 0
            and n * sizes[0] == x.shape[-1]):
        half = sizes[0] // 2
        parts = x.unflatten(-1, (n, 2, half))
        rot = torch.stack((-parts[..., 1, :], parts[..., 0, :]), dim=-2).flatten(-3)
        return x * cos + rot * sin
    xs = torch.split(x, sizes, dim=-1)
    cs = torch.split(cos, sizes, dim=-1)
    ss = torch.split(sin, sizes, dim=-1)
    return torch.cat([a * c + _rotate_half(a) * s for a, c, s in zip(xs, cs, ss)], dim=-1)


@dataclasses.dataclass
class RopeMatch:
    site: Site  # the final cat
    x: fx.Node
    cos: fx.Node
    sin: fx.Node
    sizes: Any
    unsqueeze_dim: int
    region: list[str]  # names of the nodes the pattern covers (erased once unused)


def _is(node: Any, op: str, target: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == op and node.target == target


def _is_mul(node: Any) -> bool:
    return isinstance(node, fx.Node) and (
        (node.op == "call_function" and node.target in (operator.mul, torch.mul))
        or (node.op == "call_method" and node.target in ("mul", "mul_")))


def _is_add(node: Any) -> bool:
    return isinstance(node, fx.Node) and (
        (node.op == "call_function" and node.target in (operator.add, torch.add))
        or (node.op == "call_method" and node.target in ("add", "add_")))


def _same_sizes(a: Any, b: Any) -> bool:
    """One size list: the same node, or equal constants."""
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return a is b
    return isinstance(a, (list, tuple)) and list(a) == list(b)


def _last_dim(node: Any) -> bool:
    dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else None)
    return dim == -1


class _Pattern:
    """Matches one part ``x_k * cos_k.unsqueeze(d) + rotate_half(x_k) * sin_k.unsqueeze(d)``,
    collecting the nodes it covers."""

    def __init__(self) -> None:
        self.nodes: list[fx.Node] = []
        self.splits: dict[str, fx.Node] = {}
        self.unsqueeze_dim: int | None = None

    def take(self, node: fx.Node) -> fx.Node:
        self.nodes.append(node)
        return node

    def split_item(self, node: Any, role: str, k: int) -> bool:
        if not (_is(node, "call_function", operator.getitem) and node.args[1] == k):
            return False
        split = node.args[0]
        if not (isinstance(split, fx.Node) and split.op == "call_function"
                and split.target in _SPLITS and _last_dim(split) and len(split.args) >= 2):
            return False
        if self.splits.setdefault(role, split) is not split:
            return False
        self.take(node)
        return True

    def unsqueezed(self, node: Any, role: str, k: int) -> bool:
        if not (_is(node, "call_method", "unsqueeze") and len(node.args) == 2
                and isinstance(node.args[1], int)):
            return False
        if self.unsqueeze_dim is None:
            self.unsqueeze_dim = node.args[1]
        if node.args[1] != self.unsqueeze_dim:
            return False
        self.take(node)
        return self.split_item(node.args[0], role, k)

    def half(self, bound: Any, xk: fx.Node) -> bool:
        """``xk.shape[-1] // 2`` (as the tracer records it)."""
        if not (_is(bound, "call_function", operator.floordiv) and bound.args[1] == 2):
            return False
        item = bound.args[0]
        if not (_is(item, "call_function", operator.getitem) and item.args[1] == -1):
            return False
        shape = item.args[0]
        if not (_is(shape, "call_function", getattr) and shape.args == (xk, "shape")):
            return False
        self.nodes += [bound, item, shape]
        return True

    def sliced(self, node: Any, xk: fx.Node, first: bool) -> bool:
        if not (_is(node, "call_function", operator.getitem) and node.args[0] is xk):
            return False
        index = node.args[1]
        if not (isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis
                and isinstance(index[1], slice) and index[1].step is None):
            return False
        s = index[1]
        ok = (s.start is None and self.half(s.stop, xk)) if first else (
            s.stop is None and self.half(s.start, xk))
        if ok:
            self.take(node)
        return ok

    def part(self, node: Any, k: int) -> bool:
        if not (_is_add(node) and len(node.args) == 2 and not node.kwargs):
            return False
        m1, m2 = node.args
        if not (_is_mul(m1) and _is_mul(m2) and len(m1.args) == 2 and len(m2.args) == 2):
            return False
        xk, uc = m1.args
        rot, us = m2.args
        if not (self.split_item(xk, "x", k) and self.unsqueezed(uc, "cos", k)
                and self.unsqueezed(us, "sin", k)):
            return False
        if not (_is(rot, "call_function", torch.cat) and _last_dim(rot)
                and isinstance(rot.args[0], (tuple, list)) and len(rot.args[0]) == 2):
            return False
        neg, x1 = rot.args[0]
        if not (_is(neg, "call_function", operator.neg) and self.sliced(neg.args[0], xk, False)
                and self.sliced(x1, xk, True)):
            return False
        self.nodes += [node, m1, m2, rot, neg]
        return True


class MultidimRope(SpeedRule):
    name = "rope"

    def match(self, ctx: RewriteContext) -> list[RopeMatch]:
        out = []
        for mg in ctx.graphs():
            for node in mg.nodes_of("call_function"):
                if node.target is not torch.cat or not _last_dim(node):
                    continue
                parts = node.args[0]
                if not isinstance(parts, (tuple, list)) or len(parts) < 1:
                    continue
                p = _Pattern()
                if not all(p.part(a, k) for k, a in enumerate(parts)):
                    continue
                if set(p.splits) != {"x", "cos", "sin"}:
                    continue
                sx, sc, ss = p.splits["x"], p.splits["cos"], p.splits["sin"]
                if not all(_same_sizes(sx.args[1], o.args[1]) for o in (sc, ss)):
                    continue
                region = [*dict.fromkeys([*p.nodes, sx, sc, ss])]
                out.append(RopeMatch(Site(mg, node), sx.args[0], sc.args[0], ss.args[0],
                                     sx.args[1], p.unsqueeze_dim, [n.name for n in region]))
        return out

    def check(self, ctx: RewriteContext, m: RopeMatch) -> str | None:
        graph_nodes = {n.name: n for n in m.site.graph.graph.nodes}
        inside = set(m.region) | {m.site.name}
        for name in m.region:
            for user in graph_nodes[name].users:
                if user.name not in inside:
                    return (f"{name} (inside the rotation) is also used by "
                            f"{user.format_node()}")
        return None

    def apply(self, ctx: RewriteContext, m: RopeMatch) -> None:
        region = list(m.region)
        x, cos, sin, sizes, dim = m.x.name, m.cos.name, m.sin.name, m.sizes, m.unsqueeze_dim
        sizes_name = sizes.name if isinstance(sizes, fx.Node) else None

        def swap(graph: fx.Graph, node: fx.Node) -> None:
            by_name = {n.name: n for n in graph.nodes}
            size_arg = by_name[sizes_name] if sizes_name else sizes
            with graph.inserting_before(node):
                new = graph.call_function(multidim_rope, (by_name[x], by_name[cos],
                                                           by_name[sin], size_arg, dim))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            pending = [by_name[n] for n in region]
            while pending:  # erase the pattern's nodes once nothing reads them
                dead = [n for n in pending if not n.users]
                if not dead:
                    break
                for n in dead:
                    graph.erase_node(n)
                pending = [n for n in pending if n not in dead]

        ctx.fix(self.name, m.site, f"{m.site.name}: multidimensional RoPE of {x} "
                                   f"({len(m.region)} ops) -> one rotation (multidim_rope)", swap)
