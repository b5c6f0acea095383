"""Placeholders for torchvision names the stand-in does not implement."""

from __future__ import annotations

from typing import Any


def missing(module: str, name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)

    def _missing(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"{module}.{name} is not implemented by the fxpass e2e torchvision stand-in")

    _missing.__name__ = name
    _missing.__qualname__ = name
    return _missing
