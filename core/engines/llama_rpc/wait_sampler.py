"""What the coordinator's decode loop is doing, sampled: computing, or waiting on a worker's
socket (and which one).

llama-server decodes on one thread (found as the one seen in a call on a worker's socket).
llama.cpp's RPC client sends each worker its part of the graph and blocks in a socket call on
that worker's connection until the answer is back. So, sampled a few hundred times a second,
that thread is either running (the coordinator's own compute), in a system call on worker W's
socket (W's compute plus W's link: the round trip, the bytes, any relay or queue on the way),
or somewhere else (idle, waiting for a request). /proc/PID/task/TID/syscall names the call and
its first argument (the file descriptor for socket calls); /proc/PID/fd and the process's
/proc/net/tcp map that descriptor to the worker's address. Reading it needs the right to trace
the process (the same user and kernel.yama.ptrace_scope 0, or root); without it `sample`
returns None.

It needs no protocol knowledge and sends nothing: a delay added anywhere between the two
(a relay, a queue, a slow network stack) shows as the time spent waiting on that worker."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

RUNNING = "running"  # the decode loop itself computes
HZ = 250.0  # samples a second
SOCKET = "socket:["


@dataclass(frozen=True)
class WaitProfile:
    """Samples of one window: per worker address the ones waiting on it, and the running."""

    waiting: dict[tuple[str, int], int]
    running: int
    other: int
    seconds: float
    tid: int  # the thread sampled

    @property
    def busy(self) -> int:
        return self.running + sum(self.waiting.values())


def _hex_address(text: str) -> tuple[str, int] | None:
    """/proc/net/tcp's "0100007F:C35A" (IPv4, host byte order per word) -> ("127.0.0.1", 50010);
    IPv6 likewise, IPv4-mapped addresses as IPv4."""
    addr, _, port = text.partition(":")
    try:
        raw = bytes.fromhex(addr)
        number = int(port, 16)
    except ValueError:
        return None
    words = [raw[i:i + 4][::-1] for i in range(0, len(raw), 4)]  # each 32-bit word reversed
    packed = b"".join(words)
    if len(packed) == 4:
        return ".".join(str(b) for b in packed), number
    if len(packed) == 16:
        ip = ipaddress.IPv6Address(packed)
        return (str(ip.ipv4_mapped) if ip.ipv4_mapped else str(ip)), number
    return None


def endpoint_addresses(endpoint: str) -> set[tuple[str, int]]:
    """The (ip, port) pairs an endpoint "host:port" may connect to (resolved here)."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit():
        return set()
    host = host.strip("[]")
    try:
        return {(str(ipaddress.ip_address(host)), int(port))}
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return set()
    return {(str(info[4][0]).split("%", 1)[0], int(port)) for info in infos}


def socket_peers(pid: int) -> dict[int, tuple[str, int]]:
    """fd -> the peer address of each TCP socket the process holds."""
    inodes: dict[str, int] = {}
    fd_dir = Path(f"/proc/{pid}/fd")
    for entry in os.listdir(fd_dir):
        try:
            target = os.readlink(fd_dir / entry)
        except OSError:
            continue
        if target.startswith(SOCKET) and entry.isdigit():
            inodes[target[len(SOCKET):-1]] = int(entry)
    peers: dict[int, tuple[str, int]] = {}
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[9] in inodes:
                peer = _hex_address(fields[2])
                if peer is not None:
                    peers[inodes[fields[9]]] = peer
    return peers


def _first_arg(text: str) -> int | None | str:
    """The syscall file's answer: RUNNING, the first argument of the call blocked in, or None
    (blocked outside a call)."""
    text = text.strip()
    if text == RUNNING:
        return RUNNING
    fields = text.split()
    if len(fields) < 2 or fields[0] == "-1":
        return None
    try:
        return int(fields[1], 16)
    except ValueError:
        return None


def _read(fd: int) -> int | None | str:
    return _first_arg(os.pread(fd, 512, 0).decode("ascii", "replace"))


def decode_thread(pid: int, sockets: set[int], seconds: float = 0.5) -> int | None:
    """The thread of `pid` seen in a call on one of `sockets` (the workers' connections):
    llama-server's decode loop (not necessarily its main thread). None if none was seen."""
    fds: dict[int, int] = {}
    try:
        for entry in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                fds[int(entry)] = os.open(f"/proc/{pid}/task/{entry}/syscall",
                                          os.O_RDONLY | os.O_CLOEXEC)
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            for tid, fd in fds.items():
                with contextlib.suppress(OSError):
                    if _read(fd) in sockets:
                        return tid
            time.sleep(0.001)
        return None
    except OSError:
        return None
    finally:
        for fd in fds.values():
            os.close(fd)


def sample(pid: int, seconds: float, workers: set[tuple[str, int]], *, hz: float = HZ,
           tid: int | None = None) -> WaitProfile | None:
    """Sample the decode thread (`tid`, else the thread found in a call on a connection to
    one of `workers`) for `seconds` (blocking: run it in a thread). None when the process is
    gone, no thread talks to a worker, or the syscall files cannot be read (no right to trace
    the process)."""
    try:
        peers = socket_peers(int(pid))
    except OSError:
        return None
    if tid is None:
        tid = decode_thread(int(pid), {fd for fd, peer in peers.items() if peer in workers})
    if tid is None:
        return None
    try:
        fd = os.open(f"/proc/{int(pid)}/task/{int(tid)}/syscall", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    counts: Counter[tuple[str, int] | str] = Counter()
    start = time.monotonic()
    try:
        while (now := time.monotonic()) - start < seconds:
            try:
                arg = _read(fd)
            except OSError:
                return None
            if arg == RUNNING:
                counts[RUNNING] += 1
            elif isinstance(arg, int) and arg in peers:
                counts[peers[arg]] += 1
            else:
                counts["other"] += 1
            time.sleep(max(0.0, 1 / hz - (time.monotonic() - now)))
    finally:
        os.close(fd)
    waiting = {key: n for key, n in counts.items() if isinstance(key, tuple)}
    return WaitProfile(waiting, counts[RUNNING], counts["other"], time.monotonic() - start,
                       int(tid))
