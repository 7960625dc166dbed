"""The `sfpp` command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from sfpp.model import CONFIGS
from sfpp.pipeline import DTYPES, Pipeline, StreamSettings
from sfpp.video import export_to_video, read_video

DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sfpp",
        description="Streaming autoregressive video diffusion (Self-Forcing++ on a Wan2.1 DiT).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser(
        "generate",
        help="generate a video from a text prompt and write it as an mp4",
        description="Generate a video chunk by chunk from a text prompt and write it as an H.264 mp4.",
        epilog='example: sfpp generate --prompt "a big red circle moving fast over a striped grey background" -s 10',
    )
    gen.add_argument("-p", "--prompt", required=True, help="text describing the video")
    length = gen.add_mutually_exclusive_group()
    length.add_argument("-s", "--seconds", type=float, help="video length in seconds (default 5)")
    length.add_argument("-n", "--num-frames", type=int, help="video length in frames")
    gen.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same video (default 0)")
    gen.add_argument("-o", "--output", default="out.mp4", help="output mp4 path (default out.mp4)")
    model = gen.add_mutually_exclusive_group()
    model.add_argument("--model", help="model directory (default: the shipped model)")
    model.add_argument("--config", choices=sorted(CONFIGS), help="use RANDOM weights of a named config (for testing)")
    gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    gen.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="DiT precision (default float32)")
    gen.add_argument("--height", type=int, help="frame height in pixels, a multiple of 16 (default: the model's)")
    gen.add_argument("--width", type=int, help="frame width in pixels, a multiple of 16 (default: the model's)")
    gen.add_argument("--window", type=int, help="KV-cache window in latent frames (default: the model's)")
    gen.add_argument("--sink", type=int, help="latent frames kept as attention sinks (default: the model's)")
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
    return parser


def bench(bench_args: list[str]) -> int:
    try:
        from bench import e2e
    except ImportError as exc:
        raise FileNotFoundError(
            f"the benchmark suite lives in the repository's bench/ folder: run `sfpp bench` from the repository "
            f"root ({exc})"
        ) from exc
    e2e.main(bench_args)
    return 0


def _load(args: argparse.Namespace) -> Pipeline:
    dtype = DTYPES[args.dtype]
    if args.model:
        return Pipeline.from_pretrained(args.model, device=args.device, dtype=dtype)
    if args.config is None and (DEFAULT_MODEL_DIR / "sfpp_pipeline.json").is_file():
        return Pipeline.from_pretrained(DEFAULT_MODEL_DIR, device=args.device, dtype=dtype)
    name = args.config or "tiny"
    return Pipeline.from_config(name, device=args.device, dtype=dtype)


def _seconds(text: str) -> float:
    """'10s' or '10' -> 10.0, for --then."""
    try:
        return float(text[:-1] if text.endswith("s") else text)
    except ValueError:
        raise ValueError(f"--then TIME must be seconds such as 10s or 2.5, got {text!r}") from None


def generate(args: argparse.Namespace) -> int:
    pipe = _load(args)
    if pipe.random_weights:
        print(
            "WARNING: this model has RANDOM weights (no trained model is installed): the video is noise. It "
            "exercises the whole path: text encoder, DiT over the ring KV cache, decoder, mp4.",
            file=sys.stderr,
        )
    overrides = {k: getattr(args, k) for k in ("window", "sink") if getattr(args, k) is not None}
    if overrides:
        pipe.settings = StreamSettings(**{**pipe.settings.__dict__, **overrides})
    length = {"num_frames": args.num_frames} if args.num_frames is not None else {"seconds": args.seconds or 5.0}
    schedule = [(_seconds(when), prompt) for when, prompt in args.then] if args.then else None
    video = read_video(args.from_path) if args.from_path else None
    start = time.perf_counter()
    frames = []
    for chunk in pipe.stream(
        args.prompt,
        **length,
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
    path = export_to_video(video, args.output, fps=pipe.fps)
    print(
        f"wrote {path}: {video.shape[0]} frames {video.shape[2]}x{video.shape[1]} at {pipe.fps} fps "
        f"({video.shape[0] / pipe.fps:.1f} s of video) in {elapsed:.1f} s on {args.device}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # `sfpp bench ...` hands every option to the suite's own parser (so `sfpp bench --help` shows them).
    args = argparse.Namespace(command="bench") if argv[:1] == ["bench"] else _parser().parse_args(argv)
    try:
        if args.command == "generate":
            return generate(args)
        if args.command == "bench":
            return bench(argv[1:])
    except (ValueError, TypeError, FileNotFoundError, torch.OutOfMemoryError) as exc:
        print(f"sfpp: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
