"""A small real cluster for tests: one OpenSSH sshd per node on 127.0.0.11, .12, ... with its
own host key, one client key authorized everywhere and a known_hosts file naming every node.

Never touches the system sshd or /etc/ssh: every daemon is a child of this harness, runs with
its own config under the work directory, listens on a loopback address only and is stopped by
pid (never by name). Commands run as root with the login shell, but without ~/.bashrc (see
`source_bashrc`), so a node answers a command in ~50 ms.

    cluster = SshdCluster(tmp_path, 3)
    cluster.start()
    ... asyncssh.connect(node.host, port=node.port, username="root",
                         client_keys=[str(cluster.client_key)],
                         known_hosts=str(cluster.known_hosts)) ...
    cluster.stop()
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
import weakref
from dataclasses import dataclass, replace
from pathlib import Path

import psutil

SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")


class SshdError(RuntimeError):
    """An sshd of the harness could not be started."""


class AddressInUse(SshdError):
    """Something else already listens on a node's address and port."""


@dataclass(frozen=True)
class SshNode:
    name: str  # "node1", ...
    host: str  # "127.0.0.11", ...
    port: int  # 2222 by default
    pid: int  # the listening sshd's pid
    host_key_pub: str  # "ssh-ed25519 AAAA..."


def root_login_problem(shadow: Path = Path("/etc/shadow")) -> str | None:
    """Why sshd (UsePAM no) would refuse root, or None. Only reads the file."""
    try:
        lines = shadow.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split(":")
        if fields[0] == "root" and len(fields) > 1 and fields[1].startswith("!"):
            return ("root's password is locked ('!' in /etc/shadow); with UsePAM no, sshd "
                    "refuses root as a locked account. A container image normally has '*' "
                    "there (usable for key logins): `usermod -p '*' root` on a throwaway box")
    return None


def login_user(shell: str, prefix: str = "torbiz-sh-") -> str:
    """The name of a local account whose login shell is `shell` (fish, zsh, dash, tcsh, ...),
    for key logins to the harness's nodes (which authorize cluster.client_key for every user).
    Made once with `useradd` and kept (the machine's /etc/passwd is not the harness's to clean):
    `<prefix><shell>`, a home directory of its own, a password field of '*' (a locked '!'
    account is refused by sshd without PAM)."""
    path = shutil.which(shell)
    if path is None:
        raise SshdError(f"{shell} missing: apt-get install {shell}")
    name = prefix + Path(path).name
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        made = subprocess.run(["useradd", "--create-home", "--shell", path, name],
                              capture_output=True, text=True)
        try:
            entry = pwd.getpwnam(name)  # another test run may have made it meanwhile
        except KeyError:
            raise SshdError(f"useradd {name} failed: {made.stderr.strip()}") from None
    if entry.pw_shell != path:
        subprocess.run(["usermod", "--shell", path, name], check=True, capture_output=True)
    subprocess.run(["usermod", "-p", "*", name], check=True, capture_output=True)
    return name


def _quote(value: object) -> str:
    text = str(value)
    if '"' in text or "\n" in text:
        raise ValueError(f"cannot put {text!r} into an sshd_config")
    return f'"{text}"' if any(c.isspace() for c in text) else text


def _keygen_all(paths: list[Path]) -> None:
    """Generate the missing ed25519 keys (no passphrase), all at once."""
    procs = [(path, subprocess.Popen(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(path)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        for path in paths if not path.exists()]
    failed = []
    for path, proc in procs:
        out, _ = proc.communicate(timeout=30)
        if proc.returncode != 0:
            failed.append(f"{path}: {out.decode(errors='replace').strip()}")
    if failed:
        raise SshdError("ssh-keygen failed: " + "; ".join(failed))


def _check_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as sshd does
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AddressInUse(f"{host}:{port} is already in use (another sshd or "
                                   f"service listens there); pick another address") from None
            raise SshdError(f"cannot bind {host}:{port}: {exc.strerror}") from None


def _banner(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            return sock.recv(64).startswith(b"SSH-2.0")
    except OSError:
        return False


def _listens(pid: int, host: str, port: int) -> bool:
    """Whether process `pid` itself holds the listening socket (not some other sshd)."""
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp4")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return any(c.status == psutil.CONN_LISTEN and tuple(c.laddr) == (host, port)
               for c in conns)


def _listens_in_netns(pid: int, host: str, port: int) -> bool:
    """Whether a socket listens on host:port in the network namespace of process `pid`."""
    want = f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"
    try:
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(f[1] == want and f[3] == "0A" for f in (line.split() for line in lines))


_live: weakref.WeakSet[SshdCluster] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:  # a run that ends without teardown still leaves no daemon
    for cluster in list(_live):
        with contextlib.suppress(Exception):
            cluster.stop()


class SshdCluster:
    """`count` sshd nodes on {prefix}.{first_octet}, {prefix}.{first_octet + 1}, ... :port."""

    def __init__(self, workdir: Path, count: int, *, first_octet: int = 11, port: int = 2222,
                 prefix: str = "127.0.0", start_timeout: float = 15.0,
                 source_bashrc: bool = False, netns: str | None = None) -> None:
        """`netns`: run every sshd inside that (existing) network namespace, so every process
        a session starts is in it too; clients must then run there as well."""
        if count < 1:
            raise ValueError("a cluster needs at least one node")
        if not 1 <= first_octet <= 254 - count + 1:
            raise ValueError("addresses must stay within the /24 (last octet 1..254)")
        parts = prefix.split(".")
        if (len(parts) != 3 or parts[0] != "127"
                or not all(p.isdigit() and int(p) <= 255 for p in parts)):
            raise ValueError(f"prefix {prefix!r} is not 127.x.y: nodes listen on loopback only")
        self.root = Path(workdir)
        self.count = count
        self.port = port
        self.start_timeout = start_timeout
        self.source_bashrc = source_bashrc
        self.netns = netns
        self.hosts = [f"{prefix}.{first_octet + i}" for i in range(count)]
        self.names = [f"node{i + 1}" for i in range(count)]
        self.client_key = self.root / "client_key"
        self.known_hosts = self.root / "known_hosts"
        self.authorized_keys = self.root / "authorized_keys"
        self.nodes: list[SshNode] = []
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        # Per-connection sshd processes left behind by a listener we stopped: stop() ends them.
        self._orphans: list[psutil.Process] = []
        # Other logins than root read their keys from their home (sshd reads them as that user,
        # who cannot read this harness's directory): a file named for this cluster only.
        self.user_keys_name = f"authorized_keys.torbiz-{os.getpid()}-{id(self):x}"
        self._user_key_files: list[Path] = []

    # ---- paths -------------------------------------------------------------------------------

    def node_dir(self, name: str) -> Path:
        return self.root / name

    def log_path(self, name: str) -> Path:
        return self.node_dir(name) / "sshd.log"

    def log_tail(self, name: str, chars: int = 1500) -> str:
        parts = []
        for path in (self.node_dir(name) / "sshd.stderr", self.log_path(name)):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").strip()
                if text:
                    parts.append(text[-chars:])
        return "\n".join(parts) or "(sshd wrote nothing)"

    def node(self, name: str) -> SshNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node {name!r}; nodes are {', '.join(self.names)}")

    def pids(self) -> list[int]:
        """Pids of the listeners running now."""
        return [p.pid for p in self._procs.values() if p.poll() is None]

    # ---- start -------------------------------------------------------------------------------

    def _write_config(self, name: str, host: str) -> None:
        d = self.node_dir(name)
        lines = [
            f"ListenAddress {host}:{self.port}",
            f"HostKey {_quote(d / 'host_key')}",
            f"PidFile {_quote(d / 'sshd.pid')}",
            f"AuthorizedKeysFile {_quote(self.authorized_keys)} .ssh/{self.user_keys_name}",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
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
            "PrintLastLog no",
        ]
        if not self.source_bashrc:
            # The `bash -c` sshd starts reads ~/.bashrc only as the first shell level; handed
            # SHLVL=1 it becomes level 2 and skips it. That keeps the login user's interactive
            # setup (here pyenv init: ~100 processes, 0.3-1.5 s per command, "cannot rehash"
            # races on stderr) out of every command. HOME, PATH and cwd are unchanged.
            lines.append("SetEnv SHLVL=1")
        (d / "sshd_config").write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, host: str) -> subprocess.Popen[bytes]:
        # `ip netns exec` execs sshd: the pid is the daemon's own.
        wrap = ["ip", "netns", "exec", self.netns] if self.netns else []
        if not self.netns:
            _check_free(host, self.port)
        d = self.node_dir(name)
        with open(d / "sshd.stderr", "wb") as err:
            return subprocess.Popen(
                [*wrap, SSHD, "-D", "-f", str(d / "sshd_config"), "-E",
                 str(self.log_path(name))],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                start_new_session=True)

    def _ready(self, name: str, host: str, proc: subprocess.Popen[bytes]) -> bool:
        if proc.poll() is not None:
            tail = self.log_tail(name)
            kind = AddressInUse if "Address already in use" in tail else SshdError
            raise kind(f"sshd for {name} on {host}:{self.port} exited with code "
                       f"{proc.returncode}:\n{tail}")
        if self.netns:  # this process cannot connect into the namespace: ask its /proc
            return _listens_in_netns(proc.pid, host, self.port)
        return _listens(proc.pid, host, self.port) and _banner(host, self.port, 0.5)

    def _wait(self, pending: dict[str, tuple[str, subprocess.Popen[bytes]]]) -> None:
        deadline = time.monotonic() + self.start_timeout
        waiting = dict(pending)
        while waiting:
            for name, (host, proc) in list(waiting.items()):
                if self._ready(name, host, proc):
                    del waiting[name]
            if not waiting:
                return
            if time.monotonic() > deadline:
                name, (host, _) = next(iter(waiting.items()))
                raise SshdError(f"sshd for {name} on {host}:{self.port} gave no SSH banner "
                                f"within {self.start_timeout:g}s:\n{self.log_tail(name)}")
            time.sleep(0.02)

    def start(self) -> None:
        """Generate keys, write configs, start every sshd and wait until each says SSH-2.0."""
        if self._procs:
            raise SshdError("this cluster is already started")
        if not os.access(SSHD, os.X_OK):
            raise SshdError(f"{SSHD} missing: apt-get install openssh-server")
        problem = root_login_problem()
        if problem:
            raise SshdError(problem)
        self.root.mkdir(parents=True, exist_ok=True)
        PRIVSEP_DIR.mkdir(parents=True, exist_ok=True)  # sshd refuses to start without it
        for name in self.names:
            self.node_dir(name).mkdir(exist_ok=True)
        _keygen_all([self.client_key] + [self.node_dir(n) / "host_key" for n in self.names])
        self.authorized_keys.write_text(self.client_key.with_suffix(".pub").read_text())
        self.authorized_keys.chmod(0o600)
        pubs = {}
        for name, host in zip(self.names, self.hosts, strict=True):
            self._write_config(name, host)
            key = (self.node_dir(name) / "host_key.pub").read_text().split()
            pubs[name] = f"{key[0]} {key[1]}"
        self.known_hosts.write_text("".join(f"[{host}]:{self.port} {pubs[name]}\n"
                                            for name, host in zip(self.names, self.hosts,
                                                                  strict=True)))
        _live.add(self)
        pending: dict[str, tuple[str, subprocess.Popen[bytes]]] = {}
        try:
            for name, host in zip(self.names, self.hosts, strict=True):
                pending[name] = (host, self._spawn(name, host))
                self._procs[name] = pending[name][1]
            self._wait(pending)
        except BaseException:
            self.stop()
            raise
        self.nodes = [SshNode(name, host, self.port, pending[name][1].pid, pubs[name])
                      for name, host in zip(self.names, self.hosts, strict=True)]

    # ---- faults ------------------------------------------------------------------------------

    def stop_node(self, name: str, *, drop_connections: bool = False) -> None:
        """Kill that node's sshd (SIGTERM, wait, SIGKILL): new connections are refused.

        Like a restarted sshd, established sessions live on unless `drop_connections` (a
        crashed node); stop() ends them at the latest. Only sshd processes get signals.
        """
        if name not in self.names:
            raise KeyError(f"no node {name!r}; nodes are {', '.join(self.names)}")
        proc = self._procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        # Frozen, the listener forks no session between listing its children and its death.
        os.kill(proc.pid, signal.SIGSTOP)
        children: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            children = psutil.Process(proc.pid).children()  # one sshd per connection
        # The listener's own process group (start_new_session): its pid is the group id.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
                os.killpg(proc.pid, signal.SIGCONT)
            try:
                proc.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
        if drop_connections:
            _end(children)
        else:
            self._orphans.extend(children)

    def start_node(self, name: str) -> None:
        """Start that node's sshd again, same address and host key; no-op if it runs."""
        node = self.node(name)
        running = self._procs.get(name)
        if running is not None and running.poll() is None:
            return
        proc = self._spawn(name, node.host)
        self._procs[name] = proc
        try:
            self._wait({name: (node.host, proc)})
        except BaseException:
            self.stop_node(name)
            raise
        self.nodes = [replace(n, pid=proc.pid) if n.name == name else n for n in self.nodes]

    def stop(self) -> None:
        """Stop every sshd this harness started, sessions included, by pid. Idempotent."""
        for name in list(self._procs):
            self.stop_node(name, drop_connections=True)
        orphans, self._orphans = self._orphans, []
        _end(orphans)  # sessions left by listeners stopped with stop_node()
        for path in self._user_key_files:
            with contextlib.suppress(OSError):
                path.unlink()
        self._user_key_files = []
        _live.discard(self)

    def authorize(self, user: str) -> None:
        """Let `user` (e.g. from login_user()) log in to every node with client_key."""
        entry = pwd.getpwnam(user)
        ssh_dir = Path(entry.pw_dir) / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        os.chown(ssh_dir, entry.pw_uid, entry.pw_gid)
        path = ssh_dir / self.user_keys_name
        path.write_text(self.client_key.with_suffix(".pub").read_text())
        os.chown(path, entry.pw_uid, entry.pw_gid)
        path.chmod(0o600)
        self._user_key_files.append(path)

    # ---- clients -----------------------------------------------------------------------------

    def ssh_config_text(self, user: str = "root") -> str:
        """An ssh_config with one `Host nodeN` block per node (OpenSSH and asyncssh)."""
        blocks = []
        for name, host in zip(self.names, self.hosts, strict=True):
            blocks.append("\n".join([
                f"Host {name}",
                f"  HostName {host}",
                f"  Port {self.port}",
                f"  User {user}",
                f"  IdentityFile {_quote(self.client_key)}",
                "  IdentitiesOnly yes",
                f"  UserKnownHostsFile {_quote(self.known_hosts)}",
                "  GlobalKnownHostsFile /dev/null",
                "  StrictHostKeyChecking yes",
            ]))
        return "\n\n".join(blocks) + "\n"


def _gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE  # dead, only waiting for its reaper
    except psutil.NoSuchProcess:
        return True


def _end(procs: list[psutil.Process], timeout: float = 3.0) -> None:
    """SIGTERM, wait, SIGKILL; psutil refuses a pid that was reused meanwhile.

    A zombie counts as ended: orphans are reaped by pid 1, which may take its time (about a
    second in some containers).
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
        deadline = time.monotonic() + timeout
        while procs and time.monotonic() < deadline:
            procs = [p for p in procs if not _gone(p)]
            if procs:
                time.sleep(0.01)
        if not procs:
            return
