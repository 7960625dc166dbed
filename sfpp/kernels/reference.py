"""The torch references of the chunk-step ops: what each op means, the CPU backend of `sfpp.engine.ops`, and what
the Triton kernels beside this file (and csrc/) are tested against. Plain torch: importable without Triton."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sfpp.kernels.fp8 import dequantize_fp8, quantize_fp8


def ring_attention_ref(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    valid_rows: int,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
) -> Tensor:
    """Attention of the current chunk over everything the ring cache holds: its first `valid_rows` rows.

    q [B, Lq, H, D] (RoPE applied); k_cache/v_cache [B, S*T, H, D], the current chunk already written. Slots fill
    in order, so the valid rows are a prefix (`ChunkPlan.valid_rows_host`), in ring order rather than time order:
    attention does not care, since positions live in the RoPE of K. SDPA over that prefix with no mask, so the
    flash / cuDNN / memory-efficient backends apply; a host int keeps the shapes static per fill level. An fp8
    cache comes with per-token-per-head scales k_scale/v_scale [B, S*T, H]: K = k_cache * k_scale.
    """
    if not 0 < valid_rows <= k_cache.shape[1]:
        raise ValueError(f"valid_rows must be in [1, {k_cache.shape[1]}] (the cache rows), got {valid_rows}")
    k, v = k_cache[:, :valid_rows], v_cache[:, :valid_rows]
    if k_scale is not None:
        k = dequantize_fp8(k, k_scale[:, :valid_rows], q.dtype)
    if v_scale is not None:
        v = dequantize_fp8(v, v_scale[:, :valid_rows], q.dtype)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)



def rope_rows(num_tokens: int, frame_pos: Tensor, height: int, width: int, split: tuple[int, int, int]) -> Tensor:
    """Row of the RoPE table each (token, rotation pair) reads [L, D/2]: the frame's absolute position for the
    t pairs, the token's row y for the h pairs, its column x for the w pairs (split in real dims, as WanConfig)."""
    t_half, h_half, w_half = (s // 2 for s in split)
    token = torch.arange(num_tokens, device=frame_pos.device)
    f, y, x = token // (height * width), token // width % height, token % width
    pair = torch.arange(t_half + h_half + w_half, device=frame_pos.device)
    return torch.where(
        pair < t_half, frame_pos[f][:, None], torch.where(pair < t_half + h_half, y[:, None], x[:, None])
    )


def _norm_rope_ref(x: Tensor, weight: Tensor, cos: Tensor, sin: Tensor, heads: int, eps: float) -> Tensor:
    """Wan's RMSNorm over the model dim, then RoPE on adjacent pairs; [B, L, dim] -> [B, L, H, D]."""
    x32 = x.float()
    x = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight
    pairs = x.unflatten(-1, (heads, -1, 2)).float()
    c, s = cos[None, :, None], sin[None, :, None]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], -1).flatten(-2).to(weight.dtype)


def cache_write_ref(
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
    """q, k, v [B, L, H*D] projections of the chunk (L = Fc*height*width tokens); norm_q/norm_k [H*D] RMSNorm
    weights; cos_table/sin_table [P, D/2] fp32 (`rope_table`); frame_pos [Fc]; token_index [L] the cache rows of
    the chunk; k_cache/v_cache [B, S*T, H, D] (fp8 with k_scale/v_scale [B, S*T, H], or None). Writes normed,
    roped K and V into the cache rows and returns the normed, roped q [B, L, H, D]."""
    heads = k_cache.shape[2]
    rows = rope_rows(q.shape[1], frame_pos, height, width, split)
    pair = torch.arange(rows.shape[1], device=rows.device)
    cos, sin = cos_table[rows, pair], sin_table[rows, pair]  # [L, D/2]
    q_out = _norm_rope_ref(q, norm_q, cos, sin, heads, eps)
    k_out = _norm_rope_ref(k, norm_k, cos, sin, heads, eps)
    v_out = v.unflatten(-1, (heads, -1))
    if k_scale is not None:
        (k_out, ks), (v_out, vs) = quantize_fp8(k_out), quantize_fp8(v_out)
        k_scale.index_copy_(1, token_index, ks)
        v_scale.index_copy_(1, token_index, vs)
        k_cache, v_cache, k_out, v_out = (x.view(torch.uint8) for x in (k_cache, v_cache, k_out, v_out))
    k_cache.index_copy_(1, token_index, k_out.to(k_cache.dtype))
    v_cache.index_copy_(1, token_index, v_out.to(v_cache.dtype))
    return q_out


def adaln_modulate_ref(x: Tensor, shift: Tensor, scale: Tensor, eps: float, out_dtype: torch.dtype) -> Tensor:
    """adaLN of a Wan block: fp32 LayerNorm without affine of x [B, F*L, D], per-frame modulation by shift/scale
    [B, F, 1, D] fp32 (one row per latent frame, over its L tokens), cast to out_dtype. The model's own math
    (`FP32LayerNorm`, `sfpp.model._modulate`), op for op."""
    n = F.layer_norm(x.float(), x.shape[-1:], None, None, eps)
    return (n.unflatten(1, (shift.shape[1], -1)) * (1 + scale) + shift).flatten(1, 2).to(out_dtype)
