"""Hung, cut-off and slow nodes on real machines-in-namespaces: each node is an sshd in a
network and a PID namespace of its own (tests/netns_nodes.py) running a real rpc-server, with a
real llama-server here, supervised with recovery on.

A frozen node (every process SIGSTOPped) or a cut link must be `not responding` within 5 s,
the cluster must serve again within 10 s of that without it, a stream in flight must end
instead of hanging, and when the node is back its worker is the same process, left out of the
plan until a rebalance."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from core import operations
from core.cluster import Cluster
from core.config import load_config
from core.demo_model import ensure_demo_model
from core.engines.llama_rpc.build import find_cached_binary
from core.status import NOT_RESPONDING, READY
from core.supervision.recovery_record import RECOVERED
from tests.cluster_files import ssh_cluster_file
from tests.netns_nodes import NamespacedNodes
from tests.sshd_cluster import SSHD
from tests.test_faults import Supervised, _completion, _stream, _until, plan_and_up

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _binaries() -> None:
    if not (find_cached_binary("ggml-rpc-server") and find_cached_binary("llama-server")):
        pytest.skip("llama.cpp binaries not built: run `torbiz-tui build-llama`")
    if os.geteuid() != 0 or not os.access(SSHD, os.X_OK):
        pytest.skip("needs root and sshd (network and PID namespaces)")


@pytest.fixture
async def hung(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    made: list[tuple[Supervised, NamespacedNodes]] = []

    async def make(count: int = 3) -> tuple[Supervised, NamespacedNodes]:
        nodes = NamespacedNodes(tmp_path / "nodes", count)
        nodes.start()
        model = ensure_demo_model(tmp_path / "demo.gguf")
        cluster = Cluster(load_config(ssh_cluster_file(tmp_path, nodes, model, name="hung")))
        s = Supervised(cluster, nodes)
        s.supervisor.interval = 0.5
        made.append((s, nodes))
        await plan_and_up(cluster)
        return s, nodes

    try:
        yield make
    finally:
        for s, nodes in made:
            await s.stop()
            for name in nodes.names:
                nodes.thaw(name)
                nodes.link_up(name)
            await s.cluster.close()
            await s.cluster.down()
            await s.cluster.close()
            nodes.stop()


def _first(s: Supervised, part: str, since: float) -> float:
    hits = [d for d in s.detections if d.part == part and d.at >= since]
    assert hits, [(d.part, d.state, d.reason) for d in s.detections]
    return hits[0].at


async def test_frozen_node_mid_stream_is_left_out_within_seconds_and_comes_back(hung) -> None:
    s, nodes = await hung(3)
    cluster = s.cluster
    pid = cluster.nodes["node2"].pid
    s.start()
    first = asyncio.Event()
    stream = asyncio.create_task(_stream(s.url, first))
    await asyncio.wait_for(first.wait(), 30)
    frozen = time.monotonic()
    nodes.freeze("node2")

    await _until(lambda: cluster.nodes["node2"].state == NOT_RESPONDING
                 and any(d.part == "node2" for d in s.detections), 5.5,
                 "not responding, detected")
    detected = _first(s, "node2", frozen)
    assert detected - frozen <= 5.0
    seen: set[str] = set()
    sampler = asyncio.create_task(_sample(lambda: cluster.nodes["node2"].state, seen))
    ended = await asyncio.wait_for(stream, 15)  # never hangs on the silent worker
    assert ended != "done", ended
    await _until(lambda: bool(s.recoveries), 20, "recovery")
    result = s.recoveries[0]
    assert result.outcome == RECOVERED, result.reason
    assert "node2" in result.lost and "node2" not in result.workers
    assert result.recovered_after is not None and result.recovered_after <= 10.0
    assert await _completion(s.url)
    await asyncio.sleep(6)  # past the connect timeout and a reconnect or two, still frozen
    sampler.cancel()
    assert seen == {NOT_RESPONDING}, seen  # silent: never unreachable nor failed

    nodes.thaw("node2")
    await _until(lambda: cluster.nodes["node2"].state == READY, 20, "back")
    # The same worker reattached, or (rpc-server dies of SIGPIPE writing to the coordinator
    # that was killed while it was frozen) restarted, and said so.
    restarted = any("node2 is back but its worker died" in n.text for n in s.notices)
    assert cluster.nodes["node2"].pid == pid or restarted
    await _until(lambda: any("node2 is back" in n.text for n in s.notices), 5, "told")
    assert "node2" not in {sh.node for sh in await cluster.engine.layer_shares()
                           if sh.layers}  # not pulled back in by itself
    await s.stop()
    await operations.rebalance(cluster)
    assert "node2" in {sh.node for sh in await cluster.engine.layer_shares()
                       if sh.planned_layers}
    assert await _completion(s.url)


async def test_frozen_idle_node_is_not_responding_not_unreachable(hung) -> None:
    s, nodes = await hung(2)
    cluster = s.cluster
    s.start()
    await asyncio.sleep(1)
    frozen = time.monotonic()
    nodes.freeze("node1")
    await _until(lambda: cluster.nodes["node1"].state == NOT_RESPONDING
                 and any(d.part == "node1" for d in s.detections), 5.5,
                 "not responding, detected")
    assert _first(s, "node1", frozen) - frozen <= 5.0
    assert "unreachable" not in cluster.nodes["node1"].state
    await _until(lambda: bool(s.recoveries), 20, "recovery")
    assert s.recoveries[0].outcome == RECOVERED, s.recoveries[0].reason
    assert s.recoveries[0].recovered_after is not None
    assert s.recoveries[0].recovered_after <= 10.0
    assert await _completion(s.url)
    seen: set[str] = set()
    await _sample(lambda: cluster.nodes["node1"].state, seen, 8.0)
    assert seen == {NOT_RESPONDING}, seen  # frozen is silent: never unreachable


async def _sample(state: Callable[[], str], seen: set[str], seconds: float = 1e9) -> None:
    """Every state the node shows, five times a second, for `seconds` (or until cancelled)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen.add(state())
        await asyncio.sleep(0.2)


async def test_link_down_is_not_responding_and_heals(hung) -> None:
    s, nodes = await hung(3)
    cluster = s.cluster
    pid = cluster.nodes["node3"].pid
    s.start()
    await asyncio.sleep(1)
    cut = time.monotonic()
    nodes.link_down("node3")
    await _until(lambda: cluster.nodes["node3"].state == NOT_RESPONDING
                 and any(d.part == "node3" for d in s.detections), 5.5,
                 "not responding, detected")
    assert _first(s, "node3", cut) - cut <= 5.0
    await _until(lambda: bool(s.recoveries), 20, "recovery")
    assert s.recoveries[0].outcome == RECOVERED, s.recoveries[0].reason
    assert await _completion(s.url)
    # While the cable stays out, reconnects go nowhere: the node stays `not responding` (a
    # silent node), never `unreachable` (which says something refused us).
    seen = {}
    for _ in range(40):  # 8 s: past the connect timeout and a reconnect or two
        seen[cluster.nodes["node3"].state] = cluster.nodes["node3"].error
        await asyncio.sleep(0.2)
    assert set(seen) == {NOT_RESPONDING}, seen
    nodes.link_up("node3")
    await _until(lambda: cluster.nodes["node3"].state == READY, 25, "back")
    await _until(lambda: any("node3 is back" in n.text for n in s.notices), 5, "told")
    restarted = any("node3 is back but its worker died" in n.text for n in s.notices)
    assert cluster.nodes["node3"].pid == pid or restarted


async def test_stopped_worker_alone_stalls_the_decode_and_is_not_responding(hung) -> None:
    """Only node2's rpc-server is SIGSTOPped: its sshd answers, the status check says the
    process runs and listens; the stalled decode (a busy slot that stops moving) is what
    finds it."""
    s, nodes = await hung(3)
    cluster = s.cluster
    worker = psutil.Process(nodes.host_pid("node2", cluster.nodes["node2"].pid or 0))
    assert "rpc-server" in worker.name(), worker.cmdline()
    s.start()
    first = asyncio.Event()
    stream = asyncio.create_task(_stream(s.url, first))
    await asyncio.wait_for(first.wait(), 30)
    stopped = time.monotonic()
    worker.send_signal(signal.SIGSTOP)
    try:
        await _until(lambda: cluster.nodes["node2"].state == NOT_RESPONDING, 8,
                     "not responding")
        await _until(lambda: any(d.part == "node2" for d in s.detections), 2, "detection")
        detection = next(d for d in s.detections if d.part == "node2" and d.at >= stopped)
        print(f"node2 detected after {detection.at - stopped:.2f} s: {detection.reason}")
        assert detection.at - stopped <= 5.0
        assert "is stopped" in detection.reason and "request" in detection.reason
        assert all(st.state != NOT_RESPONDING for n, st in cluster.nodes.items() if n != "node2")
        ended = await asyncio.wait_for(stream, 15)
        assert ended != "done", ended
        await _until(lambda: bool(s.recoveries), 20, "recovery")
        assert s.recoveries[0].outcome == RECOVERED, s.recoveries[0].reason
        assert "node2" in s.recoveries[0].lost
        assert await _completion(s.url)
        # It stays `not responding` while its process stays stopped, though SSH answers.
        await asyncio.sleep(2)
        assert cluster.nodes["node2"].state == NOT_RESPONDING
    finally:
        worker.send_signal(signal.SIGCONT)
    await _until(lambda: cluster.nodes["node2"].state == READY, 20, "back")
