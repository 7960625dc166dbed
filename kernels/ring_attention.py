"""Block-causal flash attention (forward) of the current chunk over the ring-buffer KV cache.

The keys are read in slot order straight from the ring (sinks, then the window slots with their wrap-around): no
gather copy, since softmax attention does not depend on key order and positions already live in K's RoPE. Empty
slots (slot_frame < 0) are masked, and their loads skipped, so stale or poisoned rows are never read into the sum.

K/V are either in the compute dtype or fp8 e4m3 with per-token-per-head scales. The scales are folded into the
score and probability tiles instead of the K/V tiles (K = k8 * ks[n] scales score column n; V = v8 * vs[n]
scales P's column n), which dequantizes in registers at a cost of one multiply per score. With `fp8_dot` the two
matmuls also run on fp8 tensor cores: Q is quantized per row in-kernel and P per block, trading ~1% accuracy for
the doubled fp8 throughput. Online softmax in fp32, in the exp2 domain.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels._cast import cast, to_e4m3
from sfpp.attention import ring_attention_ref

__all__ = ["ring_attention", "ring_attention_ref"]

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    # The interpreter multiplies bf16 tiles as raw integers. Upcasting first is exact: bf16 products are exact in
    # fp32, and tensor cores accumulate them in fp32 anyway.
    if INTERPRET and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _ring_attention_kernel(
    Q, K, V, KS, VS, SlotFrame, O,  # noqa: E741 (flash-attention's names)
    qk_scale,  # softmax scale * log2(e)
    Lq, N, T, H,  # query tokens, cache rows S*T, tokens per slot, heads
    sqb, sql, sqh,
    skb, skl, skh,
    svb, svl, svh,
    ssb, ssl, ssh,  # k_scale and v_scale share one layout [B, S*T, H]
    sob, sol, soh,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FP8_KV: tl.constexpr,
    FP8_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_ok = (offs_m[:, None] < Lq) & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :], mask=q_ok, other=0.0)  # [M, D]
    row_scale = tl.full((BLOCK_M,), qk_scale, tl.float32)
    if FP8_DOT:  # per-row fp8 quantization of Q; its scale joins the softmax scale
        q_amax = tl.maximum(tl.max(tl.abs(q.to(tl.float32)), axis=1), 1e-12)
        q = to_e4m3(q.to(tl.float32) * (FP8_MAX / q_amax)[:, None], INTERPRET)
        row_scale = row_scale * (q_amax / FP8_MAX)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        valid = tl.load(SlotFrame + offs_n // T, mask=offs_n < N, other=-1) >= 0  # [N]: the only mask
        kt = tl.load(k_base + offs_n[None, :] * skl + offs_d[:, None], mask=valid[None, :] & d_ok[:, None], other=0.0)
        if FP8_KV and not FP8_DOT:
            kt = kt.to(q.dtype)
        s = _dot(q, kt, PRECISION, INTERPRET) * row_scale[:, None]  # [M, N] log2-domain scores
        if FP8_KV:
            ks = tl.load(KS + b * ssb + h * ssh + offs_n * ssl, mask=valid, other=0.0)
            s = s * ks[None, :]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing valid yet stay at zero
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        v = tl.load(v_base + offs_n[:, None] * svl + offs_d[None, :], mask=valid[:, None] & d_ok[None, :], other=0.0)
        if FP8_KV:
            vs = tl.load(VS + b * ssb + h * ssh + offs_n * ssl, mask=valid, other=0.0)
            if FP8_DOT:  # P * vs in fp8, rescaled so the block's largest V scale maps P's 1.0 to fp8's top
                vs_max = tl.maximum(tl.max(vs, axis=0), 1e-30)
                p8 = to_e4m3(p * (vs * (FP8_MAX / vs_max))[None, :], INTERPRET)
                acc += tl.dot(p8, v) * (vs_max / FP8_MAX)
            else:
                acc += _dot(cast(p * vs[None, :], q.dtype, INTERPRET), v.to(q.dtype), PRECISION, INTERPRET)
        else:
            acc += _dot(cast(p, v.dtype, INTERPRET), v, PRECISION, INTERPRET)
        m_i = m_new

    out = cast(acc / l_i[:, None], O.dtype.element_ty, INTERPRET)
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :], out, mask=q_ok)


def _config(d: int, fp8: bool, lq: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): H100-sized tiles on a GPU, the smallest legal ones otherwise."""
    if not torch.cuda.is_available() or lq <= 16:
        return 16, 16, 4, 1
    if d <= 64:
        return 128, 64, 4, 3
    return (128, 128, 8, 3) if fp8 else (128, 64, 8, 3)


def ring_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_frame: Tensor,
    frame_tokens: int,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
    *,
    fp8_dot: bool = False,
    out: Tensor | None = None,
) -> Tensor:
    """Triton version of `ring_attention_ref` (same arguments and result). q [B, Lq, H, D] in bf16/fp16/fp32;
    k_cache/v_cache [B, S*T, H, D] in q's dtype, or fp8 e4m3 with k_scale/v_scale [B, S*T, H] fp32."""
    batch, lq, heads, d = q.shape
    n = k_cache.shape[1]
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if fp8 != (k_scale is not None) or fp8 != (v_scale is not None) or v_cache.dtype != k_cache.dtype:
        raise ValueError("an fp8 K/V cache needs k_scale and v_scale, and a cache in the compute dtype takes none")
    if not fp8 and k_cache.dtype != q.dtype:
        raise ValueError(f"K/V cache dtype {k_cache.dtype} differs from the query dtype {q.dtype}")
    if n != slot_frame.shape[0] * frame_tokens or k_cache.shape != v_cache.shape or k_cache.shape[2:] != (heads, d):
        raise ValueError(f"cache {tuple(k_cache.shape)} does not match q {tuple(q.shape)} and {frame_tokens=}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the head dim must be contiguous")
    if fp8_dot and not fp8:
        raise ValueError("fp8_dot needs an fp8 K/V cache")
    if fp8:
        if k_scale.stride() != v_scale.stride():
            raise ValueError("k_scale and v_scale must share one layout")
        scale_strides = (k_scale.stride(0), k_scale.stride(1), k_scale.stride(2))
    else:
        k_scale = v_scale = k_cache  # unused pointers
        scale_strides = (0, 0, 0)
    out = torch.empty_like(q) if out is None else out
    block_m, block_n, warps, stages = _config(d, fp8, lq)
    grid = (triton.cdiv(lq, block_m), batch * heads)
    _ring_attention_kernel[grid](
        q, k_cache, v_cache, k_scale, v_scale, slot_frame, out,
        math.log2(math.e) / math.sqrt(d),
        lq, n, frame_tokens, heads,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        *scale_strides,
        out.stride(0), out.stride(1), out.stride(2),
        D=d,
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        FP8_KV=fp8,
        FP8_DOT=fp8_dot,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        INTERPRET=INTERPRET,
        num_warps=warps,
        num_stages=stages,
    )  # fmt: skip
    return out
