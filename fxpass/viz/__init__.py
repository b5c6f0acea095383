"""Stage 4: see a tower, its rewrite and the numeric diff.

``render_html(trace, report, verify, before)`` gives one self-contained HTML page (module
tree collapsible, each traced module's graph, rewritten call sites highlighted, Python-left
modules as opaque boxes, fixes marked, before/after views, the verify overlay);
``render_dot`` / ``render_svg`` give static output; ``write(path, fmt, ...)`` writes any of
them. ``snapshot(trace)`` keeps the "before" graphs: call it between ``fxpass.trace`` and
``fxpass.apply(trace_result=trace)``, which edits the Trace's graphs in place::

    tr = fxpass.trace(tower, inputs)
    before = fxpass.viz.snapshot(tr)
    report = fxpass.apply(tower, quant_config, trace_result=tr, load_weights=True)
    fxpass.viz.write("tower.html", "html", tr, report=report, before=before)

The graph model (networkx) is :mod:`fxpass.viz.model`; the verify adapter is
:func:`fxpass.viz.overlay.overlay_from_verify`. ``add_cli(subparsers)`` registers the
``fxpass viz`` command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fxpass.errors import UsageError
from fxpass.viz.dot import MissingToolError, to_dot, to_svg
from fxpass.viz.html import render_html as _render_html
from fxpass.viz.model import VizModel, build_model, snapshot
from fxpass.viz.overlay import Overlay, overlay_from_verify

__all__ = ["FORMATS", "MissingToolError", "Overlay", "VizModel", "add_cli", "build_model",
           "overlay_from_verify", "render", "render_dot", "render_html", "render_svg",
           "snapshot", "write"]

FORMATS = ("html", "svg", "dot")


def _model(trace: Any, report: Any, verify: Any, before: Any, title: str | None,
           layout: str | None = None) -> VizModel:
    if isinstance(trace, VizModel):
        return trace
    return build_model(trace, report, verify, before, title=title, layout=layout)


def render_html(trace: Any, report: Any = None, verify: Any = None, before: Any = None, *,
                title: str | None = None, expand_depth: int = 1,
                layout: str | None = None) -> str:
    """One self-contained HTML page (str). ``trace``: a Trace (or a built VizModel);
    ``report``: apply's Report; ``verify``: a VerifyReport or its ``to_dict()``; ``before``:
    ``snapshot(trace)`` taken before apply, or a Trace of an untouched copy.
    ``expand_depth``: tree levels open on load (1: the root's graph and its children).
    ``layout``: the graphs' layout engine, ``auto`` (Graphviz dot when installed, else pure
    Python), ``dot`` or ``python``; None reads ``$FXPASS_VIZ_LAYOUT``."""
    return _render_html(_model(trace, report, verify, before, title, layout),
                        expand_depth=expand_depth)


def render_dot(trace: Any, report: Any = None, verify: Any = None, before: Any = None, *,
               title: str | None = None, view: str = "after") -> str:
    """Graphviz DOT source (needs nothing installed)."""
    return to_dot(_model(trace, report, verify, before, title, "none"), view)


def render_svg(trace: Any, report: Any = None, verify: Any = None, before: Any = None, *,
               title: str | None = None, view: str = "after") -> str:
    """SVG laid out by Graphviz ``dot`` (MissingToolError, naming it, when not installed)."""
    return to_svg(_model(trace, report, verify, before, title, "none"), view)


def render(fmt: str, trace: Any, report: Any = None, verify: Any = None, before: Any = None,
           **kw: Any) -> str:
    if fmt not in FORMATS:
        raise UsageError(f"unknown viz format {fmt!r}; expected one of {', '.join(FORMATS)}")
    fn = {"html": render_html, "svg": render_svg, "dot": render_dot}[fmt]
    return fn(trace, report, verify, before, **kw)


def write(path: str | Path, fmt: str | None = None, trace: Any = None, report: Any = None,
          verify: Any = None, before: Any = None, **kw: Any) -> Path:
    """Render and write ``path``; ``fmt`` None takes it from the suffix (.html/.svg/.dot)."""
    path = Path(path)
    if fmt is None:
        fmt = path.suffix.lstrip(".").lower() or "html"
        if fmt == "htm":
            fmt = "html"
        if fmt == "gv":
            fmt = "dot"
    if trace is None:
        raise UsageError("fxpass.viz.write needs a Trace (trace=fxpass.trace(...))")
    text = render(fmt, trace, report, verify, before, **kw)
    if path.parent and not path.parent.exists():
        raise UsageError(f"cannot write {path}: directory {path.parent} does not exist")
    path.write_text(text, encoding="utf-8")
    return path


def add_cli(subparsers: Any) -> Any:
    """Register ``fxpass viz`` on an argparse subparsers object (see fxpass.viz.cli)."""
    from fxpass.viz.cli import add_cli as _add

    return _add(subparsers)
