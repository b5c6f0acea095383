"""The layout fxpass.viz used before the crossing-minimising one (commit 542b310,
``fxpass/viz/model.py:_layout``), kept verbatim as the baseline the layout tests measure
edge crossings against."""

from __future__ import annotations

import math

import networkx as nx

from fxpass.viz.model import GAP_X, GAP_Y, MARGIN, NODE_H, NODE_W


def baseline_layout(g: nx.DiGraph) -> tuple[int, int]:
    """Layered top-down layout; sets x, y (box top-left) on every node. Returns (w, h).

    Layers are networkx topological generations; sources (inputs, attributes) are then
    pulled down next to their first consumer, and each layer is placed left to right by
    the mean x of its inputs (a one-pass barycenter), so chains stay straight.
    """
    if g.number_of_nodes() == 0:
        return 0, 0
    layer: dict[str, int] = {}
    for i, gen in enumerate(nx.topological_generations(g)):
        for n in gen:
            layer[n] = i
    for n in g.nodes:
        if g.in_degree(n) == 0 and g.out_degree(n) > 0:
            layer[n] = max(0, min(layer[s] for s in g.successors(n)) - 1)
    by_layer: dict[int, list[str]] = {}
    for n in sorted(g.nodes, key=lambda n: g.nodes[n]["index"]):
        by_layer.setdefault(layer[n], []).append(n)
    step = NODE_W + GAP_X
    xs: dict[str, float] = {}
    for li in sorted(by_layer):
        nodes = by_layer[li]
        want: dict[str, float] = {}
        sources = []
        for n in nodes:
            preds = [xs[p] for p in g.predecessors(n) if p in xs]
            if preds:
                want[n] = sum(preds) / len(preds)
            else:
                sources.append(n)
        for n in sources:
            # a source (input, attribute): right of the other inputs of its first consumer,
            # so the consumer's main input stays straight above it
            succ = min(g.successors(n), key=lambda s: g.nodes[s]["index"], default=None)
            others = [xs.get(p, want.get(p)) for p in g.predecessors(succ)] if succ else []
            others = [x for x in others if x is not None]
            want[n] = (max(others) + step) if others else 0.0
        x_prev = -math.inf
        for n in sorted(nodes, key=lambda n: (want[n], g.nodes[n]["index"])):
            x = max(want[n], x_prev + step)
            xs[n] = x
            x_prev = x
    x0 = min(xs.values())
    tops: dict[int, int] = {}
    y = MARGIN
    for li in sorted(by_layer):
        tops[li] = y
        y += max(g.nodes[n].get("h", NODE_H) for n in by_layer[li]) + GAP_Y
    width = 0
    height = 0
    for n, x in xs.items():
        d = g.nodes[n]
        d["x"] = int(round(x - x0)) + MARGIN
        d["y"] = tops[layer[n]]
        width = max(width, d["x"] + NODE_W + MARGIN)
        height = max(height, d["y"] + d.get("h", NODE_H) + MARGIN)
    g.graph["width"], g.graph["height"] = width, height
    return width, height
