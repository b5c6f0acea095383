"""Build vLLM ``ReplicatedLinear`` layers from ``nn.Linear`` and move weights in.

Three jobs, all done the way vLLM itself does them so that a rewritten tower
behaves like one vLLM built:

* :func:`build_vllm_linear` constructs the layer and turns quant-config
  failures (``get_quant_method`` returning None or raising) into
  :class:`~fxpass.errors.QuantConfigError` naming the layer.
* :func:`load_linear_weights` feeds the original tensors through the
  parameters' own ``weight_loader`` and, for bitsandbytes, quantizes in flight
  and binds the quant states exactly as ``vllm_bnb_plugin``'s
  ``BitsAndBytesModelLoader`` does (4-bit: ``quantize_4bit`` with double
  quantization, flattened afterwards; 8-bit: HF ``Int8Params`` row-wise int8).
* :func:`fake_quantize` gives the same quantized values as a float tensor, so a
  plain ``nn.Linear`` can serve as a reference for the vLLM layer.

vLLM and bitsandbytes are imported inside functions only.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from fxpass.errors import QuantConfigError, UsageError, WeightLoadError

BNB_METHODS = ("nf4", "fp4", "int8")

__all__ = [
    "BNB_METHODS",
    "bnb_config",
    "build_fused_parallel_linear",
    "build_parallel_linear",
    "build_vllm_linear",
    "fake_quantize",
    "load_linear_weights",
    "logical_weight_info",
    "quant_method_name",
    "tp_style",
]


# --------------------------------------------------------------------------- config


def bnb_config(method: str, skip_modules: list[str] | None = None) -> Any:
    """The plugin's ``BitsAndBytesConfig`` for "nf4", "fp4" or "int8".

    Built through ``BitsAndBytesConfig.from_config`` with the keys of a HF
    ``quantization_config`` dict, the same route vLLM takes for a checkpoint.
    ``skip_modules`` become ``llm_int8_skip_modules``: vLLM matches them against
    each layer's prefix (a dotted component or a leading dotted path).
    """
    if method not in BNB_METHODS:
        raise UsageError(f"unknown bitsandbytes method {method!r}; expected one of {BNB_METHODS}")
    from vllm_bnb_plugin.bitsandbytes import BitsAndBytesConfig

    hf_config: dict[str, Any] = {"quant_method": "bitsandbytes"}
    if method == "int8":
        # from_config defaults load_in_4bit to True: say explicitly it is off.
        hf_config.update(load_in_8bit=True, load_in_4bit=False)
    else:
        hf_config.update(load_in_4bit=True, load_in_8bit=False, bnb_4bit_quant_type=method)
    hf_config["llm_int8_skip_modules"] = list(skip_modules or [])
    return BitsAndBytesConfig.from_config(hf_config)


def _bnb_linear_method(layer: nn.Module) -> Any | None:
    """The layer's ``BitsAndBytesLinearMethod``, or None (never imports the plugin)."""
    module = sys.modules.get("vllm_bnb_plugin.quantization.linear")
    method = getattr(layer, "quant_method", None)
    if module is not None and isinstance(method, module.BitsAndBytesLinearMethod):
        return method
    return None


def quant_method_name(quant_config: Any, layer: nn.Module) -> str:
    """The layer's quant method as "none", "nf4", "fp4", "int8", or its class name.

    Read from the method the layer actually got, since a skip-listed prefix gets
    ``UnquantizedLinearMethod`` even under a bitsandbytes config.
    """
    if quant_config is None:
        return "none"
    method = getattr(layer, "quant_method", None)
    if method is None:
        raise UsageError(f"{type(layer).__name__} has no quant_method: pass a built vLLM layer")
    if type(method).__name__ == "UnquantizedLinearMethod":
        return "none"
    if _bnb_linear_method(layer) is not None:
        bnb = method.quant_config
        return "int8" if bnb.load_in_8bit else bnb.bnb_4bit_quant_type
    return type(method).__name__


# --------------------------------------------------------------------------- build


def build_vllm_linear(
    linear: nn.Linear,
    quant_config: Any,
    prefix: str,
    *,
    device: torch.device | str | None = None,
) -> nn.Module:
    """A ``ReplicatedLinear`` shaped like ``linear``, weights not loaded yet.

    ``return_bias=False`` makes it a drop-in for ``nn.Linear`` (a tensor, not a
    tuple). It is built on ``device`` (default: the linear's, meta included, in
    which case nothing is allocated). The quant method it got is
    ``layer.quant_method`` (see :func:`quant_method_name`).

    ``prefix`` must be the checkpoint-style dotted name: skip lists match on it.
    """
    if not isinstance(linear, nn.Linear):
        raise UsageError(f"{prefix}: expected an nn.Linear, got {type(linear).__name__}")
    from vllm.model_executor.layers.linear import ReplicatedLinear

    target = torch.device(device) if device is not None else linear.weight.device
    layer = _build_layer(ReplicatedLinear, quant_config, prefix, target,
                         input_size=linear.in_features, output_size=linear.out_features,
                         bias=linear.bias is not None, params_dtype=linear.weight.dtype)
    # HF code reads a linear's sizes (``self.proj.out_features``); vLLM's layer names them
    # input_size / output_size. A graph traced again after apply (a new shape, a changed mode
    # or config) and a Python forward run that code against this layer.
    layer.in_features, layer.out_features = linear.in_features, linear.out_features
    return layer


def _build_layer(cls: type, quant_config: Any, prefix: str, device: torch.device,
                 *, tp: bool = False, **sizes: Any) -> nn.Module:
    """Build a vLLM linear ``cls`` (tensor out) with the method the config gives ``prefix``;
    quant-config failures become QuantConfigError naming the layer. ``tp``: sharded over
    this process's tensor-parallel group (else replicated: ``disable_tp=True``)."""
    from fxpass.vllm_context import vllm_runtime

    kwargs: dict[str, Any] = dict(sizes, prefix=prefix, return_bias=False)
    if not tp:
        kwargs["disable_tp"] = True
    with vllm_runtime():
        method_cls = None
        if quant_config is not None:
            probe = {"input_size": _probe_input(sizes), "output_size": _probe_output(sizes),
                     "bias": sizes.get("bias", True), "params_dtype": sizes.get("params_dtype"),
                     "prefix": prefix, "return_bias": False, "disable_tp": True}
            method_cls = _resolve_quant_method(quant_config, prefix, probe)
        try:
            with torch.device(device):
                layer = cls(quant_config=quant_config, **kwargs)
        except (ValueError, AssertionError, NotImplementedError) as e:
            if quant_config is None:
                raise
            # The same shape built unquantized in the probe, so this is the quant
            # method's doing (e.g. bnb 4-bit needs in*out even).
            raise QuantConfigError(
                f"{prefix}: building the layer with {method_cls} from "
                f"{type(quant_config).__name__} failed: {str(e).rstrip('.')}. "
                f"Add {prefix!r} to the config's skip list (llm_int8_skip_modules / "
                "ignored layers) or pass quant_config=None for this layer."
            ) from e
    _fix_bnb_4bit_storage(layer)
    return layer


def _probe_input(sizes: dict[str, Any]) -> int:
    return sizes["input_size"] if "input_size" in sizes else sizes["hidden_size"]


def _probe_output(sizes: dict[str, Any]) -> int:
    if "output_sizes" in sizes:
        return sum(sizes["output_sizes"])
    if "output_size" in sizes:
        return sizes["output_size"]
    head = sizes["head_size"]
    return head * (sizes["total_num_heads"] + 2 * sizes["total_num_kv_heads"])


def _resolve_quant_method(quant_config: Any, prefix: str, kwargs: dict[str, Any]) -> str:
    """Ask the config for this layer's method as LinearBase.__init__ will.

    vLLM itself gives a bare ``ValueError("All linear layers should support quant
    method.")`` for None (no layer name) and lets exceptions through unchanged,
    so the question is asked first on a probe: a real, unquantized
    ``ReplicatedLinear`` on meta with the same sizes and prefix (so isinstance
    checks and prefix matching see what the real layer will show). The config is
    therefore asked twice per layer; configs are expected to answer the same.
    """
    from vllm.model_executor.layers.linear import ReplicatedLinear
    from vllm.model_executor.layers.quantization.base_config import resolve_quant_method

    with torch.device("meta"):
        probe = ReplicatedLinear(quant_config=None, **kwargs)
    config_name = type(quant_config).__name__
    try:
        method = resolve_quant_method(quant_config, probe, prefix=prefix)
    except Exception as e:
        raise QuantConfigError(
            f"{prefix}: {config_name}.get_quant_method raised "
            f"{type(e).__name__}: {str(e).rstrip('.')}. This config cannot serve the layer: add "
            f"{prefix!r} to its skip list (llm_int8_skip_modules / ignored layers) "
            "or pass quant_config=None for this layer."
        ) from e
    if method is None:
        raise QuantConfigError(
            f"{prefix}: {config_name}.get_quant_method returned None for a "
            "ReplicatedLinear (vLLM requires a method for every linear layer). "
            f"Add {prefix!r} to the config's skip list so it gets "
            "UnquantizedLinearMethod, or pass quant_config=None for this layer."
        )
    return type(method).__name__


def _fix_bnb_4bit_storage(layer: nn.Module) -> None:
    """Give a bnb 4-bit weight the size quantize_4bit really produces.

    vllm-bnb-plugin 0.0.3 sizes the packed uint8 storage as
    ``in*out / (bits(params_dtype) / 8)``: right for bf16/fp16 (2 values a byte)
    but half the needed size for float32, where vLLM's own loader then fails
    with "Tried to load weights of size [N, 1] to a parameter of size [N/2, 1]".
    The packing is 2 values per byte whatever the dtype, so the storage and the
    pack factor (used for shard offsets) are set to that. The plugin's
    alignment check in create_weights uses the same ratio, so float32 layers
    still need ``in*out % 4 == 0`` (bf16/fp16: even); others fail at build with
    QuantConfigError. Sizes are this rank's (a sharded layer holds a block of the weight).
    """
    method = _bnb_linear_method(layer)
    if method is None or method.quant_config.load_in_8bit:
        return
    weight = layer.weight
    n_packed = (_input_per_rank(layer) * _output_per_rank(layer) + 1) // 2
    if weight.shape[0] == n_packed:
        return
    weight.data = torch.empty(n_packed, 1, dtype=torch.uint8, device=weight.device)
    weight._packed_factor = 2
    weight.pack_factor = 2


def _input_per_rank(layer: nn.Module) -> int:
    return getattr(layer, "input_size_per_partition", None) or layer.input_size


def _output_per_rank(layer: nn.Module) -> int:
    return getattr(layer, "output_size_per_partition", None) or layer.output_size


def tp_style(layer: nn.Module) -> str | None:
    """"column" / "row" for a vLLM linear sharded over more than one rank, else None."""
    if getattr(layer, "tp_size", 1) <= 1:
        return None
    names = {c.__name__ for c in type(layer).__mro__}
    if "RowParallelLinear" in names:
        return "row"
    if "ColumnParallelLinear" in names:
        return "column"
    return None


def _rank_block(weight: torch.Tensor, layer: nn.Module, style: str | None) -> torch.Tensor:
    """This rank's block of a full [out, in] weight (what its weight_loader would keep)."""
    if style == "column":
        n = _output_per_rank(layer)
        return weight[layer.tp_rank * n:(layer.tp_rank + 1) * n]
    if style == "row":
        n = _input_per_rank(layer)
        return weight[:, layer.tp_rank * n:(layer.tp_rank + 1) * n]
    return weight


def build_parallel_linear(linear: nn.Linear, quant_config: Any, prefix: str, style: str,
                          *, device: torch.device | str | None = None) -> nn.Module:
    """A vLLM ``ColumnParallelLinear`` (``style="column"``, output kept split:
    ``gather_output=False``) or ``RowParallelLinear`` (``"row"``, input already split:
    ``input_is_parallel=True``, output all-reduced) shaped like ``linear``, sharded over
    this process's tensor-parallel group; weights not loaded yet (the full weight through
    its loader keeps this rank's block)."""
    from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear

    target = torch.device(device) if device is not None else linear.weight.device
    common = dict(input_size=linear.in_features, output_size=linear.out_features,
                  bias=linear.bias is not None, params_dtype=linear.weight.dtype)
    if style == "column":
        return _build_layer(ColumnParallelLinear, quant_config, prefix, target, tp=True,
                            gather_output=False, **common)
    if style == "row":
        return _build_layer(RowParallelLinear, quant_config, prefix, target, tp=True,
                            input_is_parallel=True, reduce_results=True, **common)
    raise UsageError(f"{prefix}: unknown tensor-parallel style {style!r}")


# --------------------------------------------------------------------------- quantization


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    # The plugin's loader quantizes under set_default_torch_dtype(float32): its
    # scratch tensors (absmax, ...) must come out float32 whatever the model dtype.
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _quantize_4bit(weight: torch.Tensor, quant_type: str) -> tuple[torch.Tensor, Any]:
    """Packed uint8 ``(n/2, 1)`` and a flat QuantState, as the vLLM bnb loader makes them.

    The loader calls ``quantize_4bit(w, compress_statistics=True, quant_type=...)``
    (bitsandbytes' default blocksize 64) and, when binding, dequantizes the
    double-quantized absmax back to float32 (``_dequantize_dq``) so inference
    skips that step. The same is done here, so values match bit for bit.
    """
    from bitsandbytes.functional import dequantize_blockwise, quantize_4bit

    with _default_dtype(torch.float32):
        packed, state = quantize_4bit(
            weight.contiguous(), compress_statistics=True, quant_type=quant_type
        )
    if state.nested:
        absmax = dequantize_blockwise(state.absmax, state.state2)
        absmax += state.offset
        state.absmax = absmax.float()
        state.nested = False
        state.offset = None
        state.state2 = None
    return packed.reshape(-1, 1), state


def _quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise int8 ``CB`` and float32 scales ``SCB`` like HF ``Int8Params``.

    vLLM's bnb 8-bit path only serves pre-quantized checkpoints (its in-flight
    generator only knows 4-bit), and those hold what ``Int8Params._quantize``
    writes: ``int8_vectorwise_quant(w.to(float16))``.
    """
    from bitsandbytes.functional import int8_vectorwise_quant

    cb, scb, _ = int8_vectorwise_quant(weight.contiguous().to(torch.float16))
    return cb, scb


def fake_quantize(weight: torch.Tensor, method: str) -> torch.Tensor:
    """Quantize then dequantize ``weight`` exactly as :func:`load_linear_weights` does.

    The result has ``weight``'s dtype; an ``nn.Linear`` carrying it is the
    reference a vLLM bnb layer should match up to its activation handling
    (4-bit: activations in bf16; int8: LLM.int8 activation quantization).
    """
    if method not in BNB_METHODS:
        raise UsageError(f"unknown fake-quant method {method!r}; expected one of {BNB_METHODS}")
    if weight.is_meta:
        raise UsageError("fake_quantize needs a tensor with values, got a meta tensor")
    with torch.no_grad():
        w = weight.detach()
        if method == "int8":
            from bitsandbytes.functional import int8_vectorwise_dequant

            cb, scb = _quantize_int8(w)
            return int8_vectorwise_dequant(cb, scb).to(weight.dtype).reshape(weight.shape)
        from bitsandbytes.functional import dequantize_4bit

        packed, state = _quantize_4bit(w, method)
        return dequantize_4bit(packed, state).to(weight.dtype).reshape(weight.shape)


# --------------------------------------------------------------------------- loading


def load_linear_weights(
    layer: nn.Module,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    quant_config: Any,
) -> None:
    """Load ``weight`` [out, in] and ``bias`` into a layer from :func:`build_vllm_linear`.

    Goes through each parameter's own ``weight_loader`` (what vLLM's loaders
    call), quantizing bitsandbytes weights in flight, then runs
    ``quant_method.process_weights_after_loading``. After that the layer's
    ``weight`` may no longer hold readable values (CPU unquantized: emptied;
    bnb: packed) — use :func:`logical_weight_info` for dtype/shape/device.
    ``quant_config`` must be the config the layer was built with.
    """
    prefix = getattr(layer, "prefix", "") or type(layer).__name__
    if quant_config is not getattr(layer, "quant_config", None):
        raise UsageError(
            f"{prefix}: load_linear_weights got a different quant_config from the "
            "one the layer was built with; pass the same object"
        )
    _check_source(layer, prefix, weight, bias)

    bnb = _bnb_linear_method(layer)
    style = tp_style(layer)
    with torch.no_grad():
        src = weight.detach().to(device=layer.weight.device, dtype=layer.params_dtype)
        states: dict[int, Any] | None = None
        if bnb is None:
            loaded = src  # a sharded layer's loader keeps its block of the full weight
        elif bnb.quant_config.load_in_8bit:
            loaded, scb = _quantize_int8(_rank_block(src, layer, style))
            states = {0: scb}
        else:  # quantized per shard, as vLLM's bnb loader does under tensor parallelism
            loaded, qstate = _quantize_4bit(_rank_block(src, layer, style),
                                            bnb.quant_config.bnb_4bit_quant_type)
            states = {0: qstate}
        _load_param(layer, "weight", loaded, prefix, sharded=style is not None and bnb is None)
        if bias is not None:
            _load_param(layer, "bias", bias.detach(), prefix, sharded=style == "column")
        if states is not None:
            _bind_quant_states(layer.weight, states, int8=bnb.quant_config.load_in_8bit)
        try:
            layer.quant_method.process_weights_after_loading(layer)
        except Exception as e:
            raise WeightLoadError(
                f"{prefix}: {type(layer.quant_method).__name__}.process_weights_after_loading "
                f"failed: {type(e).__name__}: {e}"
            ) from e
    _guard_cpu_gemm(layer, prefix)


def _check_source(
    layer: nn.Module, prefix: str, weight: torch.Tensor, bias: torch.Tensor | None
) -> None:
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and tensor.is_meta:
            raise WeightLoadError(
                f"{prefix}: the source {name} is a meta tensor (no values to load). "
                "Materialise the model's weights first (load the checkpoint, or "
                "to_empty() and initialise), or rewrite with load_weights=False and "
                "let vLLM's weight loader fill the layer."
            )
    if layer.weight.is_meta:
        raise WeightLoadError(
            f"{prefix}: the vLLM layer was built on the meta device; build it on a "
            "real device to load weights into it, or use load_weights=False."
        )
    expected = torch.Size([layer.output_size, layer.input_size])
    if weight.shape != expected:
        raise WeightLoadError(
            f"{prefix}: weight has shape {tuple(weight.shape)}, the layer expects "
            f"[out, in] = {tuple(expected)}"
        )
    if (bias is None) != (layer.bias is None):
        has = "has a bias" if layer.bias is not None else "has no bias"
        raise WeightLoadError(
            f"{prefix}: the layer {has} but bias={'None' if bias is None else 'a tensor'} was given"
        )
    if bias is not None and bias.shape != torch.Size([layer.output_size]):
        raise WeightLoadError(
            f"{prefix}: bias has shape {tuple(bias.shape)}, "
            f"the layer expects ({layer.output_size},)"
        )


def _load_param(layer: nn.Module, name: str, tensor: torch.Tensor, prefix: str,
                sharded: bool = False) -> None:
    """Load ``tensor`` through the parameter's loader; ``sharded``: the tensor is the full
    one and the loader keeps this rank's block of it."""
    param = getattr(layer, name)
    if sharded:
        if param.numel() == 0 or param.dim() != tensor.dim():
            raise WeightLoadError(
                f"{prefix}.{name}: the layer's parameter has shape {tuple(param.shape)} but "
                f"the full {tuple(tensor.shape)} is to be sharded into it; a layer is loaded "
                "once (process_weights_after_loading repacks it): build a fresh one")
    elif param.shape != tensor.shape:
        # The source was checked: the parameter itself changed, e.g. CPU
        # process_weights_after_loading emptied it on an earlier load.
        raise WeightLoadError(
            f"{prefix}.{name}: the layer's parameter has shape {tuple(param.shape)} but "
            f"{tuple(tensor.shape)} is to be loaded; a layer is loaded once "
            "(process_weights_after_loading repacks it): build a fresh one"
        )
    loader = getattr(param, "weight_loader", None)
    try:
        if loader is None:
            param.data.copy_(tensor)
        else:
            loader(param, tensor)
    except (AssertionError, RuntimeError, ValueError) as e:
        raise WeightLoadError(f"{prefix}.{name}: weight_loader failed: {e}") from e


def _bind_quant_states(param: torch.Tensor, states: dict[int, Any], *, int8: bool) -> None:
    """Attach quant states as BitsAndBytesModelLoader._bind_quant_states_to_params does.

    Attributes are assigned (not ``set_weight_attrs``, which refuses to
    overwrite) so that a parameter can be re-bound; the values are the same.
    """
    pack_factor = param.pack_factor
    sizes = [math.prod(states[i].shape) // pack_factor for i in range(len(states))]
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    param.bnb_quant_state = states
    param.bnb_shard_offsets = torch.tensor(offsets, dtype=torch.int64)  # on CPU, as vLLM
    if int8:
        param.matmul_state = [None] * len(states)
        param.generation = 0  # 0/1: the next forward (re)builds the MatmulLtStates


# --------------------------------------------------------------------------- introspection


def logical_weight_info(layer: nn.Module) -> tuple[torch.dtype, torch.Size, torch.device]:
    """(dtype, [out, in], device) that HF code expects from ``layer.weight``.

    After loading, a vLLM layer's ``weight`` is packed uint8 (bnb 4-bit), int8,
    or an empty (0,) tensor (CPU unquantized), so HF code reading
    ``.weight.dtype`` / ``.shape`` must get these values instead.
    """
    if isinstance(layer, nn.Linear):
        return layer.weight.dtype, layer.weight.shape, layer.weight.device
    try:
        dtype = layer.params_dtype
        shape = torch.Size([layer.output_size, layer.input_size])
    except AttributeError as e:
        raise UsageError(
            f"{type(layer).__name__} is neither nn.Linear nor a vLLM LinearBase layer"
        ) from e
    return dtype, shape, layer.weight.device


def dense_linear(layer: nn.Module) -> tuple[nn.Linear | None, str]:
    """An ``nn.Linear`` computing with what a loaded replicated vLLM layer holds, or (None,
    why not).

    For HF code that reads a linear's weight itself (``weight.dtype``, the values handed to
    ``F.multi_head_attention_forward``), which a vLLM layer's storage does not serve.
    bitsandbytes: the weight dequantized from its packed storage (the fake-quant numerics,
    in the params dtype); unquantized: the weight as stored, when vLLM kept it (vLLM-CPU
    empties it after loading: None then, as nothing can give it back).
    """
    from fxpass.layers import is_vllm_linear

    if not is_vllm_linear(layer) or tp_style(layer) is not None:
        return None, "not a replicated vLLM linear layer"
    dtype, shape, device = logical_weight_info(layer)
    weight = layer.weight
    with torch.no_grad():
        bnb = _bnb_linear_method(layer)
        states = getattr(weight, "bnb_quant_state", None)
        if bnb is not None:
            if not states or len(states) != 1:
                return None, "its bitsandbytes weight has no single quant state to dequantize"
            if bnb.quant_config.load_in_8bit:
                from bitsandbytes.functional import int8_vectorwise_dequant

                dense = int8_vectorwise_dequant(weight.data.view(torch.int8), states[0])
            else:
                from bitsandbytes.functional import dequantize_4bit

                dense = dequantize_4bit(weight.data, states[0])
        elif getattr(layer, "quant_method", None) is not None and type(
                layer.quant_method).__name__ != "UnquantizedLinearMethod":
            return None, f"no way back from {type(layer.quant_method).__name__}'s storage"
        elif weight.numel() == shape.numel():
            dense = weight.data
        else:
            return None, ("vLLM-CPU emptied its weight after loading (it lives in a oneDNN "
                          "handle), so it cannot be read back")
        linear = nn.Linear(shape[1], shape[0], bias=getattr(layer, "bias", None) is not None,
                           device="meta")
        linear.weight = nn.Parameter(dense.reshape(shape).to(device=device, dtype=dtype),
                                     requires_grad=False)
        if linear.bias is not None:
            linear.bias = nn.Parameter(layer.bias.data.to(dtype), requires_grad=False)
    return linear, ""


# --------------------------------------------------------------------------- fused layers


def build_fused_linear(linears: list[nn.Linear], quant_config: Any, prefix: str) -> nn.Module:
    """One ``MergedColumnParallelLinear`` over ``linears`` (same input), outputs concatenated.

    ``prefix`` is the first member's checkpoint name: the quant config decides on it (the
    fusion rule only fuses members that got the same method on their own prefixes).
    """
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear

    first = linears[0]
    return _build_layer(MergedColumnParallelLinear, quant_config, prefix, first.weight.device,
                        input_size=first.in_features,
                        output_sizes=[lin.out_features for lin in linears],
                        bias=first.bias is not None, params_dtype=first.weight.dtype)


def build_fused_parallel_linear(linears: list[nn.Linear], quant_config: Any, prefix: str,
                                head_size: int | None = None) -> nn.Module:
    """The column-parallel fused layer over ``linears`` (same input), sharded over this
    process's tensor-parallel group: ``QKVParallelLinear`` for three members that split into
    heads of ``head_size`` (q, then k and v of equal size), else
    ``MergedColumnParallelLinear`` (``gather_output=False``). Each member's block for this
    rank sits back to back in the output."""
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear

    first = linears[0]
    sizes = [lin.out_features for lin in linears]
    common = dict(bias=first.bias is not None, params_dtype=first.weight.dtype)
    if (head_size and len(linears) == 3 and sizes[1] == sizes[2]
            and all(n % head_size == 0 for n in sizes)):
        return _build_layer(QKVParallelLinear, quant_config, prefix, first.weight.device,
                            tp=True, hidden_size=first.in_features, head_size=head_size,
                            total_num_heads=sizes[0] // head_size,
                            total_num_kv_heads=sizes[1] // head_size, **common)
    return _build_layer(MergedColumnParallelLinear, quant_config, prefix, first.weight.device,
                        tp=True, input_size=first.in_features, output_sizes=sizes,
                        gather_output=False, **common)


LOADED_WEIGHT = "_fxpass_loaded_weight"  # in a layer's __dict__: see keep_loaded_weight


def keep_loaded_weight(layer: nn.Module) -> None:
    """Hold on to the parameter vLLM's loader will fill, for a rule that builds from it at
    the first call (fusion: the members' weights merged; sharding: each rank's block;
    fp32-gemm: an fp32 copy).

    vLLM-CPU's ``process_weights_after_loading`` hands an unquantized weight to oneDNN and
    puts an empty tensor in its place; this keeps the loaded one alive until
    :func:`release_loaded_weights` (memory: the kept weights, until the first call). Kept
    in ``__dict__``, so it is neither a parameter nor in the state_dict. Quantized layers
    keep nothing (their storage stays readable)."""
    method = getattr(layer, "quant_method", None)
    if type(method).__name__ == "UnquantizedLinearMethod" and tp_style(layer) is None:
        layer.__dict__[LOADED_WEIGHT] = layer.weight


def loaded_weight(layer: nn.Module) -> tuple[torch.Tensor | None, str]:
    """(the ``[out, in]`` weight a loaded unquantized replicated vLLM layer computes with, or
    None and why not)."""
    method = type(getattr(layer, "quant_method", None)).__name__
    if method != "UnquantizedLinearMethod":
        return None, (f"its weight was quantized by vLLM's loader ({method}); merging packed "
                      "shards is not done")
    _, shape, _ = logical_weight_info(layer)
    for w in (layer.__dict__.get(LOADED_WEIGHT), layer.weight):
        if isinstance(w, torch.Tensor) and tuple(w.shape) == tuple(shape) and not w.is_meta:
            return w, ""
    return None, ("vLLM-CPU handed its weight to oneDNN after loading and kept none "
                  "(fxpass.apply without example inputs keeps it for the rules that rebuild "
                  "layers at the first call: fusion, fp32-gemm, tensor-parallel sharding)")


def loaded_linear(layer: nn.Module) -> tuple[nn.Linear | None, str]:
    """An ``nn.Linear`` over what a loaded unquantized replicated vLLM layer computes with
    (its kept weight and its bias, shared, not copied), or (None, why not): the source a rule
    builds other layers from at the first call (sharded ones: the full weight through their
    loaders keeps each rank's block)."""
    if tp_style(layer) is not None:
        return None, "it is sharded already"
    w, why = loaded_weight(layer)
    if w is None:
        return None, why
    bias = getattr(layer, "bias", None)
    linear = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(w.detach(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(w.dtype), requires_grad=False)
    return linear, ""


def release_loaded_weights(model: nn.Module) -> None:
    """Drop every weight :func:`keep_loaded_weight` kept under ``model``."""
    for m in model.modules():
        m.__dict__.pop(LOADED_WEIGHT, None)


def build_fused_from_loaded(layers: list[nn.Module], quant_config: Any,
                            prefix: str) -> nn.Module:
    """A ``MergedColumnParallelLinear`` over loaded replicated vLLM ``layers`` (same input),
    filled with their weights and biases: the fusion rule at a first call, after vLLM's
    loader filled the members. The caller checked :func:`loaded_weight` for each."""
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear

    first = layers[0]
    dtype, _, device = logical_weight_info(first)
    fused = _build_layer(MergedColumnParallelLinear, quant_config, prefix, device,
                         input_size=first.input_size,
                         output_sizes=[lin.output_size for lin in layers],
                         bias=first.bias is not None, params_dtype=dtype)
    shards = []
    for lin in layers:
        w, why = loaded_weight(lin)
        if w is None:
            raise WeightLoadError(f"{getattr(lin, 'prefix', '')}: {why}")
        shards.append((w, lin.bias))
    keep_loaded_weight(fused)  # for rule fp32-gemm after it (released with the members')
    load_fused_weights(fused, shards, quant_config)
    return fused


def load_fused_weights(layer: nn.Module, shards: list[tuple[torch.Tensor, torch.Tensor | None]],
                       quant_config: Any) -> None:
    """Load each member's (weight, bias) as one shard of a fused layer, then finish loading.

    Unquantized shards go through the layer's shard-aware ``weight_loader``; bitsandbytes
    shards are quantized one by one (one quant state per shard, as vLLM's bnb loader does for
    packed modules such as qkv_proj) and laid out back to back.
    """
    prefix = getattr(layer, "prefix", "") or type(layer).__name__
    sizes = list(layer.output_sizes)
    if len(shards) != len(sizes):
        raise WeightLoadError(f"{prefix}: {len(shards)} shards for {len(sizes)} outputs")
    for i, (w, _) in enumerate(shards):
        if w.is_meta:
            raise WeightLoadError(
                f"{prefix}: shard {i} is on the meta device; materialise the weights or use "
                "load_weights=False")
        if tuple(w.shape) != (sizes[i], layer.input_size):
            raise WeightLoadError(f"{prefix}: shard {i} has shape {tuple(w.shape)}, expected "
                                  f"{(sizes[i], layer.input_size)}")
    bnb = _bnb_linear_method(layer)
    ids: list[Any] = list(range(len(sizes)))
    if type(layer).__name__ == "QKVParallelLinear" or any(
            c.__name__ == "QKVParallelLinear" for c in type(layer).__mro__):
        ids = ["q", "k", "v"]
    tp_size, tp_rank = getattr(layer, "tp_size", 1), getattr(layer, "tp_rank", 0)
    with torch.no_grad():
        if bnb is None:  # the loader keeps this rank's block of each shard
            for i, (w, _) in enumerate(shards):
                layer.weight.weight_loader(layer.weight, w.detach().to(layer.params_dtype),
                                           ids[i])
        else:
            parts, states = [], {}
            for i, (w, _) in enumerate(shards):
                n = sizes[i] // tp_size  # this rank's block of the member, quantized alone
                src = w.detach()[tp_rank * n:(tp_rank + 1) * n].to(
                    device=layer.weight.device, dtype=layer.params_dtype)
                if bnb.quant_config.load_in_8bit:
                    packed, states[i] = _quantize_int8(src)
                else:
                    packed, states[i] = _quantize_4bit(src, bnb.quant_config.bnb_4bit_quant_type)
                parts.append(packed)
            data = torch.cat(parts, dim=0)
            if data.shape != layer.weight.shape:
                raise WeightLoadError(f"{prefix}: packed shards {tuple(data.shape)} do not fill "
                                      f"the weight {tuple(layer.weight.shape)}")
            layer.weight.data.copy_(data)
            _bind_quant_states(layer.weight, states, int8=bnb.quant_config.load_in_8bit)
        if layer.bias is not None:
            for i, (_, b) in enumerate(shards):
                layer.bias.weight_loader(layer.bias, b.detach().to(layer.bias.dtype), ids[i])
        layer.quant_method.process_weights_after_loading(layer)
    _guard_cpu_gemm(layer, prefix)


def _guard_cpu_gemm(layer: nn.Module, prefix: str) -> None:
    """Wrap the native GEMM handle vLLM-CPU just built for the layer (if it built one) in
    fxpass's guard: one process-wide lock (the handles share state across layers and
    threads), no silent backward, clear errors for dtype changes, autocast and pickling
    (``fxpass.cpu_gemm``)."""
    if "cpu_linear" in layer.__dict__:
        from fxpass.cpu_gemm import guard

        guard(layer, prefix)


def load_checkpoint(model: nn.Module, state_dict: dict[str, torch.Tensor], quant_config: Any,
                    *, fused: dict[str, list[str]] | None = None) -> list[str]:
    """Load a checkpoint with the ORIGINAL (pre-apply) names into a rewritten model.

    vLLM layers are filled through their loaders (fused layers shard by shard, using
    ``fused``: fused qualified name -> member names, as in ``Report.fused`` without the
    prefix); every other tensor is copied. Returns the names that found no home.
    """
    from fxpass.layers import is_vllm_linear

    member_of = {m: (f, i) for f, ms in (fused or {}).items() for i, m in enumerate(ms)}
    pending: dict[str, dict[int, list[torch.Tensor | None]]] = {}
    loose = []
    done = set()
    for name, tensor in state_dict.items():
        owner, _, attr = name.rpartition(".")
        if owner in member_of and attr in ("weight", "bias"):
            f, i = member_of[owner]
            slot = pending.setdefault(f, {}).setdefault(i, [None, None])
            slot[0 if attr == "weight" else 1] = tensor
            continue
        try:
            mod = model.get_submodule(owner)
        except AttributeError:
            loose.append(name)
            continue
        if is_vllm_linear(mod) and attr in ("weight", "bias"):
            if owner in done:
                continue
            w = state_dict.get(f"{owner}.weight")
            b = state_dict.get(f"{owner}.bias")
            load_linear_weights(mod, w, b, quant_config)
            done.add(owner)
            continue
        target = getattr(mod, attr, None)
        if not isinstance(target, torch.Tensor):
            loose.append(name)
            continue
        with torch.no_grad():
            target.copy_(tensor)
    for f, slots in pending.items():
        layer = model.get_submodule(f)
        n = len(layer.output_sizes)
        if sorted(slots) != list(range(n)):
            raise WeightLoadError(f"{f}: checkpoint holds shards {sorted(slots)} of {n}")
        load_fused_weights(layer, [(slots[i][0], slots[i][1]) for i in range(n)], quant_config)
    return loose
