"""The one place rewrite rules are registered, in the order they run."""

from __future__ import annotations

from fxpass.rewrite.base import Rule
from fxpass.rewrite.contiguity import Contiguity
from fxpass.rewrite.linear import LinearToVllm
from fxpass.rewrite.probes import WeightProbes


def rules(*, fuse: bool = False) -> list[Rule]:
    """Linear swap first (it plans the layers the others look at), then graph fixes."""
    out: list[Rule] = [LinearToVllm(), WeightProbes(), Contiguity()]
    return out
