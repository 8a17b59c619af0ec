"""`torbiz-tui web` in headless Chromium: the page loads, connects, and shows the node table.

textual-serve renders with xterm.js on a canvas, so the page's DOM holds no text at all
(`--dump-dom` shows only empty containers). The test drives Chromium over the DevTools
protocol instead: a script installed before the page's own records what the server sends over
the websocket (what xterm.js draws), and the page's own markers say the terminal exists and
has drawn (`.xterm-screen canvas`, and the `-first-byte` class textual.js sets once output
arrived). A screenshot is kept next to the test's temporary files for a human to look at."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from tests.cluster_files import toml_text
from tests.test_tui_pilot import free_ports
from tui.text import sanitize

pytestmark = pytest.mark.integration

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--remote-debugging-port=0",
                  "--window-size=1400,900"]

# Runs before the page's scripts: keeps every websocket message the page receives.
RECORD_WEBSOCKET = r"""
(() => {
  const Native = window.WebSocket;
  const decoder = new TextDecoder();
  const received = window.__received = [];
  class Recording extends Native {
    constructor(...args) {
      super(...args);
      this.addEventListener("message", (event) => {
        const data = event.data;
        if (typeof data === "string") received.push(data);
        else if (data instanceof ArrayBuffer) received.push(decoder.decode(data));
        else if (data instanceof Blob) data.text().then((text) => received.push(text));
      });
    }
  }
  window.WebSocket = Recording;
})();
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop_group(proc: subprocess.Popen[Any], first: int = signal.SIGINT) -> None:
    """Stop a process we started in its own session, and everything it started."""
    if proc.poll() is None:
        os.killpg(proc.pid, first)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    for rest in (p for p in psutil.process_iter(["pid"]) if _in_group(p, proc.pid)):
        rest.kill()


def _in_group(process: psutil.Process, pgid: int) -> bool:
    try:
        return os.getpgid(process.pid) == pgid
    except (ProcessLookupError, PermissionError):
        return False


@pytest.fixture
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    return path


@pytest.fixture
def web_server(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """`torbiz-tui web` on a free port, serving a two-node cluster file (nothing started)."""
    *rpc_ports, coordinator_port = free_ports(3)
    nodes = [{"name": name, "host": "127.0.0.1", "transport": "local", "rpc_port": port}
             for name, port in zip(("alpha", "beta"), rpc_ports, strict=True)]
    path = tmp_path / "cluster.toml"
    path.write_text(toml_text({"name": "web", "state_dir": str(tmp_path / "state")}, nodes,
                              model={"gguf": str(tmp_path / "absent.gguf")},
                              coordinator={"host": "127.0.0.1", "port": coordinator_port}))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    server = subprocess.Popen(
        [sys.executable, "-m", "tui.cli", "-c", str(path), "web", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "web.log", "wb"),  # noqa: SIM115
        start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 20
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if server.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("the web server did not listen: "
                                     + (tmp_path / "web.log").read_text())
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/", server.pid
    finally:
        _stop_group(server)


class DevTools:
    """Just enough of the Chrome DevTools protocol: one page, commands and their results."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 0
        self.session: str | None = None

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params}
        if self.session is not None:
            message["sessionId"] = self.session
        await self.ws.send_str(json.dumps(message))
        while True:
            reply = json.loads((await self.ws.receive(timeout=30)).data)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                return dict(reply["result"])

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")


@pytest.fixture
async def devtools(chromium: str, tmp_path: Path) -> AsyncIterator[DevTools]:
    profile = tmp_path / "chromium-profile"
    browser = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                "about:blank"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not active.is_file() or len(active.read_text().split()) < 2:
            if browser.poll() is not None or time.monotonic() > deadline:
                pytest.fail("chromium did not open its DevTools port")
            await asyncio.sleep(0.1)
        port, path = active.read_text().split()[:2]
        async with aiohttp.ClientSession() as http, \
                http.ws_connect(f"ws://127.0.0.1:{port}{path}", max_msg_size=0) as ws:
            tools = DevTools(ws)
            target = await tools.call("Target.createTarget", url="about:blank")
            attached = await tools.call("Target.attachToTarget", targetId=target["targetId"],
                                        flatten=True)
            tools.session = attached["sessionId"]
            yield tools
    finally:
        _stop_group(browser, signal.SIGTERM)


async def test_the_browser_shows_the_node_table(web_server: tuple[str, int],
                                                devtools: DevTools, tmp_path: Path) -> None:
    url, server_pid = web_server
    listening = [c.laddr for c in psutil.Process(server_pid).net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN]
    assert listening and all(address.ip == "127.0.0.1" for address in listening)

    await devtools.call("Page.enable")
    await devtools.call("Page.addScriptToEvaluateOnNewDocument", source=RECORD_WEBSOCKET)
    await devtools.call("Page.navigate", url=url)

    deadline = time.monotonic() + 60
    shown = ""
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        received = await devtools.evaluate("(window.__received || []).join('')")
        shown = sanitize(received or "")
        if all(text in shown for text in ("NODE", "alpha", "beta", "stopped", "2 nodes",
                                          "coordinator")):
            break
    else:
        raise AssertionError(f"the node table never arrived; the page received: {shown[:2000]}")

    state = await devtools.evaluate(
        "({drawn: document.body.classList.contains('-first-byte'),"
        " canvases: document.querySelectorAll('.xterm-screen canvas').length,"
        " text: document.body.innerText.trim()})")
    assert state["drawn"], "textual.js never marked the terminal as drawn"
    assert state["canvases"] > 0
    assert state["text"] == ""  # the canvas holds the picture: there is no DOM text to read

    await asyncio.sleep(1.0)  # let xterm.js paint the last frames before the picture
    shot = await devtools.call("Page.captureScreenshot", format="png")
    png = base64.b64decode(shot["data"])
    (tmp_path / "web.png").write_bytes(png)
    assert png.startswith(b"\x89PNG") and len(png) > 20_000  # a blank page is a few kB
