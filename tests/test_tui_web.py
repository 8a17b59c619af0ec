"""`torbiz-tui web` in headless Chromium: the page loads, connects, and shows the node table.

textual-serve renders with xterm.js on a canvas, so the page's DOM holds no text at all
(`--dump-dom` shows only empty containers). The test drives Chromium over the DevTools
protocol instead: a script installed before the page's own records what the server sends over
the websocket (what xterm.js draws), and the page's own markers say the terminal exists and
has drawn (`.xterm-screen canvas`, and the `-first-byte` class textual.js sets once output
arrived). A screenshot is kept next to the test's temporary files for a human to look at.

Who gets in (tui/web_access.py): the browser that opened the printed URL, and nothing else. Pages
of other origins, served by the test's own little web server on another 127.0.0.x port, try the
websocket in the same Chromium and write what happened into their title; plain HTTP and
websocket clients check Host, Origin, the token and the cookie's flags on the real headers."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from aiohttp import web

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


@dataclass(frozen=True)
class WebRun:
    """A running `torbiz-tui web`: its port, pid, and what it wrote to stderr."""

    port: int
    pid: int
    log: Path

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def printed_url(self) -> str:
        """The URL with this run's token that the command printed for the operator."""
        deadline = time.monotonic() + 10
        while (found := PRINTED_URL.search(self.log.read_text())) is None:
            if time.monotonic() > deadline:
                raise AssertionError("`torbiz-tui web` printed no URL with a token: "
                                     + self.log.read_text())
            time.sleep(0.1)
        assert found["port"] == str(self.port)
        return found[0]

    def token(self) -> str:
        return self.printed_url().split("?token=", 1)[1]


PRINTED_URL = re.compile(r"http://127\.0\.0\.1:(?P<port>\d+)/\?token=[A-Za-z0-9_-]+")


@pytest.fixture
def web_server(tmp_path: Path) -> Iterator[WebRun]:
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
    log = tmp_path / "web.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "tui.cli", "-c", str(path), "web", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=open(log, "wb"),  # noqa: SIM115
        start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 20
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if server.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("the web server did not listen: " + log.read_text())
            time.sleep(0.1)
        yield WebRun(port, server.pid, log)
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


async def _wait_for_node_table(devtools: DevTools) -> None:
    deadline = time.monotonic() + 60
    shown = ""
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        received = await devtools.evaluate("(window.__received || []).join('')")
        shown = sanitize(received or "")
        if all(text in shown for text in ("NODE", "alpha", "beta", "stopped", "2 nodes",
                                          "coordinator")):
            return
    raise AssertionError(f"the node table never arrived; the page received: {shown[:2000]}")


async def _open_dashboard(devtools: DevTools, url: str) -> None:
    await devtools.call("Page.enable")
    await devtools.call("Page.addScriptToEvaluateOnNewDocument", source=RECORD_WEBSOCKET)
    await devtools.call("Page.navigate", url=url)
    await _wait_for_node_table(devtools)


async def test_the_printed_url_shows_the_node_table(web_server: WebRun, devtools: DevTools,
                                                    tmp_path: Path) -> None:
    listening = [c.laddr for c in psutil.Process(web_server.pid).net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN]
    assert listening and all(address.ip == "127.0.0.1" for address in listening)

    await _open_dashboard(devtools, web_server.printed_url())

    state = await devtools.evaluate(
        "({drawn: document.body.classList.contains('-first-byte'),"
        " canvases: document.querySelectorAll('.xterm-screen canvas').length,"
        " text: document.body.innerText.trim(), href: location.href, cookie: document.cookie})")
    assert state["drawn"], "textual.js never marked the terminal as drawn"
    assert state["canvases"] > 0
    assert state["text"] == ""  # the canvas holds the picture: there is no DOM text to read
    assert state["href"] == f"{web_server.origin}/"  # the token left the address bar
    history = await devtools.call("Page.getNavigationHistory")
    assert [entry["url"] for entry in history["entries"]] == ["about:blank", state["href"]]
    assert state["cookie"] == ""  # HttpOnly: no script of the page can read the session

    await asyncio.sleep(1.0)  # let xterm.js paint the last frames before the picture
    shot = await devtools.call("Page.captureScreenshot", format="png")
    png = base64.b64decode(shot["data"])
    (tmp_path / "web.png").write_bytes(png)
    assert png.startswith(b"\x89PNG") and len(png) > 20_000  # a blank page is a few kB


@asynccontextmanager
async def _site(address: str, page: str) -> AsyncIterator[str]:
    """A web server of the test's own on address (another origin) serving one page."""

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", index)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, address, 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}/"
    finally:
        await runner.cleanup()


async def test_the_printed_url_works_from_a_link_on_another_sites_page(
        web_server: WebRun, devtools: DevTools) -> None:
    """The URL clicked in a web page (a browser-based terminal, a chat): a cross-site
    navigation, after which the Strict cookie must still reach the dashboard."""
    link = f'<a id="go" href="{web_server.printed_url()}">dashboard</a>' \
        '<script>document.getElementById("go").click()</script>'
    async with _site("127.0.0.2", link) as page_url:
        await _open_dashboard(devtools, page_url)
    assert await devtools.evaluate("location.href") == f"{web_server.origin}/"


# Another site's page: opens the dashboard's websocket and writes what happened into its title.
ATTACK_PAGE = """<!DOCTYPE html><html><head><title>pending</title></head><body><script>
const events = [];
const report = (event) => { events.push(event); document.title = events.join(" "); };
const socket = new WebSocket("ws://127.0.0.1:PORT/ws?width=80&height=24");
socket.onopen = () => { report("open"); socket.send(JSON.stringify(["stdin", "s"])); };
socket.onmessage = () => report("message");
socket.onerror = () => report("error");
socket.onclose = (event) => report("closed:" + event.code);
</script></body></html>"""


@pytest.mark.parametrize("attacker", ["127.0.0.1", "127.0.0.2"],
                         ids=["same-site-other-port", "other-site"])
async def test_another_origins_page_cannot_use_the_websocket(
        web_server: WebRun, devtools: DevTools, attacker: str) -> None:
    # The operator has the dashboard open: the browser holds its session cookie, and a page on
    # 127.0.0.1's other port is the same site, so the cookie goes along: only Origin stops it.
    await _open_dashboard(devtools, web_server.printed_url())
    cookies = (await devtools.call("Network.getCookies", urls=[web_server.origin]))["cookies"]
    assert [c["name"] for c in cookies] == [f"torbiz_web_{web_server.port}"]

    async with _site(attacker, ATTACK_PAGE.replace("PORT", str(web_server.port))) as attack_url:
        await devtools.call("Page.navigate", url=attack_url)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            title = await devtools.evaluate("document.title")
            if "closed" in title or "message" in title:
                break
        else:
            raise AssertionError(f"the attack page never finished: {title!r}")
    assert "open" not in title.split() and "message" not in title.split(), \
        f"another origin's page reached the dashboard: {title}"
    assert title == "error closed:1006"


async def test_a_request_naming_another_host_is_refused(web_server: WebRun) -> None:
    """DNS rebinding: evil.example resolves to 127.0.0.1, the browser sends its own name."""
    async with aiohttp.ClientSession() as http:
        async def get(url: str, **headers: str) -> aiohttp.ClientResponse:
            async with http.get(url, headers=headers, allow_redirects=False) as response:
                await response.read()
                return response

        rebound = await get(f"{web_server.origin}/", Host=f"evil.example:{web_server.port}")
        assert rebound.status == 403
        assert "answers only at http://127.0.0.1" in await rebound.text()
        # Not even with this run's token and session cookie (a rebinding page has neither).
        token = web_server.token()
        for url in (web_server.printed_url(), f"{web_server.origin}/static/js/textual.js"):
            refused = await get(url, Host=f"evil.example:{web_server.port}",
                                Cookie=f"torbiz_web_{web_server.port}={token}")
            assert refused.status == 403 and "Set-Cookie" not in refused.headers
        wrong_port = await get(web_server.printed_url(), Host="127.0.0.1:1")
        assert wrong_port.status == 403
        # The loopback aliases lead to the one origin the page lives at, token and all.
        for alias in ("localhost", "[::1]"):
            moved = await get(web_server.printed_url(), Host=f"{alias}:{web_server.port}")
            assert moved.status == 307
            assert moved.headers["Location"] == web_server.printed_url()
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused_socket:
            await http.ws_connect(f"ws://127.0.0.1:{web_server.port}/ws",
                                  headers={"Host": f"evil.example:{web_server.port}"},
                                  origin=f"http://evil.example:{web_server.port}")
        assert refused_socket.value.status == 403


async def test_a_websocket_without_the_session_cookie_is_refused(web_server: WebRun) -> None:
    ws_url = f"ws://127.0.0.1:{web_server.port}/ws?width=80&height=24"
    origin = web_server.origin

    async def handshake_status(cookie: str | None, origin: str | None) -> int:
        headers = {"Cookie": cookie} if cookie is not None else {}
        async with aiohttp.ClientSession() as http:
            try:
                async with http.ws_connect(ws_url, headers=headers, origin=origin) as ws:
                    message = await ws.receive(timeout=20)
                    assert message.type in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT)
                    return 101
            except aiohttp.WSServerHandshakeError as refused:
                return refused.status

    name = f"torbiz_web_{web_server.port}"
    assert await handshake_status(None, origin) == 403, "a socket without a cookie connected"
    token = web_server.token()
    assert await handshake_status(f"{name}={token[:-1]}A", origin) == 403
    assert await handshake_status(f"{name}={token}", "http://127.0.0.1:1") == 403
    assert await handshake_status(f"{name}={token}", None) == 403
    assert await handshake_status(f"torbiz_web_1={token}", origin) == 403
    # The one way in: this run's cookie from the dashboard's own origin.
    assert await handshake_status(f"{name}={token}", origin) == 101


async def test_the_token_becomes_an_httponly_strict_cookie(web_server: WebRun) -> None:
    origin = web_server.origin
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        async def get(url: str, cookie: str | None = None) -> aiohttp.ClientResponse:
            headers = {"Cookie": cookie} if cookie is not None else {}
            async with http.get(url, headers=headers, allow_redirects=False) as response:
                await response.read()
                return response

        assert (await get(f"{origin}/")).status == 403, "the page opened without the token"
        token = web_server.token()
        for wrong in (token[:-1] + ("A" if token[-1] != "A" else "B"), token[:-1], token + "x",
                      "", "%C3%A9" * 10, "%ED%A0%80"):
            refused = await get(f"{origin}/?token={wrong}")
            assert refused.status == 403, wrong
            assert "Set-Cookie" not in refused.headers
            assert "not this run's" in await refused.text()

        traded = await get(f"{origin}/?fontsize=20&token={token}")
        assert traded.status == 200 and "Location" not in traded.headers
        assert 'searchParams.delete("token")' in await traded.text()  # then location.replace
        set_cookies = traded.headers.getall("Set-Cookie")
        assert len(set_cookies) == 1
        cookie = SimpleCookie(set_cookies[0])[f"torbiz_web_{web_server.port}"]
        assert cookie.value == token
        assert cookie["httponly"] is True
        assert cookie["samesite"] == "Strict"
        assert cookie["path"] == "/"
        assert not cookie["expires"] and not cookie["max-age"]  # gone with the browser session
        assert traded.headers["Cache-Control"] == "no-store"

        session = f"torbiz_web_{web_server.port}={token}"
        page = await get(f"{origin}/", session)
        assert page.status == 200
        assert f'data-session-websocket-url="ws://127.0.0.1:{web_server.port}/ws"' \
            in await page.text()
        assert page.headers["X-Frame-Options"] == "DENY"
        assert page.headers["Content-Security-Policy"] == "frame-ancestors 'none'"
        assert (await get(f"{origin}/static/js/textual.js", session)).status == 200
        assert (await get(f"{origin}/static/js/textual.js")).status == 403
        assert (await get(f"{origin}/", f"torbiz_web_{web_server.port}={token[:-1]}")).status \
            == 403


def test_the_token_compares_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    from tui.web_access import WebAccess

    access = WebAccess.for_this_run("127.0.0.1", 8765)
    assert len(access.token) >= 40 and access.token != WebAccess.for_this_run(
        "127.0.0.1", 8765).token
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr("tui.web_access.hmac.compare_digest", recording)
    assert access.token_matches(access.token)
    assert not access.token_matches(access.token[:-1])
    assert not access.token_matches("\udcff")
    assert not access.token_matches(None)
    assert len(compared) == 3

    assert access.origin == "http://127.0.0.1:8765"
    assert access.hosts == {"127.0.0.1:8765", "localhost:8765", "[::1]:8765"}
    assert WebAccess.for_this_run("::1", 80).origin == "http://[::1]"
    with pytest.raises(ValueError, match="every interface"):
        WebAccess.for_this_run("0.0.0.0", 8765)
