"""The one place rewrite rules are registered, in the order they run."""

from __future__ import annotations

from fxpass.rewrite.attention import SdpaFullMask
from fxpass.rewrite.base import Rule
from fxpass.rewrite.contiguity import Contiguity
from fxpass.rewrite.elementwise import InplaceElementwise
from fxpass.rewrite.fusion import SiblingFusion
from fxpass.rewrite.linear import LinearToVllm
from fxpass.rewrite.probes import WeightProbes


def rules() -> list[Rule]:
    """Linear swap first (it plans the layers the others look at), then the opt-in speed rules
    (they match nothing unless the context says fuse), then the graph fixes."""
    return [LinearToVllm(), SiblingFusion(), InplaceElementwise(), WeightProbes(), Contiguity(),
            SdpaFullMask()]
