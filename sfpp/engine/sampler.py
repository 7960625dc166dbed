"""Few-step flow-matching sampler of the causal student, as Wan and Self-Forcing define it.

Noise level sigma in [0, 1] and timestep t = 1000 * sigma. Training timesteps are warped by the shift:
sigma(s) = shift * s / (1 + (shift - 1) * s) for s = step / 1000, so the steps [1000, 750, 500, 250] run at
t = [1000, 937.5, 833.3, 625]. The model predicts the flow v = noise - x0, hence x0 = x_t - sigma * v, and the
next step starts from x0 re-noised to the next sigma: x = (1 - sigma) * x0 + sigma * noise.

Unwarped steps (`warp=False`, CausVid's `warp_denoising_step: false`) are timesteps already: the model sees t = step,
and sigma is the entry of the shifted 1000-step table that Wan's scheduler looks up nearest to t (CausVid's steps
[1000, 757, 522] at shift 8 give sigma 1.0, 0.7570, 0.5221).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor


@dataclass(frozen=True)
class FlowMatchSchedule:
    denoising_steps: tuple[int, ...] = (1000, 750, 500, 250)
    shift: float = 5.0
    num_train_timesteps: int = 1000
    context_noise: float = 0.0  # timestep at which the clean chunk is written into the cache (0: clean)
    warp: bool = True  # steps warped by the shift (Self-Forcing), or timesteps as given (CausVid)
    # Noise shared by the frames: from denoising step `correlated_from` on, each frame's noise is sqrt(rho) x one draw
    # held for the whole stream + sqrt(1 - rho) x its own (`StreamNoise`). Independent per-frame noise in the last
    # steps is where a few-step sampler makes flicker (train/results/toy/teacher_study.md). 0: independent (Wan).
    frame_correlation: float = 0.0
    correlated_from: int = 3

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
        if not 0 <= self.frame_correlation < 1:
            raise ValueError(f"frame_correlation must be in [0, 1), got {self.frame_correlation}")
        if self.frame_correlation > 0 and not 0 <= self.correlated_from < len(steps):
            raise ValueError(f"correlated_from must be a step in [0, {len(steps)}), got {self.correlated_from}")

    @property
    def correlated_steps(self) -> range:
        """The denoising steps whose noise shares the stream's draw (none when the noise is independent)."""
        if self.frame_correlation == 0:
            return range(0)
        return range(self.correlated_from, len(self.denoising_steps))

    def sigma(self, step: float) -> float:
        s = step / self.num_train_timesteps
        return self.shift * s / (1 + (self.shift - 1) * s)

    @cached_property  # the unwarped table is 1000 entries: built once per schedule, not once per chunk
    def sigmas(self) -> list[float]:
        if self.warp:
            return [self.sigma(s) for s in self.denoising_steps]
        n = self.num_train_timesteps  # the table: sigma(1 - i / n) for i in 0..n-1, as timesteps n * sigma
        table = [self.sigma(n - i) for i in range(n)]
        return [min(table, key=lambda sigma: abs(n * sigma - step)) for step in self.denoising_steps]

    @cached_property
    def timesteps(self) -> list[float]:
        """What the model is given at each step."""
        if self.warp:
            return [self.num_train_timesteps * s for s in self.sigmas]
        return [float(step) for step in self.denoising_steps]


def flow_to_x0(x_t: Tensor, flow: Tensor, sigma: float | Tensor) -> Tensor:
    return x_t - sigma * flow


def add_noise(x0: Tensor, noise: Tensor, sigma: float | Tensor) -> Tensor:
    return (1 - sigma) * x0 + sigma * noise


def randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Gaussian noise drawn on the generator's device (so a CPU seed gives the same video on any device)."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """An NVTX range on CUDA builds (visible in Nsight Systems); nothing otherwise or while compiling."""
    if torch.cuda.is_available() and not torch.compiler.is_compiling():
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()
    else:
        yield


# --------------------------------------------------------------------------------------------- the chunk loop
# One implementation for inference (eager, compiled, CUDA graph) and every training rollout.

# forward(x [B, C, Fc, h, w], t [B, Fc], cache) -> flow: the student's chunk forward (`WanModel.forward_chunk`, or
# a compiled version of it).
ChunkForward = Callable[[Tensor, Tensor, object], Tensor]


def num_noises(schedule: FlowMatchSchedule) -> int:
    """Noise tensors a chunk uses: the initial noise, one per re-noising, one for a noisy context pass."""
    return len(schedule.denoising_steps) + (1 if schedule.context_noise > 0 else 0)


def draw_noises(
    schedule: FlowMatchSchedule,
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device,
    shared: Tensor | None = None,
) -> Tensor:
    """[num_noises, *shape] fp32 on `device`: all of a chunk's noise, in `denoise_chunk`'s order. A frame-correlated
    schedule mixes in `shared` [B, C, 1, h, w], the stream's draw (`StreamNoise` holds it)."""
    noises = torch.stack([randn(shape, generator, device) for _ in range(num_noises(schedule))])
    steps = schedule.correlated_steps
    if not steps:
        return noises
    if shared is None:
        raise ValueError("a frame-correlated schedule needs the stream's shared draw: draw through StreamNoise")
    rho, part = schedule.frame_correlation, slice(steps.start, steps.stop)  # never the context pass's noise
    noises[part] = math.sqrt(rho) * shared + math.sqrt(1 - rho) * noises[part]
    return noises


class StreamNoise:
    """One stream's noise, chunk by chunk, in `denoise_chunk`'s order (`draw_noises`). A frame-correlated schedule's
    shared draw is made once, before the first chunk's noise, and held for the whole stream, so that frames keep
    it across chunk seams too; independent noise draws exactly what `draw_noises` draws."""

    def __init__(self, generator: torch.Generator | None, device: torch.device) -> None:
        self.generator, self.device = generator, device
        self.shared: Tensor | None = None  # [B, C, 1, h, w]

    def chunk(self, schedule: FlowMatchSchedule, shape: tuple[int, ...]) -> Tensor:
        """[num_noises, *shape]: the next chunk's noise."""
        if schedule.correlated_steps and self.shared is None:
            batch, channels, _, h, w = shape
            self.shared = randn((batch, channels, 1, h, w), self.generator, self.device)
        return draw_noises(schedule, shape, self.generator, self.device, self.shared)


class SelfForcingNoise:
    """A video's noise drawn in the order of Self-Forcing's inference (guandeh17/Self-Forcing,
    `pipeline/causal_inference.py`), so that one generator state gives its video: every latent frame's initial noise
    at once as [B, F, C, h, w], then, chunk by chunk, one draw per re-noising step of the prediction flattened to
    [B * Fc, C, h, w] (its `randn_like(denoised_pred.flatten(0, 1))`); its context pass draws nothing. Values are
    drawn in fp32 on the generator's device: matching its bf16 noise bit for bit also needs its dtype."""

    def __init__(self, generator: torch.Generator | None, shape: tuple[int, ...], device: torch.device) -> None:
        batch, channels, frames, h, w = shape  # the whole video's latents
        self.generator, self.device, self.start = generator, device, 0
        self.initial = randn((batch, frames, channels, h, w), generator, device)

    def chunk(self, schedule: FlowMatchSchedule, shape: tuple[int, ...]) -> Tensor:
        """[num_noises, *shape]: the next chunk's noise, as `draw_noises` lays it out for `denoise_chunk`."""
        if schedule.context_noise > 0:
            raise ValueError("Self-Forcing's noise order has no draw for a noisy context pass: use context_noise 0")
        if schedule.frame_correlation > 0:
            raise ValueError("Self-Forcing's noise order draws every frame's noise on its own: use frame_correlation 0")
        batch, channels, frames, h, w = shape
        if self.start + frames > self.initial.shape[1]:
            raise ValueError(f"the video's noise holds {self.initial.shape[1]} latent frames; this chunk ends past it")
        initial = self.initial[:, self.start : self.start + frames].permute(0, 2, 1, 3, 4)
        self.start += frames
        renoise = [
            randn((batch * frames, channels, h, w), self.generator, self.device).unflatten(0, (batch, frames))
            for _ in schedule.denoising_steps[1:]
        ]
        return torch.stack([initial, *(r.permute(0, 2, 1, 3, 4) for r in renoise)])


NOISE_ORDERS = ("sfpp", "self-forcing")  # sfpp: each chunk's noise drawn as the chunk starts (`draw_noises`)


def _timesteps(x: Tensor, t: float) -> Tensor:
    return torch.full((x.shape[0], x.shape[2]), t, device=x.device)


def context_pass(forward: ChunkForward, cache, x0: Tensor, noise: Tensor | None, schedule: FlowMatchSchedule) -> None:
    """Write the finished chunk x0 into the cache, re-noised to `schedule.context_noise` (noise: None when 0)."""
    sigma = schedule.context_noise / schedule.num_train_timesteps
    x = add_noise(x0, noise, sigma) if sigma > 0 else x0
    forward(x, _timesteps(x, schedule.context_noise), cache)


def denoise_chunk(
    forward: ChunkForward,
    cache,
    noises: Tensor,
    schedule: FlowMatchSchedule,
    *,
    exit_step: int | None = None,
    trace: list[tuple[Tensor, Tensor]] | None = None,
) -> Tensor:
    """One chunk over the cache: the denoising steps, then the context pass. noises [num_noises, B, C, Fc, h, w]
    (`draw_noises`) -> x0 [B, C, Fc, h, w] fp32. The caller advances the cache (`cache.advance(Fc)`).

    Training: `exit_step` stops after that step (Self-Forcing's random exit, Self-Forcing++'s last); only the exit
    step is run with gradients (when they are enabled), the earlier steps and the context pass without, so the
    returned x0 carries gradients through one forward. `trace` (GRPO) receives (x0, x_next) of every step that
    re-noises. No host syncs: this is what a CUDA graph captures."""
    sigmas, timesteps = schedule.sigmas, schedule.timesteps
    last = len(sigmas) - 1 if exit_step is None else exit_step
    if not 0 <= last < len(sigmas):
        raise ValueError(f"exit_step must be in [0, {len(sigmas)}), got {exit_step}")
    grad = torch.is_grad_enabled()
    x = noises[0].float()
    for i in range(last + 1):
        with nvtx_range(f"denoise step {i}"), torch.set_grad_enabled(grad and i == last):
            x0 = flow_to_x0(x, forward(x, _timesteps(x, timesteps[i]), cache).float(), sigmas[i])
            if i < last:
                x_next = add_noise(x0, noises[i + 1], sigmas[i + 1])
                if trace is not None:
                    trace.append((x0, x_next))
                x = x_next
    with nvtx_range("context pass"), torch.no_grad():
        context_noise = noises[len(sigmas)] if schedule.context_noise > 0 else None
        context_pass(forward, cache, x0.detach(), context_noise, schedule)
    return x0
