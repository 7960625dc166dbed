"""The checkout's benchmark scripts: where their results go (bench/results/), and how dispatch-table entries record
their provenance. The record itself (device, commit, date, command) is `sfpp.benchmark.record`'s."""

from __future__ import annotations

from pathlib import Path

import torch

from sfpp.benchmark import record

RESULTS_DIR = Path(__file__).parent / "results"


def dispatch_meta(name: str, **extra) -> dict:
    """How a dispatch-table entry was measured: commit, date, command, and any shape details."""
    return {"commit": record.commit(), "date": record.now(), "command": record.command(f"bench.{name}"), **extra}


def save(name: str, device: torch.device, results: dict, out_dir: Path | None = None) -> Path:
    """`sfpp.benchmark.record.save` into bench/results/ unless told otherwise."""
    return record.save(name, device, results, out_dir or RESULTS_DIR)
