"""Frames per second a browser receives from `sfpp serve`: the server in a subprocess, a headless system Chromium
driven by Playwright playing one stream for `--seconds`. Saves JSON under bench/results/.

    python -m bench.bench_serve --seconds 30
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import torch

from bench.common import parser as make_parser
from bench.common import save, serve_in_subprocess
from sfpp.cli.serve import DEFAULT_PROMPT


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="how long to watch (default 30)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--chromium", default=shutil.which("chromium"), help="browser executable (default: chromium)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="the server's device")
    parser.add_argument("--model", help="model directory (default: the shipped model)")
    parser.add_argument("--note", default="", help="free text saved with the result (e.g. how busy the machine was)")
    parser.add_argument("--out-dir", help="where to save the JSON (default bench/results/)")
    args = parser.parse_args(argv)
    if not args.chromium:
        raise SystemExit("no chromium found: pass --chromium PATH")
    from playwright.sync_api import sync_playwright

    with serve_in_subprocess(args.device, args.model) as server:
        url = server.url
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(url)
            page.wait_for_function("!document.getElementById('start').disabled")
            page.fill("#prompt", args.prompt)
            page.click("#start")
            page.wait_for_function("lastFrame >= 0", timeout=60_000)
            read = "[performance.now(), lastFrame, Number(document.getElementById('dropped').textContent)]"
            t0, frame0, dropped0 = page.evaluate(read)
            time.sleep(args.seconds)
            t1, frame1, dropped1 = page.evaluate(read)
            generate_fps = float(page.text_content("#gen-fps"))
            browser.close()
    sys.stderr.write(server.stderr)  # the server's log, as when it wrote to this terminal
    elapsed = (t1 - t0) / 1000
    shown = frame1 - frame0 - (dropped1 - dropped0)
    results = {
        "serve_command": " ".join(server.command[1:]),
        "browser": args.chromium,
        "seconds": round(elapsed, 2),
        "frames_shown": shown,
        "frames_dropped": dropped1 - dropped0,
        "page_fps": round(shown / elapsed, 2),
        "generate_fps": generate_fps,
        "note": args.note,
    }
    print(results)
    out_dir = Path(args.out_dir) if args.out_dir else None
    print("saved", save("bench_serve", torch.device(args.device), results, out_dir))
    return results


if __name__ == "__main__":
    main()
