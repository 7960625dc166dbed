"""The user-facing pipeline: prompt in, streamed video frames out.

pipe = Pipeline.from_pretrained("path/to/model")
video = pipe(prompt="a red ball bounces", seconds=10, generator=torch.Generator().manual_seed(0)).frames[0]
export_to_video(video, "out.mp4", fps=pipe.fps)
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sfpp.cache import RingKVCache
from sfpp.checkpoint import CheckpointError, load_file, load_weights
from sfpp.model import WanConfig, WanModel, get_config
from sfpp.sampler import FlowMatchSchedule, denoise_chunk, randn
from sfpp.text import ByteTextEncoder, ByteTextEncoderConfig
from sfpp.video import LatentPreviewDecoder, num_latent_frames

CONFIG_FILE = "sfpp_pipeline.json"
TRANSFORMER_FILE = "transformer.safetensors"

# The parts a model directory may name by "type". Each class has `from_meta(meta, directory)`, `to_meta()` and
# `save(directory)`; other modules register theirs here (the Wan VAE, umT5, the toy world's codec).
TEXT_ENCODERS: dict[str, type] = {"byte": ByteTextEncoder}
DECODERS: dict[str, type] = {"preview": LatentPreviewDecoder}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class PipelineOutput:
    frames: Tensor  # uint8 [B, T, H, W, 3]
    latents: Tensor  # fp32 [B, C, F, h, w]


@dataclass(frozen=True)
class StreamSettings:
    """How the student rolls out: chunk size, cache window and sinks, default resolution and frame rate."""

    frames_per_chunk: int = 3
    window: int = 21
    sink: int = 0
    height: int = 480
    width: int = 832
    fps: int = 16

    def __post_init__(self) -> None:
        if self.frames_per_chunk < 1 or self.sink < 0 or self.fps < 1:
            raise ValueError(f"invalid stream settings {self}")
        if self.window < self.frames_per_chunk:
            raise ValueError(f"window ({self.window}) must hold at least one chunk ({self.frames_per_chunk} frames)")


def _validate_prompt(prompt: str | list[str]) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
    return list(prompts)


class Pipeline:
    def __init__(
        self,
        transformer: WanModel,
        text_encoder: ByteTextEncoder,
        decoder: LatentPreviewDecoder,
        *,
        schedule: FlowMatchSchedule | None = None,
        settings: StreamSettings | None = None,
        random_weights: bool = False,
    ) -> None:
        if text_encoder.text_dim != transformer.cfg.text_dim:
            raise ValueError(
                f"text encoder dim {text_encoder.text_dim} != transformer text_dim {transformer.cfg.text_dim}"
            )
        if decoder.channels != transformer.cfg.in_channels:
            raise ValueError(
                f"decoder channels {decoder.channels} != transformer channels {transformer.cfg.in_channels}"
            )
        self.transformer = transformer.eval()
        self.text_encoder = text_encoder.eval()
        self.decoder = decoder
        self.schedule = schedule or FlowMatchSchedule()
        self.settings = settings or StreamSettings()
        self.random_weights = random_weights
        self._cache: RingKVCache | None = None
        self._cache_key: tuple | None = None

    @property
    def device(self) -> torch.device:
        return self.transformer.head.head.weight.device

    @property
    def fps(self) -> int:
        return self.settings.fps

    # --- construction

    @classmethod
    def from_config(
        cls,
        name: str = "tiny",
        *,
        seed: int = 0,
        settings: StreamSettings | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Pipeline:
        """A pipeline with random weights of a named config: exercises every stage, generates noise-like video."""
        cfg = get_config(name)
        torch.manual_seed(seed)
        transformer = WanModel(cfg)
        text_encoder = ByteTextEncoder(ByteTextEncoderConfig(text_dim=cfg.text_dim, text_len=min(cfg.text_len, 64)))
        settings = settings or StreamSettings(height=64, width=64)
        pipe = cls(
            transformer, text_encoder, LatentPreviewDecoder(cfg.in_channels), settings=settings, random_weights=True
        )
        return pipe.to(device, dtype)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> Pipeline:
        """Load a model directory written by `save_pretrained`: weights load onto the meta device, no second copy."""
        path = Path(path)
        config_path = path / CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(f"{path} is not an sfpp model directory: {CONFIG_FILE} is missing")
        meta = json.loads(config_path.read_text())
        with torch.device("meta"):
            transformer = WanModel(WanConfig.from_dict(meta["transformer"]))
        weights = path / TRANSFORMER_FILE
        load_weights(transformer, load_file(weights), source=str(weights))
        schedule = dict(meta.get("schedule", {}))
        if "denoising_steps" in schedule:
            schedule["denoising_steps"] = tuple(schedule["denoising_steps"])
        pipe = cls(
            transformer,
            _part(TEXT_ENCODERS, meta["text_encoder"], path, "text encoder"),
            _part(DECODERS, meta["decoder"], path, "decoder"),
            schedule=FlowMatchSchedule(**schedule),
            settings=StreamSettings(**meta.get("settings", {})),
            random_weights=meta.get("random_weights", False),
        )
        return pipe.to(device, dtype)

    def save_pretrained(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = {k: v.contiguous().cpu() for k, v in self.transformer.state_dict().items()}
        save_file(sd, str(path / TRANSFORMER_FILE))
        self.text_encoder.save(path)
        self.decoder.save(path)
        meta = {
            "transformer": asdict(self.transformer.cfg),
            "text_encoder": self.text_encoder.to_meta(),
            "decoder": self.decoder.to_meta(),
            "schedule": asdict(self.schedule),
            "settings": asdict(self.settings),
            "random_weights": self.random_weights,
        }
        (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    def to(self, device: str | torch.device, dtype: torch.dtype = torch.float32) -> Pipeline:
        """Move to a device; the DiT runs in `dtype`, the small text encoder stays fp32."""
        self.transformer.to(device=device, dtype=dtype)
        self.text_encoder.to(device=device)
        return self

    # --- generation

    def _plan(self, num_frames: int | None, seconds: float | None, height: int | None, width: int | None):
        s = self.settings
        if (num_frames is None) == (seconds is None):
            raise ValueError("give exactly one of num_frames= or seconds=")
        if seconds is not None:
            if not seconds > 0:
                raise ValueError(f"seconds must be positive, got {seconds}")
            num_frames = max(1, round(seconds * s.fps))
        if not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
        height = s.height if height is None else height
        width = s.width if width is None else width
        multiple = self.decoder.spatial_factor * self.transformer.cfg.patch_size[1]
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {multiple}, got {height}x{width}")
        latent_frames = num_latent_frames(num_frames, self.decoder.temporal_factor)
        num_chunks = math.ceil(latent_frames / s.frames_per_chunk)
        limit = self.transformer.cfg.rope_max_positions
        if num_chunks * s.frames_per_chunk > limit:
            max_frames = 1 + (limit // s.frames_per_chunk * s.frames_per_chunk - 1) * self.decoder.temporal_factor
            raise ValueError(
                f"{num_frames} frames need {num_chunks * s.frames_per_chunk} latent frames, past the RoPE limit of "
                f"{limit} latent frames: at most {max_frames} frames ({max_frames / s.fps:.0f} s at {s.fps} fps)"
            )
        return num_frames, num_chunks, height // self.decoder.spatial_factor, width // self.decoder.spatial_factor

    def _cache_for(self, batch_size: int, frame_tokens: int) -> RingKVCache:
        """The KV cache, reset for a new video; reallocated only when its shape, device or dtype changes."""
        model, s = self.transformer, self.settings
        key = (batch_size, frame_tokens, s.window, s.sink, model.dtype, self.device)
        if self._cache_key != key:
            self._cache = RingKVCache(
                model.cfg,
                batch_size=batch_size,
                frame_tokens=frame_tokens,
                window=s.window,
                sink=s.sink,
                dtype=model.dtype,
                device=self.device,
            )
            self._cache_key = key
        self._cache.reset()
        return self._cache

    def encode_prompt(self, prompt: str | list[str]) -> Tensor:
        return self.text_encoder.encode(_validate_prompt(prompt)).to(self.transformer.dtype)

    @torch.no_grad()
    def stream(
        self,
        prompt: str | list[str],
        *,
        num_frames: int | None = None,
        seconds: float | None = None,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        progress: bool = True,
        return_latents: bool = False,
    ) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
        """Yield the decoded frames of each chunk, uint8 [B, n, H, W, 3], as soon as it is denoised."""
        prompts = _validate_prompt(prompt)
        num_frames, num_chunks, h, w = self._plan(num_frames, seconds, height, width)
        if generator is not None and seed is not None:
            raise ValueError("give a generator= or a seed=, not both")
        if generator is None:
            generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
        model, s = self.transformer, self.settings
        frame_tokens = (h // model.cfg.patch_size[1]) * (w // model.cfg.patch_size[2])
        cache = self._cache_for(len(prompts), frame_tokens)
        cache.set_text(model.text_kv(self.encode_prompt(prompts)))  # once per prompt, reused by every step
        decoder = self.decoder.stream()
        remaining = num_frames
        bar = tqdm(total=num_frames, unit="frame", disable=not progress, desc="sfpp")
        shape = (len(prompts), model.cfg.in_channels, s.frames_per_chunk, h, w)
        for _ in range(num_chunks):
            latents = denoise_chunk(model, cache, randn(shape, generator, self.device), self.schedule, generator)
            frames = decoder.decode(latents)[:, :remaining]
            remaining -= frames.shape[1]
            bar.update(frames.shape[1])
            yield (frames, latents) if return_latents else frames
        bar.close()

    def __call__(self, prompt: str | list[str], **kwargs) -> PipelineOutput:
        """Generate whole videos: the frames of `stream(...)` concatenated. Same arguments as `stream`."""
        chunks = list(self.stream(prompt, return_latents=True, **kwargs))
        return PipelineOutput(frames=torch.cat([f for f, _ in chunks], 1), latents=torch.cat([z for _, z in chunks], 2))


def _part(registry: dict[str, type], meta: dict, directory: Path, what: str):
    kind = meta.get("type")
    if kind not in registry:
        raise CheckpointError(f"unknown {what} type {kind!r} in {directory / CONFIG_FILE}; known: {sorted(registry)}")
    return registry[kind].from_meta(meta, directory)
