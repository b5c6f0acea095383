"""Which adapter keys land on which tower layers, and which land nowhere.

vLLM puts a LoRA on a module only where the adapter's module path names a linear layer
(``nn.Linear`` before the rewrite, a vLLM ``LinearBase`` after it, a ``...WithLoRA`` wrapper
once LoRA is on). A key naming anything else is dropped without a word when its last name
happens to be a linear's name elsewhere in the model (Gemma4: ``q_proj`` is a packed name of
the text model, so ``...self_attn.q_proj.lora_A.weight`` on the vision tower's
``Gemma4ClippableLinear`` wrapper passes vLLM's unexpected-module check, lands nowhere, and the
output equals no LoRA). :func:`check_modules` says so for each module, with the key vLLM
would need (the wrapper's one linear: ``...q_proj.linear.lora_A.weight``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from fxpass.errors import UsageError
from fxpass.lora.adapter import PEFT_PREFIX, Adapter, ModuleLoRA, read_adapter, saved_module

__all__ = ["KeyResult", "AdapterCheck", "check_modules", "check_adapter", "check_model_dir",
           "find_towers", "landing_kind", "layer_sizes", "saved_keys"]

# Attribute names of multimodal towers in HF / vLLM models (the top-most match is the tower).
TOWER_NAMES = ("vision_tower", "audio_tower", "vision_model", "audio_model", "visual",
               "vision_encoder", "audio_encoder")


def landing_kind(module: nn.Module | None) -> str | None:
    """The kind of layer a LoRA lands on (None: not one)."""
    if module is None:
        return None
    cls = type(module)
    if cls.__name__.endswith("WithLoRA") and hasattr(module, "base_layer"):
        return "lora"
    from fxpass.layers import is_vllm_linear

    if is_vllm_linear(module):
        return "vllm"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def layer_sizes(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a landing layer: nn.Linear, vLLM linear or a LoRA wrapper."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    base = getattr(module, "base_layer", module)
    if hasattr(base, "input_size") and hasattr(base, "output_size"):
        return int(base.input_size), int(base.output_size)
    return None


@dataclasses.dataclass
class KeyResult:
    """One module an adapter targets and where its keys land."""

    module: str  # the module path the keys name (the model's naming)
    keys: list[str]
    tower: str | None  # the tower it falls under ("" = the model is a tower); None: not a tower
    lands: bool
    layer: str | None = None  # class of the layer it lands on
    slice_of: str | None = None  # a fused layer that holds this member as one slice
    suggestion: str | None = None  # the module path vLLM would need
    reason: str | None = None

    def suggested_keys(self) -> list[str]:
        if self.suggestion is None:
            return []
        return [k.replace(f"{self.module}.lora_", f"{self.suggestion}.lora_", 1)
                for k in self.keys]

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "suggested_keys": self.suggested_keys()}


@dataclasses.dataclass
class AdapterCheck:
    """The check of one adapter against one model (see :func:`check_modules`)."""

    adapter: str
    towers: list[str]
    results: list[KeyResult]
    unparsed: list[str] = dataclasses.field(default_factory=list)
    # unparsed keys that are a module of the adapter's modules_to_save: key -> module
    saved: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def nowhere(self) -> list[KeyResult]:
        return [r for r in self.results if not r.lands]

    @property
    def ok(self) -> bool:
        """Every key lands on a layer."""
        return not self.nowhere and not self.unparsed

    def on_tower(self, tower: str) -> list[KeyResult]:
        return [r for r in self.results if r.tower == tower]

    def to_dict(self) -> dict[str, Any]:
        return {"adapter": self.adapter, "towers": list(self.towers), "ok": self.ok,
                "results": [r.to_dict() for r in self.results],
                "unparsed": list(self.unparsed), "saved": dict(self.saved)}

    def format(self) -> str:
        lines = [f"adapter {self.adapter}: {len(self.results)} module(s), "
                 f"{sum(len(r.keys) for r in self.results)} key(s); towers: "
                 + (", ".join(t or "<root>" for t in self.towers) or "(none)")]
        for r in self.results:
            where = ("tower " + (r.tower or "<root>")) if r.tower is not None else "not a tower"
            if r.lands:
                on = f"slice of {r.slice_of}" if r.slice_of else r.layer
                lines.append(f"  ok       {r.module}  ({where}) -> {on}")
            else:
                lines.append(f"  NOWHERE  {r.module}  ({where}): {r.reason}")
                for k in r.keys:
                    lines.append(f"             key  {k}")
                for k in r.suggested_keys():
                    lines.append(f"             need {k}")
        for k in self.unparsed:
            if k in self.saved:
                lines.append(f"  NOWHERE  {k}: a full copy of {self.saved[k]} (the adapter's "
                             "modules_to_save), not a LoRA: vLLM loads modules_to_save only "
                             "for classifier / score heads and refuses such an adapter")
            else:
                lines.append(f"  NOWHERE  {k}: not a LoRA tensor name vLLM reads "
                             "(expected <module>.lora_A.weight / .lora_B.weight)")
        n = len(self.nowhere) + len(self.unparsed)
        lines.append("all keys land on a layer" if self.ok
                     else f"{n} module(s)/key(s) land nowhere: vLLM would ignore them silently")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def find_towers(model: nn.Module) -> list[str]:
    """Paths of the multimodal towers in ``model`` (top-most module named like a tower);
    ``[""]`` when there is none (the model is itself a tower)."""
    towers: list[str] = []
    for name, _ in model.named_modules():
        if name and name.rsplit(".", 1)[-1] in TOWER_NAMES and \
                not any(name.startswith(t + ".") for t in towers):
            towers.append(name)
    return towers or [""]


def _tower_of(path: str, towers: list[str]) -> str | None:
    for t in sorted(towers, key=len, reverse=True):
        if t == "" or path == t or path.startswith(t + "."):
            return t
    return None


def _suggest(path: str, module: nn.Module) -> str | None:
    """The one landing layer inside a wrapper module (its direct child first)."""
    direct = [n for n, c in module.named_children() if landing_kind(c)]
    if len(direct) == 1:
        return f"{path}.{direct[0]}"
    deep = [n for n, c in module.named_modules() if n and landing_kind(c)
            and not any(n.startswith(p + ".") for p in direct)]
    if len(deep) == 1:
        return f"{path}.{deep[0]}"
    return None


def _shape_problem(lora: ModuleLoRA, sizes: tuple[int, int] | None) -> str | None:
    if sizes is None:
        return None
    fan_in, fan_out = sizes
    if lora.a is not None and (lora.a.dim() != 2 or lora.a.shape[1] != fan_in):
        return (f"lora_A has shape {list(lora.a.shape)}, the layer takes {fan_in} inputs "
                f"(expected [r, {fan_in}])")
    if lora.b is not None and (lora.b.dim() != 2 or lora.b.shape[0] != fan_out):
        return (f"lora_B has shape {list(lora.b.shape)}, the layer has {fan_out} outputs "
                f"(expected [{fan_out}, r])")
    if lora.a is not None and lora.b is not None and lora.a.shape[0] != lora.b.shape[1]:
        return f"lora_A rank {lora.a.shape[0]} != lora_B rank {lora.b.shape[1]}"
    return None


def check_modules(loras: dict[str, ModuleLoRA], model: nn.Module, *,
                  towers: list[str] | None = None, fused: dict[str, list[str]] | None = None,
                  adapter: str = "<adapter>", unparsed: list[str] | None = None,
                  saved: dict[str, str] | None = None) -> AdapterCheck:
    """Where each adapted module of ``loras`` (module path in ``model``'s naming) lands.

    ``towers``: tower paths in ``model`` (default: :func:`find_towers`). ``fused``: fused layer
    path -> its members' paths (``fxpass.apply(fuse=True)``; a member's LoRA lands on its
    slice). A module lands when it is a linear layer (or a fused member); otherwise the result
    says why, and for a wrapper holding one linear, the path vLLM would need.
    """
    towers = find_towers(model) if towers is None else list(towers)
    modules = dict(model.named_modules())
    member_of = {m: f for f, ms in (fused or {}).items() for m in ms}
    results: list[KeyResult] = []
    for path, lora in sorted(loras.items()):
        r = KeyResult(module=path, keys=list(lora.keys), tower=_tower_of(path, towers),
                      lands=False)
        mod = modules.get(path)
        kind = landing_kind(mod)
        if kind is not None:
            problem = _shape_problem(lora, layer_sizes(mod))
            r.layer = type(mod).__name__
            if problem:
                r.reason = problem
            else:
                r.lands = True
        elif path in member_of:
            r.lands, r.slice_of, r.layer = True, member_of[path], "fused slice"
        elif mod is None:
            parent = path.rpartition(".")[0]
            while parent and parent not in modules:
                parent = parent.rpartition(".")[0]
            r.reason = (f"no module {path!r} in the model (deepest existing parent: "
                        f"{parent or '<root>'!r})")
        else:
            r.suggestion = _suggest(path, mod)
            r.reason = (f"{path} is a {type(mod).__name__}, not a linear layer: vLLM puts LoRA "
                        "only on linear layers, and drops these keys without an error")
            if r.suggestion:
                r.reason += f"; the linear inside it is {r.suggestion}"
        results.append(r)
    unparsed = list(unparsed or [])
    return AdapterCheck(adapter=adapter, towers=towers, results=results, unparsed=unparsed,
                        saved={k: m for k, m in (saved or {}).items() if k in unparsed})


def check_adapter(adapter: Adapter | str | Path, model: nn.Module, *,
                  towers: list[str] | None = None,
                  fused: dict[str, list[str]] | None = None) -> AdapterCheck:
    """:func:`check_modules` for an adapter directory (or a read :class:`Adapter`) against a
    model whose module paths are the adapter's (an HF model as loaded from its checkpoint)."""
    if not isinstance(adapter, Adapter):
        adapter = read_adapter(adapter)
    return check_modules(adapter.modules, model, towers=towers, fused=fused,
                         adapter=str(adapter.path), unparsed=adapter.unparsed,
                         saved=saved_keys(adapter))


def saved_keys(adapter: Adapter) -> dict[str, str]:
    """The adapter's unparsed keys that belong to its ``modules_to_save``: key -> module."""
    out = {}
    for k in adapter.unparsed:
        module = saved_module(adapter.config, k)
        if module is not None:
            out[k] = module
    return out


def check_model_dir(model_dir: str | Path, adapter_dir: str | Path) -> AdapterCheck:
    """Check an adapter against a local HF checkpoint, built on the meta device (no weights
    are read, offline, ``trust_remote_code=False``)."""
    import torch
    from transformers import AutoConfig

    from fxpass.zoo import _auto_class_for

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"MODEL_DIR {model_dir} has no config.json (not a save_pretrained "
                         "directory)")
    adapter = read_adapter(adapter_dir)
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False,
                                            local_files_only=True)
        auto = _auto_class_for(config)
        with torch.device("meta"):
            model = auto.from_config(config, trust_remote_code=False)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - unreadable config / unknown architecture
        raise UsageError(f"{model_dir}: cannot build the model from config.json "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                         ) from e
    return check_adapter(adapter, model)


def strip_peft_prefix(key: str) -> str:
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
