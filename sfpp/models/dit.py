"""Wan2.1 text-to-video DiT: the bidirectional teacher and the block-causal student in one module.

Parameter names follow Wan's original checkpoints (`blocks.N.self_attn.q`, `head.modulation`, ...) so that real
weights load as they are. Shapes are written as [B batch, F latent frames, L tokens, H heads, D head dim].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sfpp.engine import ops
from sfpp.engine.attention import block_causal_mask, cache_and_chunk_attention
from sfpp.engine.parallel import ContextParallel
from sfpp.engine.rope import apply_rope, rope_table
from sfpp.kernels.fp8 import dequantize_fp8, quantize_fp8
from sfpp.kernels.reference import ring_attention_ref


@dataclass(frozen=True)
class WanConfig:
    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_channels: int = 16  # latent channels of the VAE
    out_channels: int = 16
    text_dim: int = 4096  # umT5-XXL hidden size
    text_len: int = 512  # text tokens the model attends to (padded with zeros)
    freq_dim: int = 256  # sinusoidal timestep embedding size
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_max_positions: int = 1024  # RoPE table length per axis: the longest video is this many latent frames

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head_dim={self.head_dim} must be even and at least 6 for the 3D RoPE split")
        if self.patch_size[0] != 1:
            raise ValueError("only a temporal patch size of 1 is supported (one token row per latent frame)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Real dims of each head given to the (t, h, w) axes: 44/42/42 for head_dim 128, as in Wan."""
        hw = 2 * (self.head_dim // 6)
        return self.head_dim - 2 * hw, hw, hw

    @classmethod
    def from_dict(cls, d: dict) -> WanConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown WanConfig fields {unknown}; known fields are {sorted(known)}")
        d = dict(d)
        if "patch_size" in d:
            d["patch_size"] = tuple(d["patch_size"])
        return cls(**d)


CONFIGS: dict[str, WanConfig] = {
    "wan2.1-1.3b": WanConfig(),
    "wan2.1-14b": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # Small sizes for CPU work and tests; same structure, Wan's parameter names.
    "small": WanConfig(dim=256, ffn_dim=768, num_heads=4, num_layers=4, text_dim=256, text_len=64),
    "tiny": WanConfig(dim=48, ffn_dim=96, num_heads=2, num_layers=2, text_dim=32, text_len=16),
    # 14B's head layout (40 heads: context parallel over 2, 4, 5, 8 ranks) at a tiny width (head_dim 8), for CPU.
    "tiny-14b": WanConfig(dim=320, ffn_dim=128, num_heads=40, num_layers=2, text_dim=32, text_len=16),
}


def get_config(name: str) -> WanConfig:
    if name not in CONFIGS:
        raise ValueError(f"unknown model config {name!r}; choose one of {sorted(CONFIGS)}")
    return CONFIGS[name]


# ----------------------------------------------------------------------------------------------- embeddings


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """Wan's timestep embedding: [cos, sin] of t * 10000^(-i/half), in float64 for exactness. t [N] -> [N, dim]."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.to(torch.float64)[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


# ----------------------------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class FP32LayerNorm(nn.LayerNorm):
    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


class Attention(nn.Module):
    """Projections of Wan's self- and cross-attention; q/k RMSNorm spans all heads, as in Wan."""

    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.k = nn.Linear(cfg.dim, cfg.dim)
        self.v = nn.Linear(cfg.dim, cfg.dim)
        self.o = nn.Linear(cfg.dim, cfg.dim)
        self.norm_q = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()

    def query(self, x: Tensor) -> Tensor:  # [B, L, dim] -> [B, L, H, D]
        return self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))

    def key_value(self, x: Tensor) -> tuple[Tensor, Tensor]:
        k = self.norm_k(self.k(x)).unflatten(-1, (self.num_heads, -1))
        return k, self.v(x).unflatten(-1, (self.num_heads, -1))


# Self-attention of one layer: (q, k, v) [B, L, H, D] -> [B, L, H, D]. Either masked attention over the whole
# sequence or a write into the KV cache followed by attention over the ring.
AttendFn = Callable[[Tensor, Tensor, Tensor], Tensor]


class FusedAttend:
    """Self-attention of one layer over the ring cache through `sfpp.engine.ops` kernels: the fused cache write (q/k
    RMSNorm + RoPE from the model's tables at the chunk's frame positions + ring append), then ring attention."""

    def __init__(self, model: WanModel, cache, layer: int, plan, height: int, width: int, backend: str) -> None:
        self.model, self.cache, self.layer, self.plan = model, cache, layer, plan
        self.height, self.width, self.backend = height, width, backend

    def __call__(self, attn: Attention, h: Tensor) -> Tensor:  # h [B, L, dim] -> [B, L, H, D]
        cfg, cache, plan = self.model.cfg, self.cache, self.plan
        kv = cache.layer(self.layer)
        q = ops.cache_write(
            attn.q(h), attn.k(h), attn.v(h), attn.norm_q.weight, attn.norm_k.weight, *self.model._rope,
            plan.frame_pos, plan.token_index, *kv, self.height, self.width, cfg.rope_split, cfg.eps,
            backend=self.backend,
        )  # fmt: skip
        return ops.ring_attention(
            q, kv.k, kv.v, plan.valid_rows, plan.valid_rows_host, kv.k_scale, kv.v_scale, backend=self.backend
        )


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """Per-frame adaLN: x [B, F*L, dim] fp32, shift/scale [B, F, 1, dim]."""
    frames = shift.shape[1]
    return (x.unflatten(1, (frames, -1)) * (1 + scale) + shift).flatten(1, 2)


def _norm_modulate(
    norm: FP32LayerNorm, x: Tensor, shift: Tensor, scale: Tensor, dtype: torch.dtype, kernels: str | None
) -> Tensor:
    """norm(x), per-frame adaLN, cast to dtype: the torch path, or with `kernels` (a backend of `sfpp.engine.ops`) the
    fused op."""
    if kernels is None:
        return _modulate(norm(x), shift, scale).to(dtype)
    return ops.adaln_modulate(x, shift, scale, norm.eps, dtype, backend=kernels)


def _gate(y: Tensor, gate: Tensor) -> Tensor:
    return (y.float().unflatten(1, (gate.shape[1], -1)) * gate).flatten(1, 2)


class WanBlock(nn.Module):
    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        self.norm1 = FP32LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.self_attn = Attention(cfg)
        self.norm3 = FP32LayerNorm(cfg.dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = Attention(cfg)
        self.norm2 = FP32LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, cfg.dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

    def text_kv(self, ctx: Tensor) -> Tensor:
        """Cross-attention K and V [2, B, Lt, dim] (heads not split) of the embedded text [B, Lt, dim]. A method of
        the block, so that a block sharded on its own by FSDP gathers its weights for it; one new tensor, not views
        (which FSDP's backward hooks could miss)."""
        attn = self.cross_attn
        return torch.stack([attn.norm_k(attn.k(ctx)), attn.v(ctx)])  # [2, B, Lt, dim]

    def forward(
        self,
        x: Tensor,
        e: Tensor,
        rope: tuple[Tensor, Tensor],
        text_kv: tuple[Tensor, Tensor],
        attend: AttendFn,
        kernels: str | None = None,
    ) -> Tensor:
        """x [B, F*L, dim] fp32 residual stream; e [B, F, 6, dim] fp32 per-frame modulation; kernels: the
        `sfpp.engine.ops` backend of the fused adaLN, or None for the torch path."""
        dtype = self.ffn[0].weight.dtype
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float().unsqueeze(1) + e).chunk(6, dim=2)

        h = _norm_modulate(self.norm1, x, shift1, scale1, dtype, kernels)
        if isinstance(attend, FusedAttend):  # kernels: projections in, norm + RoPE + cache write + attention fused
            y = attend(self.self_attn, h)
        else:
            q = apply_rope(self.self_attn.query(h), *rope)
            k, v = self.self_attn.key_value(h)
            y = attend(q, apply_rope(k, *rope), v)  # [B, F*L, H, D]
        x = x + _gate(self.self_attn.o(y.flatten(2)), gate1)

        q = self.cross_attn.query(self.norm3(x).to(dtype)).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, *text_kv)  # text K/V are [B, H, Lt, D]
        x = x + self.cross_attn.o(y.transpose(1, 2).flatten(2)).float()

        y = self.ffn(_norm_modulate(self.norm2, x, shift2, scale2, dtype, kernels))
        return x + _gate(y, gate2)


class Head(nn.Module):
    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        self.norm = FP32LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: Tensor, e: Tensor, kernels: str | None = None) -> Tensor:  # e [B, F, dim]
        shift, scale = (self.modulation.float().unsqueeze(1) + e.unsqueeze(2)).chunk(2, dim=2)
        return self.head(_norm_modulate(self.norm, x, shift, scale, self.head.weight.dtype, kernels))


# ----------------------------------------------------------------------------------------------- model


class WanModel(nn.Module):
    """Wan2.1 DiT. `forward` runs a whole sequence (bidirectional, or block-causal with `frames_per_chunk`);
    `forward_chunk` runs one chunk of the student against a `RingKVCache`."""

    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv3d(cfg.in_channels, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, cfg.dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self._rope: tuple[Tensor, Tensor] | None = None  # fp32 cos/sin tables, built on first use per device
        self.kernels: str | None = None  # `use_kernels`: the sfpp.engine.ops backend of forward_chunk's self-attention
        # Training: activation checkpointing of every k-th block in forwards with gradients (0 or False: none, 1 or
        # True: every block), keeping only those blocks' inputs and recomputing them in the backward.
        self.checkpoint_blocks: int = 0
        self.parallel: ContextParallel | None = None  # `set_parallel`: one stream split over ranks (Ulysses)

    @property
    def dtype(self) -> torch.dtype:
        return self.head.head.weight.dtype

    def set_parallel(self, parallel: ContextParallel | None) -> WanModel:
        """Split every forward over the ranks of `parallel` (`sfpp.engine.parallel`: each rank 1/N of each frame's
        tokens, its H/N heads in self-attention and in the ring cache), or None for one device. Every rank holds the
        same weights and calls the same forwards with the same inputs; each gets the whole output."""
        if parallel is not None:
            parallel.check_heads(self.cfg.num_heads)
        self.parallel = parallel
        return self

    @property
    def cache_heads(self) -> int:
        """Self-attention heads a ring cache of this model holds: all of them, or this rank's H/N."""
        return self.cfg.num_heads if self.parallel is None else self.cfg.num_heads // self.parallel.size

    # --- pieces shared by both modes

    def text_kv(self, context: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per-layer cross-attention K/V [B, H, text_len, D] of a text context [B, Lt <= text_len, text_dim].

        As in Wan, the context is zero-padded to `text_len` and padded positions are attended (no mask)."""
        cfg = self.cfg
        if context.ndim != 3 or context.shape[-1] != cfg.text_dim or context.shape[1] > cfg.text_len:
            raise ValueError(
                f"text context must be [batch, <= {cfg.text_len}, {cfg.text_dim}], got {tuple(context.shape)}"
            )
        context = F.pad(context, (0, 0, 0, cfg.text_len - context.shape[1])).to(self.dtype)
        ctx = self.text_embedding(context)
        heads = self.cfg.num_heads
        kvs = [block.text_kv(ctx).unflatten(-1, (heads, -1)).transpose(2, 3) for block in self.blocks]
        return [(kv[0], kv[1]) for kv in kvs]  # [B, H, Lt, D] each

    def time_modulation(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """t [B, F] timesteps in [0, 1000] -> e [B, F, dim] and per-block modulation e0 [B, F, 6, dim], fp32."""
        w = self.time_embedding[0].weight
        e = self.time_embedding(sinusoidal_embedding(t.flatten(), self.cfg.freq_dim).to(w.dtype))
        e0 = self.time_projection(e).unflatten(-1, (6, self.cfg.dim))
        return e.float().unflatten(0, t.shape), e0.float().unflatten(0, t.shape)

    def rope(self, frame_pos: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
        """cos/sin [F*h*w, D/2] for tokens at absolute frame positions `frame_pos` [F] (a device tensor)."""
        t_dim, h_dim, _ = (d // 2 for d in self.cfg.rope_split)
        f = frame_pos.shape[0]
        if self._rope is None or self._rope[0].device != frame_pos.device:
            self._rope = tuple(table.to(frame_pos.device) for table in rope_table(self.cfg))
        out = []
        for table in self._rope:
            ft = table.index_select(0, frame_pos)[:, :t_dim]
            fh = table[:height, t_dim : t_dim + h_dim]
            fw = table[:width, t_dim + h_dim :]
            grid = torch.cat(
                [
                    ft[:, None, None].expand(f, height, width, -1),
                    fh[None, :, None].expand(f, height, width, -1),
                    fw[None, None, :].expand(f, height, width, -1),
                ],
                dim=-1,
            )
            out.append(grid.flatten(0, 2))
        return out[0], out[1]

    def _check_latents(self, x: Tensor, t: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        cfg = self.cfg
        _, ph, pw = cfg.patch_size
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"latents must be [batch, {cfg.in_channels}, frames, height, width], got {tuple(x.shape)}")
        if x.shape[3] % ph or x.shape[4] % pw:
            raise ValueError(f"latent height/width {tuple(x.shape[3:])} must be multiples of the patch {(ph, pw)}")
        b, f = x.shape[0], x.shape[2]
        if t.ndim == 1:
            t = t[:, None].expand(b, f)
        if t.shape != (b, f):
            raise ValueError(f"timesteps must be [batch] or [batch, frames] = [{b}, {f}], got {tuple(t.shape)}")
        return t, (f, x.shape[3] // ph, x.shape[4] // pw)

    def _run(
        self,
        x: Tensor,
        t: Tensor,
        grid: tuple[int, int, int],
        frame_pos: Tensor,
        text_kv: list[tuple[Tensor, Tensor]],
        attend: Callable[[int], AttendFn],
        kernels: str | None = None,
    ) -> Tensor:
        f, h, w = grid
        tokens = self.patch_embedding(x.to(self.dtype)).flatten(2).transpose(1, 2).float()  # [B, F*h*w, dim]
        e, e0 = self.time_modulation(t)
        rope = self.rope(frame_pos, h, w)  # cos/sin [F*h*w, D/2]
        every = int(self.checkpoint_blocks)
        par = self.parallel
        if par is not None:  # this rank's 1/N of each frame's tokens; attention sees all of them, H/N heads
            if torch.is_grad_enabled():
                raise ValueError("context parallel runs inference only: call the model under torch.no_grad()")
            par.check_tokens(h * w)
            tokens = par.shard(tokens, f)  # [B, F*h*w/N, dim]
            rope = tuple(par.shard(r, f, dim=0) for r in rope)  # [F*h*w/N, D/2]
            layer_attend = attend
            attend = lambda i: par.attend(layer_attend(i), f)  # noqa: E731
        for i, block in enumerate(self.blocks):
            if every and i % every == 0 and torch.is_grad_enabled():  # keep only block inputs; recompute in backward
                tokens = checkpoint(block, tokens, e0, rope, text_kv[i], attend(i), kernels, use_reentrant=False)
            else:
                tokens = block(tokens, e0, rope, text_kv[i], attend(i), kernels)
        out = self.head(tokens, e, kernels)  # [B, F*h*w(/N), C*ph*pw]
        if par is not None:
            out = par.gather_tokens(out, f)  # [B, F*h*w, C*ph*pw] on every rank
        return self._unpatchify(out.float(), grid)

    def _unpatchify(self, x: Tensor, grid: tuple[int, int, int]) -> Tensor:
        f, h, w = grid
        _, ph, pw = self.cfg.patch_size
        x = x.view(x.shape[0], f, h, w, ph, pw, self.cfg.out_channels)
        return x.permute(0, 6, 1, 2, 4, 3, 5).reshape(x.shape[0], -1, f, h * ph, w * pw)

    # --- whole sequence: teacher (bidirectional) or student training (block-causal)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor,
        *,
        frames_per_chunk: int | None = None,
        window: int | None = None,
        sink: int = 0,
    ) -> Tensor:
        """Predict the flow (noise - x0) for latents x [B, C, F, H, W] at timesteps t [B] or [B, F].

        frames_per_chunk=None is the bidirectional teacher. Otherwise frames attend block-causally by chunks, and
        with `window` to the first `sink` frames plus the last `window` frames, as the student does over its cache.
        """
        t, grid = self._check_latents(x, t)
        f, h, w = grid
        if f > self.cfg.rope_max_positions:
            raise ValueError(f"{f} latent frames exceed the RoPE table of {self.cfg.rope_max_positions} positions")
        mask = None
        if frames_per_chunk is not None:
            mask = block_causal_mask(f, h * w, frames_per_chunk, window=window, sink=sink, device=x.device)

        def attend(_: int) -> AttendFn:
            def fn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
                return out.transpose(1, 2)

            return fn

        frame_pos = torch.arange(f, device=x.device)
        return self._run(x, t, grid, frame_pos, self.text_kv(context), attend)

    # --- one chunk of the student over the KV cache

    def use_kernels(self, backend: str | None = "auto") -> WanModel:
        """Run forward_chunk's self-attention and adaLN through the fused kernels of `sfpp.engine.ops` ("auto",
        "triton", "cuda", "torch" for their references), or None for the plain torch path (the default). Inference
        only: under autograd forward_chunk keeps the torch path."""
        self.kernels = backend
        return self

    def _fused(self, cache, layer: int, plan, height: int, width: int) -> FusedAttend:
        return FusedAttend(self, cache, layer, plan, height, width, self.kernels)

    def forward_chunk(self, x: Tensor, t: Tensor, cache) -> Tensor:
        """Flow for one chunk x [B, C, Fc, H, W] at frame positions cache.chunk_start + [0, Fc).

        Writes this chunk's K/V into the ring (the same slots each time until `cache.advance`), then attends over
        sink + window. Uses the text K/V stored by `cache.set_text`. No host synchronisation."""
        t, grid = self._check_latents(x, t)
        f, h, w = grid
        self._check_cache_heads(cache)
        plan = cache.plan(x.shape[0], f, h * w)
        kernels = self.kernels if self.cfg.qk_norm and not torch.is_grad_enabled() else None
        if kernels is not None and self.parallel is None:
            fused = lambda i: self._fused(cache, i, plan, h, w)
            return self._run(x, t, grid, plan.frame_pos, cache.text_kv, fused, self.kernels)
        # Split over ranks, the fused cache write cannot run (its q/k RMSNorm spans all heads, a rank's attention
        # holds H/N): q/k are normed and roped per token in torch, written by `cache.write`, and the kernels run the
        # ring attention and adaLN.

        # Under autograd (training): the ring is read in place and the chunk's own K/V join with gradients, merged
        # by log-sum-exp; nothing is written (the no-grad context pass writes the final K/V), nothing copied.
        earlier = None  # [S*T] ring rows holding frames before this chunk
        if torch.is_grad_enabled():
            earlier = ((cache.slot_frame >= 0) & (cache.slot_frame < cache.chunk_start)).repeat_interleave(h * w)

        def attend(i: int) -> AttendFn:
            def fn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
                if earlier is not None and (k.requires_grad or v.requires_grad):
                    kv = cache.layer(i)
                    return cache_and_chunk_attention(q, kv.k, kv.v, earlier, k, v, h * w)
                kv = cache.write(i, plan, k, v)
                if kernels is not None:
                    return ops.ring_attention(
                        q, kv.k, kv.v, plan.valid_rows, plan.valid_rows_host, kv.k_scale, kv.v_scale, backend=kernels
                    )
                return ring_attention_ref(q, kv.k, kv.v, plan.valid_rows_host, kv.k_scale, kv.v_scale)

            return fn

        return self._run(x, t, grid, plan.frame_pos, cache.text_kv, attend, kernels)

    def _check_cache_heads(self, cache) -> None:
        if cache.heads != self.cache_heads:
            where = "one device" if self.parallel is None else f"a rank of {self.parallel.size}"
            raise ValueError(
                f"the ring cache holds {cache.heads} heads, and the model on {where} attends with {self.cache_heads}: "
                f"build it with RingKVCache(..., heads=model.cache_heads)"
            )

    @torch.no_grad()
    def forward_context(self, x: Tensor, t: Tensor, cache, frames: list[int], frames_per_chunk: int) -> None:
        """Write the K/V of known frames into the cache in one pass: latents x [B, C, F, H, W] of the absolute
        frames `frames` (ascending) at timesteps t [B, F], under the cache's text K/V.

        Frames attend block-causally, as if they had been generated chunk by chunk: chunks of `frames_per_chunk`
        counted back from the newest frame, each seeing itself and every frame before it, so the K/V equal those
        the chunk loop's context passes wrote for the same latents when no earlier frame has been evicted. Used for
        a prompt switch (the window's frames under the new prompt: LongLive's KV re-cache) and to start a stream
        from given frames. The torch path (a one-off per switch, not part of the chunk step)."""
        t, grid = self._check_latents(x, t)
        f, h, w = grid
        if f != len(frames) or any(a >= b for a, b in zip(frames, frames[1:], strict=False)):
            raise ValueError(f"frames must list the {f} frames of x in ascending order, got {frames}")
        tokens = h * w
        self._check_cache_heads(cache)
        if x.shape[0] != cache.batch_size or tokens != cache.frame_tokens:
            raise ValueError(f"latents {tuple(x.shape)} do not fit the cache (batch {cache.batch_size})")
        # Chunks as generated: counted back from the newest frame. A chunk's queries attend to the keys up to its
        # end, a prefix of the frames; ends as token counts.
        chunk = [(frames[-1] - frame) // frames_per_chunk for frame in frames]
        ends = [(i + 1) * tokens for i in range(f) if i + 1 == f or chunk[i + 1] != chunk[i]]
        end = frames[-1] + 1
        plan = cache.plan_frames(torch.tensor(frames, device=cache.chunk_start.device), torch.tensor(end), end)

        def attend(i: int) -> AttendFn:
            def fn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
                cache.write(i, plan, k, v)
                if cache.fp8:  # attend to the K/V as the cache holds them, as the chunk step would
                    k, v = (dequantize_fp8(*quantize_fp8(y), y.dtype) for y in (k, v))
                out, start = torch.empty_like(q), 0
                for end in ends:
                    y = F.scaled_dot_product_attention(
                        q[:, start:end].transpose(1, 2), k[:, :end].transpose(1, 2), v[:, :end].transpose(1, 2)
                    )
                    out[:, start:end] = y.transpose(1, 2)
                    start = end
                return out

            return fn

        self._run(x, t, grid, plan.frame_pos, cache.text_kv, attend)
