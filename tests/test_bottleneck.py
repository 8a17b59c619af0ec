"""The running bottleneck on real parts: two rpc-servers and llama-server on this machine, one
worker reached through a relay adding 20 ms each way. While a long request decodes, the
measured shares put that worker first (slowest), mostly link; `status --json` carries the
same; after the request, the last figures stay with their age."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from core import operations
from core.cluster import Cluster
from core.config import load_config
from core.demo_model import write_demo_model
from core.engines.llama_rpc.build import find_cached_binary
from core.metrics_export import ClusterCollector, Figures
from core.status import ClusterStatus, CoordinatorStatus
from tests.cluster_files import free_port, toml_text
from tests.latency_relay import LatencyRelay
from tui.cli_format import format_status

pytestmark = pytest.mark.skipif(
    find_cached_binary("ggml-rpc-server") is None or find_cached_binary("llama-server") is None,
    reason="llama.cpp not built: run `torbiz-tui build-llama`")

DELAY_S = 0.020  # each way: 40 ms a round trip, one round trip per worker per token


def cluster_file(tmp: Path, slow_port: int) -> Path:
    model = tmp / "m.gguf"
    write_demo_model(model, n_layer=8, n_embd=512, n_ff=1024)
    nodes = [{"name": "fast", "host": "127.0.0.1", "transport": "local",
              "rpc_port": free_port(), "threads": 1},
             {"name": "slow", "host": "127.0.0.1", "transport": "local",
              "rpc_bind": "127.0.0.2", "rpc_host": "127.0.0.1", "rpc_port": slow_port,
              "threads": 1}]
    path = tmp / "cluster.toml"
    path.write_text(toml_text({"name": "neck", "state_dir": str(tmp / "state")}, nodes,
                              model={"gguf": str(model), "context": 1024},
                              coordinator={"host": "127.0.0.1", "port": free_port()},
                              plan={"policy": "spread", "coordinator_layers": False}))
    return path


async def long_request(url: str, tokens: int) -> None:
    async with httpx.AsyncClient(timeout=120) as client:
        answer = await client.post(f"{url}/completion", json={
            "prompt": "The", "n_predict": tokens, "ignore_eos": True, "temperature": 0})
        answer.raise_for_status()


def test_the_slow_link_is_the_bottleneck_while_it_runs_and_after(tmp_path: Path) -> None:
    async def scenario() -> tuple[Any, Any, dict[str, Any], Any]:
        port = free_port()
        relay = LatencyRelay("127.0.0.2", port, delay_s=DELAY_S, listen_port=port)
        await relay.start()
        cluster = Cluster(load_config(cluster_file(tmp_path, port)))
        try:
            up = await operations.up(cluster)
            coordinator = up.status.coordinator
            assert coordinator.state == "ready", up
            request = asyncio.create_task(long_request(coordinator.url, 400))
            running = None
            for _ in range(100):  # the rate needs two throughput polls of a running request
                sample = await operations.throughput(cluster)
                if sample is not None and sample.running_tps > 0:
                    running = await operations.bottleneck(cluster)
                    if running is not None:
                        break
                await asyncio.sleep(0.3)
            report = await operations.status(cluster, detail=True)
            await request
            after = await operations.bottleneck(cluster)
            return running, after, json.loads(json.dumps(report.to_json())), up
        finally:
            await operations.down(cluster)
            await cluster.close()
            await relay.stop()

    running, after, report, _ = asyncio.run(scenario())
    assert running is not None, "no bottleneck measured while the request ran"
    parts = {part.node: part for part in running.parts}
    assert set(parts) == {"coordinator", "fast", "slow"}
    assert running.slowest is not None and running.slowest.node == "slow", running
    slow, fast = parts["slow"], parts["fast"]
    # 40 ms of every token is the relay's: the slow worker's wait is mostly link.
    assert slow.link_s >= 0.025, slow
    assert slow.link_s > slow.compute_s and slow.link_s > fast.link_s + 0.02, running
    assert sum(p.share for p in running.parts) <= 1.0 + 1e-6
    assert running.token_s >= 0.040  # a token cannot beat the relay's round trip
    assert running.cell("slow").endswith("◀") and not running.cell("fast").endswith("◀")
    assert running.sentence().startswith("slowest: slow, ")
    neck = report["bottleneck"]
    assert neck is not None and neck["slowest"] == "slow", neck
    assert {n["node"] for n in neck["nodes"]} == {"coordinator", "fast", "slow"}
    assert after is not None and after.slowest is not None and after.slowest.node == "slow"
    assert after.age_s > 0  # idle: the last figures, with their age
    # The same figures, as Prometheus text and as the headless `status` prints them.
    status = load_status(report)
    collector = ClusterCollector()
    collector.figures = Figures(status, None, time.monotonic())
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    assert re.search(r'torbiz_node_token_time_share\{cluster="neck",node="slow"\} 0\.[5-9]', text)
    assert 'torbiz_node_token_seconds{cluster="neck",node="slow",part="link"}' in text
    assert "torbiz_token_seconds" in text
    printed = format_status(status)
    assert re.search(r"^  slow: \d+% \(compute \d+%, link \d+%\)  <- slowest$", printed, re.M), \
        printed


def load_status(report: dict[str, Any]) -> ClusterStatus:
    """The JSON `status --json` printed, back into the status the exporter and the text use."""
    return ClusterStatus(report["cluster"], (), CoordinatorStatus(), (), report["throughput"],
                         bottleneck=report["bottleneck"])


async def test_the_dashboard_marks_the_slow_node_while_a_request_runs(tmp_path: Path) -> None:
    """The real dashboard (Pilot) over the same two workers: `u`, then a long request from
    outside; the slow worker's TOKEN TIME cell ends in ◀ and the layer map names it."""
    from tests.test_tui_pilot import SIZE, coordinator_state, wait_until
    from tui.app import make_app
    from tui.widgets.layer_map import LayerMapView
    from tui.widgets.node_table import NodeTable

    port = free_port()
    relay = LatencyRelay("127.0.0.2", port, delay_s=DELAY_S, listen_port=port)
    await relay.start()
    config = load_config(cluster_file(tmp_path, port))
    app = make_app(config)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("u")
            await wait_until(pilot, lambda: coordinator_state(app) == "ready",
                             "the coordinator ready", timeout=120)
            request = asyncio.create_task(
                long_request(f"http://127.0.0.1:{config.coordinator.port}", 400))
            table = app.main.query_one(NodeTable)
            await wait_until(pilot, lambda: table.get_cell("slow", "share").plain.endswith("◀"),
                             "the slow worker marked slowest", timeout=60)
            legend = str(app.main.query_one(LayerMapView).render())
            assert "◀ slowest: slow, " in legend, legend
            assert not table.get_cell("fast", "share").plain.endswith("◀")
            await request
    finally:
        cleanup = Cluster(config)
        try:
            await operations.down(cleanup)
        finally:
            await cleanup.close()
        await relay.stop()
