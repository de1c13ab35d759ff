"""The live demo in a real browser: Debian's headless chromium, driven by Playwright, against `python
serve.py` (the embedded toy default) on 127.0.0.1. One test streams, switches the prompt, sees the
new prompt take effect in the frames the page received (the toy world's measurement), and downloads
the mp4; the other kills the browser mid-stream and watches the server free the stream.

With HIAR_DEMO_SCREENSHOT=docs/demo/screenshot.png the first test also saves the page as it streams
after the switch (docs/demo.md's picture).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from hiar.video import read_video
from test_serve import switched_background  # the toy measurement of a switch

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
# Without the networking flags chromium keeps dialling Google's hosts, which this machine's network refuses.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
WAIT = 60.0  # seconds, for any one thing; the whole file takes ~30 s on 2 idle cores
OLD = "a red circle moving left on a black background"
NEW = "a blue circle moving left on a dark green background"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason=f"{CHROMIUM} is absent: apt-get install chromium (.ci/run installs it in CI)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/status", timeout=WAIT) as response:
        return json.loads(response.read())


def wait_for(condition, what: str, sleep=time.sleep) -> None:
    """Poll `condition`; `sleep` is a page's wait_for_timeout while Playwright must deliver its events."""
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        sleep(0.1)


@pytest.fixture(scope="module")
def server():
    """`python serve.py` as README gives it, on a free port."""
    port = free_port()
    process = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert process.poll() is None, f"serve.py exited:\n{process.stdout.read()}"
        try:
            return status(url)["streams"] == 0
        except OSError:
            return False

    try:
        wait_for(up, "serve.py to answer")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(WAIT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Received:
    """What the page's websocket received, read off the wire: blocks (header, pixels) and JSON messages."""

    def __init__(self, page):
        self.blocks: list[tuple[dict, np.ndarray]] = []
        self.messages: list[dict] = []
        page.on("websocket", lambda ws: ws.on("framereceived", self.frame))

    def frame(self, payload) -> None:
        if isinstance(payload, str):
            self.messages.append(json.loads(payload))
            return
        (n,) = struct.unpack(">I", payload[:4])
        header = json.loads(payload[4:4 + n])
        pixels = np.frombuffer(payload[4 + n:], np.uint8).reshape(header["frames"], header["height"], header["width"], 3)
        self.blocks.append((header, pixels))

    def message(self, kind: str) -> dict | None:
        return next((m for m in self.messages if m["type"] == kind), None)


def test_stream_switch_and_download_in_a_browser(server, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1000, "height": 720}, accept_downloads=True)
        page.set_default_timeout(WAIT * 1000)
        received = Received(page)
        errors = []
        page.on("pageerror", lambda error: errors.append(error))
        page.goto(server)
        page.wait_for_function("document.getElementById('model').textContent.includes('fps')")
        page.fill("#prompt", "  ")
        page.click("#start")  # refused by the server, said on the page, and the page can start again
        page.wait_for_selector("#message.error")
        assert "the prompt is empty" in page.text_content("#message") and page.is_enabled("#start")
        page.fill("#prompt", OLD)
        page.select_option("#order", "timestep_first")
        page.fill("#seed", "0")
        page.click("#start")
        page.wait_for_function("Number(document.getElementById('blocks').textContent) >= 2")
        page.fill("#prompt", NEW)
        page.click("#switch")
        wait_for(lambda: received.message("switched"), "the switch to be announced",
                 lambda seconds: page.wait_for_timeout(seconds * 1000))
        block = received.message("switched")["block"]
        page.wait_for_function(f"Number(document.getElementById('blocks').textContent) >= {block + 5}")
        shown = int(page.text_content("#frames"))
        page.wait_for_function(f"Number(document.getElementById('frames').textContent) > {shown}")  # still playing
        if os.environ.get("HIAR_DEMO_SCREENSHOT"):
            page.screenshot(path=os.environ["HIAR_DEMO_SCREENSHOT"])
        assert page.locator("#timeline li").count() == 2 and NEW in page.text_content("#timeline")
        assert "s" in page.text_content("#latency") and "frames/s" in page.text_content("#fps")
        page.click("#stop")
        page.wait_for_selector("#download", state="visible")
        with page.expect_download() as download:
            page.click("#download")
        download.value.save_as(tmp_path / "demo.mp4")
        wait_for(lambda: received.message("ended"), "the end of the stream",
                 lambda seconds: page.wait_for_timeout(seconds * 1000))
        ended = received.message("ended")
        browser.close()

    assert not errors, errors  # no uncaught JavaScript error
    headers = [h for h, _ in received.blocks]
    assert [h["index"] for h in headers] == list(range(len(headers)))
    assert [h["segment"] for h in headers] == [int(h["index"] >= block) for h in headers]
    before = np.concatenate([px for h, px in received.blocks if 0 < h["index"] < block])
    after = np.concatenate([px for h, px in received.blocks if h["index"] >= block + 2])
    assert switched_background(before, after)
    sent = np.concatenate([px for _, px in received.blocks])
    video = read_video(tmp_path / "demo.mp4")
    assert video.shape == sent.shape == (ended["frames"], 64, 64, 3)
    assert np.abs(video.astype(float) - sent).mean() < 4  # H.264 at crf 10


def launch_chromium(profile: Path) -> tuple[subprocess.Popen, str]:
    """Chromium as a process of our own (so that we can kill it), and its DevTools address."""
    process = subprocess.Popen([CHROMIUM, "--headless", *FLAGS, f"--user-data-dir={profile}",
                                "--remote-debugging-port=0", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            assert process.poll() is None, "chromium exited at start"
            continue
        if line.startswith("DevTools listening on "):
            return process, line.split()[-1]
    os.killpg(process.pid, signal.SIGKILL)
    raise AssertionError("chromium did not open its DevTools port")


def test_a_killed_browser_frees_its_stream(server, tmp_path):
    from playwright.sync_api import sync_playwright

    process, devtools = launch_chromium(tmp_path / "profile")
    try:
        with sync_playwright() as p:
            browser = p.chromium.connect_over_cdp(devtools)
            page = browser.contexts[0].new_page()
            page.set_default_timeout(WAIT * 1000)
            page.goto(server)
            page.wait_for_function("document.getElementById('model').textContent.includes('fps')")
            page.fill("#prompt", OLD)
            page.click("#start")
            page.wait_for_function("Number(document.getElementById('blocks').textContent) >= 3")
            held = status(server)
            assert (held["sessions"], held["streams"], held["writers"]) == (1, 1, 1)
            os.killpg(process.pid, signal.SIGKILL)  # the browser and every process it started, at once
            process.wait(WAIT)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    wait_for(lambda: status(server)["sessions"] == 0, "the server to notice the page is gone")
    freed = status(server)
    assert (freed["streams"], freed["writers"]) == (0, 0)
