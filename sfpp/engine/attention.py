"""Block-causal attention in plain torch: the student's full-sequence mask, and the chunk's attention over the ring
plus its own K/V with gradients (training rollouts). Inference attention over the ring is the op
`sfpp.engine.ops.ring_attention`, whose meaning is `sfpp.kernels.reference.ring_attention_ref`."""

from __future__ import annotations

import torch
from torch import Tensor


def block_causal_mask(
    num_frames: int,
    frame_tokens: int,
    frames_per_chunk: int,
    *,
    window: int | None = None,
    sink: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Boolean attention mask [F*T, F*T] (True = attend) of the student over a whole sequence.

    A query frame in chunk c sees every frame up to the end of chunk c. With a `window`, it sees only the first
    `sink` frames and the last `window` frames before that end: exactly what the ring cache holds at that chunk.
    """
    if frames_per_chunk < 1:
        raise ValueError(f"frames_per_chunk must be >= 1, got {frames_per_chunk}")
    if window is not None and window < frames_per_chunk:
        raise ValueError(f"window ({window}) must hold at least one chunk ({frames_per_chunk} frames)")
    frame = torch.arange(num_frames, device=device)
    chunk_end = torch.clamp((frame // frames_per_chunk + 1) * frames_per_chunk, max=num_frames)  # [F]
    key = frame[None, :]
    visible = key < chunk_end[:, None]
    if window is not None:
        visible &= (key < sink) | (key >= chunk_end[:, None] - window)
    return visible.repeat_interleave(frame_tokens, 0).repeat_interleave(frame_tokens, 1)


# ------------------------------------------------------------------------------ training: cache + own chunk
# Under autograd the chunk's K/V must not be written into the ring (an in-place write would clobber what the
# backward needs; an out-of-place write copies the whole layer ring per forward). Instead the chunk attends in two
# parts: the ring (no gradient, read in place, the chunk's own slots masked out) and its own K/V (with gradient),
# merged by their log-sum-exp. Tiled over keys as flash attention is, so no [Lq, Lk] score matrix is ever held.


def _partial_attention(q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None, block: int) -> tuple[Tensor, Tensor]:
    """Softmax attention over one key set, tiled by `block` keys. q [B, H, Lq, D], k/v [B, H, Lk, D] (q pre-scaled,
    fp32), valid [Lk] bool or None -> out [B, H, Lq, D] fp32 normalised over this key set, lse [B, H, Lq]
    (-inf where no key is valid)."""
    m = q.new_full(q.shape[:-1], float("-inf"))
    denom = q.new_zeros(q.shape[:-1])
    acc = torch.zeros_like(q)
    for s in range(0, k.shape[2], block):
        scores = q @ k[:, :, s : s + block].float().transpose(-1, -2)  # [B, H, Lq, blk]
        if valid is not None:
            scores = scores.masked_fill(~valid[s : s + block], float("-inf"))
        m_new = torch.maximum(m, scores.amax(-1))
        m_safe = torch.where(torch.isinf(m_new), 0.0, m_new)  # rows with no valid key yet
        p = torch.exp(scores - m_safe[..., None])
        correction = torch.exp(m - m_safe)
        denom = denom * correction + p.sum(-1)
        acc = acc * correction[..., None] + p @ v[:, :, s : s + block].float()
        m = m_new
    m_safe = torch.where(torch.isinf(m), 0.0, m)
    return acc / denom.clamp_min(1e-30)[..., None], m_safe + torch.log(denom)


def _partial_backward(
    q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None, d_out: Tensor, delta: Tensor, lse: Tensor, block: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Flash-attention backward of one key set under the merged softmax (lse and delta = rowsum(dO * O) of the
    merged output): returns dq (w.r.t. the pre-scaled q), dk, dv, all fp32."""
    dq = torch.zeros_like(q)
    dk, dv = torch.empty(k.shape, dtype=q.dtype, device=q.device), torch.empty(v.shape, dtype=q.dtype, device=q.device)
    for s in range(0, k.shape[2], block):
        kb, vb = k[:, :, s : s + block].float(), v[:, :, s : s + block].float()
        scores = q @ kb.transpose(-1, -2)
        if valid is not None:
            scores = scores.masked_fill(~valid[s : s + block], float("-inf"))
        p = torch.exp(scores - lse[..., None])  # the merged softmax restricted to this tile
        dv[:, :, s : s + block] = p.transpose(-1, -2) @ d_out
        ds = p * (d_out @ vb.transpose(-1, -2) - delta[..., None])
        dq += ds @ kb
        dk[:, :, s : s + block] = ds.transpose(-1, -2) @ q
    return dq, dk, dv


class _CacheAndChunkAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k_cache, v_cache, cache_valid, k_new, v_new, block):  # type: ignore[override]
        scale = q.shape[-1] ** -0.5
        qs = q.transpose(1, 2).float() * scale  # [B, H, Lq, D]
        kc, vc, kn, vn = (x.transpose(1, 2) for x in (k_cache, v_cache, k_new, v_new))
        out_c, lse_c = _partial_attention(qs, kc, vc, cache_valid, block)
        out_n, lse_n = _partial_attention(qs, kn, vn, None, block)
        lse = torch.logaddexp(lse_c, lse_n)  # the chunk always sees itself: finite
        out = out_c * torch.exp(lse_c - lse)[..., None] + out_n * torch.exp(lse_n - lse)[..., None]
        # The ring is saved by reference: the autograd version check turns a write into it before the backward
        # (e.g. the next context pass) into an error instead of a silently wrong gradient.
        ctx.save_for_backward(q, k_cache, v_cache, cache_valid, k_new, v_new, out, lse)
        ctx.block, ctx.scale = block, scale
        return out.transpose(1, 2).to(q.dtype)

    @staticmethod
    def backward(ctx, d_out):  # type: ignore[override]
        q, k_cache, v_cache, cache_valid, k_new, v_new, out, lse = ctx.saved_tensors
        qs = q.transpose(1, 2).float() * ctx.scale
        d_out = d_out.transpose(1, 2).float()
        delta = (d_out * out).sum(-1)
        kc, vc, kn, vn = (x.transpose(1, 2) for x in (k_cache, v_cache, k_new, v_new))
        dq_c, _, _ = _partial_backward(qs, kc, vc, cache_valid, d_out, delta, lse, ctx.block)
        dq_n, dk, dv = _partial_backward(qs, kn, vn, None, d_out, delta, lse, ctx.block)
        dq = ((dq_c + dq_n) * ctx.scale).transpose(1, 2).to(q.dtype)
        dk = dk.transpose(1, 2).to(k_new.dtype)  # scores = (scale q) k: dk already carries the scale
        return dq, None, None, None, dk, dv.transpose(1, 2).to(v_new.dtype), None


def cache_and_chunk_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_valid: Tensor, k_new: Tensor, v_new: Tensor, block: int
) -> Tensor:
    """Attention of a chunk over the ring (read in place, no gradient) and over its own K/V (with gradient).

    q, k_new, v_new [B, Lq, H, D] (RoPE applied); k_cache/v_cache [B, S*T, H, D] one layer's ring; cache_valid
    [S*T] bool, the ring rows the chunk may see other than its own (its own slots hold stale K/V: masked out).
    Equals softmax attention over the concatenation of both key sets, values and gradients (tests/
    test_attention_grad.py), without copying the ring. `block` keys per tile (a frame's tokens)."""
    if k_cache.dtype == torch.float8_e4m3fn:
        raise ValueError("training rollouts need a bf16/fp16/fp32 KV cache, got float8_e4m3fn")
    return _CacheAndChunkAttention.apply(q, k_cache, v_cache, cache_valid, k_new, v_new, block)
