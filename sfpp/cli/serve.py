"""`sfpp serve`: watch a stream live in the browser and steer it with prompts.

One page (`GET /`) and one WebSocket per viewer (`GET /ws`). The page sends JSON commands

    {"type": "start", "prompt": "...", "seed": 0}    start a stream (seed optional, default 0)
    {"type": "prompt", "prompt": "..."}              switch the running stream's prompt
    {"type": "stop"}                                 stop it

and the server answers with JSON text messages (`ready`, `started`, `prompt`, `stats`, `stopped`, `error`) and one
binary message per frame: the chunk index and the frame index (big-endian uint32 each), then the frame as a PNG.

A generation thread per stream runs the pipeline off the event loop and puts each chunk's encoded frames into a
queue of at most `QUEUE_CHUNKS` chunks; a sender drains it on the video's clock (the model's fps). A generator
faster than real time blocks on the full queue; a viewer slower than real time gets frames skipped, so the server's
memory stays bounded either way.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import html
import json
import signal
import struct
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import av
import torch
from aiohttp import WSMsgType, web

from sfpp.cli.options import (
    add_decoder_options,
    add_memory_option,
    add_student_options,
    add_threads_option,
    load_pipeline,
    why_random,
)
from sfpp.models.dit import CONFIGS
from sfpp.pipeline import DTYPES

# Each stream owns its KV cache, so streams on one Pipeline no longer disturb each other; but each costs a cache
# (about 6 GB for Wan2.1-1.3B at 832x480 in bf16) and their chunks take turns on the device, so by default one runs
# at a time and other viewers are told the server is busy. Raise it where memory and speed allow.
MAX_STREAMS = 1
STOPPING_WAIT_S = 60.0  # how long a new stream waits for a stopping one to leave its slot (one chunk, normally)
QUEUE_CHUNKS = 2  # chunks generated ahead of playback: bounds memory, and the prompt-switch latency
MAX_MESSAGE_BYTES = 64 * 1024
MAX_PROMPT_CHARS = 2000
FRAME_HEADER = struct.Struct(">II")  # chunk index, frame index
DEFAULT_PROMPT = "a big red circle moving fast and a small blue square moving slowly over a striped grey background"
# The page (page.html beside this file), with the default prompt in its prompt box.
PAGE = Path(__file__).with_name("page.html").read_text().replace("__PROMPT__", html.escape(DEFAULT_PROMPT))


def _stream_length(pipe) -> dict:
    """Length arguments of `pipe.stream`: none, a stream runs until its viewer stops it."""
    return {}


class _Stopped(Exception):
    """The viewer stopped the stream or went away."""


@dataclass
class _Chunk:
    index: int
    first_frame: int
    frames: list[bytes]  # PNG each
    prompt: str  # the prompt it was generated under (a switch holds from the chunk after it was asked)
    generate_fps: float  # frames per second of generation time so far (time blocked on the queue left out)


@dataclass
class _End:
    reason: str  # "ended" or "error"
    message: str = ""


class StreamSession:
    """One viewer's stream: a generation thread that fills `queue` with `_Chunk`s and then one `_End`.

    `set_prompt` takes effect after the chunk being generated; `stop` ends the thread after it (or at once while it
    waits on a full queue). `done` resolves when the thread has exited, i.e. no longer touches the pipeline."""

    def __init__(self, pipe, length: dict, loop: asyncio.AbstractEventLoop) -> None:
        self.pipe, self.length, self.loop = pipe, length, loop
        self.queue: asyncio.Queue[_Chunk | _End] = asyncio.Queue(maxsize=QUEUE_CHUNKS)
        self.done: asyncio.Future[None] = loop.create_future()
        self._stop = threading.Event()
        self._prompt_lock = threading.Lock()
        self._next_prompt: str | None = None
        self._thread: threading.Thread | None = None

    def start(self, prompt: str, seed: int) -> None:
        self._thread = threading.Thread(target=self._run, args=(prompt, seed), name="sfpp-stream", daemon=True)
        self._thread.start()

    def set_prompt(self, prompt: str) -> None:
        with self._prompt_lock:
            self._next_prompt = prompt

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """Told to stop: its thread leaves the pipeline after the chunk it is generating."""
        return self._stop.is_set()

    # --- the generation thread

    def _take_prompt(self) -> str | None:
        with self._prompt_lock:
            prompt, self._next_prompt = self._next_prompt, None
        return prompt

    def _put(self, item: _Chunk | _End) -> None:
        """Blocks while the queue is full; raises _Stopped when the stream is stopped meanwhile."""
        try:
            future = asyncio.run_coroutine_threadsafe(self.queue.put(item), self.loop)
        except RuntimeError:  # the event loop is closed: the server is gone
            raise _Stopped from None
        while True:
            try:
                return future.result(timeout=0.1)
            except concurrent.futures.TimeoutError:
                if self._stop.is_set():
                    future.cancel()
                    raise _Stopped from None

    def _generate(self, prompt: str, seed: int) -> None:
        chunk_index = frame_index = 0
        frames_done, busy_s = 0, 0.0
        codec = None
        stream = self.pipe.stream(prompt, **self.length, seed=seed, progress=False)
        try:
            start = time.perf_counter()
            for frames in stream:  # uint8 [1, n, H, W, 3]
                frames = frames[0].cpu().numpy()
                if codec is None:
                    codec = av.CodecContext.create("png", "w")
                    codec.height, codec.width = frames.shape[1:3]
                    codec.pix_fmt = "rgb24"
                pngs = [bytes(codec.encode(av.VideoFrame.from_ndarray(f, format="rgb24"))[0]) for f in frames]
                frames_done += len(pngs)
                busy_s += time.perf_counter() - start
                self._put(_Chunk(chunk_index, frame_index, pngs, prompt, frames_done / busy_s))
                chunk_index, frame_index = chunk_index + 1, frame_index + len(pngs)
                if self._stop.is_set():
                    raise _Stopped
                start = time.perf_counter()
                new_prompt = self._take_prompt()
                if new_prompt is not None:
                    stream.set_prompt(new_prompt)
                    prompt = new_prompt  # from the next chunk on, the cached frames re-encoded (no cut)
        finally:
            stream.close()  # hands its KV cache back to the pipeline

    def _run(self, prompt: str, seed: int) -> None:
        try:
            self._generate(prompt, seed)
            self._put(_End("ended", "the stream reached its length limit"))
        except _Stopped:
            pass
        except Exception as exc:  # reported to the viewer; a bug also leaves its traceback in the server's log
            if not isinstance(exc, (ValueError, TypeError, torch.OutOfMemoryError)):
                traceback.print_exc()
            try:
                self._put(_End("error", f"{type(exc).__name__}: {exc}"))
            except _Stopped:
                pass
        finally:
            try:
                self.loop.call_soon_threadsafe(lambda: self.done.done() or self.done.set_result(None))
            except RuntimeError:  # the event loop is already closed
                pass


async def play(session: StreamSession, ws, fps: float) -> None:
    """Send the session's frames on the video's clock until it ends. Frames that come due while the viewer is still
    receiving older ones are skipped (a newer frame is waiting), so a slow viewer drops frames and holds no memory."""
    loop = asyncio.get_running_loop()
    period = 1.0 / fps
    due = None  # when the next frame should be shown
    dropped = 0
    while True:
        starved = session.queue.empty()
        item = await session.queue.get()
        if isinstance(item, _End):
            await ws.send_json({"type": "stopped", "reason": item.reason, "message": item.message})
            return
        if starved and (due is None or loop.time() > due):
            due = loop.time()  # the generator fell behind (or this is the start): restart the clock
        stats = {"type": "stats", "chunk": item.index, "prompt": item.prompt, "generate_fps": item.generate_fps,
                 "dropped": dropped}  # fmt: skip
        await ws.send_json(stats)
        for k, png in enumerate(item.frames):
            newer_waiting = k + 1 < len(item.frames) or not session.queue.empty()
            if loop.time() > due + period and newer_waiting:
                dropped += 1
                due += period
                continue
            await asyncio.sleep(max(0.0, due - loop.time()))
            await ws.send_bytes(FRAME_HEADER.pack(item.index, item.first_frame + k) + png)
            due += period


@dataclass(eq=False)
class ServerState:
    pipe: object  # a Pipeline
    length: dict  # `pipe.stream`'s length arguments
    streams: set[StreamSession] = field(default_factory=set)  # those whose generation thread is running
    viewers: set[Viewer] = field(default_factory=set)
    stopping: set[asyncio.Future] = field(default_factory=set)  # viewers' stops that outlive their handler


STATE = web.AppKey("sfpp", ServerState)


class BadCommand(ValueError):
    pass


def parse_command(text: str) -> dict:
    """A viewer's JSON command, checked; BadCommand says what is wrong."""
    example = '{"type": "start", "prompt": "...", "seed": 0}'
    try:
        command = json.loads(text)
    except json.JSONDecodeError:
        raise BadCommand(f"commands are JSON objects like {example}; got {text[:80]!r}") from None
    kinds = ("start", "prompt", "stop")
    if not isinstance(command, dict) or command.get("type") not in kinds:
        raise BadCommand(f"a command is a JSON object whose type is one of {', '.join(kinds)}; got {text[:80]!r}")
    if command["type"] in ("start", "prompt"):
        prompt = command.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > MAX_PROMPT_CHARS:
            got = f"{len(prompt)} characters" if isinstance(prompt, str) and prompt.strip() else repr(prompt)[:80]
            raise BadCommand(f"prompt must be a non-empty string of at most {MAX_PROMPT_CHARS} characters; got {got}")
    if command["type"] == "start":
        seed = command.setdefault("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            raise BadCommand(f"seed must be an integer in [0, 2**63); got {seed!r}")
    return command


class Viewer:
    """One WebSocket connection: at most one stream at a time."""

    def __init__(self, app: web.Application, ws: web.WebSocketResponse) -> None:
        self.app, self.ws = app, ws
        self.session: StreamSession | None = None
        self.player: asyncio.Task | None = None

    @property
    def streaming(self) -> bool:
        return self.player is not None and not self.player.done()

    async def send(self, message: dict) -> None:
        """A JSON message to the viewer. A viewer gone meanwhile raises ConnectionError, which ends its handler
        quietly (`_websocket`): a closed page is an ordinary event, not a server error."""
        await self.ws.send_json(message)

    async def error(self, message: str) -> None:
        await self.send({"type": "error", "message": message})

    async def handle(self, text: str) -> None:
        try:
            command = parse_command(text)
        except BadCommand as exc:
            return await self.error(str(exc))
        kind = command["type"]
        if kind == "start":
            await self.start(command["prompt"], command["seed"])
        elif kind == "prompt":
            if not self.streaming:
                return await self.error("no stream is running: start one first")
            self.session.set_prompt(command["prompt"])
            await self.send({"type": "prompt", "prompt": command["prompt"]})
        elif not self.streaming:
            await self.error("no stream is running")
        else:
            await self.stop()
            await self.send({"type": "stopped", "reason": "stopped", "message": ""})

    async def start(self, prompt: str, seed: int) -> None:
        if self.streaming:
            return await self.error("a stream is already running: switch its prompt, or stop it first")
        if self.session is not None:
            await self.session.done  # the last stream's thread is on its way out
        streams: set[StreamSession] = self.app[STATE].streams
        stopping = [s.done for s in streams if s.stopping]
        if len(streams) >= MAX_STREAMS and stopping:
            # A stream on its way out (stopped, or its viewer left or reloaded) frees its slot after the chunk it is
            # generating: wait for that rather than answer "busy".
            await asyncio.wait(stopping, timeout=STOPPING_WAIT_S)
        if len(streams) >= MAX_STREAMS:
            return await self.error(
                f"busy: {len(streams)} stream(s) running, the most this server runs at once; try again later"
            )
        pipe = self.app[STATE].pipe
        session = StreamSession(pipe, self.app[STATE].length, asyncio.get_running_loop())
        streams.add(session)
        session.done.add_done_callback(lambda _: streams.discard(session))
        session.start(prompt, seed)
        self.session = session
        await self.send({"type": "started", "prompt": prompt, "seed": seed})
        self.player = asyncio.create_task(self._play(session))

    async def _play(self, session: StreamSession) -> None:
        try:
            await play(session, self.ws, self.app[STATE].pipe.fps)
        except ConnectionError:  # the viewer went away mid-send; the handler's `finally` stops the stream
            pass
        finally:
            session.stop()

    async def stop(self) -> None:
        """Stop the stream and wait until its thread has left the pipeline."""
        if self.session is None:
            return
        self.session.stop()
        if self.player is not None:
            self.player.cancel()
            await asyncio.gather(self.player, return_exceptions=True)
        await self.session.done


async def _index(request: web.Request) -> web.Response:
    return web.Response(text=PAGE, content_type="text/html")


async def _websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES, compress=False, heartbeat=30)
    await ws.prepare(request)
    state = request.app[STATE]
    viewer = Viewer(request.app, ws)
    state.viewers.add(viewer)
    pipe = state.pipe
    s = pipe.settings
    try:
        await viewer.send(
            {"type": "ready", "fps": pipe.fps, "width": s.width, "height": s.height,
             "random_weights": pipe.random_weights}
        )  # fmt: skip
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await viewer.handle(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await viewer.error("commands are JSON text messages, not binary ones")
    except ConnectionError:  # the viewer closed its page or reloaded while we were writing to it
        pass
    finally:
        # aiohttp cancels this handler when the connection drops, possibly again while it waits here: the viewer is
        # let go first, and the stop is shielded so that the stream is always stopped and waited for
        state.viewers.discard(viewer)
        stopping = asyncio.ensure_future(viewer.stop())
        state.stopping.add(stopping)  # held until done: a task nobody references may be collected mid-way
        stopping.add_done_callback(state.stopping.discard)
        await asyncio.shield(stopping)
    return ws


async def _on_shutdown(app: web.Application) -> None:
    # Every generation thread is waited for here: handlers still running are cancelled after this hook, and a thread
    # must not outlive the event loop it reports to.
    viewers, streams = list(app[STATE].viewers), list(app[STATE].streams)
    await asyncio.gather(*(v.stop() for v in viewers), return_exceptions=True)
    for session in streams:
        session.stop()
    await asyncio.gather(*(session.done for session in streams), return_exceptions=True)
    await asyncio.gather(
        *(v.ws.close(code=1001, message=b"server shutting down") for v in viewers), return_exceptions=True
    )


def make_app(pipe) -> web.Application:
    """The web application serving `pipe` (loaded once, shared by every viewer)."""
    app = web.Application()
    app[STATE] = ServerState(pipe, _stream_length(pipe))
    app.router.add_get("/", _index)
    app.router.add_get("/ws", _websocket)
    app.on_shutdown.append(_on_shutdown)
    return app


async def serve(pipe, host: str, port: int) -> None:
    """Serve until SIGINT/SIGTERM, then stop every stream and close every connection."""
    runner = web.AppRunner(make_app(pipe), handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
        print(f"sfpp serve: open http://{url_host}:{bound_port}/ in a browser (Ctrl-C stops)", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C interrupts a slow shutdown
            loop.remove_signal_handler(sig)
        print("sfpp serve: stopping", flush=True)
    finally:
        await runner.cleanup()


# --- command line (`sfpp serve`, wired in sfpp/cli/__init__.py)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be an integer in 0..65535 (0 picks a free one), got {text!r}")
    return port


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a page that plays a stream live as it is generated and switches prompts on the fly",
        description="Load a pipeline once and serve a web page that streams its video live, with prompt switching.",
        epilog="example: sfpp serve   (then open http://127.0.0.1:8000/)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="port to listen on (default 8000; 0 picks a free one)")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model", help="model directory (default: the shipped model)")
    model.add_argument("--config", choices=sorted(CONFIGS), help="use RANDOM weights of a named config (for testing)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when there is one, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="DiT precision (default: bfloat16 on CUDA, else float32)")
    add_threads_option(p)
    add_memory_option(p)
    add_decoder_options(p)
    add_student_options(p)


def run(args: argparse.Namespace) -> int:
    pipe = load_pipeline(args)  # with generate's thread policy (the pipeline's): torch's default (every core)
    if pipe.random_weights:  # spun under load and played the page at 3 fps where one thread gave the full 8
        print(f"sfpp: warning: {why_random(args)}: the video is noise.", file=sys.stderr)
    try:
        asyncio.run(serve(pipe, args.host, args.port))
    except OSError as exc:
        print(f"sfpp: error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    return 0
