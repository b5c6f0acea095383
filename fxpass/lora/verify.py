"""Does a tower LoRA compute what the adapter means? vLLM's LoRA layers vs HF + PEFT.

:func:`verify_lora` rewrites a copy of the tower with ``fxpass.apply`` (weights loaded,
quantized in flight for bnb), puts vLLM's own LoRA layers on it with the adapter in slot 0
(:func:`fxpass.lora.layers.attach_lora`), and compares it with ``fxpass.verify``, node by node,
against the original HF tower with the adapter applied by PEFT (:func:`peft_reference`). For
quantized towers the fake-quant reference is the PEFT tower with each base weight fake-quantized.

Planted faults (``LORA_FAULT_KINDS``) corrupt one LoRA layer after loading, to prove the check
catches what a LoRA loader can get wrong: ``lora-scale`` (B scaled twice), ``lora-transpose``
(B read back transposed), ``lora-wrong-layer`` (the layer's LoRA loaded into the next layer of
the same shape instead).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxpass.errors import UsageError
from fxpass.lora.adapter import PEFT_PREFIX, Adapter, _holder, read_adapter
from fxpass.lora.check import AdapterCheck

__all__ = ["LORA_FAULT_KINDS", "LoRAVerifyResult", "nothing_on_tower", "peft_reference",
           "plant_lora_fault", "tower_check", "tower_lora_config", "verify_lora"]

from fxpass.verify.faults import LORA_FAULT_KINDS  # noqa: E402 - one list for the CLI too


def _under(key: str, key_prefix: str) -> bool:
    """A tensor name or module path of the adapter's model under ``key_prefix``."""
    name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    return not key_prefix or name.startswith(key_prefix + ".")


def tower_check(tower: nn.Module, adapter: Adapter, key_prefix: str) -> AdapterCheck:
    """The adapter check for the keys under ``key_prefix`` (the tower's path); keys of the
    rest of the adapter's model (a whole-model adapter's text layers, its ``lm_head``) are
    not the tower's business."""
    prefix_dot = key_prefix + "." if key_prefix else ""
    mine = {m[len(prefix_dot):]: lw for m, lw in adapter.modules.items()
            if m.startswith(prefix_dot)}
    from fxpass.lora.check import check_modules, saved_keys

    unparsed = [k for k in adapter.unparsed if _under(k, key_prefix)]
    return check_modules(mine, tower, towers=[""], adapter=str(adapter.path),
                         unparsed=unparsed, saved=saved_keys(adapter))


def nothing_on_tower(adapter: Adapter, key_prefix: str, why: str = "") -> str:
    """The message for an adapter that adapts nothing in the tower at ``key_prefix``
    (``why``: PEFT's own finding, when it was asked)."""
    where = f"{key_prefix!r}" if key_prefix else "<root>"
    mine = [m for m in adapter.modules if _under(m, key_prefix)]
    elsewhere = sorted(m for m in adapter.modules if m not in mine)
    targets = adapter.config.get("target_modules")
    extra = [f"{k}={adapter.config[k]!r}"
             for k in ("layers_to_transform", "layers_pattern", "exclude_modules")
             if adapter.config.get(k) not in (None, [], "")]
    if why:
        found = (f"PEFT finds no module there to adapt ({why})"
                 + (f", although it has LoRA tensors for {len(mine)} module(s) under {where}"
                    if mine else f", and it has no LoRA tensors for modules under {where}"))
    else:
        found = f"no LoRA tensors for modules under {where}"
    return (f"{adapter.path}: the adapter targets nothing in the tower at {where}: {found}"
            f"; its target_modules are {targets!r}"
            + (f" ({', '.join(extra)})" if extra else "")
            + (f", and its LoRA tensors are for {len(elsewhere)} module(s) elsewhere: "
               f"{', '.join(elsewhere[:4])}{', ...' if len(elsewhere) > 4 else ''}"
               if elsewhere else "" if mine else ", and it has no LoRA tensors at all")
            + ". Pass the adapter trained for this tower, or the tower's path in the model the "
              "adapter was trained on as key_prefix (fxpass diff --lora-prefix) if it is not "
            + where)


def tower_lora_config(adapter_dir: str | Path) -> Any:
    """The adapter's ``LoraConfig`` as PEFT reads it, made to apply to a tower alone.

    Only ``task_type`` changes (to None) and ``inference_mode`` (True): a whole-model adapter
    (``CAUSAL_LM``, ``SEQ_2_SEQ_LM``, ``FEATURE_EXTRACTION``, ...) makes PEFT build the task's
    ``PeftModel`` subclass, which needs the full model (``prepare_inputs_for_generation``,
    the task head); the base ``PeftModel`` injects the same LoRA layers. ``target_modules``
    (list or regex), ``layers_to_transform`` / ``layers_pattern``, ``exclude_modules``,
    ``modules_to_save`` and the rank / alpha patterns stay as written: the tower is placed
    at its path in the adapter's model (:func:`peft_reference`), so PEFT matches them against
    the same names as on the full model.
    """
    from peft import LoraConfig

    try:
        config = LoraConfig.from_pretrained(str(adapter_dir))
    except Exception as e:  # noqa: BLE001 - PEFT's own refusal, kept as the cause
        raise UsageError(f"{adapter_dir}: PEFT cannot read adapter_config.json as a LoRA "
                         f"config: {type(e).__name__}: {e}") from e
    config.task_type = None
    config.inference_mode = True
    return config


def peft_reference(tower: nn.Module, adapter_dir: str | Path, *,
                   key_prefix: str = "") -> nn.Module:
    """A copy of ``tower`` with the adapter applied by PEFT (``PeftModel.from_pretrained``),
    exactly as PEFT applies it to the adapter's whole model, restricted to the tower.

    The copy is placed at ``key_prefix`` (its path in the adapter's model, e.g.
    ``model.vision_tower``) in an otherwise empty module tree, so PEFT sees the tower's
    modules under the names they have in the full model: the adapter's own config
    (:func:`tower_lora_config`: every field as written but ``task_type``) then targets the
    same modules there as on the full model (list or regex ``target_modules``, ``all-linear``,
    ``layers_to_transform``, ``exclude_modules``, ``modules_to_save``), and the adapter's keys
    (``base_model.model.<key_prefix>.<path>...``) load into them; PEFT reads rank, alpha, the
    rank / alpha patterns and rsLoRA itself. Keys of the rest of the model find no module and
    are not loaded. An adapter that targets nothing in the tower is a ``UsageError``.
    """
    from peft import PeftModel
    from peft.tuners.tuners_utils import NoMatchingPeftModuleError

    adapter = read_adapter(adapter_dir)
    config = tower_lora_config(adapter.path)
    holder = _holder(copy.deepcopy(tower), key_prefix)
    try:
        model = PeftModel.from_pretrained(holder, str(adapter.path), config=config)
    except NoMatchingPeftModuleError as e:
        raise UsageError(nothing_on_tower(adapter, key_prefix, str(e).split(". ")[0])) from e
    except Exception as e:  # noqa: BLE001 - PEFT's own refusal, kept as the cause
        raise UsageError(f"{adapter.path}: PEFT cannot apply this adapter to the tower at "
                         f"{key_prefix or '<root>'!r}: {type(e).__name__}: {e}") from e
    inner = model.base_model.model
    ref = inner.get_submodule(key_prefix) if key_prefix else inner
    prefix_dot = key_prefix + "." if key_prefix else ""
    # what PEFT adapted in the tower, tower-relative (for the check and the report)
    ref._fxpass_peft_targets = sorted(n[len(prefix_dot):]
                                      for n in model.base_model.targeted_module_names
                                      if n.startswith(prefix_dot))
    return ref.eval()


def plant_lora_fault(state: Any, spec: str, tower: nn.Module) -> str:
    """Corrupt the LoRA of one layer (``KIND:LAYER``, LAYER tower-relative); returns LAYER."""
    kind, _, layer = spec.partition(":")
    if kind not in LORA_FAULT_KINDS or not layer:
        raise UsageError(f"planted LoRA fault {spec!r}: expected KIND:LAYER with KIND one of "
                         f"{', '.join(LORA_FAULT_KINDS)}")
    if layer not in state.modules or layer not in state.loaded:
        raise UsageError(f"planted LoRA fault: {layer!r} carries no LoRA; layers with one: "
                         f"{', '.join(sorted(state.loaded)) or '(none)'}")
    mod = state.modules[layer]
    a, b = mod.lora_a_stacked[0][0, 0], mod.lora_b_stacked[0][0, 0]
    with torch.no_grad():
        if kind == "lora-scale":
            b.mul_(2.0)
        elif kind == "lora-transpose":
            lw = state.adapter.modules
            r = next((m.rank for p, m in lw.items() if p.endswith(layer)), b.shape[1])
            blk = b[:, :r].clone()
            b[:, :r] = blk.t().contiguous().reshape(blk.shape)
        else:
            shape = (mod.lora_a_stacked[0].shape, mod.lora_b_stacked[0].shape)
            others = [p for p, m in state.modules.items()
                      if p != layer and (m.lora_a_stacked[0].shape,
                                         m.lora_b_stacked[0].shape) == shape]
            if not others:
                raise UsageError(f"planted LoRA fault lora-wrong-layer: no other layer has "
                                 f"{layer}'s shape")
            names = list(state.modules)
            after = [p for p in others if names.index(p) > names.index(layer)] or others
            dst = state.modules[after[0]]
            dst.lora_a_stacked[0][0, 0].copy_(a)
            dst.lora_b_stacked[0][0, 0].copy_(b)
            a.zero_()
            b.zero_()
    return layer


@dataclasses.dataclass
class LoRAVerifyResult:
    verify: Any  # VerifyReport
    apply: Any  # Report
    check: AdapterCheck
    loaded: dict[str, str]
    lora_layers: dict[str, str]  # path -> vLLM LoRA class
    planted: str | None = None
    effect_db: float | None = None  # SQNR of the tower without LoRA vs HF + PEFT (input 0)

    @property
    def passed(self) -> bool:
        return self.verify.passed

    def to_dict(self) -> dict[str, Any]:
        from fxpass.verify.metrics import json_float

        return {"loaded": dict(self.loaded), "lora_layers": dict(self.lora_layers),
                "check": self.check.to_dict(), "planted_fault": self.planted,
                "adapter_effect_sqnr_db": json_float(self.effect_db)}

    def summary(self) -> str:
        """What was loaded where, and how much the adapter changes the output."""
        kinds = sorted(set(self.lora_layers.values()))
        eff = "-" if self.effect_db is None else f"{self.effect_db:.1f} dB"
        return (f"tower LoRA: {len(self.loaded)} of {len(self.lora_layers)} vLLM LoRA layers "
                f"({', '.join(kinds)}) carry the adapter; without it the output is at {eff} "
                "SQNR from HF + PEFT (the adapter's effect the check must see)")


def verify_lora(tower: nn.Module, adapter_dir: str | Path, inputs: Any, *,
                key_prefix: str = "", quant_config: Any = None, prefix: str | None = None,
                fuse: bool = False, mode: str = "propagated", budget: Any = None,
                fake_quant: bool = True, fault: str | None = None,
                candidate_hook: Any = None) -> LoRAVerifyResult:
    """Rewrite a copy of ``tower``, put vLLM's LoRA layers with the adapter on it, and verify it
    against HF + PEFT (see the module docstring). Call inside ``fxpass.vllm_runtime()``.

    ``inputs`` as for ``fxpass.verify``; ``key_prefix``: the tower's path in the adapter's
    model; ``prefix``: vLLM's layer prefix (default ``key_prefix``). An adapter with keys
    under the tower that land nowhere is a ``UsageError`` carrying the adapter check (what
    ``fxpass lora-check`` prints). ``fault``: ``KIND:LAYER`` from :data:`LORA_FAULT_KINDS`.
    ``candidate_hook(candidate, state)`` runs before the comparison (the HTML view keeps
    the candidate through it).
    """
    import fxpass
    from fxpass.verify.budgets import lora_budget
    from fxpass.verify.compare import _normalise_inputs, rewritten_layers
    from fxpass.verify.budgets import QUANT_ORDER
    from fxpass.lora.layers import attach_lora

    adapter = read_adapter(adapter_dir)
    check = tower_check(tower, adapter, key_prefix)
    if not check.results:
        raise UsageError(nothing_on_tower(adapter, key_prefix))
    if check.nowhere:
        raise UsageError("adapter keys land on no layer of the tower (vLLM would ignore "
                         "them silently):\n" + check.format())
    runs = _normalise_inputs(inputs)
    reference = peft_reference(tower, adapter.path, key_prefix=key_prefix)
    effect = _effect_db(tower, reference, runs[0])
    candidate = copy.deepcopy(tower)
    prefix = key_prefix if prefix is None else prefix
    example = runs[0][1] if not runs[0][0] else runs[0]
    report = fxpass.apply(candidate, quant_config, prefix=prefix, load_weights=True,
                          fuse=fuse, example_inputs=example)
    pdot = prefix + "." if prefix else ""
    fused = {f[len(pdot):]: [m[len(pdot):] for m in ms] for f, ms in report.fused.items()}
    state = attach_lora(candidate, adapter.path, key_prefix=key_prefix, fused=fused)
    planted = plant_lora_fault(state, fault, candidate) if fault else None
    if candidate_hook is not None:
        candidate_hook(candidate, state)
    if budget is None:
        methods = rewritten_layers(reference, candidate)
        quant = [m for m in methods.values() if m != "none"]
        method = max(quant, key=QUANT_ORDER.index) if quant else "none"
        budget = lora_budget(_dtype(tower), method)
    try:
        vr = fxpass.verify(reference, candidate, inputs, mode=mode, budget=budget,
                           fake_quant=fake_quant, progress=None)
    finally:
        state.remove_hooks()
    return LoRAVerifyResult(verify=vr, apply=report, check=check, loaded=dict(state.loaded),
                            lora_layers={p: type(m).__name__ for p, m in state.modules.items()},
                            planted=planted, effect_db=effect)


def _effect_db(tower: nn.Module, reference: nn.Module, inp: Any) -> float | None:
    """SQNR of the plain tower's first output tensor against the PEFT tower's."""
    from fxpass.verify.compare import _leaves
    from fxpass.verify.metrics import compare_tensors

    with torch.no_grad():
        plain = _leaves(tower(*inp[0], **inp[1]))
        peft = dict(_leaves(reference(*inp[0], **inp[1])))
    for leaf, t in plain:
        if leaf in peft and t.is_floating_point():
            return compare_tensors(t, peft[leaf]).sqnr_db
    return None


def _dtype(module: nn.Module) -> torch.dtype:
    for t in module.parameters():
        if t.is_floating_point():
            return t.dtype
    return torch.float32
