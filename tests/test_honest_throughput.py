"""Honest throughput: a short burst shows the rate it ran at, not a window average that was
mostly idle. Against a real llama-server (the monitor) and the dashboard on a real cluster
(Pilot): `g` generates 16 tokens, and the panel shows that request's rate."""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from core.cluster import Cluster
from core.config import ClusterConfig, load_config
from core.demo_model import ensure_demo_model
from core.engines.llama_rpc.build import find_cached_binary
from core.status import READY
from core.supervision.throughput import ThroughputMonitor
from tests.cluster_files import free_port, llama_processes_with, toml_text, wait_healthy
from tests.test_tui_e2e_tmux import Tmux, tmux
from tests.test_tui_pilot import (
    SIZE,
    coordinator_state,
    free_ports,
    model_cluster,
    wait_until,
)
from tui.app import make_app
from tui.widgets.throughput_panel import ThroughputPanel

__all__ = ["model_cluster", "tmux"]  # fixtures, used by name

pytestmark = pytest.mark.integration


@pytest.fixture
def demo_server(tmp_path: Path) -> Iterator[str]:
    binary = find_cached_binary("llama-server")
    if not binary:
        pytest.skip("llama-server not built: run `torbiz-tui build-llama`")
    gguf = ensure_demo_model(tmp_path / "demo.gguf")
    url = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [str(binary), "-m", str(gguf), "-t", "1", "-c", "512", "--metrics", "--slots",
         "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1]],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def test_a_burst_between_two_polls_shows_its_own_rate(demo_server: str) -> None:
    async with ThroughputMonitor(demo_server, window=10.0) as monitor, \
            httpx.AsyncClient(timeout=60, trust_env=False) as client:
        first = await monitor.poll()
        assert first is not None, monitor.error
        assert first.last_tps is None and first.decode_tps == 0
        await asyncio.sleep(1.0)  # idle time the window average would spread the burst over
        answer = (await client.post(f"{demo_server}/completion", json={
            "prompt": "hello", "n_predict": 16, "ignore_eos": True,
            "cache_prompt": False})).json()
        timings = answer["timings"]
        # Tokens over llama-server's generation time, as `generate` and its event line count
        # them (its predicted_per_second leaves out the first token, sampled from the prompt).
        told = timings["predicted_n"] / timings["predicted_ms"] * 1000
        await asyncio.sleep(0.3)
        after = await monitor.poll()
        assert after is not None, monitor.error
        assert after.ended_now and after.last_tokens == 16
        assert after.last_tps == pytest.approx(told, rel=0.05)
        assert after.decode_tps == after.spark_tps == after.last_tps
        # What the old figure said: tokens over the whole window, mostly idle.
        assert after.gen_tps < after.last_tps / 3
        later = await monitor.poll()
        assert later is not None and not later.ended_now
        assert later.decode_tps == after.last_tps  # idle: the last request's rate stays
        assert later.spark_tps == 0.0  # but the graph shows idle as idle
        assert later.last_ended_at == after.last_ended_at


async def test_g_shows_its_real_rate_in_the_panel_and_the_table(
        model_cluster: ClusterConfig) -> None:
    app = make_app(model_cluster)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("u")
        await wait_until(pilot, lambda: coordinator_state(app) == READY,
                         "the coordinator ready", timeout=120)
        panel = app.main.query_one(ThroughputPanel)
        await wait_until(pilot, lambda: panel.last is not None, "a throughput sample")
        await pilot.press("g")
        def events() -> str:
            return "\n".join(app.main.model.event_log)

        await wait_until(pilot, lambda: "generated " in events(), "the generation's event")
        event = re.search(r"generated (\d+) tokens in [\d.]+ s \(([\d.]+) tok/s\)", events())
        assert event is not None, events()
        tokens, rate = int(event.group(1)), float(event.group(2))

        def headline() -> str:
            return str(panel.query_one("#gen-label").render())

        await wait_until(pilot, lambda: "last:" in headline(), "the last request's rate")
        shown = float(headline().split("last:")[1].split("tok/s")[0])
        # The event's rate is llama-server's own timing of the same request.
        assert shown == pytest.approx(rate, rel=0.1), (headline(), event.group(0))
        assert " s ago" in headline()
        assert f"last {tokens} tokens" in str(panel.query_one("#requests").render())
        assert max(panel.generation) == pytest.approx(rate, rel=0.1)  # the burst's height


def test_g_in_a_real_terminal_shows_the_bursts_rate(tmp_path: Path, tmux: Tmux) -> None:
    """The real torbiz-tui in tmux: u, then g (16 tokens in a few ms); the throughput panel
    says "last: N tok/s" with N the rate of g's own event line."""
    binary = find_cached_binary("ggml-rpc-server")
    if binary is None or find_cached_binary("llama-server") is None:
        pytest.skip("llama.cpp not built: run `torbiz-tui build-llama`")
    *rpc_ports, coordinator_port = free_ports(3)
    nodes = [{"name": name, "host": "127.0.0.1", "transport": "local", "rpc_port": port,
              "threads": 1, "rpc_server": str(binary)}
             for name, port in zip(("alpha", "beta"), rpc_ports, strict=True)]
    path = tmp_path / "cluster.toml"
    path.write_text(toml_text(
        {"name": "burst", "state_dir": str(tmp_path / "state")}, nodes,
        model={"gguf": str(ensure_demo_model(tmp_path / "demo.gguf")), "context": 512},
        plan={"policy": "spread", "coordinator_layers": False},
        coordinator={"host": "127.0.0.1", "port": coordinator_port}))
    config = load_config(path)
    try:
        tmux.open_dashboard(path)
        tmux.wait_for("2 nodes", "○ stopped", absent="probing")
        tmux.keys("u")
        tmux.wait_for("2 ready", "coordinator ready", "0 processing", timeout=120)
        tmux.keys("g")
        screen = tmux.wait_for("generated 16 tokens", "last:", timeout=60)
        said = re.search(r"generated 16 tokens in [\d.]+ s \(([\d.]+) tok/s\)",
                         screen.replace("\n", " "))
        assert said is not None, screen
        panel = next(line for line in screen.splitlines() if "last:" in line)
        shown = float(panel.split("last:")[1].split("tok/s")[0])
        assert shown == pytest.approx(float(said.group(1)), rel=0.1), screen
        assert " s ago" in panel
        print("\n" + screen)  # the captured screen, for whoever reads the test log
        tmux.keys("q")
        tmux.wait_for("Stop the cluster (s)")
        tmux.keys("s")
        tmux.wait_for("torbiz-tui exited with 0", timeout=60)
    finally:
        async def stop_all() -> None:
            cleanup = Cluster(config)
            try:
                await cleanup.down()
            finally:
                await cleanup.close()

        asyncio.run(stop_all())
    markers = [f"-p {port}" for port in rpc_ports] + [f"--port {coordinator_port}"]
    assert llama_processes_with(markers) == []

