"""Compiled towers: ``torch.compile`` over the parts of a rewritten tower its caller calls.

vLLM compiles its own decorated encoders when ``compilation_config.compile_mm_encoder`` is
set; HF towers it never reaches. fxpass compiles a rewritten tower's *entry points*: the
modules the model calls directly, as the first-call trace learnt them (vLLM's Gemma4 calls
``vision_tower.patch_embedder`` and ``vision_tower.encoder``, never the root). Each gets
``nn.Module.compile`` (the module object stays the one vLLM holds), dynamic shapes from the
first compile on, so a new image size compiles nothing new.

What dynamo sees is the installed graphs' code and, where a module stayed Python, HF's
code: the dispatch's fast path is plain attribute and type checks, and the one data-dependent
step fxpass adds (encoder attention's mask check, ``fxpass.rules.mm_attention``) is one
opaque op. A call no graph serves leaves the compiled region (``runtime.dispatch``), traces
its graph eagerly, and the next call compiles it: :func:`settle` makes those calls at the
engine's start, on vLLM's dummy inputs, until dynamo compiles nothing new; then
:func:`freeze` keeps requests from compiling: dynamic shapes cover every image size of a
vision tower, but an audio tower's chunked attention makes dynamo guard on length classes,
and a length outside the compiled ones runs the graphs eagerly (never a recompile, which
takes tens of seconds on a CPU, inside a request).
"""

from __future__ import annotations

import itertools
import time
import types
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

ROOT = "<root>"  # how the first-call report names the tower itself as an entry


def _entry(model: nn.Module, path: str) -> nn.Module:
    return model if path in (ROOT, "") else model.get_submodule(path)


def torch_backends() -> list[str]:
    """The backend names ``torch.compile`` takes by name."""
    from torch._dynamo.backends.registry import list_backends

    return list_backends(exclude_tags=())


def compile_entries(model: nn.Module, entries: Iterable[str], *, backend: str = "inductor",
                    dynamic: bool = True) -> list[str]:
    """``nn.Module.compile`` on each entry of ``model`` (root-relative paths, ``"<root>"``
    for the model) not compiled yet; the paths compiled now. Dynamo runs at the next call."""
    done = []
    for path in entries:
        module = _entry(model, path)
        if getattr(module, "_compiled_call_impl", None) is not None:
            continue
        _own_code(module)
        _compile(module, backend, dynamic)
        done.append(path)
    return done


_STANCE = "_fxpass_compile_stance"


def _compile(module: nn.Module, backend: str, dynamic: bool) -> None:
    """What ``nn.Module.compile`` does, under a stance of the module's own: dynamo's default
    until :func:`freeze`, then "eager_on_recompile" (a call no compiled code covers runs
    the installed graphs eagerly instead of compiling in a user's request)."""
    compiled = torch.compile(module._call_impl, backend=backend, dynamic=dynamic)
    setattr(module, _STANCE, "default")

    def call(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():  # inside a caller's compiled region: its stance
            return compiled(*args, **kwargs)
        with torch.compiler.set_stance(getattr(module, _STANCE, "default")):
            return compiled(*args, **kwargs)

    module._compiled_call_impl = call


def freeze(model: nn.Module, entries: Iterable[str]) -> None:
    """From now on the entries compile nothing new: a call no compiled code covers (an audio
    length in a shape class the warm-up did not meet) runs the graphs eagerly."""
    for path in entries:
        module = _entry(model, path)
        if hasattr(module, _STANCE):
            setattr(module, _STANCE, "eager_on_recompile")


_codes = itertools.count()


def _own_code(module: nn.Module) -> None:
    """Give the forward fxpass installed on ``module`` a code object of its own.

    Dynamo keeps its compiled frames per code object (``nn.Module``'s own call code it skips,
    so the frame is the forward), and every installed forward shares one
    (``runtime.install``): the entries of a tower, and their batch-size variants, would
    share one cache and its recompile limit, each evicting the other's guards."""
    from fxpass.runtime.install import is_graph_forward

    fwd = module.__dict__.get("forward")
    if not is_graph_forward(fwd):
        return  # the class's forward: one code per class, its instances are the entries
    f = fwd.__func__
    code = f.__code__.replace(co_name=f"{f.__code__.co_name}_{next(_codes)}")
    g = types.FunctionType(code, f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    g.__dict__.update(f.__dict__)  # the fxpass mark, the class forward's signature
    g.__qualname__ = f.__qualname__
    module.forward = types.MethodType(g, module)


def compiled_frames(model: nn.Module, entries: Iterable[str]) -> dict[str, int]:
    """Entry -> how many compiled frames dynamo holds for it (its forward's code): what the
    tower alone compiled, where the process-wide counters also count others (vLLM's
    language model)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    out = {}
    for path in entries:
        module = _entry(model, path)
        fwd = module.forward
        out[path] = len(_debug_get_cache_entry_list(getattr(fwd, "__func__", fwd).__code__))
    return out


def dynamo_counts() -> dict[str, int]:
    """Process-wide dynamo counters: graphs compiled and graph breaks met so far."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "breaks": int(sum(counters["graph_break"].values()))}


def graph_break_reasons() -> list[str]:
    """The first line of each distinct graph-break reason dynamo recorded (process-wide)."""
    from torch._dynamo.utils import counters

    return [k.strip().splitlines()[0][:200] for k in counters["graph_break"]]


def settle(call: Callable[[int], Any], *, batches: tuple[int, ...] = (1, 2),
           max_rounds: int = 3) -> dict[str, Any]:
    """Call ``call(batch)`` (which makes its inputs and grad mode as the real calls do) for
    each batch size until a call compiles no new dynamo graph (at most ``max_rounds`` per
    size): a batch of one specialises its dim to 1 (dynamo's
    0/1 rule), a batch of two makes it dynamic. Returns seconds, calls, graphs and breaks."""
    start = dynamo_counts()
    t0 = time.perf_counter()
    calls = 0
    for batch in batches:
        for _ in range(max_rounds):
            before = dynamo_counts()["graphs"]
            call(batch)
            calls += 1
            if dynamo_counts()["graphs"] == before:
                break
    end = dynamo_counts()
    return {"seconds": time.perf_counter() - t0, "calls": calls,
            "graphs": end["graphs"] - start["graphs"],
            "breaks": end["breaks"] - start["breaks"]}


__all__ = ["ROOT", "compile_entries", "compiled_frames", "dynamo_counts", "freeze",
           "graph_break_reasons", "settle", "torch_backends"]
