"""The RPC HELLO probe against a real worker, a busy one, and things that are not workers."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time

import pytest

from core.engines.llama_rpc.build import find_cached_binary
from core.engines.llama_rpc.rpc import HelloError, hello
from tests.cluster_files import free_port


@pytest.fixture
def worker():
    binary = find_cached_binary("ggml-rpc-server")
    if binary is None:
        pytest.skip("ggml-rpc-server not built: run `torbiz-tui build-llama`")
    port = free_port()
    proc = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(port), "-t", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    yield port, proc
    proc.terminate()
    proc.wait(10)


async def test_real_worker_answers_with_its_protocol_version(worker) -> None:
    port, proc = worker
    for _ in range(20):  # repeated probes never kill it (RST close, no SIGPIPE)
        version = await hello("127.0.0.1", port)
        assert (version.major, version.minor) == (7, 0)
    assert proc.poll() is None


async def test_garbage_on_the_worker_port_harms_nothing(worker) -> None:
    port, proc = worker
    for payload in (os.urandom(4096), b"\x0e" + b"\xff" * 8, b"GET / HTTP/1.0\r\n\r\n", b""):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(payload)
        await writer.drain()
        writer.close()
        await asyncio.sleep(0.1)
    assert proc.poll() is None
    assert (await hello("127.0.0.1", port)).major == 7


async def test_busy_worker_and_non_workers_are_told_apart(worker) -> None:
    port, _ = worker
    # Hold the worker the way a coordinator does: a completed HELLO and an open connection.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(bytes([14]) + (24).to_bytes(8, "little") + bytes(24))
    await reader.readexactly(8 + 28)
    try:
        with pytest.raises(HelloError, match="busy"):
            await hello("127.0.0.1", port, timeout=1.0)
    finally:
        writer.close()

    async def garbage(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"SSH-2.0-OpenSSH_9.2\r\n" + os.urandom(64))
        await w.drain()
        w.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    other = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(HelloError, match="not a llama.cpp RPC server"):
            await hello("127.0.0.1", other)
    finally:
        server.close()
        await server.wait_closed()
    with pytest.raises(HelloError, match="cannot connect"):
        await hello("127.0.0.1", free_port())
