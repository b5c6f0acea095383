"""Runtime guards: the graph's record of every value the tracer had to make concrete.

When traced code branches on a shape, a dtype or a length, the tracer picks the branch the
example took and leaves a guard node here. At run time the guard checks the same value and
raises :class:`GuardError` if the input would have gone the other way: never a silent wrong
answer.
"""

from __future__ import annotations

from typing import Any

import torch.fx

from fxpass.errors import GuardError

_CONVERT = {"bool": bool, "int": int, "float": float, "len": len, "index": int, "keys": tuple,
            "none": lambda v: v is None}


def guard(value: Any, expected: Any, kind: str, where: str) -> None:
    """Raise GuardError unless ``kind(value) == expected``."""
    if kind == "bool" and type(expected) is bool:
        # truthiness, not ==: under torch.compile with dynamic shapes ``value`` is a SymBool,
        # which dynamo guards on in a branch but cannot compare with a bool
        if (not value) if expected else value:
            raise GuardError(f"{where}: the graph was traced where bool(...) was {expected!r}, "
                             f"but this input gives {not expected!r}")
        return
    got = _CONVERT[kind](value)
    if got != expected:
        raise GuardError(
            f"{where}: the graph was traced where {kind}(...) was {expected!r}, "
            f"but this input gives {got!r}"
        )


# Guards have no users; keep dead-code elimination from dropping them.
torch.fx.node._side_effectful_functions.add(guard)
