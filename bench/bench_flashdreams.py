"""sfpp's chunk step against FlashDreams' (NVIDIA's `flashdreams`, its Wan2.1 Self-Forcing path) in the same process,
at the same shape, steps and window, on random weights of the real size: the ratio is measured, not quoted.

    python -m bench.bench_flashdreams                          # GPU: Wan2.1-1.3B, 832x480, window 21, bf16
    pip download flashdreams==0.1.0 -d .wheels                 # here, before a GPU run; then delete the torch,
    rm .wheels/torch-* .wheels/triton-* .wheels/nvidia_*       # triton and nvidia wheels (the GPU machine's own),
    pip install --no-index --find-links .wheels flashdreams    # and install it there (no package index there)

One chunk = 3 latent frames, 4 denoising passes and the context pass over a 21-frame KV window. sfpp: the chunk
runner with CUDA graphs and the dispatch table's kernels (what `Pipeline` runs on a GPU). FlashDreams: its
`DiffusionModel` (`generate` then `finalize`) with its own defaults, torch.compile and CUDA graphs. Both start from
a full ring (`--warmup` chunks first), then `--chunks` chunks are timed one by one, synchronised. The decoders
are left out of both (FlashDreams' published 425 ms per chunk is DiT 344 + context 74 + tiny decoder 7).
FlashDreams' kernels need CUDA (its RoPE kernel refuses CPU tensors): without a GPU, or without flashdreams, the
run says so in one line and times sfpp alone.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from bench.common import parser, save
from sfpp.engine.cache import RingKVCache
from sfpp.engine.graph import ChunkRunner
from sfpp.engine.sampler import FlowMatchSchedule
from sfpp.models.dit import WanModel, get_config

FRAMES_PER_CHUNK, STEPS, SHIFT = 3, (1000, 750, 500, 250), 5.0  # Self-Forcing's, in both


def timed(step, device: torch.device, warmup: int, chunks: int) -> list[float]:
    """ms of each of `chunks` calls of `step()` after `warmup` untimed ones, synchronised."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + chunks):
        sync()
        start = time.perf_counter()
        step()
        sync()
        if i >= warmup:
            times.append(1e3 * (time.perf_counter() - start))
    return times


def sfpp_step(cfg, h: int, w: int, window: int, device: torch.device, dtype: torch.dtype):
    with torch.device(device):
        model = WanModel(cfg).to(dtype).eval()
    model.use_kernels("auto" if device.type == "cuda" else "torch")
    cache = RingKVCache(cfg, batch_size=1, frame_tokens=(h // 2) * (w // 2), window=window, dtype=dtype, device=device)
    cache.set_text(model.text_kv(torch.randn(1, cfg.text_len, cfg.text_dim, device=device, dtype=dtype)))
    runner = ChunkRunner(model, cache, FlowMatchSchedule(denoising_steps=STEPS, shift=SHIFT), cuda_graph=True)
    gen = torch.Generator(device).manual_seed(0)
    return lambda: runner(runner.draw_noise((1, cfg.in_channels, FRAMES_PER_CHUNK, h, w), gen))


def flashdreams_step(cfg, h: int, w: int, window: int, device: torch.device, dtype: torch.dtype):
    """FlashDreams' chunk step, or the one-line reason it cannot run here."""
    if device.type != "cuda":
        return "flashdreams' kernels need CUDA (its RoPE kernel refuses CPU tensors)"
    try:
        from flashdreams.infra.diffusion.model.base import DiffusionModelConfig
        from flashdreams.infra.diffusion.scheduler.fm import FlowMatchSchedulerConfig
        from flashdreams.recipes.wan.transformer.impl.network import WanDiTNetworkConfig
        from flashdreams.recipes.wan.transformer.wan21 import Wan21TransformerConfig
    except ImportError as exc:
        return f"flashdreams is not installed ({exc}): see this script's --help"
    network = WanDiTNetworkConfig(dim=cfg.dim, ffn_dim=cfg.ffn_dim, num_heads=cfg.num_heads,
                                  num_layers=cfg.num_layers, text_dim=cfg.text_dim, text_len=cfg.text_len)  # fmt: skip
    transformer = Wan21TransformerConfig(network=network, dtype=dtype, len_t=FRAMES_PER_CHUNK, window_size_t=window)
    scheduler = FlowMatchSchedulerConfig(shift=SHIFT, denoising_timesteps=list(STEPS), num_inference_steps=len(STEPS))
    model = DiffusionModelConfig(transformer=transformer, scheduler=scheduler, seed=0).setup().to(device)
    text = torch.randn(1, cfg.text_len, cfg.text_dim, device=device, dtype=dtype)
    cache = model.transformer.initialize_autoregressive_cache(height=h, width=w, text_embeddings=text)
    index = iter(range(10**9))

    def step() -> None:
        _, state = model.generate(autoregressive_index=next(index), cache=cache)
        model.finalize(state)

    return step


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__)
    p.add_argument("--config", default="wan2.1-1.3b")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--window", type=int, default=21)
    p.add_argument("--warmup", type=int, default=9, help="untimed chunks first (default 9: the ring full, graphs in)")
    p.add_argument("--chunks", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out-dir", type=Path, default=None)
    args = p.parse_args(argv)
    if args.height % 16 or args.width % 16 or args.window % FRAMES_PER_CHUNK or min(args.warmup, args.chunks) < 1:
        p.error("--height/--width must be multiples of 16, --window of 3, --warmup and --chunks positive")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg, h, w = get_config(args.config), args.height // 8, args.width // 8
    rows = []
    for name, build in (("sfpp", sfpp_step), ("flashdreams", flashdreams_step)):
        torch.manual_seed(0)
        step = build(cfg, h, w, args.window, device, dtype)
        if isinstance(step, str):
            print(f"{name}: not run: {step}")
            rows.append({"engine": name, "skipped": step})
            continue
        ms = timed(step, device, args.warmup, args.chunks)
        rows.append({"engine": name, "ms_per_chunk_p50": statistics.median(ms), "ms_per_chunk_min": min(ms),
                     "ms_all": ms})  # fmt: skip
        print(f"{name}: {statistics.median(ms):.1f} ms per chunk (p50 of {len(ms)})", flush=True)
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ran = {r["engine"]: r["ms_per_chunk_p50"] for r in rows if "ms_per_chunk_p50" in r}
    results = {"config": args.config, "resolution": f"{args.width}x{args.height}", "window": args.window,
               "dtype": str(dtype), "chunks": args.chunks, "engines": rows}  # fmt: skip
    if len(ran) == 2:
        results["flashdreams_over_sfpp"] = ran["flashdreams"] / ran["sfpp"]
        print(f"FlashDreams / sfpp: {results['flashdreams_over_sfpp']:.2f}x")
    print(f"saved {save('bench_flashdreams', device, results, args.out_dir)}")
    return results


if __name__ == "__main__":
    main()
