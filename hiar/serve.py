"""The live demo's server: a page where one types a prompt, watches the video arrive block by block and
steers it while it streams (serve.py runs it; docs/demo.md).

    app = create_app(Engine(cfg, model, codec, encoder, device, "toy default"), Limits())
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: `/` the page (hiar/demo.html), `/ws` one websocket per page, `/video/<session>.mp4` the last
stream of a connected page, `/status` what the server holds (sessions, streams, open video writers).

Protocol on /ws: JSON text messages both ways, and one binary message per block from the server.

    client -> server
      {"type": "start", "prompt": str, "order": "timestep_first" | "frame_first", "seed": int}
      {"type": "prompt", "prompt": str}               switch, from the next block not yet started
      {"type": "ack", "stream": int, "index": int}     the page started showing block `index`
      {"type": "stop"}
    server -> client
      {"type": "hello", ...}        geometry (fps, height, width), orders, limits, example prompts
      {"type": "started", "stream", "order", "seed", "prompt", "max_blocks"}
      binary: uint32 big-endian n, n bytes of JSON {"type": "block", "stream", "index", "segment",
              "frames", "height", "width", "compute_s", "latency_s"}, then uint8 RGB [frames, height, width, 3]
      {"type": "switched", "stream", "block", "segment", "prompt"}
      {"type": "ended", "stream", "reason", "blocks", "frames", "video": url or null}
      {"type": "error", "message": str}   bad input or a failed stream; the connection stays open

Generation never runs on the event loop: every model call (text encoding, one block, its decoding and
its frames into the mp4) runs on one worker thread shared by all streams, so concurrent streams take
turns block by block and the model is never entered by two threads. A stream is pulled only while
fewer than `Limits.ahead_blocks` of its blocks are sent and not yet acknowledged by the page, which
acknowledges a block when it starts playing it: generation stays that many blocks ahead of what the
viewer sees, and a prompt switch lands a few blocks after it is typed (hiar/stream.py: blocks already
started keep their prompt). Step-first orders stream with the wavefront schedule (step_major would
finish no block before every block's first step), which gives the same video.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import struct
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import torch
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from hiar.codecs import Codec
from hiar.conditioning import Conditioning, Segment, block_at_second
from hiar.config import Config, repo_path, with_overrides
from hiar.data import check_prompt, prompt_lines
from hiar.models import WanModel
from hiar.sampling import block_noise
from hiar.stream import Stream
from hiar.text import TextEncoder
from hiar.video import VideoWriter, to_uint8
from hiar.videoset import video_stem

ORDERS = ("timestep_first", "frame_first")  # HiAR's step-first and Self-Forcing's block-first
MAX_SEED = 2**31 - 1
GONE = "the page went away"


class BadMessage(ValueError):
    """A client message the server refuses; its text goes back to the page."""


@dataclass(frozen=True)
class Limits:
    max_streams: int = 2  # streams generating at once, over all pages; one more is refused
    max_seconds: float = 300.0  # of generated video per stream
    idle_timeout: float = 300.0  # seconds without a message from the page before its connection closes
    max_prompt_chars: int = 1000
    ahead_blocks: int = 2  # blocks sent and not yet shown: how far generation runs ahead of the viewer

    def __post_init__(self) -> None:
        for name in ("max_streams", "max_seconds", "idle_timeout", "max_prompt_chars", "ahead_blocks"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")


@dataclass
class Engine:
    """What every stream shares: the config, the student, its codec and text encoder, and the one worker
    thread on which they run."""
    cfg: Config
    model: WanModel
    codec: Codec
    encoder: TextEncoder
    device: torch.device
    description: str  # what runs, for the page: config, checkpoint, device
    worker: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="hiar-generate"))

    async def run(self, fn, *args):
        """fn(*args) on the worker thread; the event loop keeps serving every page meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    def states(self, prompt: str) -> torch.Tensor:
        """Prompt states [1, text_len, text_dim] (worker thread)."""
        return self.encoder([prompt]).to(self.device, self.cfg.torch_dtype(self.device))

    def num_blocks(self, seconds: float) -> int:
        """The blocks covering `seconds` of video (at least one)."""
        v = self.cfg.video
        return max(1, block_at_second(seconds, v.fps, v.vae_stride[0], v.frames_per_block))

    def example_prompts(self) -> list[str]:
        try:
            return prompt_lines(repo_path(self.cfg.runtime.prompts))[:20]
        except (OSError, ValueError):  # a full-scale config's prompt file is downloaded separately
            return []


@dataclass
class Live:
    """One stream of a page, from its start to its end."""
    number: int
    stream: Stream
    writer: VideoWriter
    started: float  # time.perf_counter() when the page asked for it
    sent: int = 0  # blocks sent
    shown: int = 0  # blocks the page started playing
    pending: str | None = None  # a prompt to switch to before the next block
    stop: str | None = None  # why it ends, once asked
    segments: int = 1  # prompts so far
    frames: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class Server:
    """Sessions (one per connected page), the streams running, and the files they leave."""

    def __init__(self, engine: Engine, limits: Limits, video_root: Path):
        self.engine, self.limits, self.video_root = engine, limits, video_root
        self.sessions: dict[str, Session] = {}
        self.streams = 0  # running, over all sessions
        self.writers = 0  # mp4 writers open (an ffmpeg process each)

    def status(self) -> dict:
        return {"sessions": len(self.sessions), "streams": self.streams, "writers": self.writers,
                "max_streams": self.limits.max_streams, "model": self.engine.description}

    def hello(self) -> dict:
        cfg, limits = self.engine.cfg, self.limits
        v = cfg.video
        return {"type": "hello", "fps": v.fps, "height": v.height, "width": v.width,
                "frames_per_block": v.frames_per_block, "temporal_stride": v.vae_stride[0], "orders": list(ORDERS),
                "order": cfg.sampling.method if cfg.sampling.method in ORDERS else ORDERS[0],
                "max_seconds": limits.max_seconds, "max_blocks": self.engine.num_blocks(limits.max_seconds),
                "max_prompt_chars": limits.max_prompt_chars, "ahead_blocks": limits.ahead_blocks,
                "idle_timeout": limits.idle_timeout, "examples": self.engine.example_prompts(),
                "toy": v.codec == "toy_dct", "model": self.engine.description}


class Session:
    """One page's connection: its messages, its stream (one at a time) and its last video."""

    def __init__(self, server: Server, ws: WebSocket):
        self.server, self.engine, self.limits, self.ws = server, server.engine, server.limits, ws
        self.id = secrets.token_urlsafe(12)
        self.folder = Path(tempfile.mkdtemp(prefix="session-", dir=server.video_root))
        self.live: Live | None = None
        self.task: asyncio.Task | None = None
        self.video: Path | None = None  # the last stream's mp4, once complete
        self.video_name = "hiar.mp4"
        self.streams = 0
        self._send = asyncio.Lock()  # the reader and the producer both send

    async def send(self, message: dict | bytes) -> None:
        async with self._send:
            if isinstance(message, bytes):
                await self.ws.send_bytes(message)
            else:
                await self.ws.send_text(json.dumps(message))

    async def serve(self) -> None:
        """Read messages until the page goes away or falls idle; then free everything it held."""
        self.server.sessions[self.id] = self
        try:
            await self.send(self.server.hello())
            while True:
                try:
                    message = await asyncio.wait_for(self.ws.receive(), self.limits.idle_timeout)
                except asyncio.TimeoutError:
                    await self.send({"type": "error", "message": f"no message for {self.limits.idle_timeout:g} s "
                                     "(the server's --idle_timeout): this connection is closed; press Start to reconnect"})
                    await self.ws.close(1000, "idle")
                    return
                if message["type"] == "websocket.disconnect":
                    return
                try:
                    await self.handle(message)
                except BadMessage as err:
                    await self.send({"type": "error", "message": str(err)})
        except (WebSocketDisconnect, OSError, RuntimeError):  # gone while we were sending
            return
        finally:
            await self.end_stream(GONE)
            del self.server.sessions[self.id]
            shutil.rmtree(self.folder, ignore_errors=True)

    async def handle(self, message: dict) -> None:
        data = self.parse(message)
        kind = data.get("type")
        if kind == "start":
            await self.start(data)
        elif kind == "prompt":
            prompt = self.prompt_of(data)
            if self.live is None or self.live.stop is not None:
                raise BadMessage("no stream is running: press Start first")
            self.live.pending = prompt
            self.live.wake.set()
        elif kind == "ack":
            stream, index = data.get("stream"), data.get("index")
            if not (is_int(stream) and is_int(index)):
                raise BadMessage(f"an ack names its stream and block as integers, got {data!r:.200}")
            if self.live is not None and stream == self.live.number:  # acks of an ended stream arrive late
                self.live.shown = max(self.live.shown, min(index + 1, self.live.sent))
                self.live.wake.set()
        elif kind == "stop":
            if self.live is not None and self.live.stop is None:
                self.live.stop = "stopped"
                self.live.wake.set()
        else:
            raise BadMessage(f"unknown message type {kind!r:.60}: expected start, prompt, ack or stop")

    def parse(self, message: dict) -> dict:
        text = message.get("text")
        if text is None:
            raise BadMessage("binary messages are not understood: send JSON text, e.g. "
                             '{"type": "start", "prompt": "...", "order": "timestep_first", "seed": 0}')
        if len(text) > 6 * self.limits.max_prompt_chars + 1000:  # JSON writes a character in up to 6 (\uXXXX)
            raise BadMessage(f"a message of {len(text)} characters is too long (prompts: at most "
                             f"{self.limits.max_prompt_chars} characters)")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise BadMessage(f"not JSON ({err.msg} at character {err.pos}): {text[:80]!r}") from None
        if not isinstance(data, dict):
            raise BadMessage(f"a message is a JSON object with a type, got {text[:80]!r}")
        return data

    def prompt_of(self, data: dict) -> str:
        prompt = data.get("prompt")
        if not isinstance(prompt, str):
            raise BadMessage("the message has no prompt text")
        prompt = prompt.strip()
        if not prompt:
            raise BadMessage("the prompt is empty: type what the video should show")
        if len(prompt) > self.limits.max_prompt_chars:
            raise BadMessage(f"the prompt has {len(prompt)} characters; at most {self.limits.max_prompt_chars} "
                             "(the server's --max_prompt_chars)")
        try:
            check_prompt(prompt, "the prompt")
        except ValueError as err:
            raise BadMessage(str(err)) from None
        return prompt

    async def start(self, data: dict) -> None:
        prompt = self.prompt_of(data)
        order = data.get("order", self.server.hello()["order"])
        if order not in ORDERS:
            raise BadMessage(f"unknown order {order!r:.60}: choose one of {', '.join(ORDERS)}")
        seed = data.get("seed", 0)
        if not is_int(seed) or not 0 <= seed <= MAX_SEED:
            raise BadMessage(f"the seed is a whole number from 0 to {MAX_SEED}, got {seed!r:.60}")
        if self.live is not None:
            raise BadMessage("a stream is already running: stop it first")
        if self.server.streams >= self.limits.max_streams:
            raise BadMessage(f"the server is busy: {self.server.streams} stream(s) running, at most "
                             f"{self.limits.max_streams} (the server's --max_streams); try again when one ends")
        self.server.streams += 1  # counted now: no other page can take the slot while this one opens
        self.streams += 1
        if self.video is not None:
            self.video.unlink(missing_ok=True)  # one video a page: a new stream replaces the last
            self.video = None
        num_blocks = self.engine.num_blocks(self.limits.max_seconds)
        try:
            self.live = await self.engine.run(self.open, self.streams, prompt, order, seed, num_blocks)
        except Exception as err:
            self.server.streams -= 1
            await self.send({"type": "error", "message": f"the stream could not start: {err}"})
            return
        self.server.writers += 1
        self.video_name = f"{video_stem(prompt, seed)}.mp4"
        await self.send({"type": "started", "stream": self.live.number, "order": order, "seed": seed,
                         "prompt": prompt, "max_blocks": num_blocks})
        self.task = asyncio.create_task(self.produce(self.live, num_blocks))

    def open(self, number: int, prompt: str, order: str, seed: int, num_blocks: int) -> Live:
        """A stream and its mp4 writer (worker thread)."""
        started = time.perf_counter()
        cfg = with_overrides(self.engine.cfg, [f"sampling.method={order}", "sampling.schedule=wavefront"])
        cond = Conditioning([Segment(0, self.engine.states(prompt), (prompt,))])
        stream = Stream.start(self.engine.model, self.engine.codec, cfg, cond,
                              block_noise(cfg, seed, [0], self.engine.device), num_blocks)
        v = cfg.video
        writer = VideoWriter(self.folder / f"stream-{number}.mp4", v.fps, v.height, v.width)
        return Live(number, stream, writer, started)

    async def produce(self, live: Live, num_blocks: int) -> None:
        """Pull, record and send blocks while the page keeps up, until the stream ends or is stopped."""
        reason = f"the maximum length: {self.limits.max_seconds:g} s of video (the server's --max_seconds)"
        try:
            while live.stop is None:
                if live.pending is not None:  # at once, even while waiting for the page: it lands on the same block
                    await self.switch(live, num_blocks)
                if live.sent - live.shown >= self.limits.ahead_blocks:
                    live.wake.clear()
                    await live.wake.wait()
                    continue
                try:
                    block = await self.engine.run(self.pull, live)
                except Exception as err:  # out of memory, a codec error: this stream ends, the server stays
                    live.stop = live.stop or f"generation failed: {type(err).__name__}: {err}"
                    break
                if block is None:
                    break
                await self.send(block)
                live.sent += 1
        except Exception:  # a send to a page that went away
            live.stop = live.stop or GONE
        await self.finish(live, live.stop or reason)

    async def switch(self, live: Live, num_blocks: int) -> None:
        prompt, live.pending = live.pending, None
        states = await self.engine.run(self.engine.states, prompt)
        try:
            block = live.stream.switch(states, (prompt,))
        except ValueError as err:  # every block has started: the stream is at its maximum length
            await self.send({"type": "error", "message": str(err)})
            return
        await self.send({"type": "switched", "stream": live.number, "block": block, "segment": live.segments,
                         "prompt": prompt})
        live.segments += 1

    def pull(self, live: Live) -> bytes | None:
        """The next block, written to the mp4 and packed for the page, or None at the stream's end
        (worker thread)."""
        begin = time.perf_counter()
        block = next(live.stream, None)
        if block is None:
            return None
        pixels = to_uint8(block.frames[0])  # [f, H, W, 3], sample 0: a page streams one video
        live.writer.write(block.frames[0])
        live.frames += len(pixels)
        now = time.perf_counter()
        header = {"type": "block", "stream": live.number, "index": block.index,
                  "segment": live.stream.runner.cond.segment_of(block.index), "frames": len(pixels),
                  "height": pixels.shape[1], "width": pixels.shape[2], "compute_s": now - begin,
                  "latency_s": now - live.started if block.index == 0 else None}
        head = json.dumps(header).encode()
        return struct.pack(">I", len(head)) + head + pixels.tobytes()

    async def finish(self, live: Live, reason: str) -> None:
        """Close the stream's mp4 (published when the page is still there, for its download), free its slot."""
        keep = reason != GONE and live.frames > 0
        try:
            await self.engine.run(live.writer.close if keep else live.writer.abort)
        except OSError as err:
            keep, reason = False, f"{reason}; the video could not be written: {err}"
        self.server.writers -= 1
        self.server.streams -= 1
        self.live = None
        if keep:
            self.video = live.writer.path
        try:
            await self.send({"type": "ended", "stream": live.number, "reason": reason, "blocks": live.sent,
                             "frames": live.frames, "video": f"/video/{self.id}.mp4" if keep else None})
        except Exception:
            pass  # the page is gone; serve() frees the rest

    async def end_stream(self, reason: str) -> None:
        """Stop the running stream, if any, and wait until its block in flight is done and its slot free."""
        if self.live is not None and self.live.stop is None:
            self.live.stop = reason
            self.live.wake.set()
        if self.task is not None:
            await self.task


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def create_app(engine: Engine, limits: Limits, video_root: str | Path | None = None) -> FastAPI:
    """The demo as an ASGI app. Videos go to a fresh folder under `video_root` (default: the system's
    temporary folder), removed when the app shuts down; a session's files go when its page does."""
    root = Path(tempfile.mkdtemp(prefix="hiar-serve-", dir=video_root))
    server = Server(engine, limits, root)
    page = files("hiar").joinpath("demo.html").read_text()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        shutil.rmtree(root, ignore_errors=True)  # the engine (and its worker) may serve another app

    app = FastAPI(title="HiAR live demo", lifespan=lifespan)
    app.state.server = server

    @app.get("/")
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/status")
    async def status() -> dict:
        return server.status()

    @app.get("/video/{session_id}.mp4")
    async def video(session_id: str):
        session = server.sessions.get(session_id)
        if session is None or session.video is None or not session.video.exists():
            return JSONResponse({"error": "no finished video for this page: stop the stream first (videos go "
                                 "when their page closes)"}, status_code=404)
        return FileResponse(session.video, media_type="video/mp4", filename=session.video_name)

    @app.websocket("/ws")
    async def websocket(ws: WebSocket) -> None:
        await ws.accept()
        await Session(server, ws).serve()

    return app
