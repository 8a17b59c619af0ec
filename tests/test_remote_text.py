"""Text from a node enters core terminal-safe: an SSH server's DISCONNECT reason (sent before
any host-key check), a worker's log (tail, follow, the sentence explaining its death), a
detached script's error, probe and Petals fields. `raw` lines (for `logs --raw` into a pipe)
keep their bytes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from core.config import NodeConfig, SshOptions
from core.engines.llama_rpc.rpc import explain_worker_log
from core.engines.petals import commands as petals
from core.reach import detached
from core.reach.transport import LocalTransport, SshTransport, TransportError
from core.text import terminal_safe
from tests.cluster_files import ssh_transport_for

# Clipboard write (OSC 52), screen clear (CSI 2J), a new window title, an 8-bit CSI, a bidi
# override, a carriage return that would overwrite the line.
HOSTILE = ("\x1b]52;c;Y3VybCBldmlsIHwgc2g=\x07\x1b[2J\x1b[H\x1b]0;all nodes ready\x07"
           "\x9b31m\u202efake\x1b[0m\rall nodes ready")


def _inert(text: str) -> bool:
    return not any(c in text for c in "\x1b\x07\x9b\x9d\r\n\u202e") and "52;c;" not in text


def test_terminal_safe_is_the_one_sanitizer() -> None:
    from tui.text import sanitize

    assert sanitize is terminal_safe
    assert _inert(terminal_safe(HOSTILE))
    assert terminal_safe(HOSTILE) == "fake all nodes ready"
    assert terminal_safe(terminal_safe(HOSTILE)) == terminal_safe(HOSTILE)


# ---- an SSH server's DISCONNECT ------------------------------------------------------------

def _packet(payload: bytes) -> bytes:
    pad = 8 - (len(payload) + 5) % 8
    pad += 8 if pad < 4 else 0
    return struct.pack(">IB", len(payload) + pad + 1, pad) + payload + bytes(pad)


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


async def test_a_hostile_disconnect_reason_arrives_inert(tmp_path: Path) -> None:
    """A server may send SSH_MSG_DISCONNECT with any text right after its version line,
    before key exchange (so before the host key is checked): anyone on the path can."""
    disconnect = _packet(b"\x01" + struct.pack(">I", 2) + _string(HOSTILE.encode()) +
                         _string(b""))

    async def speak(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n" + disconnect)
        with contextlib.suppress(Exception):
            await writer.drain()
            await reader.read(4096)
        writer.close()

    server = await asyncio.start_server(speak, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    known = tmp_path / "known_hosts"
    known.write_text("")
    transport = SshTransport(NodeConfig(
        name="evil", host="127.0.0.1", ssh_port=port,
        ssh=SshOptions(user="root", known_hosts=str(known), config_file=None,
                       connect_timeout=5)))
    try:
        with pytest.raises(TransportError) as info:
            await transport.run("true")
    finally:
        server.close()
        await transport.close()
    error = info.value
    assert "all nodes ready" in error.reason  # the text is kept, as text ...
    assert _inert(error.reason) and _inert(str(error)), repr(error.reason)  # ... inert


def test_every_transport_error_reason_is_inert() -> None:
    error = TransportError("n", f"SSH connection lost ({HOSTILE})")
    assert _inert(error.reason) and _inert(str(error))


# ---- logs ------------------------------------------------------------------------------

def _hostile_log(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "log").write_bytes(b"torbiz-start today\nloading\n" + HOSTILE.encode() + b"\n"
                                b"\x1b]2;retitled\x1b\\exiting\n")
    return state


@pytest.fixture(params=["local", "ssh"])
def transport(request: pytest.FixtureRequest) -> Any:
    if request.param == "local":
        return LocalTransport(NodeConfig(name="n", host="127.0.0.1", transport="local"))
    return ssh_transport_for(request.getfixturevalue("sshd_cluster")(count=1))


async def test_log_tail_is_inert_and_raw_keeps_the_bytes(tmp_path: Path, transport: Any) -> None:
    state = _hostile_log(tmp_path)
    try:
        lines = await detached.log_tail(transport, str(state))
        raw = await detached.log_tail(transport, str(state), raw=True)
    finally:
        await transport.close()
    assert lines == ["torbiz-start today", "loading", "fake all nodes ready", "exiting"]
    assert raw[2] == HOSTILE.split("\n")[0] and "\x1b]2;retitled" in raw[3]
    for explain in (explain_worker_log, petals.explain_server_log):
        assert _inert(explain(raw)), explain  # even handed raw lines


async def test_followed_log_lines_are_inert_unless_raw(tmp_path: Path, transport: Any) -> None:
    state = _hostile_log(tmp_path)

    async def first(n: int, raw: bool) -> list[str]:
        got: list[str] = []
        stream = transport.stream_lines(detached.follow_script(str(state), 10), raw=raw)
        async with contextlib.aclosing(stream):
            async for line in stream:
                got.append(line)
                if len(got) == n:
                    break
        return got

    try:
        lines = await asyncio.wait_for(first(4, False), 20)
        raw = await asyncio.wait_for(first(4, True), 20)
    finally:
        await transport.close()
    assert lines == ["torbiz-start today", "loading", "fake all nodes ready", "exiting"]
    assert "\x1b]52;c;" in raw[2] and raw[3].startswith("\x1b]2;retitled")


# ---- answers of node-side scripts, probe and Petals fields ---------------------------------

async def test_a_detached_script_error_is_inert(tmp_path: Path) -> None:
    transport = LocalTransport(NodeConfig(name="n", host="127.0.0.1", transport="local"))
    resolve = f"echo 'TORBIZ error {HOSTILE}'; exit 0"
    started = await detached.spawn(transport, str(tmp_path / "s"), ["x"], resolve=resolve)
    assert started.state == "none" and "fake" in started.error
    assert _inert(started.error), repr(started.error)


def test_petals_answers_are_inert() -> None:
    node = NodeConfig(name="a", host="10.0.0.1", backend="petals")
    line = petals.JSON_MARK + json.dumps({"python": HOSTILE, "torch": HOSTILE,
                                          "error": HOSTILE})
    info = petals.parse_prepare(node, line + "\n", "")
    assert all(_inert(v) for v in (info.python, info.torch, info.error)), info
    silent = petals.parse_prepare(node, "", HOSTILE)
    assert _inert(silent.error)
