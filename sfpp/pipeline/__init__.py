"""The user-facing pipeline: prompt in, streamed video frames out.

pipe = Pipeline.from_pretrained("default")          # the shipped model; or a directory: sfpp's own, Wan2.1's
                                                    # original, or the diffusers layout
pipe = Pipeline.from_pretrained("Wan2.1-T2V-1.3B", checkpoint="self_forcing_dmd.pt", device="cuda")
video = pipe(prompt="a red ball bounces", seconds=10, generator=torch.Generator().manual_seed(0)).frames[0]
export_to_video(video, "out.mp4", fps=pipe.fps)
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sfpp.engine.cache import RingKVCache
from sfpp.engine.graph import ChunkRunner
from sfpp.engine.parallel import ContextParallel, rank_device
from sfpp.engine.parallel import init as init_parallel
from sfpp.engine.sampler import NOISE_ORDERS, FlowMatchSchedule, SelfForcingNoise, num_noises, nvtx_range
from sfpp.engine.stream import StatePool, StreamState, VideoStream, prepare_video, prompts_for, torch_threads
from sfpp.models.checkpoint import CheckpointError, load_file, load_weights
from sfpp.models.dit import WanConfig, WanModel, get_config
from sfpp.models.taehv import TAEHVDecoder
from sfpp.models.text import ByteTextEncoder, ByteTextEncoderConfig
from sfpp.models.toy import PatchPCACodec
from sfpp.models.umt5 import UMT5TextEncoder
from sfpp.models.vae import WanVAE
from sfpp.pipeline.memory import GiB, MemoryPlan, memory_plan
from sfpp.pipeline.prompt_cache import PromptCache
from sfpp.pipeline.settings import (
    DEFAULT_CPU_THREADS,
    DTYPES,
    KERNELS,
    KV_DTYPES,
    PipelineOutput,
    StreamSettings,
    _integer,
    _is_number,
    _resolve_options,
    _validate_noise,
    _validate_prompt,
    check_device,
    device_defaults,
    unsupported,
)
from sfpp.video import LatentPreviewDecoder, num_latent_frames

__all__ = [  # with what the pipeline's callers (the CLI, the benchmark, train/) take from settings
    "DECODERS", "DEFAULT_CPU_THREADS", "DTYPES", "KERNELS", "KV_DTYPES", "MEMORY_MODES", "SHIPPED_MODELS",
    "TEXT_ENCODERS", "Pipeline", "PipelineOutput", "StreamSettings", "check_device", "device_defaults", "unsupported",
]  # fmt: skip

CONFIG_FILE = "sfpp_pipeline.json"
TRANSFORMER_FILE = "transformer.safetensors"
# Models that ship inside the package, by name: `Pipeline.from_pretrained("default")` works from any directory.
# The toy world's students (train/ship.py): Self-Forcing++ (the default), and beside it the Self-Forcing baseline and
# the Self-Forcing++ student after GRPO, so the comparison in the model card can be re-run.
SHIPPED_MODELS = {
    name: Path(__file__).parent.parent / "assets" / name for name in ("default", "self-forcing", "self-forcing++-grpo")
}

# The parts a model directory may name by "type". Each class has `from_meta(meta, directory)`, `to_meta()` and
# `save(directory)`; other modules register theirs here (the Wan VAE, umT5, the toy world's codec).
TEXT_ENCODERS: dict[str, type] = {"byte": ByteTextEncoder, "umt5": UMT5TextEncoder}
DECODERS: dict[str, type] = {
    "preview": LatentPreviewDecoder,
    "wan-vae": WanVAE,
    "taehv": TAEHVDecoder,
    "patch-pca": PatchPCACodec,
}
# `from_pretrained(memory=)`: "auto" saves memory when the default size would not fit the device's free memory
# (`Pipeline.fit_memory`), "low" always, "full" never.
MEMORY_MODES = ("auto", "low", "full")
# Room left on the device beyond the memory model's peak: the CUDA context and cuBLAS workspaces (~0.5 GiB) and the
# caching allocator's slack.
MEMORY_MARGIN = 1 * GiB
log = logging.getLogger("sfpp")


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
        cuda_graph: bool = False,
        compile: bool = False,
        compile_options: dict | None = None,
        kv_dtype: torch.dtype | None = None,
        cpu_threads: int | None = DEFAULT_CPU_THREADS,
    ) -> None:
        """`cuda_graph`: capture each chunk's work once and replay it (CUDA only; eager elsewhere). `compile`:
        `torch.compile` the chunk (with `compile_options`); both together replay compiled kernels. `kv_dtype`:
        the self-attention KV cache's dtype (default: the DiT's; `torch.float8_e4m3fn` halves it). `cpu_threads`:
        torch's thread count while this pipeline works on a CPU (encoding prompts, each chunk), the caller's
        restored in between (None: torch's own setting); `sfpp generate --threads` sets it."""
        if cpu_threads is not None and (not isinstance(cpu_threads, int) or cpu_threads < 1):
            raise ValueError(f"cpu_threads must be a positive integer or None, got {cpu_threads!r}")
        self.cpu_threads = cpu_threads
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
        self.student: str | None = None  # the known student whose preset `from_pretrained` applied
        if text_encoder.text_len > transformer.cfg.text_len:
            raise ValueError(
                f"text encoder emits {text_encoder.text_len} tokens, more than transformer text_len "
                f"{transformer.cfg.text_len}"
            )
        self.runner_options = {"cuda_graph": cuda_graph, "compile": compile, "compile_options": compile_options}
        self.kv_dtype = kv_dtype
        self.text_encoder_device: torch.device | None = None  # where prompts are encoded (None: the DiT's device)
        self.prompt_cache: PromptCache | None = None  # prompt embeddings kept on disk (`from_pretrained`)
        self._states = StatePool()  # caches and runners of finished streams, for the next stream of their shape

    @property
    def parallel(self) -> ContextParallel | None:
        """The context-parallel split of each stream (`set_parallel`), or None on one device."""
        return self.transformer.parallel

    @property
    def is_writer(self) -> bool:
        """Whether this process writes the output: always on one device, rank 0 of a context-parallel group."""
        return self.parallel is None or self.parallel.rank == 0

    def set_parallel(self, parallel: ContextParallel | None) -> Pipeline:
        """Split each stream's DiT work over the ranks of `parallel` (`sfpp.engine.parallel`: Ulysses, each rank
        1/N of each frame's tokens and H/N heads of the ring cache), or None for one device. Every rank runs the
        same program: the same prompts, lengths, seeds and switches, chunk by chunk (a seed left out is drawn on
        rank 0 and shared; a `generator=` must be seeded alike on every rank). Each rank gets the whole video."""
        self.transformer.set_parallel(parallel)
        return self

    @property
    def threads_for_work(self) -> int | None:
        """The thread count the pipeline's work runs with here: `cpu_threads` on a CPU, torch's own elsewhere."""
        return self.cpu_threads if self.device.type == "cpu" else None

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
        dtype: torch.dtype | None = None,
        kernels: str | None = None,
        memory: str = "auto",
        **options,
    ) -> Pipeline:
        """A pipeline with random weights of a named config: exercises every stage, generates noise-like video.
        `device`, `dtype`, `kernels`, `memory` and `options` as in `from_pretrained`."""
        _check_memory_mode(memory)
        parallel, device = _parallel_option(options, device)
        device, dtype, kernels, options = _resolve_options(device, dtype, kernels, options)
        cfg = get_config(name)
        torch.manual_seed(seed)
        transformer = WanModel(cfg)
        text_encoder = ByteTextEncoder(ByteTextEncoderConfig(text_dim=cfg.text_dim, text_len=min(cfg.text_len, 64)))
        settings = settings or StreamSettings(height=64, width=64)
        pipe = cls(
            transformer,
            text_encoder,
            LatentPreviewDecoder(cfg.in_channels),
            settings=settings,
            random_weights=True,
            **options,
        )
        pipe.transformer.use_kernels(None if kernels == "none" else kernels)
        pipe.set_parallel(parallel)
        return pipe.to(device, dtype)._fit_memory_on_load(memory, kv_dtype_given="kv_dtype" in options)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        checkpoint: str | Path | None = None,
        *,
        lora: str | Path | None = None,
        lora_alpha: float | None = None,
        student: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        kernels: str | None = None,
        ema: bool | None = None,
        settings: StreamSettings | None = None,
        decoder: str | None = None,
        decoder_path: str | Path | None = None,
        memory: str = "auto",
        prompt_cache: bool | str | Path | None = None,
        **options,
    ) -> Pipeline:
        """Load a model: a shipped model by name (`SHIPPED_MODELS`: "default") or a directory, sfpp's own
        (`save_pretrained`), Wan2.1's original layout (config.json, diffusion_pytorch_model.safetensors, Wan2.1_VAE.pth,
        models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl) or the diffusers layout (model_index.json). `checkpoint`: DiT
        weights that replace the directory's, e.g. a Self-Forcing `.pt` (its `generator_ema` if `ema` and present, else
        `generator`). `lora`: a LoRA (peft's state dict, or LongLive's `generator_lora`) merged into the DiT at load,
        scaled by `lora_alpha` / rank (default: the student's alpha, else 1). `student`: a known student's preset
        (`sfpp.models.students.STUDENTS`: window, sink, chunk size, steps, EMA or not), else detected from the
        checkpoint's entries; `settings`, `ema`, `lora_alpha` override it. Weights are read tensor by tensor onto
        meta-device models: no second copy. `decoder="tiny"`: decode with TAEHV (`sfpp.models.taehv`) from
        `decoder_path`, by default taew2_1.safetensors or taew2_1.pth in the model directory. `memory` (`MEMORY_MODES`):
        "auto" fits the default video size into the device's free memory when it would not fit (`fit_memory`: the
        text encoder on the CPU, the VAE one latent frame per call, an fp8 KV cache unless `kv_dtype` is given, in
        that order, each only while needed, and says so), "low" applies them all, "full" none. `prompt_cache`:
        prompt embeddings kept on disk (`sfpp.pipeline.prompt_cache`; a folder, or True for the default one); by
        default on for umT5, whose encoding is the costly one. Unless given, `dtype`,
        `kernels` (a `WanModel.use_kernels` backend, or "none") and the option `cuda_graph` follow the device
        (`device_defaults`: the fast path on CUDA); other `options`: `compile`, `compile_options`, `kv_dtype`, and
        `parallel`: "ulysses" splits each stream over every process of the job started by torchrun (`set_parallel`;
        a bare "cuda" device becomes each rank's cuda:LOCAL_RANK), or a `ContextParallel` of one's own group."""
        from sfpp.models import wan_checkpoints as wc
        from sfpp.models.lora import load_lora
        from sfpp.models.students import detect_student, get_student

        _check_memory_mode(memory)
        parallel, device = _parallel_option(options, device)
        device, dtype, kernels, options = _resolve_options(device, dtype, kernels, options)
        path = Path(path)
        layout = wc.detect_layout(path) if path.is_dir() else None
        if layout is None and str(path) in SHIPPED_MODELS:
            path = SHIPPED_MODELS[str(path)]
            layout = wc.detect_layout(path) if path.is_dir() else None
        if layout is None:
            raise FileNotFoundError(
                f"{path} is not an sfpp model directory: {CONFIG_FILE} is missing (nor is it a Wan2.1 directory with "
                f"{wc.WAN_CONFIG}, or a diffusers one with {wc.DIFFUSERS_INDEX}, or the name of a shipped model: "
                f"{sorted(SHIPPED_MODELS)})"
            )
        read_dtype = dtype  # cast tensor by tensor while reading: never a second full copy
        raw = wc.read_weights(Path(checkpoint), dtype=read_dtype) if checkpoint is not None else None
        entries = wc.checkpoint_entries(raw) if raw is not None else set()
        if "generator_lora" in entries:
            raise CheckpointError(f"{checkpoint} is a LoRA adapter (generator_lora): pass it as lora=, with the base "
                                  "generator as checkpoint=")  # fmt: skip
        preset = get_student(student) if student is not None else None
        if preset is None and (checkpoint is not None or lora is not None):
            preset = detect_student(entries, lora is not None)
        if preset is not None and preset.needs_lora and lora is None:
            raise ValueError(f"the {preset.name} student is a base generator plus a LoRA: give lora= (--lora FILE) "
                             "as well, or the video would come from the base model alone")  # fmt: skip
        ema = (preset.ema if preset is not None else True) if ema is None else ema
        if layout == "sfpp":
            pipe = cls._from_sfpp_directory(path, load_dit=checkpoint is None, **options)
            if settings is not None:
                pipe.settings = settings
        else:
            load = wc.load_wan_directory if layout == "wan" else wc.load_diffusers_directory
            transformer, text_encoder, vae = load(path, dtype=read_dtype, load_dit_weights=checkpoint is None)
            pipe = cls(transformer, text_encoder, vae, settings=settings, **options)
        if checkpoint is not None:
            wc.load_checkpoint(pipe.transformer, raw, ema=ema, source=str(checkpoint))
        if lora is not None:
            alpha = lora_alpha if lora_alpha is not None else getattr(preset, "lora_alpha", None)
            load_lora(pipe.transformer, lora, alpha)
        if preset is not None:
            pipe.schedule = preset.schedule
            if settings is None:
                pipe.settings = replace(pipe.settings, frames_per_chunk=preset.frames_per_chunk, window=preset.window,
                                        sink=preset.sink)  # fmt: skip
        pipe.student = preset.name if preset is not None else None
        pipe.transformer.use_kernels(None if kernels == "none" else kernels)
        if decoder is not None:
            if decoder != "tiny":
                raise ValueError(f"decoder must be 'tiny' or None (the model's own), got {decoder!r}")
            pipe.check_decoder(TAEHVDecoder)  # before looking for weights: a model of other latents says so first
            pipe.set_decoder(TAEHVDecoder.from_file(decoder_path or TAEHVDecoder.weights_in(path)))
        if prompt_cache is None:
            prompt_cache = isinstance(pipe.text_encoder, UMT5TextEncoder)
        if prompt_cache is not False:
            pipe.prompt_cache = PromptCache(None if prompt_cache is True else prompt_cache)
        pipe.set_parallel(parallel)
        return pipe.to(device, dtype)._fit_memory_on_load(memory, kv_dtype_given="kv_dtype" in options)

    @classmethod
    def _from_sfpp_directory(cls, path: Path, *, load_dit: bool = True, **options) -> Pipeline:
        file = path / CONFIG_FILE
        try:
            meta = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"could not read {file}: {exc}") from exc
        parts = ("transformer", "text_encoder", "decoder")
        missing = [k for k in parts if k not in meta] if isinstance(meta, dict) else list(parts)
        if missing:
            raise CheckpointError(f"{file} has no {missing[0]!r} key (an sfpp model names each of {list(parts)})")
        with torch.device("meta"):
            transformer = WanModel(_from_entry(WanConfig.from_dict, meta["transformer"], file, "transformer"))
        if load_dit:
            weights = path / TRANSFORMER_FILE
            load_weights(transformer, load_file(weights), source=str(weights))
        schedule = dict(meta.get("schedule", {}))
        if "denoising_steps" in schedule:
            schedule["denoising_steps"] = tuple(schedule["denoising_steps"])
        return cls(
            transformer,
            _part(TEXT_ENCODERS, meta["text_encoder"], path, "text_encoder"),
            _part(DECODERS, meta["decoder"], path, "decoder"),
            schedule=_from_entry(lambda d: FlowMatchSchedule(**d), schedule, file, "schedule"),
            settings=_from_entry(lambda d: StreamSettings(**d), meta.get("settings", {}), file, "settings"),
            random_weights=meta.get("random_weights", False),
            **options,
        )

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

    def to(
        self,
        device: str | torch.device,
        dtype: torch.dtype | None = None,
        *,
        decoder_dtype: torch.dtype | None = None,
    ) -> Pipeline:
        """Move to a device; the DiT runs in `dtype` (default: the one it has), a VAE decoder in `decoder_dtype`
        (default: the DiT's); the text encoder keeps its own precision and goes to `text_encoder_device` if that is
        set (umT5 with offload keeps its weights on the CPU between prompts). Options (kernels, CUDA graphs) stay as
        they are: `from_pretrained(..., device=)` picks the device's defaults."""
        device = check_device(device)
        dtype = dtype or self.transformer.dtype
        self.transformer.to(device=device, dtype=dtype)
        self.text_encoder.to(device=self.text_encoder_device or device)
        if isinstance(self.decoder, torch.nn.Module):
            self.decoder.to(device=device, dtype=decoder_dtype or dtype)
        return self

    def check_decoder(self, decoder) -> None:
        """Raise ValueError unless `decoder` (an instance or a class) decodes this model's latent space: the same
        channels and spatial and temporal factors as the decoder it was trained with."""
        have, want = self.decoder, decoder

        def geometry(d) -> str:
            return f"{d.channels} channels, {d.spatial_factor}x spatial, {d.temporal_factor}x temporal"

        if (want.channels, want.spatial_factor, want.temporal_factor) != (
            have.channels,
            have.spatial_factor,
            have.temporal_factor,
        ):
            name = getattr(want, "__name__", type(want).__name__)
            raise ValueError(
                f"{name} decodes latents of {geometry(want)}, but this model's latents are those of its "
                f"{have.to_meta()['type']!r} decoder ({geometry(have)})"
            )

    def set_decoder(self, decoder) -> None:
        """Decode with `decoder` from now on, e.g. `TAEHVDecoder.from_file("taew2_1.pth")`: it must decode the same
        latent space (`check_decoder`). A module decoder moves to the pipeline's device and the DiT's dtype."""
        self.check_decoder(decoder)
        if isinstance(decoder, torch.nn.Module):
            decoder.to(device=self.device, dtype=self.transformer.dtype)
        self.decoder = decoder

    # --- generation

    def _plan(self, num_frames: int | None, seconds: float | None, height: int | None, width: int | None):
        s = self.settings
        if (num_frames is None) == (seconds is None):
            raise ValueError("give exactly one of num_frames= or seconds=")
        if seconds is not None:
            if not _is_number(seconds):
                raise TypeError(f"seconds must be a number, got {seconds!r} ({type(seconds).__name__})")
            if not seconds > 0:
                raise ValueError(f"seconds must be positive, got {seconds}")
            if math.isinf(seconds):
                raise ValueError(f"seconds must be finite, got {seconds}")
            num_frames = max(1, round(seconds * s.fps))
        num_frames = _integer(num_frames, "num_frames")
        if num_frames < 1:
            raise ValueError(f"num_frames must be a positive integer, got {num_frames}")
        height = s.height if height is None else _integer(height, "height")
        width = s.width if width is None else _integer(width, "width")
        multiple = self.decoder.spatial_factor * self.transformer.cfg.patch_size[1]
        if height % multiple or width % multiple or height < 1 or width < 1:
            raise ValueError(f"height and width must be positive multiples of {multiple}, got {height}x{width}")
        latent_frames = num_latent_frames(num_frames, self.decoder.temporal_factor)
        num_chunks = math.ceil(latent_frames / s.frames_per_chunk)
        return num_frames, num_chunks, height // self.decoder.spatial_factor, width // self.decoder.spatial_factor

    def _take_state(self, batch_size: int, frame_tokens: int) -> StreamState:
        """A KV cache and chunk runner for a new stream: a finished stream's of the same shape (a captured CUDA graph
        is reused with it), else new ones. Never one that a live stream holds."""
        model, s = self.transformer, self.settings
        options = tuple(sorted((k, repr(v)) for k, v in self.runner_options.items()))
        key = (batch_size, frame_tokens, s, model.dtype, self.kv_dtype, self.device, self.schedule, options,
               model.cache_heads)  # fmt: skip
        state = self._states.take(key)
        if state is None:
            kv = {} if self.kv_dtype is None else {"kv_dtype": self.kv_dtype}
            if model.parallel is not None:  # a clear error before any work: each rank takes 1/N of each frame
                model.parallel.check_tokens(frame_tokens)
            cache = RingKVCache(
                model.cfg,
                batch_size=batch_size,
                frame_tokens=frame_tokens,
                window=s.window,
                sink=s.sink,
                dtype=model.dtype,
                device=self.device,
                heads=model.cache_heads,
                **kv,
            )
            state = StreamState(key, cache, ChunkRunner(model, cache, self.schedule, **self.runner_options))
        return state

    def _give_state(self, state: StreamState) -> None:
        self._states.give(state)

    def memory_plan(self, batch_size: int = 1, height: int | None = None, width: int | None = None) -> MemoryPlan:
        """The device memory of one stream of this pipeline at this size (`sfpp.pipeline.memory`)."""
        s, dec = self.settings, self.decoder
        module = isinstance(dec, torch.nn.Module)
        return memory_plan(
            self.transformer.cfg,
            batch_size=batch_size,
            height=s.height if height is None else height,
            width=s.width if width is None else width,
            frames_per_chunk=s.frames_per_chunk,
            window=s.window,
            sink=s.sink,
            dtype=self.transformer.dtype,
            kv_dtype=self.kv_dtype,
            num_noises=num_noises(self.schedule),
            decoder=dec.to_meta()["type"],
            decoder_dtype=dec.dtype if module else None,
            decoder_params=sum(p.numel() for p in dec.parameters()) if module else 0,
            vae_base_dim=getattr(getattr(dec, "cfg", None), "base_dim", 96),
            decoder_frames_per_call=getattr(dec, "frames_per_call", None),
            spatial_factor=dec.spatial_factor,
            text_encoder_bytes=self._text_encoder_device_bytes(),
            parallel=1 if self.parallel is None else self.parallel.size,
        )

    def _text_encoder_device_bytes(self) -> int:
        """Bytes the text encoder holds on the DiT's device while it encodes (0 when it encodes elsewhere)."""
        te = self.text_encoder
        module = te.model if isinstance(te, UMT5TextEncoder) else te
        where = te.device if isinstance(te, UMT5TextEncoder) else next(te.parameters()).device
        if where != self.device:
            return 0
        return sum(p.numel() * p.element_size() for p in module.parameters())

    def fit_memory(self, memory: str = "low", *, budget: int | None = None, kv_dtype_given: bool = False) -> list[str]:
        """Save device memory, cheapest first, until `memory_plan()` (the default size, batch 1) fits `budget` bytes
        ("low": all of them): encode prompts on the CPU (the embeddings are cached on disk when a prompt cache is
        set), decode with the Wan VAE one latent frame per call (the same frames), and keep the KV cache in fp8
        (not when `kv_dtype_given`). Returns what it changed, in words."""
        _check_memory_mode(memory)
        if memory == "full":
            return []
        steps = [
            ("prompts encoded on the CPU",
             lambda: self.device.type != "cpu" and self._text_encoder_device_bytes() > 0, self._encode_on_cpu),
            ("the VAE decoding one latent frame per call",
             lambda: isinstance(self.decoder, WanVAE) and self.decoder.frames_per_call is None,
             lambda: setattr(self.decoder, "frames_per_call", 1)),
            ("an fp8 KV cache",
             lambda: not kv_dtype_given and self.kv_dtype != torch.float8_e4m3fn
             and unsupported(self.device, compile=self.runner_options["compile"], kv_dtype=torch.float8_e4m3fn) is None,
             lambda: setattr(self, "kv_dtype", torch.float8_e4m3fn)),
        ]  # fmt: skip
        done = []
        for what, applies, apply in steps:
            if memory == "auto" and self.memory_plan().peak <= (budget or 0):
                break
            if applies():
                apply()
                done.append(what)
        return done

    def _encode_on_cpu(self) -> None:
        self.text_encoder_device = torch.device("cpu")
        self.text_encoder.to(device="cpu")

    def _fit_memory_on_load(self, memory: str, *, kv_dtype_given: bool) -> Pipeline:
        """`from_pretrained(memory=)`: on CUDA, "auto" fits what this process can still use of the device; "low"
        applies every saving anywhere."""
        if memory == "auto" and self.device.type != "cuda":
            return self
        budget = None
        if memory == "auto":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free + torch.cuda.memory_allocated(self.device) - MEMORY_MARGIN  # our weights count in the plan
            need = self.memory_plan()
            if need.peak <= budget:
                return self
        before = self.memory_plan()
        done = self.fit_memory(memory, budget=budget, kv_dtype_given=kv_dtype_given)
        after = self.memory_plan()
        if memory == "auto":
            s = self.settings
            fits = "fits" if after.peak <= budget else "still does not fit"
            log.warning(
                "sfpp: a %dx%d stream needs %.1f GiB on %s, %.1f GiB of which can be used; to save memory: %s; it now "
                "needs %.1f GiB and %s (memory='full' keeps the defaults)", s.width, s.height, before.peak / GiB,
                self.device, budget / GiB, ", ".join(done) or "nothing left to change", after.peak / GiB, fits,
            )  # fmt: skip
        return self

    def _oom_error(self, exc: Exception, batch_size: int, height: int, width: int) -> torch.OutOfMemoryError:
        need = self.memory_plan(batch_size, height, width)
        have = ""
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            have = f"; the device has {free / 2**30:.2f} GiB free of {total / 2**30:.2f} GiB"
        return torch.OutOfMemoryError(
            f"out of memory on {self.device} generating batch {batch_size} at {width}x{height} with a window of "
            f"{self.settings.window} latent frames: this needs about {need.describe()}{have}. Try memory='low' "
            f"(sfpp generate --memory low), a smaller batch, resolution or window. ({exc})"
        )

    def encode_prompt(self, prompt: str | list[str]) -> Tensor:
        """[B, text_len, text_dim] on the DiT's device, in its dtype; read from the prompt cache where it has them."""
        prompts = _validate_prompt(prompt)
        with nvtx_range("text encoder"):
            if self.prompt_cache is not None:
                context = self.prompt_cache.encode(prompts, self.text_encoder)
            else:
                context = self.text_encoder.encode(prompts)
            return context.to(self.device, self.transformer.dtype)

    @torch.no_grad()
    def stream(
        self,
        prompt: str | list[str] | None = None,
        *,
        num_frames: int | None = None,
        seconds: float | None = None,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        schedule: list[tuple[float, str | list[str]]] | None = None,
        recache: bool = True,
        video: Tensor | np.ndarray | None = None,
        include_video: bool = True,
        progress: bool = True,
        return_latents: bool = False,
        noise_order: str = "sfpp",
    ) -> VideoStream:
        """A stream yielding the decoded frames of each chunk, uint8 [B, n, H, W, 3], as soon as it is denoised.

        Without `num_frames` or `seconds` the stream is endless (positions re-base past the RoPE table). It owns its
        state, so several streams of one pipeline may run interleaved. `schedule`: prompt switches as
        [(seconds, prompt), ...] (with `prompt` omitted, the first entry is at 0 s); `handle.set_prompt(...)` switches
        at the next chunk. `recache`: on a switch, recompute the cached frames' K/V under the new prompt (else only
        the text K/V change). `video`: frames [T, H, W, 3] (an image: [H, W, 3]) to continue from, encoded by the
        decoder's encoder and resized to the output's size (see `prepare_video`); the output starts with them when
        `include_video`. Lengths and schedule times count generated frames only. `noise_order="self-forcing"`
        draws the noise as Self-Forcing's inference does (`SelfForcingNoise`: all initial noise up front, then the
        re-noising draws), so a generator state gives its video; it needs a length. The default draws each chunk's
        noise as the chunk starts, which endless streams need."""
        if noise_order not in NOISE_ORDERS:
            raise ValueError(f"noise_order must be one of {list(NOISE_ORDERS)}, got {noise_order!r}")
        if prompt is None and not schedule:
            raise TypeError("prompt must be a string or a list of strings (or a schedule from 0 s), got None")
        switches = self._schedule(schedule, prompt is None)
        if prompt is None:
            prompt = switches.pop(0)[1]
        prompts = _validate_prompt(prompt)
        switches = [(frame, prompts_for(p, len(prompts), "a schedule's prompt")) for frame, p in switches]
        if num_frames is None and seconds is None:  # endless: only the size to check
            _, _, h, w = self._plan(1, None, height, width)
        else:
            num_frames, _, h, w = self._plan(num_frames, seconds, height, width)
        _validate_noise(generator, seed)
        if generator is None:
            if seed is None:
                seed = torch.seed()
                if self.parallel is not None:  # every rank must draw the same noise: rank 0's seed
                    seed = self.parallel.broadcast_int(seed % 2**62)
            generator = torch.Generator().manual_seed(int(seed))
        if video is not None:
            if not hasattr(self.decoder, "encode_frames"):
                raise ValueError(
                    f"continuing from given frames needs an encoder, and this pipeline's decoder "
                    f"({type(self.decoder).__name__}) has none: use a model with the Wan VAE or the toy codec"
                )
            sf = self.decoder.spatial_factor
            video = prepare_video(video, h * sf, w * sf, self.decoder.temporal_factor, len(prompts))
        noise = None
        if noise_order == "self-forcing":
            if num_frames is None:
                raise ValueError("noise_order='self-forcing' draws the whole video's noise up front: give a length")
            fc = self.settings.frames_per_chunk
            chunks = -(-num_latent_frames(num_frames, self.decoder.temporal_factor) // fc)
            shape = (len(prompts), self.transformer.cfg.in_channels, chunks * fc, h, w)
            noise = SelfForcingNoise(generator, shape, self.device)
        with torch_threads(self.threads_for_work):  # prompts (and given frames) are encoded as the stream starts
            return VideoStream(
                self,
                prompts,
                num_frames=num_frames,
                latent_size=(h, w),
                generator=generator,
                switches=switches,
                recache=recache,
                video=video,
                include_video=include_video,
                progress=progress and self.is_writer,  # split over ranks: one progress bar, rank 0's
                return_latents=return_latents,
                noise=noise,
            )

    def _schedule(self, schedule, starts_at_zero: bool) -> list[tuple[int, str | list[str]]]:
        """[(seconds, prompt), ...] -> [(first generated video frame of the prompt, prompt), ...]."""
        if schedule is None:
            return []
        entries = list(schedule) if isinstance(schedule, (list, tuple)) else None
        if not entries or not all(isinstance(e, (list, tuple)) and len(e) == 2 for e in entries):
            raise TypeError(f"schedule must be a non-empty list of (seconds, prompt) pairs, got {schedule!r}")
        times = [e[0] for e in entries]
        for t in times:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
                raise ValueError(f"schedule times must be finite seconds >= 0, got {t!r}")
        if any(a >= b for a, b in zip(times, times[1:], strict=False)):
            raise ValueError(f"schedule times must be strictly increasing, got {times}")
        if starts_at_zero != (times[0] == 0):
            rule = "start at 0 s when no prompt is given" if starts_at_zero else "be after 0 s (the prompt starts)"
            raise ValueError(f"schedule times must {rule}, got {times}")
        return [(math.ceil(t * self.settings.fps - 1e-9), p) for t, p in entries]

    def __call__(self, prompt: str | list[str] | None = None, **kwargs) -> PipelineOutput:
        """Generate whole videos: the frames of `stream(...)` concatenated. Same arguments as `stream`; a length
        (`num_frames=` or `seconds=`) is required."""
        if kwargs.get("num_frames") is None and kwargs.get("seconds") is None:
            raise ValueError("give exactly one of num_frames= or seconds= (only stream() runs without an end)")
        chunks = list(self.stream(prompt, return_latents=True, **kwargs))
        return PipelineOutput(frames=torch.cat([f for f, _ in chunks], 1), latents=torch.cat([z for _, z in chunks], 2))


def _parallel_option(options: dict, device) -> tuple[ContextParallel | None, torch.device | str]:
    """`parallel=` of from_pretrained/from_config (taken out of `options`): None, "ulysses" (the whole torchrun job,
    started here if need be) or a `ContextParallel`; and the rank's device."""
    parallel = options.pop("parallel", None)
    if parallel is None or parallel == "none" or isinstance(parallel, ContextParallel):
        return parallel if parallel != "none" else None, device
    if parallel != "ulysses":
        raise ValueError(f"parallel must be None, 'ulysses' or a ContextParallel, got {parallel!r}")
    device = rank_device(device)
    init_parallel(device)
    return ContextParallel.create(scheme=parallel), device


def _check_memory_mode(memory: str) -> None:
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {list(MEMORY_MODES)}, got {memory!r}")


def _from_entry(build, entry, file: Path, key: str):
    """`build(entry)` for the `key` entry of a model's JSON; a missing or unexpected field names the file and key."""
    try:
        return build(entry)
    except KeyError as exc:
        raise CheckpointError(f"{file}: the {key!r} entry has no {exc.args[0]!r} key") from exc
    except (TypeError, AttributeError) as exc:
        raise CheckpointError(f"{file}: the {key!r} entry does not fit ({exc})") from exc


def _part(registry: dict[str, type], meta: dict, directory: Path, key: str):
    file = directory / CONFIG_FILE
    kind = meta.get("type") if isinstance(meta, dict) else None
    if kind not in registry:
        raise CheckpointError(f"{file}: unknown {key!r} type {kind!r}; known: {sorted(registry)}")
    return _from_entry(lambda m: registry[kind].from_meta(m, directory), meta, file, key)
