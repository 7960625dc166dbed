"""`sfpp serve` under load on loopback: one viewer streaming, several more connected and watching the status only,
and viewers that keep asking for a stream of their own and are refused ("busy"), for `--seconds`. The server runs
in a subprocess; every second this records the frames the streaming viewer received, the frames the server
dropped for it, the refusals, and the server's resident memory (from /proc). Ends by checking that the server
still serves a new viewer after the streaming one leaves.

    python -m bench.bench_serve_load --seconds 180 --watchers 4 --refused 3
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path

import aiohttp
import torch

from bench.common import parser as make_parser
from bench.common import save, serve_in_subprocess
from sfpp.cli.serve import DEFAULT_PROMPT, FRAME_HEADER


def rss_mib(pid: int) -> float:
    """Resident memory of a process in MiB (Linux), NaN where /proc cannot tell."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


async def _next(ws, kind: str, timeout: float = 60) -> dict:
    """The next JSON message of type `kind` (frames and other messages skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        msg = await ws.receive(timeout=max(0.1, deadline - time.monotonic()))
        if msg.type == aiohttp.WSMsgType.TEXT:
            data = json.loads(msg.data)
            if data["type"] == kind:
                return data
        elif msg.type != aiohttp.WSMsgType.BINARY:
            raise RuntimeError(f"connection ended while waiting for {kind!r}: {msg}")


async def run_load(url: str, pid: int, seconds: float, watchers: int, refused: int, prompt: str) -> dict:
    ws_url = url.rstrip("/") + "/ws"
    counts = {"frames": 0, "dropped": 0, "refusals": 0, "refusal_errors": 0, "chunks": 0}
    samples: list[dict] = []
    stop = asyncio.Event()

    async def streamer(http) -> float:
        async with http.ws_connect(ws_url) as ws:
            fps = (await _next(ws, "ready"))["fps"]
            await ws.send_json({"type": "start", "prompt": prompt, "seed": 0})
            await _next(ws, "started")
            while not stop.is_set():
                try:
                    msg = await ws.receive(timeout=0.5)
                except asyncio.TimeoutError:
                    continue
                if msg.type == aiohttp.WSMsgType.BINARY and len(msg.data) > FRAME_HEADER.size:
                    counts["frames"] += 1
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    data = json.loads(msg.data)
                    if data["type"] == "stats":
                        counts["dropped"], counts["chunks"] = data["dropped"], data["chunk"] + 1
                    elif data["type"] == "stopped":
                        raise RuntimeError(f"the stream ended early: {data}")
                else:
                    raise RuntimeError(f"the streaming connection ended: {msg}")
            await ws.send_json({"type": "stop"})
            return fps

    async def watcher(http) -> None:  # connected, reading, asking for nothing
        async with http.ws_connect(ws_url) as ws:
            await _next(ws, "ready")
            await stop.wait()

    async def refused_viewer(http) -> None:  # asks for a stream once a second; the one slot is taken
        async with http.ws_connect(ws_url) as ws:
            await _next(ws, "ready")
            while not stop.is_set():
                await ws.send_json({"type": "start", "prompt": prompt})
                answer = await _next(ws, "error")
                counts["refusals" if answer["message"].startswith("busy") else "refusal_errors"] += 1
                await asyncio.sleep(1.0)

    async def sampler() -> None:
        start, last = time.monotonic(), dict(counts)
        while not stop.is_set():
            await asyncio.sleep(1.0)
            now = dict(counts)
            samples.append({
                "t": round(time.monotonic() - start, 2),
                "frames": now["frames"] - last["frames"],
                "dropped": now["dropped"] - last["dropped"],
                "rss_mib": round(rss_mib(pid), 1),
            })
            last = now

    async with aiohttp.ClientSession() as http:
        stream_task = asyncio.create_task(streamer(http))
        while counts["frames"] == 0 and not stream_task.done():  # the first frame: the model is warm
            await asyncio.sleep(0.05)
        others = [asyncio.create_task(watcher(http)) for _ in range(watchers)]
        others += [asyncio.create_task(refused_viewer(http)) for _ in range(refused)]
        counts.update(frames=0, dropped=0)
        sample_task = asyncio.create_task(sampler())
        await asyncio.sleep(seconds)
        stop.set()
        fps = await stream_task
        await asyncio.gather(sample_task, *others)
        # the slot is free again: a new viewer gets a stream at once
        t0 = time.monotonic()
        async with http.ws_connect(ws_url) as ws:
            await _next(ws, "ready")
            await ws.send_json({"type": "start", "prompt": prompt})
            await _next(ws, "started")
            next_start_s = time.monotonic() - t0
    steady = samples[1:] or samples
    rss = [s["rss_mib"] for s in samples]
    return {
        "seconds": seconds,
        "watchers": watchers,
        "refused_viewers": refused,
        "model_fps": fps,
        "received_fps_median": statistics.median(s["frames"] for s in steady),
        "received_fps_min": min(s["frames"] for s in steady),
        "frames_received": sum(s["frames"] for s in samples),
        "frames_dropped": sum(s["dropped"] for s in samples),
        "refusals": counts["refusals"],
        "unexpected_answers": counts["refusal_errors"],
        "rss_mib_first": rss[0],
        "rss_mib_max": max(rss),
        "rss_mib_last": rss[-1],
        "start_after_stop_s": round(next_start_s, 3),
        "per_second": samples,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=180.0, help="how long to load the server (default 180)")
    parser.add_argument("--watchers", type=int, default=4, help="viewers connected without a stream (default 4)")
    parser.add_argument("--refused", type=int, default=3, help="viewers asking for a stream each second (default 3)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="the server's device")
    parser.add_argument("--model", help="model directory (default: the shipped model)")
    parser.add_argument("--note", default="", help="free text saved with the result (e.g. how busy the machine was)")
    parser.add_argument("--out-dir", help="where to save the JSON (default bench/results/)")
    args = parser.parse_args(argv)
    with serve_in_subprocess(args.device, args.model) as server:
        load = asyncio.run(
            run_load(server.url, server.process.pid, args.seconds, args.watchers, args.refused, args.prompt)
        )
    results = {"serve_command": " ".join(server.command[1:]), **load, "server_stderr": server.stderr[-4000:],
               "note": args.note}  # fmt: skip
    print({k: v for k, v in results.items() if k != "per_second"})
    out_dir = Path(args.out_dir) if args.out_dir else None
    print("saved", save("bench_serve_load", torch.device(args.device), results, out_dir))
    return results


if __name__ == "__main__":
    main()
