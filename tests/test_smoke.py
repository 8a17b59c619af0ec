"""operations.generate against a coordinator that is not there or not llama-server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from core.cluster import Cluster
from core.config import load_config
from core.operations import OperationError as SmokeError
from core.operations import generate
from tests.cluster_files import free_port, toml_text


def config_at(tmp_path: Path, port: int):  # type: ignore[no-untyped-def]
    path = tmp_path / "c.toml"
    path.write_text(toml_text({"name": "s", "state_dir": str(tmp_path / "state")},
                              [{"name": "a", "host": "127.0.0.1", "transport": "local"}],
                              model={"gguf": str(tmp_path / "m.gguf")},
                              coordinator={"host": "127.0.0.1", "port": port}))
    return load_config(path)


async def test_no_coordinator_is_a_sentence(tmp_path: Path) -> None:
    with pytest.raises(SmokeError,
                       match=r"nothing answers at http://127.0.0.1:\d+: is the coordinator up"):
        await generate(Cluster(config_at(tmp_path, free_port())), timeout=5)


async def test_a_server_that_is_not_llama_server(tmp_path: Path) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = b'{"hello": "world"}'
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(SmokeError, match="not an OpenAI completion"):
            await generate(Cluster(config_at(tmp_path, port)), timeout=5)
    finally:
        server.close()
        await server.wait_closed()
