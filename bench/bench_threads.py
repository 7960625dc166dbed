"""CPU threads for `sfpp generate`: the README's command at each --threads count, alternating, several rounds.

    python -m bench.bench_threads --threads 1 2 --rounds 3 --seconds 60

Each run is a fresh `sfpp generate` process on the shipped model; the time is the one it reports (generation, not
start-up), with the machine's 1-minute load average beside it, since other work on the cores is what makes more
threads slower. This measurement set `sfpp.cli.DEFAULT_CPU_THREADS`.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench.common import parser, save

PROMPT = "a big red circle moving fast and a small blue square moving slowly over a striped grey background"


def run_once(threads: int, seconds: float, out: Path) -> float:
    cmd = [sys.executable, "-m", "sfpp.cli", "generate", "--prompt", PROMPT, "--seconds", str(seconds)]
    cmd += ["--threads", str(threads), "--device", "cpu", "--quiet", "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(re.search(r" in ([0-9.]+) s on ", proc.stdout).group(1))


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to compare (default 1 2)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs every thread count once (default 3)")
    p.add_argument("--seconds", type=float, default=60.0, help="video length (default 60, the README's)")
    p.add_argument("--out-dir", default=None, help="where the JSON goes (default bench/results)")
    args = p.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for n in args.threads:
                load = os.getloadavg()[0]
                s = run_once(n, args.seconds, Path(tmp) / "out.mp4")
                runs.append({"round": r, "threads": n, "generate_s": s, "load_1min_before": load})
                print(f"round {r} threads {n}: {s:.1f} s (load {load:.2f})", flush=True)
    rows = []
    for n in args.threads:
        times = [x["generate_s"] for x in runs if x["threads"] == n]
        rows.append({"threads": n, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)})
        print(f"threads {n}: median {rows[-1]['median_s']:.1f} s, min {min(times):.1f}, max {max(times):.1f}")
    record = {"prompt": PROMPT, "seconds": args.seconds, "cores": os.cpu_count(), "summary": rows, "runs": runs}
    print(f"-> {save('bench_threads', torch.device('cpu'), record, Path(args.out_dir) if args.out_dir else None)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
