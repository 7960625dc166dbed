"""What `sfpp generate` and `sfpp serve` share: the one-line-error parser, the decoder options, and loading the
pipeline a command line asks for (--model, else the shipped model, else random weights) with its device knobs."""

from __future__ import annotations

import argparse
import os

import torch

from sfpp.models.students import STUDENTS
from sfpp.models.students import table as students_table
from sfpp.models.taehv import TAEHVDecoder
from sfpp.pipeline import (
    DEFAULT_CPU_THREADS,
    DTYPES,
    KV_DTYPES,
    MEMORY_MODES,
    SHIPPED_MODELS,
    Pipeline,
    check_device,
    device_defaults,
)

DEFAULT_MODEL_DIR = SHIPPED_MODELS["default"]


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (and no usage block) like every other sfpp error."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_decoder_options(parser: argparse.ArgumentParser) -> None:
    """--decoder and --decoder-weights, which `load_pipeline` reads (sfpp generate, sfpp serve)."""
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


def add_student_options(parser: argparse.ArgumentParser) -> None:
    """--checkpoint, --lora, --lora-alpha, --student, --list-students, which `load_pipeline` reads."""
    group = parser.add_argument_group("students (a DiT checkpoint over a Wan2.1 directory given as --model)")
    group.add_argument("--checkpoint", metavar="FILE", help="DiT weights that replace the model's: a Self-Forcing or "
                       "LongLive .pt (generator_ema / generator), or a .safetensors state dict")  # fmt: skip
    group.add_argument("--lora", metavar="FILE", help="a LoRA merged into the DiT at load (peft's state dict, or "
                       "LongLive's lora.pt with its generator_lora)")  # fmt: skip
    group.add_argument("--lora-alpha", type=float, metavar="ALPHA", help="LoRA alpha; the merge scales by alpha / rank "
                       "(default: the student's, else alpha = rank)")  # fmt: skip
    group.add_argument("--student", choices=sorted(STUDENTS), help="a known student's stream settings (window, sink, "
                       "chunk size, steps, EMA or not); default: detected from --checkpoint / --lora")  # fmt: skip
    group.add_argument("--list-students", action=_ListStudents, help="print the known students, with a command for "
                       "each, and exit")  # fmt: skip


class _ListStudents(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(students_table())
        parser.exit()


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """--threads, which `pipeline_options` hands to the pipeline (sfpp generate, sfpp serve)."""
    parser.add_argument(
        "--threads",
        type=int,
        help=f"CPU threads for torch while generating (default on a CPU: {DEFAULT_CPU_THREADS}: the shipped model's "
        "small matmuls gain 10%% from a second free core and lose up to 22x when other work holds it; on CUDA: "
        "torch's default)",
    )


def add_memory_option(parser: argparse.ArgumentParser) -> None:
    """--memory, which `pipeline_options` hands to the pipeline (sfpp generate, sfpp serve)."""
    parser.add_argument(
        "--memory",
        choices=MEMORY_MODES,
        help="device memory: low = prompts encoded on the CPU (cached on disk), the VAE one latent frame per call, "
        "an fp8 KV cache (Wan2.1-1.3B at 832x480 in about 10 GB); full = none of these; auto (default) = as many as "
        "the GPU's free memory needs, cheapest first",
    )


def add_parallel_option(parser: argparse.ArgumentParser) -> None:
    """--parallel, which `pipeline_options` hands to the pipeline (sfpp generate)."""
    parser.add_argument(
        "--parallel",
        choices=["ulysses", "none"],
        help="split the stream over the processes torchrun started (torchrun --nproc_per_node N -m sfpp generate "
        "...): ulysses = each rank 1/N of each frame's tokens and of the attention heads (N must divide the heads: "
        "12 for Wan2.1-1.3B, 40 for 14B); rank 0 writes the video (default: ulysses under torchrun with N > 1, "
        "else none)",
    )


def parallel_scheme(args: argparse.Namespace) -> str | None:
    """The --parallel a run gets: ulysses by default when torchrun started more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    scheme = getattr(args, "parallel", None)
    if scheme is None:
        return "ulysses" if world > 1 else None
    if scheme == "none":
        if world > 1:
            raise ValueError(f"--parallel none under torchrun with {world} processes would write {world} copies of "
                             "one video: drop --parallel (ulysses) or run one process")  # fmt: skip
        return None
    return scheme


def pick_device(args: argparse.Namespace) -> torch.device:
    return check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def pipeline_options(args: argparse.Namespace, device: torch.device) -> dict:
    """from_pretrained/from_config keywords from the knobs; left out where not given (the device's defaults). The
    knobs `sfpp serve` lacks count as not given."""
    options = {"device": device, "compile": getattr(args, "compile", False)}
    if (scheme := parallel_scheme(args)) is not None:
        options["parallel"] = scheme
    if getattr(args, "memory", None) is not None:
        options["memory"] = args.memory
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        options["cpu_threads"] = args.threads
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


def load_pipeline(args: argparse.Namespace) -> Pipeline:
    """The pipeline of `sfpp generate` / `sfpp serve`: --model, else the shipped model, else random weights."""
    options = pipeline_options(args, pick_device(args))
    if args.decoder_weights is not None and args.decoder != "tiny":
        raise ValueError("--decoder-weights is the weights file of --decoder tiny: add --decoder tiny")
    tiny = {"decoder": "tiny", "decoder_path": args.decoder_weights} if args.decoder == "tiny" else {}
    student = {k: getattr(args, k, None) for k in ("checkpoint", "lora", "lora_alpha", "student")}
    student = {k: v for k, v in student.items() if v is not None}
    if student and not args.model:
        raise ValueError(f"--{next(iter(student)).replace('_', '-')} goes with --model WAN_DIR: the Wan2.1 directory "
                         "whose text encoder and VAE the student uses")  # fmt: skip
    if args.model:
        return Pipeline.from_pretrained(args.model, **student, **options, **tiny)
    if args.config is None and (DEFAULT_MODEL_DIR / "sfpp_pipeline.json").is_file():
        return Pipeline.from_pretrained(DEFAULT_MODEL_DIR, **options, **tiny)
    pipe = Pipeline.from_config(args.config or "tiny", **options)
    if tiny:  # random weights have no model directory to look in
        if args.decoder_weights is None:
            raise ValueError("--decoder tiny with --config needs --decoder-weights PATH (TAEHV's taew2_1.pth)")
        pipe.set_decoder(TAEHVDecoder.from_file(args.decoder_weights))
    return pipe


def why_random(args: argparse.Namespace) -> str:
    """Why `load_pipeline` gave a pipeline with random weights, in the user's terms."""
    if args.config is not None:
        return f"--config {args.config} builds RANDOM weights (for testing)"
    if args.model:
        return f"the model in {args.model} has RANDOM weights"
    return f"no trained model is installed (nothing at {DEFAULT_MODEL_DIR}), so this uses RANDOM weights"
