"""Copy-free ring-buffer KV cache for the block-causal student.

Every layer owns S = sink + window frame slots of T tokens. Frame f lives in slot f when f < sink (never evicted),
else in slot sink + (f - sink) % window: writing a new chunk overwrites the oldest window frames in place, so
rolling forward costs no copies and memory stays constant however long the video. Positions are device tensors
updated in place (no `.item()`), so a chunk step can be captured in a CUDA graph and replayed.

Slots fill in order, so the frames a chunk attends over are always the first min(frames so far, sink + window)
slots: attention reads a prefix of the buffer, never a mask (`ChunkPlan.valid_rows`).

Past the RoPE table (`rope_max_positions` latent frames) the stream goes on by re-basing positions: RoPE attention
depends only on the offset between a query and a key, so `make_room` rotates the window's cached keys back by the
same amount the next chunks' positions move back (R(p - d) = R(-d) R(p), one in-place pass over the window's keys
every ~1000 frames), and every offset inside the window stays exactly what it was. Sink frames keep their positions,
so after a re-base they sit right before the window again, as in the first chunks; the offset from a chunk to the
sinks therefore cycles through the range the model sees before the limit instead of growing without bound.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor, nn

from sfpp.engine.rope import apply_rope, temporal_rotation
from sfpp.kernels.fp8 import dequantize_fp8, quantize_fp8

if TYPE_CHECKING:  # for annotations only: the model sits a floor above the cache
    from sfpp.models.dit import WanConfig

__all__ = ["ChunkPlan", "LayerKV", "RingKVCache", "dequantize_fp8", "quantize_fp8"]


class ChunkPlan(NamedTuple):
    frame_pos: Tensor  # [Fc] RoPE positions of the chunk's frames (their frame index until a re-base)
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
        heads: int | None = None,
    ) -> None:
        """`kv_dtype=torch.float8_e4m3fn` stores the self-attention K/V in fp8 with per-token-per-head fp32 scales
        (k_scale/v_scale [num_layers, B, S*T, H]) and V rows contiguous (see `LayerKV`); by default K/V are kept
        in `dtype`. `heads`: the self-attention heads this cache holds, all of them by default; a rank of a
        context-parallel group holds its H/N (`WanModel.cache_heads`). The text K/V keep every head (each rank's
        tokens cross-attend with all of them)."""
        super().__init__()
        if window < 1 or sink < 0:
            raise ValueError(f"window must be >= 1 and sink >= 0, got window={window}, sink={sink}")
        if batch_size < 1 or frame_tokens < 1:
            raise ValueError(f"batch_size and frame_tokens must be >= 1, got {batch_size}, {frame_tokens}")
        self.cfg, self.window, self.sink = cfg, window, sink
        self.batch_size, self.frame_tokens = batch_size, frame_tokens
        self.heads = cfg.num_heads if heads is None else heads
        if not (isinstance(self.heads, int) and 1 <= self.heads <= cfg.num_heads and cfg.num_heads % self.heads == 0):
            raise ValueError(f"heads must divide the model's {cfg.num_heads} heads, got {heads!r}")
        slots = sink + window
        kv_shape = (cfg.num_layers, batch_size, slots * frame_tokens, self.heads, cfg.head_dim)
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
        # RoPE position of window frame f = f - rope_shift (sinks: f); raised by `make_room` past the RoPE table.
        self.register_buffer("rope_shift", torch.zeros((), dtype=torch.long, device=device), persistent=False)
        self.frames_done = 0  # host mirror of chunk_start, for argument checks only (never read from the device)
        self.shift_done = 0  # host mirror of rope_shift
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
            f"{self.cfg.num_layers} layers, batch {self.batch_size}, {self.k.dtype}{' + scales' if self.fp8 else ''}"
            f"{'' if self.heads == self.cfg.num_heads else f', {self.heads} of {self.cfg.num_heads} heads'}: "
            f"self-attn {kv / 2**20:.1f} MiB + text {text / 2**20:.1f} MiB = {self.nbytes / 2**20:.1f} MiB"
        )

    def reset(self) -> None:
        """Forget all frames and the text (a new video or a new prompt)."""
        self.slot_frame.fill_(-1)
        self.chunk_start.zero_()
        self.rope_shift.zero_()
        self.frames_done = self.shift_done = 0
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

    def rope_position(self, frame: Tensor) -> Tensor:
        """RoPE positions of absolute frame indices [F]: a sink keeps its index, a window frame moves back by the
        re-bases done so far (none before the RoPE table runs out)."""
        return torch.where(frame < self.sink, frame, frame - self.rope_shift)

    def plan_frames(self, frame: Tensor, end: Tensor, end_host: int) -> ChunkPlan:
        """Slots of the absolute frames `frame` [F] (a device tensor); marks them as holding these frames. `end`
        (and `end_host`, the same on the host): the frame count once they are written; slots fill in order, so the
        first min(end, sink + window) slots then hold every frame written."""
        slots = self.slot_of(frame)
        self.slot_frame.index_copy_(0, slots, frame)
        token_index = (slots[:, None] * self.frame_tokens + self._tokens[None, :]).flatten()
        slots_held = end.clamp(max=self.sink + self.window), min(end_host, self.sink + self.window)
        rows, rows_host = (n * self.frame_tokens for n in slots_held)
        return ChunkPlan(self.rope_position(frame), token_index, rows, rows_host)

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
        limit, position = self.cfg.rope_max_positions, self.frames_done - self.shift_done
        if position + num_frames > limit:
            raise ValueError(
                f"frames at RoPE positions {position}..{position + num_frames - 1} go past the RoPE table of {limit} "
                f"latent frames: call cache.make_room({num_frames}) before the chunk to re-base the positions"
            )
        frame = self.chunk_start + torch.arange(num_frames, device=self.chunk_start.device)
        return self.plan_frames(frame, self.chunk_start + num_frames, self.frames_done + num_frames)

    def make_room(self, num_frames: int) -> None:
        """Before a chunk of `num_frames`: if its RoPE positions would run past the table, re-base the window.

        The next chunk moves back to position sink + window - num_frames (where it sits once the window first fills)
        and the window's cached keys are rotated back by the same amount, in place: offsets between window frames
        are unchanged, the ring is not copied, and positions move by device tensors. Host-side decision only (the
        frame counters are host mirrors): call it outside a captured graph, before replaying the chunk."""
        limit, position = self.cfg.rope_max_positions, self.frames_done - self.shift_done
        if position + num_frames <= limit:
            return
        target = self.sink + self.window - num_frames
        if target + num_frames > limit:
            raise ValueError(
                f"a cache of {self.sink} sink + {self.window} window frames does not fit the RoPE table of {limit} "
                f"latent frames: no room to re-base positions"
            )
        self.rotate_window_keys(target - position)
        self.rope_shift.add_(position - target)
        self.shift_done += position - target

    @torch.no_grad()
    def rotate_window_keys(self, shift: int) -> None:
        """Move every cached window key (not the sinks) by `shift` temporal RoPE positions, in place, layer by layer.
        An fp8 cache is dequantized, rotated and quantized again row by row."""
        t_dims = self.cfg.rope_split[0]

        cos, sin = (x.to(self.k.device) for x in temporal_rotation(self.cfg, shift))
        rows = slice(self.sink * self.frame_tokens, None)
        for layer in range(self.cfg.num_layers):
            k = self.k[layer, :, rows]  # [B, W*T, H, D]
            if not self.fp8:
                k[..., :t_dims] = apply_rope(k[..., :t_dims], cos, sin)
                continue
            scale = self.k_scale[layer, :, rows]
            x = dequantize_fp8(k, scale)
            x[..., :t_dims] = apply_rope(x[..., :t_dims], cos, sin)
            x8, new_scale = quantize_fp8(x)
            k.view(torch.uint8).copy_(x8.view(torch.uint8))
            scale.copy_(new_scale)

    def seek(self, frame: int) -> None:
        """Start the next chunk at absolute frame `frame` (after frames written by `WanModel.forward_context`)."""
        self.chunk_start.fill_(frame)
        self.frames_done = frame

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
