"""Copy-free ring-buffer KV cache for the block-causal student.

Every layer owns S = sink + window frame slots of T tokens. Frame f lives in slot f when f < sink (never evicted),
else in slot sink + (f - sink) % window: writing a new chunk overwrites the oldest window frames in place, so
rolling forward costs no copies and memory stays constant however long the video. Positions are device tensors
updated in place (no `.item()`), so a chunk step can be captured in a CUDA graph and replayed.

Slots fill in order, so the frames a chunk attends over are always the first min(frames so far, sink + window)
slots: attention reads a prefix of the buffer, never a mask (`ChunkPlan.valid_rows`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor, nn

from sfpp.fp8 import dequantize_fp8, quantize_fp8

if TYPE_CHECKING:
    from sfpp.model import WanConfig

__all__ = ["ChunkPlan", "LayerKV", "RingKVCache", "dequantize_fp8", "quantize_fp8"]


class ChunkPlan(NamedTuple):
    frame_pos: Tensor  # [Fc] absolute frame positions of the chunk
    token_index: Tensor  # [Fc*T] cache rows the chunk writes
    valid_rows: Tensor  # 0-dim long on the device: rows [0, valid_rows) hold the keys the chunk attends over
    valid_rows_host: int  # the same number on the host (static shapes: one CUDA graph per fill level)


class LayerKV(NamedTuple):
    """One layer's ring as `ring_attention` takes it: k, v [B, S*T, H, D] and, for fp8, scales [B, S*T, H].

    An fp8 cache stores V with the rows contiguous (v.stride(1) == 1, physically [B, H, D, S*T]): the layout fp8
    warpgroup MMA needs for P @ V, whose reduction runs over the rows."""

    k: Tensor
    v: Tensor
    k_scale: Tensor | None = None
    v_scale: Tensor | None = None


class RingKVCache(nn.Module):
    def __init__(
        self,
        cfg: WanConfig,
        *,
        batch_size: int,
        frame_tokens: int,
        window: int = 21,
        sink: int = 0,
        dtype: torch.dtype = torch.float32,
        kv_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """`kv_dtype=torch.float8_e4m3fn` stores the self-attention K/V in fp8 with per-token-per-head fp32 scales
        (k_scale/v_scale [num_layers, B, S*T, H]) and V rows contiguous (see `LayerKV`); by default K/V are kept
        in `dtype`."""
        super().__init__()
        if window < 1 or sink < 0:
            raise ValueError(f"window must be >= 1 and sink >= 0, got window={window}, sink={sink}")
        if batch_size < 1 or frame_tokens < 1:
            raise ValueError(f"batch_size and frame_tokens must be >= 1, got {batch_size}, {frame_tokens}")
        self.cfg, self.window, self.sink = cfg, window, sink
        self.batch_size, self.frame_tokens = batch_size, frame_tokens
        slots = sink + window
        kv_shape = (cfg.num_layers, batch_size, slots * frame_tokens, cfg.num_heads, cfg.head_dim)
        text_shape = (cfg.num_layers, batch_size, cfg.num_heads, cfg.text_len, cfg.head_dim)
        kv_dtype = kv_dtype or dtype
        if kv_dtype not in (dtype, torch.float8_e4m3fn):
            raise ValueError(f"kv_dtype must be the cache dtype {dtype} or torch.float8_e4m3fn, got {kv_dtype}")
        self.fp8 = kv_dtype == torch.float8_e4m3fn
        self.register_buffer("k", torch.zeros(kv_shape, dtype=kv_dtype, device=device), persistent=False)
        if self.fp8:  # [L, B, H, D, rows padded to 16 bytes] memory seen as [L, B, S*T, H, D]
            rows = kv_shape[2]
            v = torch.zeros(*kv_shape[:2], *kv_shape[3:], -(-rows // 16) * 16, dtype=kv_dtype, device=device)
            v = v[..., :rows].permute(0, 1, 4, 2, 3)
        else:
            v = torch.zeros(kv_shape, dtype=kv_dtype, device=device)
        self.register_buffer("v", v, persistent=False)
        scale = torch.ones(kv_shape[:-1], device=device) if self.fp8 else None
        self.register_buffer("k_scale", scale, persistent=False)
        self.register_buffer("v_scale", None if scale is None else scale.clone(), persistent=False)
        self.register_buffer("text_k", torch.zeros(text_shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("text_v", torch.zeros(text_shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("slot_frame", torch.full((slots,), -1, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("chunk_start", torch.zeros((), dtype=torch.long, device=device), persistent=False)
        self.register_buffer("_tokens", torch.arange(frame_tokens, device=device), persistent=False)
        self.frames_done = 0  # host mirror of chunk_start, for argument checks only (never read from the device)
        self.has_text = False

    @property
    def nbytes(self) -> int:
        return sum(b.untyped_storage().nbytes() for b in self.buffers())

    def memory_report(self) -> str:
        kv = 2 * self.k.numel() * self.k.element_size()
        if self.fp8:
            kv += 2 * self.k_scale.numel() * self.k_scale.element_size()
        text = 2 * self.text_k.numel() * self.text_k.element_size()
        return (
            f"KV cache: {self.sink} sink + {self.window} window frames x {self.frame_tokens} tokens x "
            f"{self.cfg.num_layers} layers, batch {self.batch_size}, {self.k.dtype}{' + scales' if self.fp8 else ''}: "
            f"self-attn {kv / 2**20:.1f} MiB + text {text / 2**20:.1f} MiB = {self.nbytes / 2**20:.1f} MiB"
        )

    def reset(self) -> None:
        """Forget all frames and the text (a new video or a new prompt)."""
        self.slot_frame.fill_(-1)
        self.chunk_start.zero_()
        self.frames_done = 0
        self.has_text = False

    def set_text(self, text_kv: list[tuple[Tensor, Tensor]]) -> None:
        """Store per-layer cross-attention K/V [B, H, Lt, D] once per prompt (copied into fixed buffers)."""
        for i, (k, v) in enumerate(text_kv):
            self.text_k[i].copy_(k)
            self.text_v[i].copy_(v)
        self.has_text = True

    @property
    def text_kv(self) -> list[tuple[Tensor, Tensor]]:
        if not self.has_text:
            raise RuntimeError("the KV cache has no text context: call cache.set_text(model.text_kv(context)) first")
        return [(self.text_k[i], self.text_v[i]) for i in range(self.cfg.num_layers)]

    def slot_of(self, frame: Tensor) -> Tensor:
        return torch.where(frame < self.sink, frame, self.sink + (frame - self.sink) % self.window)

    def plan(self, batch_size: int, num_frames: int, frame_tokens: int) -> ChunkPlan:
        """Slots of the chunk starting at `chunk_start`; marks them as holding its frames. Slots fill in order, so
        with the chunk the first min(frames_done + num_frames, sink + window) slots hold every frame it sees."""
        if batch_size != self.batch_size or frame_tokens != self.frame_tokens:
            raise ValueError(
                f"chunk of batch {batch_size} with {frame_tokens} tokens per frame does not fit a cache built for "
                f"batch {self.batch_size} with {self.frame_tokens} tokens per frame"
            )
        if num_frames > self.window:
            raise ValueError(f"a chunk of {num_frames} frames does not fit the window of {self.window} frames")
        limit = self.cfg.rope_max_positions
        if self.frames_done + num_frames > limit:
            raise ValueError(
                f"frames {self.frames_done}..{self.frames_done + num_frames - 1} go past the RoPE table of {limit} "
                f"latent frames: the model cannot place frames beyond position {limit - 1}"
            )
        frame_pos = self.chunk_start + torch.arange(num_frames, device=self.chunk_start.device)
        slots = self.slot_of(frame_pos)
        self.slot_frame.index_copy_(0, slots, frame_pos)
        token_index = (slots[:, None] * self.frame_tokens + self._tokens[None, :]).flatten()
        num_slots = self.sink + self.window
        valid_rows = (self.chunk_start + num_frames).clamp(max=num_slots) * self.frame_tokens
        valid_rows_host = min(self.frames_done + num_frames, num_slots) * self.frame_tokens
        return ChunkPlan(frame_pos, token_index, valid_rows, valid_rows_host)

    def write(self, layer: int, plan: ChunkPlan, k: Tensor, v: Tensor) -> LayerKV:
        """Write one layer's chunk K/V [B, Fc*T, H, D] into its ring slots, in place; return the layer's K/V to attend
        over. An fp8 cache stores the chunk quantized per token and head, with its scales. (Forwards with gradients
        write nothing: `WanModel.forward_chunk` attends to the ring and the chunk's own K/V in two parts.)"""
        rows = [(self.k, k), (self.v, v)]
        if self.fp8:
            (k, ks), (v, vs) = quantize_fp8(k), quantize_fp8(v)
            rows = [(self.k, k), (self.v, v), (self.k_scale, ks), (self.v_scale, vs)]
        rows = [(buf[layer], x.detach().to(buf.dtype)) for buf, x in rows]
        for buf, x in rows:
            if buf.dtype == torch.float8_e4m3fn:  # index_copy_ has no fp8 kernel on every device: copy the bytes
                buf, x = buf.view(torch.uint8), x.view(torch.uint8)
            buf.index_copy_(1, plan.token_index, x)
        return self.layer(layer)

    def layer(self, layer: int) -> LayerKV:
        if self.fp8:
            return LayerKV(self.k[layer], self.v[layer], self.k_scale[layer], self.v_scale[layer])
        return LayerKV(self.k[layer], self.v[layer])

    def advance(self, num_frames: int) -> None:
        """Move past the current chunk: the next `plan` starts `num_frames` later."""
        self.chunk_start.add_(num_frames)
        self.frames_done += num_frames
