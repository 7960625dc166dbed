"""One chunk of the student as a fixed piece of device work: eager, `torch.compile`d, or replayed from a CUDA graph.

A chunk is the denoising steps plus the context pass over the ring KV cache. Its shapes never change and the cache
keeps positions on the device, so the whole chunk is captured once and replayed for every later chunk (and every
later video of the same shape): one launch instead of thousands. The noise a chunk needs is drawn on the host
generator beforehand, in the order `sampler.denoise_chunk` draws it, and copied into a static buffer: a seed gives
the same video in every mode. Without CUDA the same `_chunk` runs eagerly. NVTX ranges name each stage for Nsight.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from sfpp.sampler import FlowMatchSchedule, add_noise, flow_to_x0, randn


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


class ChunkRunner:
    """Runs chunks of one video shape for a model and its ring cache.

    runner = ChunkRunner(model, cache, schedule, cuda_graph=True)
    x0 = runner(runner.draw_noise(shape, generator))   # [B, C, Fc, h, w] fp32; the cache has advanced

    `cuda_graph`: capture on the first chunk (which runs eagerly as the warm-up), replay from the second. Ignored
    without CUDA. `compile`: `torch.compile` the model's chunk forward (`compile_options` go to torch.compile); one
    compiled forward serves all the passes of a chunk. With `cuda_graph` as well, the graph captures its kernels.
    """

    def __init__(
        self,
        model,
        cache,
        schedule: FlowMatchSchedule,
        *,
        cuda_graph: bool = False,
        compile: bool = False,
        compile_options: dict | None = None,
    ) -> None:
        self.model, self.cache, self.schedule = model, cache, schedule
        self.use_graph = cuda_graph and cache.k.device.type == "cuda"
        self.compiled = compile
        self._forward = None
        if compile:
            model.rope(torch.zeros(1, dtype=torch.long, device=cache.k.device), 1, 1)  # build the lazy RoPE table
            self._forward = torch.compile(model.forward_chunk, **(compile_options or {}))
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static_noise: Tensor | None = None
        self._static_out: Tensor | None = None
        self.replays = 0

    @property
    def num_noises(self) -> int:
        """Noise tensors per chunk: the initial noise, one per re-noising, and one for a noisy context."""
        return len(self.schedule.denoising_steps) + (1 if self.schedule.context_noise > 0 else 0)

    def draw_noise(
        self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | None = None
    ) -> Tensor:
        """[num_noises, *shape] on the cache's device, drawn in `denoise_chunk`'s order from `generator`."""
        device = device or self.cache.k.device
        return torch.stack([randn(shape, generator, device) for _ in range(self.num_noises)])

    @torch.no_grad()
    def _chunk(self, noises: Tensor) -> Tensor:
        """The device work of one chunk: denoising steps, then the context pass. No host syncs, fixed shapes."""
        cache, schedule = self.cache, self.schedule
        forward = self._forward or self.model.forward_chunk
        sigmas = schedule.sigmas
        batch, frames = noises.shape[1], noises.shape[3]
        x = noises[0].float()
        for i, sigma in enumerate(sigmas):
            with nvtx_range(f"denoise step {i}"):
                t = torch.full((batch, frames), schedule.num_train_timesteps * sigma, device=x.device)
                x0 = flow_to_x0(x, forward(x, t, cache).float(), sigma)
                if i + 1 < len(sigmas):
                    x = add_noise(x0, noises[i + 1], sigmas[i + 1])
        with nvtx_range("context pass"):
            ctx_sigma = schedule.context_noise / schedule.num_train_timesteps
            ctx = add_noise(x0, noises[len(sigmas)], ctx_sigma) if ctx_sigma > 0 else x0
            forward(ctx, torch.full((batch, frames), schedule.context_noise, device=x.device), cache)
        return x0

    def _call(self, noises: Tensor) -> Tensor:
        if not self.compiled:
            return self._chunk(noises)
        # The cache's host-side frame counter (read by its RoPE-limit check) would otherwise be specialised: one
        # recompilation per chunk. As a symbolic int it is guarded, not baked in.
        with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True):
            return self._chunk(noises)

    @torch.no_grad()
    def __call__(self, noises: Tensor) -> Tensor:
        """noises [num_noises, B, C, Fc, h, w] -> the chunk's x0 [B, C, Fc, h, w] (fp32); advances the cache."""
        frames = noises.shape[3]
        self.cache.make_room(frames)  # re-base RoPE positions past the table: eager, between replays
        with nvtx_range("chunk"):
            if not self.use_graph:
                x0 = self._call(noises)
            elif self._graph is None:
                x0 = self._warm_up_and_capture(noises)
            else:
                self._static_noise.copy_(noises)
                self._graph.replay()
                self.replays += 1
                x0 = self._static_out.clone()
        self.cache.advance(frames)
        return x0

    def _warm_up_and_capture(self, noises: Tensor) -> Tensor:
        # Warm up on a side stream (as CUDA graphs require): this runs the first chunk for real. Capturing then
        # records the same work without running it, so the cache is left as the first chunk made it.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            x0 = self._call(noises)
        torch.cuda.current_stream().wait_stream(stream)
        self._static_noise = noises.clone()
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._static_out = self._call(self._static_noise)
        return x0
