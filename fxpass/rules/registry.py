"""The one place rewrite rules are registered; :func:`select` builds a session's list.

A new rule is a class in its own file under ``fxpass/rules/`` (``RuleBase`` or
``SpeedRule`` for the defaults), added to ``RULES`` below. The session runs the rules that
are ``enabled`` for its options and mode, by phase, then registry order, each after the rules
it names in ``after`` (as vLLM's pass manager builds its pass list from its config).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import networkx as nx

from fxpass.errors import UsageError
from fxpass.parallel.rule import TensorParallel
from fxpass.rules.base import Mode, Options, Rule
from fxpass.rules.contiguity import Contiguity
from fxpass.rules.conv import PatchConvAsGemm
from fxpass.rules.elementwise import InplaceElementwise
from fxpass.rules.fp32_gemm import Fp32CpuGemm
from fxpass.rules.fusion import FusedSlices, SiblingFusion
from fxpass.rules.layout import ContiguousStream
from fxpass.rules.linear import LinearToVllm
from fxpass.rules.mm_attention import MMEncoderAttentionRule
from fxpass.rules.norms import RmsNormToVllm
from fxpass.rules.probes import WeightProbes
from fxpass.rules.rope import MultidimRope
from fxpass.rules.sdpa_mask import SdpaFullMask

RULES: tuple[type[Rule], ...] = (
    LinearToVllm, TensorParallel, SiblingFusion, FusedSlices, Fp32CpuGemm, PatchConvAsGemm,
    RmsNormToVllm,
    MultidimRope, ContiguousStream, InplaceElementwise, WeightProbes, Contiguity, SdpaFullMask,
    MMEncoderAttentionRule,
)

# the opt-in speed rules (fuse=True), by name: `fxpass bench --only rules` measures each one
SPEED_RULES = ("fusion", "fp32-gemm", "patch-conv", "rms-norm", "rope", "layout",
               "elementwise")

_disabled: set[str] = set()


def names() -> list[str]:
    return [r.name for r in RULES]


@contextlib.contextmanager
def disabled(*names_: str) -> Iterator[None]:
    """Rules left out of every session inside the block (measuring a rule's gain)."""
    check_names(names_, "fxpass.rules.registry.disabled")
    added = set(names_) - _disabled
    _disabled.update(added)
    try:
        yield
    finally:
        _disabled.difference_update(added)


def check_names(given: object, where: str) -> None:
    """UsageError naming the unknown rule names in ``given`` and the valid ones."""
    known = names()
    unknown = [n for n in given if n not in known]  # type: ignore[attr-defined]
    if unknown:
        raise UsageError(f"{where}: unknown rule name(s) {', '.join(map(repr, unknown))}; "
                         f"the rules are: {', '.join(known)}")


def select(options: Options, mode: Mode) -> list[Rule]:
    """The rules a session with these options runs in this mode, in the order they run."""
    off = options.disabled | _disabled
    chosen = [cls() for cls in RULES if cls.name not in off]
    chosen = [r for r in chosen if r.enabled(options, mode)]
    order = {r.name: (int(r.phase), i) for i, r in enumerate(chosen)}
    g = nx.DiGraph()
    g.add_nodes_from(order)
    for r in chosen:
        g.add_edges_from((before, r.name) for before in r.after if before in order)
    by_name = {r.name: r for r in chosen}
    try:
        ordered = list(nx.lexicographical_topological_sort(g, key=order.__getitem__))
    except nx.NetworkXUnfeasible as e:
        raise UsageError(f"the rules' `after` declarations form a cycle: "
                         f"{nx.find_cycle(g)}") from e
    return [by_name[n] for n in ordered]


__all__ = ["RULES", "SPEED_RULES", "check_names", "disabled", "names", "select"]
