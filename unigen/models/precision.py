"""Where bfloat16 pays off: native on CUDA and on CPUs with avx512_bf16 / AMX, emulated elsewhere."""

from __future__ import annotations

import torch


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 math is native here: CUDA, or a CPU with avx512_bf16 / AMX. Elsewhere (an AVX2-only CPU)
    autocast emulates bf16 and a VQ training step is about 10x slower than in fp32 (docs/PERFORMANCE.md)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_amp(amp: bool | str, device: torch.device, key: str = "amp") -> bool:
    """``amp`` from a config: true, false, or "auto" (bf16 autocast only where :func:`native_bf16`)."""
    if amp == "auto":
        return native_bf16(device)
    if isinstance(amp, bool):
        return amp
    raise ValueError(f"{key} must be true, false or auto, got {amp!r}")
