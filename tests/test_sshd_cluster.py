"""The test bed itself: real sshd nodes answer, verify host keys, stop and come back."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import asyncssh
import psutil
import pytest

from tests.sshd_cluster import SSHD, AddressInUse, SshdCluster, SshdError, root_login_problem

pytestmark = pytest.mark.integration


def _connect(cluster: SshdCluster, host: str, known_hosts: str | None = None) -> Any:
    return asyncssh.connect(host, port=cluster.port, username="root",
                            client_keys=[str(cluster.client_key)],
                            known_hosts=known_hosts or str(cluster.known_hosts),
                            config=[], connect_timeout=5)


async def _run(cluster: SshdCluster, host: str, command: str, known_hosts: str | None = None,
               ) -> str:
    async with _connect(cluster, host, known_hosts) as conn:
        result = await conn.run(command, check=True)
        return str(result.stdout)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _sshd_descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


async def test_nodes_answer_with_verified_host_keys(sshd_cluster) -> None:
    cluster = sshd_cluster(count=3)
    assert [n.name for n in cluster.nodes] == ["node1", "node2", "node3"]
    prefix = cluster.nodes[0].host.rsplit(".", 1)[0]
    assert [n.host for n in cluster.nodes] == [f"{prefix}.{i}" for i in (11, 12, 13)]
    assert all(n.port == 2222 for n in cluster.nodes)
    known = cluster.known_hosts.read_text().splitlines()
    assert known == [f"[{n.host}]:{n.port} {n.host_key_pub}" for n in cluster.nodes]
    assert all(n.host_key_pub.startswith("ssh-ed25519 AAAA") for n in cluster.nodes)
    assert len({n.host_key_pub for n in cluster.nodes}) == 3  # one key per node
    for node in cluster.nodes:
        assert psutil.Process(node.pid).exe() == SSHD
        assert (cluster.root / node.name / "sshd_config").is_file()
        assert (cluster.root / node.name / "sshd.log").is_file()

    outputs = await asyncio.gather(*(_run(cluster, n.host, "echo $SSH_CONNECTION; id -u")
                                     for n in cluster.nodes))
    for node, out in zip(cluster.nodes, outputs, strict=True):
        connection, uid = out.splitlines()
        client_ip, _, server_ip, server_port = connection.split()
        assert (server_ip, server_port) == (node.host, "2222")
        assert client_ip.startswith("127.")
        assert uid == "0"


async def test_product_style_sh_c_commands_run(sshd_cluster) -> None:
    cluster = sshd_cluster(count=1)
    out = await _run(cluster, cluster.nodes[0].host, "sh -c 'echo \"$0\" $((6 * 7))' x")
    assert out == "x 42\n"


async def test_a_different_key_in_known_hosts_is_refused(sshd_cluster, tmp_path: Path) -> None:
    cluster = sshd_cluster(count=1)
    node = cluster.nodes[0]
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                    str(tmp_path / "other")], check=True)
    other = " ".join((tmp_path / "other.pub").read_text().split()[:2])
    assert other != node.host_key_pub
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(f"[{node.host}]:{node.port} {other}\n")
    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        await _run(cluster, node.host, "true", known_hosts=str(wrong))


async def test_stop_and_restart_a_node(sshd_cluster) -> None:
    cluster = sshd_cluster(count=2)
    node, other = cluster.nodes
    old_pid = node.pid
    cluster.stop_node(node.name)
    assert not _alive(old_pid)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((node.host, node.port), timeout=2).close()
    with pytest.raises(OSError):
        await _run(cluster, node.host, "true")
    assert await _run(cluster, other.host, "echo ok") == "ok\n"
    cluster.stop_node(node.name)  # already stopped: nothing happens

    cluster.start_node(node.name)
    restarted = cluster.node(node.name)
    assert restarted.pid != old_pid and _alive(restarted.pid)
    assert restarted.host_key_pub == node.host_key_pub  # the old known_hosts still verifies
    assert await _run(cluster, node.host, "echo back") == "back\n"
    cluster.start_node(node.name)  # already running: nothing happens
    assert cluster.node(node.name).pid == restarted.pid

    cluster.stop()
    for pid in (old_pid, restarted.pid, other.pid):
        assert not _alive(pid)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert cluster.pids() == []
    cluster.stop()  # idempotent


async def test_established_sessions_outlive_stop_node_until_stop(sshd_cluster) -> None:
    cluster = sshd_cluster(count=2)
    keep, drop = cluster.nodes
    async with _connect(cluster, keep.host) as kept, _connect(cluster, drop.host) as dropped:
        sessions = _sshd_descendants(keep.pid)
        assert sessions, "a per-connection sshd under the listener"

        cluster.stop_node(keep.name)  # like restarting sshd: the session lives on
        assert (await kept.run("echo still", check=True)).stdout == "still\n"

        cluster.stop_node(drop.name, drop_connections=True)  # like a crashed node
        with pytest.raises((asyncssh.Error, OSError)):
            await asyncio.wait_for(dropped.run("echo gone", check=True), 10)

        cluster.stop()  # ends the orphaned session too
        assert not any(_alive(p.pid) for p in sessions)
        with pytest.raises((asyncssh.Error, OSError)):
            await asyncio.wait_for(kept.run("echo gone", check=True), 10)


async def test_eight_nodes_start_and_answer_in_parallel(sshd_cluster) -> None:
    began = time.monotonic()
    cluster = sshd_cluster(count=8)
    took = time.monotonic() - began
    assert took < 10, f"8 nodes took {took:.1f}s to start"
    assert len({n.host for n in cluster.nodes}) == 8
    outputs = await asyncio.gather(*(_run(cluster, n.host, "echo $SSH_CONNECTION")
                                     for n in cluster.nodes))
    assert [o.split()[2] for o in outputs] == [n.host for n in cluster.nodes]


async def test_many_connections_and_channels_on_one_node(sshd_cluster) -> None:
    cluster = sshd_cluster(count=1)
    host = cluster.nodes[0].host
    # MaxStartups: 40 handshakes at once; MaxSessions: 40 channels on one connection.
    outputs = await asyncio.gather(*(_run(cluster, host, f"echo {i}") for i in range(40)))
    assert outputs == [f"{i}\n" for i in range(40)]
    async with _connect(cluster, host) as conn:
        results = await asyncio.gather(*(conn.run(f"sleep 0.2; echo {i}", check=True)
                                         for i in range(40)))
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(40)]


async def test_local_forwarding_and_sftp(sshd_cluster) -> None:
    cluster = sshd_cluster(count=1)
    node = cluster.nodes[0]

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"pong " + await reader.readline())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, node.host, 0)
    target_port = server.sockets[0].getsockname()[1]
    try:
        async with _connect(cluster, node.host) as conn:
            listener = await conn.forward_local_port("127.0.0.1", 0, node.host, target_port)
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.get_port())
            writer.write(b"ping\n")
            assert await asyncio.wait_for(reader.readline(), 10) == b"pong ping\n"
            writer.close()
            listener.close()
            async with conn.start_sftp_client() as sftp:
                assert await sftp.exists(str(cluster.known_hosts))
    finally:
        server.close()
        await server.wait_closed()


async def test_ssh_config_text_names_every_node(sshd_cluster, tmp_path: Path) -> None:
    cluster = sshd_cluster(count=2)
    config = tmp_path / "ssh_config"
    config.write_text(cluster.ssh_config_text())
    for node in cluster.nodes:
        async with asyncssh.connect(node.name, config=[str(config)], connect_timeout=5) as conn:
            result = await conn.run("echo $SSH_CONNECTION", check=True)
        assert str(result.stdout).split()[2] == node.host


def test_busy_address_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    if not os.access(SSHD, os.X_OK) or os.geteuid() != 0:
        pytest.skip("needs root and /usr/sbin/sshd")
    prefix = "127.0.251"
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            squatter.bind((f"{prefix}.12", 2222))
        except OSError:
            pytest.skip(f"{prefix}.12:2222 is taken by someone else already")
        squatter.listen()
        cluster = SshdCluster(tmp_path, 3, prefix=prefix)
        try:
            with pytest.raises(AddressInUse, match=rf"{prefix}\.12:2222 is already in use"):
                cluster.start()
            assert cluster.pids() == []  # node1, started before the clash, is gone again
        finally:
            cluster.stop()


def test_sshd_that_cannot_start_reports_its_log(tmp_path: Path) -> None:
    if not os.access(SSHD, os.X_OK) or os.geteuid() != 0:
        pytest.skip("needs root and /usr/sbin/sshd")
    cluster = SshdCluster(tmp_path, 1, prefix="127.0.252")
    (tmp_path / "node1").mkdir(parents=True)
    (tmp_path / "node1" / "host_key").write_text("not a key\n")
    (tmp_path / "node1" / "host_key.pub").write_text("ssh-ed25519 AAAAnot-a-key\n")
    try:
        with pytest.raises(SshdError, match=r"(?s)sshd for node1 on 127\.0\.252\.11:2222 "
                                            r"exited.*no hostkeys available"):
            cluster.start()
        assert cluster.pids() == []
    finally:
        cluster.stop()


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="loopback"):
        SshdCluster(tmp_path, 1, prefix="10.0.0")
    with pytest.raises(ValueError, match="/24"):
        SshdCluster(tmp_path, 3, first_octet=253)
    cluster = SshdCluster(tmp_path, 2)
    with pytest.raises(KeyError, match="node3"):
        cluster.stop_node("node3")


async def test_commands_skip_the_login_users_bashrc_unless_asked(sshd_cluster) -> None:
    quiet = sshd_cluster(count=1)
    chatty = sshd_cluster(count=1, source_bashrc=True)
    # bash reads ~/.bashrc for sshd only at SHLVL 1; the harness starts sessions one level up.
    assert await _run(quiet, quiet.nodes[0].host, "echo $SHLVL") == "2\n"
    assert await _run(chatty, chatty.nodes[0].host, "echo $SHLVL") == "1\n"
    assert await _run(quiet, quiet.nodes[0].host, "echo $HOME") == "/root\n"


def test_a_locked_root_account_is_named(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow"
    shadow.write_text("daemon:*:1::::::\nroot:!:19000:0:99999:7:::\n")
    assert "locked" in (root_login_problem(shadow) or "")
    shadow.write_text("root:*:19000:0:99999:7:::\n")
    assert root_login_problem(shadow) is None
    assert root_login_problem(tmp_path / "absent") is None
