"""`sfpp generate`: a prompt (and optionally timed prompt switches, or frames to continue) to an mp4."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from sfpp.cli.options import (
    SHIPPED_MODELS,
    add_decoder_options,
    add_memory_option,
    add_parallel_option,
    add_student_options,
    add_threads_option,
    load_pipeline,
    pick_device,
    why_random,
)
from sfpp.engine.parallel import ContextParallelError, shutdown
from sfpp.engine.sampler import NOISE_ORDERS
from sfpp.models.dit import CONFIGS
from sfpp.pipeline import DTYPES, KERNELS, KV_DTYPES, StreamSettings
from sfpp.video import check_output_path, export_to_video, read_video

DEFAULT_SECONDS = 5.0


def add_parser(sub) -> None:
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
        "--noise-order",
        choices=NOISE_ORDERS,
        default="sfpp",
        help="self-forcing: draw the noise as Self-Forcing's inference.py does (all initial noise first, then the "
        "re-noising draws), so one seed gives its video; sfpp (default): each chunk's noise as it starts",
    )
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
        help="backend of the fused cache write, ring attention and adaLN (sfpp.engine.ops): auto picks the fastest "
        "available; none is the plain torch path (default: auto on CUDA, none on a CPU)",
    )
    gen.add_argument(
        "--cuda-graph",
        action=argparse.BooleanOptionalAction,
        help="capture each chunk as a CUDA graph and replay it (default: on with CUDA; an error on a CPU)",
    )
    gen.add_argument("--compile", action="store_true", help="torch.compile the chunk (first chunks compile: slower)")
    add_threads_option(gen)
    add_memory_option(gen)
    add_parallel_option(gen)
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
    add_student_options(gen)
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


def _seconds(text: str) -> float:
    """'10s' or '10' -> 10.0, for --then."""
    try:
        return float(text[:-1] if text.endswith("s") else text)
    except ValueError:
        raise ValueError(f"--then TIME must be seconds such as 10s or 2.5, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    return _generate(args, pick_device(args))


def _generate(args: argparse.Namespace, device: torch.device) -> int:
    output = check_output_path(args.output)  # before any work: a bad path must not cost a whole generation
    seconds = DEFAULT_SECONDS if args.seconds is None and args.num_frames is None else args.seconds
    pipe = load_pipeline(args)
    try:
        return _stream_and_write(args, pipe, output, seconds, device)
    finally:  # a group with a dead or stuck member is left as it is: tearing it down could wait on that member
        if pipe.parallel is not None and not isinstance(sys.exc_info()[1], ContextParallelError):
            shutdown()


def _stream_and_write(args: argparse.Namespace, pipe, output, seconds: float | None, device: torch.device) -> int:
    writer = pipe.is_writer  # split over ranks: rank 0 speaks and writes, every rank generates
    if pipe.random_weights and writer:
        print(
            f"sfpp: warning: {why_random(args)}: the video is noise. It exercises the whole path: text encoder, DiT "
            "over the ring KV cache, decoder, mp4.",
            file=sys.stderr,
        )
    if pipe.student is not None and writer:
        s = pipe.settings
        print(f"sfpp: the {pipe.student} student's settings: chunks of {s.frames_per_chunk} latent frames, window "
              f"{s.window}, sink {s.sink}, steps {list(pipe.schedule.denoising_steps)} (--list-students)",
              file=sys.stderr)  # fmt: skip
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
        progress=not args.quiet and writer,
        schedule=schedule,
        recache=not args.no_recache,
        video=video,
        include_video=not args.without_input,
        noise_order=args.noise_order,
    ):
        frames.append(chunk[0])
    video = torch.cat(frames)
    elapsed = time.perf_counter() - start
    if not writer:
        return 0
    path = export_to_video(video, output, fps=pipe.fps)
    where = device if pipe.parallel is None else f"{pipe.parallel.size} ranks ({pipe.parallel.scheme}) of {device.type}"
    print(
        f"wrote {path}: {video.shape[0]} frames {video.shape[2]}x{video.shape[1]} at {pipe.fps} fps "
        f"({video.shape[0] / pipe.fps:.1f} s of video) in {elapsed:.1f} s on {where}"
    )
    return 0
