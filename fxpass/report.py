"""The report ``fxpass.apply`` returns; the CLI, CI and the visualisation all read this one.

A rewrite session does not fill a report: its rules emit :class:`Event` records into an
:class:`EventLog` (a swap, a fix, a refusal, a shard, a fusion, ...), and :class:`Report` is
a read-only view built from that log. The first call of a tower ``apply`` had no inputs for
appends to the same log, so the report the caller holds shows what the first call learnt.
"""

from __future__ import annotations

import collections

import copy
import dataclasses
import json
import threading
import types
from collections.abc import Mapping
from typing import Any, Literal


@dataclasses.dataclass(frozen=True)
class Fix:
    """One graph edit a rule made besides the linear swap (a probe folded, a contiguous())."""

    rule: str
    module: str  # qualified name of the graph's module
    node: str  # the node as fx formats it, before the edit
    detail: str

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


EventKind = Literal[
    "swap",         # target: a linear now a vLLM layer; data: method
    "placement",    # target: a swapped linear; data: graph (a graph calls it) or why not
    "placements-reset",  # forget placements (the first call states them all again)
    "skip",         # target: a linear left as nn.Linear; data: reason
    "fusion",       # target: the fused layer; data: members, method
    "fix",          # data: fix (a Fix)
    "check",        # a contiguity check left in a graph
    "refusal",      # target: what the rule looked at (its describe); data: reason
    "untraced",     # target: a module that stays Python; data: reason
    "scope",        # target: a module traced again at the first call (its old fixes and
                    # untraced records go)
    "shard",        # target: a linear sharded; data: style
    "replicated",   # target: a linear left replicated under tp; data: reason
    "tp-pair",      # data: pair (the sharded pair's record)
]


@dataclasses.dataclass(frozen=True)
class Event:
    """One thing a rewrite session did or refused, emitted by the rule (or stage) ``rule``."""

    kind: EventKind
    rule: str
    target: str = ""
    data: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class EventLog:
    """The events of one ``apply`` (and of its first call), plus the session's facts
    (timings, where the graphs were traced, the first call's state)."""

    def __init__(self, prefix: str = "", tp: int = 1) -> None:
        self.prefix = prefix
        self.tp = tp
        self.events: list[Event] = []
        self.facts: dict[str, Any] = {
            "traced_at": "apply", "weights_loaded": False, "timings_s": {}, "first_call": {},
            "already_applied": False, "already_applied_with": {}, "already_applied_note": "",
            "tp_sharded_fraction": 0.0, "runtime": None}
        self.version = 0
        self.lock = threading.RLock()
        self._report: Report | None = None

    def emit(self, kind: EventKind, rule: str, target: str = "", **data: Any) -> None:
        with self.lock:
            self.events.append(Event(kind, rule, target, types.MappingProxyType(data)))
            self.version += 1

    def extend(self, events: list[Event]) -> None:
        with self.lock:
            self.events.extend(events)
            self.version += 1

    def set(self, fact: str, value: Any) -> None:
        with self.lock:
            self.facts[fact] = value
            self.version += 1

    def update(self, fact: str, **values: Any) -> dict[str, Any]:
        """Merge ``values`` into a dict fact (``timings_s``, ``first_call``); returns it."""
        with self.lock:
            self.facts[fact].update(values)
            self.version += 1
            return self.facts[fact]

    def count(self, kind: EventKind) -> int:
        return sum(1 for e in self.events if e.kind == kind)

    def report(self) -> "Report":
        """The report built from this log (one object: a caller's reference stays live)."""
        if self._report is None:
            self._report = Report(self)
        return self._report


def _inside(name: str, path: str) -> bool:
    return not path or name == path or name.startswith(path + ".")


@dataclasses.dataclass
class _State:
    """The report's fields, built from a log (see :meth:`Report._state`)."""

    swapped: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> method
    placements: dict[str, str | None] = dataclasses.field(default_factory=dict)  # None: graph
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    fused: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    fused_methods: dict[str, str] = dataclasses.field(default_factory=dict)
    fixes: list[Fix] = dataclasses.field(default_factory=list)
    checks: int = 0
    refusals: list[dict[str, str]] = dataclasses.field(default_factory=list)
    untraced: dict[str, str] = dataclasses.field(default_factory=dict)
    tp_styles: dict[str, str] = dataclasses.field(default_factory=dict)
    tp_replicated: dict[str, str] = dataclasses.field(default_factory=dict)
    tp_pairs: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @classmethod
    def build(cls, events: list[Event]) -> "_State":
        s = cls()
        for e in events:
            k, t, d = e.kind, e.target, e.data
            if k == "swap":
                s.swapped[t] = d["method"]
                s.skipped.pop(t, None)
            elif k == "placement":
                s.placements.pop(t, None)  # a new placement goes to the end, as it came
                s.placements[t] = None if d.get("graph") else d["why"]
            elif k == "placements-reset":
                s.placements.clear()
            elif k == "skip":
                s.skipped[t] = d["reason"]
                s.swapped.pop(t, None)
                s.placements.pop(t, None)
            elif k == "fusion":
                s.fused[t] = list(d["members"])
                s.fused_methods[t] = d["method"]
                for m in d["members"]:
                    if s.placements.get(m, "") is None:
                        del s.placements[m]
            elif k == "fix":
                s.fixes.append(d["fix"])
            elif k == "check":
                s.checks += 1
            elif k == "refusal":
                s.refusals.append({"rule": e.rule, "target": t, "reason": d["reason"]})
            elif k == "untraced":
                s.untraced[t] = d["reason"]
            elif k == "scope":
                s.fixes = [f for f in s.fixes if not _inside(f.module, t)]
                s.untraced = {m: r for m, r in s.untraced.items() if not _inside(m, t)}
            elif k == "shard":
                s.tp_styles[t] = d["style"]
            elif k == "replicated":
                s.tp_replicated[t] = d["reason"]
            elif k == "tp-pair":
                s.tp_pairs.append(dict(d["pair"]))
        return s


class Report:
    """What apply replaced, what it left alone and why, and what else it fixed.

    Read-only: every field is built from the session's :class:`EventLog` (the first call
    of a tower apply had no inputs for adds to it, and the report shows that at once), and
    what a field returns is a copy. ``replaced`` holds full prefixed names (``<prefix>.<
    qualified name>``), as vLLM's loaders and quant skip lists see them; the other dicts are
    keyed the same way.
    """

    __slots__ = ("_log", "_cache")

    def __init__(self, log: EventLog) -> None:
        self._log = log
        self._cache: tuple[int, _State] | None = None

    def _state(self) -> _State:
        log = self._log
        with log.lock:
            if self._cache is None or self._cache[0] != log.version:
                self._cache = (log.version, _State.build(log.events))
            return self._cache[1]

    @property
    def events(self) -> tuple[Event, ...]:
        """Every event of the session, in order (what the fields are built from)."""
        with self._log.lock:
            return tuple(self._log.events)

    @property
    def prefix(self) -> str:
        return self._log.prefix

    @property
    def tp(self) -> int:
        return self._log.tp

    @property
    def replaced(self) -> list[str]:
        s = self._state()
        members = [m for ms in s.fused.values() for m in ms]
        gone = set(members) | set(s.fused)
        return [n for n in s.swapped if n not in gone] + members

    @property
    def skipped(self) -> dict[str, str]:
        return dict(self._state().skipped)

    @property
    def graph_rewrites(self) -> list[str]:
        return [n for n, why in self._state().placements.items() if why is None]

    @property
    def plain_swaps(self) -> dict[str, str]:
        """Swapped linears no graph calls (name -> why)."""
        return {n: why for n, why in self._state().placements.items() if why is not None}

    @property
    def quant_methods(self) -> dict[str, str]:
        s = self._state()
        return {**s.swapped, **s.fused_methods}

    @property
    def fixes(self) -> list[Fix]:
        return list(self._state().fixes)

    @property
    def contiguity_checks(self) -> int:
        """vLLM GEMM inputs given a .contiguous() as a precaution (strides may change with
        shape)."""
        return self._state().checks

    @property
    def fused(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self._state().fused.items()}

    @property
    def refusals(self) -> list[dict[str, str]]:
        return [dict(r) for r in self._state().refusals]

    @property
    def untraced(self) -> dict[str, str]:
        return dict(self._state().untraced)

    @property
    def tp_styles(self) -> dict[str, str]:
        """Tensor parallelism (apply(..., tp=N)): each sharded linear's parallel style
        (ColumnParallelLinear, RowParallelLinear, QKVParallelLinear,
        MergedColumnParallelLinear)."""
        return dict(self._state().tp_styles)

    @property
    def tp_replicated(self) -> dict[str, str]:
        return dict(self._state().tp_replicated)

    @property
    def tp_pairs(self) -> list[dict[str, Any]]:
        return copy.deepcopy(self._state().tp_pairs)

    @property
    def tp_sharded_fraction(self) -> float:
        """The share of the tower's parameter bytes in sharded layers."""
        return self._log.facts["tp_sharded_fraction"]

    @property
    def already_applied(self) -> bool:
        return self._log.facts["already_applied"]

    @property
    def already_applied_with(self) -> dict[str, Any]:
        """For already_applied: the settings of the apply that rewrote the model ("module":
        where it was applied, "quant_config", "prefix", "fuse", "tp", "load_weights",
        "first_call")."""
        return dict(self._log.facts["already_applied_with"])

    @property
    def already_applied_note(self) -> str:
        """Where a second apply asked for other settings: why nothing changed, what to do."""
        return self._log.facts["already_applied_note"]

    @property
    def weights_loaded(self) -> bool:
        return self._log.facts["weights_loaded"]

    @property
    def traced_at(self) -> str:
        """"apply": traced on example inputs inside apply; "first call": apply had none, so
        the linears were swapped at init and the graphs come from the model's first call."""
        return self._log.facts["traced_at"]

    @property
    def first_call(self) -> dict[str, Any]:
        """For traced_at == "first call": state ("armed" until the first call, then
        "traced", or "python" when that trace failed: the tower runs as vLLM's walk left
        it), the call's wall time (trace + rewrite + the call through the graphs) and any
        error."""
        with self._log.lock:
            return copy.deepcopy(self._log.facts["first_call"])

    @property
    def timings_s(self) -> dict[str, float]:
        return dict(self._log.facts["timings_s"])

    @property
    def runtime(self) -> Any:
        """Live: graphs traced after apply (calls the first graphs did not cover) and calls
        served by Python, per module (``fxpass.runtime.RuntimeStats``)."""
        return self._log.facts["runtime"]

    @property
    def probes(self) -> list[Fix]:
        return [f for f in self.fixes if f.rule == "weight-probes"]

    @property
    def contiguity(self) -> list[Fix]:
        return [f for f in self.fixes if f.rule == "contiguity"]

    def counts(self) -> dict[str, int]:
        return {
            "replaced": len(self.replaced),
            "graph_rewrites": len(self.graph_rewrites),
            "plain_swaps": len(self.plain_swaps),
            "skipped": len(self.skipped),
            "probes": len(self.probes),
            "contiguity": len(self.contiguity),
            "contiguity_checks": self.contiguity_checks,
            "fused_groups": len(self.fused),
            "untraced_modules": len(self.untraced),
            "tp_column": sum(1 for v in self.tp_styles.values() if v != "RowParallelLinear"),
            "tp_row": sum(1 for v in self.tp_styles.values() if v == "RowParallelLinear"),
            "tp_replicated": len(self.tp_replicated),
        }

    def tp_dict(self) -> dict[str, Any]:
        """Each rewritten linear's parallel style, or "replicated" with the reason."""
        layers = {n: {"style": s} for n, s in self.tp_styles.items()}
        layers.update({n: {"style": "replicated", "reason": r}
                       for n, r in self.tp_replicated.items()})
        return {"size": self.tp, "layers": layers, "pairs": [dict(p) for p in self.tp_pairs],
                "sharded_fraction": round(self.tp_sharded_fraction, 6)}

    def to_dict(self) -> dict[str, Any]:
        out = {
            "prefix": self.prefix,
            "counts": self.counts(),
            "replaced": list(self.replaced),
            "skipped": dict(self.skipped),
            "graph_rewrites": list(self.graph_rewrites),
            "plain_swaps": dict(self.plain_swaps),
            "quant_methods": dict(self.quant_methods),
            "fixes": [f.to_dict() for f in self.fixes],
            "fused": {k: list(v) for k, v in self.fused.items()},
            "refusals": [dict(r) for r in self.refusals],
            "untraced": dict(self.untraced),
            "tp": self.tp_dict(),
            "already_applied": self.already_applied,
            "already_applied_with": dict(self.already_applied_with),
            "already_applied_note": self.already_applied_note,
            "weights_loaded": self.weights_loaded,
            "traced_at": self.traced_at,
            "first_call": dict(self.first_call),
            "timings_s": {k: round(v, 6) for k, v in self.timings_s.items()},
            "runtime": (self.runtime.to_dict() if self.runtime is not None else
                        {"specialisations": {}, "fallbacks": {}, "reasons": {}}),
        }
        json.dumps(out)  # fail here, not in a caller, if something is not serialisable
        return out

    def summary_line(self) -> str:
        c = self.counts()
        total = sum(self.timings_s.values())
        head = (self.already_applied_note.removeprefix("fxpass.apply: ")
                or "already applied; nothing changed") if self.already_applied else (
            f"{c['replaced']} linears -> vLLM ({c['graph_rewrites']} in graphs, "
            f"{c['plain_swaps']} plain swaps), {c['skipped']} skipped, "
            f"{c['probes']} weight probes folded, {c['contiguity']} contiguity fixes"
            + (f", {c['fused_groups']} fused groups" if self.fused else "")
            + (f", tp={self.tp}: {c['tp_column'] + c['tp_row']} linears sharded "
               f"({c['tp_column']} column, {c['tp_row']} row), {c['tp_replicated']} "
               f"replicated ({self.tp_sharded_fraction:.0%} of the tower's parameter bytes "
               "sharded)" if self.tp > 1 else ""))
        state = self.first_call.get("state")
        if self.traced_at == "first call" and not self.already_applied:
            if state == "armed":
                head = (f"{c['replaced']} linears -> vLLM at init, {c['skipped']} skipped; no "
                        "example inputs, so the graphs (and their fixes) come at the first call")
            elif state == "python":
                head = (f"{head}; tracing the first call failed, so the tower runs as Python "
                        f"with its swapped layers (as vLLM's walk leaves it): "
                        f"{self.first_call.get('error', '')}")
            else:
                head += (f"; linears swapped at init, graphs traced at the first call "
                         f"({self.first_call.get('elapsed_s', 0.0) * 1000:.1f} ms)")
        if not self.already_applied and self.fixes:  # which rules changed the graphs
            by_rule = collections.Counter(f.rule for f in self.fixes)
            head += "; rules: " + ", ".join(f"{r} {n}" for r, n in sorted(by_rule.items()))
        return f"fxpass[{self.prefix or '<root>'}]: {head}, {total * 1000:.1f} ms"

    def __str__(self) -> str:
        lines = [self.summary_line()]
        width = max((len(n) for n in [*self.replaced, *self.skipped]), default=10)
        if self.replaced:
            lines.append(f"  {'layer':<{width}}  how    quant")
            for name in self.replaced:
                how = ("graph" if name in self.graph_rewrites else
                       "fused" if any(name in m for m in self.fused.values()) else "swap")
                lines.append(f"  {name:<{width}}  {how:<5}  {self.quant_methods.get(name, '')}")
        for name, style in self.tp_styles.items():
            lines.append(f"  tp: {name}: {style}")
        for name, why in self.tp_replicated.items():
            lines.append(f"  tp: {name}: replicated: {why}")
        for name, members in self.fused.items():
            lines.append(f"  fused: {name} <- {', '.join(members)}")
        for r in self.refusals:
            lines.append(f"  {r['rule']} refused: {r['target']}: {r['reason']}")
        for name, why in self.plain_swaps.items():
            lines.append(f"  swap without graph: {name}: {why}")
        for name, why in self.skipped.items():
            lines.append(f"  skipped: {name}: {why}")
        for fix in self.fixes:
            lines.append(f"  {fix.rule}: {fix.module or '<root>'}: {fix.detail}")
        for name, why in self.untraced.items():
            lines.append(f"  python: {name or '<root>'}: {why}")
        if self.runtime is not None:
            rt = self.runtime
            for name in sorted({*rt.specialisations, *rt.fallbacks}):
                lines.append(f"  since apply: {name}: {rt.specialisations.get(name, 0)} new "
                             f"graphs, {rt.fallbacks.get(name, 0)} Python calls "
                             f"(first: {'; '.join(rt.reasons.get(name, {}).values())})")
        return "\n".join(lines)
