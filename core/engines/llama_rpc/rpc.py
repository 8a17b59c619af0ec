"""llama.cpp RPC workers: finding the binary, the command line, readiness and the HELLO probe."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import shutil
import socket
import struct
from dataclasses import dataclass

from core.config import NodeConfig
from core.engines.llama_rpc.build import (
    LLAMA_CPP_PYTHON_VERSION,
    RPC_SERVER_NAMES,
    find_cached_binary,
)
from core.reach.probe import WorkerLookup
from core.reach.shell import path_word, quote
from core.text import terminal_safe

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
    """rpc-server binds with inet_addr(): it needs an IPv4 literal. "auto" is the node's own
    address (rpc_host, else host) when that is IPv4, and 127.0.0.1 for a local node named by a
    host name ("localhost"); every interface only with rpc_bind = "any" (config refuses an
    ssh node with a host name and "auto": it would need all of them)."""
    if node.rpc_bind == "loopback":
        return "127.0.0.1"
    if node.rpc_bind == "any":
        return "0.0.0.0"
    if node.rpc_bind != "auto":
        return node.rpc_bind
    if node.ipv4:
        return node.ipv4
    return "127.0.0.1" if node.transport == "local" else "0.0.0.0"


def worker_exposure(node: NodeConfig) -> str | None:
    """A sentence when this node's rpc-server listens beyond its loopback, else None."""
    if node.rpc_bind == "loopback":
        return None  # reached through an SSH tunnel
    bind = bind_address(node)
    if ipaddress.IPv4Address(bind).is_loopback:
        return None
    where = (f"every interface of {node.host} (rpc_bind = \"any\")" if bind == "0.0.0.0"
             else f"{bind}")
    return (f"{node.name}: rpc-server listens on {where}, port {node.rpc_port}, and the "
            "llama.cpp RPC protocol has no authentication or encryption: anyone who reaches "
            "that port can use the worker and read the weights; rpc_bind = \"loopback\" "
            "reaches it through an SSH tunnel instead")


def listen_address(node: NodeConfig) -> tuple[str, int]:
    return bind_address(node), node.rpc_port


def rpc_server_args(node: NodeConfig) -> list[str]:
    """The worker's arguments after the program name."""
    args = ["-H", bind_address(node), "-p", str(node.rpc_port)]
    if node.cache:
        args.append("-c")
    if node.threads:
        args += ["-t", str(node.threads)]
    return args


def resolve_binary_sh(node: NodeConfig) -> str:
    """sh that sets $bin to the worker binary (configured path, PATH, cache) or prints
    `TORBIZ error notexec|missing` and exits."""
    if node.rpc_server:
        word = path_word(node.rpc_server)
        return f'bin={word}; [ -x "$bin" ] || {{ echo "TORBIZ error notexec"; exit 0; }}'
    lines = ["bin="]
    for name in RPC_SERVER_NAMES:
        lines.append(f'[ -n "$bin" ] || bin=$(command -v {quote(name)} 2>/dev/null)')
    for flavour in ("", "-portable"):
        version = f"{LLAMA_CPP_PYTHON_VERSION}{flavour}"
        word = path_word(f"~/.cache/torbiz/llama.cpp-{version}/bin/ggml-rpc-server")
        lines.append(f'[ -n "$bin" ] || {{ [ -x {word} ] && bin={word}; }}')
    lines.append('[ -n "$bin" ] || { echo "TORBIZ error missing"; exit 0; }')
    return "\n".join(lines)


MISSING_BINARY_HINT = (
    "rpc-server not found: set rpc_server in the node's config, put rpc-server or "
    "ggml-rpc-server on its PATH, or build it there with `torbiz-tui build-llama --portable` "
    "and copy ~/.cache/torbiz/llama.cpp-*/bin/ggml-rpc-server"
)


def local_resolve_sh(node: NodeConfig) -> str:
    """For local nodes: resolve here, where $TORBIZ_CACHE is known, and hand sh the result."""
    if node.rpc_server:
        return resolve_binary_sh(node)
    found = next((shutil.which(n) for n in RPC_SERVER_NAMES if shutil.which(n)), None)
    path = found or find_cached_binary("ggml-rpc-server")
    if path is None:
        return 'echo "TORBIZ error missing"; exit 0'
    return f"bin={quote(str(path))}"


def explain_resolve_error(node: NodeConfig, word: str) -> str:
    if word == "notexec":
        return f"rpc_server {node.rpc_server!r} is not an executable file there"
    return MISSING_BINARY_HINT


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
    """The sentence that a dead worker's log tail supports (terminal-safe)."""
    lines = [terminal_safe(line) for line in lines]
    text = "\n".join(lines)
    if "Failed to create server socket" in text:
        return "its port is already in use (rpc-server said: Failed to create server socket)"
    if "unknown argument" in text:
        return "this rpc-server does not accept our arguments (too old?): " + lines[-1][:160]
    meaningful = [ln.strip() for ln in lines
                  if ln.strip() and not ln.startswith("torbiz-start")]
    if not meaningful:
        return "the worker process is gone and its log says nothing"
    return f"the worker process is gone (killed, or crashed); its log's last line: " \
           f"{meaningful[-1][:200]!r}"


def worker_lookup(node: NodeConfig, is_local: bool) -> WorkerLookup:
    """How the probe finds rpc-server on the node (the cached build here, else PATH)."""
    return WorkerLookup(local_resolve_sh(node) if is_local else resolve_binary_sh(node),
                        lambda word: explain_resolve_error(node, word))
