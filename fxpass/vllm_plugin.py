"""vLLM plugin: vLLM's multimodal towers are rewritten by ``fxpass.apply``.

Installed with fxpass, the entry point ``fxpass = "fxpass.vllm_plugin:register"`` in the
``vllm.general_plugins`` group makes vLLM call :func:`register` in every process it starts
(front end, engine core, workers), before any model is built. From then on, wherever vLLM
0.32 builds an HF tower and calls
``vllm.model_executor.models.transformers.utils.recursive_replace_linear(tower, quant_config,
prefix=...)`` (``gemma4_mm``, ``embedding_gemma2``, ``diffusion_gemma`` and any other model
module that imports that function), the call runs :func:`replace_linear`: the tower is traced
and rewritten by ``fxpass.apply(tower, quant_config, prefix=prefix, load_weights=False)``
with the same quant config and prefix, so vLLM's own loaders (default, bitsandbytes, ...)
fill the new ``ReplicatedLinear`` layers afterwards exactly as they fill the walk's.

No example inputs
    Model init has none, so ``apply`` swaps the linears at once and traces each tower at
    its first call, which ``fxpass.warmup`` brings to the engine's start (vLLM's dummy
    encoder input per modality); the graphs, their fixes, the fused layers (built from the
    loaded ones: the speed rules run by default) and vLLM's encoder attention hold from that
    call on (``fxpass.rewrite.first_call``). The report is logged twice: at init (what was
    swapped) and after the first call (graphs, fixes, timing). Tensor-parallel sharding
    (``mm_encoder_tp_mode="weights"`` at TP > 1) comes at that call too: the replicated
    layers vLLM's loader filled become column / row-parallel (and fused) layers, each rank
    keeping its block (a bitsandbytes tower stays replicated: its weights are packed).
    A module with no linear layers (vLLM's ``StageMissingLayer`` for a modality switched
    off) is not a failure: it is logged at DEBUG only.

Compiled towers
    Under vLLM's ``compilation_config.compile_mm_encoder`` (where vLLM would compile its own
    encoders: not in compilation mode NONE, which ``enforce_eager`` sets, nor under LoRA),
    the parts of each tower vLLM calls are compiled after their first call, with the
    engine's backend (``fxpass.runtime.compiled``: dynamic shapes, no graph break), and the
    warm-up runs vLLM's dummy inputs through them until dynamo settles, so the compile is
    part of the engine's start; an INFO line per tower says what it cost.

Switches
    ``fxpass.plugin_config``: vLLM's ``additional_config["fxpass"]`` (``enabled``,
    ``speed_rules``, ``disable``, ``warmup``) and the environment, which wins
    (``FXPASS_DISABLE=1``, ``FXPASS_SPEED_RULES``, ``FXPASS_DISABLE_RULES``,
    ``FXPASS_WARMUP``); read at each tower. ``FXPASS_DISABLE=1`` also makes :func:`register`
    patch nothing. A bad entry raises at model init (the engine stops), never a fallback.

Never breaking a model
    If tracing or rewriting raises, the tower is left as it was (``apply`` is atomic) and
    vLLM's ``recursive_replace_linear`` walks it instead; a warning names the tower and the
    reason, and :func:`records` keeps it (``fallback``). At run time, a traced graph called
    with an input it was not traced for (another argument structure, a branch the example
    did not take) is traced again for it; where that cannot be done (inside CUDA-graph
    capture or dynamo, past the bound, or when the trace fails) that module's Python
    ``forward`` serves the call (the walk's behaviour), with a warning the first time per
    module. :func:`records` counts both per module (``specialisations``, ``fallbacks``).

Tower LoRA
    Once a tower is rewritten, every LoRA adapter vLLM adds is checked against it (see
    :func:`check_lora_adapter`): a module of the adapter under the tower that is not a linear
    layer (a wrapper such as ``Gemma4ClippableLinear``; vLLM drops such keys silently) gets a
    warning naming the module vLLM would need, and is kept in :func:`records`
    (``lora_nowhere``). With LoRA enabled the plugin leaves fusion off (and does not warm
    the towers up: LoRA layers compute only inside a request), so vLLM's tower LoRA meets
    one ``ReplicatedLinear`` per HF linear.

Logging
    Logger ``vllm.fxpass`` (a child of vLLM's logger, so vLLM's handler and
    ``VLLM_LOGGING_LEVEL`` apply): one line per tower at INFO (``Report.summary_line()``),
    the full per-layer table at DEBUG (``VLLM_LOGGING_LEVEL=DEBUG``).

How the call sites are reached
    vLLM's model modules bind ``recursive_replace_linear`` by name at import
    (``from ...transformers.utils import recursive_replace_linear``). :func:`register` puts
    :func:`replace_linear` on ``vllm.model_executor.models.transformers.utils`` itself, so a
    module imported afterwards binds the replacement; any module already imported that
    holds the original function is rebound too. If the utils module is not imported yet,
    an import hook patches it the moment it is, so registration imports nothing from vLLM
    (and ``import fxpass.vllm_plugin`` imports neither vLLM nor transformers).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.abc
import importlib.machinery
import logging
import sys
import threading
from typing import Any

from fxpass.plugin_config import ENV_DISABLE  # (imports no torch, transformers or vLLM)

TARGET_MODULE = "vllm.model_executor.models.transformers.utils"
TARGET_NAME = "recursive_replace_linear"

logger = logging.getLogger("vllm.fxpass")

_lock = threading.RLock()
_original: Any = None  # vLLM's recursive_replace_linear, once seen
_registered = False

@dataclasses.dataclass
class TowerRecord:
    """What the plugin did with one tower vLLM handed to ``recursive_replace_linear``."""

    prefix: str
    tower: str  # class name
    report: Any = None  # fxpass.report.Report, None when the walk ran instead
    fallback: str | None = None  # why vLLM's own walk ran instead of fxpass
    # LoRA adapters whose keys for this tower land nowhere: one dict per module (adapter id,
    # module, keys, reason, the module vLLM would need)
    lora_nowhere: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # the engine's tensor-parallel size and mm_encoder_tp_mode when the tower was built
    tp_mode: dict[str, Any] = dataclasses.field(default_factory=dict)
    settings: Any = None  # fxpass.plugin_config.PluginConfig the tower was rewritten with
    fusion_off: str | None = None  # why the speed rules did not fuse, where they were on
    # compile_mm_encoder: backend (None: not compiled), why_not, entries compiled, and once
    # the warm-up settled them: seconds, calls, graphs, breaks (fxpass.runtime.compiled)
    compiled: dict[str, Any] = dataclasses.field(default_factory=dict)
    # the tower while its compiled entries wait for the warm-up to freeze them
    compiling: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def specialisations(self) -> dict[str, int]:
        """Module -> graphs traced since apply for calls its first graph did not cover."""
        rt = getattr(self.report, "runtime", None)
        return dict(rt.specialisations) if rt is not None else {}

    @property
    def fallbacks(self) -> dict[str, int]:
        """Module -> calls its Python forward served (no graph covered them)."""
        rt = getattr(self.report, "runtime", None)
        return dict(rt.fallbacks) if rt is not None else {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "tower": self.tower,
            "fallback": self.fallback,
            "specialisations": self.specialisations,
            "fallbacks": self.fallbacks,
            "lora_nowhere": list(self.lora_nowhere),
            "tp_mode": dict(self.tp_mode),
            "settings": self.settings.to_dict() if self.settings is not None else None,
            "fusion_off": self.fusion_off,
            "compiled": dict(self.compiled),
            "report": self.report.to_dict() if self.report is not None else None,
        }


_records: list[TowerRecord] = []


def records() -> list[TowerRecord]:
    """Every tower this process's plugin has handled, in build order (a copy of the list)."""
    with _lock:
        return list(_records)


def disabled() -> bool:
    """True when ``FXPASS_DISABLE`` is set to 1/true/yes/on (case-insensitive)."""
    from fxpass.plugin_config import env_disabled

    return env_disabled()


# ------------------------------------------------------------------------------ registration


class _ToVllmLog(logging.Handler):
    """Hands the ``fxpass`` logger's records (the graph runtime's and the first call's) to
    ``vllm.fxpass``, so inside an engine they come out through vLLM's handler and format."""

    def emit(self, record: logging.LogRecord) -> None:
        # vLLM's handlers on the way up from vllm.fxpass, not the root's: the record reaches
        # the root from the fxpass logger itself
        node: logging.Logger | None = logger
        while node is not None and node is not logging.root:
            for h in node.handlers:
                if record.levelno >= h.level:
                    h.handle(record)
            if not node.propagate:
                break
            node = node.parent  # type: ignore[assignment]


def _route_fxpass_logs() -> None:
    """Once per process: ``fxpass`` records also go to ``vllm.fxpass``, at its level unless
    the ``fxpass`` logger has its own."""
    lib = logging.getLogger("fxpass")
    if any(isinstance(h, _ToVllmLog) for h in lib.handlers):
        return
    lib.addHandler(_ToVllmLog())
    if lib.level == logging.NOTSET:
        lib.setLevel(logger.getEffectiveLevel())


def register() -> None:
    """The ``vllm.general_plugins`` entry point; safe to call any number of times."""
    global _registered
    if "vllm" in sys.modules:  # as it is wherever vLLM loads plugins
        try:  # vLLM's logging config (handler, VLLM_LOGGING_LEVEL) for the lines below
            import vllm.logger  # noqa: F401
        except Exception:  # noqa: BLE001
            pass
        _route_fxpass_logs()
    if disabled():
        logger.info("fxpass: %s is set; vLLM's recursive_replace_linear runs unchanged",
                    ENV_DISABLE)
        return
    with _lock:
        if _registered:
            return
        _registered = True
        module = sys.modules.get(TARGET_MODULE)
        if module is not None:
            _patch(module)
        else:
            sys.meta_path.insert(0, _PatchOnImport())
    logger.debug("fxpass: registered; towers built through %s.%s go through fxpass.apply",
                 TARGET_MODULE, TARGET_NAME)


def _patch(module: Any) -> None:
    """Put :func:`replace_linear` on the utils module and on every module bound to the original."""
    global _original
    with _lock:
        current = getattr(module, TARGET_NAME, None)
        if current is None:
            logger.warning("fxpass: %s has no %s (another vLLM version?); nothing patched",
                           TARGET_MODULE, TARGET_NAME)
            return
        if current is replace_linear:
            return
        _original = current
        setattr(module, TARGET_NAME, replace_linear)
        for name, mod in list(sys.modules.items()):
            if mod is None or mod is module:
                continue
            try:
                if mod.__dict__.get(TARGET_NAME) is current:
                    setattr(mod, TARGET_NAME, replace_linear)
                    logger.debug("fxpass: rebound %s.%s", name, TARGET_NAME)
            except Exception:  # noqa: BLE001 - exotic module objects: leave them
                continue


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then patches the freshly executed module."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self._inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._inner.exec_module(module)
        _patch(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... for tools
        return getattr(self._inner, name)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Import hook for the one module that defines ``recursive_replace_linear``."""

    _busy = threading.local()

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != TARGET_MODULE or getattr(self._busy, "on", False):
            return None
        self._busy.on = True
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._busy.on = False
        if spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader)
        # One module, once: the hook is not needed after this import.
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass
        return spec


# ------------------------------------------------------------------------------ the call site


def vllm_walk() -> Any:
    """vLLM's own ``recursive_replace_linear`` (the module walk), patched or not.

    For comparisons against vLLM's behaviour in a process where the plugin may be registered:
    importing the name from vLLM's utils module there gives :func:`replace_linear`.
    """
    if _original is not None:
        return _original
    fn = getattr(importlib.import_module(TARGET_MODULE), TARGET_NAME)
    if fn is replace_linear:  # patched, yet the original was never seen: cannot happen
        raise RuntimeError("fxpass: vLLM's recursive_replace_linear is not known")
    return fn


def replace_linear(model: Any, quant_config: Any, prefix: str = "") -> None:
    """Drop-in for vLLM's ``recursive_replace_linear``: ``fxpass.apply`` on the tower.

    Falls back to the original (and says why) if anything in fxpass raises.
    """
    original = vllm_walk()
    from fxpass import plugin_config

    settings = plugin_config.from_engine()  # a bad fxpass entry stops the engine here
    if not settings.enabled:
        return original(model, quant_config, prefix=prefix)

    record = TowerRecord(prefix=prefix, tower=type(model).__name__, settings=settings)
    with _lock:
        _records.append(record)
    try:
        import fxpass

        tp, record.tp_mode = engine_tp()
        # Traced in eval mode, as vLLM runs the towers (from_config leaves them in training
        # mode): a graph traced in training mode would be traced again at the first call,
        # and a sharded module is re-traced only where it owns its pairs (see
        # fxpass.rewrite.respecialise)
        modes = {m: m.training for m in model.modules()}
        model.eval()
        try:
            # No example inputs in vLLM's model init: the layers are swapped now (replicated,
            # for vLLM's loader to fill), the graphs come from the tower's first real call
            # (the warm-up at the engine's start, else a request), and fusion and sharding
            # with them: built from the loaded layers (each rank keeps its block)
            fuse, record.fusion_off = _fusion(settings)
            record.compiled = _compile_plan()
            report = fxpass.apply(model, quant_config, prefix=prefix, load_weights=False,
                                  tp=tp if tp > 1 else None, first_call=True, fuse=fuse,
                                  disable=settings.disable | (
                                      {"fusion"} if record.fusion_off else set()),
                                  on_first_call=functools.partial(
                                      _after_first_call, record, model))
        finally:
            for m, training in modes.items():
                m.training = training
    except Exception as e:  # noqa: BLE001 - never break the model: vLLM's walk takes over
        reason = f"{type(e).__name__}: {e}".strip()
        record.fallback = reason
        logger.warning(
            "fxpass[%s]: rewriting %s failed, so vLLM's recursive_replace_linear walks it "
            "instead (%s=1 skips fxpass altogether): %s",
            prefix or "<root>", type(model).__name__, ENV_DISABLE, reason.splitlines()[0][:500])
        return original(model, quant_config, prefix=prefix)
    record.report = report
    _patch_lora_manager()
    if not report.replaced and not report.skipped:
        # nothing to rewrite (vLLM's StageMissingLayer for a modality switched off): not news
        logger.debug("fxpass[%s]: %s has no linear layers; nothing to rewrite",
                     prefix or "<root>", type(model).__name__)
        return None
    logger.info("%s", report.summary_line())
    compiled = record.compiled
    logger.info("fxpass[%s]: %s%s%s", prefix or "<root>", settings.describe(),
                f"; fusion off: {record.fusion_off}" if record.fusion_off else "",
                "" if not compiled else (
                    f"; compile_mm_encoder: not compiled: {compiled['why_not']}"
                    if compiled.get("why_not") else
                    f"; compile_mm_encoder: the modules vLLM calls compile with torch.compile "
                    f"(backend {compiled['backend']}, dynamic shapes) after the first call"
                    + (" at the engine's start" if settings.warmup else "")))
    if settings.warmup and report.traced_at == "first call":
        from fxpass.warmup import wrap_workers

        # their first call (and their compile) at the engine's start
        wrap_workers(_towers_pending, compiling=_towers_compiling, on_settled=_log_compiled)
    if record.tp_mode.get("world_size", 1) > 1 and record.tp_mode.get("tp", 1) == 1:
        why = record.tp_mode.get("why_replicated") or (
            f"mm_encoder_tp_mode={record.tp_mode.get('mm_encoder_tp_mode')}")
        logger.info("fxpass[%s]: the tower stays replicated on each of the %d tensor-parallel "
                    "ranks: %s", prefix or "<root>", record.tp_mode["world_size"], why)
    if report.traced_at != "first call":
        _log_table(report)
    return None


def _fusion(settings: Any) -> tuple[bool, str | None]:
    """(whether the speed rules run, why the fusion rule stays off where they do)."""
    if not settings.speed_rules:
        return False, None
    if "fusion" in settings.disable:
        return True, None  # the other speed rules run; "fusion" is left out by name
    from fxpass.vllm_context import current_engine_config

    if getattr(current_engine_config(), "lora_config", None) is not None:
        return True, ("LoRA is enabled: vLLM's LoRA layers wrap each HF linear by its name, "
                      "so the linears stay one layer each")
    return True, None


def _compile_plan() -> dict[str, Any]:
    """What ``compilation_config.compile_mm_encoder`` asks of this tower: {} when it is not
    set; else the backend, or why not (as vLLM decides for its own encoders: not in
    compilation mode NONE, which ``enforce_eager=True`` sets)."""
    from fxpass.vllm_context import current_engine_config

    config = current_engine_config()
    cc = getattr(config, "compilation_config", None)
    if not getattr(cc, "compile_mm_encoder", False):
        return {}
    plan: dict[str, Any] = {"backend": None, "why_not": None, "entries": []}
    if int(getattr(cc, "mode", 0) or 0) == 0:
        plan["why_not"] = ("vLLM's compilation mode is NONE (enforce_eager=True sets it), in "
                           "which vLLM compiles none of its own encoders either")
    elif getattr(config, "lora_config", None) is not None:
        plan["why_not"] = ("LoRA is enabled: vLLM's LoRA layers take their adapter mapping "
                           "per request, outside a compiled region")
    else:
        from fxpass.runtime.compiled import torch_backends

        backend = getattr(cc, "backend", "") or "inductor"
        plan["backend"] = backend if backend in torch_backends() else "inductor"
    return plan


def _after_first_call(record: TowerRecord, model: Any, report: Any) -> None:
    """After a first call traced a part of the tower: log it, and compile the parts the
    model calls (``compile_mm_encoder``), which dynamo compiles at their next call."""
    _log_first_call(report)
    backend = record.compiled.get("backend")
    if backend:
        from fxpass.runtime.compiled import compile_entries

        entries = list((report.first_call or {}).get("entries", {}))
        record.compiled["entries"] += compile_entries(model, entries, backend=backend)
        record.compiling = model  # until the warm-up freezes it (_log_compiled)


def _towers_compiling() -> bool:
    """A tower this process compiled has not been settled by the warm-up yet."""
    with _lock:
        return any(r.compiling is not None for r in _records)


def _log_compiled(modality: str, stats: dict[str, Any]) -> None:
    """The warm-up settled the towers compiled during its ``modality`` calls: what it cost."""
    from fxpass.runtime.compiled import freeze, graph_break_reasons

    with _lock:
        towers = [r for r in _records if r.compiling is not None]
    for r in towers:
        r.compiled.update(stats, modality=modality)
        freeze(r.compiling, r.compiled["entries"])
        r.compiling = None
        breaks = stats.get("breaks", 0)
        logger.info(
            "fxpass[%s]: compiled %s with torch.compile (backend %s, dynamic shapes) at the "
            "engine's start on vLLM's dummy %s input: %.1f s over %d calls (batch 1 and 2); "
            "dynamo made %d graphs with %d graph breaks%s", r.prefix or "<root>",
            ", ".join(r.compiled["entries"]), r.compiled["backend"], modality,
            stats["seconds"], stats["calls"], stats["graphs"], breaks,
            f" ({'; '.join(graph_break_reasons()[:3])})" if breaks else "")


def _towers_pending() -> bool:
    """A tower this process rewrote still waits for its first call."""
    with _lock:
        return any(r.report is not None and r.report.first_call.get("state") == "armed"
                   for r in _records)


def _log_first_call(report: Any) -> None:
    """The report once the first call traced the tower: the summary at INFO, the table at
    DEBUG."""
    logger.info("%s", report.summary_line())
    _log_table(report)


def _log_table(report: Any) -> None:
    if logger.isEnabledFor(logging.DEBUG):
        table = str(report).splitlines()[1:]  # line 0 is the summary logged at INFO
        if table:
            logger.debug("fxpass[%s] report:\n%s", report.prefix or "<root>", "\n".join(table))


def tp_for(world_size: int, mode: str | None) -> int:
    """The TP size to shard a tower over: vLLM's TP world size under
    ``mm_encoder_tp_mode="weights"`` (vLLM's default: split each layer's weights across the
    ranks), 1 (replicated) under ``"data"`` or on one rank."""
    return world_size if world_size > 1 and (mode or "weights") == "weights" else 1


def engine_tp() -> tuple[int, dict[str, Any]]:
    """(TP size to shard over, what it was decided from) inside vLLM's model init."""
    from fxpass.vllm_context import current_engine_config, tp_world_size

    world = tp_world_size()
    mm = getattr(getattr(current_engine_config(), "model_config", None), "multimodal_config",
                 None)
    mode = getattr(mm, "mm_encoder_tp_mode", None)  # None: vLLM's default mode
    tp = tp_for(world, mode)
    return tp, {"world_size": world, "mm_encoder_tp_mode": mode or "weights", "tp": tp}


_LORA_PATCHED = "_fxpass_lora_check"


def _patch_lora_manager() -> None:
    """Check every adapter vLLM's LoRA manager adds against the towers fxpass rewrote.

    vLLM drops adapter keys whose module is not a linear layer without a word (Gemma4: keys
    on the ``Gemma4ClippableLinear`` wrapper instead of its ``.linear``). The wrapped
    ``LoRAModelManager._add_adapter`` runs :func:`fxpass.lora.check.check_modules` on the
    adapter's modules under those towers first and logs a warning per module that lands
    nowhere, with the module vLLM would need; then vLLM goes on as before. Never raises.
    """
    try:
        from vllm.lora.model_manager import LoRAModelManager
    except Exception:  # noqa: BLE001 - no LoRA support in this vLLM: nothing to check
        return
    original = LoRAModelManager._add_adapter
    if getattr(original, _LORA_PATCHED, False):
        return

    def _add_adapter(self: Any, lora: Any) -> Any:
        try:
            check_lora_adapter(self, lora)
        except Exception as e:  # noqa: BLE001 - a check must never break serving
            logger.debug("fxpass: adapter check failed: %s", e)
        return original(self, lora)

    setattr(_add_adapter, _LORA_PATCHED, True)
    LoRAModelManager._add_adapter = _add_adapter


def check_lora_adapter(manager: Any, lora: Any) -> list[dict[str, Any]]:
    """The adapter check for one ``LoRAModel`` vLLM is adding (vLLM's module names), against
    the towers of ``manager.model`` that fxpass rewrote; warns and records what lands nowhere."""
    from fxpass.lora.adapter import ModuleLoRA
    from fxpass.lora.check import check_modules

    with _lock:
        recs = [r for r in _records if r.report is not None]
    model = manager.model
    towers = {r.prefix: r for r in recs if r.prefix}
    modules = dict(model.named_modules())
    towers = {p: r for p, r in towers.items() if p in modules}
    if not towers:
        return []
    packed = {m for ms in getattr(manager, "packed_modules", {}).values() for m in ms}
    loras: dict[str, ModuleLoRA] = {}
    for name, lw in lora.loras.items():
        if name in packed or not any(name == t or name.startswith(t + ".") for t in towers):
            continue
        loras[name] = ModuleLoRA(name, [f"{name}.lora_A.weight", f"{name}.lora_B.weight"],
                                 a=lw.lora_a if hasattr(lw.lora_a, "shape") else None,
                                 b=lw.lora_b if hasattr(lw.lora_b, "shape") else None)
    result = check_modules(loras, model, towers=list(towers), adapter=f"LoRA {lora.id}")
    found = []
    for r in result.nowhere:
        entry = {"adapter_id": lora.id, "module": r.module, "keys": r.keys,
                 "reason": r.reason, "needed_module": r.suggestion}
        found.append(entry)
        with _lock:
            towers[r.tower].lora_nowhere.append(entry)
        logger.warning(
            "fxpass[%s]: LoRA adapter %s has weights for %s, which lands on no layer: %s. "
            "vLLM ignores them (the tower runs as without this LoRA)%s. "
            "`fxpass lora-check MODEL_DIR ADAPTER_DIR` lists every such key.",
            r.tower, lora.id, r.module, r.reason,
            f"; key it as {r.suggestion}.lora_A.weight / .lora_B.weight"
            if r.suggestion else "")
    return found


__all__ = ["ENV_DISABLE", "TowerRecord", "check_lora_adapter", "disabled", "engine_tp",
           "records", "register", "replace_linear", "tp_for", "vllm_walk"]
