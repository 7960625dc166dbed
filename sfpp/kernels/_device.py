"""The GPU a launch targets, as the launchers need it (tile choice, fp8 support). `bench.aot` substitutes
`arch` to compile launches for a GPU this machine does not have."""

from __future__ import annotations

import torch


def arch(device: torch.device) -> int | None:
    """Compute capability as 90, 80, ...; None off CUDA (Triton's interpreter)."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def check_fp8(device: torch.device) -> None:
    """Triton has e4m3 (float8e4nv) from sm_89 on: an fp8 K/V cache on an older GPU is a clear error."""
    sm = arch(device)
    if sm is not None and sm < 89:
        raise ValueError(f"an fp8 K/V cache needs sm_89 or newer for Triton's e4m3 (this GPU is sm_{sm})")
