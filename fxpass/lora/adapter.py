"""A PEFT LoRA adapter directory, read the way vLLM reads it; and random adapters for tests.

vLLM (``LoRAModel.from_local_checkpoint``) reads ``adapter_config.json`` and
``adapter_model.safetensors`` (or ``.bin`` / ``.pt``), and turns each tensor name
``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` into the module path
``<module>``: the module that must be a linear layer for the LoRA to land. That parsing is
repeated here without importing vLLM (``parse_key``), so an adapter can be checked anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxpass.errors import UsageError

__all__ = ["Adapter", "ModuleLoRA", "demo_targets", "parse_key", "read_adapter",
           "rename_keys", "saved_module", "write_adapter"]

PEFT_PREFIX = "base_model.model."
_LORA_PARTS = {"lora_A": "A", "lora_B": "B"}


def parse_key(name: str) -> tuple[str, str] | None:
    """``(module path, "A" | "B")`` for a LoRA tensor name as vLLM parses it, else None.

    ``base_model.model.`` is dropped (vLLM's ``parse_fine_tuned_lora_name``); the module path
    stays in the checkpoint's naming (vLLM's model may rename it, e.g. Gemma4's
    ``model.vision_tower.`` -> ``vision_tower.``).
    """
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX):]
    parts = name.split(".")
    if len(parts) >= 3 and parts[-1] == "weight" and parts[-2] in _LORA_PARTS:
        return ".".join(parts[:-2]), _LORA_PARTS[parts[-2]]
    return None


@dataclasses.dataclass
class ModuleLoRA:
    """One adapted module: its A (r x in) and B (out x r), rank and PEFT scaling."""

    module: str
    keys: list[str]
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    rank: int = 0
    alpha: float = 0.0
    scaling: float = 1.0


@dataclasses.dataclass
class Adapter:
    """An adapter directory's config and tensors, grouped by the module each LoRA targets."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    modules: dict[str, ModuleLoRA]
    unparsed: list[str]  # tensor names vLLM would not read as LoRA A/B

    @property
    def keys(self) -> list[str]:
        return list(self.tensors)


def _rank_and_scaling(config: dict[str, Any], module: str) -> tuple[int, float, float]:
    """Rank, alpha and scaling PEFT gives ``module`` (its name in the adapter's model, as in
    the tensor names: ``model.vision_tower.encoder...q_proj.linear``).

    ``rank_pattern`` / ``alpha_pattern`` are resolved by PEFT's own ``get_pattern_key`` (the
    function ``LoraModel._create_and_replace`` uses; vLLM's ``PEFTHelper`` copies it), so
    patterns keyed by the full model's names, by a suffix or by a regex mean what they mean
    to PEFT. PEFT is imported only for an adapter that has patterns (it is slow to import).
    """
    r, alpha = config["r"], config.get("lora_alpha", 8)  # 8: LoraConfig's default
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    if rank_pattern or alpha_pattern:
        from peft.utils.other import get_pattern_key

        r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), r)
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), alpha)
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return int(r), float(alpha), float(scaling)


def saved_module(config: dict[str, Any], key: str) -> str | None:
    """The module of a tensor name that is one of the adapter's ``modules_to_save`` (a full
    copy of that module PEFT swaps in, not a LoRA), else None."""
    names = config.get("modules_to_save") or []
    if key.startswith(PEFT_PREFIX):
        key = key[len(PEFT_PREFIX):]
    module = key.rpartition(".")[0]
    # PEFT's ModulesToSaveWrapper matching (peft.utils.other._set_trainable): a suffix
    return module if any(module.endswith(name) for name in names) else None


def read_adapter(path: str | Path) -> Adapter:
    """Read a PEFT LoRA adapter directory (no vLLM import); bad input is a UsageError."""
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"adapter directory {path} does not exist")
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():
        raise UsageError(f"{path} has no adapter_config.json (not a PEFT adapter directory)")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{cfg_path}: not readable JSON: {e}") from e
    if not isinstance(config, dict) or "r" not in config:
        raise UsageError(f"{cfg_path}: no rank 'r'; is this a LoRA adapter config?")
    tensors: dict[str, torch.Tensor]
    st = path / "adapter_model.safetensors"
    try:
        if st.is_file():
            from safetensors.torch import load_file

            tensors = load_file(str(st))
        else:
            for name in ("adapter_model.bin", "adapter_model.pt"):
                if (path / name).is_file():
                    tensors = torch.load(path / name, map_location="cpu", weights_only=True)
                    break
            else:
                raise UsageError(f"{path} has no adapter_model.safetensors (nor .bin / .pt)")
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file is the caller's to fix
        raise UsageError(f"{path}: cannot read the adapter tensors: {type(e).__name__}: "
                         f"{e}") from e
    modules: dict[str, ModuleLoRA] = {}
    unparsed: list[str] = []
    for key, tensor in tensors.items():
        parsed = parse_key(key)
        if parsed is None:
            unparsed.append(key)
            continue
        module, which = parsed
        m = modules.setdefault(module, ModuleLoRA(module, []))
        m.keys.append(key)
        setattr(m, which.lower(), tensor)
    for m in modules.values():
        m.rank, m.alpha, m.scaling = _rank_and_scaling(config, m.module)
    return Adapter(path, config, tensors, modules, unparsed)


# ------------------------------------------------------------------------------ writing


def _holder(tower: nn.Module, key_prefix: str) -> nn.Module:
    """An nn.Module tree with ``tower`` at dotted path ``key_prefix`` ('' = the root)."""
    if not key_prefix:
        return tower
    root = nn.Module()
    node = root
    parts = key_prefix.split(".")
    for part in parts[:-1]:
        child = nn.Module()
        node.add_module(part, child)
        node = child
    node.add_module(parts[-1], tower)
    return root


def write_adapter(tower: nn.Module, out: str | Path, targets: dict[str, int] | list[str], *,
                  key_prefix: str = "", alpha: float | dict[str, float] = 16.0,
                  rank: int = 8, seed: int = 0, std: float = 0.1,
                  use_rslora: bool = False) -> Path:
    """Write a random LoRA adapter for ``tower`` with PEFT (``save_pretrained``).

    ``targets``: tower-relative paths of the ``nn.Linear`` layers to adapt, or a dict of
    path -> rank (several ranks: PEFT's ``rank_pattern``). ``key_prefix``: where the tower sits
    in the full model (``model.vision_tower``), so the keys are the full model's
    (``base_model.model.model.vision_tower.<path>.lora_A.weight``). A and B are drawn from a
    normal(0, ``std``) (PEFT would start B at zero, i.e. no effect). The tower is not changed.
    """
    import copy

    from peft import LoraConfig, get_peft_model

    ranks = dict(targets) if isinstance(targets, dict) else {t: rank for t in targets}
    if not ranks:
        raise UsageError("write_adapter needs at least one target layer")
    full = {f"{key_prefix}.{p}" if key_prefix else p: r for p, r in ranks.items()}
    alphas = alpha if isinstance(alpha, dict) else {}
    base_r = max(set(full.values()), key=list(full.values()).count)
    # Anchored patterns (PEFT matches a suffix at a "." boundary): exact module paths.
    config = LoraConfig(
        r=base_r,
        lora_alpha=float(alpha) if not isinstance(alpha, dict) else 16.0,
        target_modules=list(full),  # exact paths: PEFT matches a name or a '.'-suffix
        rank_pattern={p: r for p, r in full.items() if r != base_r},
        alpha_pattern={(f"{key_prefix}.{p}" if key_prefix else p): a
                       for p, a in alphas.items()},
        lora_dropout=0.0, bias="none", use_rslora=use_rslora, init_lora_weights=True,
    )
    model = get_peft_model(_holder(copy.deepcopy(tower), key_prefix), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    out = Path(out)
    model.save_pretrained(str(out))
    return out


# Typical LoRA targets: attention q / v, the first MLP projection (HF names across towers).
_DEMO_NAMES = ("q_proj", "v_proj", "fc1", "up_proj", "linear_start", "ffw_layer_1")


def demo_targets(tower: nn.Module) -> dict[str, int]:
    """Tower-relative paths of typical LoRA targets (q / v projections, the first MLP
    projection) with ranks 8 and 4 in turn: an adapter with several modules and ranks."""
    paths = [n for n, m in tower.named_modules() if isinstance(m, nn.Linear)
             and any(k in n.split(".") for k in _DEMO_NAMES)]
    if not paths:
        paths = [n for n, m in tower.named_modules() if isinstance(m, nn.Linear)][:2]
    return {p: (8 if i % 2 == 0 else 4) for i, p in enumerate(paths)}


def rename_keys(adapter_dir: str | Path, out: str | Path, old: str, new: str) -> Path:
    """Copy an adapter with ``old`` replaced by ``new`` in every tensor name (e.g. the
    wrapper-keyed form: ``.linear.lora_`` -> ``.lora_``), for tests of the adapter check."""
    import shutil

    from safetensors.torch import load_file, save_file

    src, dst = Path(adapter_dir), Path(out)
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "adapter_config.json", dst / "adapter_config.json")
    tensors = load_file(str(src / "adapter_model.safetensors"))
    save_file({k.replace(old, new): v.contiguous() for k, v in tensors.items()},
              str(dst / "adapter_model.safetensors"))
    return dst
