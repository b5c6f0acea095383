"""A vLLM runtime for building and running vLLM layers outside an engine.

vLLM layers need two pieces of process state even with ``disable_tp=True``:
the tensor-parallel group (``ModelWeightParameter`` asks for the TP rank at
construction) and, for ``initialize_model_parallel`` and some layers, a
"current" ``VllmConfig``. Inside vLLM's own model init both already exist and
must not be created twice; standalone (tests, offline rewriting) nobody sets
them up. :func:`vllm_runtime` covers both cases.

vLLM is imported only when the context manager is entered, so importing this
module stays cheap.
"""

from __future__ import annotations

import atexit
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

_init_lock = threading.Lock()
_default_config = None  # one VllmConfig() per process: building one takes ~1 s


def _default_vllm_config():
    global _default_config
    if _default_config is None:
        from vllm.config import VllmConfig

        _default_config = VllmConfig()
    return _default_config


def _ensure_model_parallel(config) -> None:
    """Set up a one-rank gloo world and TP/PP groups of size 1, once per process.

    torch.distributed cannot be cheaply torn down and re-initialised, so the
    groups made here are kept for the life of the process (never destroyed on
    context exit). When vLLM has already initialised them (inside an engine's
    model init), nothing is touched.
    """
    from vllm.config import set_current_vllm_config
    from vllm.distributed.parallel_state import (
        init_distributed_environment,
        initialize_model_parallel,
        model_parallel_is_initialized,
    )

    with _init_lock:
        if model_parallel_is_initialized():
            return
        fd, store_path = tempfile.mkstemp(prefix="fxpass-dist-", suffix=".store")
        os.close(fd)
        atexit.register(_remove_quietly, store_path)
        # initialize_model_parallel reads the current config: keep one set.
        with set_current_vllm_config(config):
            init_distributed_environment(
                world_size=1,
                rank=0,
                local_rank=0,
                distributed_init_method=f"file://{store_path}",
                backend="gloo",
            )
            initialize_model_parallel(1, 1)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


_active = threading.local()  # .config: the config of this thread's innermost block


@contextmanager
def vllm_runtime() -> Iterator[None]:
    """Make vLLM layers buildable and runnable here; re-entrant, nestable.

    If model-parallel state is missing it is created once for the process and
    kept (see :func:`_ensure_model_parallel`). A default ``VllmConfig()`` is made
    current for the duration of the block only when no config is current, so an
    engine's own config (or an outer block's) is never replaced. Inside an outer
    block nothing is checked again (``apply`` builds hundreds of layers in one).
    """
    from vllm.config import get_current_vllm_config_or_none, set_current_vllm_config

    current = get_current_vllm_config_or_none()
    if current is not None and getattr(_active, "config", None) is current:
        yield  # an outer block set this up and its config is still the current one
        return
    config = current if current is not None else _default_vllm_config()
    _ensure_model_parallel(config)
    scope = set_current_vllm_config(config) if current is None else nullcontext()
    outer = getattr(_active, "config", None)
    with scope:
        _active.config = config
        try:
            yield
        finally:
            _active.config = outer


def runtime_active() -> bool:
    """True when vLLM layers can be built right now (MP groups and a config exist).

    Never imports vLLM: if its parallel state is not imported yet, nothing can
    have initialised it.
    """
    parallel_state = sys.modules.get("vllm.distributed.parallel_state")
    vllm_config = sys.modules.get("vllm.config.vllm")
    if parallel_state is None or vllm_config is None:
        return False
    return (
        parallel_state.model_parallel_is_initialized()
        and vllm_config.get_current_vllm_config_or_none() is not None
    )
