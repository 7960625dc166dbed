"""Streaming decode time per chunk: the tiny decoder (TAEHV, sfpp.models.taehv) against the Wan VAE decoder
(sfpp.models.vae), in the same run, on random weights at the real channel configurations (the time does not depend
on the values).

    python -m bench.bench_decoders                            # GPU: 832x480 video = 60x104 latents, bf16
    python -m bench.bench_decoders --height 16 --width 16     # CPU: a small size, fp32

Each decoder decodes one stream of random latents chunk by chunk (`--frames` latent frames per chunk, as the pipeline
does); the first chunk and `--warmup` more are not timed (the first one also gives 3 frames fewer), then `--chunks`
chunks of 4 x frames video frames each are timed one by one (synchronised). Reports the median and min ms per chunk,
ms per video frame, this process's CPU time per chunk on a CPU (on a shared machine the wall clock also counts other
processes: the JSON records the load average), peak memory on a GPU, and the Wan VAE's time over the tiny decoder's.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

from bench.common import parser, save
from sfpp.models.taehv import TAEHVDecoder
from sfpp.models.vae import WanVAE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def time_stream(decoder, shape: tuple[int, ...], warmup: int, chunks: int, device: torch.device) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    stream = decoder.stream()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, cpu_times, frames = [], [], 0
    for i in range(1 + warmup + chunks):
        z = torch.randn(shape, generator=gen, device=device)
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        out = stream.decode(z)
        sync()
        if i > warmup:
            times.append((time.perf_counter() - start) * 1e3)
            cpu_times.append((time.process_time() - cpu_start) * 1e3)
            frames = out.shape[1]
    ms = statistics.median(times)
    row = {"ms_per_chunk": ms, "min_ms_per_chunk": min(times), "all_ms": times, "frames_per_chunk": frames}
    if device.type == "cpu":  # this process's CPU time: what a shared, loaded machine's wall clock hides
        row["cpu_ms_per_chunk"] = statistics.median(cpu_times)
    row["ms_per_frame"] = ms / frames
    row["output"] = list(out.shape)  # [B, frames, H, W, 3]
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__)
    p.add_argument("--height", type=int, default=60, help="latent rows (video height / 8); default 60 = 480 px")
    p.add_argument("--width", type=int, default=104, help="latent columns; default 104 = 832 px")
    p.add_argument("--frames", type=int, default=3, help="latent frames per chunk (default 3, the pipeline's)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=None, help="untimed chunks after the first (default: 3 GPU, 0 CPU)")
    p.add_argument("--chunks", type=int, default=None, help="timed chunks (default: 20 GPU, 3 CPU)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on a GPU, float32 on CPU")
    p.add_argument("--decoders", default="tiny,wan-vae", help="comma-separated, of: tiny, wan-vae")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bfloat16" if gpu else "float32")]
    warmup = args.warmup if args.warmup is not None else (3 if gpu else 0)
    chunks = args.chunks if args.chunks is not None else (20 if gpu else 3)
    if gpu:
        torch.backends.cudnn.benchmark = True  # both decoders are convolutions at fixed shapes
    shape = (args.batch, 16, args.frames, args.height, args.width)
    print(f"latents {list(shape)} -> video {8 * args.height}x{8 * args.width}, {dtype}, {device}")

    torch.manual_seed(0)
    makers = {"tiny": TAEHVDecoder, "wan-vae": WanVAE}
    rows = []
    for name in args.decoders.split(","):
        decoder = makers[name]().eval().to(device=device, dtype=dtype)
        params = sum(p.numel() for n, p in decoder.named_parameters() if not n.startswith("encoder."))
        with torch.no_grad():
            r = {"decoder": name, "decoder_params": params, **time_stream(decoder, shape, warmup, chunks, device)}
        rows.append(r)
        del decoder
        print(
            f"{name:8s} {r['ms_per_chunk']:10.1f} ms/chunk (min {r['min_ms_per_chunk']:.1f}) {r['ms_per_frame']:8.2f} "
            f"ms/frame, {r['frames_per_chunk']} frames/chunk, {params / 1e6:.1f} M parameters"
        )
    results = {
        "load_average_1min": os.getloadavg()[0],  # other processes on the machine, at the end of the run
        "latent_shape": list(shape),
        "dtype": str(dtype),
        "warmup_chunks": warmup,
        "timed_chunks": chunks,
        "decoders": rows,
    }
    by_name = {r["decoder"]: r for r in rows}
    if {"tiny", "wan-vae"} <= by_name.keys():
        vae, tiny = by_name["wan-vae"], by_name["tiny"]
        results["wan_vae_over_tiny"] = vae["ms_per_chunk"] / tiny["ms_per_chunk"]
        print(f"the Wan VAE takes {results['wan_vae_over_tiny']:.1f}x the tiny decoder's time per chunk")
        if not gpu:
            results["wan_vae_over_tiny_cpu_time"] = vae["cpu_ms_per_chunk"] / tiny["cpu_ms_per_chunk"]
            print(f"and {results['wan_vae_over_tiny_cpu_time']:.1f}x its CPU time")
    path = save("bench_decoders", device, results, Path(args.out_dir) if args.out_dir else None)
    print(f"saved {path}")
    return results


if __name__ == "__main__":
    main()
