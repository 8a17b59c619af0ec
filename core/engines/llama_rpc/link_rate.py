"""The rate of the link a load uses: from this machine (where llama-server runs) to a worker's
RPC port, measured the way a load sends weights. Over the llama.cpp RPC protocol itself: HELLO,
ALLOC_BUFFER of CHUNK bytes on the worker, SET_TENSOR into it (what llama-server sends for
every tensor the worker's cache does not hold), and a round trip (GET_ALIGNMENT) that returns
only once the worker has read everything before it; then FREE_BUFFER. A first small transfer
sizes a second one of about BUDGET_S seconds, whose time alone gives the rate (TCP's slow start
and the connection stay out of it). Nothing is written to the worker's cache (cache flag 0).

rpc-server serves one client at a time, so this runs only while no coordinator holds the worker
(`torbiz-tui calibrate`, like the rest of the calibration). The result is kept per node in
<state_dir>/<cluster>/_coordinator/link/<node>.json under the worker's address, not per model:
a link's rate does not depend on the model."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from pathlib import Path
from typing import Protocol

from core.config import ClusterConfig, NodeConfig
from core.engines.llama_rpc.coordinator import coordinator_state_dir
from core.engines.llama_rpc.rpc import RPC_CMD_HELLO, RPC_CONN_CAPS_SIZE, _rst_close
from core.state_file import read_json, write_json
from core.units import format_bytes
from core.weight_cache import LinkRate

CHUNK = 4 << 20  # one SET_TENSOR's data, and the worker's buffer (freed at the end)
FIRST = 256 << 10  # the sizing transfer
BUDGET_S = 2.0  # the measured transfer's intended length
MAX_BYTES = 256 << 20
PROTOCOL_MAJOR = 7  # the message layouts below (ggml-rpc.cpp, RPC_PROTO_MAJOR_VERSION 7)
_ALLOC_BUFFER, _GET_ALIGNMENT, _BUFFER_GET_BASE, _FREE_BUFFER, _SET_TENSOR = 0, 1, 3, 4, 6
_TENSOR = struct.Struct("<QIQ4I4II16iI10QQQQ64si")  # rpc_tensor, packed: 296 bytes
assert _TENSOR.size == 296


class LinkRateError(Exception):
    """Why the rate could not be measured, as a sentence."""


def link_key(node: NodeConfig) -> str:
    """What the rate belongs to: the worker's address and how it is reached (a tunnel's local
    port changes on every start, so it is not the key)."""
    via = "an SSH tunnel" if node.rpc_bind == "loopback" else "direct"
    return f"{node.rpc_host or node.host}:{node.rpc_port} ({via})"


def _path(config: ClusterConfig, name: str) -> Path:
    return Path(coordinator_state_dir(config)).expanduser() / "link" / f"{name}.json"


def load(config: ClusterConfig, node: NodeConfig) -> LinkRate | None:
    """The node's last measured rate, when it was measured for its current address."""
    data = read_json(_path(config, node.name))
    if not data or data.get("key") != link_key(node):
        return None
    try:
        return LinkRate(float(data["bytes_per_second"]), float(data["measured_at"]),
                        int(data["sent_bytes"]), float(data["seconds"]))
    except (KeyError, TypeError, ValueError):
        return None


def store(config: ClusterConfig, node: NodeConfig, rate: LinkRate) -> None:
    write_json(_path(config, node.name), {
        "key": link_key(node), "bytes_per_second": rate.bytes_per_second,
        "measured_at": rate.measured_at, "sent_bytes": rate.sent_bytes,
        "seconds": rate.seconds})


class _Rpc:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 timeout: float) -> None:
        self.reader, self.writer, self.timeout = reader, writer, timeout

    def send(self, cmd: int, payload: bytes | memoryview, extra: int = 0) -> None:
        """A command; `extra` bytes of data follow in further writes."""
        self.writer.write(bytes([cmd]) + struct.pack("<Q", len(payload) + extra))
        self.writer.write(payload)

    async def reply(self, size: int, timeout: float | None = None) -> bytes:
        async def read() -> bytes:
            (got,) = struct.unpack("<Q", await self.reader.readexactly(8))
            if got != size:
                raise LinkRateError(f"the worker answered {got} bytes where {size} were due")
            return await self.reader.readexactly(size)

        await self.writer.drain()
        return await asyncio.wait_for(read(), timeout or self.timeout)


async def measure(host: str, port: int, *, timeout: float = 5.0,
                  budget_s: float = BUDGET_S) -> LinkRate:
    """A timed transfer to the worker at host:port; LinkRateError with a sentence otherwise."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        raise LinkRateError(f"cannot connect to its worker at {host}:{port} "
                            f"({exc.__class__.__name__})") from None
    rpc = _Rpc(reader, writer, timeout)
    try:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rpc.send(RPC_CMD_HELLO, bytes(RPC_CONN_CAPS_SIZE))
        try:
            major = (await rpc.reply(4 + RPC_CONN_CAPS_SIZE))[0]
        except asyncio.TimeoutError:
            raise LinkRateError(f"its worker at {host}:{port} accepts but does not answer: a "
                                "coordinator holds it (rpc-server serves one client at a "
                                "time); torbiz-tui down, then calibrate") from None
        if major != PROTOCOL_MAJOR:
            raise LinkRateError(f"its worker speaks RPC protocol {major}.x; the timed "
                                f"transfer knows protocol {PROTOCOL_MAJOR} only")
        # One deadline over it all: a link that stops mid-transfer blocks a write, not a read.
        return await asyncio.wait_for(_timed(rpc, budget_s), timeout + 30 + 8 * budget_s)
    except asyncio.TimeoutError:
        raise LinkRateError(f"its worker at {host}:{port} stopped answering during the "
                            "timed transfer") from None
    except (OSError, asyncio.IncompleteReadError):
        raise LinkRateError(f"the link to its worker at {host}:{port} dropped during the "
                            "timed transfer") from None
    finally:
        _rst_close(writer)


async def _timed(rpc: _Rpc, budget_s: float) -> LinkRate:
    rpc.send(_ALLOC_BUFFER, struct.pack("<IQ", 0, CHUNK))
    remote, size = struct.unpack("<QQ", await rpc.reply(16))
    if remote == 0 or size < CHUNK:
        raise LinkRateError(f"its worker cannot allocate {CHUNK >> 20} MiB for the transfer")
    try:
        rpc.send(_BUFFER_GET_BASE, struct.pack("<Q", remote))
        (base,) = struct.unpack("<Q", await rpc.reply(8))
        data = memoryview(bytes(CHUNK))

        def tensor(count: int) -> bytes:
            # An F32 tensor of `count` bytes at the buffer's start; cache flag 0, offset 0.
            return _TENSOR.pack(1, 0, remote, count // 4, 1, 1, 1, 4, count, count, count, 0,
                                *([0] * 16), 0, *([0] * 10), 0, 0, base, b"torbiz-link", 0
                                ) + b"\0" + struct.pack("<Q", 0)

        async def send(total: int, wait: float) -> float:
            started = time.monotonic()
            left = total
            while left:
                count = min(CHUNK, left)
                rpc.send(_SET_TENSOR, tensor(count), count)
                rpc.writer.write(data[:count])
                await rpc.writer.drain()
                left -= count
            rpc.send(_GET_ALIGNMENT, struct.pack("<I", 0))  # answered after all of it is read
            await rpc.reply(8, wait)
            return time.monotonic() - started

        first = await send(FIRST, rpc.timeout + FIRST / 12_500)  # a link of 100 kbit/s
        guess = FIRST / max(first, 1e-6)
        total = int(min(MAX_BYTES, max(FIRST, guess * budget_s))) // 4096 * 4096
        seconds = await send(total, 4 * budget_s + rpc.timeout + total / max(guess, 1.0))
        return LinkRate(total / seconds, time.time(), total, seconds)
    finally:
        # The worker frees a client's buffers when it goes, too: this is only polite.
        with contextlib.suppress(OSError, RuntimeError):
            rpc.send(_FREE_BUFFER, struct.pack("<Q", remote))


class _Endpoints(Protocol):
    async def endpoints(self, workers: list[NodeConfig]) -> list[str]: ...


async def calibrate_link(config: ClusterConfig, node: NodeConfig, runner: _Endpoints,
                         force: bool) -> str:
    """`calibrate`'s line about a node's link: measured now (or read, unless `force`)."""
    found = None if force else load(config, node)
    if found is not None:
        return f"{node.name}: load link {found.describe()} from here to its worker; cached"
    try:
        (endpoint,) = await runner.endpoints([node])
        host, _, port = endpoint.rpartition(":")
        found = await measure(host.strip("[]"), int(port))
    except LinkRateError as exc:
        return f"{node.name}: link rate not measured: {exc}"
    except Exception as exc:  # noqa: BLE001 - a tunnel or endpoint failure: a sentence
        return f"{node.name}: link rate not measured: no way to its worker: {exc}"
    store(config, node, found)
    return (f"{node.name}: load link {format_bytes(found.bytes_per_second)}/s from here to "
            f"its worker ({format_bytes(found.sent_bytes)} in {found.seconds:.1f} s over its "
            "RPC port, as a load sends weights)")
