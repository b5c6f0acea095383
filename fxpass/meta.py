"""fxpass's annotations on fx nodes.

Everything fxpass learns about a node lives in ``node.meta["fxpass"]`` (a dict), never in
ad-hoc attributes, so passes can read it and fx copies it along with the node.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

KEY = "fxpass"


def info(node: fx.Node) -> dict[str, Any]:
    """The fxpass annotation dict of ``node`` (created empty on first use)."""
    return node.meta.setdefault(KEY, {})


def get(node: fx.Node, name: str, default: Any = None) -> Any:
    return node.meta.get(KEY, {}).get(name, default)
