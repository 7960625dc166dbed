"""`sfpp serve`: the WebSocket protocol, pacing and bounded queues, Ctrl-C, and the page in a real headless Chromium."""

import asyncio
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tracemalloc

import aiohttp
import av
import numpy as np
import pytest
import torch
from aiohttp.test_utils import TestServer

from sfpp.cli import main
from sfpp.cli.options import DEFAULT_MODEL_DIR
from sfpp.cli.serve import FRAME_HEADER, QUEUE_CHUNKS, STATE, StreamSession, _stream_length, make_app, play
from sfpp.pipeline import Pipeline

PROMPT = "a big red circle moving fast over a striped grey background"
OTHER_PROMPT = "a small cyan diamond moving slowly over a checkered teal background"


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.from_pretrained(DEFAULT_MODEL_DIR)


def decode_png(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data), format="png_pipe") as container:
        return next(container.decode(video=0)).to_ndarray(format="rgb24")


def with_server(pipe, body) -> None:
    """Run `await body(app, ws_connect)` against the app served on a free local port."""

    async def main_() -> None:
        app = make_app(pipe)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        try:
            async with aiohttp.ClientSession() as http:
                await asyncio.wait_for(body(app, lambda: http.ws_connect(server.make_url("/ws"))), 60)
        finally:
            await server.close()

    asyncio.run(main_())


async def next_json(ws, kind: str | None = None) -> dict:
    """The next text message (of type `kind`, skipping frames and other messages when given)."""
    while True:
        msg = await ws.receive(timeout=20)
        if msg.type == aiohttp.WSMsgType.TEXT:
            data = json.loads(msg.data)
            if kind is None or data["type"] == kind:
                return data
        elif msg.type != aiohttp.WSMsgType.BINARY:
            raise AssertionError(f"connection ended: {msg}")


async def frames(ws, count: int) -> list[tuple[int, int, np.ndarray, float]]:
    """The next `count` frames as (chunk index, frame index, pixels, arrival time)."""
    out = []
    while len(out) < count:
        msg = await ws.receive(timeout=20)
        assert msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY), msg
        if msg.type == aiohttp.WSMsgType.BINARY:
            chunk, frame = FRAME_HEADER.unpack_from(msg.data)
            out.append((chunk, frame, decode_png(msg.data[FRAME_HEADER.size :]), time.monotonic()))
    return out


def test_page_is_served(pipe):
    async def main_() -> None:
        server = TestServer(make_app(pipe), host="127.0.0.1")
        await server.start_server()
        try:
            async with aiohttp.ClientSession() as http, http.get(server.make_url("/")) as response:
                assert response.status == 200 and response.content_type == "text/html"
                page = await response.text()
        finally:
            await server.close()
        for needle in ('id="video"', "image-rendering: pixelated", "/ws", 'id="prompt"', 'id="stop"'):
            assert needle in page

    asyncio.run(main_())


def test_stream_is_the_pipelines_video_played_in_real_time(pipe):
    """Frames are the pipeline's own (PNG is lossless), at the model's fps; switching the prompt changes the video
    while the chunk index goes on; stop stops it and frees the pipeline."""
    reference = torch.cat(list(pipe.stream(PROMPT, num_frames=24, seed=3, progress=False)), 1)[0].numpy()

    async def body(app, connect):
        async with connect() as ws:
            ready = await next_json(ws)
            assert ready == {"type": "ready", "fps": 8, "width": 32, "height": 32, "random_weights": False}
            await ws.send_json({"type": "start", "prompt": PROMPT, "seed": 3})
            assert (await next_json(ws)) == {"type": "started", "prompt": PROMPT, "seed": 3}
            first = await frames(ws, 6)
            assert [(c, f) for c, f, _, _ in first] == [(0, 0), (0, 1), (0, 2), (1, 3), (1, 4), (1, 5)]
            np.testing.assert_array_equal(np.stack([p for _, _, p, _ in first]), reference[:6])
            period = (first[-1][3] - first[0][3]) / 5
            assert 0.8 / 8 < period < 2.0 / 8, f"frames should come at 8 fps, came every {period:.3f} s"

            await ws.send_json({"type": "prompt", "prompt": OTHER_PROMPT})
            assert (await next_json(ws, "prompt")) == {"type": "prompt", "prompt": OTHER_PROMPT}
            later = await frames(ws, 18)  # frames 6..23; the switch lands within QUEUE_CHUNKS + 1 chunks
            assert [f for _, f, _, _ in later] == list(range(6, 24))
            assert [c for c, _, _, _ in later] == [f // 3 for f in range(6, 24)]
            switched = np.stack([p for _, _, p, _ in later[-3:]])
            assert not np.array_equal(switched, reference[-3:]), "the prompt switch did not change the video"

            await ws.send_json({"type": "stop"})
            assert (await next_json(ws, "stopped"))["reason"] == "stopped"
            assert not app[STATE].streams, "the generation thread is still running after stop"
            with pytest.raises(asyncio.TimeoutError):
                await ws.receive(timeout=0.5)  # nothing after "stopped"
            await ws.send_json({"type": "start", "prompt": OTHER_PROMPT})
            assert (await next_json(ws))["type"] == "started"
            assert len(await frames(ws, 2)) == 2

    with_server(pipe, body)


@pytest.mark.parametrize(
    "message,error",
    [
        ("not json", "commands are JSON objects"),
        ("[1, 2]", "type is one of start, prompt, stop"),
        ('{"type": "play"}', "type is one of start, prompt, stop"),
        ('{"type": "start"}', "prompt must be a non-empty string"),
        ('{"type": "start", "prompt": "   "}', "prompt must be a non-empty string"),
        ('{"type": "start", "prompt": 7}', "got 7"),
        (json.dumps({"type": "start", "prompt": "x" * 2001}), "got 2001 characters"),
        ('{"type": "start", "prompt": "a red circle", "seed": "1"}', "seed must be an integer"),
        ('{"type": "start", "prompt": "a red circle", "seed": -1}', "got -1"),
        ('{"type": "start", "prompt": "a red circle", "seed": 1.5}', "got 1.5"),
        ('{"type": "start", "prompt": "a red circle", "seed": true}', "got True"),
        ('{"type": "prompt", "prompt": "a red circle"}', "no stream is running: start one first"),
        ('{"type": "stop"}', "no stream is running"),
        (b"\x00binary", "JSON text messages, not binary"),
    ],
)
def test_bad_input_is_answered_clearly(pipe, message, error):
    async def body(app, connect):
        async with connect() as ws:
            await next_json(ws, "ready")
            await (ws.send_bytes if isinstance(message, bytes) else ws.send_str)(message)
            reply = await next_json(ws)
            assert reply["type"] == "error" and error in reply["message"], reply
            await ws.send_json({"type": "start", "prompt": PROMPT})  # the connection is still usable
            assert (await next_json(ws))["type"] == "started"
            await ws.send_json({"type": "start", "prompt": PROMPT})
            assert "already running" in (await next_json(ws, "error"))["message"]

    with_server(pipe, body)


def test_oversized_message_closes_the_connection(pipe):
    async def body(app, connect):
        async with connect() as ws:
            await next_json(ws, "ready")
            await ws.send_str(json.dumps({"type": "start", "prompt": "x" * 100_000}))
            msg = await ws.receive(timeout=10)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
            assert ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG

    with_server(pipe, body)


def test_one_stream_at_a_time_and_a_disconnect_frees_the_pipeline(pipe):
    async def body(app, connect):
        async with connect() as second:
            await next_json(second, "ready")
            async with connect() as first:
                await next_json(first, "ready")
                await first.send_json({"type": "start", "prompt": PROMPT})
                await frames(first, 1)
                await second.send_json({"type": "start", "prompt": PROMPT})
                assert (await next_json(second))["message"].startswith("busy:")
            deadline = time.monotonic() + 10  # the first viewer left: its generation thread must stop
            while app[STATE].streams and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not app[STATE].streams, "the stream kept running after its viewer disconnected"
            await second.send_json({"type": "start", "prompt": PROMPT})
            assert (await next_json(second))["type"] == "started"
            assert len(await frames(second, 2)) == 2

    with_server(pipe, body)


class FastPipe:
    """Random 128x128 chunks of 3 frames, as fast as they can be drawn (far faster than they are played)."""

    def stream(self, prompt, *, num_frames, seed, progress):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(0, num_frames, 3):
            yield torch.randint(0, 256, (1, 3, 128, 128, 3), dtype=torch.uint8, generator=gen)


class RecordingViewer:
    """Stands in for the WebSocket; each frame takes `send_s` seconds to reach the viewer."""

    def __init__(self, send_s: float) -> None:
        self.send_s, self.frames, self.png_bytes = send_s, [], 0

    async def send_json(self, data) -> None:
        pass

    async def send_bytes(self, data: bytes) -> None:
        self.frames.append(FRAME_HEADER.unpack_from(data)[1])
        self.png_bytes = len(data)
        await asyncio.sleep(self.send_s)


def play_for(seconds: float, viewer: RecordingViewer, fps: float) -> int:
    """Stream FastPipe to `viewer` for `seconds`; the peak Python memory traced meanwhile."""

    async def main_() -> None:
        session = StreamSession(FastPipe(), {"num_frames": 100_000}, asyncio.get_running_loop())
        session.start(PROMPT, 0)
        player = asyncio.create_task(play(session, viewer, fps))
        await asyncio.sleep(seconds)
        session.stop()
        player.cancel()
        await asyncio.gather(player, return_exceptions=True)
        await session.done

    tracemalloc.start()
    try:
        asyncio.run(main_())
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_slow_viewer_drops_frames_and_memory_stays_bounded():
    fps, seconds = 50, 2.0
    slow = RecordingViewer(send_s=0.1)  # 10 frames/s reach a viewer of a 50 fps video
    peak = play_for(seconds, slow, fps)
    sent = slow.frames
    assert len(sent) <= seconds / slow.send_s + 3, "frames were sent faster than the viewer takes them"
    assert sent[-1] >= 0.5 * fps * seconds, f"playback lagged behind the video's clock instead of skipping: {sent}"
    assert len(set(np.diff(sent))) > 1 or sent[-1] > len(sent), "no frames were dropped"
    # The queue holds QUEUE_CHUNKS chunks; one more is being played and one being generated. Unbounded, the producer
    # (hundreds of frames/s) would hold every frame it made.
    bound = (QUEUE_CHUNKS + 3) * 3 * slow.png_bytes + 512 * 1024
    assert peak < bound, f"peak Python memory {peak} B, more than {bound} B"

    fast = RecordingViewer(send_s=0)
    play_for(1.0, fast, fps)
    assert fast.frames == list(range(len(fast.frames))), "a viewer that keeps up lost frames"
    assert 0.5 * fps <= len(fast.frames) <= 1.2 * fps, f"{len(fast.frames)} frames in 1 s of a {fps} fps video"


class FailingPipe:
    def stream(self, prompt, **kwargs):
        raise ValueError(f"prompt {prompt!r} is not allowed here")
        yield


def test_a_pipeline_error_reaches_the_viewer():
    viewer = RecordingViewer(send_s=0)
    sent = []

    async def send_json(data) -> None:
        sent.append(data)

    viewer.send_json = send_json

    async def main_() -> None:
        session = StreamSession(FailingPipe(), {}, asyncio.get_running_loop())
        session.start("boom", 0)
        await asyncio.wait_for(play(session, viewer, 8), 10)
        await session.done

    asyncio.run(main_())
    assert sent == [{"type": "stopped", "reason": "error", "message": "ValueError: prompt 'boom' is not allowed here"}]
    assert viewer.frames == []


def test_streams_are_endless(pipe):
    assert _stream_length(pipe) == {}  # a stream runs until stopped (past the RoPE table: tests/test_streams.py)
    with pipe.stream(PROMPT, **_stream_length(pipe), seed=0, progress=False) as stream:
        assert next(stream).shape[1] == 3 and stream.num_frames is None


def test_cli_rejects_a_bad_port(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--port", "70000"])
    assert exc.value.code == 2
    assert "port must be an integer in 0..65535" in capsys.readouterr().err


def test_cli_reports_a_port_in_use(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"sfpp: error: cannot listen on 127.0.0.1:{port}" in err and "address already in use" in err, err


class ServerProcess:
    """`sfpp serve --port 0` in a subprocess; `url` once it listens."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sfpp.cli", "serve", "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
        )
        line = self.proc.stdout.readline()
        assert "open http://127.0.0.1:" in line, line + self.proc.stderr.read()
        self.url = line.split("open ")[1].split()[0]

    def interrupt(self, timeout: float = 20) -> tuple[int, str]:
        """Ctrl-C; the exit status and stderr."""
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"the server did not stop within {timeout} s of Ctrl-C") from None
        return self.proc.returncode, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def test_ctrl_c_stops_the_server_cleanly_mid_stream():
    server = ServerProcess()
    try:

        async def watch() -> int:
            async with aiohttp.ClientSession() as http, http.ws_connect(server.url + "ws") as ws:
                await next_json(ws, "ready")
                await ws.send_json({"type": "start", "prompt": PROMPT})
                await frames(ws, 2)
                code, err = server.interrupt()
                assert code == 0 and "Traceback" not in err, err
                while (await ws.receive(timeout=10)).type not in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                    pass
                return ws.close_code

        assert asyncio.run(watch()) == aiohttp.WSCloseCode.GOING_AWAY
    finally:
        server.kill()


# --- the page in a real browser


def find_chromium() -> str:
    """Chromium's path; SFPP_CHROMIUM (set by CI after installing it) makes a missing browser a failure."""
    required = os.environ.get("SFPP_CHROMIUM")
    if required:
        assert os.access(required, os.X_OK), f"SFPP_CHROMIUM={required} is not an executable"
        return required
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no Chromium on PATH (Debian: apt-get install chromium; .ci/run installs it when run as root)")


def test_page_plays_and_steers_the_stream_in_headless_chromium():
    chromium = find_chromium()
    if os.environ.get("SFPP_CHROMIUM"):
        from playwright.sync_api import sync_playwright
    else:
        sync_playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright").sync_playwright

    server = ServerProcess()
    chunk = "Number(document.getElementById('chunk').textContent)"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(server.url)
            page.wait_for_function("!document.getElementById('start').disabled", timeout=15_000)
            page.fill("#prompt", PROMPT)
            page.click("#start")
            page.wait_for_function(f"{chunk} >= 2", timeout=20_000)
            box = page.locator("#video").bounding_box()
            assert (box["width"], box["height"]) == (512, 512), "the 32x32 frames should be shown 16x larger"
            clip = {"x": round(box["x"]), "y": round(box["y"]), "width": 512, "height": 512}
            before = decode_png(page.screenshot(clip=clip))
            page.wait_for_timeout(1000)  # 8 frames later
            after = decode_png(page.screenshot(clip=clip))
            assert (before != after).any(axis=-1).mean() > 0.01, "the picture did not change"
            blocks = after.reshape(32, 16, 32, 16, 3)
            assert (blocks == blocks[:, :1, :, :1]).mean() > 0.95, "pixels should be scaled up crisply, not smoothed"
            assert len(np.unique(after.reshape(-1, 3), axis=0)) > 4, "the picture is (nearly) blank"
            fps = float(page.text_content("#fps"))
            assert 4 <= fps <= 10, f"the page played {fps} fps of an 8 fps video"

            switched_at = page.evaluate(chunk)
            page.fill("#prompt", OTHER_PROMPT)
            page.click("#switch")
            page.wait_for_function(
                "document.getElementById('status').textContent.startsWith('switching to: a small cyan')"
            )
            page.wait_for_function(f"{chunk} >= {switched_at + QUEUE_CHUNKS + 2}", timeout=20_000)
            page.wait_for_function(  # and once the new prompt's chunks play, the status says so
                "document.getElementById('status').textContent === 'streaming: ' + " + json.dumps(OTHER_PROMPT),
                timeout=10_000,
            )

            page.click("#stop")
            page.wait_for_function("document.getElementById('status').textContent === 'stopped'", timeout=10_000)
            stopped_at = page.evaluate(chunk)
            page.wait_for_timeout(500)
            assert page.evaluate(chunk) == stopped_at, "frames kept coming after stop"
            assert page.is_enabled("#start") and not page.is_enabled("#stop")
            browser.close()
        code, err = server.interrupt()
        assert code == 0 and "Traceback" not in err, err
    finally:
        server.kill()


# --- ordinary events are not errors: viewers that leave at any moment, reloads, Stop, and a protocol fuzz


def no_server_errors(caplog, capfd) -> None:
    """Nothing the server logged at WARNING or above, and no traceback on stderr."""
    logged = [r for r in caplog.records if r.levelno >= 30]
    assert not logged, [f"{r.name}: {r.getMessage()}" for r in logged]
    assert "Traceback" not in capfd.readouterr().err


async def wait_until_free(app, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while app[STATE].streams and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert not app[STATE].streams, "the stream kept its slot after its viewer left"


async def start_and_watch(connect, frames_wanted: int = 2) -> None:
    async with connect() as ws:
        await next_json(ws, "ready")
        await ws.send_json({"type": "start", "prompt": PROMPT})
        assert (await next_json(ws))["type"] == "started"
        assert len(await frames(ws, frames_wanted)) == frames_wanted


@pytest.mark.parametrize("fail_after", [0, 1, 2, 3, 5, 8])
def test_a_viewer_gone_mid_write_is_no_error(pipe, monkeypatch, caplog, capfd, fail_after):
    """The viewer's transport closes under the server's n-th write (the ready message, "started", stats, a frame,
    the prompt switch's answer, "stopped"): no traceback, the slot is freed, the next viewer is served."""
    from aiohttp import web

    writes, broken = [0], [True]

    def failing(send):
        async def wrapper(self, *args, **kwargs):
            writes[0] += 1
            if broken[0] and writes[0] > fail_after:
                raise aiohttp.ClientConnectionResetError("Cannot write to closing transport")
            return await send(self, *args, **kwargs)

        return wrapper

    for name in ("send_json", "send_bytes"):
        monkeypatch.setattr(web.WebSocketResponse, name, failing(getattr(web.WebSocketResponse, name)))

    async def body(app, connect):
        async with connect() as ws:
            await ws.send_json({"type": "start", "prompt": PROMPT})
            await asyncio.sleep(0.2)
            await ws.send_json({"type": "prompt", "prompt": OTHER_PROMPT})
            await asyncio.sleep(0.1)
            await ws.send_json({"type": "stop"})
            await asyncio.sleep(0.1)
        await wait_until_free(app)
        broken[0] = False
        await start_and_watch(connect)

    caplog.set_level("WARNING")
    with_server(pipe, body)
    no_server_errors(caplog, capfd)


def test_disconnects_reloads_and_stop_at_any_moment(pipe, caplog, capfd):
    """Viewers that vanish (the TCP connection dropped) or close at every moment of a stream, and a reload (leave,
    then start again at once): each new start is served, not told "busy"; so is another viewer's start right
    after a Stop (the stopping stream's slot is waited for, one chunk at most)."""

    async def body(app, connect):
        for i in range(12):
            async with connect() as ws:
                await next_json(ws, "ready")
                await ws.send_json({"type": "start", "prompt": PROMPT})
                await asyncio.sleep(0.02 * i)
                if i % 3 == 0:
                    await ws.send_json({"type": "stop"})
                if i % 2:
                    ws._writer.transport.abort()  # no close frame: a crashed tab, a dropped network
            async with connect() as again:  # the reload: at once, while the last stream may still be stopping
                await next_json(again, "ready")
                await again.send_json({"type": "start", "prompt": PROMPT})
                assert (await next_json(again))["type"] == "started", i
        async with connect() as first, connect() as second:
            await next_json(first, "ready")
            await next_json(second, "ready")
            await first.send_json({"type": "start", "prompt": PROMPT})
            await frames(first, 1)
            await first.send_json({"type": "stop"})
            await second.send_json({"type": "start", "prompt": PROMPT})
            assert (await next_json(second))["type"] == "started"
            assert len(await frames(second, 2)) == 2
        await wait_until_free(app)

    caplog.set_level("WARNING")
    with_server(pipe, body)
    no_server_errors(caplog, capfd)


def test_protocol_fuzz_leaves_the_server_serving(pipe, caplog, capfd):
    """Malformed JSON, unknown commands, wrong types, a 1 MB prompt, bytes that are not UTF-8, binary messages,
    100 prompt switches a second, and 50 connections opened and dropped: the next viewer is served."""

    async def body(app, connect):
        junk = ["", "{", "null", "[]", '"start"', '{"type": 1}', '{"type": "launch"}', '{"type": "start"}',
                '{"type": "start", "prompt": 5}', '{"type": "start", "prompt": "x", "seed": -1}',
                '{"type": "start", "prompt": "x", "seed": 1.5}', '{"type": "prompt", "prompt": "x"}',
                '{"type": "stop"}', "\x00" * 100, json.dumps({"type": "start", "prompt": "x" * 3000})]  # fmt: skip
        async with connect() as ws:
            await next_json(ws, "ready")
            for text in junk:
                await ws.send_str(text)
                assert (await next_json(ws))["type"] == "error", text
            await ws.send_bytes(b"\x00\x01")
            assert (await next_json(ws))["type"] == "error"
            await ws.send_json({"type": "start", "prompt": PROMPT})
            assert (await next_json(ws))["type"] == "started"
            for k in range(100):  # 100 switches in about a second, frames flowing meanwhile
                await ws.send_json({"type": "prompt", "prompt": f"{OTHER_PROMPT} {k}"})
                await asyncio.sleep(0.01)
            acks = 0
            while acks < 100:
                acks += (await next_json(ws, "prompt"))["type"] == "prompt"
            assert len(await frames(ws, 2)) == 2
        for bad in (json.dumps({"type": "start", "prompt": "x" * 1_000_000}).encode(), b'{"type": "\xff\xfe"}'):
            async with connect() as ws:  # too big, not UTF-8: the server closes this connection only
                await next_json(ws, "ready")
                await ws.send_frame(bad, aiohttp.WSMsgType.TEXT)
                msg = await ws.receive(timeout=10)
                assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
        sockets = [await connect().__aenter__() for _ in range(50)]
        for k, ws in enumerate(sockets):
            if k % 2:
                ws._writer.transport.abort()
            else:
                await ws.close()
        await wait_until_free(app)
        deadline = time.monotonic() + 10  # every dropped connection is noticed and let go
        while app[STATE].viewers and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert not app[STATE].viewers
        await start_and_watch(connect)

    caplog.set_level("WARNING")
    with_server(pipe, body)
    no_server_errors(caplog, capfd)


def test_load_benchmark_on_loopback(tmp_path):
    """bench/bench_serve_load.py for a few seconds: the streaming viewer gets the video's frame rate while watchers
    sit connected and refused viewers are told "busy", and a new viewer is served right after."""
    from bench import bench_serve_load

    result = bench_serve_load.main(["--seconds", "4", "--watchers", "3", "--refused", "2", "--out-dir", str(tmp_path)])
    assert result["received_fps_median"] >= 0.75 * result["model_fps"], result["per_second"]
    assert result["refusals"] >= 4 and result["unexpected_answers"] == 0
    assert "Traceback" not in result["server_stderr"], result["server_stderr"]
    assert result["start_after_stop_s"] < 5
    assert len(list(tmp_path.glob("bench_serve_load-*.json"))) == 1


def test_stats_say_when_a_prompt_switch_has_taken_hold(pipe):
    """Each chunk's stats name the prompt it was generated under, so the page's status moves from "switching to"
    to "streaming" once the new prompt's chunks arrive (the page's status used to stay at "switching to")."""

    async def body(app, connect):
        async with connect() as ws:
            await next_json(ws, "ready")
            await ws.send_json({"type": "start", "prompt": PROMPT})
            assert (await next_json(ws, "stats"))["prompt"] == PROMPT
            await ws.send_json({"type": "prompt", "prompt": OTHER_PROMPT})
            await next_json(ws, "prompt")
            for _ in range(QUEUE_CHUNKS + 3):  # the queued chunks were made under the old prompt
                if (await next_json(ws, "stats"))["prompt"] == OTHER_PROMPT:
                    break
            else:
                raise AssertionError("no chunk of the new prompt arrived")

    with_server(pipe, body)
