"""Block-causal attention: the full-sequence mask and attention over the ring-buffer KV cache.

The torch reference below defines what ring attention means; `sfpp.ops.ring_attention` dispatches it to the Triton
and CUDA kernels of the same signature (the one dispatch point, chosen per model by `WanModel.use_kernels`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


def ring_attention_ref(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_frame: Tensor,
    frame_tokens: int,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
) -> Tensor:
    """Attention of the current chunk over everything the ring cache holds.

    q [B, Lq, H, D] (RoPE applied); k_cache/v_cache [B, S*T, H, D] with S frame slots of T tokens, the current
    chunk already written; slot_frame [S] the absolute frame in each slot, -1 where empty. The cache holds exactly
    the frames the chunk may see (sinks, then the window ending with the chunk), so validity is the only mask.
    Slots are in ring order, not time order: attention does not care, since positions live in the RoPE of K.
    An fp8 cache comes with per-token-per-head scales k_scale/v_scale [B, S*T, H]: K = k_cache * k_scale.
    """
    if k_scale is not None:
        k_cache = (k_cache.float() * k_scale[..., None]).to(q.dtype)
    if v_scale is not None:
        v_cache = (v_cache.float() * v_scale[..., None]).to(q.dtype)
    valid = (slot_frame >= 0).repeat_interleave(frame_tokens)  # [S*T]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2), attn_mask=valid[None, None, None, :]
    )
    return out.transpose(1, 2)
