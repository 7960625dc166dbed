"""What a pipeline is told: the device and its defaults, dtypes and kernel backends, the stream settings, and the
checks that turn bad arguments into one-line errors before anything runs."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

# torch's CPU threads while a pipeline works (`Pipeline(cpu_threads=)`, `sfpp generate --threads`). Measured with the
# README's command on the shipped model on a 2-core machine (bench/results/bench_threads-cpu-*.json): two threads were
# 10% faster when the cores were free, and 12x to 22x slower when other processes held them (median 221 s against
# 15 s for one thread); the README's API snippet took 54 s with torch's default where the CLI took 8.4 s.
DEFAULT_CPU_THREADS = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The self-attention KV cache holds K/V in the DiT's dtype, or in fp8 with per-token-per-head scales.
KV_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn}
# `WanModel.use_kernels` backends ("none": the plain torch path).
KERNELS = ("auto", "torch", "triton", "cuda", "none")


def check_device(device: str | torch.device) -> torch.device:
    """The device, or a one-line ValueError when it is not a device name or not present on this machine."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}: expected cpu, cuda, cuda:N, ...") from exc
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a build without CUDA")
            raise ValueError(f"device {device} asked for, but no CUDA device is available here ({build})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device} does not exist: this machine has {torch.cuda.device_count()} CUDA devices"
            )
        return device
    backend = getattr(torch, device.type, None)  # mps, xpu, ...
    if backend is None or not getattr(backend, "is_available", lambda: False)():
        raise ValueError(f"device {device} asked for, but it is not available here")
    return device


def device_defaults(device: torch.device) -> dict:
    """What a pipeline runs unless told otherwise: on CUDA the fast path (bf16 DiT, the fused kernels by `auto`
    dispatch, the chunk replayed from CUDA graphs); elsewhere fp32 through the plain torch path, eagerly (on a CPU
    the Triton kernels only run in the interpreter, which is for tests, not speed)."""
    cuda = device.type == "cuda"
    return {
        "dtype": torch.bfloat16 if cuda else torch.float32,
        "kernels": "auto" if cuda else "none",
        "cuda_graph": cuda,
    }


def unsupported(device: torch.device, *, compile: bool = False, kv_dtype: torch.dtype | None = None) -> str | None:
    """Why a combination of options cannot run on `device`, or None when it can."""
    if compile and kv_dtype == torch.float8_e4m3fn and device.type == "cpu":
        return (
            "torch.compile cannot compile the fp8 KV cache for a CPU (Inductor's C++ code generator: 'Promotion for "
            "Float8 Types is not supported'); use the eager path or a bf16/fp32 cache there"
        )
    return None


@dataclass
class PipelineOutput:
    frames: Tensor  # uint8 [B, T, H, W, 3]
    latents: Tensor  # fp32 [B, C, F, h, w]


@dataclass(frozen=True)
class StreamSettings:
    """How the student rolls out: chunk size, cache window and sinks, default resolution and frame rate."""

    frames_per_chunk: int = 3
    window: int = 21
    sink: int = 0
    height: int = 480
    width: int = 832
    fps: int = 16

    def __post_init__(self) -> None:
        if self.frames_per_chunk < 1 or self.sink < 0 or self.fps < 1:
            raise ValueError(f"invalid stream settings {self}")
        if self.window < self.frames_per_chunk:
            raise ValueError(f"window ({self.window}) must hold at least one chunk ({self.frames_per_chunk} frames)")


def _is_number(x) -> bool:
    """A real number, not a bool (True is not a length)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _integer(x, name: str) -> int:
    """`x` as a Python int (numpy integers welcome): a non-number (or bool) is a TypeError, a fraction a ValueError."""
    if not _is_number(x):
        raise TypeError(f"{name} must be an integer, got {x!r} ({type(x).__name__})")
    if not isinstance(x, numbers.Integral):
        raise ValueError(f"{name} must be a positive integer, got {x!r}")
    return int(x)


def _validate_noise(generator, seed) -> None:
    if generator is not None and seed is not None:
        raise ValueError("give a generator= or a seed=, not both")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator, got {generator!r} ({type(generator).__name__}); for an integer "
            "seed pass seed="
        )
    if seed is not None and (not isinstance(seed, numbers.Integral) or isinstance(seed, bool)):
        raise TypeError(f"seed must be an integer, got {seed!r} ({type(seed).__name__})")


def _validate_prompt(prompt: str | list[str]) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
    return list(prompts)


def _resolve_options(device, dtype, kernels, options: dict) -> tuple[torch.device, torch.dtype, str, dict]:
    """from_pretrained/from_config's options, with the device's defaults (`device_defaults`) where not given."""
    device = check_device(device)
    defaults = device_defaults(device)
    if dtype is not None and dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of {list(DTYPES.values())}, got {dtype!r}")
    kernels = defaults["kernels"] if kernels is None else kernels
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {list(KERNELS)}, got {kernels!r}")
    options = {"cuda_graph": defaults["cuda_graph"], **options}
    if options["cuda_graph"] is None:
        options["cuda_graph"] = defaults["cuda_graph"]
    kv_dtype = options.get("kv_dtype")
    if kv_dtype is not None and kv_dtype not in KV_DTYPES.values():
        raise ValueError(f"kv_dtype must be one of {list(KV_DTYPES.values())}, got {kv_dtype!r}")
    dtype = dtype or defaults["dtype"]
    if kv_dtype not in (None, dtype, torch.float8_e4m3fn):
        raise ValueError(
            f"kv_dtype {kv_dtype} needs dtype={kv_dtype} (the DiT runs in {dtype}): the ring cache holds K/V in the "
            "DiT's dtype, or in fp8"
        )
    reason = unsupported(device, compile=options.get("compile", False), kv_dtype=kv_dtype)
    if reason:
        raise ValueError(reason)
    return device, dtype, kernels, options
