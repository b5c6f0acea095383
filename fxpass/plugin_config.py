"""The plugin's switches: vLLM's ``additional_config["fxpass"]`` and the environment.

Inside vLLM the towers are rewritten with every rule on by default (the speed rules too:
vLLM's hand-written towers run merged layers and vLLM's kernels the same way). Two places
turn things off, read once per tower when vLLM builds it:

``--additional-config '{"fxpass": {...}}'`` (or ``LLM(..., additional_config=...)``):
    ``"enabled"``      false: vLLM's own ``recursive_replace_linear`` walks the towers
    ``"speed_rules"``  false: only the rules every rewrite runs (swap, fixes, attention);
                       the opt-in speed rules (fusion, patch-conv, rms-norm, rope, layout,
                       elementwise) stay off
    ``"disable"``      a list of rule names to leave out (``fxpass.rules.registry.names()``)
    ``"warmup"``       false: no tower call at engine start (the first request traces)

The environment, which wins over the config: ``FXPASS_DISABLE=1`` (as ``"enabled": false``),
``FXPASS_SPEED_RULES=0|1`` and ``FXPASS_DISABLE_RULES=fusion,mm-attention``,
``FXPASS_WARMUP=0|1``.

A key or rule name fxpass does not know, or a value of the wrong type, is a
:class:`~fxpass.errors.UsageError` naming it and the valid ones: the engine stops at model
init instead of serving without the switch the operator meant.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from fxpass.errors import UsageError

KEY = "fxpass"  # additional_config's entry
ENV_DISABLE = "FXPASS_DISABLE"
ENV_SPEED_RULES = "FXPASS_SPEED_RULES"
ENV_DISABLE_RULES = "FXPASS_DISABLE_RULES"
ENV_WARMUP = "FXPASS_WARMUP"

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


@dataclasses.dataclass(frozen=True)
class PluginConfig:
    enabled: bool = True
    speed_rules: bool = True
    disable: frozenset[str] = frozenset()
    warmup: bool = True
    # where each value that is not the default came from ("additional_config", "env")
    sources: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "speed_rules": self.speed_rules,
                "disable": sorted(self.disable), "warmup": self.warmup,
                "sources": dict(self.sources)}

    def describe(self) -> str:
        """One line for the plugin's log: what is on and off, and who said so."""
        parts = [f"speed rules {'on' if self.speed_rules else 'off'}"]
        if self.disable:
            parts.append("rules off: " + ", ".join(sorted(self.disable)))
        if not self.warmup:
            parts.append("no warm-up")
        if self.sources:
            parts.append("set by " + ", ".join(f"{k} ({v})" for k, v in self.sources))
        return "; ".join(parts)


_KEYS = {f.name for f in dataclasses.fields(PluginConfig)} - {"sources"}


def env_disabled(environ: Mapping[str, str] | None = None) -> bool:
    """True when ``FXPASS_DISABLE`` is set to 1/true/yes/on (case-insensitive)."""
    env = os.environ if environ is None else environ
    return env.get(ENV_DISABLE, "").strip().lower() in _TRUE


def _flag(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise UsageError(f"{where}: expected true or false, got {value!r}")


def _names(value: Any, where: str) -> frozenset[str]:
    from fxpass.rules.registry import check_names

    if isinstance(value, str):
        value = [v for v in (p.strip() for p in value.split(",")) if v]
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(
            isinstance(v, str) for v in value):
        raise UsageError(f"{where}: expected a list of rule names, got {value!r}")
    check_names(value, where)
    return frozenset(value)


def read(additional_config: Mapping[str, Any] | None,
         environ: Mapping[str, str] | None = None) -> PluginConfig:
    """The switches from vLLM's ``additional_config`` and the environment (which wins)."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    entry = (additional_config or {}).get(KEY)
    if entry is not None:
        where = f"additional_config[{KEY!r}]"
        if not isinstance(entry, Mapping):
            raise UsageError(f"{where}: expected an object such as "
                             f'{{"speed_rules": false, "disable": ["fusion"]}}, got {entry!r}')
        unknown = sorted(set(entry) - _KEYS)
        if unknown:
            raise UsageError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; the "
                             f"keys are: {', '.join(sorted(_KEYS))}")
        for k, v in entry.items():
            at = f"{where}[{k!r}]"
            values[k] = _names(v, at) if k == "disable" else _flag(v, at)
            sources[k] = "additional_config"
    if env_disabled(env):
        values["enabled"], sources["enabled"] = False, ENV_DISABLE
    for name, key in ((ENV_SPEED_RULES, "speed_rules"), (ENV_WARMUP, "warmup")):
        if env.get(name) is not None:
            values[key], sources[key] = _flag(env[name], f"${name}"), name
    if env.get(ENV_DISABLE_RULES) is not None:
        off = _names(env[ENV_DISABLE_RULES], f"${ENV_DISABLE_RULES}")
        values["disable"] = values.get("disable", frozenset()) | off
        sources["disable"] = (sources["disable"] + " + " + ENV_DISABLE_RULES
                              if "disable" in sources else ENV_DISABLE_RULES)
    return PluginConfig(**values, sources=tuple(sorted(sources.items())))


def from_engine() -> PluginConfig:
    """The switches for the engine whose model vLLM is building now (its current config)."""
    from fxpass.vllm_context import current_engine_config

    return read(getattr(current_engine_config(), "additional_config", None))


__all__ = ["ENV_DISABLE", "ENV_DISABLE_RULES", "ENV_SPEED_RULES", "ENV_WARMUP", "KEY",
           "PluginConfig", "env_disabled", "from_engine", "read"]
