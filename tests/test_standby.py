"""Warm standbys on real sshd nodes with real rpc-server and llama-server: `[plan] standby`
leaves the node out of the plan, `cache warm` fills it with every planned block, and when a
worker is killed the recovery hands its blocks to the standby and says it came from its warm
cache; the standby's worker received none of the cached tensors."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from core import operations
from core.cluster import Cluster
from core.config import load_config
from core.engines.llama_rpc.build import find_cached_binary
from core.engines.llama_rpc.manifest import load_manifest
from core.supervision.recovery_record import RECOVERED
from tests.cluster_files import ssh_cluster_file
from tests.test_faults import Supervised, _until

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _binaries() -> None:
    if not (find_cached_binary("ggml-rpc-server") and find_cached_binary("llama-server")):
        pytest.skip("llama.cpp binaries not built: run `torbiz-tui build-llama`")


def cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tui.cli", "-c", str(cfg), *args],
                          capture_output=True, text=True, timeout=300, check=False)


async def _generated(url: str, tokens: int = 8) -> int:
    """Tokens the coordinator generated (their text may be empty: a random model's tokens
    can all be ones that print nothing)."""
    async with httpx.AsyncClient(timeout=60, trust_env=False) as client:
        response = await client.post(f"{url}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hello"}], "max_tokens": tokens})
        response.raise_for_status()
        return int(response.json()["usage"]["completion_tokens"])


def with_standby(cfg: Path, names: list[str]) -> None:
    text = cfg.read_text().replace("[plan]\n", "[plan]\nstandby = " + json.dumps(names) + "\n")
    cfg.write_text(text)


async def test_recovery_onto_a_warm_standby(tmp_path: Path, sshd_cluster) -> None:
    from core.demo_model import write_demo_model

    model = write_demo_model(tmp_path / "big.gguf", n_layer=2, n_embd=1024, n_head=8,
                             n_head_kv=8, n_ff=5632, n_vocab=8192)
    sshd = sshd_cluster(count=3)
    cfg = ssh_cluster_file(tmp_path, sshd, model)
    with_standby(cfg, ["node3"])
    manifest = load_manifest(model)

    warm = cli(cfg, "cache", "warm")
    assert warm.returncode == 0, warm.stdout + warm.stderr
    shown = json.loads(cli(cfg, "cache", "--json").stdout)
    rows = {r["name"]: r for r in shown["nodes"]}
    assert rows["node3"]["planned"] == [0, 2] and rows["node3"]["warm_share"] == 1.0
    cache3 = tmp_path / "state" / "t" / "node3" / "cache" / "rpc"
    assert {p.name for p in cache3.iterdir()} == {t.hash for t in manifest.for_span(0, 2, True)}

    cluster = Cluster(load_config(cfg))
    s = Supervised(cluster, sshd)
    try:
        up = await operations.up(cluster)
        assert {n for n, _, c in up.plan.spans if c} == {"node1", "node2"}  # type: ignore[union-attr]
        assert cluster.nodes["node3"].state == "ready"  # its worker idles, ready
        s.supervisor.interval = 0.5
        s.start()
        await _until(lambda: cluster.coordinator.state == "ready", 30, "coordinator ready")
        await asyncio.sleep(1.0)
        os.kill(cluster.nodes["node2"].pid or 0, signal.SIGKILL)
        await _until(lambda: bool(s.recoveries), 60, "recovery")
        result = s.recoveries[0]
        assert result.outcome == RECOVERED, result.reason
        assert set(result.workers) == {"node1", "node3"}
        assert result.reason.startswith("recovered onto node3 from its warm cache in "), \
            result.reason
        assert ("node3", 1, 1) in result.spans and ("node1", 0, 1) in result.spans
        assert [name for name, _ in result.steps] == [
            "confirmed", "surveyed", "planned", "stopped", "hello", "started"]
        recorded = json.loads((tmp_path / "state" / "t" / "_coordinator" / "recovery.json")
                              .read_text())
        assert list(recorded["steps"]) == [name for name, _ in result.steps]
        assert await _generated(s.url) == 8
    finally:
        await s.stop()
        await cluster.close()
        await cluster.down()
        await cluster.close()


async def test_a_standby_frozen_before_the_recovery_reads_it_is_left_out_in_time(
        tmp_path: Path) -> None:
    """The recovery reads the standby's cache and probes it while it confirms the fault; a
    standby that froze since its last status (every process SIGSTOPped) answers neither, and
    the recovery goes on without it after the node's status deadline: re-planned over the
    worker that remains."""
    from tests.netns_nodes import NamespacedNodes
    from tests.sshd_cluster import SSHD

    if os.geteuid() != 0 or not os.access(SSHD, os.X_OK):
        pytest.skip("needs root and sshd (network and PID namespaces)")
    from core.demo_model import ensure_demo_model

    nodes = NamespacedNodes(tmp_path / "nodes", 3)
    nodes.start()
    cluster = None
    try:
        model = ensure_demo_model(tmp_path / "demo.gguf")
        cfg = ssh_cluster_file(tmp_path, nodes, model, name="frozen")
        with_standby(cfg, ["node3"])
        cluster = Cluster(load_config(cfg))
        assert not [r.error for r in await operations.cache_warm(cluster, ["node3"])
                    if r.error]
        await operations.up(cluster)
        assert cluster.nodes["node3"].state == "ready"
        recoverer = cluster.engine.recoverer(cluster)
        await cluster.refresh_coordinator()
        assert cluster.coordinator.state == "ready"
        recoverer.saw_ready(cluster.coordinator.pid)
        os.kill(nodes.host_pid("node2", cluster.nodes["node2"].pid or 0), signal.SIGKILL)
        await _until_failed(cluster, "node2")
        nodes.freeze("node3")  # its last status still says ready
        assert cluster.nodes["node3"].state == "ready"
        result = await asyncio.wait_for(recoverer.maybe_recover(), 60)
        assert result is not None and result.outcome == RECOVERED, result
        assert result.workers == ("node1",), result.reason
        assert "node3" not in result.reason.split("without")[0]
        steps = dict(result.steps)
        deadline = 2 * cluster.config.node("node3").ssh.status_timeout
        # bounded by node3's deadline (a generous margin: 2 shared cores), never open-ended
        assert steps["surveyed"] <= deadline + 3.0, result.steps
        assert await _generated(cluster.coordinator.url) == 8
    finally:
        nodes.thaw("node3")
        if cluster is not None:
            await cluster.close()
            await cluster.down()
            await cluster.close()
        nodes.stop()


async def _until_failed(cluster: Cluster, name: str) -> None:
    for _ in range(100):
        if (await cluster.probe_node(name)).state == "failed":
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{name} never failed")
