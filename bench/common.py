"""The checkout's benchmark scripts: where their results go (bench/results/), and how dispatch-table entries record
their provenance. The record itself (device, commit, date, command) is `sfpp.benchmark.record`'s."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sfpp.benchmark import record

RESULTS_DIR = Path(__file__).parent / "results"


# What the benchmark scripts say in their --help about the files of the repository they write (a test checks every
# runnable script of train/ and bench/ says so exactly when it does: tests/test_repo_writes.py).
WRITES_RESULTS = (
    "Writes into the repository: a new bench/results/<name>-<device>-<date>.json per run (never over an older one); "
    "--out-dir DIR puts it elsewhere."
)
WRITES_GPU = (  # the per-op kernel benchmarks: on a CPU they run a smoke configuration and save nothing
    "Writes into the repository, on a GPU only: a new bench/results/<name>-cuda-<date>.json per run (--out-dir DIR "
    "elsewhere), and the fastest backend for this GPU model in sfpp/engine/dispatch_table.json, which "
    'backend="auto" reads (--table PATH elsewhere, --no-table to leave it).'
)


def parser(doc: str, writes: str | None = WRITES_RESULTS) -> argparse.ArgumentParser:
    """A benchmark script's parser: its docstring as the description, what it writes into the repository below."""
    return argparse.ArgumentParser(description=doc, epilog=writes, formatter_class=argparse.RawDescriptionHelpFormatter)


def dispatch_meta(name: str, **extra) -> dict:
    """How a dispatch-table entry was measured: commit, date, command, and any shape details."""
    return {"commit": record.commit(), "date": record.now(), "command": record.command(f"bench.{name}"), **extra}


def save(name: str, device: torch.device, results: dict, out_dir: Path | None = None) -> Path:
    """`sfpp.benchmark.record.save` into bench/results/ unless told otherwise."""
    return record.save(name, device, results, out_dir or RESULTS_DIR)
