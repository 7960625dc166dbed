"""Time one chunk of the student (4 denoising passes + the context pass) over the ring KV cache, torch path.

    python -m bench.chunk_step --config wan2.1-1.3b --height 480 --width 832 --dtype bfloat16   # on a GPU
    python -m bench.chunk_step --config small --height 64 --width 64                           # on a CPU

Random weights: the time of a step does not depend on their values. Reports time per chunk, DiT-only frames per
second (each chunk of 3 latent frames is 12 video frames), cache memory and peak GPU memory.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from bench.common import parser, save
from sfpp.engine.cache import RingKVCache
from sfpp.engine.sampler import FlowMatchSchedule, denoise_chunk, draw_noises
from sfpp.models.dit import CONFIGS, WanModel, get_config
from sfpp.pipeline import DTYPES


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__)
    p.add_argument("--config", default="wan2.1-1.3b", choices=sorted(CONFIGS))
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames-per-chunk", type=int, default=3)
    p.add_argument("--window", type=int, default=21)
    p.add_argument("--chunks", type=int, default=10, help="timed chunks, after the ring has filled")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out-dir", default=None, help="where the JSON goes (default bench/results)")
    args = p.parse_args(argv)

    device, dtype, cfg = torch.device(args.device), DTYPES[args.dtype], get_config(args.config)
    torch.manual_seed(0)
    with torch.device(device):
        model = WanModel(cfg).to(dtype).eval()
    h, w = args.height // 8, args.width // 8
    frame_tokens = (h // 2) * (w // 2)
    cache = RingKVCache(cfg, batch_size=1, frame_tokens=frame_tokens, window=args.window, dtype=dtype, device=device)
    cache.set_text(model.text_kv(torch.randn(1, cfg.text_len, cfg.text_dim, device=device)))
    schedule, gen = FlowMatchSchedule(), torch.Generator(device).manual_seed(0)
    shape = (1, cfg.in_channels, args.frames_per_chunk, h, w)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    fill = -(-args.window // args.frames_per_chunk)  # chunks until the ring is full (and warm-up)
    times = []
    for i in range(fill + args.chunks):
        noises = draw_noises(schedule, shape, gen, device)
        sync(device)
        start = time.perf_counter()
        denoise_chunk(model.forward_chunk, cache, noises, schedule)
        cache.advance(args.frames_per_chunk)
        sync(device)
        if i >= fill:
            times.append(time.perf_counter() - start)

    chunk_s = statistics.median(times)
    video_frames = args.frames_per_chunk * 4
    results = {
        "config": args.config,
        "resolution": f"{args.width}x{args.height}",
        "dtype": args.dtype,
        "frames_per_chunk": args.frames_per_chunk,
        "window": args.window,
        "query_tokens": args.frames_per_chunk * frame_tokens,
        "key_tokens": args.window * frame_tokens,
        "chunk_ms_median": 1e3 * chunk_s,
        "chunk_ms_all": [1e3 * t for t in times],
        "dit_fps": video_frames / chunk_s,
        "cache_mib": cache.nbytes / 2**20,
        "peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }
    path = save("chunk_step", device, results, out_dir=Path(args.out_dir) if args.out_dir else None)
    print(
        f"{args.config} {results['resolution']} {args.dtype} on {device}: {results['chunk_ms_median']:.1f} ms/chunk, "
        f"DiT {results['dit_fps']:.2f} fps, cache {results['cache_mib']:.1f} MiB -> {path}"
    )
    return results


if __name__ == "__main__":
    main()
