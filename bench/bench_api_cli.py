"""The README's Python API snippet against its CLI command, timed in the same run: seconds of generation per frame
of video, each in a fresh process, alternating, over `--rounds` (the thread policy lives in the pipeline, so both
should run alike).

    python -m bench.bench_api_cli --rounds 3
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import parser as make_parser
from bench.common import save

PROMPT = "a big yellow diamond moving fast over a checkered teal background"  # the README's API prompt
API = """
import sys, time, torch
from sfpp import Pipeline, export_to_video
pipe = Pipeline.from_pretrained("default")
start = time.perf_counter()
out = pipe(prompt={prompt!r}, seconds={seconds}, generator=torch.Generator().manual_seed(0), progress=False)
elapsed = time.perf_counter() - start
export_to_video(out.frames[0], sys.argv[1], fps=pipe.fps)
print("frames", out.frames.shape[1], "seconds", elapsed)
"""


def _api(seconds: float, out: Path) -> tuple[int, float]:
    code = API.format(prompt=PROMPT, seconds=seconds)
    result = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, check=True)
    words = result.stdout.split()
    return int(words[words.index("frames") + 1]), float(words[words.index("seconds") + 1])


def _cli(seconds: float, out: Path) -> tuple[int, float]:
    cmd = [sys.executable, "-m", "sfpp.cli", "generate", "--prompt", PROMPT, "--seconds", str(seconds), "-o", str(out),
           "--quiet"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    words = result.stdout.split()  # "wrote PATH: N frames WxH at F fps (... s of video) in T s on cpu"
    return int(words[2]), float(words[words.index("in") + 1])


def main(argv: list[str] | None = None) -> dict:
    p = make_parser(__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--api-seconds", type=float, default=10.0, help="video length of the API snippet (README: 10)")
    p.add_argument("--cli-seconds", type=float, default=60.0, help="video length of the CLI command (README: 60)")
    p.add_argument("--note", default="")
    p.add_argument("--out-dir", default=None, help="where the JSON goes (default bench/results)")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, run, seconds in (("api", _api, args.api_seconds), ("cli", _cli, args.cli_seconds)):
                t0 = time.perf_counter()
                frames, gen_s = run(seconds, Path(tmp) / f"{name}.mp4")
                rows.append({"variant": name, "round": r, "frames": frames, "generate_s": round(gen_s, 3),
                             "ms_per_frame": round(1000 * gen_s / frames, 3),
                             "process_s": round(time.perf_counter() - t0, 2)})  # fmt: skip
                print(rows[-1], flush=True)
    median = {v: statistics.median(r["ms_per_frame"] for r in rows if r["variant"] == v) for v in ("api", "cli")}
    results = {"rows": rows, "api_over_cli_per_frame": round(median["api"] / median["cli"], 3), "note": args.note}
    print("API / CLI per frame (medians):", results["api_over_cli_per_frame"])
    print("saved", save("bench_api_cli", torch.device("cpu"), results, Path(args.out_dir) if args.out_dir else None))
    return results


if __name__ == "__main__":
    main()
