"""Quantized inference through torchao: the decoder's linear layers (and the heads) read fewer bytes per token.

A decode step at one image reads every weight once per token, so its time follows the weights' bytes; torchao
swaps each chosen ``nn.Linear``'s weight for a tensor subclass that stores int8 / int4 / float8 and is used by
``F.linear`` as before (``unigen.models.feed_forward.linear`` hands such weights to ``F.linear``). Which layers:
``decoder`` (the blocks, and Method B's cross-attention blocks), ``heads`` (``lm_head`` and ``gen_head``), and on
request ``vq`` (the VQ decoder's and encoder's linear layers) and ``vision`` (the understanding encoder).
Embeddings, norms and the aligners stay in the load dtype. Quantize after moving the model to its device and
after merging LoRA adapters (a quantized weight cannot take a merge). User page: docs/QUANTIZATION.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unigen.errors import ArgumentError

METHODS = ("int8-weight-only", "int4-weight-only", "int8-dynamic", "float8")
LAYER_GROUPS = ("decoder", "heads", "vq", "vision")
DEFAULT_LAYERS = ("decoder", "heads")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what torchao's int4 kernels take
KV_CACHE_DTYPES = ("float32", "bfloat16", "float16", "float8_e4m3fn")
CPU_INT8_ROWS = 64  # up to this many rows (decode steps) a CPU int8 weight-only product takes ATen's int8 kernel


@dataclass(frozen=True)
class Quantization:
    """How to quantize: ``method`` (one of ``METHODS``), int4's ``group_size`` (input columns per scale) and
    the ``layers`` groups (of ``LAYER_GROUPS``)."""

    method: str
    group_size: int = 128
    layers: tuple[str, ...] = DEFAULT_LAYERS

    def __post_init__(self):
        if self.method not in METHODS:
            raise ArgumentError(f"unknown quantization method {self.method!r}; choose one of {', '.join(METHODS)}")
        unknown = [group for group in self.layers if group not in LAYER_GROUPS]
        if unknown or not self.layers:
            raise ArgumentError(f"unknown quantization layers {','.join(unknown) or '(none)'}; choose among "
                                f"{', '.join(LAYER_GROUPS)} (default {','.join(DEFAULT_LAYERS)})")
        if self.group_size not in INT4_GROUP_SIZES:
            raise ArgumentError(f"quantization group size {self.group_size} is not one torchao's int4 kernels take; "
                                f"choose one of {', '.join(map(str, INT4_GROUP_SIZES))}")

    @classmethod
    def of(cls, spec: str | Quantization | None) -> Quantization | None:
        """A method name (default layers and group size), a ``Quantization``, or None (no quantization)."""
        return cls(spec) if isinstance(spec, str) else spec


def chosen_linears(model: nn.Module, layers: Iterable[str]) -> Iterator[tuple[str, nn.Linear]]:
    """(name, layer) of every ``nn.Linear`` in the chosen groups of a ``UniGenModel``."""
    roots = {"decoder": [("language_model.model.layers", model.language_model.model.layers),
                         ("cross_attn_layers", model.cross_attn_layers)],
             "heads": [("language_model.lm_head", model.language_model.lm_head), ("gen_head", model.gen_head)],
             "vq": [("gen_vision_model", model.gen_vision_model)],
             "vision": [("vision_model", model.vision_model)]}
    for group in layers:
        for prefix, root in roots[group]:
            if root is None:
                continue
            for name, module in root.named_modules(prefix=prefix):
                if type(module) is nn.Linear:
                    yield name, module


def quantize_model(model: nn.Module, quantization: str | Quantization) -> nn.Module:
    """Quantize ``model``'s chosen linear layers in place on the device they are on (returns ``model``)."""
    quantization = Quantization.of(quantization)
    targets = dict(chosen_linears(model, quantization.layers))
    if not targets:
        raise ArgumentError(f"the model has no linear layers in {','.join(quantization.layers)} to quantize")
    first = next(iter(targets.values())).weight
    if is_quantized(first):
        raise ArgumentError("the model is already quantized; load it again to quantize it another way")
    check_device(quantization, first.device, first.dtype)
    if quantization.method == "int4-weight-only":
        for name, layer in targets.items():
            if layer.in_features % quantization.group_size:
                raise ArgumentError(f"int4-weight-only: {name} has {layer.in_features} input features, not a "
                                    f"multiple of group size {quantization.group_size}; pass a smaller group size")
    from torchao.quantization import quantize_

    config = torchao_config(quantization)
    chosen = set(map(id, targets.values()))
    quantize_(model, config, filter_fn=lambda module, fqn: id(module) in chosen)
    return model


def check_device(quantization: Quantization, device: torch.device | str, dtype: torch.dtype) -> None:
    """The method runs on ``device`` for weights of ``dtype`` with the installed torchao; else one line that
    says what is missing and what to use instead (never a silent fallback to another scheme)."""
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise ArgumentError("quantization needs torchao: pip install 'unigen[quant]'") from None
    device, method = torch.device(device), quantization.method
    if device.type not in ("cpu", "cuda"):
        raise ArgumentError(f"{method} runs on cpu or cuda through torchao, not {device.type}; "
                            "pass --device cpu or cuda, or drop --quantize")
    if method == "int4-weight-only":
        if device.type != "cuda":
            raise ArgumentError("int4-weight-only has no CPU kernel in torchao (it needs a CUDA GPU); "
                                "on CPU use int8-weight-only")
        if dtype != torch.bfloat16:
            raise ArgumentError(f"int4-weight-only needs bfloat16 weights, the model is {dtype}; "
                                "load it with --dtype bfloat16")
    if method == "float8":
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        if capability is None or capability < (8, 9):
            what = device.type if capability is None else f"a GPU of compute capability {capability[0]}.{capability[1]}"
            raise ArgumentError(f"float8 needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper), "
                                f"this is {what}; use int8-weight-only")


def torchao_config(quantization: Quantization):
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        PerRow,
    )

    if quantization.method == "int8-weight-only":
        return Int8WeightOnlyConfig()
    if quantization.method == "int8-dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    if quantization.method == "int4-weight-only":  # tinygemm's layout: the CUDA kernel for bf16 activations
        return Int4WeightOnlyConfig(group_size=quantization.group_size, int4_packing_format="tile_packed_to_4d")
    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


def quantized_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with a torchao weight. The few rows of a CPU decode step with an int8 weight-only weight go
    through ATen's int8 kernel with bf16 activations: torchao 0.18's own CPU path dequantizes the whole weight
    per call, 6x slower than the fp32 product, where the kernel is several times faster (docs/EXPERIMENTS.md)."""
    rows = x.numel() // x.shape[-1]
    # Inductor cannot lower the kernel on a fused input (torch 2.14): a compiled step keeps torchao's path
    if not (x.is_cpu and rows <= CPU_INT8_ROWS and type(weight).__name__ == "Int8Tensor"
            and weight.act_quant_kwargs is None) or torch.compiler.is_compiling():
        return F.linear(x, weight, bias)
    scales = weight.scale.reshape(-1).to(torch.bfloat16)
    out = torch._weight_int8pack_mm(x.reshape(rows, x.shape[-1]).to(torch.bfloat16), weight.qdata, scales)
    out = out.to(x.dtype).view(*x.shape[:-1], out.shape[-1])
    return out if bias is None else out + bias


def is_quantized(weight: torch.Tensor) -> bool:
    """A torchao tensor subclass (not a plain tensor or parameter)."""
    return type(weight) not in (torch.Tensor, nn.Parameter)


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes ``t`` holds: a tensor subclass's inner tensors (data, scales, zero points) summed."""
    if is_quantized(t) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names if getattr(t, name) is not None)
    return t.numel() * t.element_size()


def linear_weight_bytes(model: nn.Module, layers: Iterable[str] = DEFAULT_LAYERS) -> int:
    """Bytes of the chosen groups' linear weights (biases excluded), quantized or not."""
    return sum(tensor_bytes(layer.weight) for _, layer in chosen_linears(model, layers))


def cache_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """A KV cache dtype from its name (``KV_CACHE_DTYPES``), or None (the weights' dtype)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in KV_CACHE_DTYPES:
        raise ArgumentError(f"unknown KV cache dtype {name!r}; choose one of {', '.join(KV_CACHE_DTYPES)}")
    return getattr(torch, name)
