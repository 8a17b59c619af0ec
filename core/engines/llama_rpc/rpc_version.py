"""Which llama.cpp RPC protocol the coordinator's build speaks, to compare with each worker's
HELLO before the coordinator starts: a mismatch otherwise shows only as llama-server's own
`RPC server version mismatch` deep in its log, after it gave up.

llama-server's client accepts a worker whose major version is its own and whose minor version
is not newer (ggml-rpc.cpp: `response.major != RPC_PROTO_MAJOR_VERSION || response.minor >
RPC_PROTO_MINOR_VERSION` fails). The build's version is read, in this order, from
- the ggml-rpc.h of the source tree the binary was built from (torbiz-tui build-llama keeps it:
  <cache>/bin/llama-server beside <cache>/src/ggml/include/ggml-rpc.h);
- the rpc-server built with it (same directory): started for a moment on 127.0.0.1 and asked
  with a HELLO, then stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from pathlib import Path

from core.engines.llama_rpc.build import RPC_SERVER_NAMES
from core.engines.llama_rpc.rpc import HelloError, RpcVersion, hello

_DEFINE = re.compile(r"#define\s+RPC_PROTO_(MAJOR|MINOR|PATCH)_VERSION\s+(\d+)")
_cache: dict[tuple[str, float], RpcVersion | None] = {}


def compatible(coordinator: RpcVersion, worker: RpcVersion) -> bool:
    """llama-server's own rule for accepting a worker."""
    return worker.major == coordinator.major and worker.minor <= coordinator.minor


def mismatch_sentence(node: str, coordinator: RpcVersion, worker: RpcVersion) -> str:
    return (f"worker {node} speaks RPC protocol {worker}, the coordinator's llama-server "
            f"{coordinator}: llama-server refuses it (`RPC server version mismatch`). Run the "
            "same llama.cpp build on every node (torbiz-tui build-llama --portable here, then "
            "copy its bin/ggml-rpc-server to the node and set rpc_server)")


def version_from_header(text: str) -> RpcVersion | None:
    found = {kind: int(number) for kind, number in _DEFINE.findall(text)}
    if set(found) != {"MAJOR", "MINOR", "PATCH"}:
        return None
    return RpcVersion(found["MAJOR"], found["MINOR"], found["PATCH"])


def _header_beside(binary: Path) -> RpcVersion | None:
    header = binary.resolve().parent.parent / "src" / "ggml" / "include" / "ggml-rpc.h"
    try:
        return version_from_header(header.read_text(errors="replace"))
    except OSError:
        return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _sibling(binary: Path) -> Path | None:
    return next((binary.parent / name for name in RPC_SERVER_NAMES
                 if (binary.parent / name).is_file()), None)


async def _ask_sibling(binary: Path, timeout: float) -> RpcVersion | None:
    sibling = await asyncio.to_thread(_sibling, binary)
    if sibling is None:
        return None
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        str(sibling), "-H", "127.0.0.1", "-p", str(port), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline and proc.returncode is None:
            try:
                return await hello("127.0.0.1", port, timeout=1.0)
            except HelloError:
                await asyncio.sleep(0.05)
        return None
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()


async def coordinator_version(binary: str, timeout: float = 5.0) -> RpcVersion | None:
    """The RPC protocol of the llama-server at `binary`, or None when neither its source
    header nor a sibling rpc-server is there to tell (remembered per binary and mtime)."""
    path = Path(binary)
    key = await asyncio.to_thread(_key, path)
    if key is None:
        return None
    if key not in _cache:
        _cache[key] = await asyncio.to_thread(_header_beside, path) \
            or await _ask_sibling(path, timeout)
    return _cache[key]


def _key(path: Path) -> tuple[str, float] | None:
    try:
        return str(path.resolve()), path.stat().st_mtime
    except OSError:
        return None
