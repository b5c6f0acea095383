"""Tower LoRA: check an adapter against a model's towers, and verify vLLM's LoRA layers on a
rewritten tower against HF + PEFT.

- :mod:`fxpass.lora.adapter`: read a PEFT adapter directory as vLLM does (``read_adapter``),
  write random ones for tests (``write_adapter``);
- :mod:`fxpass.lora.check`: which keys land on which layers and which land nowhere
  (``check_adapter``, ``check_model_dir``; ``fxpass lora-check``);
- :mod:`fxpass.lora.layers`: vLLM's own LoRA layers and CPU punica wrapper on a rewritten
  tower, outside an engine (``attach_lora``);
- :mod:`fxpass.lora.verify`: the comparison with HF + PEFT (``verify_lora``; ``fxpass diff
  --lora``).

Importing this package imports neither vLLM nor PEFT.
"""

from __future__ import annotations

from fxpass.lora.adapter import Adapter, ModuleLoRA, parse_key, read_adapter, write_adapter
from fxpass.lora.check import AdapterCheck, KeyResult, check_adapter, check_model_dir

__all__ = ["Adapter", "AdapterCheck", "KeyResult", "ModuleLoRA", "attach_lora",
           "check_adapter", "check_model_dir", "parse_key", "peft_reference", "read_adapter",
           "verify_lora", "write_adapter"]


def __getattr__(name: str):  # noqa: ANN202 - lazy: these import vLLM / PEFT
    if name == "attach_lora":
        from fxpass.lora.layers import attach_lora
        return attach_lora
    if name in ("verify_lora", "peft_reference"):
        from fxpass.lora import verify as _v
        return getattr(_v, name)
    raise AttributeError(f"module 'fxpass.lora' has no attribute {name!r}")
