"""What every benchmark records beside its numbers: device, commit, date and the command that made them."""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).parent / "results"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def dispatch_meta(name: str, **extra) -> dict:
    """How a dispatch-table entry was measured: commit, date, command, and any shape details."""
    return {
        "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "-m", f"bench.{name}", *sys.argv[1:]]),
        **extra,
    }


def save(name: str, device: torch.device, results: dict, out_dir: Path | None = None) -> Path:
    record = {
        "benchmark": name,
        "device": device_name(device),
        "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "-m", f"bench.{name}", *sys.argv[1:]]),
        "torch": torch.__version__,
        **results,
    }
    out_dir = out_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = record["date"].replace(":", "").replace("+0000", "Z")
    path = out_dir / f"{name}-{device.type}-{stamp}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
