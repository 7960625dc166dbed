"""fp8 e4m3 with per-token-per-head scales: the one definition the KV cache, the torch references and the kernels
share (the kernels take `FP8_MAX` as a Triton constexpr)."""

from __future__ import annotations

import torch
from torch import Tensor

FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448.0


def quantize_fp8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token-per-head fp8 e4m3: x [..., D] -> (x8 [..., D] float8_e4m3fn, scale [...] fp32), x ~ x8 * scale.

    The largest |x| of each row maps to 448, so each row keeps fp8's full relative precision (3 mantissa bits)."""
    x32 = x.float()
    scale = x32.abs().amax(-1).clamp_min(1e-12) / FP8_MAX
    return (x32 / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def dequantize_fp8(x8: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return (x8.float() * scale[..., None]).to(dtype)
