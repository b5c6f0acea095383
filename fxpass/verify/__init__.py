"""Stage 3: prove a rewrite numerically, node by node (see compare.py).

``fxpass.verify(reference, candidate, inputs)`` and ``from fxpass.verify import verify``
both give the function. The package shares the function's name: once imported, Python
binds the package to ``fxpass.verify``, so the package object itself is made callable
(it forwards to :func:`fxpass.verify.compare.verify`) and both spellings keep working.
Submodules: ``compare`` (the run), ``metrics``, ``budgets``, ``report``, ``faults``.
"""

import sys as _sys
import types as _types

from fxpass.verify.budgets import Budget, default_budget
from fxpass.verify.compare import fake_quant_reference, rewritten_layers, verify
from fxpass.verify.metrics import Metrics, compare_tensors
from fxpass.verify.report import NodeResult, VerifyReport

__all__ = ["Budget", "Metrics", "NodeResult", "VerifyReport", "compare_tensors",
           "default_budget", "fake_quant_reference", "rewritten_layers", "verify"]


class _CallablePackage(_types.ModuleType):
    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return verify(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallablePackage
