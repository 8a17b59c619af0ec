"""llama.cpp RPC workers: finding the binary, the command line, readiness and the HELLO probe."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
from dataclasses import dataclass

from ..config import NodeConfig
from ..llama_build import LLAMA_CPP_PYTHON_VERSION, RPC_SERVER_NAMES, find_cached_binary
from ..shell import path_word, quote
from ..transport import Transport

RPC_CMD_HELLO = 14
RPC_CONN_CAPS_SIZE = 24
_HELLO_RSP_SIZE = 4 + RPC_CONN_CAPS_SIZE


@dataclass(frozen=True)
class RpcVersion:
    major: int
    minor: int
    patch: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


def bind_address(node: NodeConfig) -> str:
    """rpc-server binds with inet_addr(): it needs an IPv4 literal."""
    host = node.rpc_host or node.host
    try:
        if isinstance(ipaddress.ip_address(host), ipaddress.IPv4Address):
            return host
    except ValueError:
        pass
    return "0.0.0.0"


def rpc_server_argv(binary: str, node: NodeConfig) -> list[str]:
    argv = [binary, "-H", bind_address(node), "-p", str(node.rpc_port)]
    if node.cache:
        argv.append("-c")
    if node.threads:
        argv += ["-t", str(node.threads)]
    return argv


def find_binary_script(node: NodeConfig) -> str:
    """sh that prints `TORBIZ binary PATH` or `TORBIZ error ...`: configured path, PATH, cache."""
    lines = []
    if node.rpc_server:
        word = path_word(node.rpc_server)
        lines.append(f'if [ -x {word} ]; then echo "TORBIZ binary "{word}; exit 0; fi')
        lines.append('echo "TORBIZ error notexec"; exit 0')
    for name in RPC_SERVER_NAMES:
        lines.append(f'b=$(command -v {quote(name)} 2>/dev/null) && '
                     f'{{ echo "TORBIZ binary $b"; exit 0; }}')
    for flavour in ("", "-portable"):
        version = f"{LLAMA_CPP_PYTHON_VERSION}{flavour}"
        cached = f"~/.cache/torbiz/llama.cpp-{version}/bin/ggml-rpc-server"
        word = path_word(cached)
        lines.append(f'if [ -x {word} ]; then echo "TORBIZ binary "{word}; exit 0; fi')
    lines.append('echo "TORBIZ error missing"')
    return "\n".join(lines)


MISSING_BINARY_HINT = (
    "rpc-server not found: set rpc_server in the node's config, put rpc-server or "
    "ggml-rpc-server on its PATH, or build it there with `torbiz-tui build-llama --portable` "
    "and copy ~/.cache/torbiz/llama.cpp-*/bin/ggml-rpc-server"
)


async def find_binary(transport: Transport) -> tuple[str | None, str]:
    """(path, error) of the worker binary on the node."""
    node = transport.node
    if transport.is_local and not node.rpc_server:
        import shutil

        for name in RPC_SERVER_NAMES:
            found = shutil.which(name)
            if found:
                return found, ""
        cached = find_cached_binary("ggml-rpc-server")
        if cached:
            return str(cached), ""
        return None, MISSING_BINARY_HINT
    result = await transport.run(find_binary_script(node))
    for line in reversed(result.stdout.splitlines()):
        if line.startswith("TORBIZ binary "):
            return line[len("TORBIZ binary "):], ""
        if line.startswith("TORBIZ error "):
            if line.endswith(" notexec"):
                return None, f"rpc_server {node.rpc_server!r} is not an executable file there"
            return None, MISSING_BINARY_HINT
    return None, MISSING_BINARY_HINT


def _rst_close(writer: asyncio.StreamWriter) -> None:
    # An RST close: a normal close after an unread reply can kill rpc-server with SIGPIPE.
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


async def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    _rst_close(writer)
    return True


class HelloError(Exception):
    pass


async def hello(host: str, port: int, timeout: float = 2.0) -> RpcVersion:
    """Ask a worker for its RPC protocol version. A worker that is serving a coordinator accepts
    the connection but never answers: that raises HelloError('busy')."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        raise HelloError(f"cannot connect ({exc.__class__.__name__})") from None
    try:
        request = bytes([RPC_CMD_HELLO]) + struct.pack("<Q", RPC_CONN_CAPS_SIZE)
        writer.write(request + bytes(RPC_CONN_CAPS_SIZE))
        await writer.drain()
        try:
            header = await asyncio.wait_for(reader.readexactly(8), timeout)
        except asyncio.TimeoutError:
            raise HelloError("busy") from None
        (size,) = struct.unpack("<Q", header)
        if size != _HELLO_RSP_SIZE:
            raise HelloError(f"not a llama.cpp RPC server of this protocol (reply size {size})")
        body = await asyncio.wait_for(reader.readexactly(size), timeout)
        return RpcVersion(body[0], body[1], body[2])
    except asyncio.IncompleteReadError:
        raise HelloError("closed the connection without answering (incompatible version?)") \
            from None
    except OSError as exc:
        raise HelloError(f"connection failed ({exc})") from None
    finally:
        _rst_close(writer)


def explain_worker_log(lines: list[str]) -> str:
    """The sentence that a dead worker's log tail supports."""
    text = "\n".join(lines)
    if "Failed to create server socket" in text:
        return "its port is already in use (rpc-server said: Failed to create server socket)"
    if "unknown argument" in text:
        return "this rpc-server does not accept our arguments (too old?): " + lines[-1][:160]
    meaningful = [ln for ln in lines if ln.strip() and not ln.startswith("torbiz-start")]
    return ("exited: " + meaningful[-1][:200]) if meaningful else "exited without a message"
