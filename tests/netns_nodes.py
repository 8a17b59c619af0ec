"""sshd nodes each in a network and a PID namespace of their own, as separate machines would be.

Node i lives in namespace `tzh<block>-node<i>`, reached from this machine over a veth pair:
this side 10.216.<block>.<4i+1>/30, the node 10.216.<block>.<4i+2>/30. Everything a node runs
(sshd, the sessions, the detached worker) is in its PID namespace, so a fault can hit exactly
that node: freeze() SIGSTOPs all of it (a machine deep in swap), link_down() cuts its cable,
shape() thins its link with tbf. Addresses exist only inside namespaces made here; stop()
removes them and every process.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
from pathlib import Path

import psutil

from tests.latency_relay import ThreadedRelay
from tests.sshd_cluster import SSHD, SshdCluster

_blocks = itertools.count((os.getpid() * 13) % 250)


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True)


class NamespacedNodes(SshdCluster):
    def __init__(self, workdir: Path, count: int, *, port: int = 2222,
                 start_timeout: float = 15.0) -> None:
        super().__init__(workdir, count, port=port, start_timeout=start_timeout, netns="-")
        self.block = next(_blocks) % 250
        tag = f"tzh{self.block}"
        self.namespaces = {name: f"{tag}-{name}" for name in self.names}
        self.veths = {name: (f"{tag}h{i}", f"{tag}n{i}") for i, name in enumerate(self.names)}
        self.hosts = [f"10.216.{self.block}.{4 * i + 2}" for i in range(count)]
        self._made: list[str] = []
        self._relays: list[ThreadedRelay] = []
        self._relayed: dict[str, list[ThreadedRelay]] = {}

    @property
    def _fence(self) -> str:
        return f"10.216.{self.block}.0/24"

    def start(self) -> None:
        try:
            # While a node's link is down its /30 route is gone: without this, packets for it
            # would follow this machine's default route out of the machine. An unreachable
            # route for the whole block keeps them here ("no route to host", a cut cable).
            _ip("route", "replace", "unreachable", self._fence)
            for i, name in enumerate(self.names):
                ns, (near, far) = self.namespaces[name], self.veths[name]
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
                _ip("netns", "add", ns)
                self._made.append(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("link", "add", near, "type", "veth", "peer", "name", far, "netns", ns)
                _ip("addr", "add", f"10.216.{self.block}.{4 * i + 1}/30", "dev", near)
                _ip("-n", ns, "addr", "add", f"{self.hosts[i]}/30", "dev", far)
                _ip("link", "set", near, "up")
                _ip("-n", ns, "link", "set", far, "up")
            super().start()
        except BaseException:
            self.stop()
            raise

    def _spawn(self, name: str, host: str) -> subprocess.Popen[bytes]:
        d = self.node_dir(name)
        with open(d / "sshd.stderr", "wb") as err:
            # unshare forks: its child, pid 1 of the node, execs sshd; /proc is the node's own.
            return subprocess.Popen(
                ["ip", "netns", "exec", self.namespaces[name], "unshare", "--pid", "--fork",
                 "--mount-proc", SSHD, "-D", "-f", str(d / "sshd_config"), "-E",
                 str(self.log_path(name))],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                start_new_session=True)

    # ---- the node's processes --------------------------------------------------------------

    def _init(self, name: str) -> psutil.Process:
        proc = self._procs[name]
        children = psutil.Process(proc.pid).children()
        if not children:
            raise RuntimeError(f"{name}: its sshd is not running")
        return children[0]

    def processes(self, name: str) -> list[psutil.Process]:
        """Every process in that node's PID namespace."""
        ns = os.readlink(f"/proc/{self._init(name).pid}/ns/pid")
        found = []
        for proc in psutil.process_iter():
            with contextlib.suppress(OSError, psutil.Error):
                if os.readlink(f"/proc/{proc.pid}/ns/pid") == ns:
                    found.append(proc)
        return found

    def host_pid(self, name: str, node_pid: int) -> int:
        """The pid on this machine of the node's process `node_pid` (as its pidfile says)."""
        for proc in self.processes(name):
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith("NSpid:") and int(line.split()[-1]) == node_pid:
                        return proc.pid
        raise LookupError(f"{name}: no process {node_pid}")

    def freeze(self, name: str) -> None:
        """SIGSTOP every process of the node (until none is left running)."""
        for _ in range(5):
            procs = self.processes(name)
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(signal.SIGSTOP)
            if all(p.status() == psutil.STATUS_STOPPED for p in self.processes(name)
                   if p.is_running()):
                return

    def thaw(self, name: str) -> None:
        for proc in self.processes(name):
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGCONT)

    # ---- the link --------------------------------------------------------------------------

    def link_down(self, name: str) -> None:
        _ip("link", "set", self.veths[name][0], "down")

    def link_up(self, name: str) -> None:
        _ip("link", "set", self.veths[name][0], "up")

    def shape(self, name: str, rate: str) -> None:
        """tbf `rate` both ways (this kernel has no netem)."""
        near, far = self.veths[name]
        for prefix in ([], ["-n", self.namespaces[name]]):
            dev = far if prefix else near
            subprocess.run(["tc", *prefix, "qdisc", "replace", "dev", dev, "root", "tbf",
                            "rate", rate, "burst", "32kb", "latency", "400ms"],
                           check=True, capture_output=True)

    def relay(self, name: str, delay_ms: float, rpc_port: int = 50052) -> dict[str, object]:
        """Put a ThreadedRelay (tests/latency_relay.py, `delay_ms` each way) in front of the
        node's sshd and its rpc-server port, on a loopback address of its own; returns the
        cluster-file keys that reach the node through it (ssh and the coordinator's RPC both
        cross the relay; the worker still binds the node's own address)."""
        i = self.names.index(name)
        address = f"127.77.{self.block}.{i + 2}"
        host = self.hosts[i]
        relays = [ThreadedRelay(address, (host, self.port), delay_ms=delay_ms).start(),
                  ThreadedRelay(address, (host, rpc_port), delay_ms=delay_ms,
                               listen_port=rpc_port).start()]
        self._relays.extend(relays)
        self._relayed[name] = relays
        pub = next(n.host_key_pub for n in self.nodes if n.name == name)
        with open(self.known_hosts, "a") as known:
            known.write(f"[{address}]:{relays[0].port} {pub}\n")
        return {"host": address, "ssh_port": relays[0].port, "rpc_port": rpc_port,
                "rpc_bind": host}

    def delay(self, name: str, delay_ms: float) -> None:
        """Change the added latency of the node's relays (relay() first) from now on."""
        for relay in self._relayed[name]:
            relay.delay = delay_ms / 1000.0

    def stop(self) -> None:
        for relay in self._relays:
            relay.stop()
        for name in self.names:
            with contextlib.suppress(Exception):
                self.thaw(name)
            with contextlib.suppress(Exception):
                self.link_up(name)
        super().stop()
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        subprocess.run(["ip", "route", "del", "unreachable", self._fence], capture_output=True,
                       check=False)
        self._made.clear()
