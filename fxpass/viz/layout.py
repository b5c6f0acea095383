"""Layouts of the per-module graphs the HTML page draws, and their edge crossings.

Two engines, one result (:class:`Layout`: box top-left corners, the route of every edge
that spans more than one layer, the drawing's size):

- ``dot``: Graphviz's ``dot -Tplain``, one subprocess for all the graphs of a page (with a
  timeout). Used when the program is installed (``tools/setup.sh`` installs it).
- ``python``: a layered (Sugiyama) layout in pure Python, used when ``dot`` is missing,
  fails or runs out of time; it never fails. Layers: longest path, then every node moved to
  the layer that makes its edges shortest (a source next to its consumer). Edges longer
  than one layer pass through dummy nodes, so they take part in the ordering and are drawn
  around the boxes. Order within a layer: fx order, then barycenter sweeps down and up with
  adjacent swaps (transpose), keeping the order with the fewest crossings. x: each node
  pulled to the weighted mean of its neighbours (long-edge segments weigh most, so they
  run straight), solved per layer as an isotonic regression that keeps the order and the
  gaps.

``FXPASS_VIZ_LAYOUT`` (``auto``, ``dot`` or ``python``) picks the engine when the caller
does not; ``auto`` is dot when installed. Both are deterministic.

Edges are drawn as the page's script draws them: a cubic from the source box's bottom
centre to the target box's top centre with vertical tangents (:func:`default_curve`), or,
for a routed edge, the cubic Bézier points in :attr:`Layout.routes`.
:func:`count_crossings` counts crossings on those curves (sampled), so it measures what a
reader sees.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from bisect import bisect_left
from typing import Any, Hashable, Iterable, Sequence

import networkx as nx

# Box geometry shared with the HTML (pixels). model.py re-exports these.
NODE_W = 184
NODE_H = 38
GAP_X = 22
GAP_Y = 30
MARGIN = 12
DUMMY_W = 8  # the width a long edge takes in a layer it passes through
DUMMY_GAP = 8  # the gap between a long edge and its neighbours in a layer
ENGINES = ("auto", "dot", "python")
DOT_TIMEOUT_S = 60.0


@dataclasses.dataclass
class Layout:
    """Where one graph's boxes go. ``pos``: node -> (x, y) of the box's top-left corner;
    ``routes``: (source, target) -> flat cubic Bézier points ``[x0, y0, c1x, c1y, c2x, c2y,
    x1, y1, ...]`` for the edges not drawn by :func:`default_curve`; ``engine``: ``dot`` or
    ``python``."""

    pos: dict[Hashable, tuple[int, int]]
    routes: dict[tuple[Hashable, Hashable], list[int]]
    width: int
    height: int
    engine: str


# --------------------------------------------------------------------------------------
# drawing and crossings


def default_curve(x1: float, y1: float, x2: float, y2: float) -> list[float]:
    """The cubic the page draws for an edge without a route (same formula as the script)."""
    dy = max(12.0, (y2 - y1) / 2)
    return [x1, y1, x1, y1 + dy, x2, y2 - dy, x2, y2]


def edge_curves(layout: Layout, heights: dict[Hashable, int],
                edges: Iterable[tuple[Hashable, Hashable]]) -> dict[tuple[Hashable, Hashable], list[float]]:
    """The Bézier points of every edge as drawn."""
    out = {}
    for a, b in edges:
        pts = layout.routes.get((a, b))
        if pts is None:
            (ax, ay), (bx, by) = layout.pos[a], layout.pos[b]
            pts = default_curve(ax + NODE_W / 2, ay + heights.get(a, NODE_H), bx + NODE_W / 2, by - 2)
        out[(a, b)] = list(pts)
    return out


def _sample(pts: Sequence[float], steps: int = 12) -> list[tuple[float, float]]:
    out = [(pts[0], pts[1])]
    for k in range(0, len(pts) - 2, 6):
        x0, y0, x1, y1, x2, y2, x3, y3 = pts[k:k + 8]
        for i in range(1, steps + 1):
            t = i / steps
            u = 1 - t
            a, b, c, d = u * u * u, 3 * u * u * t, 3 * u * t * t, t * t * t
            out.append((a * x0 + b * x1 + c * x2 + d * x3, a * y0 + b * y1 + c * y2 + d * y3))
    return out


def _cross(p: tuple[float, float], q: tuple[float, float], r: tuple[float, float],
           s: tuple[float, float]) -> bool:
    """Segments p-q and r-s intersect at one point, counted once at shared sample points
    (the parameter on each segment is in [0, 1))."""
    dx1, dy1 = q[0] - p[0], q[1] - p[1]
    dx2, dy2 = s[0] - r[0], s[1] - r[1]
    den = dx1 * dy2 - dy1 * dx2
    if abs(den) < 1e-12:
        return False  # parallel (collinear overlaps are not crossings)
    ex, ey = r[0] - p[0], r[1] - p[1]
    t = (ex * dy2 - ey * dx2) / den
    u = (ex * dy1 - ey * dx1) / den
    return 0.0 <= t < 1.0 and 0.0 <= u < 1.0


def count_crossings(layout: Layout, heights: dict[Hashable, int],
                    edges: Iterable[tuple[Hashable, Hashable]]) -> int:
    """Points where two drawn edges cross (edges sharing a node are not compared: they
    meet at that node's box)."""
    curves = edge_curves(layout, heights, list(edges))
    cell = 48.0
    segs: list[tuple[int, tuple[float, float], tuple[float, float]]] = []
    ends: list[tuple[Hashable, Hashable]] = []
    grid: dict[tuple[int, int], list[int]] = {}
    for e, ((a, b), pts) in enumerate(curves.items()):
        ends.append((a, b))
        line = _sample(pts)
        for p, q in zip(line, line[1:]):
            s = len(segs)
            segs.append((e, p, q))
            for gx in range(int(min(p[0], q[0]) // cell), int(max(p[0], q[0]) // cell) + 1):
                for gy in range(int(min(p[1], q[1]) // cell), int(max(p[1], q[1]) // cell) + 1):
                    grid.setdefault((gx, gy), []).append(s)
    seen: set[tuple[int, int]] = set()
    total = 0
    for bucket in grid.values():
        for i, s in enumerate(bucket):
            e1, p, q = segs[s]
            for t in bucket[i + 1:]:
                e2, r, u = segs[t]
                if e1 == e2 or (s, t) in seen:
                    continue
                seen.add((s, t))
                if len({*ends[e1], *ends[e2]}) < 4:
                    continue
                if _cross(p, q, r, u):
                    total += 1
    return total


def graph_crossings(g: nx.DiGraph, *, folded: bool = False) -> int:
    """Crossings of a viz graph as laid out on it: every node (``x``/``y``/``h`` on the
    nodes, routes in the edges' ``route``), or ``folded``: the default view, shape
    bookkeeping folded out (``g.graph["fold"]``; the full view when nothing folds)."""
    heights = {n: d.get("h", NODE_H) for n, d in g.nodes(data=True)}
    fold = g.graph.get("fold")
    if folded and fold is not None:
        keep = fold["pos"]
        return count_crossings(Layout(fold["pos"], fold["routes"], fold["width"], fold["height"], ""),
                               heights, [(a, b) for a, b in g.edges if a in keep and b in keep])
    layout = Layout({n: (d["x"], d["y"]) for n, d in g.nodes(data=True)},
                    {(a, b): r for a, b, r in g.edges(data="route") if r},
                    g.graph.get("width", 0), g.graph.get("height", 0), "")
    return count_crossings(layout, heights, g.edges)


# --------------------------------------------------------------------------------------
# the pure-Python layered layout


def _layers(nodes: list[Hashable], edges: list[tuple[Hashable, Hashable]]) -> dict[Hashable, int]:
    preds: dict[Hashable, list[Hashable]] = {n: [] for n in nodes}
    succs: dict[Hashable, list[Hashable]] = {n: [] for n in nodes}
    for a, b in edges:
        succs[a].append(b)
        preds[b].append(a)
    order = {n: i for i, n in enumerate(nodes)}
    dg = nx.DiGraph()
    dg.add_nodes_from(nodes)
    dg.add_edges_from(edges)
    topo = list(nx.lexicographical_topological_sort(dg, key=order.__getitem__))
    layer: dict[Hashable, int] = {}
    for n in topo:
        layer[n] = max((layer[p] + 1 for p in preds[n]), default=0)
    # descent on the total edge length: a node goes as low as its outputs allow, together
    # with the part of the graph above it that feeds nothing else (an input and the chain
    # that prepares it), when that shortens more edges than it stretches; a node with more
    # inputs than outputs goes as high as its inputs allow
    for _ in range(8):
        moved = False
        for n in reversed(topo):
            hi = min((layer[s] - 1 for s in succs[n]), default=None)
            if hi is not None and hi > layer[n]:
                group, todo = {n}, [n]
                while todo:
                    for p in preds[todo.pop()]:
                        if p not in group and all(s in group for s in succs[p]):
                            group.add(p)
                            todo.append(p)
                entering = sum(1 for u in group for p in preds[u] if p not in group)
                if len(succs[n]) > entering:
                    delta = hi - layer[n]
                    for u in group:
                        layer[u] += delta
                    moved = True
                    continue
            lo = max((layer[p] + 1 for p in preds[n]), default=None)
            if len(preds[n]) > len(succs[n]) and lo is not None and lo < layer[n]:
                layer[n], moved = lo, True
        if not moved:
            break
    used = sorted(set(layer.values()))
    remap = {v: i for i, v in enumerate(used)}
    return {n: remap[v] for n, v in layer.items()}


def _inversions(pairs: list[tuple[int, int]], size: int) -> int:
    """Crossings between two layers: pairs (upper position, lower position)."""
    pairs.sort()
    tree = [0] * (size + 1)
    total = 0
    seen = 0
    for _, lo in pairs:
        # edges already seen whose lower end is right of lo cross this one
        i, le = lo + 1, 0
        while i > 0:
            le += tree[i]
            i -= i & -i
        total += seen - le
        i = lo + 1
        while i <= size:
            tree[i] += 1
            i += i & -i
        seen += 1
    return total


class _Sugiyama:
    def __init__(self, nodes: list[Hashable], heights: dict[Hashable, int],
                 edges: list[tuple[Hashable, Hashable]]) -> None:
        self.nodes = nodes
        self.heights = heights
        self.edges = edges
        self.layer = _layers(nodes, edges)
        self.index = {n: i for i, n in enumerate(nodes)}
        nl = max(self.layer.values(), default=-1) + 1
        self.levels: list[list[Any]] = [[] for _ in range(nl)]
        self.up: dict[Any, list[tuple[Any, float]]] = {}
        self.down: dict[Any, list[tuple[Any, float]]] = {}
        self.key: dict[Any, float] = {}
        self.real: set[Any] = set(nodes)
        self.chains: dict[tuple[Hashable, Hashable], list[Any]] = {}
        for n in nodes:
            self.up[n], self.down[n] = [], []
            self.key[n] = self.index[n]
            self.levels[self.layer[n]].append(n)
        for k, (a, b) in enumerate(edges):
            chain = [a]
            for li in range(self.layer[a] + 1, self.layer[b]):
                d = ("\0dummy", k, li)
                self.up[d], self.down[d] = [], []
                # first in fx order just after its source, so long edges start beside it
                self.key[d] = self.index[a] + 0.5 + (self.index[b] / (len(nodes) + 1)) * 0.4
                self.levels[li].append(d)
                chain.append(d)
            chain.append(b)
            self.chains[(a, b)] = chain
            for u, v in zip(chain, chain[1:]):
                w = 1.0 + (u not in self.real) + (v not in self.real)
                w = {1.0: 1.0, 2.0: 2.0, 3.0: 8.0}[w]  # Gansner et al.'s omega
                self.down[u].append((v, w))
                self.up[v].append((u, w))
        for lv in self.levels:
            lv.sort(key=self.key.__getitem__)

    # -- ordering -------------------------------------------------------------------------
    def _pos(self) -> dict[Any, int]:
        return {n: i for lv in self.levels for i, n in enumerate(lv)}

    def crossings(self, levels: list[list[Any]] | None = None) -> int:
        levels = levels or self.levels
        pos = {n: i for lv in levels for i, n in enumerate(lv)}
        total = 0
        for li in range(len(levels) - 1):
            pairs = [(pos[u], pos[v]) for u in levels[li] for v, _ in self.down[u]]
            total += _inversions(pairs, len(levels[li + 1]))
        return total

    def _sweep(self, downward: bool) -> None:
        pos = self._pos()
        rng = range(1, len(self.levels)) if downward else range(len(self.levels) - 2, -1, -1)
        for li in rng:
            lv = self.levels[li]
            nb = self.up if downward else self.down
            fixed: dict[int, Any] = {}
            movable = []
            for i, n in enumerate(lv):
                ps = [pos[m] for m, _ in nb[n]]
                if ps:
                    movable.append((sum(ps) / len(ps), i, n))
                else:
                    fixed[i] = n
            movable.sort(key=lambda t: (t[0], t[1]))
            it = iter(movable)
            new = [fixed[i] if i in fixed else next(it)[2] for i in range(len(lv))]
            self.levels[li] = new
            for i, n in enumerate(new):
                pos[n] = i

    def _nbpos(self, pos: dict[Any, int], lv: list[Any]) -> dict[Any, tuple[list[int], list[int]]]:
        """Sorted positions of each node's neighbours above and below (layers held)."""
        return {n: (sorted(pos[m] for m, _ in self.up[n]), sorted(pos[m] for m, _ in self.down[n]))
                for n in lv}

    @staticmethod
    def _pair_cost(a: tuple[list[int], list[int]], b: tuple[list[int], list[int]]) -> int:
        """Crossings among the edges of two nodes of a layer, ``a`` left of ``b``: an edge
        of a to x crosses one of b to y < x."""
        c = 0
        for na, nb in zip(a, b):
            if na and nb:
                c += sum(bisect_left(nb, x) for x in na)
        return c

    def _transpose(self, rounds: int = 4) -> None:
        pos = self._pos()
        for _ in range(rounds):
            improved = False
            for lv in self.levels:
                if len(lv) < 2:
                    continue
                nbp = self._nbpos(pos, lv)
                for i in range(len(lv) - 1):
                    v, w = lv[i], lv[i + 1]
                    if self._pair_cost(nbp[w], nbp[v]) < self._pair_cost(nbp[v], nbp[w]):
                        lv[i], lv[i + 1] = w, v
                        pos[v], pos[w] = i + 1, i
                        improved = True
            if not improved:
                break

    def _sift(self) -> None:
        """Each node in turn moved to the place in its layer with the fewest crossings
        (its neighbours' layers held)."""
        pos = self._pos()
        for lv in self.levels:
            if len(lv) < 2:
                continue
            nbp = self._nbpos(pos, lv)
            for v in sorted(lv, key=lambda n: (-(len(self.up[n]) + len(self.down[n])), pos[n])):
                rest = [w for w in lv if w is not v]
                pv = nbp[v]
                if not pv[0] and not pv[1]:
                    continue
                left = [self._pair_cost(pv, nbp[w]) for w in rest]  # v left of w
                cost = best = sum(left)
                at = 0
                for i, w in enumerate(rest):
                    cost += self._pair_cost(nbp[w], pv) - left[i]
                    if cost < best:
                        best, at = cost, i + 1
                lv[:] = rest[:at] + [v] + rest[at:]
                for i, n in enumerate(lv):
                    pos[n] = i

    def order(self, iterations: int = 24) -> int:
        best = [list(lv) for lv in self.levels]
        best_c = self.crossings()
        stale = 0
        for it in range(iterations):
            if best_c == 0:
                break
            self._sweep(downward=it % 2 == 0)
            self._transpose()
            c = self.crossings()
            if c < best_c:
                best, best_c, stale = [list(lv) for lv in self.levels], c, 0
            else:
                stale += 1
                if stale >= 6:
                    break
        self.levels = [list(lv) for lv in best]
        for _ in range(4):  # then sifting, from the best order the sweeps found
            if best_c == 0:
                break
            self._sift()
            self._transpose()
            c = self.crossings()
            if c >= best_c:
                break
            best, best_c = [list(lv) for lv in self.levels], c
        # nodes with no edge here (an input only shape bookkeeping read) go first: left
        self.levels = [[n for n in lv if not (self.up[n] or self.down[n])]
                       + [n for n in lv if self.up[n] or self.down[n]] for lv in best]
        return best_c

    # -- coordinates ----------------------------------------------------------------------
    def _width(self, n: Any) -> float:
        return NODE_W if n in self.real else DUMMY_W

    def _sep(self, a: Any, b: Any) -> float:
        gap = GAP_X if (a in self.real and b in self.real) else DUMMY_GAP
        return (self._width(a) + self._width(b)) / 2 + gap

    def _place(self, lv: list[Any], desired: list[float], weights: list[float]) -> list[float]:
        """Centres closest (weighted least squares) to ``desired`` keeping order and gaps:
        pool-adjacent-violators on the targets shifted by the cumulative gaps."""
        off = [0.0]
        for a, b in zip(lv, lv[1:]):
            off.append(off[-1] + self._sep(a, b))
        blocks: list[list[float]] = []  # [value, weight, count]
        for t, w in zip((d - o for d, o in zip(desired, off)), weights):
            blocks.append([t, w, 1])
            while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
                v2, w2, c2 = blocks.pop()
                v1, w1, c1 = blocks.pop()
                blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
        out = []
        for v, _, c in blocks:
            out.extend([v] * c)
        return [y + o for y, o in zip(out, off)]

    def coordinates(self, passes: int = 8) -> dict[Any, float]:
        x: dict[Any, float] = {}
        for lv in self.levels:
            cur = 0.0
            for i, n in enumerate(lv):
                if i:
                    cur += self._sep(lv[i - 1], n)
                x[n] = cur
        for p in range(passes):
            final = p >= passes - 2
            downward = p % 2 == 0
            rng = range(len(self.levels)) if downward else range(len(self.levels) - 1, -1, -1)
            for li in rng:
                lv = self.levels[li]
                if not lv:
                    continue
                desired, weights = [], []
                for n in lv:
                    nbs = (self.up[n] + self.down[n]) if final else (self.up[n] if downward else self.down[n])
                    tw = sum(w for _, w in nbs)
                    if tw:
                        desired.append(sum(x[m] * w for m, w in nbs) / tw)
                        weights.append(tw)
                    else:
                        desired.append(x[n])
                        weights.append(0.05)
                for n, v in zip(lv, self._place(lv, desired, weights)):
                    x[n] = v
        return x

    def _straighten(self, x: dict[Any, float]) -> None:
        """Put each long edge on one vertical line where its layers have room: the source's
        centre, the target's, or the median of its bends."""
        where = {n: (li, i) for li, lv in enumerate(self.levels) for i, n in enumerate(lv)}
        for _ in range(2):
            for (a, b), chain in self.chains.items():
                dummies = chain[1:-1]
                if not dummies:
                    continue
                xs = sorted(x[d] for d in dummies)
                for t in (x[a], x[b], xs[len(xs) // 2]):
                    ok = True
                    for d in dummies:
                        li, i = where[d]
                        lv = self.levels[li]
                        if (i > 0 and x[lv[i - 1]] + self._sep(lv[i - 1], d) > t + 1e-6) or \
                                (i + 1 < len(lv) and t + self._sep(d, lv[i + 1]) > x[lv[i + 1]] + 1e-6):
                            ok = False
                            break
                    if ok:
                        for d in dummies:
                            x[d] = t
                        break
                else:  # no room for one line: fewer bends, each bend where it must be
                    for seq in (dummies, dummies[::-1]):
                        for prev, d in zip(seq, seq[1:]):
                            t = x[prev]
                            li, i = where[d]
                            lv = self.levels[li]
                            if not ((i > 0 and x[lv[i - 1]] + self._sep(lv[i - 1], d) > t + 1e-6) or
                                    (i + 1 < len(lv) and t + self._sep(d, lv[i + 1]) > x[lv[i + 1]] + 1e-6)):
                                x[d] = t

    def run(self) -> Layout:
        self.order()
        cx = self.coordinates()
        self._straighten(cx)
        if not cx:
            return Layout({}, {}, 0, 0, "python")
        left = min(cx[n] - self._width(n) / 2 for n in cx)
        tops, bands = [], []
        y = MARGIN
        for lv in self.levels:
            hs = [self.heights.get(n, NODE_H) for n in lv if n in self.real]
            band = max(hs) if hs else NODE_H // 2
            tops.append(y)
            bands.append(band)
            y += band + GAP_Y
        pos = {}
        width = 0
        height = 0
        for n in self.nodes:
            px = int(round(cx[n] - NODE_W / 2 - left)) + MARGIN
            py = tops[self.layer[n]]
            pos[n] = (px, py)
            width = max(width, px + NODE_W + MARGIN)
            height = max(height, py + self.heights.get(n, NODE_H) + MARGIN)
        routes = {}
        for (a, b), chain in self.chains.items():
            if len(chain) == 2:
                continue
            pts: list[float] = []
            x0, y0 = pos[a][0] + NODE_W / 2, pos[a][1] + self.heights.get(a, NODE_H)
            for d in chain[1:-1]:
                li = d[2]
                dx = cx[d] - left + MARGIN
                seg = default_curve(x0, y0, dx, tops[li])
                pts.extend(seg if not pts else seg[2:])
                yb = tops[li] + bands[li]
                pts.extend([dx, tops[li] + bands[li] / 3, dx, tops[li] + 2 * bands[li] / 3, dx, yb])
                x0, y0 = dx, yb
            seg = default_curve(x0, y0, pos[b][0] + NODE_W / 2, pos[b][1] - 2)
            pts.extend(seg[2:])
            routes[(a, b)] = [int(round(v)) for v in pts]
        return Layout(pos, routes, width, height, "python")


def python_layout(nodes: list[Hashable], heights: dict[Hashable, int],
                  edges: list[tuple[Hashable, Hashable]]) -> Layout:
    """The pure-Python layered layout (see the module docstring). ``nodes`` in fx order
    (topological), ``edges`` between them."""
    if not nodes:
        return Layout({}, {}, 0, 0, "python")
    try:
        return _Sugiyama(list(nodes), heights, list(edges)).run()
    except Exception:  # noqa: BLE001 - a page with a plain layout beats no page
        return _stack_layout(list(nodes), heights)


def _stack_layout(nodes: list[Hashable], heights: dict[Hashable, int]) -> Layout:
    """One box per row in fx order: the layout of last resort."""
    pos, y = {}, MARGIN
    for n in nodes:
        pos[n] = (MARGIN, y)
        y += heights.get(n, NODE_H) + GAP_Y
    return Layout(pos, {}, NODE_W + 2 * MARGIN, y - GAP_Y + MARGIN, "python")


# --------------------------------------------------------------------------------------
# Graphviz dot


class DotFailed(RuntimeError):
    pass


def _dot_source(nodes: list[Hashable], heights: dict[Hashable, int],
                edges: list[tuple[Hashable, Hashable]]) -> str:
    ids = {n: i for i, n in enumerate(nodes)}
    out = [f'digraph g{{graph[rankdir=TB,nodesep={GAP_X / 72:.4f},ranksep={GAP_Y / 72:.4f}];'
           f'node[shape=box,fixedsize=true,width={NODE_W / 72:.4f},label=""];'
           'edge[arrowhead=none];']
    for n in nodes:
        out.append(f"n{ids[n]}[height={heights.get(n, NODE_H) / 72:.4f}];")
    for a, b in edges:
        out.append(f"n{ids[a]}->n{ids[b]};")
    out.append("}\n")
    return "".join(out)


def _parse_plain(block: list[str], nodes: list[Hashable], heights: dict[Hashable, int],
                 edges: list[tuple[Hashable, Hashable]]) -> Layout:
    H = 0.0
    centre: dict[Hashable, tuple[float, float]] = {}
    splines: dict[tuple[Hashable, Hashable], list[float]] = {}
    for line in block:
        f = line.split()
        if f[0] == "graph":
            H = float(f[3])
        elif f[0] == "node":
            centre[nodes[int(f[1][1:])]] = (float(f[2]) * 72, (H - float(f[3])) * 72)
        elif f[0] == "edge":
            a, b, k = nodes[int(f[1][1:])], nodes[int(f[2][1:])], int(f[3])
            pts = []
            for i in range(k):
                pts += [float(f[4 + 2 * i]) * 72, (H - float(f[5 + 2 * i])) * 72]
            splines.setdefault((a, b), pts)
    if len(centre) != len(nodes):
        raise DotFailed(f"dot placed {len(centre)} of {len(nodes)} nodes")
    ranks = sorted({round(c[1], 1) for c in centre.values()})
    rank = {n: bisect_left(ranks, round(c[1], 1)) for n, c in centre.items()}
    kept = {}
    for a, b in edges:
        pts = splines.get((a, b))
        if pts is None or rank[b] - rank[a] <= 1 or len(pts) < 8 or (len(pts) - 2) % 6:
            continue  # one layer down: the default curve, from box centre to box centre
        kept[(a, b)] = pts
    left = min([c[0] - NODE_W / 2 for c in centre.values()]
               + [v for pts in kept.values() for v in pts[0::2]])
    top = min([c[1] - heights.get(n, NODE_H) / 2 for n, c in centre.items()]
              + [v for pts in kept.values() for v in pts[1::2]])
    sx, sy = MARGIN - left, MARGIN - top
    pos = {n: (int(round(c[0] - NODE_W / 2 + sx)), int(round(c[1] - heights.get(n, NODE_H) / 2 + sy)))
           for n, c in centre.items()}
    routes = {e: [int(round(v + (sx if i % 2 == 0 else sy))) for i, v in enumerate(pts)]
              for e, pts in kept.items()}
    width = max(p[0] for p in pos.values()) + NODE_W + MARGIN
    height = max(p[1] + heights.get(n, NODE_H) for n, p in pos.items()) + MARGIN
    for pts in routes.values():
        width = max(width, max(pts[0::2]) + MARGIN)
        height = max(height, max(pts[1::2]) + MARGIN)
    return Layout(pos, routes, width, height, "dot")


def dot_layouts(jobs: list[tuple[list[Hashable], dict[Hashable, int], list[tuple[Hashable, Hashable]]]],
                *, timeout_s: float = DOT_TIMEOUT_S, exe: str | None = None) -> list[Layout]:
    """Lay out every (nodes, heights, edges) job with one ``dot -Tplain`` run. Raises
    DotFailed (missing program, timeout, bad exit, unreadable output)."""
    exe = exe or shutil.which("dot")
    if exe is None:
        raise DotFailed("Graphviz's dot is not installed")
    todo = [i for i, (nodes, _, _) in enumerate(jobs) if nodes]
    out: list[Layout] = [Layout({}, {}, 0, 0, "dot") for _ in jobs]
    if not todo:
        return out
    src = "".join(_dot_source(*jobs[i]) for i in todo)
    try:
        res = subprocess.run([exe, "-Tplain"], input=src.encode("utf-8"), capture_output=True,
                             timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as e:
        raise DotFailed(f"dot took over {timeout_s:g} s") from e
    except OSError as e:
        raise DotFailed(f"dot could not run: {e}") from e
    if res.returncode != 0:
        raise DotFailed(f"dot exit {res.returncode}: "
                        f"{res.stderr.decode('utf-8', 'replace').strip()[-500:]}")
    blocks: list[list[str]] = [[]]
    for line in res.stdout.decode("utf-8", "replace").splitlines():
        if line.strip() == "stop":
            blocks.append([])
        elif line.strip():
            blocks[-1].append(line)
    blocks = [b for b in blocks if b]
    if len(blocks) != len(todo):
        raise DotFailed(f"dot returned {len(blocks)} layouts for {len(todo)} graphs")
    try:
        for i, block in zip(todo, blocks):
            out[i] = _parse_plain(block, *jobs[i])
    except (ValueError, IndexError, KeyError) as e:
        raise DotFailed(f"unreadable dot output: {e}") from e
    return out


# --------------------------------------------------------------------------------------
# the entry point


def engine_choice(engine: str | None = None) -> str:
    """``engine`` or ``$FXPASS_VIZ_LAYOUT`` or ``auto``, checked."""
    choice = engine or os.environ.get("FXPASS_VIZ_LAYOUT") or "auto"
    if choice not in ENGINES:
        from fxpass.errors import UsageError

        raise UsageError(f"layout engine must be one of {', '.join(ENGINES)}, got {choice!r}")
    return choice


def layout_all(jobs: list[tuple[list[Hashable], dict[Hashable, int], list[tuple[Hashable, Hashable]]]],
               engine: str | None = None, *, timeout_s: float = DOT_TIMEOUT_S
               ) -> tuple[list[Layout], str]:
    """Lay out every job (identical graphs once). Returns the layouts and a note: the
    engine used, and why dot was not (``python (dot failed: ...)``)."""
    choice = engine_choice(engine)
    keys, uniq, where = [], [], {}
    for nodes, heights, edges in jobs:
        ix = {n: i for i, n in enumerate(nodes)}
        key = (tuple(heights.get(n, NODE_H) for n in nodes),
               tuple((ix[a], ix[b]) for a, b in edges))
        if key not in where:
            where[key] = len(uniq)
            uniq.append((list(nodes), heights, list(edges)))
        keys.append(key)
    note = "python"
    done: list[Layout] | None = None
    if choice in ("auto", "dot") and shutil.which("dot") is not None:
        try:
            done = dot_layouts(uniq, timeout_s=timeout_s)
            note = "dot"
        except DotFailed as e:
            note = f"python (dot failed: {e})"
    elif choice == "dot":
        note = "python (dot is not installed)"
    if done is None:
        done = [python_layout(*job) for job in uniq]
    out = []
    for (nodes, _, edges), key in zip(jobs, keys):
        lay = done[where[key]]
        src = uniq[where[key]][0]
        if src == list(nodes):
            out.append(lay)
            continue
        m = dict(zip(src, nodes))  # same structure, other names
        out.append(Layout({m[n]: p for n, p in lay.pos.items()},
                          {(m[a], m[b]): r for (a, b), r in lay.routes.items()},
                          lay.width, lay.height, lay.engine))
    return out, note
