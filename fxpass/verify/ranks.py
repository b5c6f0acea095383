"""Run one function on N tensor-parallel ranks: N CPU processes sharing one vLLM TP group.

A sharded tower only runs with all its ranks: every row-parallel layer all-reduces across
them. :func:`run_on_ranks` starts N processes (``spawn``), each joining a TP group of N
through ``fxpass.vllm_runtime(tp=N, rank=r, init_method=...)`` (a fresh ``file://`` store
in a temporary directory; vLLM's CPU all-reduce gets ``VLLM_DIST_IDENT`` from it), calls
``fn(rank, *args)`` there and returns the results in rank order. If a rank fails, the others
would wait for it in their next collective forever: they are stopped, and the failure is
raised here (an fxpass error keeps its type, so ``fxpass diff --tp 2`` exits as it would on
one rank).
"""

from __future__ import annotations

import os
import queue
import tempfile
import time
import traceback
from typing import Any, Callable

from fxpass import errors
from fxpass.errors import FxpassError, UsageError

DEFAULT_TIMEOUT_S = 600.0


def _worker(fn: Callable[..., Any], rank: int, tp: int, init_method: str, out: Any,
            args: tuple[Any, ...]) -> None:
    try:
        from fxpass.vllm_context import vllm_runtime

        with vllm_runtime(tp=tp, rank=rank, init_method=init_method):
            result = fn(rank, *args)
        out.put((rank, "ok", result))
        _shutdown()
    except BaseException as e:  # noqa: BLE001 - handed to the parent with its traceback
        out.put((rank, "error", (type(e).__name__, str(e), traceback.format_exc())))


def _shutdown() -> None:
    """Release the TP group (vLLM's CPU all-reduce holds shared memory until then)."""
    try:
        from vllm.distributed.parallel_state import (
            destroy_distributed_environment,
            destroy_model_parallel,
        )

        destroy_model_parallel()
        destroy_distributed_environment()
    except Exception:  # noqa: BLE001 - the process exits next anyway
        pass


def run_on_ranks(fn: Callable[..., Any], tp: int, *args: Any,
                 timeout: float = DEFAULT_TIMEOUT_S) -> list[Any]:
    """``[fn(0, *args), ..., fn(tp - 1, *args)]``, each computed in its own rank process.

    ``fn`` and ``args`` must be picklable (a module-level function); results come back
    pickled. ``fn`` runs inside the rank's ``vllm_runtime``, so it can ``fxpass.apply(...,
    tp=tp)`` and run the sharded model right away.
    """
    import torch.multiprocessing as mp

    if not isinstance(tp, int) or tp < 2:
        raise UsageError(f"run_on_ranks needs tp >= 2, got {tp!r}")
    ctx = mp.get_context("spawn")
    results: dict[int, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fxpass-tp-") as tmp:
        init_method = f"file://{os.path.join(tmp, 'store')}"
        out = ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(fn, r, tp, init_method, out, args),
                             name=f"fxpass-tp-rank{r}", daemon=True) for r in range(tp)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        try:
            while len(results) < tp:
                try:
                    rank, status, payload = out.get(timeout=1.0)
                except queue.Empty:
                    dead = [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
                    if dead:
                        raise FxpassError(
                            f"tensor-parallel rank process {dead[0].name} died "
                            f"(exit code {dead[0].exitcode}) before reporting") from None
                    if time.monotonic() > deadline:
                        raise FxpassError(f"tensor-parallel ranks did not finish within "
                                          f"{timeout:g} s") from None
                    continue
                if status == "ok":
                    results[rank] = payload
                    continue
                name, message, tb = payload
                cls = getattr(errors, name, None)
                if isinstance(cls, type) and issubclass(cls, FxpassError) and cls is not \
                        errors.TraceError:
                    raise cls(f"rank {rank}: {message}")
                raise FxpassError(f"rank {rank} failed: {name}: {message}\n{tb}")
        finally:
            for p in procs:
                if p.is_alive() and len(results) < tp:
                    p.terminate()  # waiting for the failed rank in a collective
            for p in procs:
                p.join(timeout=30)
            out.close()
    return [results[r] for r in range(tp)]


__all__ = ["run_on_ranks"]
