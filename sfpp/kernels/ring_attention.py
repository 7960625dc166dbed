"""Flash attention (forward) of the current chunk over the valid prefix of the ring-buffer KV cache.

Slots fill in order (frame f < sink -> slot f, else sink + (f - sink) % window), so the rows that hold keys are
always the first `valid_rows` rows of the buffer, whatever the wrap-around; softmax does not depend on key order and
positions already live in K's RoPE. The kernel reads `valid_rows` from a device tensor (one CUDA graph serves every
fill level, no host sync), runs one masked tile for the ragged end first, then the full BLOCK_N tiles with no mask,
no index arithmetic and no select (ragged tile first: its masked loads are not live across the pipelined loop,
which keeps the fp8 kernel from spilling). Tiles past `valid_rows` are never read: the first chunks of a video
cost what they attend over, not the whole ring.

K/V are either in the compute dtype or fp8 e4m3 with per-token-per-head scales. An fp8 cache runs both products on
fp8 tensor cores straight from shared memory (sm_89+; Triton has no e4m3 before). Q and P are each quantized per row
in-kernel as two fp8 terms (x ~ (x8 + x8_lo) * scale, the second holding what the first rounded away; both terms
multiply the same K or V tile in shared memory into one accumulator), which takes the error of the products from
~4% of the output's rms (one e4m3 term: 3 mantissa bits) to ~0.2%, leaving the cache's own fp8 rounding; the
scales are folded into the score and probability tiles instead of the K/V tiles (K = k8 * ks[n] scales score
column n; V = v8 * vs[n] scales P's column n), so no K/V tile is ever converted or rescaled.
V's rows are contiguous in an fp8 cache (`RingKVCache` stores it so), the operand layout fp8 warpgroup MMA takes for
P @ V. Online softmax in fp32, in the exp2 domain. tests/test_compile_targets.py compiles every launch for sm_90
and sm_80 and holds each against one table (`GATE`): registers, no spills, and the SASS hot loop's instruction mix
(MMA kind and count, cp.async/TMA copies, no plain global load, no local memory, no store to shared memory).
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from sfpp.kernels import _device
from sfpp.kernels._cast import cast, to_e4m3
from sfpp.kernels.fp8 import FP8_MAX

__all__ = ["TILES", "Tile", "ring_attention", "tile_for", "tile_name"]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_FP8_STEP = tl.constexpr(1 / FP8_MAX)  # an fp8 scale is amax * _FP8_STEP: amax maps onto the top of e4m3


class Tile(NamedTuple):
    block_m: int  # query rows per program
    block_n: int  # cache rows per step of the loop
    num_warps: int
    num_stages: int  # K/V tiles in flight (software pipelining)
    tma: bool = False  # full K/V tiles by TMA (tensor descriptors) instead of cp.async: 16-bit K/V, sm_90


# Everything the launcher can choose (`tile_for`), each compiled for sm_90 and sm_80 in CI. Shared memory: Q tile
# + num_stages * (K tile + V tile), e.g. 32 + 2 * 64 KiB for bf16 at D 128 (H100: 227 KiB, A100: 163 KiB).
TILES = {
    "hopper": Tile(128, 128, 8, 2),  # 16-bit K/V, D <= 128: two warpgroups of 64 query rows
    "hopper_fp8": Tile(128, 64, 8, 3),  # fp8: per-column K/V scales and two-term P cost registers; 128 keys spill
    "ampere": Tile(128, 64, 8, 3),  # mma.sync: register-bound, so narrower key tiles, deeper pipeline
    "small": Tile(64, 64, 4, 2),  # few queries (the toy model's 48 per chunk), small head dims
    "fp32": Tile(32, 32, 8, 2),  # fp32: ieee products on FFMAs, operands in registers; 64x64 spills ~55 KB at D 128
    # A candidate the launcher never picks: `bench.bench_ring_attention` measures it beside "hopper", and the dispatch
    # table (sfpp/engine/dispatch_table.json) makes it a GPU's tile only where it was the fastest there.
    "hopper_tma": Tile(128, 128, 8, 2, tma=True),
    "interpreter": Tile(16, 16, 4, 1),  # CPU tests: many tiles and ragged ends at small sizes
}


def tile_name(arch: int | None, head_dim: int, num_queries: int, dtype: torch.dtype, fp8: bool) -> str:
    """The TILES entry for one launch: `arch` is the GPU's compute capability as 90, 80, ... (None: the
    interpreter); dtype the compute dtype (fp32 takes no tensor-core path: its own tile)."""
    if arch is None:
        return "interpreter"
    if dtype == torch.float32:
        return "fp32"
    if num_queries <= 64 or head_dim < 64:
        return "small"
    if arch >= 90:
        return "hopper_fp8" if fp8 else "hopper"
    return "ampere"


def tile_for(arch: int | None, head_dim: int, num_queries: int, dtype: torch.dtype, fp8: bool) -> Tile:
    """The tile for one launch (`tile_name`)."""
    return TILES[tile_name(arch, head_dim, num_queries, dtype, fp8)]


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    # The interpreter multiplies bf16 tiles as raw integers. Upcasting first is exact: bf16 products are exact in
    # fp32, and tensor cores accumulate them in fp32 anyway.
    if INTERPRET and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _load(ptrs, n_ok, d_ok, MASK_N: tl.constexpr, MASK_D: tl.constexpr):
    """A K or V tile; masked only where needed (the steady state is unmasked, so it pipelines as async copies)."""
    if MASK_N:
        if MASK_D:
            x = tl.load(ptrs, mask=n_ok & d_ok, other=0.0)
        else:
            x = tl.load(ptrs, mask=n_ok, other=0.0)
    else:
        if MASK_D:
            x = tl.load(ptrs, mask=d_ok, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _attend_tile(
    acc, m_i, l_i, q, q_lo, row_scale,  # running state [M, D], [M], [M]; q, q_lo [M, D]; row_scale [M] (log2)
    k_base, v_base, ks_base, vs_base, start, n_valid, offs_d,
    skl, svl, svd, ssl,
    k_desc, v_desc, row0, col0,  # TMA: 2-D descriptors over [B * S*T, H * D]; this (batch, head)'s first row, column
    D: tl.constexpr, BLOCK_N: tl.constexpr, MASK_N: tl.constexpr,
    FP8_KV: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    offs_n = start + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_valid
    d_ok = offs_d < D
    MASK_D: tl.constexpr = offs_d.shape[0] != D
    if TMA and not MASK_N:
        kt = tl.trans(k_desc.load([row0 + start, col0]))
    else:
        kt = _load(k_base + offs_n[None, :] * skl + offs_d[:, None], n_ok[None, :], d_ok[:, None], MASK_N, MASK_D)
    s = _dot(q, kt, PRECISION, INTERPRET)  # [M, N]
    if FP8_KV:  # the second fp8 term of Q, into the same accumulator
        s = tl.dot(q_lo, kt, s)
    s = s * row_scale[:, None]
    if FP8_KV:
        ks = _load(ks_base + offs_n * ssl, n_ok, d_ok, MASK_N, False)
        s = s * ks[None, :]
    if MASK_N:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    # Every tile holds at least one valid key, so the running max is finite from the first tile on.
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    if TMA and not MASK_N:
        v = v_desc.load([row0 + start, col0])
    else:
        v = _load(v_base + offs_n[:, None] * svl + offs_d[None, :] * svd, n_ok[:, None], d_ok[None, :], MASK_N, MASK_D)
    if FP8_KV:
        vs = _load(vs_base + offs_n * ssl, n_ok, d_ok, MASK_N, False)
        # P * vs as two fp8 terms per row, scaled so the row's largest maps onto fp8's top (a row reduction, no
        # exchange between warps); the second term holds what the first rounded away. Both products run from the
        # one V tile in shared memory, into one accumulator.
        w = p * vs[None, :]
        p_scale = tl.maximum(tl.max(w, axis=1), 1e-30) * _FP8_STEP
        w = w * (1 / p_scale)[:, None]
        p8 = to_e4m3(w, INTERPRET)
        pv = tl.dot(p8, v)
        pv = tl.dot(to_e4m3(w - p8.to(tl.float32), INTERPRET), v, pv)
        acc += pv * p_scale[:, None]
    else:
        acc += _dot(cast(p, v.dtype, INTERPRET), v, PRECISION, INTERPRET)
    return acc, m_new, l_i


@triton.jit
def _ring_attention_kernel(
    Q, K, V, KS, VS, ValidRows, O,  # noqa: E741 (flash-attention's names)
    KDesc, VDesc,  # TMA descriptors of K and V as [B * S*T, H * D] (TMA), else unused
    qk_scale,  # softmax scale * log2(e)
    Lq, H, Rows,  # query tokens, heads, cache rows (S*T)
    sqb, sql, sqh,  # q [B, Lq, H, D], D contiguous
    skb, skl, skh,  # k [B, S*T, H, D], D contiguous
    svb, svl, svh, svd,  # v [B, S*T, H, D], D contiguous (16-bit) or rows contiguous (fp8 cache)
    ssb, ssl, ssh,  # k_scale and v_scale share one layout [B, S*T, H]
    sob, sol, soh,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FP8_KV: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    b = (tl.program_id(1) // H).to(tl.int64)
    h = (tl.program_id(1) % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_ok = offs_m[:, None] < Lq
    if BLOCK_D != D:
        q_ok = q_ok & (offs_d[None, :] < D)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :], mask=q_ok, other=0.0)  # [M, D]
    row_scale = tl.full((BLOCK_M,), qk_scale, tl.float32)
    q_lo = q
    if FP8_KV:  # Q as two fp8 terms per row, q ~ (q8 + q_lo) * q_scale; the scale joins the softmax scale
        q_scale = tl.maximum(tl.max(tl.abs(q.to(tl.float32)), axis=1), 1e-12) * _FP8_STEP
        qn = q.to(tl.float32) / q_scale[:, None]
        q = to_e4m3(qn, INTERPRET)
        q_lo = to_e4m3(qn - q.to(tl.float32), INTERPRET)
        row_scale = row_scale * q_scale

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    ks_base = KS + b * ssb + h * ssh
    vs_base = VS + b * ssb + h * ssh
    row0 = (tl.program_id(1) // H) * Rows
    col0 = (tl.program_id(1) % H) * D
    n_valid = tl.load(ValidRows).to(tl.int32)  # the ring's valid prefix, read on the device
    n_full = n_valid - n_valid % BLOCK_N
    if n_full < n_valid:  # the ragged end (rows n_full .. n_valid), masked, before the loop
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, q_lo, row_scale, k_base, v_base, ks_base, vs_base, n_full, n_valid, offs_d,
            skl, svl, svd, ssl, KDesc, VDesc, row0, col0, D, BLOCK_N, True, FP8_KV, PRECISION, INTERPRET, TMA,
        )  # fmt: skip

    for start in range(0, n_full, BLOCK_N):  # the steady state: full tiles, nothing masked
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, q_lo, row_scale, k_base, v_base, ks_base, vs_base, start, n_valid, offs_d,
            skl, svl, svd, ssl, KDesc, VDesc, row0, col0, D, BLOCK_N, False, FP8_KV, PRECISION, INTERPRET, TMA,
        )  # fmt: skip
    out = cast(acc / l_i[:, None], O.dtype.element_ty, INTERPRET)
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :], out, mask=q_ok)


def ring_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    valid_rows: Tensor,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
    *,
    tile: Tile | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Triton version of `ring_attention_ref`, with the valid prefix as a device tensor: q [B, Lq, H, D] in
    bf16/fp16/fp32; k_cache/v_cache [B, S*T, H, D] in q's dtype, or fp8 e4m3 with k_scale/v_scale [B, S*T, H] fp32;
    valid_rows a 0-dim integer tensor on q's device, 1 <= valid_rows <= S*T (`ChunkPlan.valid_rows`). An fp8
    cache needs sm_89+ and is fastest with V's rows contiguous (as `RingKVCache` stores it). tile: override
    `tile_for` (tests, benchmarks)."""
    batch, lq, heads, d = q.shape
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if fp8 != (k_scale is not None) or fp8 != (v_scale is not None) or v_cache.dtype != k_cache.dtype:
        raise ValueError("an fp8 K/V cache needs k_scale and v_scale, and a cache in the compute dtype takes none")
    if not fp8 and k_cache.dtype != q.dtype:
        raise ValueError(f"K/V cache dtype {k_cache.dtype} differs from the query dtype {q.dtype}")
    if k_cache.shape != v_cache.shape or k_cache.shape[0] != batch or k_cache.shape[2:] != (heads, d):
        raise ValueError(f"cache {tuple(k_cache.shape)}, {tuple(v_cache.shape)} does not match q {tuple(q.shape)}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or 1 not in (v_cache.stride(1), v_cache.stride(-1)):
        raise ValueError("q and K need the head dim contiguous, V the head dim or the rows")
    if valid_rows.ndim != 0 or valid_rows.dtype.is_floating_point or valid_rows.device != q.device:
        raise ValueError(f"valid_rows must be a 0-dim integer tensor on {q.device}, got {valid_rows!r}")
    if d > 256:
        raise ValueError(f"head dim {d} is above the kernel's 256")
    if fp8:
        _device.check_fp8(q.device)
    if fp8:
        if k_scale.stride() != v_scale.stride():
            raise ValueError("k_scale and v_scale must share one layout")
        scale_strides = (k_scale.stride(0), k_scale.stride(1), k_scale.stride(2))
    else:
        k_scale = v_scale = k_cache  # unused pointers
        scale_strides = (0, 0, 0)
    out = torch.empty_like(q) if out is None else out
    if lq == 0:
        return out
    tile = tile or tile_for(_device.arch(q.device), d, lq, q.dtype, fp8)
    block_d = max(16, triton.next_power_of_2(d))
    k_desc, v_desc = k_cache, v_cache  # unused pointers
    if tile.tma:
        if fp8 or block_d != d or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise ValueError("a TMA tile takes contiguous 16-bit K/V caches with a power-of-two head dim")
        from triton.tools.tensor_descriptor import TensorDescriptor

        k_desc, v_desc = (
            TensorDescriptor.from_tensor(x.view(-1, heads * d), [tile.block_n, d]) for x in (k_cache, v_cache)
        )
    grid = (triton.cdiv(lq, tile.block_m), batch * heads)
    _ring_attention_kernel[grid](
        q, k_cache, v_cache, k_scale, v_scale, valid_rows, out,
        k_desc, v_desc,
        math.log2(math.e) / math.sqrt(d),
        lq, heads, k_cache.shape[1],
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        *scale_strides,
        out.stride(0), out.stride(1), out.stride(2),
        D=d,
        BLOCK_D=block_d,
        BLOCK_M=tile.block_m,
        BLOCK_N=tile.block_n,
        FP8_KV=fp8,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        INTERPRET=INTERPRET,
        TMA=tile.tma,
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
    )  # fmt: skip
    return out
