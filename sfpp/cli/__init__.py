"""The `sfpp` command line: `sfpp generate` writes a video (generate.py), `sfpp serve` plays one live in a browser
(serve.py), `sfpp bench` runs the benchmark suite (`sfpp.benchmark.e2e`), `sfpp memory` prints the memory model's
table (`sfpp.pipeline.memory`); options.py holds what they share.

Every error is one line on stderr and exit status 2 (1 for failed benchmark variants, 130 for Ctrl-C).
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch

from sfpp import __version__
from sfpp.cli import generate, serve
from sfpp.cli.options import Parser
from sfpp.engine.parallel import ContextParallelError
from sfpp.models.dit import get_config


def _parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="sfpp",
        description="Streaming autoregressive video diffusion (Self-Forcing++ on a Wan2.1 DiT).",
    )
    parser.add_argument("--version", action="version", version=f"sfpp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    generate.add_parser(sub)
    bench = sub.add_parser(
        "bench",
        help="benchmark streaming FPS, latency and memory against Self-Forcing's inference path",
        description="Run the benchmark suite (sfpp/benchmark/e2e.py); `sfpp bench --help` lists its options.",
        add_help=False,
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    serve.add_parser(sub)
    memory = sub.add_parser(
        "memory",
        help="the device memory of one 832x480 stream in each memory mode (a model, checked on the meta device)",
        description="Print the memory model's table (sfpp/pipeline/memory.py): GiB by part and the peak, per mode.",
    )
    memory.add_argument("--config", default="wan2.1-1.3b", help="the DiT config (default: wan2.1-1.3b)")
    memory.add_argument("--window", type=int, default=21, help="attention window in latent frames (default: 21)")
    memory.add_argument("--batch-size", type=int, default=1, help="streams generated together (default: 1)")
    memory.add_argument("--ranks", type=int, default=1, help="one rank's memory with the stream split over this many "
                        "(context parallel: 1/N of the KV ring and of the chunk; default: 1)")  # fmt: skip
    return parser


def bench(bench_args: list[str]) -> int:
    from sfpp.benchmark import e2e  # only when asked: the suite's imports are not the CLI's

    return e2e.main(bench_args)


def memory_table(args: argparse.Namespace) -> int:
    from sfpp.pipeline.memory import table

    if args.window < 1 or args.batch_size < 1:
        raise ValueError(f"--window and --batch-size must be at least 1, got {args.window} and {args.batch_size}")
    heads = get_config(args.config).num_heads
    if args.ranks < 1 or heads % args.ranks:
        raise ValueError(f"--ranks must divide the {heads} heads of {args.config}, got {args.ranks}")
    print(table(args.config, window=args.window, batch_size=args.batch_size, parallel=args.ranks))
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
                return generate.run(args)
            if args.command == "serve":
                return serve.run(args)
            if args.command == "memory":
                return memory_table(args)
            return bench(argv[1:])
    except (ValueError, TypeError, FileNotFoundError, torch.OutOfMemoryError, ContextParallelError) as exc:
        print(f"sfpp: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sfpp: interrupted", file=sys.stderr)
        return 130
