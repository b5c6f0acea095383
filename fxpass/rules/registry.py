"""The one place rewrite rules are registered, in the order they run."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from fxpass.rewrite.attention import SdpaFullMask
from fxpass.rewrite.base import Rule
from fxpass.rewrite.contiguity import Contiguity
from fxpass.rewrite.conv import PatchConvAsGemm
from fxpass.rewrite.elementwise import InplaceElementwise
from fxpass.rewrite.fusion import SiblingFusion
from fxpass.rewrite.layout import ContiguousStream
from fxpass.rewrite.linear import LinearToVllm
from fxpass.rewrite.norms import RmsNormToVllm
from fxpass.rewrite.probes import WeightProbes
from fxpass.rewrite.rope import MultidimRope
from fxpass.rewrite.tensor_parallel import TensorParallel


_disabled: set[str] = set()

# the opt-in speed rules (fuse=True), by name: `fxpass bench --only rules` measures each one
SPEED_RULES = ("fusion", "patch-conv", "rms-norm", "rope", "layout", "elementwise")


@contextlib.contextmanager
def disabled(*names: str) -> Iterator[None]:
    """Rules left out of :func:`rules` inside the block (measuring a rule's gain)."""
    added = set(names) - _disabled
    _disabled.update(added)
    try:
        yield
    finally:
        _disabled.difference_update(added)


def rules() -> list[Rule]:
    """Linear swap first (it plans the layers the others look at), then tensor-parallel
    sharding (matches nothing unless the context says tp > 1; it fuses its own column groups),
    then the opt-in speed rules (they match nothing unless the context says fuse; the norm,
    rope and layout rules before the in-place one, which reads what they produce), then the
    graph fixes."""
    every = [LinearToVllm(), TensorParallel(), SiblingFusion(), PatchConvAsGemm(),
             RmsNormToVllm(), MultidimRope(), ContiguousStream(), InplaceElementwise(),
             WeightProbes(), Contiguity(), SdpaFullMask()]
    return [r for r in every if r.name not in _disabled] if _disabled else every
