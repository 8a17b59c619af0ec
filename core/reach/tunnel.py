"""An SSH local port forward to a worker that listens only on its node's 127.0.0.1
(`rpc_bind = "loopback"`), so no RPC port is open on the network.

It runs as its own detached process (`python -m core.reach.tunnel`), like the coordinator it serves,
so both outlive the dashboard. It writes the local port it listens on to a file, keeps that
port across SSH reconnects (with backoff), and exits on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

import asyncssh

from core.config import ConfigError, load_config
from core.reach.transport import SshTransport, TransportError
from core.text import terminal_safe

PORT_FILE = "port"


def _write_port(path: Path, port: int) -> None:
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(f"{port}\n")
    partial.replace(path)


async def run_tunnel(config_path: Path, node_name: str, port_file: Path) -> None:
    node = load_config(config_path).node(node_name)
    transport = SshTransport(node)
    local_port = 0
    delay = 1.0
    while True:
        try:
            await transport.connect()
            conn = transport.connection
            # A session with a terminal makes sshd switch its socket to TCP_NODELAY; without it
            # the worker's write-write-read RPC replies stall ~40 ms on Nagle + delayed ACKs.
            keeper = await conn.create_process("cat > /dev/null", term_type="dumb")
            listener = await conn.forward_local_port("127.0.0.1", local_port, "127.0.0.1",
                                                     node.rpc_port)
            local_port = listener.get_port()
            _write_port(port_file, local_port)
            print(f"forwarding 127.0.0.1:{local_port} -> {node.name} 127.0.0.1:{node.rpc_port}",
                  flush=True)
            delay = 1.0
            await conn.wait_closed()
            keeper.close()
            print(f"{node.name}: SSH connection closed; reconnecting", flush=True)
        except (TransportError, OSError, asyncssh.Error) as exc:
            # asyncssh's text may quote the server (its DISCONNECT reason): made inert.
            print(f"{node.name}: {terminal_safe(str(exc))}; retrying in {delay:g} s", flush=True)
        await transport.close()
        await asyncio.sleep(delay)
        delay = min(delay * 2, 30.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.reach.tunnel")
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--node", required=True)
    parser.add_argument("--port-file", required=True, type=Path)
    args = parser.parse_args(argv)

    async def serve() -> None:
        task = asyncio.ensure_future(run_tunnel(args.config, args.node, args.port_file))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    try:
        asyncio.run(serve())
    except (ConfigError, KeyError) as exc:
        print(f"tunnel: {exc}", file=sys.stderr)
        return 2
    with contextlib.suppress(OSError):
        os.unlink(args.port_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
