"""vLLM's own LoRA layers on a rewritten tower, outside an engine.

What vLLM's ``LoRAModelManager`` does for a tower when ``enable_tower_connector_lora=True``,
step by step with vLLM's functions, on a tower ``fxpass.apply`` rewrote:

1. every vLLM linear of the tower is wrapped by ``vllm.lora.utils.from_layer``
   (``ReplicatedLinearWithLoRA``; a fused layer with its members as the packed-module list:
   ``MergedColumnParallelLinearWithLoRA`` / ``...VariableSliceWithLoRA``), one slot per LoRA;
2. the adapter is read by ``LoRAModel.from_local_checkpoint`` with ``PEFTHelper`` (rank,
   alpha, ``rank_pattern``/``alpha_pattern``, rsLoRA), the tower's key prefix mapped away as
   vLLM's ``hf_to_vllm_mapper`` does; members of a fused layer are packed with
   ``PackedLoRALayerWeights.pack`` (vLLM's packed-modules mechanism), scaling folded into B
   (``optimize``), and each layer gets ``set_lora(slot, A, B)`` (or ``reset_lora``);
3. all layers share one CPU punica wrapper (``get_punica_wrapper``), whose metadata is set for
   "every token uses slot 0" through ``update_metadata`` with a ``LoRAMapping`` of type TOWER,
   before each call whose token count differs from the last (a forward pre-hook).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxpass.errors import UsageError
from fxpass.lora.adapter import Adapter, read_adapter

__all__ = ["TowerLoRA", "attach_lora", "MAX_LORA_RANKS"]

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks
SLOT = 0  # the slot the adapter is loaded into
LORA_ID = 1


@dataclasses.dataclass
class TowerLoRA:
    """The LoRA state attached to one tower by :func:`attach_lora`."""

    modules: dict[str, nn.Module]  # path -> vLLM ...WithLoRA layer
    loaded: dict[str, str]  # path -> "A/B" source module(s) of the adapter
    unwrapped: dict[str, str]  # path -> why vLLM's from_layer left it without LoRA
    lora_config: Any
    punica: Any
    adapter: Adapter
    ignored: list[str]  # adapter modules outside this tower
    _hooks: list[Any] = dataclasses.field(default_factory=list, repr=False)
    _tokens: list[int] = dataclasses.field(default_factory=lambda: [-1], repr=False)

    def set_tokens(self, n: int) -> None:
        """Punica metadata for ``n`` tokens, all on slot 0 (a prefill-style TOWER mapping)."""
        from vllm.lora.layers import LoRAMapping, LoRAMappingType

        if n == self._tokens[0]:
            return
        if n > self.punica._token_lora_indices.shape[0]:
            self._new_punica(max(n, 2 * self.punica._token_lora_indices.shape[0]))
        mapping = LoRAMapping(index_mapping=(LORA_ID,) * n, prompt_mapping=(LORA_ID,),
                              is_prefill=True, type=LoRAMappingType.TOWER)
        lora_index_to_id = [None] * self.lora_config.max_loras
        lora_index_to_id[SLOT] = LORA_ID
        self.punica.update_metadata(mapping, lora_index_to_id, self.lora_config.max_loras + 1,
                                    0)
        self._tokens[0] = n

    def _new_punica(self, tokens: int) -> None:
        from vllm.lora.punica_wrapper import get_punica_wrapper

        self.punica = get_punica_wrapper(tokens, max_batches=1, device="cpu",
                                         lora_config=self.lora_config)
        for m in self.modules.values():
            m.set_mapping(self.punica)
        self._tokens[0] = -1

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def _max_lora_rank(rank: int) -> int:
    for r in MAX_LORA_RANKS:
        if r >= rank:
            return r
    raise UsageError(f"LoRA rank {rank} is above vLLM's largest max_lora_rank "
                     f"{MAX_LORA_RANKS[-1]}")


def _float_dtype(module: nn.Module) -> torch.dtype:
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def attach_lora(tower: nn.Module, adapter_dir: str | Path, *, key_prefix: str = "",
                fused: dict[str, list[str]] | None = None, max_loras: int = 1,
                dtype: torch.dtype | None = None, tokens: int = 4096) -> TowerLoRA:
    """Wrap ``tower``'s vLLM linears with vLLM's LoRA layers and load the adapter into slot 0.

    ``tower`` must have been rewritten by ``fxpass.apply`` (with its weights loaded);
    ``key_prefix``: the tower's path in the model the adapter was trained on (its keys are
    ``base_model.model.<key_prefix>.<path>...``); ``fused``: fused layer path -> member paths
    (tower-relative, ``Report.fused`` without the prefix). ``dtype``: vLLM's ``lora_dtype``
    (default: the tower's dtype, as vLLM's "auto"). Call inside ``fxpass.vllm_runtime()``.
    """
    from vllm.config.lora import LoRAConfig
    from vllm.lora.layers import BaseLayerWithLoRA
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.lora_weights import PackedLoRALayerWeights
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.utils import from_layer, replace_submodule
    from vllm.model_executor.models.utils import WeightsMapper

    from fxpass.layers import is_vllm_linear

    adapter = read_adapter(adapter_dir)
    fused = dict(fused or {})
    dtype = dtype or _float_dtype(tower)
    helper = PEFTHelper.from_local_dir(str(adapter.path), None)
    max_rank = max([helper.r, *helper.rank_pattern.values()])
    lora_config = LoRAConfig(max_lora_rank=_max_lora_rank(max_rank), max_loras=max_loras,
                             lora_dtype=dtype)
    try:
        helper.validate_legal(lora_config)
    except ValueError as e:
        raise UsageError(f"{adapter.path}: vLLM refuses this adapter: {e}") from e

    modules: dict[str, nn.Module] = {}
    unwrapped: dict[str, str] = {}
    targets = [(p, m) for p, m in tower.named_modules()
               if is_vllm_linear(m) and not p.endswith(".base_layer")]
    for path, layer in targets:
        packed = []
        if path in fused:
            parent = path.rpartition(".")[0]
            packed = [m[len(parent) + 1:] if parent else m for m in fused[path]]
        new = from_layer(layer, max_loras, lora_config, packed, None)
        if not isinstance(new, BaseLayerWithLoRA):
            unwrapped[path] = (f"vLLM's from_layer has no LoRA layer for {type(layer).__name__}"
                               f" with packed modules {packed}")
            continue
        if path == "":
            raise UsageError("the tower itself is a linear layer; attach LoRA to its parent")
        replace_submodule(tower, path, new)
        modules[path] = new

    mapper = WeightsMapper(orig_to_new_prefix={key_prefix + ".": ""}) if key_prefix else None
    expected = {m.rsplit(".", 1)[-1] for m in adapter.modules}
    try:
        lora_model = LoRAModel.from_local_checkpoint(
            str(adapter.path), expected, peft_helper=helper, lora_model_id=LORA_ID,
            device="cpu", dtype=dtype, weights_mapper=mapper)
    except ValueError as e:
        raise UsageError(f"{adapter.path}: vLLM cannot load this adapter: {e}") from e
    loaded: dict[str, str] = {}
    for fpath, members in fused.items():
        subs = [lora_model.get_lora(m) for m in members]
        if any(subs):
            lora_model.loras[fpath] = PackedLoRALayerWeights.pack(subs)
            loaded[fpath] = " + ".join(m if s else f"({m}: none)" for m, s in zip(members, subs))
            for m in members:
                lora_model.loras.pop(m, None)
    for lw in lora_model.loras.values():
        lw.optimize()
    for path, module in modules.items():
        lw = lora_model.get_lora(path)
        if lw is None:
            module.reset_lora(SLOT)
            continue
        module.set_lora(SLOT, lw.lora_a, lw.lora_b)
        loaded.setdefault(path, path)
    prefix_dot = key_prefix + "." if key_prefix else ""
    ignored = [f"{prefix_dot}{n}" for n in lora_model.loras if n not in modules]

    from vllm.lora.punica_wrapper import get_punica_wrapper

    punica = get_punica_wrapper(tokens, max_batches=1, device="cpu", lora_config=lora_config)
    for module in modules.values():
        module.set_mapping(punica)
    state = TowerLoRA(modules=modules, loaded=loaded, unwrapped=unwrapped,
                      lora_config=lora_config, punica=punica, adapter=adapter, ignored=ignored)

    def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.dim() >= 1:
            state.set_tokens(x.numel() // x.shape[-1] if x.shape[-1] else 0)

    for module in modules.values():
        state._hooks.append(module.register_forward_pre_hook(pre_hook))
    return state
