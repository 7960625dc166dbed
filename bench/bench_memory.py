"""Device memory of one stream in each memory mode: the memory model's plan (sfpp.pipeline.memory) against the peak
the CUDA caching allocator reports for the real pipeline, in the same run, on random weights (memory does not
depend on the values).

    python -m bench.bench_memory                                   # GPU: Wan2.1-1.3B at 832x480, window 21, bf16
    python -m bench.bench_memory --config tiny --height 64 --width 64 --vae-base-dim 8    # CPU: the plan only

Each mode generates `--chunks` chunks through `Pipeline.__call__` (CUDA graphs and all, as a user runs it) after
resetting the allocator's peak; the JSON has, per mode, the plan's parts and peak, the measured peak allocated and
reserved GiB (reserved - allocated is the allocator's fragmentation, which the plan leaves out) and their ratio.
The text encoder is the byte-level stand-in (umT5-XXL's 10.6 GiB are a parameter count, tested exactly). On a CPU
nothing is measured: the run checks the modes build and generate.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from bench.common import parser, save
from sfpp.models.taehv import TAEHVDecoder
from sfpp.models.vae import WanVAE, WanVAEConfig
from sfpp.pipeline import Pipeline, StreamSettings
from sfpp.pipeline.memory import GiB

# mode -> (KV dtype, Wan VAE latent frames per call, decoder): the rows of the README's table that a GPU can run here.
MODES = {
    "bf16 KV, VAE per chunk": (None, None, "wan-vae"),
    "bf16 KV, VAE per latent frame": (None, 1, "wan-vae"),
    "fp8 KV, VAE per latent frame": (torch.float8_e4m3fn, 1, "wan-vae"),
    "fp8 KV, tiny decoder": (torch.float8_e4m3fn, None, "taehv"),
}


def measure(pipe: Pipeline, chunks: int) -> dict:
    """GiB: the plan's parts and peak, and on CUDA the allocator's peak allocated and reserved bytes."""
    device = pipe.device
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    s = pipe.settings
    num_frames = 1 + 4 * (chunks * s.frames_per_chunk - 1)  # video frames of `chunks` chunks (Wan VAE's count)
    pipe("a red ball", num_frames=num_frames, seed=0, progress=False)
    plan = pipe.memory_plan()
    row = {f"plan_{k}_gib": v / GiB for k, v in plan.parts().items()}
    row["plan_peak_gib"] = plan.peak / GiB
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        row["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GiB
        row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GiB
        row["allocated_over_plan"] = row["peak_allocated_gib"] / row["plan_peak_gib"]
    return row


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--config", default="wan2.1-1.3b")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--window", type=int, default=21)
    p.add_argument("--chunks", type=int, default=3, help="chunks generated per mode (default: 3)")
    p.add_argument("--vae-base-dim", type=int, default=96, help="the Wan VAE's width (96 in Wan2.1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out-dir", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    settings = StreamSettings(height=args.height, width=args.width, window=args.window)
    pipe = Pipeline.from_config(args.config, settings=settings, device=device, memory="full")
    decoders = {"wan-vae": WanVAE(WanVAEConfig(base_dim=args.vae_base_dim)), "taehv": TAEHVDecoder()}
    results = {"config": args.config, "height": args.height, "width": args.width, "window": args.window,
               "chunks": args.chunks, "dtype": str(pipe.transformer.dtype), "modes": []}  # fmt: skip
    for name, (kv_dtype, frames_per_call, decoder) in MODES.items():
        if decoder == "taehv" and (args.height % 16 or args.width % 16):
            continue
        pipe.kv_dtype = kv_dtype
        pipe.set_decoder(decoders[decoder])
        decoders["wan-vae"].frames_per_call = frames_per_call
        row = {"mode": name, **measure(pipe, args.chunks)}
        results["modes"].append(row)
        got = f"allocated {row['peak_allocated_gib']:.2f} GiB" if "peak_allocated_gib" in row else "not measured"
        print(f"{name:32s} plan {row['plan_peak_gib']:6.2f} GiB  {got}", flush=True)
    print(f"saved {save('bench_memory', device, results, args.out_dir)}")


if __name__ == "__main__":
    main()
