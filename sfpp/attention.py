"""Block-causal attention: the full-sequence mask and attention over the ring-buffer KV cache.

The torch function below defines what ring attention means and is the torch backend of `sfpp.ops.ring_attention`,
which dispatches to the Triton kernel (`kernels/ring_attention.py`) as chosen per model by `WanModel.use_kernels`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sfpp.fp8 import dequantize_fp8


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
