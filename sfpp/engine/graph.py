"""One chunk of the student as a fixed piece of device work: eager, `torch.compile`d, or replayed from a CUDA graph.

A chunk is `sampler.denoise_chunk`: the denoising steps plus the context pass over the ring KV cache. Its shapes
depend only on how full the ring is, and the cache keeps positions on the device, so the chunk is captured once
per fill level (ceil((sink + window) / chunk) of them; after that the ring is full and one graph serves every later
chunk, and every later video of the same shape): one launch instead of thousands. The noise a chunk needs is drawn
on the host generator beforehand (`sampler.draw_noises`) and copied into a static buffer: a seed gives the same
video in every mode. Without CUDA the same loop runs eagerly. NVTX ranges name each stage for Nsight.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sfpp.engine.sampler import FlowMatchSchedule, denoise_chunk, draw_noises, num_noises, nvtx_range


class ChunkRunner:
    """Runs chunks of one video shape for a model and its ring cache.

    runner = ChunkRunner(model, cache, schedule, cuda_graph=True)
    x0 = runner(runner.draw_noise(shape, generator))   # [B, C, Fc, h, w] fp32; the cache has advanced

    `cuda_graph`: the first chunk at each fill level of the ring runs eagerly as the warm-up and is captured; later
    chunks at that level replay it. Ignored without CUDA. `compile`: `torch.compile` the model's chunk forward
    (`compile_options` go to torch.compile); one compiled forward serves all the passes of a chunk. With
    `cuda_graph` as well, the graphs capture its kernels.
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
        self._forward = model.forward_chunk
        if compile:
            model.rope(torch.zeros(1, dtype=torch.long, device=cache.k.device), 1, 1)  # build the lazy RoPE table
            self._forward = torch.compile(model.forward_chunk, **(compile_options or {}))
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}  # fill level -> (graph, its output)
        self._pool = None  # one memory pool for all the graphs: they never run at the same time
        self._static_noise: Tensor | None = None
        self.replays = 0

    @property
    def num_noises(self) -> int:
        return num_noises(self.schedule)

    def draw_noise(
        self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | None = None
    ) -> Tensor:
        """[num_noises, *shape] on the cache's device, drawn in `denoise_chunk`'s order from `generator`."""
        return draw_noises(self.schedule, shape, generator, device or self.cache.k.device)

    @torch.no_grad()
    def _call(self, noises: Tensor) -> Tensor:
        if not self.compiled:
            return denoise_chunk(self._forward, self.cache, noises, self.schedule)
        # The cache's host-side frame counter (read by its RoPE-limit check) would otherwise be specialised: one
        # recompilation per chunk. As a symbolic int it is guarded, not baked in.
        with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True):
            return denoise_chunk(self._forward, self.cache, noises, self.schedule)

    def _fill_level(self, frames: int) -> int:
        """Slots of the ring that hold frames once this chunk is planned: what the captured shapes depend on."""
        return min(self.cache.frames_done + frames, self.cache.sink + self.cache.window)

    @torch.no_grad()
    def __call__(self, noises: Tensor) -> Tensor:
        """noises [num_noises, B, C, Fc, h, w] -> the chunk's x0 [B, C, Fc, h, w] (fp32); advances the cache."""
        frames = noises.shape[3]
        self.cache.make_room(frames)  # re-base RoPE positions past the table: eager, between replays
        with nvtx_range("chunk"):
            if not self.use_graph:
                x0 = self._call(noises)
            elif (level := self._fill_level(frames)) not in self._graphs:
                x0 = self._warm_up_and_capture(noises, level)
            else:
                graph, out = self._graphs[level]
                self._static_noise.copy_(noises)
                graph.replay()
                self.replays += 1
                x0 = out.clone()
        self.cache.advance(frames)
        return x0

    def _warm_up_and_capture(self, noises: Tensor, level: int) -> Tensor:
        # Warm up on a side stream (as CUDA graphs require): this runs the chunk for real. Capturing then records
        # the same work without running it, so the cache is left as this chunk made it.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            x0 = self._call(noises)
        torch.cuda.current_stream().wait_stream(stream)
        if self._static_noise is None:
            self._static_noise = noises.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._call(self._static_noise)
        self._pool = graph.pool()
        self._graphs[level] = (graph, out)
        return x0
