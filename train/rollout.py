"""Sampling for training: the teacher's ODE (Euler + CFG), student rollouts through the ring cache (every one through
`sampler.denoise_chunk`, the loop inference runs; the long no-grad context rollouts through inference's chunk
runner, `ChunkRunner`, on `RolloutModel`'s copy of the student), Self-Forcing++'s window with backward noise
initialisation and its gradient replay, the DMD gradient, and the per-step Gaussian log-probabilities GRPO needs
(eq. 7)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sfpp.engine.cache import RingKVCache
from sfpp.engine.graph import ChunkRunner
from sfpp.engine.sampler import (
    FlowMatchSchedule,
    StreamNoise,
    add_noise,
    context_pass,
    denoise_chunk,
    flow_to_x0,
    randn,
)
from sfpp.models.dit import WanModel


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


@torch.no_grad()
def student_rollout(
    model: WanModel,
    cache: RingKVCache,
    chunk_shape: tuple[int, ...],
    num_frames: int,
    schedule: FlowMatchSchedule,
    generator: torch.Generator,
    *,
    runner: ChunkRunner | None = None,
    noise: StreamNoise | None = None,
) -> Tensor:
    """Roll the student out over the ring cache exactly as at inference for `num_frames` more frames: chunk by chunk
    through the chunk runner inference uses (`runner`, bound to `cache`; one kept across rollouts replays its
    captured CUDA graphs; by default an eager one of `model`). `noise`: the stream's noise, when the rollout goes on
    with one (by default a new stream's, from `generator`). Returns the clean latents [B, C, F, h, w] (no
    gradients)."""
    if runner is None:
        runner = ChunkRunner(model, cache, schedule)
    if runner.cache is not cache:
        raise ValueError("the runner is bound to another cache")
    if runner.schedule != schedule:
        raise ValueError("the runner samples with another schedule")
    noise = noise or StreamNoise(generator, cache.k.device)
    out = []
    for _ in range(0, num_frames, chunk_shape[2]):
        out.append(runner(noise.chunk(schedule, chunk_shape)))
    return torch.cat(out, dim=2)


class RolloutModel:
    """The student as inference runs it, for the no-grad rollouts.

    A plain fp32 module on one process is its own rollout model (nothing changes: the exactness reference). Sharded
    (FSDP2), in bf16 or with LoRA, every chunk forward through the trained module would all-gather every block again
    (55 chunks x 5 passes per `extended` step); instead one copy of the full weights is gathered once after each
    optimizer step (`stale`, then the next `get`), LoRA merged in, in the compute dtype (the same bf16 values FSDP's
    policy casts to), copied in place so that captured CUDA graphs stay valid. `get(kernels=True)` runs it through the
    dispatch table's fused kernels (`device_defaults`: on CUDA); `kernels=False` through the torch path, which
    computes what the trained module computes, for rollouts whose values are replayed with gradients."""

    def __init__(self, trained: nn.Module, dtype: torch.dtype, device: torch.device, lora: tuple[int, float | None]):
        from sfpp.pipeline.settings import device_defaults
        from train.lora import has_lora

        self.trained, self.dtype, self.device, self.lora = trained, dtype, device, lora
        self.plain = not hasattr(trained, "reshard") and not has_lora(trained) and dtype == torch.float32
        kernels = device_defaults(device)["kernels"]
        self.kernels = None if kernels == "none" else kernels
        self.cuda_graph = bool(device_defaults(device)["cuda_graph"]) and not self.plain
        self.copy: WanModel | None = None
        self.fresh = False

    def stale(self) -> None:
        self.fresh = False

    def get(self, kernels: bool = True) -> WanModel:
        if self.plain:
            return self.trained
        if not self.fresh:
            self._refresh()
        return self.copy.use_kernels(self.kernels if kernels else None)

    @torch.no_grad()
    def _refresh(self) -> None:
        from torch.distributed.tensor import DTensor

        from train.lora import plain_state_dict

        # Every rank gathers every tensor in the same order (DTensor.full_tensor is a collective).
        sd = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in self.trained.state_dict().items()}
        sd = {k: v.detach() for k, v in sd.items()}
        sd = plain_state_dict(sd, self.trained, self.lora[1], self.lora[0])
        if self.copy is None:
            with torch.device("meta"):
                self.copy = WanModel(self.trained.cfg)
            self.copy.load_state_dict({k: v.to(self.device, self.dtype) for k, v in sd.items()}, assign=True)
            self.copy.eval().requires_grad_(False)
        else:
            for name, p in self.copy.state_dict().items():
                p.copy_(sd[name])
        self.fresh = True


@dataclass(frozen=True)
class WindowDraw:
    """The numbers that decide how many forward passes a training rollout makes. Every rank must draw the same
    ones (from the stage's shared generator), or FSDP's per-block collectives pair up wrongly and hang."""

    start: int  # first latent frame of the K-frame window in the rollout (chunk-aligned)
    noise_step: int  # backward noise initialisation: the window restarts at this denoising step (0: pure noise)
    exit_steps: tuple[int, ...]  # per window chunk: the step whose x0 carries gradients (>= noise_step)


@dataclass
class Window:
    """A window rolled out without gradients, with what its gradient replay needs."""

    x0: Tensor  # [B, C, K, h, w] the window's clean latents
    chunks: list[dict]  # per chunk: the exit step's input x and sigma, the chunk's x0, its context noise
    snapshot: dict[str, Tensor]  # the cache's buffers at the window start
    frames_done: int  # and its host frame count


def _snapshot(cache: RingKVCache) -> dict[str, Tensor]:
    return {name: buf.clone() for name, buf in cache.named_buffers() if name not in ("text_k", "text_v", "_tokens")}


def _restore(cache: RingKVCache, snapshot: dict[str, Tensor], frames_done: int) -> None:
    buffers = dict(cache.named_buffers())
    for name, saved in snapshot.items():
        buffers[name].copy_(saved)
    cache.frames_done = frames_done


@torch.no_grad()
def window_rollout(
    model: WanModel,
    cache: RingKVCache,
    chunk_shape: tuple[int, ...],
    draw: WindowDraw,
    schedule: FlowMatchSchedule,
    generator: torch.Generator,
    *,
    runner: ChunkRunner | None = None,
) -> Window:
    """Self-Forcing++'s training rollout (Algorithm 1, lines 2-5), without gradients.

    The student rolls out `draw.start` frames of context over the ring cache, as at inference. The window of
    len(draw.exit_steps) chunks after it is then generated by backward noise initialisation (section 3.2, eq. 1):
    the student first rolls the window out to clean frames x_{i,0} (its own long-horizon content), which are
    re-noised to the drawn step's sigma, x_{i,t} = (1 - sigma_t) x_{i,0} + sigma_t eps, and denoised again from that
    step down to the chunk's exit step over the same context. So the window keeps the rollout's content, and the
    teacher is asked to correct the student's own degraded states. noise_step 0 (sigma = 1) is pure noise: the
    fresh-noise start of Self-Forcing, which skips the first pass. `window_backward` replays the exit steps with
    gradients. The context and the first pass, whose values no gradient replays, run through `runner` (the fast
    path: `RolloutModel`); the window's passes through `model`, the module `window_backward` replays."""
    fpc, sigmas = chunk_shape[2], schedule.sigmas
    device = cache.k.device
    if not all(draw.noise_step <= e < len(sigmas) for e in draw.exit_steps):
        raise ValueError(f"exit steps {draw.exit_steps} must lie in [{draw.noise_step}, {len(sigmas)})")
    noise = StreamNoise(generator, device)  # one stream: the context, the clean window and its restart
    if draw.start:
        student_rollout(model, cache, chunk_shape, draw.start, schedule, generator, runner=runner, noise=noise)
    frames_done, snapshot = cache.frames_done, _snapshot(cache)
    s = draw.noise_step
    if s > 0:
        frames = fpc * len(draw.exit_steps)
        clean = student_rollout(model, cache, chunk_shape, frames, schedule, generator, runner=runner, noise=noise)
        _restore(cache, snapshot, frames_done)
    # Steps s, s+1, ..., last. Its noises are drawn by the full schedule below (correlated where it says).
    restart = replace(schedule, denoising_steps=schedule.denoising_steps[s:], frame_correlation=0.0)
    chunks, out = [], []
    for c, exit_step in enumerate(draw.exit_steps):
        noises = noise.chunk(schedule, chunk_shape)  # [num_noises, B, C, Fc, h, w]
        if s > 0:
            x_s = add_noise(clean[:, :, c * fpc : (c + 1) * fpc], noises[s], sigmas[s])  # eq. 1
            noises = torch.cat([x_s[None], noises[s + 1 :]])
        trace: list[tuple[Tensor, Tensor]] = []
        x0 = denoise_chunk(model.forward_chunk, cache, noises, restart, exit_step=exit_step - s, trace=trace)
        cache.advance(fpc)
        context_noise = noises[len(restart.sigmas)] if schedule.context_noise > 0 else None
        x_exit = trace[-1][1] if trace else noises[0]
        chunks.append({"x": x_exit, "sigma": sigmas[exit_step], "x0": x0, "context_noise": context_noise})
        out.append(x0)
    return Window(torch.cat(out, dim=2), chunks, snapshot, frames_done)


def window_backward(
    model: nn.Module, cache: RingKVCache, window: Window, grad_x0: Tensor, schedule: FlowMatchSchedule
) -> Tensor:
    """Backpropagate dL/dx0 of the window [B, C, K, h, w] into the student, one chunk at a time.

    From the cache at the window start, each chunk's exit step is run again with gradients over the same context
    (`WanModel.forward_chunk` reads the ring in place and adds the chunk's own K/V with gradients), backpropagated at
    once, and only then is the chunk's context pass written: the ring never holds a graph, and the autograd memory
    is one chunk forward's, however long the window. Costs one more forward per chunk than keeping every chunk's
    graph alive until the end, which would have to keep the ring as every chunk saw it (at 1.3B in bf16: 6 GB a
    chunk, 42 GB for a 21-frame window) besides every chunk's activations."""
    fpc = window.chunks[0]["x0"].shape[2]
    _restore(cache, window.snapshot, window.frames_done)
    replayed = []
    for c, chunk in enumerate(window.chunks):
        _gradient_sync(model, c == len(window.chunks) - 1)
        x, sigma = chunk["x"], chunk["sigma"]
        x0 = flow_to_x0(x, model.forward_chunk(x, _t(x, sigma), cache).float(), sigma)
        x0.backward(grad_x0[:, :, c * fpc : (c + 1) * fpc])
        replayed.append(x0.detach())
        with torch.no_grad():
            context_pass(model.forward_chunk, cache, chunk["x0"], chunk["context_noise"], schedule)
        cache.advance(fpc)
    return torch.cat(replayed, dim=2)  # the window as replayed: equals window.x0 up to rounding


def _gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Under FSDP2, reduce-scatter gradients only on the last of several backward calls of one step."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)


def _t(x: Tensor, sigma: float) -> Tensor:  # [B, Fc] timesteps
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
    """log N(sample; mean, sigma^2 I) of each sample, summed over its latent dimensions as eq. 7 writes it:
    [B, ...] -> [B]. (A mean over dimensions would divide every log-ratio by D ~ 10^5 at Wan size, keeping the
    policy ratio within 1 +- eps and the clipping of eq. 5 inert.)"""
    lp = -((sample - mean) ** 2) / (2 * sigma**2) - math.log(sigma) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).sum(1)


def renoise_distribution(schedule: FlowMatchSchedule, step: int, x0: Tensor, shared: Tensor | None):
    """Mean and std of the state entering `step` (>= 1) given the previous step's x0: (1 - sigma) x0 + sigma noise.
    Where the schedule correlates the step's noise across frames, the stream's shared draw (fixed for the whole
    rollout, part of the state) moves the mean and only each frame's own part is random."""
    sigma = schedule.sigmas[step]
    if step not in schedule.correlated_steps:
        return (1 - sigma) * x0, sigma
    rho = schedule.frame_correlation
    return (1 - sigma) * x0 + sigma * math.sqrt(rho) * shared, sigma * math.sqrt(1 - rho)


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
    non-terminal step, their log-probabilities [B, T-1] under the rolling policy, the chunk's clean output, its
    context noise (so a replay writes the same context) and the stream's shared noise (None when independent)."""
    record, noise = [], StreamNoise(generator, cache.k.device)
    for _ in range(0, num_frames, chunk_shape[2]):
        noises = noise.chunk(schedule, chunk_shape)
        steps: list[tuple[Tensor, Tensor]] = []
        x0 = denoise_chunk(model.forward_chunk, cache, noises, schedule, trace=steps)
        cache.advance(chunk_shape[2])
        logp = [
            gaussian_logp(x_next, *renoise_distribution(schedule, i + 1, x0_i, noise.shared))
            for i, (x0_i, x_next) in enumerate(steps)
        ]
        record.append(
            {
                "states": [noises[0]] + [x_next for _, x_next in steps],
                "logp": torch.stack(logp, 1),
                "x0": x0,
                "context_noise": noises[-1] if schedule.context_noise > 0 else None,
                "shared": noise.shared,
            }
        )
    return record


def replay_logp(model: WanModel, cache: RingKVCache, chunk: dict, schedule: FlowMatchSchedule) -> Tensor:
    """Log-probabilities [B, T-1] of a recorded chunk's actions under the current policy (with gradients). Call
    backward on them before `replay_context` writes the chunk into the cache."""
    sigmas = schedule.sigmas
    logps = []
    for i in range(len(sigmas) - 1):
        x = chunk["states"][i]
        x0 = flow_to_x0(x, model.forward_chunk(x, _t(x, sigmas[i]), cache).float(), sigmas[i])
        dist = renoise_distribution(schedule, i + 1, x0, chunk["shared"])
        logps.append(gaussian_logp(chunk["states"][i + 1], *dist))
    return torch.stack(logps, 1)


@torch.no_grad()
def replay_context(model: WanModel, cache: RingKVCache, chunk: dict, schedule: FlowMatchSchedule) -> None:
    """Write the recorded clean chunk into the cache and move past it, so the next chunk is conditioned as in the
    rollout."""
    context_pass(model.forward_chunk, cache, chunk["x0"], chunk["context_noise"], schedule)
    cache.advance(chunk["x0"].shape[2])
