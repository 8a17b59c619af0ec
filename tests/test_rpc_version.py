"""The coordinator's RPC protocol version, and workers of another version refused before
llama-server starts (core/rpc_version.py)."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from core.cluster import Cluster
from core.config import load_config
from core.engines.base import EngineError
from core.engines.llama_rpc import rpc_version
from core.engines.llama_rpc.build import find_cached_binary
from core.engines.llama_rpc.rpc import RpcVersion
from tests.cluster_files import toml_text


def test_llama_servers_own_acceptance_rule() -> None:
    built = RpcVersion(7, 1, 0)
    assert rpc_version.compatible(built, RpcVersion(7, 1, 3))
    assert rpc_version.compatible(built, RpcVersion(7, 0, 9))  # an older minor is fine
    assert not rpc_version.compatible(built, RpcVersion(7, 2, 0))  # a newer minor is not
    assert not rpc_version.compatible(built, RpcVersion(6, 1, 0))
    assert not rpc_version.compatible(built, RpcVersion(8, 0, 0))


def test_version_from_a_header() -> None:
    text = ("#define RPC_PROTO_MAJOR_VERSION    3\n#define RPC_PROTO_MINOR_VERSION 12\n"
            "#define RPC_PROTO_PATCH_VERSION  1\n")
    assert rpc_version.version_from_header(text) == RpcVersion(3, 12, 1)
    assert rpc_version.version_from_header("#define RPC_PROTO_MAJOR_VERSION 3\n") is None
    assert rpc_version.version_from_header("\x00garbage") is None


def _built() -> tuple[str, str]:
    server, worker = find_cached_binary("llama-server"), find_cached_binary("ggml-rpc-server")
    if not (server and worker):
        pytest.skip("llama.cpp not built: run `torbiz-tui build-llama`")
    return str(server), str(worker)


async def test_the_cached_build_is_read_from_its_source_header() -> None:
    server, _ = _built()
    header = Path(server).resolve().parent.parent / "src/ggml/include/ggml-rpc.h"
    expected = rpc_version.version_from_header(header.read_text())
    assert expected is not None
    assert await rpc_version.coordinator_version(server) == expected


async def test_without_a_header_the_sibling_rpc_server_is_asked(tmp_path: Path) -> None:
    """A llama-server with no source tree beside it: the rpc-server of the same directory is
    started on loopback, asked with a real HELLO, and stopped."""
    server, worker = _built()
    header = Path(server).resolve().parent.parent / "src/ggml/include/ggml-rpc.h"
    expected = rpc_version.version_from_header(header.read_text())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "llama-server").write_bytes(b"#!/bin/sh\nexit 1\n")
    (bin_dir / "rpc-server").symlink_to(worker)
    assert await rpc_version.coordinator_version(str(bin_dir / "llama-server")) == expected
    (tmp_path / "lonely").mkdir()
    (tmp_path / "lonely" / "llama-server").write_bytes(b"")
    assert await rpc_version.coordinator_version(str(tmp_path / "lonely/llama-server")) is None


@contextlib.asynccontextmanager
async def other_build_worker(version: RpcVersion) -> AsyncIterator[int]:
    """A stand-in for an rpc-server of another llama.cpp build (no other build can be made
    here): it answers HELLO on the real wire format with `version`, then hangs up."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            command = await reader.readexactly(1)
            (size,) = struct.unpack("<Q", await reader.readexactly(8))
            await reader.readexactly(size)
            if command == bytes([14]):
                body = bytes([version.major, version.minor, version.patch]) + bytes(25)
                writer.write(struct.pack("<Q", len(body)) + body)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def test_a_worker_of_another_protocol_is_refused_before_llama_server_starts(
        tmp_path: Path) -> None:
    server, _ = _built()
    expected = await rpc_version.coordinator_version(server)
    assert expected is not None
    older = RpcVersion(expected.major - 1, 0, 0)
    async with other_build_worker(older) as port:
        path = tmp_path / "c.toml"
        path.write_text(toml_text({"name": "v", "state_dir": str(tmp_path / "s")},
                                  [{"name": "old-box", "host": "127.0.0.1", "rpc_port": port,
                                    "transport": "local"}],
                                  model={"gguf": str(tmp_path / "m.gguf")}))
        cluster = Cluster(load_config(path))
        try:
            with pytest.raises(EngineError) as refused:
                await cluster.engine.runner.check_workers_answer(
                    list(cluster.config.nodes), [f"127.0.0.1:{port}"], server)
        finally:
            await cluster.close()
    (problem,) = refused.value.problems
    assert problem.startswith(f"worker old-box speaks RPC protocol {older}, the coordinator's "
                              f"llama-server {expected}: llama-server refuses it")
    assert "same llama.cpp build" in problem
