"""Cache write of one attention layer: q/k RMSNorm + 3D RoPE at absolute frame positions, the chunk's K/V appended
into its ring slots (optionally quantized to fp8 with per-token-per-head scales), in one launch.

One program owns one token of one batch row: the RMSNorm spans all heads (Wan normalizes q and k over the whole
model dim), so the row's heads are one [H, D] tile. V is stored through its own strides: an fp8 cache keeps V's rows
contiguous for the attention kernel's fp8 MMA (`sfpp.engine.cache.LayerKV`), so those stores are strided bytes.
Roundings follow the torch path (norm, weight, RoPE each round to the compute dtype), so in fp32 the results agree
to float rounding and in bf16 to an occasional last bit.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from sfpp.kernels import _device
from sfpp.kernels._cast import cast, to_e4m3
from sfpp.kernels.fp8 import FP8_MAX

__all__ = ["cache_write"]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_FP8_MAX = tl.constexpr(FP8_MAX)


@triton.jit
def _norm_rope(ptr, w_ptr, cos, sin, offs, mask, dim, eps, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """RMSNorm over the whole [H, D] row, weight, RoPE; rounding to DTYPE where the torch path does."""
    x = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt_rn(tl.sum(tl.sum(x * x, axis=1), axis=0) / dim + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = cast(cast(x * r, DTYPE, INTERPRET).to(tl.float32) * w, DTYPE, INTERPRET).to(tl.float32)
    x0, x1 = tl.split(tl.reshape(x, (x.shape[0], x.shape[1] // 2, 2)))  # adjacent pairs, as Wan rotates
    return cast(tl.reshape(tl.join(x0 * cos - x1 * sin, x0 * sin + x1 * cos), x.shape), DTYPE, INTERPRET)


@triton.jit
def _store_kv(cache, scale_ptr, x, offs, mask, h_ok, FP8: tl.constexpr, INTERPRET: tl.constexpr):
    if FP8:  # per-token-per-head scale: the row's largest |x| maps to 448, as `quantize_fp8`
        x = x.to(tl.float32)
        scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12), _FP8_MAX)  # [H]
        tl.store(scale_ptr, scale, mask=h_ok)
        x = to_e4m3(tl.clamp(tl.math.div_rn(x, scale[:, None]), -_FP8_MAX, _FP8_MAX), INTERPRET)
    tl.store(cache + offs, x.to(cache.dtype.element_ty), mask=mask)


@triton.jit
def _cache_write_kernel(
    Q, K, V, WQ, WK, CosT, SinT, FramePos, TokenIndex, KC, VC, KS, VS, QO,
    L, H, dim, hw, width, eps,
    sqb, sql, skb, skl, svb, svl,  # inputs [B, L, dim], dim contiguous
    skcb, skcl, skch,  # k cache [B, S*T, H, D], D contiguous
    svcb, svcl, svch, svcd,  # v cache [B, S*T, H, D], any strides (an fp8 cache: rows contiguous)
    ssb, ssl,  # k/v scales [B, S*T, H], H contiguous
    sob, sol,  # q out [B, L, H, D] contiguous per token
    D: tl.constexpr, T_HALF: tl.constexpr, H_HALF: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, FP8: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    tok = tl.program_id(0)
    b = tl.program_id(1)
    hh = tl.arange(0, BLOCK_H)
    dd = tl.arange(0, BLOCK_D)
    h_ok = hh < H
    mask = h_ok[:, None] & (dd < D)[None, :]
    offs = hh[:, None] * D + dd[None, :]  # [H, D] inside one token row (the inputs' heads are contiguous)
    dtype = Q.dtype.element_ty

    # RoPE angles of this token: the t pairs at the frame's absolute position, h/w pairs at its grid row/column
    pair = tl.arange(0, BLOCK_D // 2)
    frame = tl.load(FramePos + tok // hw)
    row = tl.where(pair < T_HALF, frame, tl.where(pair < T_HALF + H_HALF, (tok // width) % (hw // width), tok % width))
    pair_ok = pair < D // 2
    cos = tl.load(CosT + row * (D // 2) + pair, mask=pair_ok, other=1.0)[None, :]
    sin = tl.load(SinT + row * (D // 2) + pair, mask=pair_ok, other=0.0)[None, :]

    q = _norm_rope(Q + b * sqb + tok * sql, WQ, cos, sin, offs, mask, dim, eps, dtype, INTERPRET)
    tl.store(QO + b * sob + tok * sol + offs, q, mask=mask)
    k = _norm_rope(K + b * skb + tok * skl, WK, cos, sin, offs, mask, dim, eps, dtype, INTERPRET)
    v = tl.load(V + b * svb + tok * svl + offs, mask=mask, other=0.0)

    dst = tl.load(TokenIndex + tok)
    scale_offs = b * ssb + dst * ssl + hh
    k_offs = hh[:, None] * skch + dd[None, :]
    v_offs = hh[:, None] * svch + dd[None, :] * svcd
    _store_kv(KC + b * skcb + dst * skcl, KS + scale_offs, k, k_offs, mask, h_ok, FP8, INTERPRET)
    _store_kv(VC + b * svcb + dst * svcl, VS + scale_offs, v, v_offs, mask, h_ok, FP8, INTERPRET)


def cache_write(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    norm_q: Tensor,
    norm_k: Tensor,
    cos_table: Tensor,
    sin_table: Tensor,
    frame_pos: Tensor,
    token_index: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k_scale: Tensor | None,
    v_scale: Tensor | None,
    height: int,
    width: int,
    split: tuple[int, int, int],
    eps: float,
) -> Tensor:
    """Triton version of `cache_write_ref`: same arguments, same writes, same result."""
    batch, length, dim = q.shape
    heads, d = k_cache.shape[2:]
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if heads * d != dim or k.shape != q.shape or v.shape != q.shape or length != token_index.shape[0]:
        raise ValueError(f"q/k/v {tuple(q.shape)} do not match the cache {tuple(k_cache.shape)} and token index")
    if length != frame_pos.shape[0] * height * width or sum(split) != d:
        raise ValueError(f"{length} tokens are not {frame_pos.shape[0]} frames of {height}x{width}, or bad split")
    if fp8 != (k_scale is not None) or k_cache.shape != v_cache.shape:
        raise ValueError("an fp8 cache needs k_scale and v_scale, a cache in the compute dtype none; K/V one shape")
    if any(x.stride(-1) != 1 for x in (q, k, v)) or k_cache.stride(-1) != 1:
        raise ValueError("the model dim of q/k/v and the head dim of the K cache must be contiguous")
    q_out = torch.empty(batch, length, heads, d, dtype=q.dtype, device=q.device)
    if fp8:
        _device.check_fp8(q.device)
        if k_scale.stride() != v_scale.stride() or k_scale.stride(-1) != 1:
            raise ValueError("k_scale and v_scale must share one layout with heads contiguous")
        scale_strides = (k_scale.stride(0), k_scale.stride(1))
    else:
        k_scale = v_scale = q_out  # unused pointers
        scale_strides = (0, 0)
    block_d = max(16, triton.next_power_of_2(d))
    block_h = triton.next_power_of_2(heads)
    _cache_write_kernel[(length, batch)](
        q, k, v, norm_q, norm_k, cos_table, sin_table, frame_pos, token_index,
        k_cache, v_cache, k_scale, v_scale, q_out,
        length, heads, dim, height * width, width, eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        *scale_strides,
        q_out.stride(0), q_out.stride(1),
        D=d, T_HALF=split[0] // 2, H_HALF=split[1] // 2,
        BLOCK_H=block_h, BLOCK_D=block_d, FP8=fp8, INTERPRET=INTERPRET,
        num_warps=4 if block_h * block_d <= 2048 else 8,
    )  # fmt: skip
    return q_out
