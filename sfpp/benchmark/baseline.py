"""The baseline: Self-Forcing's published causal inference path, rebuilt on our weights for a same-run comparison.

What Self-Forcing's `CausalInferencePipeline` + `CausalWanModel` do per chunk, and so what this does:
- five forward passes: one per denoising step, then the context pass that writes the clean chunk into the cache;
- a KV cache per layer (`k`, `v` of `window` frames, `global_end_index`, `local_end_index`) that, once full, rolls
  by copying the kept tokens to the front (`k[:, :kept] = k[:, evicted:evicted + kept].clone()`), with the indices
  read back to the host (`.item()`) at every layer of every pass;
- RoPE applied per sample in float64 complex arithmetic, frequencies rebuilt for each call;
- the text embedding recomputed every pass (the cross-attention K/V are cached after the first);
- plain `scaled_dot_product_attention` over the cache slice (Self-Forcing calls FlashAttention; SDPA is the plain
  PyTorch path the issue asks for), and x0 = x_t - sigma * flow in float64.
Everything else (norms, modulation, FFN, head) is the same math as `sfpp.models.dit`, on the same modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sfpp.engine.sampler import FlowMatchSchedule, add_noise
from sfpp.models.dit import WanModel, _gate, _modulate, sinusoidal_embedding


def rope_params(max_len: int, dim: int, theta: float = 10000.0) -> Tensor:
    """Wan's complex128 RoPE table [max_len, dim/2]."""
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return torch.polar(torch.ones(max_len, dim // 2, dtype=torch.float64), torch.outer(torch.arange(max_len), freqs))


class SelfForcingBaseline:
    def __init__(
        self,
        model: WanModel,
        schedule: FlowMatchSchedule,
        *,
        batch_size: int,
        frame_tokens: int,
        window: int = 21,
        sink: int = 0,
    ) -> None:
        cfg = model.cfg
        self.model, self.schedule, self.cfg = model, schedule, cfg
        self.frame_tokens, self.sink_tokens = frame_tokens, sink * frame_tokens
        device, dtype = model.head.head.weight.device, model.dtype
        size = (sink + window) * frame_tokens
        self.max_attention_size = size
        shape = (batch_size, size, cfg.num_heads, cfg.head_dim)
        self.kv_cache = [
            {
                "k": torch.zeros(shape, dtype=dtype, device=device),
                "v": torch.zeros(shape, dtype=dtype, device=device),
                "global_end_index": torch.tensor([0], dtype=torch.long, device=device),
                "local_end_index": torch.tensor([0], dtype=torch.long, device=device),
            }
            for _ in range(cfg.num_layers)
        ]
        self.crossattn_cache = [{"is_init": False} for _ in range(cfg.num_layers)]
        d = cfg.head_dim
        self.freqs = torch.cat(
            [rope_params(1024, d - 4 * (d // 6)), rope_params(1024, 2 * (d // 6)), rope_params(1024, 2 * (d // 6))],
            dim=1,
        ).to(device)
        self.context: Tensor | None = None
        self.current_start_frame = 0

    @property
    def nbytes(self) -> int:
        return sum(c[k].numel() * c[k].element_size() for c in self.kv_cache for k in ("k", "v"))

    def set_text(self, context: Tensor) -> None:
        """The prompt embedding [B, Lt, text_dim]; its cross-attention K/V are built on the first pass."""
        self.context = context
        for c in self.crossattn_cache:
            c["is_init"] = False

    # --- the model's forward, Self-Forcing style

    def _rope(self, x: Tensor, grid: tuple[int, int, int], start_frame: int) -> Tensor:
        n, c = x.size(2), x.size(3) // 2
        freqs = self.freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
        f, h, w = grid
        seq_len = f * h * w
        out = []
        for i in range(x.size(0)):  # per sample, as Self-Forcing's causal_rope_apply
            x_i = torch.view_as_complex(x[i, :seq_len].to(torch.float64).reshape(seq_len, n, -1, 2))
            freqs_i = torch.cat(
                [
                    freqs[0][start_frame : start_frame + f].view(f, 1, 1, -1).expand(f, h, w, -1),
                    freqs[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
                    freqs[2][:w].view(1, 1, w, -1).expand(f, h, w, -1),
                ],
                dim=-1,
            ).reshape(seq_len, 1, -1)
            out.append(torch.view_as_real(x_i * freqs_i).flatten(2))
        return torch.stack(out).type_as(x)

    def _self_attn(self, i: int, block, h: Tensor, grid, current_start: int) -> Tensor:
        attn, cache = block.self_attn, self.kv_cache[i]
        q = attn.query(h)
        k, v = attn.key_value(h)
        start_frame = current_start // self.frame_tokens
        roped_q = self._rope(q, grid, start_frame).type_as(v)
        roped_k = self._rope(k, grid, start_frame).type_as(v)
        current_end = current_start + roped_q.shape[1]
        new, size = roped_q.shape[1], cache["k"].shape[1]
        global_end, local_end = cache["global_end_index"].item(), cache["local_end_index"].item()  # host syncs
        if current_end > global_end and new + local_end > size:  # roll: copy the kept tokens to the front
            evicted = new + local_end - size
            kept = local_end - evicted - self.sink_tokens
            s = self.sink_tokens
            cache["k"][:, s : s + kept] = cache["k"][:, s + evicted : s + evicted + kept].clone()
            cache["v"][:, s : s + kept] = cache["v"][:, s + evicted : s + evicted + kept].clone()
            local_end = local_end + current_end - global_end - evicted
        else:
            local_end = local_end + current_end - global_end
        cache["k"][:, local_end - new : local_end] = roped_k
        cache["v"][:, local_end - new : local_end] = v
        lo = max(0, local_end - self.max_attention_size)
        y = F.scaled_dot_product_attention(
            roped_q.transpose(1, 2),
            cache["k"][:, lo:local_end].transpose(1, 2),
            cache["v"][:, lo:local_end].transpose(1, 2),
        ).transpose(1, 2)
        cache["global_end_index"].fill_(current_end)
        cache["local_end_index"].fill_(local_end)
        return attn.o(y.flatten(2))

    def _cross_attn(self, i: int, block, x: Tensor, context: Tensor) -> Tensor:
        attn, cache = block.cross_attn, self.crossattn_cache[i]
        q = attn.query(x)
        if not cache["is_init"]:
            cache["k"], cache["v"] = attn.key_value(context)
            cache["is_init"] = True
        y = F.scaled_dot_product_attention(q.transpose(1, 2), cache["k"].transpose(1, 2), cache["v"].transpose(1, 2))
        return attn.o(y.transpose(1, 2).flatten(2))

    def forward(self, x: Tensor, t: Tensor, current_start: int) -> Tensor:
        """Flow for x [B, C, F, H, W] at timesteps t [B, F], the chunk starting at token `current_start`."""
        model, cfg = self.model, self.cfg
        dtype = model.dtype
        tokens = torch.cat([model.patch_embedding(u.unsqueeze(0).to(dtype)) for u in x])  # per sample
        grid = tuple(tokens.shape[2:])
        tokens = tokens.flatten(2).transpose(1, 2).float()
        e = model.time_embedding(sinusoidal_embedding(t.flatten(), cfg.freq_dim).to(dtype))
        e0 = model.time_projection(e).unflatten(-1, (6, cfg.dim)).float().unflatten(0, t.shape)
        e = e.float().unflatten(0, t.shape)
        padded = torch.stack([torch.cat([u, u.new_zeros(cfg.text_len - u.size(0), u.size(1))]) for u in self.context])
        context = model.text_embedding(padded.to(dtype))  # every pass, as Self-Forcing does
        for i, block in enumerate(model.blocks):
            s1, c1, g1, s2, c2, g2 = (block.modulation.float().unsqueeze(1) + e0).chunk(6, dim=2)
            h = _modulate(block.norm1(tokens), s1, c1).to(dtype)
            tokens = tokens + _gate(self._self_attn(i, block, h, grid, current_start), g1)
            tokens = tokens + self._cross_attn(i, block, block.norm3(tokens).to(dtype), context).float()
            tokens = tokens + _gate(block.ffn(_modulate(block.norm2(tokens), s2, c2).to(dtype)), g2)
        return model._unpatchify(model.head(tokens, e).float(), grid)

    # --- the inference loop of one chunk

    @torch.no_grad()
    def __call__(self, noises: Tensor) -> Tensor:
        """noises [N, B, C, Fc, H, W] (as `ChunkRunner.draw_noise`) -> x0 [B, C, Fc, H, W] fp32."""
        schedule, sigmas = self.schedule, self.schedule.sigmas
        batch, frames = noises.shape[1], noises.shape[3]
        current_start = self.current_start_frame * self.frame_tokens
        x = noises[0].float()
        for i, sigma in enumerate(sigmas):
            t = torch.full((batch, frames), schedule.timesteps[i], device=x.device)
            flow = self.forward(x, t, current_start)
            x0 = (x.double() - sigma * flow.double()).float()  # the wrapper's float64 flow -> x0
            if i + 1 < len(sigmas):
                x = add_noise(x0, noises[i + 1], sigmas[i + 1])
        ctx_sigma = schedule.context_noise / schedule.num_train_timesteps
        ctx = add_noise(x0, noises[len(sigmas)], ctx_sigma) if ctx_sigma > 0 else x0
        self.forward(ctx, torch.full((batch, frames), schedule.context_noise, device=x.device), current_start)
        self.current_start_frame += frames
        return x0
