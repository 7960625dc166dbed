"""Few-step flow-matching sampler of the causal student, as Wan and Self-Forcing define it.

Noise level sigma in [0, 1] and timestep t = 1000 * sigma. Training timesteps are warped by the shift:
sigma(s) = shift * s / (1 + (shift - 1) * s) for s = step / 1000, so the steps [1000, 750, 500, 250] run at
t = [1000, 937.5, 833.3, 625]. The model predicts the flow v = noise - x0, hence x0 = x_t - sigma * v, and the
next step starts from x0 re-noised to the next sigma: x = (1 - sigma) * x0 + sigma * noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class FlowMatchSchedule:
    denoising_steps: tuple[int, ...] = (1000, 750, 500, 250)
    shift: float = 5.0
    num_train_timesteps: int = 1000
    context_noise: float = 0.0  # timestep at which the clean chunk is written into the cache (0: clean)

    def __post_init__(self) -> None:
        steps = self.denoising_steps
        if not steps or any(not 0 < s <= self.num_train_timesteps for s in steps):
            raise ValueError(f"denoising_steps must be in (0, {self.num_train_timesteps}], got {steps}")
        if any(a <= b for a, b in zip(steps, steps[1:], strict=False)):
            raise ValueError(f"denoising_steps must be strictly decreasing, got {steps}")
        if self.shift <= 0:
            raise ValueError(f"shift must be positive, got {self.shift}")
        if not 0 <= self.context_noise < self.num_train_timesteps:
            raise ValueError(f"context_noise must be in [0, {self.num_train_timesteps}), got {self.context_noise}")

    def sigma(self, step: float) -> float:
        s = step / self.num_train_timesteps
        return self.shift * s / (1 + (self.shift - 1) * s)

    @property
    def sigmas(self) -> list[float]:
        return [self.sigma(s) for s in self.denoising_steps]

    @property
    def timesteps(self) -> list[float]:
        return [self.num_train_timesteps * s for s in self.sigmas]


def flow_to_x0(x_t: Tensor, flow: Tensor, sigma: float | Tensor) -> Tensor:
    return x_t - sigma * flow


def add_noise(x0: Tensor, noise: Tensor, sigma: float | Tensor) -> Tensor:
    return (1 - sigma) * x0 + sigma * noise


def randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Gaussian noise drawn on the generator's device (so a CPU seed gives the same video on any device)."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


@torch.no_grad()
def denoise_chunk(
    model, cache, noise: Tensor, schedule: FlowMatchSchedule, generator: torch.Generator | None = None
) -> Tensor:
    """Generate one chunk: the denoising steps over the cache, then the context pass that writes the result into
    the cache at `schedule.context_noise`, then advance the cache. noise [B, C, Fc, H, W] -> x0 (fp32)."""
    batch, frames = noise.shape[0], noise.shape[2]
    cache.make_room(frames)  # past the RoPE table: re-base positions (host decision, before any device work)
    sigmas = schedule.sigmas
    x = noise.float()
    for i, sigma in enumerate(sigmas):
        t = torch.full((batch, frames), schedule.num_train_timesteps * sigma, device=x.device)
        x0 = flow_to_x0(x, model.forward_chunk(x, t, cache).float(), sigma)
        if i + 1 < len(sigmas):
            x = add_noise(x0, randn(x0.shape, generator, x0.device), sigmas[i + 1])
    ctx_sigma = schedule.context_noise / schedule.num_train_timesteps
    ctx = add_noise(x0, randn(x0.shape, generator, x0.device), ctx_sigma) if ctx_sigma > 0 else x0
    model.forward_chunk(ctx, torch.full((batch, frames), schedule.context_noise, device=x.device), cache)
    cache.advance(frames)
    return x0
