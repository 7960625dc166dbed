"""Sampling for training: the teacher's ODE (Euler + CFG), student rollouts through the ring cache with a window
that carries gradients, the DMD gradient, and the per-step Gaussian log-probabilities GRPO needs (eq. 7)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from sfpp.cache import RingKVCache
from sfpp.model import WanModel
from sfpp.sampler import FlowMatchSchedule, add_noise, context_pass, denoise_chunk, draw_noises, flow_to_x0, randn


def shifted_sigma(u: Tensor | float, shift: float) -> Tensor | float:
    return shift * u / (1 + (shift - 1) * u)


def cfg_flow(model: WanModel, x: Tensor, t: Tensor, ctx: Tensor, ctx_uncond: Tensor, guidance: float) -> Tensor:
    """Classifier-free guided flow of the bidirectional model, conditional and unconditional in one batch."""
    flow = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([ctx, ctx_uncond]))
    cond, uncond = flow.chunk(2)
    return uncond + guidance * (cond - uncond)


@torch.no_grad()
def teacher_ode(
    teacher: WanModel, noise: Tensor, ctx: Tensor, ctx_uncond: Tensor, *, guidance: float, steps: int, shift: float
) -> tuple[Tensor, Tensor]:
    """Euler integration of the teacher's flow from noise to x0 on the shifted grid sigma_k = shift(1 - k/steps).

    Returns x0 and the states at k = 0, steps/4, steps/2, 3 steps/4: with the same shift these are exactly the
    student's four timesteps (1000, 937.5, 833.3, 625 for shift 5), the inputs of the ODE regression (eq. 4)."""
    if steps % 4:
        raise ValueError(f"euler steps must be a multiple of 4, got {steps}")
    sigmas = [float(shifted_sigma(1 - k / steps, shift)) for k in range(steps + 1)]
    x, states = noise.float(), []
    for k in range(steps):
        if k % (steps // 4) == 0:
            states.append(x)
        t = torch.full((x.shape[0],), 1000 * sigmas[k], device=x.device)
        x = x + (sigmas[k + 1] - sigmas[k]) * cfg_flow(teacher, x, t, ctx, ctx_uncond, guidance)
    return x, torch.stack(states, 1)  # [B, C, F, h, w], [B, 4, C, F, h, w]


def student_rollout(
    model: WanModel,
    cache: RingKVCache,
    chunk_shape: tuple[int, ...],
    num_frames: int,
    schedule: FlowMatchSchedule,
    generator: torch.Generator,
    *,
    grad_from: int | None = None,
) -> Tensor:
    """Roll the student out over the ring cache exactly as at inference (`sampler.denoise_chunk`), from frame 0 to
    `num_frames`.

    Chunks starting at or after `grad_from` form the training window: each is denoised to a random exit step and
    the x0 predicted there carries gradients (Self-Forcing's one-step backprop); its earlier steps start from the
    student's own re-noised predictions, i.e. backward noise initialisation (eq. 1). Context passes never carry
    gradients. Returns the clean latents [B, C, F, h, w] of the window (of everything if grad_from is None)."""
    device = cache.k.device
    out = []
    for start in range(0, num_frames, chunk_shape[2]):
        noises = draw_noises(schedule, chunk_shape, generator, device)
        if grad_from is None or start < grad_from:
            with torch.no_grad():
                x0 = denoise_chunk(model.forward_chunk, cache, noises, schedule)
            if grad_from is None:
                out.append(x0)
        else:
            exit_step = int(torch.randint(len(schedule.sigmas), (1,), generator=generator))
            out.append(denoise_chunk(model.forward_chunk, cache, noises, schedule, exit_step=exit_step))
        cache.advance(chunk_shape[2])
    return torch.cat(out, dim=2)


def _t(x: Tensor, sigma: float) -> Tensor:
    return torch.full((x.shape[0], x.shape[2]), 1000 * sigma, device=x.device)


def sample_sigma(batch: int, generator: torch.Generator, lo: float, hi: float, shift: float) -> Tensor:
    u = lo + (hi - lo) * torch.rand(batch, generator=generator)
    return shifted_sigma(u, shift)


def noisy(x0: Tensor, sigma: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    noise = randn(x0.shape, generator, x0.device)
    s = sigma.to(x0.device).view(-1, *[1] * (x0.ndim - 1))
    return add_noise(x0, noise, s), noise


def dmd_loss(
    x0: Tensor,
    teacher: WanModel,
    critic: WanModel,
    ctx: Tensor,
    ctx_uncond: Tensor,
    sigma: Tensor,
    generator: torch.Generator,
    guidance: float,
) -> Tensor:
    """Distribution matching (eq. 3): move x0 along (real score - fake score), normalised per sample as in DMD."""
    x_t, _ = noisy(x0.detach(), sigma, generator)
    t = (1000 * sigma).to(x0.device)
    s = sigma.to(x0.device).view(-1, 1, 1, 1, 1)
    with torch.no_grad():
        real_x0 = flow_to_x0(x_t, cfg_flow(teacher, x_t, t, ctx, ctx_uncond, guidance), s)
        fake_x0 = flow_to_x0(x_t, critic(x_t, t, ctx), s)
        scale = (x0.detach() - real_x0).abs().mean(dim=(1, 2, 3, 4), keepdim=True).clamp_min(1e-6)
        grad = (fake_x0 - real_x0) / scale
    return 0.5 * F.mse_loss(x0.float(), (x0 - grad).detach().float())


def critic_loss(critic: WanModel, x0: Tensor, ctx: Tensor, sigma: Tensor, generator: torch.Generator) -> Tensor:
    """The fake score learns the student's distribution with the ordinary flow-matching loss."""
    x_t, noise = noisy(x0.detach(), sigma, generator)
    return F.mse_loss(critic(x_t, (1000 * sigma).to(x0.device), ctx), noise - x0.detach())


def gaussian_logp(sample: Tensor, mean: Tensor, sigma: float) -> Tensor:
    """log N(sample; mean, sigma^2), averaged over the latent dimensions (eq. 7 per dimension). [B, ...] -> [B]."""
    lp = -((sample - mean) ** 2) / (2 * sigma**2) - math.log(sigma) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)


@torch.no_grad()
def policy_rollout(
    model: WanModel,
    cache: RingKVCache,
    chunk_shape: tuple[int, ...],
    num_frames: int,
    schedule: FlowMatchSchedule,
    generator: torch.Generator,
) -> list[dict]:
    """A stochastic rollout for GRPO: per chunk, the state before every step, the re-noised action taken after each
    non-terminal step, their log-probabilities [B, T-1] under the rolling policy, the chunk's clean output and its
    context noise (so a replay writes the same context)."""
    record = []
    for _ in range(0, num_frames, chunk_shape[2]):
        noises = draw_noises(schedule, chunk_shape, generator, cache.k.device)
        steps: list[tuple[Tensor, Tensor]] = []
        x0 = denoise_chunk(model.forward_chunk, cache, noises, schedule, trace=steps)
        cache.advance(chunk_shape[2])
        sigmas_next = schedule.sigmas[1:]
        logp = [gaussian_logp(x_next, (1 - s) * x0_i, s) for (x0_i, x_next), s in zip(steps, sigmas_next, strict=True)]
        record.append(
            {
                "states": [noises[0]] + [x_next for _, x_next in steps],
                "logp": torch.stack(logp, 1),
                "x0": x0,
                "context_noise": noises[-1] if schedule.context_noise > 0 else None,
            }
        )
    return record


def replay_logp(model: WanModel, cache: RingKVCache, chunk: dict, schedule: FlowMatchSchedule) -> Tensor:
    """Log-probabilities [B, T-1] of a recorded chunk's actions under the current policy (with gradients); then
    writes the recorded clean chunk into the cache, so the next chunk is conditioned as in the rollout."""
    sigmas = schedule.sigmas
    logps = []
    for i in range(len(sigmas) - 1):
        x = chunk["states"][i]
        x0 = flow_to_x0(x, model.forward_chunk(x, _t(x, sigmas[i]), cache).float(), sigmas[i])
        logps.append(gaussian_logp(chunk["states"][i + 1], (1 - sigmas[i + 1]) * x0, sigmas[i + 1]))
    with torch.no_grad():
        context_pass(model.forward_chunk, cache, chunk["x0"], chunk["context_noise"], schedule)
    cache.advance(chunk["x0"].shape[2])
    return torch.stack(logps, 1)
