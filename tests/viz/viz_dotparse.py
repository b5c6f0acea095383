"""A strict parser for the DOT language subset (all of DOT's statement forms, no HTML
labels, no ports), so tests check fxpass's DOT without pydot (whose pyparsing grammar takes
over a minute on a tower's graph). Graphviz's own parser runs in the SVG tests."""

from __future__ import annotations

import dataclasses
import re

_TOKEN = re.compile(r'\s+|//[^\n]*|/\*.*?\*/|"(?:[^"\\]|\\.)*"|->|--|[{}\[\];,=:]'
                    r'|[A-Za-z_\x80-\U0010ffff][\w\x80-\U0010ffff]*|-?(?:\.\d+|\d+(?:\.\d*)?)',
                    re.S)


def _unquote(tok: str) -> str:
    if not tok.startswith('"'):
        return tok
    return re.sub(r'\\(.)', lambda m: m.group(1) if m.group(1) in '"\\' else m.group(0),
                  tok[1:-1], flags=re.S)


def tokenize(text: str) -> list[tuple[str, bool]]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise SyntaxError(f"DOT: unexpected character {text[pos]!r} at offset {pos}")
        tok = m.group(0)
        pos = m.end()
        if tok.isspace() or tok.startswith(("//", "/*")):
            continue
        is_id = tok.startswith('"') or tok[0].isalnum() or tok[0] in "_-." or ord(tok[0]) > 127
        out.append((tok, is_id))
    return out


@dataclasses.dataclass
class DotGraph:
    directed: bool
    nodes: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    edges: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    subgraphs: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)


class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = tokenize(text)
        self.i = 0

    def peek(self) -> str | None:
        return self.toks[self.i][0] if self.i < len(self.toks) else None

    def take(self, want: str | None = None) -> str:
        if self.i >= len(self.toks):
            raise SyntaxError(f"DOT: unexpected end, expected {want or 'a token'}")
        tok, _ = self.toks[self.i]
        if want is not None and tok != want:
            raise SyntaxError(f"DOT: expected {want!r}, got {tok!r} (token {self.i})")
        self.i += 1
        return tok

    def ident(self) -> str:
        tok, is_id = self.toks[self.i] if self.i < len(self.toks) else (None, False)
        if not is_id:
            raise SyntaxError(f"DOT: expected an ID, got {tok!r} (token {self.i})")
        self.i += 1
        return _unquote(tok)

    def attrs(self) -> dict[str, str]:
        out: dict[str, str] = {}
        while self.peek() == "[":
            self.take("[")
            while self.peek() != "]":
                k = self.ident()
                self.take("=")
                out[k] = self.ident()
                if self.peek() in (",", ";"):
                    self.take()
            self.take("]")
        return out

    def parse(self) -> DotGraph:
        if self.peek() == "strict":
            self.take()
        kind = self.take()
        if kind not in ("digraph", "graph"):
            raise SyntaxError(f"DOT: expected digraph/graph, got {kind!r}")
        g = DotGraph(kind == "digraph")
        if self.peek() != "{":
            self.ident()
        self.stmts(g, "<top>")
        if self.i != len(self.toks):
            raise SyntaxError(f"DOT: trailing tokens from {self.i}")
        return g

    def stmts(self, g: DotGraph, name: str) -> None:
        self.take("{")
        while self.peek() != "}":
            self.stmt(g, name)
            if self.peek() == ";":
                self.take()
        self.take("}")

    def stmt(self, g: DotGraph, current: str) -> None:
        tok = self.peek()
        if tok in ("graph", "node", "edge"):
            self.take()
            a = self.attrs()
            if tok == "graph" and current in g.subgraphs:
                g.subgraphs[current].update(a)
            return
        if tok in ("subgraph", "{"):
            name = f"<anon {self.i}>"
            if tok == "subgraph":
                self.take()
                if self.peek() != "{":
                    name = self.ident()
            g.subgraphs[name] = {}
            self.stmts(g, name)
            return
        first = self.ident()
        if self.peek() == "=":
            self.take()
            self.ident()
            return
        chain = [first]
        arrow = "->" if g.directed else "--"
        while self.peek() in ("->", "--"):
            self.take(arrow)
            chain.append(self.ident())
        a = self.attrs()
        if len(chain) == 1:
            g.nodes.setdefault(first, {}).update(a)
        else:
            for n in chain:
                g.nodes.setdefault(n, {})
            g.edges.extend(zip(chain, chain[1:]))


def parse_dot(text: str) -> DotGraph:
    return _Parser(text).parse()
