"""`torbiz-tui web`: the same dashboard in a browser tab, through textual-serve.

Every tab runs its own dashboard process (the command below) on this machine; they all drive the
same cluster, which outlives them. The server listens on 127.0.0.1 only: whoever reaches it can
start and stop the cluster, and it has no login. From another machine, use an SSH tunnel
(`ssh -L 8765:127.0.0.1:8765 this-host`)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

WEB_HOST = "127.0.0.1"
WEB_PORT = 8765


def dashboard_command(config: Path, read_only: bool, log_lines: int) -> str:
    """The shell command textual-serve runs for each browser tab."""
    argv = [sys.executable, "-m", "tui.cli", "-c", str(config.resolve()),
            "--log-lines", str(log_lines)]
    if read_only:
        argv.append("--read-only")
    return shlex.join(argv)


def serve_dashboard(config: Path, name: str, *, port: int = WEB_PORT, read_only: bool = False,
                    log_lines: int = 5_000) -> int:
    from textual_serve.server import Server

    server = Server(dashboard_command(config, read_only, log_lines), host=WEB_HOST, port=port,
                    title=f"torbiz · {name}")
    server.serve()
    return 0
