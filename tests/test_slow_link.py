"""A slow node on real parts: node1 an sshd in network + PID namespaces of its own behind a
thin link (tbf) and a latency relay (tests/latency_relay.py) that both its SSH and the
coordinator's RPC to its rpc-server cross; a real llama-server serves through it.

It answers, slowly: the table shows `slow` with its RTT, never `not responding`, `unreachable`
or `failed`, nothing recovers it away, and requests keep being served through it."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from core.cluster import Cluster
from core.config import load_config
from core.demo_model import ensure_demo_model
from core.engines.llama_rpc.build import find_cached_binary
from core.status import FAILED, NOT_RESPONDING, UNREACHABLE
from core.status_text import SLOW, node_state_text
from tests.cluster_files import ssh_cluster_file
from tests.netns_nodes import NamespacedNodes
from tests.sshd_cluster import SSHD
from tests.test_faults import Supervised, _completion, plan_and_up

pytestmark = pytest.mark.integration

DELAY_MS = 50  # each way: 100 ms more per round trip
RATE = "1mbit"


@pytest.fixture(autouse=True)
def _binaries() -> None:
    if not (find_cached_binary("ggml-rpc-server") and find_cached_binary("llama-server")):
        pytest.skip("llama.cpp binaries not built: run `torbiz-tui build-llama`")
    if os.geteuid() != 0 or not os.access(SSHD, os.X_OK):
        pytest.skip("needs root and sshd (network and PID namespaces)")


async def test_slow_link_is_slow_with_its_rtt_and_keeps_serving(tmp_path: Path) -> None:
    nodes = NamespacedNodes(tmp_path / "nodes", 2)
    nodes.start()
    cluster: Cluster | None = None
    s: Supervised | None = None
    try:
        relayed = nodes.relay("node1", DELAY_MS)
        model = ensure_demo_model(tmp_path / "demo.gguf")
        cluster = Cluster(load_config(ssh_cluster_file(
            tmp_path, nodes, model, name="slow", node_overrides={"node1": relayed})))
        await plan_and_up(cluster)
        assert cluster.nodes["node1"].endpoint.startswith("127.77.")
        nodes.shape("node1", RATE)
        s = Supervised(cluster, nodes)
        s.supervisor.interval = 0.5
        s.start()

        seen: list[tuple[str, int | None]] = []
        served = 0
        until = time.monotonic() + 12
        while time.monotonic() < until:
            answer = asyncio.create_task(_completion(s.url, tokens=16))
            while not answer.done():
                status = cluster.nodes["node1"]
                seen.append((node_state_text(status), status.probe_ms))
                await asyncio.sleep(0.2)
            assert answer.result() is not None
            served += 1
        states = {state for state, _ in seen}
        rtts = [ms for state, ms in seen if state == SLOW and ms is not None]
        print(f"node1 seen {sorted(states)}, RTT {min(rtts, default=None)}.."
              f"{max(rtts, default=None)} ms, {served} requests served")
        assert not states & {NOT_RESPONDING, UNREACHABLE, FAILED}, seen
        assert SLOW in states, seen
        assert min(rtts) >= 2 * DELAY_MS
        assert served >= 2
        assert not s.recoveries, [r.reason for r in s.recoveries]
        assert not [d for d in s.detections if d.part == "node1"], s.detections
    finally:
        if s is not None:
            await s.stop()
        if cluster is not None:
            await cluster.close()
            await cluster.down()
            await cluster.close()
        nodes.stop()
