"""The `sfpp` command line: `sfpp generate` writes a video, `sfpp bench` runs the benchmark suite.

Every error is one line on stderr and exit status 2 (1 for failed benchmark variants, 130 for Ctrl-C).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch

from sfpp import __version__, serve
from sfpp.model import CONFIGS
from sfpp.pipeline import (
    DTYPES,
    KERNELS,
    KV_DTYPES,
    SHIPPED_MODELS,
    Pipeline,
    StreamSettings,
    check_device,
    device_defaults,
)
from sfpp.taehv import TAEHVDecoder
from sfpp.video import check_output_path, export_to_video, read_video

DEFAULT_MODEL_DIR = SHIPPED_MODELS["default"]
DEFAULT_SECONDS = 5.0
# CPU threads of `sfpp generate` (--threads). Measured with the README's command on the shipped model on a 2-core
# machine shared with other work (bench/results/bench_threads-cpu-*.json): two threads were 10% faster when the cores
# were free, and 12x to 22x slower when other processes held them (median 221 s against 15 s for one thread).
DEFAULT_CPU_THREADS = 1


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (and no usage block) like every other sfpp error."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_decoder_options(parser: argparse.ArgumentParser) -> None:
    """--decoder and --decoder-weights, which `_load` reads (sfpp generate, sfpp serve)."""
    parser.add_argument(
        "--decoder",
        choices=["model", "tiny"],
        default="model",
        help="latents to pixels: the model's own decoder, or tiny = TAEHV for Wan2.1 latents (fast, preview quality)",
    )
    parser.add_argument(
        "--decoder-weights",
        metavar="PATH",
        help="TAEHV weights for --decoder tiny (default: taew2_1.safetensors or taew2_1.pth in the model directory)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sfpp",
        description="Streaming autoregressive video diffusion (Self-Forcing++ on a Wan2.1 DiT).",
    )
    parser.add_argument("--version", action="version", version=f"sfpp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    gen = sub.add_parser(
        "generate",
        help="generate a video from a text prompt and write it as an mp4",
        description="Generate a video chunk by chunk from a text prompt and write it as an H.264 mp4. On CUDA it "
        "runs the fast path by default (bf16, the fused kernels, CUDA graphs); on a CPU fp32 through plain torch.",
        epilog='example: sfpp generate --prompt "a big red circle moving fast over a striped grey background" -s 10',
    )
    gen.add_argument("-p", "--prompt", required=True, help="text describing the video")
    length = gen.add_mutually_exclusive_group()
    length.add_argument("-s", "--seconds", type=float, help=f"video length in seconds (default {DEFAULT_SECONDS:g})")
    length.add_argument("-n", "--num-frames", type=int, help="video length in frames")
    gen.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same video (default 0)")
    gen.add_argument(
        "-o", "--output", default="out.mp4", help="output .mp4 path, checked before generating (default out.mp4)"
    )
    model = gen.add_mutually_exclusive_group()
    model.add_argument(
        "--model", help=f"model directory, or a shipped model's name: {sorted(SHIPPED_MODELS)} (default: 'default')"
    )
    model.add_argument("--config", choices=sorted(CONFIGS), help="use RANDOM weights of a named config (for testing)")
    gen.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when there is one, else cpu)")
    gen.add_argument("--dtype", choices=sorted(DTYPES), help="DiT precision (default: bfloat16 on CUDA, else float32)")
    gen.add_argument(
        "--kv-dtype",
        choices=sorted(KV_DTYPES),
        help="self-attention KV cache: the DiT's dtype (default) or fp8 (half of bf16's memory)",
    )
    gen.add_argument(
        "--kernels",
        choices=KERNELS,
        help="backend of the fused cache write, ring attention and adaLN (sfpp.ops): auto picks the fastest "
        "available; none is the plain torch path (default: auto on CUDA, none on a CPU)",
    )
    gen.add_argument(
        "--cuda-graph",
        action=argparse.BooleanOptionalAction,
        help="capture each chunk as a CUDA graph and replay it (default: on with CUDA; an error on a CPU)",
    )
    gen.add_argument("--compile", action="store_true", help="torch.compile the chunk (first chunks compile: slower)")
    gen.add_argument(
        "--threads",
        type=int,
        help=f"CPU threads for torch (default on a CPU: {DEFAULT_CPU_THREADS}: the shipped model's small matmuls gain "
        "10%% from a second free core and lose up to 22x when other work holds it; on CUDA: torch's default)",
    )
    gen.add_argument(
        "--height",
        type=int,
        help="frame height in pixels (default: the model's); a multiple of the decoder's factor times the patch "
        "size: 8 for the shipped model, 16 for Wan2.1 and --config",
    )
    gen.add_argument("--width", type=int, help="frame width in pixels (default: the model's); same rule as --height")
    gen.add_argument("--window", type=int, help="KV-cache window in latent frames (default: the model's)")
    gen.add_argument("--sink", type=int, help="latent frames kept as attention sinks (default: the model's)")
    add_decoder_options(gen)
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    steer = gen.add_argument_group("steering and continuing")
    steer.add_argument(
        "--then",
        nargs=2,
        action="append",
        metavar=("TIME", "PROMPT"),
        help='switch to PROMPT at TIME seconds of generated video (10s or 10), repeatable: --then 10s "..." --then 20s '
        '"..."; the cached frames are re-encoded under the new prompt (KV re-cache)',
    )
    steer.add_argument("--no-recache", action="store_true", help="on a switch, change only the text (no KV re-cache)")
    steer.add_argument(
        "--from",
        dest="from_path",
        metavar="PATH",
        help="continue a video (mp4, ...) or start from an image (png, jpg): its frames are resized to the output "
        "size and come first in the output; --seconds counts the new frames",
    )
    steer.add_argument("--without-input", action="store_true", help="with --from: write only the new frames")
    bench = sub.add_parser(
        "bench",
        help="benchmark streaming FPS, latency and memory against Self-Forcing's inference path",
        description="Run the benchmark suite (bench/e2e.py); `sfpp bench --help` lists its options.",
        add_help=False,
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    serve.add_parser(sub)
    return parser


def bench(bench_args: list[str]) -> int:
    try:
        from bench import e2e
    except ImportError as exc:
        raise FileNotFoundError(
            f"the benchmark suite lives in the repository's bench/ folder, which this install lacks ({exc})"
        ) from exc
    return e2e.main(bench_args)


def _device(args: argparse.Namespace) -> torch.device:
    return check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _options(args: argparse.Namespace, device: torch.device) -> dict:
    """from_pretrained/from_config keywords from the knobs; left out where not given (the device's defaults). The
    knobs `sfpp serve` lacks count as not given."""
    options = {"device": device, "compile": getattr(args, "compile", False)}
    if args.dtype is not None:
        options["dtype"] = DTYPES[args.dtype]
    if getattr(args, "kernels", None) is not None:
        options["kernels"] = args.kernels
    if getattr(args, "cuda_graph", None) is not None:
        if args.cuda_graph and device.type != "cuda":
            raise ValueError(f"--cuda-graph needs a CUDA device, and this run is on {device}")
        options["cuda_graph"] = args.cuda_graph
    if getattr(args, "kv_dtype", None) is not None:
        kv_dtype, dtype = KV_DTYPES[args.kv_dtype], options.get("dtype", device_defaults(device)["dtype"])
        if kv_dtype not in (dtype, torch.float8_e4m3fn):
            name = next(k for k, v in DTYPES.items() if v == kv_dtype)
            raise ValueError(
                f"--kv-dtype {args.kv_dtype} needs --dtype {name}: the ring cache holds K/V in the DiT's dtype "
                f"({dtype}), or in fp8"
            )
        options["kv_dtype"] = kv_dtype
    return options


def _load(args: argparse.Namespace) -> Pipeline:
    """The pipeline of `sfpp generate` / `sfpp serve`: --model, else the shipped model, else random weights."""
    options = _options(args, _device(args))
    if args.decoder_weights is not None and args.decoder != "tiny":
        raise ValueError("--decoder-weights is the weights file of --decoder tiny: add --decoder tiny")
    tiny = {"decoder": "tiny", "decoder_path": args.decoder_weights} if args.decoder == "tiny" else {}
    if args.model:
        return Pipeline.from_pretrained(args.model, **options, **tiny)
    if args.config is None and (DEFAULT_MODEL_DIR / "sfpp_pipeline.json").is_file():
        return Pipeline.from_pretrained(DEFAULT_MODEL_DIR, **options, **tiny)
    pipe = Pipeline.from_config(args.config or "tiny", **options)
    if tiny:  # random weights have no model directory to look in
        if args.decoder_weights is None:
            raise ValueError("--decoder tiny with --config needs --decoder-weights PATH (TAEHV's taew2_1.pth)")
        pipe.set_decoder(TAEHVDecoder.from_file(args.decoder_weights))
    return pipe


def _why_random(args: argparse.Namespace) -> str:
    """Why `_load` gave a pipeline with random weights, in the user's terms."""
    if args.config is not None:
        return f"--config {args.config} builds RANDOM weights (for testing)"
    if args.model:
        return f"the model in {args.model} has RANDOM weights"
    return f"no trained model is installed (nothing at {DEFAULT_MODEL_DIR}), so this uses RANDOM weights"


def _seconds(text: str) -> float:
    """'10s' or '10' -> 10.0, for --then."""
    try:
        return float(text[:-1] if text.endswith("s") else text)
    except ValueError:
        raise ValueError(f"--then TIME must be seconds such as 10s or 2.5, got {text!r}") from None


def generate(args: argparse.Namespace) -> int:
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    device = _device(args)
    threads = args.threads or (DEFAULT_CPU_THREADS if device.type == "cpu" else torch.get_num_threads())
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _generate(args, device)
    finally:
        torch.set_num_threads(previous)  # for callers of main() in the same process


def _generate(args: argparse.Namespace, device: torch.device) -> int:
    output = check_output_path(args.output)  # before any work: a bad path must not cost a whole generation
    seconds = DEFAULT_SECONDS if args.seconds is None and args.num_frames is None else args.seconds
    pipe = _load(args)
    if pipe.random_weights:
        print(
            f"sfpp: warning: {_why_random(args)}: the video is noise. It exercises the whole path: text encoder, DiT "
            "over the ring KV cache, decoder, mp4.",
            file=sys.stderr,
        )
    overrides = {k: getattr(args, k) for k in ("window", "sink") if getattr(args, k) is not None}
    if overrides:
        pipe.settings = StreamSettings(**{**pipe.settings.__dict__, **overrides})
    schedule = [(_seconds(when), prompt) for when, prompt in args.then] if args.then else None
    video = read_video(args.from_path) if args.from_path else None
    start = time.perf_counter()
    frames = []
    for chunk in pipe.stream(
        args.prompt,
        num_frames=args.num_frames,
        seconds=seconds,
        height=args.height,
        width=args.width,
        seed=args.seed,
        progress=not args.quiet,
        schedule=schedule,
        recache=not args.no_recache,
        video=video,
        include_video=not args.without_input,
    ):
        frames.append(chunk[0])
    video = torch.cat(frames)
    elapsed = time.perf_counter() - start
    path = export_to_video(video, output, fps=pipe.fps)
    print(
        f"wrote {path}: {video.shape[0]} frames {video.shape[2]}x{video.shape[1]} at {pipe.fps} fps "
        f"({video.shape[0] / pipe.fps:.1f} s of video) in {elapsed:.1f} s on {device}"
    )
    return 0


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"sfpp: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        # `sfpp bench ...` hands every option to the suite's own parser (so `sfpp bench --help` shows them).
        args = argparse.Namespace(command="bench") if argv[:1] == ["bench"] else _parser().parse_args(argv)
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            if args.command == "generate":
                return generate(args)
            if args.command == "serve":
                return serve.run(args)
            return bench(argv[1:])
    except (ValueError, TypeError, FileNotFoundError, torch.OutOfMemoryError) as exc:
        print(f"sfpp: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sfpp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
