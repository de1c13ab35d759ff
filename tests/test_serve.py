"""The live demo's protocol (hiar/serve.py), against the app served on 127.0.0.1 in this process with the
toy default: blocks stream only as fast as the page acknowledges them, a prompt switch takes effect and
is announced, a stopped stream's mp4 holds what was sent, bad input is answered and the server goes on,
and every limit holds (concurrent streams, length, idle pages, pages that vanish). Every wait is bounded."""

from __future__ import annotations

import contextlib
import copy
import json
import struct
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import uvicorn
from websockets.sync.client import connect

from conftest import random_inputs
from hiar import lora
from hiar.checkpoints import CheckpointError, save_adapter
from hiar.config import load_config, with_overrides
from hiar.models import WanModel
from hiar.serve import Limits, create_app
from hiar.toyworld import BACKGROUNDS, measure_frame
from hiar.video import read_video
from serve import build_engine, parse_args

WAIT = 60.0  # seconds: generous for a loaded 2-core machine; a toy block takes ~40 ms unloaded
OLD = "a red circle moving left on a black background"
NEW = "a blue circle moving left on a dark green background"


@pytest.fixture(scope="module")
def engine():
    return build_engine(parse_args(["--device", "cpu"]))  # the embedded default, as `python serve.py` loads it


@contextlib.contextmanager
def serving(engine, tmp_path: Path, **limits):
    """The demo on 127.0.0.1 (a free port) in a thread; yields (address, the app's Server)."""
    app = create_app(engine, Limits(**limits), tmp_path)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", ws_max_size=2**20))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}", app.state.server
    finally:
        server.should_exit = True
        thread.join(WAIT)


def receive(ws) -> dict:
    """The next message: JSON as a dict, a block as its header plus "pixels" uint8 [f, H, W, 3]."""
    data = ws.recv(timeout=WAIT)
    if isinstance(data, str):
        return json.loads(data)
    (n,) = struct.unpack(">I", data[:4])
    header = json.loads(data[4:4 + n])
    header["pixels"] = np.frombuffer(data[4 + n:], np.uint8).reshape(header["frames"], header["height"],
                                                                     header["width"], 3)
    return header


def receive_block(ws) -> dict:
    message = receive(ws)
    assert message["type"] == "block", message  # an "ended" here says why the stream stopped
    return message


def receive_until(ws, kind: str) -> tuple[dict, list[dict]]:
    """Messages up to the first of type `kind`: (it, the ones before)."""
    before = []
    while (message := receive(ws))["type"] != kind:
        before.append(message)
    return message, before


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=WAIT) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def status(address: str) -> dict:
    return json.loads(get(f"http://{address}/status")[1])


def background_switch(before: np.ndarray, after: np.ndarray, old: str, new: str) -> dict:
    """How the frames' median colour sits and moves across a switch of toy background `old` to `new`:
    off, the RGB distance of `before`'s median to `old`'s palette colour; moved, the length of the step
    from `before`'s median to `after`'s; towards, that step's cosine with the direction from `old` to
    `new`. The students draw the dark backgrounds darker than the palette (the default draws dark green
    as about (0, 25, 0)), so a nearest-colour label, or how far along the way to `new` the colour got,
    would misread them; the direction of the step does not."""
    start, end = (np.median(p.reshape(-1, 3).astype(float), axis=0) for p in (before, after))
    step, wanted = end - start, np.subtract(BACKGROUNDS[new], BACKGROUNDS[old], dtype=float)
    moved = float(np.linalg.norm(step))
    return {"off": float(np.linalg.norm(start - BACKGROUNDS[old])), "moved": moved,
            "towards": float(step @ wanted / max(moved, 1e-9) / np.linalg.norm(wanted))}


def switched_background(before: np.ndarray, after: np.ndarray) -> bool:
    """OLD's black before the switch, and after it a clear step towards NEW's dark green."""
    s = background_switch(before, after, "black", "dark green")
    print(f"background across the switch: {s}")
    return s["off"] < 30 and s["moved"] >= 10 and s["towards"] >= 0.8


def object_colours(pixels: np.ndarray) -> list[str]:
    """The largest object's colour in each frame, by the toy world's measurement ("" where none)."""
    return [(objects[0].colour if (objects := measure_frame(frame).objects) else "") for frame in pixels]


@pytest.mark.parametrize("switch_mode", ["new_blocks", "recache"])
def test_blocks_wait_for_the_page_then_a_switch_takes_effect(switch_mode, tmp_path):
    engine = build_engine(parse_args(["--device", "cpu", "--switch_mode", switch_mode]))
    with serving(engine, tmp_path, ahead_blocks=2) as (address, server), connect(f"ws://{address}/ws") as ws:
        hello = receive(ws)
        assert hello["type"] == "hello" and (hello["height"], hello["width"]) == (64, 64) and hello["examples"]
        ws.send(json.dumps({"type": "start", "prompt": OLD, "order": "frame_first", "seed": 3}))
        started = receive(ws)
        assert started["type"] == "started" and started["prompt"] == OLD
        blocks = [receive_block(ws), receive_block(ws)]
        assert [b["index"] for b in blocks] == [0, 1] and blocks[0]["latency_s"] > 0
        # Backpressure: two blocks sent, none shown yet, so nothing more is generated (block-first:
        # a block starts only when it is pulled).
        (session,) = server.sessions.values()
        time.sleep(0.5)
        assert session.live.sent == 2 and session.live.stream.runner.blocks_started == 2
        for index in range(6):
            ws.send(json.dumps({"type": "ack", "stream": started["stream"], "index": index}))
            blocks.append(receive_block(ws))
        ws.send(json.dumps({"type": "prompt", "prompt": NEW}))
        switched, more = receive_until(ws, "switched")
        blocks += more
        assert switched["block"] == session.live.stream.runner.blocks_started == len(blocks)  # the next block
        for index in range(len(blocks) - 2, switched["block"] + 6):
            ws.send(json.dumps({"type": "ack", "stream": started["stream"], "index": index}))
            blocks.append(receive_block(ws))
        ws.send(json.dumps({"type": "stop"}))
        ended, more = receive_until(ws, "ended")
        blocks += more
    assert [b["index"] for b in blocks] == list(range(len(blocks)))  # in order, none lost
    assert [b["segment"] for b in blocks] == [int(b["index"] >= switched["block"]) for b in blocks]
    before = np.concatenate([b["pixels"] for b in blocks[1:switched["block"]]])
    after = np.concatenate([b["pixels"] for b in blocks[switched["block"] + 2:]])
    print(f"{switch_mode}: objects after: {object_colours(after)}")
    assert switched_background(before, after)
    # The toy student draws small objects faintly: where one is measured, it is the prompt's.
    assert object_colours(before).count("red") > len(before) / 2 and "blue" not in object_colours(before)
    assert "red" not in object_colours(after)
    assert ended["blocks"] == len(blocks) and ended["reason"] == "stopped" and ended["video"]


def test_the_download_is_the_streamed_video(engine, tmp_path):
    with serving(engine, tmp_path, ahead_blocks=8) as (address, server), connect(f"ws://{address}/ws") as ws:
        receive(ws)
        ws.send(json.dumps({"type": "start", "prompt": OLD, "order": "timestep_first", "seed": 0}))
        receive(ws)
        blocks = [receive_block(ws) for _ in range(8)]
        ws.send(json.dumps({"type": "stop"}))
        ended, more = receive_until(ws, "ended")
        sent = np.concatenate([b["pixels"] for b in blocks + more])
        code, body = get(f"http://{address}{ended['video']}")
        assert code == 200 and body[4:8] == b"ftyp"
        (tmp_path / "download.mp4").write_bytes(body)
        video = read_video(tmp_path / "download.mp4")
        assert video.shape == sent.shape == (ended["frames"], 64, 64, 3)
        assert np.abs(video.astype(float) - sent).mean() < 4  # H.264 at crf 10: close, not exact
        assert get(f"http://{address}/video/someone-else.mp4")[0] == 404
        folder = next(iter(server.sessions.values())).folder
    wait_for(lambda: not folder.exists(), "the page's files to go with it")


BAD = [  # (message, what the error says)
    (b"\x00\x01", "binary messages are not understood"),
    ("{not json", "not JSON"),
    ("[1, 2]", "a JSON object"),
    (json.dumps({"type": "dance"}), "unknown message type"),
    (json.dumps({"type": "start", "prompt": "   "}), "the prompt is empty"),
    (json.dumps({"type": "start", "prompt": "x" * 5000}), "at most 1000"),
    (json.dumps({"type": "start", "prompt": "a red\x07 circle"}), "control character"),
    (json.dumps({"type": "start", "prompt": OLD, "order": "backwards"}), "unknown order"),
    (json.dumps({"type": "start", "prompt": OLD, "seed": -1}), "the seed is a whole number"),
    (json.dumps({"type": "start", "prompt": OLD, "seed": 1.5}), "the seed is a whole number"),
    (json.dumps({"type": "prompt", "prompt": NEW}), "no stream is running"),
    (json.dumps({"type": "ack", "stream": "one"}), "an ack names its stream and block"),
    ("x" * 200_000, "too long"),
]


def test_bad_input_is_answered_and_the_server_goes_on(engine, tmp_path):
    with serving(engine, tmp_path) as (address, server), connect(f"ws://{address}/ws") as ws:
        receive(ws)
        for message, says in BAD:
            ws.send(message)
            error = receive(ws)
            assert error["type"] == "error" and says in error["message"], (message[:80], error)
        ws.send(json.dumps({"type": "start", "prompt": OLD}))
        assert receive(ws)["type"] == "started" and receive(ws)["type"] == "block"
        ws.send(json.dumps({"type": "start", "prompt": OLD}))
        assert "already running" in receive_until(ws, "error")[0]["message"]


def test_a_stream_beyond_max_streams_is_refused_until_one_ends(engine, tmp_path):
    with serving(engine, tmp_path, max_streams=1) as (address, server), \
            connect(f"ws://{address}/ws") as first, connect(f"ws://{address}/ws") as second:
        receive(first)
        receive(second)
        first.send(json.dumps({"type": "start", "prompt": OLD}))
        assert receive(first)["type"] == "started"
        second.send(json.dumps({"type": "start", "prompt": NEW}))
        refusal = receive(second)
        assert refusal["type"] == "error" and "the server is busy" in refusal["message"]
        first.send(json.dumps({"type": "stop"}))
        receive_until(first, "ended")
        second.send(json.dumps({"type": "start", "prompt": NEW}))
        assert receive(second)["type"] == "started"
        assert status(address)["streams"] == 1


def test_a_stream_ends_at_max_seconds(engine, tmp_path):
    with serving(engine, tmp_path, max_seconds=1.0, ahead_blocks=100) as (address, _), \
            connect(f"ws://{address}/ws") as ws:
        receive(ws)
        ws.send(json.dumps({"type": "start", "prompt": OLD, "order": "timestep_first"}))
        assert receive(ws)["max_blocks"] == 3  # 8 frames at 8 fps: 3 blocks of 3 frames
        ended, blocks = receive_until(ws, "ended")
        assert [b["index"] for b in blocks] == [0, 1, 2] and "maximum length" in ended["reason"]


def test_an_idle_page_is_disconnected_and_freed(engine, tmp_path):
    with serving(engine, tmp_path, idle_timeout=0.5) as (address, server), connect(f"ws://{address}/ws") as ws:
        receive(ws)
        error = receive(ws)
        assert error["type"] == "error" and "--idle_timeout" in error["message"]
        with pytest.raises(Exception):  # the server closed the connection
            ws.recv(timeout=WAIT)
        wait_for(lambda: status(address)["sessions"] == 0, "the idle session to go")


def test_a_page_that_vanishes_mid_stream_frees_its_stream(engine, tmp_path):
    with serving(engine, tmp_path, ahead_blocks=2) as (address, server):
        ws = connect(f"ws://{address}/ws")
        receive(ws)
        ws.send(json.dumps({"type": "start", "prompt": OLD}))
        receive(ws)
        receive(ws)
        (session,) = server.sessions.values()
        held = status(address)
        assert (held["sessions"], held["streams"], held["writers"]) == (1, 1, 1)
        ws.socket.close()  # no closing handshake: the page is simply gone
        wait_for(lambda: status(address)["sessions"] == 0, "the session to go")
        assert status(address)["streams"] == 0 and status(address)["writers"] == 0
        assert not session.folder.exists()
        assert session.live is None


def test_the_demo_applies_lora_adapters(tmp_path):
    """--lora PATH[:SCALE] as in inference.py: the adapter acts on the served student (merged or not, the
    same weights); one made for another architecture is refused before the server starts, naming both."""
    plain = build_engine(parse_args(["--device", "cpu"])).model
    cfg = with_overrides(load_config("configs/toy/hiar.yaml"), ["lora.rank=2"])
    adapted = lora.add_adapters(copy.deepcopy(plain), cfg.lora)
    for name, p in adapted.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    path = save_adapter(adapted, cfg, tmp_path / "adapter.safetensors")
    served = build_engine(parse_args(["--device", "cpu", "--lora", f"{path}:0.5"])).model
    merged = build_engine(parse_args(["--device", "cpu", "--lora", f"{path}:0.5", "--merge_lora"])).model
    assert lora.has_adapters(served) and not lora.has_adapters(merged)
    x, text = random_inputs(cfg, batch=1, seed=0)
    x = x[:, :3]  # one block
    t = torch.full(x.shape[:2], 500.0)
    with torch.no_grad():
        out, out_merged, out_plain = served(x, t, text), merged(x, t, text), plain(x, t, text)
    assert torch.allclose(out, out_merged, atol=1e-4) and not torch.allclose(out, out_plain, atol=1e-3)

    tiny = load_config("tiny", ["lora.rank=2"])
    other = save_adapter(lora.add_adapters(WanModel(tiny.model), tiny.lora), tiny, tmp_path / "tiny.safetensors")
    with pytest.raises(CheckpointError, match=r"Wan DiT \(2 layers.*Wan DiT \(4 layers"):
        build_engine(parse_args(["--device", "cpu", "--lora", str(other)]))
