"""The GPU campaign in one command: every GPU test, then the whole benchmark suite, results and a table in one folder.

    python -m bench.campaign --out /tmp/campaign            # on a GPU machine: ~8 minutes, exits 1 on a failed test
    python -m bench.campaign --smoke --out /tmp/campaign    # CPU, tiny shapes: the same steps, seconds each (CI)

Steps run one after another as subprocesses, each with its own time limit, so one hanging step cannot eat the
whole lease. Each benchmark writes its JSON (device, commit, date, command) into --out; `bench.report` turns them
into `summary.md`; every step's output is kept in `<step>.log`, and `campaign.json` says what passed, failed or
timed out. The exit code is non-zero when a GPU test failed (benchmark failures are reported, and fail with
--strict).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import report

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]  # after `python -m`
    timeout_s: int
    is_test: bool = False


def steps(smoke: bool, out: Path) -> list[Step]:
    """The campaign. Full: production shapes (Wan2.1-1.3B at 832x480, window 21, bf16 and fp8 KV). Smoke: the same
    commands at tiny shapes, which a CPU runs in seconds."""
    o = ("--out-dir", str(out))
    if smoke:
        return [
            Step("gpu_tests", ("pytest", "-q", "-m", "gpu", "tests/test_gpu.py"), 120, is_test=True),
            Step("ring_attention", ("bench.bench_ring_attention", *o), 120),  # shrinks itself without a GPU
            Step("cache_write", ("bench.bench_cache_write", "--height", "4", "--width", "4", "--window", "3", *o), 120),
            Step("adaln", ("bench.bench_adaln", "--batches", "1", "--tokens", "16", "--dim", "64", *o), 120),
            Step("e2e", ("sfpp.benchmark.e2e", "--config", "tiny", "--height", "32", "--width", "32",
                         "--vae-base-dim", "8", "--chunks", "2", "--long-frames", "12", "--modes", "eager",
                         "--kv-dtypes", "fp32", "--window", "6", *o), 300),  # fmt: skip
            Step("decoders", ("bench.bench_decoders", "--height", "2", "--width", "2", "--chunks", "1", *o), 120),
            Step("memory", ("bench.bench_memory", "--config", "tiny", "--height", "32", "--width", "32",
                            "--vae-base-dim", "8", "--chunks", "2", *o), 120),  # fmt: skip
            Step("flashdreams", ("bench.bench_flashdreams", "--config", "tiny", "--height", "32", "--width", "32",
                                 "--window", "6", "--warmup", "2", "--chunks", "2", *o), 120),  # fmt: skip
            # One prompt over two windows gates nothing (its noise floor is the whole signal): bounds that only
            # check the step runs end to end.
            Step("fp8_horizon", ("train.fp8_horizon", "--prompts", "1", "--multiple", "2", "--margin", "10",
                                 "--clip-margin", "1", "--out", str(out / "fp8_horizon")), 120),  # fmt: skip
        ]
    gpu_tests = ("tests/test_gpu.py", "tests/test_graph.py", "tests/test_csrc.py", "tests/test_kernels_model.py",
                 *(str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").glob("test_kernels_*.py"))))  # fmt: skip
    return [
        Step("gpu_tests", ("pytest", "-q", "-x", *gpu_tests), 180, is_test=True),
        Step("ring_attention", ("bench.bench_ring_attention", "--windows", "3", "6", "12", "21", *o), 90),
        Step("cache_write", ("bench.bench_cache_write", *o), 30),
        Step("adaln", ("bench.bench_adaln", *o), 30),
        # Both regimes in one run: the 81-frame video (7 chunks while the ring fills) and the steady state out to
        # 900 latent frames (chunk 300), sfpp's default path, fp8 KV, eager, and Self-Forcing's path.
        Step("e2e", ("sfpp.benchmark.e2e", "--modes", "graph,eager", "--kv-dtypes", "bf16,fp8",
                     "--long-frames", "900", *o), 240),  # fmt: skip
        # Tiny decoder (TAEHV) vs the Wan VAE decoder, ms per 3-latent-frame chunk at 832x480, bf16.
        Step("decoders", ("bench.bench_decoders", *o), 180),
        # FlashDreams' Self-Forcing chunk step beside sfpp's in one process (needs its wheel installed, see --help).
        Step("flashdreams", ("bench.bench_flashdreams", *o), 300),
        # The memory model's plan against the allocator's peak, per memory mode (Wan2.1-1.3B, 832x480, window 21).
        Step("memory", ("bench.bench_memory", *o), 150),
        # fp8 KV through the GPU's kernels against bf16 KV, 60x the shipped toy model's horizon (the long-horizon gate).
        Step("fp8_horizon", ("train.fp8_horizon", "--out", str(out / "fp8_horizon")), 240),
    ]


def run_step(step: Step, out: Path) -> dict:
    log = out / f"{step.name}.log"
    start = time.perf_counter()
    with log.open("w") as f:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", *step.argv], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=step.timeout_s
            )
            status = "passed" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {step.timeout_s} s"
    seconds = time.perf_counter() - start
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
    print(f"[campaign] {step.name}: {status} in {seconds:.0f} s  {tail[0][:150]}", flush=True)
    return {"step": step.name, "command": " ".join(["python", "-m", *step.argv]), "status": status, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__,
        epilog="Writes into the repository, on a GPU only: the per-op steps record the fastest backend for this GPU "
        "model in sfpp/engine/dispatch_table.json (what the campaign is for). Everything else goes into --out.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="folder for the JSON results, logs and summary.md")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on any device (what CI runs)")
    p.add_argument("--only", default=None, help="comma-separated step names to run (default: all)")
    p.add_argument("--strict", action="store_true", help="a failed benchmark fails the campaign too")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    plan = steps(args.smoke, out)
    if args.only:
        names = args.only.split(",")
        unknown = sorted(set(names) - {s.name for s in plan})
        if unknown:
            p.error(f"unknown steps {unknown}; steps are {[s.name for s in plan]}")
        plan = [s for s in plan if s.name in names]
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    results = [run_step(step, out) for step in plan]
    (out / "campaign.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "summary.md").write_text(report.markdown(sorted(out.glob("*.json"))))
    print(f"[campaign] results, logs and summary.md in {out}")
    failed = [r for r, s in zip(results, plan, strict=True) if r["status"] != "passed" and (s.is_test or args.strict)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
