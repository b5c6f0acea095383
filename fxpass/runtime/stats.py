"""What happened after apply, per module: graphs traced again, calls served by Python."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any


@dataclasses.dataclass
class RuntimeStats:
    """Per module: graphs traced after install, calls served by Python, and why (live)."""

    specialisations: dict[str, int] = dataclasses.field(default_factory=dict)
    fallbacks: dict[str, int] = dataclasses.field(default_factory=dict)
    # module -> {"specialisation" | "fallback": why, the first time}
    reasons: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def count(self, kind: str, qualname: str, why: str) -> bool:
        """Count one event; True for the module's first event of this kind."""
        table = self.specialisations if kind == "specialisation" else self.fallbacks
        name = qualname or "<root>"
        with self._lock:
            first = name not in table
            table[name] = table.get(name, 0) + 1
            self.reasons.setdefault(name, {}).setdefault(kind, why)
        return first

    def to_dict(self) -> dict[str, Any]:
        return {"specialisations": dict(self.specialisations),
                "fallbacks": dict(self.fallbacks),
                "reasons": {k: dict(v) for k, v in self.reasons.items()}}


