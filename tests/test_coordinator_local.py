"""The coordinator and workers on local nodes (the demo's transport): refusing busy workers,
reattaching from a fresh process, the log commands."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from core import operations
from core.cluster import Cluster
from core.config import load_config
from core.demo_model import ensure_demo_model
from core.engines.llama_rpc.build import find_cached_binary
from core.engines.llama_rpc.coordinator import coordinator_status
from tests.cluster_files import free_port, llama_processes_with, toml_text, wait_healthy

pytestmark = pytest.mark.integration


@pytest.fixture
def local_cluster_file(tmp_path: Path) -> Path:
    if not (find_cached_binary("ggml-rpc-server") and find_cached_binary("llama-server")):
        pytest.skip("llama.cpp binaries not built: run `torbiz-tui build-llama`")
    model = ensure_demo_model(tmp_path / "demo.gguf")
    nodes = [{"name": f"w{i}", "host": "127.0.0.1", "transport": "local",
              "rpc_port": free_port(), "threads": 1} for i in range(2)]
    path = tmp_path / "local.toml"
    path.write_text(toml_text({"name": "loc", "state_dir": str(tmp_path / "state")}, nodes,
                              model={"gguf": str(model), "context": 512},
                              coordinator={"port": free_port()},
                              plan={"policy": "spread", "coordinator_layers": False}))
    return path


def _markers(path: Path) -> list[str]:
    config = load_config(path)
    return [f"-p {n.rpc_port}" for n in config.nodes] + [f"--port {config.coordinator.port}"]


async def test_refuses_workers_held_by_another_coordinator(local_cluster_file: Path) -> None:
    config = load_config(local_cluster_file)
    cluster = Cluster(config)
    intruder = None
    try:
        workers = await cluster.start_workers()
        assert [w.state for w in workers] == ["ready", "ready"]
        # Someone starts a llama-server by hand against our first worker.
        port = free_port()
        intruder = subprocess.Popen(
            [str(find_cached_binary("llama-server")), "-m", str(config.model.gguf), "-c", "256",
             "--host", "127.0.0.1", "--port", str(port), "-ngl", "99",
             "--rpc", config.nodes[0].endpoint],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_healthy(f"http://127.0.0.1:{port}", intruder)
        status = await cluster.start_coordinator(timeout=30)
        assert status.state == "failed"
        assert "worker w0 (" in status.error
        assert "already serving another coordinator" in status.error
        # Nothing was launched, and the reason stays on screen until the next start or stop.
        assert (await coordinator_status(config)).state == "stopped"
        assert (await cluster.refresh_coordinator()).error == status.error
    finally:
        if intruder is not None:
            intruder.terminate()
            intruder.wait(10)
        await cluster.down()
        await cluster.close()
    assert llama_processes_with(_markers(local_cluster_file)) == []


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tui.cli", *args], capture_output=True,
                          text=True, timeout=300, check=False)


async def test_logs_and_follow_from_fresh_processes(local_cluster_file: Path) -> None:
    cfg = str(local_cluster_file)
    try:
        assert cli("-c", cfg, "up").returncode == 0
        logs = cli("-c", cfg, "logs", "w1")
        assert logs.returncode == 0
        assert "torbiz-start" in logs.stdout
        assert "Starting RPC server" in logs.stdout or "RPC server" in logs.stdout
        coordinator_log = cli("-c", cfg, "logs", "coordinator", "-n", "2000").stdout
        assert "RPC0[" in coordinator_log  # -lv 4 names the workers' buffers

        follower = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tui.cli", "-c", cfg, "logs", "w0", "-f", "-n", "5",
            stdout=asyncio.subprocess.PIPE)
        assert follower.stdout is not None
        first = await asyncio.wait_for(follower.stdout.readline(), 30)
        assert first.strip()
        follower.terminate()
        await asyncio.wait_for(follower.wait(), 10)

        unknown = cli("-c", cfg, "logs", "nope")
        assert unknown.returncode == 2
        assert "no node named 'nope'" in unknown.stderr
    finally:
        assert cli("-c", cfg, "down").returncode == 0
    await asyncio.sleep(0.5)
    # The follower's `tail -F` died with its reader: nothing of ours is left behind.
    assert llama_processes_with(_markers(local_cluster_file)) == []
    state = str(local_cluster_file.parent / "state")
    leftovers = [p for p in _tails() if state in " ".join(p)]
    assert leftovers == []


def _tails() -> list[list[str]]:
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if cmd and cmd[0].endswith("tail"):
            found.append(cmd)
    return found


async def test_spans_place_exactly_the_planned_blocks(tmp_path: Path) -> None:
    if not (find_cached_binary("ggml-rpc-server") and find_cached_binary("llama-server")):
        pytest.skip("llama.cpp binaries not built: run `torbiz-tui build-llama`")
    model = ensure_demo_model(tmp_path / "demo.gguf")  # 8 blocks
    nodes = [{"name": f"w{i}", "host": "127.0.0.1", "transport": "local",
              "rpc_port": free_port(), "threads": 1} for i in range(3)]
    path = tmp_path / "spans.toml"
    path.write_text(toml_text({"name": "sp", "state_dir": str(tmp_path / "state")}, nodes,
                              model={"gguf": str(model), "context": 512},
                              coordinator={"port": free_port()}))
    cluster = Cluster(load_config(path))
    try:
        await cluster.start_workers()
        # Blocks 0-1 stay on this machine's CPU, w0 holds 2, w1 holds 3-7, w2 is left out.
        status = await cluster.start_coordinator(spans=[("w0", 2, 1), ("w1", 3, 5)])
        assert status.state == "ready", status.error
        shares = {s.node: s for s in await cluster.engine.layer_shares()}
        assert (shares["w0"].planned_first, shares["w0"].planned_layers) == (2, 1)
        assert shares["w0"].layers == 1 and shares["w1"].layers == 5
        assert shares["w2"].layers is None and shares["w2"].model_bytes == 0
    finally:
        await cluster.down()
        await cluster.close()
    assert llama_processes_with(_markers(path)) == []


def test_gapped_spans_are_refused() -> None:
    from core.engines.llama_rpc.coordinator import CoordinatorError
    from core.engines.llama_rpc.serving import check_spans as _check_spans

    _check_spans([("a", 0, 3), ("b", 3, 5)])
    with pytest.raises(CoordinatorError, match="not contiguous at b"):
        _check_spans([("a", 0, 2), ("b", 3, 5)])


async def test_a_plan_without_workers_runs_on_the_coordinator_alone(
        local_cluster_file: Path) -> None:
    """pack with coordinator_layers puts a small model wholly on this machine's CPU: the plan's
    spans are empty, no worker starts, and llama-server runs with no --rpc (-ngl 0)."""
    cluster = Cluster(load_config(local_cluster_file))
    try:
        status = await operations.up(cluster, spans=())
        assert status.coordinator.state == "ready"
        assert all(n.state != "ready" for n in status.nodes)
        report = await cluster.engine.load_report()
        assert report.finished and [d.endpoint for d in report.devices] == ["CPU"]
        assert report.devices[0].layers == 8  # every block of the demo model
    finally:
        await cluster.down()
        await cluster.close()
    assert llama_processes_with(_markers(local_cluster_file)) == []
