"""Fused sampler step with noise re-injection: x0 = x_t - sigma * v, x_next = (1 - sigma_next) * x0 + sigma_next * n.

The noise n is drawn in-kernel from a counter-based generator, so no noise tensor is written or read and a chunk
is reproducible from (seed, offset) alone, on any backend:
  element i of the flattened tensor (i + offset = g, offset a multiple of 4) takes lane g % 4 of
  Philox4x32-10(counter = (g // 4) as two 32-bit words, 0, 0; key = (seed lo, seed hi)); each 32-bit word w gives
  u = ((w >> 8) + 0.5) / 2^24 in (0, 1), and Box-Muller turns (u0, u1) into lanes 0, 1 and (u2, u3) into lanes 2, 3:
  sqrt(-2 ln u0) * (cos, sin)(2 pi u1). Standard normal, as torch.randn, though not its stream.
With `flow=None` it is the backward noise initialization of training: x_next = (1 - sigma_next) * x + sigma_next * n.
sigma and sigma_next are floats or per-frame tensors [B, F] for latents [B, C, F, H, W].
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from sfpp.ops import noise_step_ref, philox4x32_ref, philox_normal_ref

__all__ = ["noise_step", "noise_step_ref", "philox4x32_ref", "philox_normal_ref"]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _uniform(w):
    return ((w >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08  # 2^-24


@triton.jit
def _noise_step_kernel(
    X, Flow, Sigma, SigmaNext, X0, XNext,
    numel, seed, counter0, frame_size, frames, sample_size,
    sigma_val, sigma_next_val,
    HAS_FLOW: tl.constexpr, SIGMA_TENSOR: tl.constexpr, STORE_X0: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    start = tl.program_id(0).to(tl.int64) * BLOCK
    rows = tl.arange(0, BLOCK // 4)
    lane = tl.arange(0, 4)[None, :]
    idx = start + rows[:, None] * 4 + lane  # [BLOCK/4, 4]: row r holds the four lanes of one Philox counter
    mask = idx < numel

    w0, w1, w2, w3 = tl.randint4x(seed, counter0 + start // 4 + rows)
    r01 = tl.sqrt(-2.0 * tl.log(_uniform(w0)))
    r23 = tl.sqrt(-2.0 * tl.log(_uniform(w2)))
    t01 = 6.283185307179586 * _uniform(w1)
    t23 = 6.283185307179586 * _uniform(w3)
    n01 = tl.where(lane == 0, (r01 * tl.cos(t01))[:, None], (r01 * tl.sin(t01))[:, None])
    n23 = tl.where(lane == 2, (r23 * tl.cos(t23))[:, None], (r23 * tl.sin(t23))[:, None])
    noise = tl.where(lane < 2, n01, n23)

    if SIGMA_TENSOR:  # per (batch, frame) of [B, C, F, H, W]
        bf = (idx // sample_size) * frames + (idx // frame_size) % frames
        sigma = tl.load(Sigma + bf, mask=mask, other=0.0)
        sigma_next = tl.load(SigmaNext + bf, mask=mask, other=0.0)
    else:
        sigma = sigma_val
        sigma_next = sigma_next_val
    x0 = tl.load(X + idx, mask=mask, other=0.0).to(tl.float32)
    if HAS_FLOW:
        x0 = x0 - sigma * tl.load(Flow + idx, mask=mask, other=0.0).to(tl.float32)
    if STORE_X0:
        tl.store(X0 + idx, x0, mask=mask)
    tl.store(XNext + idx, (1 - sigma_next) * x0 + sigma_next * noise, mask=mask)


def noise_step(
    x: Tensor,
    flow: Tensor | None,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    seed: int,
    offset: int = 0,
    *,
    out: Tensor | None = None,
    store_x0: bool = True,
) -> tuple[Tensor | None, Tensor]:
    """Triton version of `noise_step_ref`. `out` receives x_next (fp32, may be x itself); with store_x0=False
    x0 is not written (returned as None), which saves a quarter of the traffic when only x_next is needed."""
    if offset % 4:
        raise ValueError(f"the noise offset must be a multiple of 4, got {offset}")
    if not x.is_contiguous() or (flow is not None and (flow.shape != x.shape or not flow.is_contiguous())):
        raise ValueError("x and flow must be contiguous tensors of one shape")
    tensor_sigma = isinstance(sigma_next, Tensor)
    batch, _, frames = x.shape[:3] if x.ndim >= 3 else (1, 1, 1)
    if tensor_sigma:
        if x.ndim != 5:
            raise ValueError("per-frame sigmas need latents [B, C, F, H, W]")
        sigma_t = (sigma if isinstance(sigma, Tensor) else torch.full_like(sigma_next, float(sigma))).float()
        sigma_t, sigma_n = (s.expand(batch, frames).contiguous() for s in (sigma_t, sigma_next.float()))
    elif isinstance(sigma, Tensor):
        raise ValueError("pass sigma and sigma_next both as floats, or sigma_next as a per-frame tensor")
    x0 = torch.empty(x.shape, dtype=torch.float32, device=x.device) if store_x0 else None
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device) if out is None else out
    frame_size = math.prod(x.shape[3:]) if x.ndim == 5 else 1
    block = 1024
    _noise_step_kernel[(triton.cdiv(x.numel(), block),)](
        x, x if flow is None else flow,
        sigma_t if tensor_sigma else x, sigma_n if tensor_sigma else x,
        out if x0 is None else x0, out,
        x.numel(), seed, offset // 4, frame_size, frames, frame_size * frames * (x.shape[1] if x.ndim == 5 else 1),
        0.0 if tensor_sigma else float(sigma), 0.0 if tensor_sigma else float(sigma_next),
        HAS_FLOW=flow is not None, SIGMA_TENSOR=tensor_sigma, STORE_X0=store_x0, BLOCK=block,
        num_warps=4,
    )  # fmt: skip
    return x0, out
