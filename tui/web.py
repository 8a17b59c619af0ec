"""`torbiz-tui web`: the same dashboard in a browser tab, through textual-serve.

Every tab runs its own dashboard process (the command below) on this machine; they all drive the
same cluster, which outlives them. The server listens on 127.0.0.1 only, and lets in only the
browser that opened the URL it printed (tui/web_access.py: Host, Origin, a per-run token). From
another machine, use an SSH tunnel with the same port on both ends
(`ssh -L 8765:127.0.0.1:8765 this-host`)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from aiohttp import web
from textual_serve.server import Server

from tui.web_access import WebAccess, guard_app

WEB_HOST = "127.0.0.1"
WEB_PORT = 8765


def dashboard_command(config: Path, read_only: bool, log_lines: int) -> str:
    """The shell command textual-serve runs for each browser tab."""
    argv = [sys.executable, "-m", "tui.cli", "-c", str(config.resolve()),
            "--log-lines", str(log_lines)]
    if read_only:
        argv.append("--read-only")
    return shlex.join(argv)


class GuardedServer(Server):
    """textual-serve's server with the access guard in front of every route."""

    def __init__(self, command: str, access: WebAccess, title: str) -> None:
        # public_url is the origin the page builds its websocket URL from: the guarded one.
        super().__init__(command, host=access.bind_host, port=access.port, title=title,
                         public_url=access.origin)
        self.access = access

    async def _make_app(self) -> web.Application:
        app = await super()._make_app()
        guard_app(app, self.access)
        return app

    async def on_startup(self, app: web.Application) -> None:
        print(f"open {self.access.login_url} in a browser (this run's token: the page keeps it "
              "in a cookie; only that browser gets in)", file=sys.stderr, flush=True)


def serve_dashboard(config: Path, name: str, *, port: int = WEB_PORT, read_only: bool = False,
                    log_lines: int = 5_000) -> int:
    access = WebAccess.for_this_run(WEB_HOST, port)
    server = GuardedServer(dashboard_command(config, read_only, log_lines), access,
                           title=f"torbiz · {name}")
    server.serve()
    return 0
