"""HF and torch behaviours the generic stages work around, in one place.

Each entry says which versions need it; each is applied only where the thing it works around
exists, so a version without it changes nothing. Tested with transformers 5.19 and torch 2.13.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from torch import nn


def hf_trace_patches(is_ours: Callable[[Any], bool]) -> list[tuple[Any, str, Any]]:
    """(owner, attribute, replacement) to set while tracing on real values.

    transformers (4.x and 5.x: ``transformers.utils.import_utils.is_torch_fx_proxy``) takes
    a trace-safe path for fx proxies: an attention mask is always built, which can compute
    something other than eager does (no mask -> SDPA's ``is_causal``). On real values fxpass's
    proxies answer False, so HF takes its eager, data-dependent shortcut and the module that
    decides stays Python (its submodules are traced). ``is_ours(x)``: x is fxpass's proxy.
    """
    hf = sys.modules.get("transformers.utils.import_utils")
    if hf is None or not hasattr(hf, "is_torch_fx_proxy"):
        return []
    orig = hf.is_torch_fx_proxy

    def is_torch_fx_proxy(x: Any) -> bool:
        return not is_ours(x) and orig(x)

    return [(hf, "is_torch_fx_proxy", is_torch_fx_proxy)]


def linears_read_without_a_call(modules: dict[str, nn.Module]) -> dict[str, str]:
    """Linears whose owner reads their weight without calling them, known without a graph.

    torch's ``nn.MultiheadAttention`` (every torch 2.x) passes ``out_proj.weight`` / ``.bias``
    to ``F.multi_head_attention_forward``: a vLLM layer does not keep them in HF's layout.
    """
    out = {}
    for name, mod in modules.items():
        if isinstance(mod, nn.MultiheadAttention) and isinstance(mod.out_proj, nn.Linear):
            out[f"{name}.out_proj" if name else "out_proj"] = (
                "its owner is torch's nn.MultiheadAttention, whose forward reads "
                "out_proj.weight / .bias without calling it (F.multi_head_attention_forward); "
                "a vLLM layer does not keep them in HF's layout")
    return out
