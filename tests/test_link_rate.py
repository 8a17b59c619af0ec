"""The predicted load time: `calibrate` measures the rate of the link a load uses (this machine
to the worker's RPC port, by a timed SET_TENSOR transfer over the RPC protocol itself), and
`plan` (the dashboard's `p` too) turns what a load would still send into seconds. On real sshd
nodes in network namespaces of their own, one behind a tbf-shaped link of a known rate."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from core import operations
from core.cluster import Cluster
from core.config import load_config
from core.demo_model import ensure_demo_model
from core.engines.llama_rpc import link_rate
from core.engines.llama_rpc.build import find_cached_binary
from core.engines.llama_rpc.rpc import hello
from tests.cluster_files import ssh_cluster_file
from tests.netns_nodes import NamespacedNodes
from tests.sshd_cluster import SSHD

pytestmark = pytest.mark.integration

SHAPED = "40mbit"
SHAPED_BYTES_PER_S = 40e6 / 8


@pytest.fixture(autouse=True)
def _needs() -> None:
    if not (find_cached_binary("ggml-rpc-server") and find_cached_binary("llama-server")):
        pytest.skip("llama.cpp binaries not built: run `torbiz-tui build-llama`")


async def test_calibrate_measures_the_shaped_link_and_plan_predicts_the_load(
        tmp_path: Path) -> None:
    if os.geteuid() != 0 or not os.access(SSHD, os.X_OK):
        pytest.skip("needs root and sshd (network and PID namespaces)")
    nodes = NamespacedNodes(tmp_path / "nodes", 2)
    nodes.start()
    cluster = None
    try:
        nodes.shape("node1", SHAPED)
        model = ensure_demo_model(tmp_path / "demo.gguf")
        cluster = Cluster(load_config(ssh_cluster_file(tmp_path, nodes, model, name="link")))
        before = await operations.plan_preview(cluster)
        assert "link rate not measured: torbiz-tui calibrate" in before.text, before.text

        lines = await operations.calibrate(cluster, ["node1"])
        said = [line for line in lines if line.startswith("node1: load link ")]
        assert said and "over its RPC port" in said[0], lines
        node1 = cluster.config.node("node1")
        rate = link_rate.load(cluster.config, node1)
        assert rate is not None
        assert 0.5 * SHAPED_BYTES_PER_S <= rate.bytes_per_second <= 1.2 * SHAPED_BYTES_PER_S, \
            (rate, SHAPED)
        # The worker is whole after it: it answers, and nothing was written to its cache.
        host, port = node1.rpc_host or node1.host, node1.rpc_port
        assert (await hello(host, port)).major == link_rate.PROTOCOL_MAJOR
        cache = tmp_path / "state" / "link" / "node1" / "cache" / "rpc"
        assert not cache.exists() or not any(cache.iterdir())

        preview = await operations.plan_preview(cluster)
        rows = {row["node"]: row for row in preview.json["cache"]}
        one, two = rows["node1"], rows["node2"]
        assert one["link_bytes_per_second"] == rate.bytes_per_second
        assert one["load_seconds"] == pytest.approx(one["send_bytes"] / rate.bytes_per_second)
        line = next(ln for ln in preview.text.splitlines() if ln.startswith("  node1: "))
        found = re.search(r"would still send (.+?), about ([\d.]+) s at (.+?)/s "
                          r"\(measured just now\)", line)
        assert found, line
        assert float(found.group(2)) == pytest.approx(one["load_seconds"], abs=0.051)
        if two["planned"] is not None:  # node2 was never calibrated
            assert two["load_seconds"] is None
            assert any(ln.startswith("  node2: ") and "link rate not measured: torbiz-tui "
                       "calibrate" in ln for ln in preview.text.splitlines()), preview.text

        again = await operations.calibrate(cluster, ["node1"])
        assert any(ln.startswith("node1: load link ") and ln.endswith("; cached")
                   for ln in again), again
    finally:
        if cluster is not None:
            await cluster.down()
            await cluster.close()
        nodes.stop()


async def test_a_local_worker_survives_the_transfer_and_a_busy_one_is_named(
        tmp_path: Path) -> None:
    """On loopback (no shaping): the transfer ends with the worker still serving, nothing in its
    cache; while another client holds the worker, the sentence says so instead of hanging."""
    import asyncio
    import subprocess

    from tests.cluster_files import free_port

    binary = find_cached_binary("ggml-rpc-server")
    assert binary is not None
    port = free_port()
    cache = tmp_path / "cache"
    worker = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(port), "-c"],
                              env={**os.environ, "LLAMA_CACHE": str(cache)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        for _ in range(100):
            try:
                await hello("127.0.0.1", port, timeout=1.0)
                break
            except Exception:  # noqa: BLE001 - not listening yet
                await asyncio.sleep(0.05)
        rate = await link_rate.measure("127.0.0.1", port)
        assert rate.bytes_per_second > 0 and rate.sent_bytes >= link_rate.FIRST
        assert worker.poll() is None
        assert (await hello("127.0.0.1", port)).major == link_rate.PROTOCOL_MAJOR
        assert not [p for p in cache.rglob("*") if p.is_file()]  # cache flag 0: nothing kept

        reader, writer = await asyncio.open_connection("127.0.0.1", port)  # holds the worker
        try:
            with pytest.raises(link_rate.LinkRateError, match="a coordinator holds it"):
                await link_rate.measure("127.0.0.1", port, timeout=1.0)
        finally:
            writer.close()
        assert worker.poll() is None
    finally:
        worker.kill()
        worker.wait()
