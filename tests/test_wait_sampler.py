"""The decode-loop sampler and the share arithmetic, on real processes and sockets: a child
blocked in recv on a connection to a listener here is seen waiting on that address; a busy
child is seen running; the split puts a worker's wait beyond its compute on its link."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from core.engines.llama_rpc import wait_sampler
from core.supervision.bottleneck import Bottleneck, PartShare, split, token_seconds

CHILD = """
import socket, sys, threading, time
peer = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
def spin():
    end = time.monotonic() + 30
    while time.monotonic() < end:
        pass
if sys.argv[2] == "wait":
    peer.recv(1)          # blocks: the listener never answers
else:
    threading.Thread(target=lambda: time.sleep(30), daemon=True).start()
    spin()
"""


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    yield server
    server.close()


def child(port: int, mode: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(port), mode])


def test_a_thread_blocked_on_a_workers_socket_is_seen_waiting_on_it(
        listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    proc = child(port, "wait")
    try:
        conn, _ = listener.accept()
        time.sleep(0.3)  # into its recv
        profile = wait_sampler.sample(proc.pid, 0.4, {("127.0.0.1", port)})
        assert profile is not None
        assert profile.waiting == {("127.0.0.1", port): profile.busy} and profile.busy > 20
        assert profile.running == 0
        # A worker address nobody talks to finds no decode thread.
        assert wait_sampler.sample(proc.pid, 0.2, {("127.0.0.1", 1)}) is None
        conn.close()
    finally:
        proc.kill()
        proc.wait()


def test_a_running_thread_counts_as_the_coordinators_own_compute(
        listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    proc = child(port, "spin")
    try:
        conn, _ = listener.accept()
        time.sleep(0.2)
        profile = wait_sampler.sample(proc.pid, 0.4, set(), tid=proc.pid)
        assert profile is not None and profile.tid == proc.pid
        assert profile.running > 0.8 * (profile.running + profile.other)  # it spins
        assert profile.waiting == {}
        conn.close()
    finally:
        proc.kill()
        proc.wait()
    assert wait_sampler.sample(proc.pid, 0.1, set(), tid=proc.pid) is None  # gone


def test_socket_peers_maps_descriptors_to_addresses(listener: socket.socket) -> None:
    import os

    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    try:
        peers = wait_sampler.socket_peers(os.getpid())
        assert peers[client.fileno()] == ("127.0.0.1", port)
    finally:
        client.close()


def test_hex_addresses_of_proc_net_tcp() -> None:
    assert wait_sampler._hex_address("0100007F:C35A") == ("127.0.0.1", 50010)
    assert wait_sampler._hex_address("0000000000000000FFFF00000100007F:1F90") == \
        ("127.0.0.1", 8080)
    assert wait_sampler._hex_address("zz:1") is None


def test_the_split_puts_the_wait_beyond_compute_on_the_link() -> None:
    token = token_seconds(20.0, 1, None)
    assert token == (0.05, "running")
    found = split(token, [("a", 4), ("b", 4)], {"a": 0.1, "b": 0.8}, coordinator=0.1,
                  busy=1.0, cpu={"a": 0.1, "b": 0.05})
    parts = {p.node: p for p in found.parts}
    assert parts["b"].compute_s == pytest.approx(0.0025) and \
        parts["b"].link_s == pytest.approx(0.0375)
    assert parts["a"].compute_s == pytest.approx(0.005) and parts["a"].link_s == 0.0
    assert found.slowest is not None and found.slowest.node == "b"
    assert found.cell("b") == "80% c5 l75 ◀" and found.cell("a") == "10% c10 l0"
    assert found.cell("nobody") == "-"
    # A worker whose CPU could not be read: its wait is shown, its split is not guessed.
    blind = split(token, [("a", 4)], {"a": 0.5}, coordinator=0.5, busy=1.0, cpu={"a": None})
    assert blind.unmeasured == ("a",) and blind.cell("a").startswith("50% c? l?")
    # Several requests decode in one batch per step: each one's token time is the step's.
    assert token_seconds(40.0, 4, None) == (0.1, "running")
    assert token_seconds(0.0, 0, 25.0) == (0.04, "last request")
    assert token_seconds(0.0, 0, None) is None


def test_the_json_and_the_sentence() -> None:
    found = Bottleneck(0.04, "running", (PartShare("coordinator", None, 0.004, 0.0, 0.1),
                                         PartShare("x", 8, 0.01, 0.02, 0.75)))
    assert found.sentence() == "slowest: x, 75% of each 40.0 ms token (compute 25%, link 50%)"
    data = found.to_json()
    assert data["slowest"] == "x" and data["nodes"][1]["link_s"] == 0.02
