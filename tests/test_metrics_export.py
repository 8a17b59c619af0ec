"""`torbiz-tui metrics` scraped by a real Prometheus server (Debian's `prometheus`, started here
on loopback with a config and storage of this test's own), and the figures queried back over
Prometheus' HTTP API: node state, blocks loaded, the coordinator, the last request's rate."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.demo_model import ensure_demo_model
from core.engines.llama_rpc.build import find_cached_binary
from tests.cluster_files import llama_processes_with, toml_text
from tests.test_tui_pilot import free_ports

pytestmark = pytest.mark.integration


def cli(path: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tui.cli", "-c", str(path), *args],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})


def start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True,
                                env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def wait_for(what: str, check: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.5)
    raise AssertionError(f"waited {timeout:g} s for {what}; last: {last!r}")


@pytest.fixture
def running_cluster(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    binary = find_cached_binary("ggml-rpc-server")
    if binary is None or find_cached_binary("llama-server") is None:
        pytest.skip("llama.cpp not built: run `torbiz-tui build-llama`")
    *rpc_ports, coordinator_port = free_ports(3)
    nodes = [{"name": name, "host": "127.0.0.1", "transport": "local", "rpc_port": port,
              "threads": 1, "rpc_server": str(binary)}
             for name, port in zip(("alpha", "beta"), rpc_ports, strict=True)]
    path = tmp_path / "cluster.toml"
    path.write_text(toml_text(
        {"name": "scraped", "state_dir": str(tmp_path / "state")}, nodes,
        model={"gguf": str(ensure_demo_model(tmp_path / "demo.gguf")), "context": 512},
        plan={"policy": "spread", "coordinator_layers": False},
        coordinator={"host": "127.0.0.1", "port": coordinator_port}))
    try:
        up = cli(path, "up")
        assert up.returncode == 0, up.stdout + up.stderr
        yield path, coordinator_port
    finally:
        cli(path, "down")
        markers = [f"-p {port}" for port in rpc_ports] + [f"--port {coordinator_port}"]
        assert llama_processes_with(markers) == []


def test_prometheus_scrapes_torbiz_and_answers_queries(
        tmp_path: Path, running_cluster: tuple[Path, int]) -> None:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus not installed: scripts/setup.sh --with-test-tools")
    path, coordinator_port = running_cluster
    metrics_port, prometheus_port = free_ports(2)
    exporter = start([sys.executable, "-m", "tui.cli", "-c", str(path), "metrics", "--port",
                      str(metrics_port), "--interval", "0.5"], tmp_path / "exporter.log")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: torbiz\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{metrics_port}']\n")
    server = start([prometheus, f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prometheus_port}"],
                   tmp_path / "prometheus.log")
    api = f"http://127.0.0.1:{prometheus_port}/api/v1/query"

    def query(expr: str) -> dict[str, float]:
        data = httpx.get(api, params={"query": expr}, timeout=5, trust_env=False).json()
        assert data["status"] == "success", data
        return {r["metric"].get("node", ""): float(r["value"][1])
                for r in data["data"]["result"]}

    try:
        page = wait_for("the exporter's page", lambda: httpx.get(
            f"http://127.0.0.1:{metrics_port}/metrics", timeout=5, trust_env=False).text,
            timeout=60)
        assert 'torbiz_node_ready{backend="llama-rpc",cluster="scraped",node="alpha"} 1.0' \
            in page, page
        assert "# TYPE torbiz_node_rtt_seconds gauge" in page
        assert httpx.get(f"http://127.0.0.1:{metrics_port}/other", timeout=5,
                         trust_env=False).status_code == 404

        ready = wait_for("torbiz_node_ready in Prometheus",
                         lambda: query("torbiz_node_ready") or None, timeout=90)
        assert ready == {"alpha": 1.0, "beta": 1.0}
        assert query("torbiz_blocks_loaded") == {"alpha": 4.0, "beta": 4.0}
        assert query("torbiz_blocks_planned") == {"alpha": 4.0, "beta": 4.0}
        assert query("torbiz_coordinator_ready") == {"": 1.0}
        assert set(query("torbiz_node_rtt_seconds")) == {"alpha", "beta"}

        answer = httpx.post(f"http://127.0.0.1:{coordinator_port}/completion", json={
            "prompt": "hello", "n_predict": 16, "ignore_eos": True}, timeout=60,
            trust_env=False).json()
        told = answer["timings"]["predicted_n"] / answer["timings"]["predicted_ms"] * 1000
        rate = wait_for("the last request's rate in Prometheus",
                        lambda: query("torbiz_last_request_tokens_per_second"), timeout=60)
        assert rate[""] == pytest.approx(told, rel=0.05)
    finally:
        stop(server)
        stop(exporter)
