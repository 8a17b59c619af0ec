"""The test bed itself: real sshd nodes answer, verify host keys, stop and come back."""

from __future__ import annotations

import asyncio
import os
import subprocess

import asyncssh
import pytest

from .sshd_cluster import SshdCluster


async def _run(cluster: SshdCluster, host: str, command: str, known_hosts: str | None = None,
               ) -> str:
    async with asyncssh.connect(host, port=cluster.port, username="root",
                                client_keys=[str(cluster.client_key)],
                                known_hosts=known_hosts or str(cluster.known_hosts),
                                config=[], connect_timeout=5) as conn:
        result = await conn.run(command, check=True)
        return str(result.stdout)


async def test_nodes_answer_with_verified_host_keys(sshd_cluster) -> None:
    cluster = sshd_cluster(count=3)
    outputs = await asyncio.gather(*(_run(cluster, n.host, "echo $SSH_CONNECTION; id -u")
                                     for n in cluster.nodes))
    for node, out in zip(cluster.nodes, outputs, strict=True):
        connection, uid = out.split("\n")[:2]
        assert connection.split()[2] == node.host
        assert uid == "0"


async def test_a_different_key_in_known_hosts_is_refused(sshd_cluster, tmp_path) -> None:
    cluster = sshd_cluster(count=1)
    node = cluster.nodes[0]
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                    str(tmp_path / "other")], check=True)
    other = " ".join((tmp_path / "other.pub").read_text().split()[:2])
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(f"[{node.host}]:{node.port} {other}\n")
    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        await _run(cluster, node.host, "true", known_hosts=str(wrong))


async def test_stop_and_restart_a_node(sshd_cluster) -> None:
    cluster = sshd_cluster(count=2)
    node = cluster.nodes[0]
    old_pid = node.pid
    cluster.stop_node(node.name)
    with pytest.raises(OSError):
        await _run(cluster, node.host, "true")
    assert await _run(cluster, cluster.nodes[1].host, "echo ok") == "ok\n"
    cluster.start_node(node.name)
    assert await _run(cluster, node.host, "echo back") == "back\n"
    cluster.stop()
    for pid in (old_pid, *[n.pid for n in cluster.nodes]):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_eight_nodes_in_parallel(sshd_cluster) -> None:
    cluster = sshd_cluster(count=8)
    outputs = await asyncio.gather(*(_run(cluster, n.host, "hostname") for n in cluster.nodes))
    assert len(outputs) == 8 and all(outputs)
