"""One video being generated, and everything it owns.

`Pipeline.stream(...)` returns a `VideoStream`: an iterator over the decoded frames of each chunk that owns its KV
cache (with its prompt's text K/V), its chunk runner (a captured CUDA graph is bound to that cache), its noise
generator, its decoder state and the latents of the frames its cache holds. Only the weights are shared, so streams
on one pipeline may be interleaved chunk by chunk and each yields exactly what it would alone. A stream that ends
or is closed hands its cache and runner back to the pipeline, and the next stream of the same shape reuses them
instead of allocating another cache; two live streams never share one.

A stream steers while it plays: `set_prompt` (or a timed schedule) replaces the text K/V before the next chunk and,
by default, recomputes the cached frames' K/V under the new prompt in one block-causal context pass over the
frames the next chunk will see (LongLive's KV re-cache), so the new prompt takes hold without a cut. It can also
start from given frames: they are encoded by the decoder's encoder and written into the cache by the same context
pass, and the stream continues from there.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from sfpp.engine.cache import RingKVCache
from sfpp.engine.graph import ChunkRunner
from sfpp.engine.sampler import SelfForcingNoise, StreamNoise, add_noise, nvtx_range, randn


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """torch's CPU thread count set to `count` for the block and restored after it (None: left as it is)."""
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class StreamState:
    """What one stream owns on the device, pooled by the pipeline for reuse by a later stream of the same shape."""

    key: tuple
    cache: RingKVCache
    runner: ChunkRunner


class StatePool:
    """Free stream states of a pipeline. Taking one of another shape drops the free ones (a pipeline used one video
    after another keeps one cache, as before); live states are held by their streams only."""

    def __init__(self) -> None:
        self._free: list[StreamState] = []
        self._lock = threading.Lock()
        # Streams in several threads run their device work one chunk at a time: the GPU serialises it anyway, and a
        # CUDA graph being captured must not see another stream's kernels.
        self.device_lock = threading.RLock()

    def take(self, key: tuple) -> StreamState | None:
        with self._lock:
            for i in reversed(range(len(self._free))):  # the most recently used first
                if self._free[i].key == key:
                    return self._free.pop(i)
            self._free.clear()
        return None

    def give(self, state: StreamState) -> None:
        with self._lock:
            self._free.append(state)

    def __len__(self) -> int:
        return len(self._free)


def prompts_for(prompt: str | list[str], batch: int, what: str = "prompt") -> list[str]:
    """One prompt per video of the batch: a string applies to all of them."""
    if isinstance(prompt, str):
        return [prompt] * batch
    if isinstance(prompt, (list, tuple)) and len(prompt) == batch and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise TypeError(f"{what} must be a string or a list of {batch} strings (one per video), got {prompt!r}")


def prepare_video(video, height: int, width: int, temporal_factor: int, batch: int) -> Tensor:
    """Given frames as the pipeline's frames: uint8 [batch, T, height, width, 3] on the CPU.

    Accepts [H, W, 3] (an image), [T, H, W, 3] or [B, T, H, W, 3], uint8 or float in [0, 1], as a tensor or an
    array. Frames of another size are centre-cropped to the output's aspect ratio and resized to it (bilinear,
    antialiased). With a temporal factor k > 1 (Wan's VAE) the encoder takes 1 + k n frames: the last 1 + k n of
    them are kept."""
    if isinstance(video, np.ndarray):
        video = torch.from_numpy(np.ascontiguousarray(video))
    if not isinstance(video, Tensor):
        raise TypeError(f"video must be a tensor or an array of frames [T, H, W, 3], got {type(video).__name__}")
    if video.ndim == 3:
        video = video[None]
    if video.ndim == 4:
        video = video[None]
    if video.ndim != 5 or video.shape[-1] != 3 or video.shape[1] < 1 or video.shape[0] not in (1, batch):
        raise ValueError(
            f"video must be frames [T, H, W, 3] (or [H, W, 3], or [{batch}, T, H, W, 3] for a batch of {batch}), "
            f"got shape {tuple(video.shape)}"
        )
    if video.dtype != torch.uint8:
        if not video.is_floating_point():
            raise TypeError(f"video must be uint8 or float in [0, 1], got {video.dtype}")
        video = (video.float().clamp(0, 1) * 255).round().to(torch.uint8)
    video = video.cpu().expand(batch, *video.shape[1:])
    keep = 1 + (video.shape[1] - 1) // temporal_factor * temporal_factor
    video = video[:, video.shape[1] - keep :]
    h, w = video.shape[2:4]
    if (h, w) != (height, width):
        crop_h, crop_w = min(h, round(w * height / width)), min(w, round(h * width / height))
        top, left = (h - crop_h) // 2, (w - crop_w) // 2
        x = video[:, :, top : top + crop_h, left : left + crop_w].permute(0, 1, 4, 2, 3).flatten(0, 1).float()
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
        video = x.round().clamp(0, 255).to(torch.uint8).unflatten(0, video.shape[:2]).permute(0, 1, 3, 4, 2)
    return video.contiguous()


class VideoStream:
    """An iterator over uint8 frames [B, n, H, W, 3], one item per chunk; endless when no length was given.

    stream = pipe.stream("a red circle ...", seed=0)
    for frames in stream:
        if stream.chunk_index == 10:
            stream.set_prompt("a blue circle ...")   # takes effect at the next chunk
    stream.close()                                   # or leave the loop / `with pipe.stream(...) as stream:`
    """

    @torch.no_grad()
    def __init__(
        self,
        pipe,
        prompts: list[str],
        *,
        num_frames: int | None,
        latent_size: tuple[int, int],
        generator: torch.Generator,
        switches: list[tuple[int, list[str]]],
        recache: bool,
        video: Tensor | None,
        include_video: bool,
        progress: bool,
        return_latents: bool,
        noise: SelfForcingNoise | StreamNoise | None = None,
    ) -> None:
        self.pipe, self.batch = pipe, len(prompts)
        # The whole video's noise drawn up front in a peer's order, else chunk by chunk as the stream goes.
        self._noise = noise or StreamNoise(generator, pipe.device)
        model, s = pipe.transformer, pipe.settings
        h, w = latent_size
        self.shape = (self.batch, model.cfg.in_channels, s.frames_per_chunk, h, w)
        self.pixels = (self.batch, h * pipe.decoder.spatial_factor, w * pipe.decoder.spatial_factor)
        self.generator, self.recache, self.return_latents = generator, recache, return_latents
        self.num_frames, self.frames_done = num_frames, 0  # generated video frames (given ones not counted)
        self.chunk_index = 0  # chunks generated so far
        self._switches = sorted(switches, key=lambda s: s[0])
        self._pending: tuple[list[str], bool] | None = None
        self._lock = threading.Lock()
        self._state: StreamState | None = None
        self._bar = tqdm(total=num_frames, unit="frame", disable=not progress, desc="sfpp")
        try:
            with pipe._states.device_lock:
                self._start(prompts, video, include_video, (h, w))
        except torch.OutOfMemoryError as exc:
            self.close()
            raise pipe._oom_error(exc, *self.pixels) from exc
        except BaseException:
            self.close()
            raise

    def _start(self, prompts: list[str], video: Tensor | None, include_video: bool, latent_size: tuple[int, int]):
        pipe, model, s = self.pipe, self.pipe.transformer, self.pipe.settings
        h, w = latent_size
        self._state = pipe._take_state(self.batch, (h // model.cfg.patch_size[1]) * (w // model.cfg.patch_size[2]))
        self.cache, self.runner = self._state.cache, self._state.runner
        self.cache.reset()
        self._set_text(prompts)
        # The latents each cache slot was written from (the context pass's input), for a re-cache.
        self._context = torch.zeros(self.batch, model.cfg.in_channels, s.sink + s.window, h, w, device=pipe.device)
        self._decoder = pipe.decoder.stream()
        self._given = self._start_from(video, include_video) if video is not None else None

    # --- steering

    def set_prompt(self, prompt: str | list[str], *, recache: bool | None = None) -> None:
        """Switch to `prompt` from the next chunk on (thread-safe: it is applied by the generating thread).
        `recache` (default: the stream's) recomputes the cached frames' K/V under the new prompt."""
        prompts = prompts_for(prompt, self.batch)
        with self._lock:
            self._pending = (prompts, self.recache if recache is None else recache)

    def _set_text(self, prompts: list[str]) -> None:
        with nvtx_range("text encoder"):
            context = self.pipe.encode_prompt(prompts)
        self.cache.set_text(self.pipe.transformer.text_kv(context))

    def _switch(self, prompts: list[str], recache: bool) -> None:
        self._set_text(prompts)
        if recache and self.cache.frames_done > 0:
            with nvtx_range("kv re-cache"):
                self._write_context(self._visible_frames(self.cache.frames_done))

    def _visible_frames(self, end: int) -> list[int]:
        """The frames before `end` that the chunk starting at `end` sees: the sinks and the window's newest
        (window - chunk) frames (the chunk itself overwrites the oldest ones)."""
        s = self.pipe.settings
        first = max(s.sink, end - (s.window - s.frames_per_chunk))
        return [*range(min(end, s.sink)), *range(first, end)]

    def _write_context(self, frames: list[int]) -> None:
        """One block-causal context pass over `frames` (held in self._context) under the current text K/V."""
        slots = self.cache.slot_of(torch.tensor(frames, device=self._context.device))
        latents = self._context.index_select(2, slots)
        t = torch.full((self.batch, len(frames)), self.pipe.schedule.context_noise, device=latents.device)
        self.pipe.transformer.forward_context(latents, t, self.cache, frames, self.pipe.settings.frames_per_chunk)

    def _start_from(self, video: Tensor, include: bool) -> tuple[Tensor, Tensor] | None:
        """Encode given frames (uint8 [B, T, H, W, 3]), write the ones the first chunk sees into the cache with a
        context pass and continue after them; warm the decoder's state up on them."""
        pipe = self.pipe
        with nvtx_range("encode"):
            z = pipe.decoder.encode_frames(video.to(pipe.device)).float()  # [B, C, N, h, w]
        if tuple(z.shape[3:]) != self.shape[3:]:
            raise ValueError(f"encoded frames have latent size {tuple(z.shape[3:])}, expected {self.shape[3:]}")
        schedule, n = pipe.schedule, z.shape[2]
        ctx_sigma = schedule.context_noise / schedule.num_train_timesteps
        if ctx_sigma > 0:  # written as the generated frames are: at the context pass's noise level
            z_ctx = add_noise(z, randn(tuple(z.shape), self.generator, z.device), ctx_sigma)
        else:
            z_ctx = z
        frames = self._visible_frames(n)
        self.cache.seek(n)
        self.cache.make_room(pipe.settings.frames_per_chunk)  # a clip longer than the RoPE table starts re-based
        index = torch.tensor(frames, device=z.device)
        self._context.index_copy_(2, self.cache.slot_of(index), z_ctx.index_select(2, index))
        with nvtx_range("context pass"):
            self._write_context(frames)
        with nvtx_range("decode"):
            self._decoder.decode(z)  # the decoder's causal state continues from the given frames
        return (video, z) if include else None

    # --- iteration

    def __iter__(self) -> VideoStream:
        return self

    @torch.no_grad()
    def __next__(self) -> Tensor | tuple[Tensor, Tensor]:
        if self._given is not None:
            (frames, z), self._given = self._given, None
            return (frames.to(self.pipe.device), z) if self.return_latents else frames.to(self.pipe.device)
        if self._state is None or (self.num_frames is not None and self.frames_done >= self.num_frames):
            self.close()
            raise StopIteration
        try:
            with self.pipe._states.device_lock, torch_threads(self.pipe.threads_for_work):
                return self._next_chunk()
        except torch.OutOfMemoryError as exc:
            self.close()
            raise self.pipe._oom_error(exc, *self.pixels) from exc
        except BaseException:
            self.close()
            raise

    def _next_chunk(self) -> Tensor | tuple[Tensor, Tensor]:
        pipe, cache, runner = self.pipe, self.cache, self.runner
        due = None
        while self._switches and self._switches[0][0] <= self.frames_done:
            due = (self._switches.pop(0)[1], self.recache)  # of several due at once, the last one counts
        with self._lock:
            pending, self._pending = self._pending, None
        if pending or due:
            self._switch(*(pending or due))
        start = cache.frames_done
        # The chunk's noise, drawn outside the runner: the same video in every runner mode.
        noises = self._noise.chunk(pipe.schedule, self.shape)
        latents = runner(noises)
        schedule = pipe.schedule
        ctx_sigma = schedule.context_noise / schedule.num_train_timesteps
        ctx = add_noise(latents, noises[-1], ctx_sigma) if ctx_sigma > 0 else latents  # what the cache was given
        slots = cache.slot_of(torch.arange(start, start + latents.shape[2], device=latents.device))
        self._context.index_copy_(2, slots, ctx)
        with nvtx_range("decode"):
            frames = self._decoder.decode(latents)
        if self.num_frames is not None:
            frames = frames[:, : self.num_frames - self.frames_done]
        self.frames_done += frames.shape[1]
        self.chunk_index += 1
        self._bar.update(frames.shape[1])
        return (frames, latents) if self.return_latents else frames

    def close(self) -> None:
        """Stop the stream and hand its cache back to the pipeline (also done when it ends)."""
        state, self._state = self._state, None
        if state is not None:
            self.pipe._give_state(state)
        self._bar.close()

    def __enter__(self) -> VideoStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_state", None) is not None:
            self.close()
