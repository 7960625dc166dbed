"""The device memory one stream needs, as a model, and the meta-device measurement that checks it.

peak = DiT weights + KV ring (self-attention K/V, fp8 scales, text K/V) + decoder weights + decoder state
       + max(activations of one chunk, of one decoder call, the text encoder's weights while it encodes there)

Those three never coexist: a prompt is encoded, then a chunk denoised, then decoded. `memory_plan` computes
each term from the configs alone; `measure_on_meta` runs the same work (the chunk runner over the ring, the
decoder's stream) on the meta device, where tensors have sizes but no storage, and counts every byte the
dispatcher allocates and frees: tests/test_memory.py compares the two at Wan2.1-1.3B's and 14B's full sizes.
The fused ops (ring attention, cache write, adaLN) count as their outputs, as their kernels allocate; the
cross-attention is counted as torch's math path holds it ([B, H, L, 512] fp32 scores), which flash attention on a
GPU does not, so the activation term is an upper bound there. Not modelled: the CUDA context and cuBLAS
workspaces (about 0.5 GiB), and the caching allocator's fragmentation, which the GPU campaign measures.
`sfpp memory` prints the table the README quotes (`table`).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, fields

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sfpp.models.dit import WanConfig, get_config

GiB = 2**30

# Decoders' memory per output pixel (batch x height x width), in elements of the decoder's dtype: (the state it keeps
# between chunks, the activations of one call per latent frame it decodes). Measured with `measure_on_meta` at
# 832x480 and checked at other sizes, batches and widths by tests/test_memory.py. The Wan VAE's scale with its
# base_dim (96 in Wan2.1): its causal convolutions keep the last frames of every feature map (about 25
# full-resolution maps of base_dim channels), and a call holds about 26 such maps per latent frame (4 video
# frames), so decoding a chunk one latent frame per call (`WanVAE.frames_per_call = 1`, the same frames) cuts its
# activations by 3. The toy world's decoders ("preview", "patch-pca") hold kilobytes and are not modelled.
DECODER_UNITS = {"wan-vae": (24.63, 26.3), "taehv": (84.0, 512.0)}  # wan-vae's: per base_dim channel
# umT5-XXL's encoder (Wan2.1's text encoder): parameters, from its config (d_model 4096, 24 layers, d_ff 10240, a
# 256384-token vocabulary, 32 relative-position buckets per head and layer).
UMT5_XXL_PARAMS = 256384 * 4096 + 24 * (4 * 4096 * 4096 + 3 * 4096 * 10240 + 2 * 4096 + 32 * 64) + 4096


def dit_parameters(cfg: WanConfig) -> int:
    """Parameters of `WanModel(cfg)`, in closed form."""
    d, f, p = cfg.dim, cfg.ffn_dim, math.prod(cfg.patch_size)
    embed = (cfg.in_channels * p * d + d) + (cfg.text_dim * d + d) + (d * d + d) + (cfg.freq_dim * d + d)
    embed += (d * d + d) + (d * 6 * d + 6 * d)  # text and time MLPs' second layers, the time projection
    attention = 4 * (d * d + d) + (2 * d if cfg.qk_norm else 0)
    block = 6 * d + 2 * attention + (2 * d if cfg.cross_attn_norm else 0) + (d * f + f + f * d + d)
    head = 2 * d + d * cfg.out_channels * p + cfg.out_channels * p
    return embed + cfg.num_layers * block + head


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes on the device, by part (see the module docstring); `peak` adds them up."""

    dit_weights: int
    kv_cache: int
    decoder_weights: int
    decoder_state: int
    text_encoder: int
    chunk_activations: int
    decoder_activations: int

    @property
    def static(self) -> int:
        """What stays on the device while the stream runs."""
        return self.dit_weights + self.kv_cache + self.decoder_weights + self.decoder_state

    @property
    def peak(self) -> int:
        """The static part plus the largest of what comes and goes: a chunk's activations, a decoder call's, and the
        text encoder's weights while it encodes on the device (at the start and at every prompt switch)."""
        return self.static + max(self.chunk_activations, self.decoder_activations, self.text_encoder)

    def parts(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def describe(self) -> str:
        parts = ", ".join(f"{k.replace('_', ' ')} {v / GiB:.2f}" for k, v in self.parts().items() if v)
        return f"{self.peak / GiB:.2f} GiB ({parts} GiB)"


def memory_plan(
    cfg: WanConfig,
    *,
    batch_size: int = 1,
    height: int = 480,
    width: int = 832,
    frames_per_chunk: int = 3,
    window: int = 21,
    sink: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    kv_dtype: torch.dtype | None = None,
    num_noises: int = 4,
    decoder: str = "wan-vae",
    decoder_dtype: torch.dtype | None = None,
    decoder_params: int = 0,
    vae_base_dim: int = 96,
    decoder_frames_per_call: int | None = None,
    spatial_factor: int = 8,
    text_encoder_bytes: int = 0,
    parallel: int = 1,
) -> MemoryPlan:
    """The device memory of one stream at this size (see the module docstring). `decoder`: a decoder type (those
    of `DECODER_UNITS`; the others hold next to nothing) with `decoder_params` parameters;
    `decoder_frames_per_call`: latent frames per Wan VAE call (None: the whole chunk); `text_encoder_bytes`: what
    the text encoder holds on the device while it encodes (0 when it runs on the CPU); `parallel`: the ranks of a
    context-parallel split (`sfpp.engine.parallel`), each holding 1/N of the self-attention K/V and of the chunk's
    tokens (weights, text K/V, latents and the decoder whole): one rank's memory."""
    elt = dtype.itemsize
    kv_dtype = kv_dtype or dtype
    d, heads, layers = cfg.dim, cfg.num_heads, cfg.num_layers
    h, w = height // spatial_factor, width // spatial_factor  # latent size
    frame_tokens = (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
    rows = batch_size * (sink + window) * frame_tokens
    kv = 2 * layers * rows * d * kv_dtype.itemsize // parallel  # a rank holds H/N heads
    if kv_dtype == torch.float8_e4m3fn:
        kv += 2 * layers * rows * heads * 4 // parallel  # fp32 scale per token and head
    kv += 2 * layers * batch_size * cfg.text_len * d * elt  # the prompt's cross-attention K/V

    # One chunk: the largest live set is inside a block (the fp32 residual stream and its modulated copy beside
    # either the FFN's hidden layer or the cross-attention's scores), plus the chunk's noises and latents in fp32.
    tokens = batch_size * frames_per_chunk * frame_tokens // parallel  # a rank's share of the chunk
    ffn = tokens * (2 * cfg.ffn_dim * elt + 2 * d * 4 + 3 * d * elt)
    cross = tokens * (2 * heads * cfg.text_len * 4 + 4 * d * 4 + 3 * d * elt)
    latents = (num_noises + 3) * batch_size * cfg.in_channels * frames_per_chunk * h * w * 4
    activations = max(ffn, cross) + latents

    dec_elt = (decoder_dtype or dtype).itemsize
    state_units, call_units = DECODER_UNITS.get(decoder, (0.0, 0.0))
    if decoder == "wan-vae":
        state_units, call_units = state_units * vae_base_dim, call_units * vae_base_dim
    pixels = batch_size * height * width
    per_call = frames_per_chunk if decoder_frames_per_call is None else min(decoder_frames_per_call, frames_per_chunk)
    return MemoryPlan(
        dit_weights=dit_parameters(cfg) * elt,
        kv_cache=kv,
        decoder_weights=decoder_params * dec_elt,
        decoder_state=round(state_units * pixels * dec_elt),
        text_encoder=text_encoder_bytes,
        chunk_activations=activations,
        decoder_activations=round(call_units * per_call * pixels * dec_elt),
    )


# ------------------------------------------------------------------------------------- the meta-device check


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every storage an op allocates while active, until it is freed: `peak` and `now`.
    Storages alive before (weights, caches) are not counted; views share their base's storage."""

    def __init__(self, existing: list[torch.Tensor]) -> None:
        super().__init__()
        self._known = {t.untyped_storage()._cdata for t in existing}
        self._live: dict[int, int] = {}
        self.now = self.peak = 0

    def reset_peak(self) -> None:
        self.peak = self.now

    def _free(self, key: int) -> None:
        self.now -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self._live or key in self._known:
                continue
            self._live[key] = storage.nbytes()
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._free, key)
        return out


def measure_on_meta(plan_args: dict, *, chunks: int = 3, decoder_module: torch.nn.Module | None = None) -> dict:
    """Run `chunks` chunks of a stream on the meta device at `memory_plan`'s arguments (the real chunk runner over
    a real ring, the decoder's real stream) and return what `memory_plan` models, measured: weights and cache
    from the allocated tensors, the chunk's and the decoder's peaks from `LiveBytes`."""
    from sfpp.engine.cache import RingKVCache
    from sfpp.engine.graph import ChunkRunner
    from sfpp.engine.sampler import FlowMatchSchedule
    from sfpp.models.dit import WanModel

    a = {**_defaults(), **plan_args}
    cfg, dtype, fc = a["cfg"], a["dtype"], a["frames_per_chunk"]
    h, w = a["height"] // a["spatial_factor"], a["width"] // a["spatial_factor"]
    with torch.device("meta"):
        model = WanModel(cfg).to(dtype)
    model.use_kernels("torch")  # on the meta device every backend runs its op's fake: the fused kernels' outputs
    frame_tokens = (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
    kv = {} if a["kv_dtype"] is None else {"kv_dtype": a["kv_dtype"]}
    cache = RingKVCache(cfg, batch_size=a["batch_size"], frame_tokens=frame_tokens, window=a["window"],
                        sink=a["sink"], dtype=dtype, device="meta", **kv)  # fmt: skip
    runner = ChunkRunner(model, cache, FlowMatchSchedule())  # its noises: memory_plan's num_noises
    context = torch.empty(a["batch_size"], cfg.text_len, cfg.text_dim, device="meta", dtype=dtype)
    existing = [*model.parameters(), *model.buffers(), *cache.buffers(), context]
    stream = None
    if decoder_module is not None:
        decoder_module = decoder_module.to(a["decoder_dtype"] or dtype)
        existing += [*decoder_module.parameters(), *decoder_module.buffers()]
        fpc = a["decoder_frames_per_call"]
        stream = decoder_module.stream(frames_per_call=fpc) if fpc is not None else decoder_module.stream()
    chunk_peak = decoder_peak = decoder_state = 0
    with LiveBytes(existing) as live:
        cache.set_text(model.text_kv(context))
        for _ in range(chunks):
            before = live.now  # the decoder's state, after the first chunk
            live.reset_peak()
            x0 = runner(runner.draw_noise((a["batch_size"], cfg.in_channels, fc, h, w), None))
            chunk_peak = max(chunk_peak, live.peak - before)
            if stream is not None:
                before = live.now
                live.reset_peak()
                stream.decode(x0)  # the frames are dropped at once
                decoder_peak = max(decoder_peak, live.peak - max(before, live.now))  # beyond the state it keeps
                decoder_state += live.now - before
            del x0
    return {
        "dit_weights": sum(p.nbytes for p in model.parameters()),
        "kv_cache": cache.nbytes,
        "decoder_weights": sum(p.nbytes for p in decoder_module.parameters()) if decoder_module is not None else 0,
        "decoder_state": decoder_state,
        "chunk_activations": chunk_peak,
        "decoder_activations": decoder_peak,
    }


def _defaults() -> dict:
    import inspect

    sig = inspect.signature(memory_plan)
    return {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}


# ----------------------------------------------------------------------------------------------- the table

# The configurations the README's table lists: Wan2.1-1.3B at 832x480, window 21, batch 1.
MODES = {
    "full": dict(kv_dtype=None, decoder="wan-vae", decoder_frames_per_call=None, text_on_device=True),
    "full, umT5 on the CPU": dict(kv_dtype=None, decoder="wan-vae", decoder_frames_per_call=None, text_on_device=False),
    "low: bf16 KV, VAE per latent frame": dict(kv_dtype=None, decoder="wan-vae", decoder_frames_per_call=1,
                                               text_on_device=False),
    "low: fp8 KV, VAE per latent frame": dict(kv_dtype=torch.float8_e4m3fn, decoder="wan-vae",
                                              decoder_frames_per_call=1, text_on_device=False),
    "low: fp8 KV, tiny decoder": dict(kv_dtype=torch.float8_e4m3fn, decoder="taehv", decoder_frames_per_call=None,
                                      text_on_device=False),
}  # fmt: skip


def table(config: str = "wan2.1-1.3b", *, window: int = 21, batch_size: int = 1, parallel: int = 1) -> str:
    """The memory modes' table (GiB by part and the peak) of one stream, or of one rank of a `parallel` split."""
    from sfpp.models.taehv import TAEHVDecoder
    from sfpp.models.vae import WanVAE

    cfg = get_config(config)
    with torch.device("meta"):
        params = {"wan-vae": sum(p.numel() for p in WanVAE().parameters()),
                  "taehv": sum(p.numel() for p in TAEHVDecoder().parameters())}  # fmt: skip
    umt5 = UMT5_XXL_PARAMS * 2
    head = ["mode", "DiT", "KV ring", "decoder", "umT5", "chunk", "decode", "peak GiB", "peak GB"]
    rows = []
    for name, m in MODES.items():
        p = memory_plan(cfg, window=window, batch_size=batch_size, kv_dtype=m["kv_dtype"], decoder=m["decoder"],
                        decoder_params=params[m["decoder"]], decoder_frames_per_call=m["decoder_frames_per_call"],
                        text_encoder_bytes=umt5 if m["text_on_device"] else 0, parallel=parallel)  # fmt: skip
        cells = [p.dit_weights, p.kv_cache, p.decoder_weights + p.decoder_state, p.text_encoder,
                 p.chunk_activations, p.decoder_activations]  # fmt: skip
        rows.append([name, *(f"{c / GiB:.2f}" for c in cells), f"{p.peak / GiB:.2f}", f"{p.peak / 1e9:.1f}"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])
