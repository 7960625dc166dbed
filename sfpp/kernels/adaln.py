"""Fused adaLN modulate of a Wan block: fp32 LayerNorm without affine over the model dim, per-frame modulation
n * (1 + scale) + shift, and the cast to the weights' dtype, in one launch (one read of x, one write of the output).

One program owns BLOCK_M token rows of the flattened [B*F*L, D] input; each row reads the shift/scale row of its
(batch, latent frame). Math is fp32 as in the torch path: the mean (corrected by the mean of the centred row, so
rows with a large offset keep their precision), the variance of the centred row, 1/sqrt, modulation, and one
rounding to the output dtype (round to nearest even, under the interpreter too: `kernels._cast`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from sfpp.kernels._cast import cast

__all__ = ["adaln_modulate"]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _kernel(
    X, Shift, Scale, Out,
    rows, frame_rows, frame_len, D, eps,
    sxb, sxl, sxd,  # x [B, F*L, D] (the model's first block gets a transposed view: any strides)
    ssb, ssf, ssd, scb, scf, scd,  # shift / scale [B, F, 1, D] (B may be broadcast: stride 0)
    sob, sol, sod,  # out [B, F*L, D]
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DTYPE: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # [M] flattened (batch, token) rows
    d = tl.arange(0, BLOCK_D)
    row_ok = row < rows
    mask = row_ok[:, None] & (d < D)[None, :]
    b = row // frame_rows
    tok = row % frame_rows
    f = tok // frame_len  # the token's latent frame

    x = tl.load(X + (b * sxb + tok * sxl)[:, None] + d[None, :] * sxd, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    xc = tl.where(mask, xc - (tl.sum(xc, axis=1) / D)[:, None], 0.0)  # the mean's own rounding, for large offsets
    rstd = 1.0 / tl.sqrt_rn(tl.sum(xc * xc, axis=1) / D + eps)
    shift = tl.load(Shift + (b * ssb + f * ssf)[:, None] + d[None, :] * ssd, mask=mask, other=0.0)
    scale = tl.load(Scale + (b * scb + f * scf)[:, None] + d[None, :] * scd, mask=mask, other=0.0)
    y = (xc * rstd[:, None]) * (1.0 + scale.to(tl.float32)) + shift.to(tl.float32)
    tl.store(Out + (b * sob + tok * sol)[:, None] + d[None, :] * sod, cast(y, DTYPE, INTERPRET), mask=mask)


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def adaln_modulate(
    x: Tensor, shift: Tensor, scale: Tensor, eps: float, out_dtype: torch.dtype, *, out: Tensor | None = None
) -> Tensor:
    """Triton version of `adaln_modulate_ref`: x [B, F*L, D], shift/scale [B or 1, F, 1, D] -> [B, F*L, D] in
    out_dtype (fp32, bf16 or fp16), written into `out` when given. Any strides: Triton specializes unit
    strides, so the usual contiguous rows load as vectors."""
    batch, length, dim = x.shape
    frames = shift.shape[1]
    if shift.shape != scale.shape or shift.ndim != 4 or shift.shape[2:] != (1, dim) or shift.shape[0] not in (1, batch):
        raise ValueError(f"shift/scale {tuple(shift.shape)}, {tuple(scale.shape)} are not [B, F, 1, {dim}]")
    if length % frames:
        raise ValueError(f"{length} tokens are not {frames} frames of equal length")
    if out_dtype not in _TL_DTYPES:
        raise ValueError(f"unsupported output dtype {out_dtype}")
    if out is None:
        out = torch.empty(batch, length, dim, dtype=out_dtype, device=x.device)
    elif out.shape != x.shape or out.dtype != out_dtype:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} is not {tuple(x.shape)} {out_dtype}")
    if x.numel() == 0:
        return out
    block_d = triton.next_power_of_2(dim)
    block_m = max(1, min(16, 4096 // block_d))  # tiles of ~4K elements: 2 rows at Wan's D = 1536
    rows = batch * length
    bs = lambda t: t.stride(0) if t.shape[0] > 1 else 0
    _kernel[(triton.cdiv(rows, block_m),)](
        x, shift, scale, out,
        rows, length, length // frames, dim, eps,
        x.stride(0), x.stride(1), x.stride(2),
        bs(shift), shift.stride(1), shift.stride(3), bs(scale), scale.stride(1), scale.stride(3),
        out.stride(0), out.stride(1), out.stride(2),
        BLOCK_M=block_m, BLOCK_D=block_d, DTYPE=_TL_DTYPES[out_dtype], INTERPRET=INTERPRET,
        num_warps=4 if block_m * block_d <= 2048 else 8,
    )  # fmt: skip
    return out
