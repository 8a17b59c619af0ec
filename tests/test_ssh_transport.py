"""The SSH transport against real sshd nodes: ~/.ssh/config is honoured, one connection per
node carries every command, a frozen node times out with a sentence."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
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


async def test_a_passphrase_protected_key_falls_back_to_ssh_agent(
        tmp_path: Path, sshd_cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """torbiz never asks for a passphrase: with no agent that is a sentence (it was asyncssh's
    KeyImportError, a traceback); with an agent holding the key the login goes through it and
    says so; with an agent without it the refusal names the fallback."""
    sshd = sshd_cluster(count=1)
    node = sshd.nodes[0]
    locked = tmp_path / "locked_key"
    shutil.copy(sshd.client_key, locked)
    locked.chmod(0o600)
    subprocess.run(["ssh-keygen", "-q", "-p", "-P", "", "-N", "a secret phrase", "-f",
                    str(locked)], check=True, capture_output=True)

    def transport() -> SshTransport:
        return SshTransport(NodeConfig(
            name="n", host=node.host, ssh_port=node.port,
            ssh=SshOptions(user="root", identity_file=str(locked),
                           known_hosts=str(sshd.known_hosts), config_file=None)))

    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    with pytest.raises(TransportError) as info:
        await transport().run("true")
    assert info.value.kind == "auth"
    assert f"identity_file {locked} is protected by a passphrase, which torbiz never asks " \
           "for, and no ssh-agent is running" in info.value.reason

    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        subprocess.run(["ssh-add", "-q", str(sshd.client_key)], env=env, check=True,
                       capture_output=True)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        through_agent = transport()
        try:
            result = await through_agent.run("id -un")
        finally:
            await through_agent.close()
        assert result.ok and result.stdout.strip() == "root"
        assert through_agent.key_note.startswith(f"identity_file {locked} is protected by a "
                                                 "passphrase")
        assert "the keys in ssh-agent are used instead" in through_agent.key_note

        subprocess.run(["ssh-add", "-D"], env=env, check=True, capture_output=True)
        with pytest.raises(TransportError) as info:
            await transport().run("true")
        assert info.value.kind == "auth"
        assert "was refused" in info.value.reason
        assert "the keys in ssh-agent are used instead" in info.value.reason
    finally:
        agent.terminate()
        agent.wait(10)


async def test_an_identity_file_that_is_missing_or_no_key_is_a_sentence(tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("")
    garbage = tmp_path / "not_a_key"
    garbage.write_text("hello\n")
    for path, words in ((tmp_path / "absent", "cannot be read (No such file or directory)"),
                        (garbage, "is not a private key torbiz can read")):
        transport = SshTransport(NodeConfig(
            name="n", host="127.0.0.1", ssh_port=1,
            ssh=SshOptions(identity_file=str(path), known_hosts=str(known), config_file=None)))
        with pytest.raises(TransportError) as info:
            await transport.run("true")
        assert info.value.kind == "auth" and words in info.value.reason, info.value.reason


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
