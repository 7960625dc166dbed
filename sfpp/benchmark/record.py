"""What every benchmark records beside its numbers: device, commit, date, torch version and the command that made
them. `sfpp bench` and the scripts in the checkout's bench/ folder write their JSON through `save`."""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def commit() -> str:
    """The checkout's commit (with -dirty for uncommitted changes), or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def command(module: str) -> str:
    """The command line that ran, as `python -m <module> <args>`."""
    return " ".join([Path(sys.executable).name, "-m", module, *sys.argv[1:]])


def save(name: str, device: torch.device, results: dict, out_dir: Path, module: str | None = None) -> Path:
    """Write results with their provenance as `<out_dir>/<name>-<device>-<date>.json` (a new file per run, never
    over an older one); `module` is what `python -m` ran (default `bench.<name>`)."""
    record = {
        "benchmark": name,
        "device": device_name(device),
        "commit": commit(),
        "date": now(),
        "command": command(module or f"bench.{name}"),
        "torch": torch.__version__,
        **results,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = record["date"].replace(":", "").replace("+0000", "Z")
    for n in range(1000):  # two runs in one second get two files
        path = out_dir / f"{name}-{device.type}-{stamp}{f'-{n}' if n else ''}.json"
        try:
            with path.open("x") as f:  # "x": fails rather than replace an existing file
                f.write(json.dumps(record, indent=2) + "\n")
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{out_dir} has 1000 results of {name} from {stamp}")
