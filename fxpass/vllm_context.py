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
from typing import Any

from fxpass.errors import UsageError

_init_lock = threading.Lock()
_default_config = None  # one VllmConfig() per process: building one takes ~1 s


def _default_vllm_config():
    global _default_config
    if _default_config is None:
        from vllm.config import VllmConfig

        _default_config = VllmConfig()
    return _default_config


def _ensure_model_parallel(config, tp: int | None = None, rank: int = 0,
                           init_method: str | None = None) -> None:
    """Set up a gloo world and TP/PP groups, once per process.

    By default one rank (TP size 1). ``tp > 1`` makes this process rank ``rank`` of a TP group
    of ``tp`` processes that meet at ``init_method`` (``file://<path>``, the same on every
    rank); vLLM's CPU all-reduce (shared memory) needs ``VLLM_DIST_IDENT``, the same string on
    every rank: it is set from the init file's name, as vLLM's CPU worker does, unless already
    set. torch.distributed cannot be cheaply torn down and re-initialised, so the groups made
    here are kept for the life of the process (never destroyed on context exit). When vLLM
    has already initialised them (inside an engine's model init), nothing is touched; asking
    for another TP size than the one there is a UsageError.
    """
    from vllm.config import set_current_vllm_config
    from vllm.distributed.parallel_state import (
        get_tensor_model_parallel_world_size,
        init_distributed_environment,
        initialize_model_parallel,
        model_parallel_is_initialized,
    )

    with _init_lock:
        if model_parallel_is_initialized():
            have = get_tensor_model_parallel_world_size()
            if tp is not None and tp != have:
                raise UsageError(
                    f"vllm_runtime(tp={tp}): this process already has a tensor-parallel group "
                    f"of {have} rank(s); a process joins one TP group, once (start a fresh "
                    "process per rank)")
            return
        tp = 1 if tp is None else tp
        if not isinstance(tp, int) or tp < 1:
            raise UsageError(f"tp must be a positive int, got {tp!r}")
        if tp == 1:
            fd, store_path = tempfile.mkstemp(prefix="fxpass-dist-", suffix=".store")
            os.close(fd)
            atexit.register(_remove_quietly, store_path)
            init_method, rank = f"file://{store_path}", 0
        else:
            if not (isinstance(init_method, str) and init_method.startswith("file://")):
                raise UsageError(
                    f"vllm_runtime(tp={tp}) needs init_method='file://<path>', one path shared "
                    f"by the {tp} rank processes (a file that does not exist yet), got "
                    f"{init_method!r}")
            if not (isinstance(rank, int) and 0 <= rank < tp):
                raise UsageError(f"rank must be an int in [0, {tp}), got {rank!r}")
            os.environ.setdefault("VLLM_DIST_IDENT",
                                  os.path.basename(init_method.removeprefix("file://")))
        # initialize_model_parallel reads the current config: keep one set.
        with set_current_vllm_config(config):
            init_distributed_environment(
                world_size=tp,
                rank=rank,
                local_rank=rank,
                distributed_init_method=init_method,
                backend="gloo",
            )
            initialize_model_parallel(tp, 1)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


_active = threading.local()  # .config: the config of this thread's innermost block


@contextmanager
def vllm_runtime(*, tp: int | None = None, rank: int = 0,
                 init_method: str | None = None) -> Iterator[None]:
    """Make vLLM layers buildable and runnable here; re-entrant, nestable.

    If model-parallel state is missing it is created once for the process and
    kept (see :func:`_ensure_model_parallel`): one rank by default; with ``tp=N``
    (``rank``, ``init_method="file://<shared path>"``) this process joins a TP group
    of N processes, each entering ``vllm_runtime(tp=N, rank=r, init_method=...)`` with
    the same path, so ``fxpass.apply(..., tp=N)`` can shard towers over them.
    A default ``VllmConfig()`` is made
    current for the duration of the block only when no config is current, so an
    engine's own config (or an outer block's) is never replaced. Inside an outer
    block nothing is checked again (``apply`` builds hundreds of layers in one).
    """
    from vllm.config import get_current_vllm_config_or_none, set_current_vllm_config

    current = get_current_vllm_config_or_none()
    if current is not None and getattr(_active, "config", None) is current and tp is None:
        yield  # an outer block set this up and its config is still the current one
        return
    config = current if current is not None else _default_vllm_config()
    _ensure_model_parallel(config, tp, rank, init_method)
    scope = set_current_vllm_config(config) if current is None else nullcontext()
    outer = getattr(_active, "config", None)
    with scope:
        _active.config = config
        try:
            yield
        finally:
            _active.config = outer


@contextmanager
def engine_config_scope(config: Any = None) -> Iterator[None]:
    """:func:`vllm_runtime` with ``config`` (a ``VllmConfig`` captured when ``apply`` ran
    inside an engine's model init) current: a layer built later, at a tower's first call,
    reads the engine's settings (``mm_encoder_attn_backend``, ...) instead of defaults."""
    if config is None:
        with vllm_runtime():
            yield
        return
    from vllm.config import get_current_vllm_config_or_none, set_current_vllm_config

    scope = (nullcontext() if get_current_vllm_config_or_none() is config
             else set_current_vllm_config(config))
    with scope, vllm_runtime():
        yield


def current_engine_config() -> Any:
    """The ``VllmConfig`` an engine has made current (inside its model init), else None;
    never imports vLLM when it is not loaded yet."""
    if "vllm.config" not in sys.modules:
        return None
    from vllm.config import get_current_vllm_config_or_none

    config = get_current_vllm_config_or_none()
    return None if config is None or config is _default_config else config


def tp_world_size() -> int:
    """The size of this process's vLLM tensor-parallel group (1 when none is set up).

    Never imports vLLM: if its parallel state is not imported yet, nothing can have
    initialised it.
    """
    parallel_state = sys.modules.get("vllm.distributed.parallel_state")
    if parallel_state is None or not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_tensor_model_parallel_world_size()


def tp_rank() -> int:
    """This process's rank in its vLLM tensor-parallel group (0 when none is set up)."""
    parallel_state = sys.modules.get("vllm.distributed.parallel_state")
    if parallel_state is None or not parallel_state.model_parallel_is_initialized():
        return 0
    return parallel_state.get_tensor_model_parallel_rank()


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
