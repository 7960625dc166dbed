"""The checkout's benchmark scripts: where their results go (bench/results/), and how dispatch-table entries record
their provenance. The record itself (device, commit, date, command) is `sfpp.benchmark.record`'s."""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
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


@dataclass
class Server:
    process: subprocess.Popen
    url: str  # the page, as the server printed it
    command: list[str]
    stderr: str = ""  # what it wrote to stderr, once it has stopped


@contextlib.contextmanager
def serve_in_subprocess(device: str, model: str | None = None) -> Iterator[Server]:
    """`sfpp serve` on a free loopback port in a subprocess (stderr kept in a file, so it never blocks on a full
    pipe), stopped and its stderr read when the block ends."""
    command = [sys.executable, "-m", "sfpp.cli", "serve", "--port", "0", "--device", device]
    command += ["--model", model] if model else []
    with tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        server = Server(process, "", command)
        try:
            line = process.stdout.readline()
            if "open http" not in line:
                process.wait(60)
                err.seek(0)
                raise SystemExit(f"the server did not start: {line!r} {err.read()[-2000:]}")
            server.url = line.split("open ")[1].split()[0]
            yield server
        finally:
            process.terminate()
            process.wait(60)
            err.seek(0)
            server.stderr = err.read()
