"""The sfpp benchmark suite: streaming FPS, first-chunk latency, peak memory and time per chunk over long videos,
for sfpp's variants and Self-Forcing's inference path, in one run on one device.

    sfpp bench                                   # on a GPU: wan2.1-1.3b, 832x480, 4 steps, chunks of 3, window 21
    sfpp bench --config tiny --height 32 --width 32 --vae-base-dim 8 --frames-per-chunk 2 --window 4 --chunks 1 \
        --long-frames 8                         # CPU smoke: seconds

Random weights (the time of a step does not depend on their values; nothing to download). The text encoder is not
on the device: the prompt embedding is made once beforehand, as the offloaded umT5 leaves it. Per variant:
- a warm-up video (fills the ring; compiles or captures the CUDA graph), then a timed video from a reset cache;
- first-chunk latency: the timed video's first chunk, noise to uint8 pixels on the device, DiT + VAE;
- steady state (medians over the chunks after the ring has filled): DiT time, VAE streaming-decode time, FPS;
- time per chunk against chunk index, out to --long-frames latent frames for the --long variants (flat: the ring
  never grows); peak GPU memory (torch.cuda.max_memory_allocated) over the variant.
Variants: sfpp in each --modes x --kv-dtypes, and "baseline" (sfpp/benchmark/baseline.py: Self-Forcing's path, its cache
rolled by copying, Wan-style VAE decoding one latent frame per call). Unless told otherwise it benchmarks what
`sfpp generate` runs by default on the device (on CUDA: bf16, the fused kernels, CUDA graphs first). A variant the
device cannot run (CUDA graphs on a CPU, ...) is skipped with the reason; a variant that fails makes the exit
status 1 (unless --keep-going). Writes a table and e2e-<device>-<date>.json into --out-dir (default: the current
directory).
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from sfpp.benchmark.baseline import SelfForcingBaseline
from sfpp.benchmark.record import save
from sfpp.engine.cache import RingKVCache
from sfpp.engine.graph import ChunkRunner
from sfpp.engine.sampler import FlowMatchSchedule, num_noises, nvtx_range
from sfpp.models.dit import CONFIGS, WanModel, get_config
from sfpp.models.vae import WanVAE, WanVAEConfig
from sfpp.pipeline import DTYPES, KERNELS, KV_DTYPES, check_device, device_defaults, unsupported

MODES = {
    "eager": {},
    "compile": {"compile": True},
    "graph": {"cuda_graph": True},
    "compile+graph": {"compile": True, "cuda_graph": True},
}
TARGETS = {"e2e_fps": 30.0, "dit_fps": 45.0, "first_chunk_s": 0.5, "peak_gib": 10.0, "speedup": 2.0}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _short(dtype: torch.dtype) -> str:
    return next(k for k, v in KV_DTYPES.items() if v == dtype)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sfpp bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default="wan2.1-1.3b", choices=sorted(CONFIGS), help="DiT size (default wan2.1-1.3b)")
    p.add_argument("--height", type=int, default=480, help="frame height in pixels, a multiple of 16 (default 480)")
    p.add_argument("--width", type=int, default=832, help="frame width in pixels, a multiple of 16 (default 832)")
    p.add_argument("--frames-per-chunk", type=int, default=3, help="latent frames per chunk (default 3)")
    p.add_argument("--window", type=int, default=21, help="KV-cache window in latent frames (default 21)")
    p.add_argument("--steps", default="1000,750,500,250", help="denoising steps (default: Self-Forcing's 4)")
    p.add_argument("--chunks", type=int, default=20, help="timed chunks after the ring has filled (default 20)")
    p.add_argument("--long-frames", type=int, default=1000, help="latent frames of the long run (time vs chunk)")
    p.add_argument("--long", default="first,baseline", help="variants given the long run ('first': the first one)")
    p.add_argument(
        "--modes",
        help=f"comma-separated, of {sorted(MODES)} (default: graph,compile+graph,compile,eager on CUDA; "
        "eager,compile on a CPU)",
    )
    p.add_argument(
        "--kv-dtypes",
        help=f"comma-separated KV cache dtypes, of {sorted(KV_DTYPES)}; a bf16/fp16/fp32 cache runs its DiT in that "
        "dtype (default: the DiT's dtype and fp8)",
    )
    p.add_argument("--no-baseline", action="store_true", help="skip Self-Forcing's path")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="DiT/VAE dtype (default: bfloat16 on CUDA, "
                   "float32 on a CPU)")  # fmt: skip
    p.add_argument("--vae-base-dim", type=int, default=96, help="VAE width (96 is Wan2.1's)")
    p.add_argument("--vae-frames-per-call", type=int, default=None, help="latent frames per VAE decoder call "
                   "(default: the whole chunk; 1 needs less activation memory)")  # fmt: skip
    p.add_argument(
        "--kernels",
        choices=KERNELS,
        help="sfpp.engine.ops backend of the fused cache write, ring attention and adaLN; none: the plain torch path "
        "(default: auto on CUDA, none on a CPU, as sfpp generate)",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when there is one, else cpu)")
    p.add_argument("--profile", action="store_true", help="also write a torch.profiler table of the first variant")
    p.add_argument("--out-dir", default=".", help="folder for the JSON (default: the current directory)")
    p.add_argument("--keep-going", action="store_true", help="exit 0 even when variants fail (they are reported)")
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The options, with the device's defaults filled in where not given."""
    p = parser()
    args = p.parse_args(argv)
    try:
        device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except ValueError as exc:
        p.error(str(exc))
    args.device = str(device)
    defaults = device_defaults(device)
    args.dtype = args.dtype or next(k for k, v in DTYPES.items() if v == defaults["dtype"])
    args.kernels = args.kernels or defaults["kernels"]
    cuda = device.type == "cuda"
    args.modes = (args.modes or ("graph,compile+graph,compile,eager" if cuda else "eager,compile")).split(",")
    args.kv_dtypes = (args.kv_dtypes or f"{_short(DTYPES[args.dtype])},fp8").split(",")
    for m in args.modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}; choose from {sorted(MODES)}")
    for k in args.kv_dtypes:
        if k not in KV_DTYPES:
            p.error(f"unknown KV dtype {k!r}; choose from {sorted(KV_DTYPES)}")
    if args.height % 16 or args.width % 16 or args.height < 16 or args.width < 16:
        p.error(f"height and width must be positive multiples of 16, got {args.height}x{args.width}")
    return args


def skip_reason(device: torch.device, mode: str, kv: str) -> str | None:
    """Why this device cannot run a variant (it is skipped, not failed), or None."""
    if MODES[mode].get("cuda_graph") and device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    return unsupported(device, compile=MODES[mode].get("compile", False), kv_dtype=KV_DTYPES[kv])


class Harness:
    """The model, VAE and prompt embedding shared by every variant, and the timing loop."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.device = args, torch.device(args.device)
        dtype = DTYPES[args.dtype]
        self.dtype, self.cfg = dtype, get_config(args.config)
        torch.manual_seed(0)
        with torch.device(self.device):
            self.model = WanModel(self.cfg).to(dtype).eval()
            self.vae = WanVAE(WanVAEConfig(base_dim=args.vae_base_dim)).to(dtype).eval()
        self.h, self.w = args.height // 8, args.width // 8
        self.frame_tokens = (self.h // 2) * (self.w // 2)
        self.shape = (1, self.cfg.in_channels, args.frames_per_chunk, self.h, self.w)
        self.context = torch.randn(1, self.cfg.text_len, self.cfg.text_dim, device=self.device, dtype=dtype)
        self.schedule = FlowMatchSchedule(denoising_steps=tuple(int(s) for s in args.steps.split(",")))
        self.fill = math.ceil(args.window / args.frames_per_chunk)  # chunks until the ring is full
        self.video_frames = args.frames_per_chunk * self.vae.temporal_factor  # per chunk, in steady state
        self.num_noises = num_noises(self.schedule)
        self._cast: WanModel | None = None  # the DiT in another dtype, for a bf16/fp16/fp32 cache unlike --dtype

    def model_for(self, kv_dtype: torch.dtype) -> WanModel:
        """The DiT a cache of `kv_dtype` works with: the ring cache holds K/V in the DiT's dtype, or in fp8."""
        if kv_dtype in (self.dtype, torch.float8_e4m3fn):
            return self.model
        if self._cast is None or self._cast.dtype != kv_dtype:
            self._cast = None
            gc.collect()
            self._cast = copy.deepcopy(self.model).to(kv_dtype)
        return self._cast

    def noise(self, gen: torch.Generator) -> torch.Tensor:
        return torch.randn((self.num_noises, *self.shape), generator=gen, device=self.device, dtype=torch.float32)

    def video(self, step, decoder, num_chunks: int, gen: torch.Generator) -> tuple[list[float], list[float]]:
        """Run one video chunk by chunk; per-chunk seconds of the DiT and of the streaming decode."""
        dit, dec = [], []
        for _ in range(num_chunks):
            sync(self.device)
            t0 = time.perf_counter()
            latents = step(self.noise(gen))
            sync(self.device)
            t1 = time.perf_counter()
            with nvtx_range("decode"):
                frames = decoder.decode(latents)
            sync(self.device)
            dit.append(t1 - t0)
            dec.append(time.perf_counter() - t1)
            del frames
        return dit, dec

    def run(self, name: str, new_video, frames_per_call: int | None, long: bool) -> dict:
        """`new_video()` -> a chunk step for a fresh video (the variant's cache reset or rebuilt)."""
        dev, args = self.device, self.args
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        gen = torch.Generator(dev).manual_seed(0)
        self.video(new_video(), self.vae.stream(frames_per_call=frames_per_call), self.fill + 2, gen)  # warm-up
        total = math.ceil(args.long_frames / args.frames_per_chunk) if long else self.fill + args.chunks
        total = max(total, self.fill + 1)
        dit, dec = self.video(new_video(), self.vae.stream(frames_per_call=frames_per_call), total, gen)
        steady_dit, steady_dec = statistics.median(dit[self.fill :]), statistics.median(dec[self.fill :])
        tail = dit[-max(1, len(dit) // 10) :]
        return {
            "variant": name,
            "first_chunk_s": dit[0] + dec[0],
            "dit_chunk_ms": 1e3 * steady_dit,
            "decode_chunk_ms": 1e3 * steady_dec,
            "dit_fps": self.video_frames / steady_dit,
            "e2e_fps": self.video_frames / (steady_dit + steady_dec),
            "peak_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
            "latent_frames": total * args.frames_per_chunk,
            # Flatness: late chunks against the first chunks after the ring filled (1.0 = flat).
            "late_over_early": statistics.median(tail) / statistics.median(dit[self.fill : self.fill + len(tail)]),
            "dit_ms_per_chunk": [round(1e3 * t, 3) for t in dit],
            "decode_ms_per_chunk": [round(1e3 * t, 3) for t in dec],
        }

    # --- the variants

    def cache_and_model(self, kv: str) -> tuple[RingKVCache, WanModel]:
        kv_dtype = KV_DTYPES[kv]
        model = self.model_for(kv_dtype)
        cache = RingKVCache(
            self.cfg,
            batch_size=1,
            frame_tokens=self.frame_tokens,
            window=self.args.window,
            dtype=model.dtype,
            device=self.device,
            kv_dtype=kv_dtype,
        )
        return cache, model

    def sfpp(self, mode: str, kv: str, long: bool) -> dict:
        cache, model = self.cache_and_model(kv)
        text_kv = model.text_kv(self.context.to(model.dtype))
        if MODES[mode].get("compile"):
            torch._dynamo.reset()  # each compiled variant compiles afresh (in its warm-up), within the recompile limit
        runner = ChunkRunner(model, cache, self.schedule, **MODES[mode])

        def new_video():
            cache.reset()
            cache.set_text(text_kv)  # a captured graph stays valid: the cache is reset in place
            return runner

        result = self.run(f"{mode}-{kv}", new_video, self.args.vae_frames_per_call, long)
        result["dit_dtype"] = str(model.dtype).replace("torch.", "")
        result["kv_cache_mib"] = cache.nbytes / 2**20
        result["graph_replays"] = runner.replays
        return result

    def baseline(self, long: bool) -> dict:
        holder = {}

        def new_video():
            holder.pop("b", None)
            gc.collect()
            b = SelfForcingBaseline(
                self.model, self.schedule, batch_size=1, frame_tokens=self.frame_tokens, window=self.args.window
            )
            b.set_text(self.context)
            holder["b"] = b
            return b

        result = self.run("baseline", new_video, 1, long)  # Wan's VAE decodes one latent frame per call
        result["kv_cache_mib"] = holder["b"].nbytes / 2**20
        return result


def profile(h: Harness, mode: str, kv: str, out_dir: Path) -> Path:
    """torch.profiler over a few steady-state chunks of one variant: where the chunk time goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cache, model = h.cache_and_model(kv)
    cache.set_text(model.text_kv(h.context.to(model.dtype)))
    runner = ChunkRunner(model, cache, h.schedule, **MODES[mode])
    gen = torch.Generator(h.device).manual_seed(0)
    decoder = h.vae.stream()
    h.video(runner, decoder, h.fill + 1, gen)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if h.device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        h.video(runner, decoder, 3, gen)
    sort = "cuda_time_total" if h.device.type == "cuda" else "cpu_time_total"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"profile-{mode}-{kv}-{h.device.type}.txt"
    path.write_text(prof.key_averages().table(sort_by=sort, row_limit=40) + "\n")
    prof.export_chrome_trace(str(path.with_suffix(".json")))
    return path


def _guarded(name: str, run, *args, **kwargs) -> dict:
    """One variant's results, or its error: a variant that fails (e.g. a compiler limitation) does not end the run."""
    try:
        result = run(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - reported in the table and the JSON
        print(f"  {name}: FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}", flush=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"variant": name, "error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
    print(f"  {name}: DiT {result['dit_fps']:.2f} fps, e2e {result['e2e_fps']:.2f} fps", flush=True)
    return result


def table(results: list[dict]) -> str:
    head = (
        "| variant | DiT FPS | e2e FPS | first chunk s | DiT ms/chunk | VAE ms/chunk | peak GiB | KV MiB | late/early |"
    )
    rows = [head, "|" + "---|" * 9]
    for r in results:
        if "error" in r or "skipped" in r:
            what = f"failed: {r['error'].splitlines()[0][:100]}" if "error" in r else f"skipped: {r['skipped']}"
            rows.append(f"| {r['variant']} | {what} |" + " |" * 7)
            continue
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        rows.append(
            f"| {r['variant']} | {r['dit_fps']:.2f} | {r['e2e_fps']:.2f} | {r['first_chunk_s']:.3f} | "
            f"{r['dit_chunk_ms']:.1f} | {r['decode_chunk_ms']:.1f} | {peak} | {r['kv_cache_mib']:.1f} | "
            f"{r['late_over_early']:.3f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Run the suite; 0 when every variant ran or was skipped (or --keep-going), else 1."""
    args = parse(argv)
    h = Harness(args)
    h.model.use_kernels(None if args.kernels == "none" else args.kernels)
    variants = [(m, k) for k in args.kv_dtypes for m in args.modes]
    long = set(args.long.split(","))
    results = []
    for i, (mode, kv) in enumerate(variants):
        name = f"{mode}-{kv}"
        reason = skip_reason(h.device, mode, kv)
        if reason:
            print(f"  {name}: skipped: {reason}", flush=True)
            results.append({"variant": name, "skipped": reason})
            continue
        results.append(_guarded(name, h.sfpp, mode, kv, long=name in long or ("first" in long and i == 0)))
    summary = {}
    if not args.no_baseline:
        base = _guarded("baseline", h.baseline, long="baseline" in long)
        ours = [r for r in results if "dit_fps" in r]
        results.append(base)
        if ours and "error" not in base:
            best = max(ours, key=lambda r: r["e2e_fps"])
            summary = {
                "best_variant": best["variant"],
                "e2e_speedup_vs_baseline": best["e2e_fps"] / base["e2e_fps"],
                "dit_speedup_vs_baseline": max(r["dit_fps"] for r in ours) / base["dit_fps"],
            }
    out_dir = Path(args.out_dir)
    record = {
        "config": args.config,
        "resolution": f"{args.width}x{args.height}",
        "dtype": str(h.dtype).replace("torch.", ""),
        "denoising_steps": list(h.schedule.denoising_steps),
        "frames_per_chunk": args.frames_per_chunk,
        "window": args.window,
        "kernels": args.kernels,
        "video_frames_per_chunk": h.video_frames,
        "text_encoder": "offloaded (prompt embedding precomputed, not on the device)",
        "targets": TARGETS,
        "summary": summary,
        "results": results,
    }
    runnable = [v for v in variants if skip_reason(h.device, *v) is None]
    if args.profile and runnable:
        record["profile"] = str(profile(h, *runnable[0], out_dir))
    path = save("e2e", h.device, record, out_dir, module="sfpp.benchmark.e2e")
    print(table(results))
    if summary:
        print(
            f"best {summary['best_variant']}: {summary['e2e_speedup_vs_baseline']:.2f}x the baseline end to end, "
            f"{summary['dit_speedup_vs_baseline']:.2f}x DiT alone"
        )
    print(f"-> {path}")
    failed = [r["variant"] for r in results if "error" in r]
    if failed:
        print(
            f"{len(failed)} of {len(results)} variants failed: {', '.join(failed)}"
            + (" (--keep-going: exit status 0)" if args.keep_going else ""),
            file=sys.stderr,
        )
    return 1 if failed and not args.keep_going else 0


if __name__ == "__main__":
    sys.exit(main())
