"""The SSH transport against real sshd nodes: ~/.ssh/config is honoured, one connection per
node carries every command, a frozen node times out with a sentence."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from core.config import NodeConfig, SshOptions
from core.reach.transport import SshTransport, TransportError
from tests.cluster_files import ssh_transport_for


async def test_ssh_config_alias_supplies_hostname_port_user_and_key(tmp_path: Path,
                                                                    sshd_cluster) -> None:
    sshd = sshd_cluster(count=1)
    node = sshd.nodes[0]
    config = tmp_path / "ssh_config"
    config.write_text(f"Host gpu-box\n  HostName {node.host}\n  Port {node.port}\n"
                      f"  User root\n  IdentityFile {sshd.client_key}\n")
    transport = SshTransport(NodeConfig(
        name="gpu", host="gpu-box", ssh_port=node.port,
        ssh=SshOptions(known_hosts=str(sshd.known_hosts), config_file=str(config))))
    try:
        result = await transport.run("echo $SSH_CONNECTION; id -un")
        assert result.ok
        connection, user = result.stdout.splitlines()[:2]
        assert connection.split()[2] == node.host and user == "root"
        # Many commands, one connection.
        outs = await asyncio.gather(*(transport.run(f"echo {i}") for i in range(10)))
        assert [o.stdout.strip() for o in outs] == [str(i) for i in range(10)]
        assert len({o.stdout for o in outs}) == 10
    finally:
        await transport.close()


async def test_frozen_node_times_out_with_a_sentence(tmp_path: Path) -> None:
    # Accepts TCP but never sends an SSH banner: what a frozen host looks like.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    known = tmp_path / "known_hosts"
    known.write_text("")
    transport = SshTransport(NodeConfig(
        name="frozen", host="127.0.0.1", ssh_port=port,
        ssh=SshOptions(user="root", known_hosts=str(known), config_file=None,
                       connect_timeout=1.5)))
    started = time.monotonic()
    try:
        with pytest.raises(TransportError) as info:
            await transport.run("true")
    finally:
        listener.close()
    assert time.monotonic() - started < 10
    assert info.value.node == "frozen"
    assert f"no SSH answer from 127.0.0.1:{port} within 1.5 s" in info.value.reason


async def test_missing_known_hosts_file_is_refused_before_connecting(tmp_path: Path) -> None:
    transport = SshTransport(NodeConfig(
        name="n", host="127.0.0.1", ssh_port=1,
        ssh=SshOptions(known_hosts=str(tmp_path / "absent"), config_file=None)))
    with pytest.raises(TransportError) as info:
        await transport.run("true")
    assert info.value.kind == "host-key"
    assert "does not exist; host keys are always verified" in info.value.reason


async def test_invalid_utf8_output_is_kept_with_replacement(tmp_path: Path,
                                                            sshd_cluster) -> None:
    transport = ssh_transport_for(sshd_cluster(count=1))
    try:
        result = await transport.run(r"printf 'a\377\376b\n'; echo after")
    finally:
        await transport.close()
    assert result.ok
    assert result.stdout.splitlines() == ["a\ufffd\ufffdb", "after"]


async def test_local_timeout_kills_the_whole_command() -> None:
    from core.reach.transport import LocalTransport

    transport = LocalTransport(NodeConfig(name="l", host="127.0.0.1", transport="local"))
    started = time.monotonic()
    with pytest.raises(TransportError, match="timed out"):
        await transport.run("sleep 30 & sleep 30; wait", timeout=1)
    assert time.monotonic() - started < 5
