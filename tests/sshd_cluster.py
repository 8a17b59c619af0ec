"""A small real cluster for tests: one OpenSSH sshd per node on 127.0.0.11, .12, ... with its
own host key, one client key authorized everywhere and a known_hosts file naming every node.

Never touches the system sshd or /etc/ssh; every daemon is a child of this harness, stopped by
pid.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"


@dataclass(frozen=True)
class SshNode:
    name: str
    host: str
    port: int
    pid: int
    host_key_pub: str


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL)


def _banner(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            return sock.recv(64).startswith(b"SSH-2.0")
    except OSError:
        return False


class SshdCluster:
    def __init__(self, workdir: Path, count: int, *, first_octet: int = 11, port: int = 2222,
                 prefix: str = "127.0.0") -> None:
        if not 1 <= first_octet <= 254 - count + 1:
            raise ValueError("addresses must stay within the /24")
        self.root = Path(workdir)
        self.count = count
        self.port = port
        self.hosts = [f"{prefix}.{first_octet + i}" for i in range(count)]
        self.client_key = self.root / "client_key"
        self.known_hosts = self.root / "known_hosts"
        self.authorized_keys = self.root / "authorized_keys"
        self.nodes: list[SshNode] = []
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def _node_dir(self, name: str) -> Path:
        return self.root / name

    def _write_config(self, name: str, host: str) -> Path:
        d = self._node_dir(name)
        config = d / "sshd_config"
        config.write_text("\n".join([
            f"ListenAddress {host}:{self.port}",
            f"HostKey {d / 'host_key'}",
            f"PidFile {d / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "AllowTcpForwarding yes",
            "Subsystem sftp internal-sftp",
            "LogLevel VERBOSE",
            "MaxStartups 100:30:200",
            "MaxSessions 100",
            "ClientAliveInterval 0",
            "UseDNS no",
            "PrintMotd no",
        ]) + "\n")
        return config

    def _spawn(self, name: str, host: str) -> subprocess.Popen[bytes]:
        d = self._node_dir(name)
        if _banner(host, self.port, 0.2):
            raise RuntimeError(f"{host}:{self.port} already answers SSH: another sshd holds it")
        return subprocess.Popen(
            [SSHD, "-D", "-f", str(d / "sshd_config"), "-E", str(d / "sshd.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)

    def _wait_banner(self, name: str, host: str, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if _banner(host, self.port, 0.5):
                return
            time.sleep(0.05)
        log = (self._node_dir(name) / "sshd.log")
        tail = log.read_text(errors="replace")[-800:] if log.exists() else ""
        raise RuntimeError(f"sshd for {name} on {host}:{self.port} did not come up:\n{tail}")

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation dir
        if not self.client_key.exists():
            _keygen(self.client_key)
        self.authorized_keys.write_text(self.client_key.with_suffix(".pub").read_text())
        self.authorized_keys.chmod(0o600)
        known = []
        pending = []
        for i, host in enumerate(self.hosts):
            name = f"node{i + 1}"
            d = self._node_dir(name)
            d.mkdir(exist_ok=True)
            if not (d / "host_key").exists():
                _keygen(d / "host_key")
            self._write_config(name, host)
            pub = " ".join((d / "host_key.pub").read_text().split()[:2])
            known.append(f"[{host}]:{self.port} {pub}")
            pending.append((name, host, pub, self._spawn(name, host)))
        self.known_hosts.write_text("\n".join(known) + "\n")
        for name, _host, _pub, proc in pending:
            self._procs[name] = proc
        try:
            for name, host, _pub, proc in pending:
                self._wait_banner(name, host, proc)
        except Exception:
            self.stop()
            raise
        self.nodes = [SshNode(name, host, self.port, proc.pid, pub)
                      for name, host, pub, proc in pending]

    def _node(self, name: str) -> SshNode:
        return next(n for n in self.nodes if n.name == name)

    def stop_node(self, name: str) -> None:
        proc = self._procs.pop(name, None)
        if proc is None:
            return
        # The whole session: the listener and any per-connection children it forked.
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue

    def start_node(self, name: str) -> None:
        node = self._node(name)
        proc = self._spawn(name, node.host)
        self._procs[name] = proc
        self._wait_banner(name, node.host, proc)
        self.nodes = [SshNode(n.name, n.host, n.port, proc.pid, n.host_key_pub)
                      if n.name == name else n for n in self.nodes]

    def stop(self) -> None:
        for name in list(self._procs):
            self.stop_node(name)

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs.values()]
