"""Faults on a real running cluster are noticed within 3 s and explained; losing a node's SSH
never stops its worker."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from core import operations
from core.cluster import Cluster
from core.config import load_config
from core.demo_model import ensure_demo_model
from core.engines.llama_rpc.build import find_cached_binary
from core.status import Notice
from core.supervision.supervisor import Supervisor
from tests.cluster_files import free_port, llama_processes_with, ssh_cluster_file, toml_text

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _binaries() -> None:
    if not (find_cached_binary("ggml-rpc-server") and find_cached_binary("llama-server")):
        pytest.skip("llama.cpp binaries not built: run `torbiz-tui build-llama`")


async def _watch_until(supervisor: Supervisor, predicate, timeout: float = 10.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        await supervisor.check_once()
        if predicate():
            return time.monotonic() - started
        await asyncio.sleep(max(0.0, supervisor.interval))
    raise AssertionError("not detected in time")


async def test_killed_worker_is_detected_and_the_coordinator_marked_degraded(
        tmp_path: Path) -> None:
    model = ensure_demo_model(tmp_path / "m.gguf")
    nodes = [{"name": f"w{i}", "host": "127.0.0.1", "transport": "local",
              "rpc_port": free_port(), "threads": 1} for i in range(2)]
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml_text({"name": "sup", "state_dir": str(tmp_path / "state")}, nodes,
                             model={"gguf": str(model), "context": 512},
                             coordinator={"port": free_port()}))
    cluster = Cluster(load_config(cfg))
    notices: list[Notice] = []
    cluster.subscribe(lambda e: notices.append(e) if isinstance(e, Notice) else None)
    supervisor = Supervisor(cluster, interval=0.5)
    try:
        await operations.up(cluster, force=True)
        assert await supervisor.check_once() == []
        victim = cluster.nodes["w1"].pid
        assert victim
        os.kill(victim, signal.SIGKILL)
        took = await _watch_until(supervisor, lambda: cluster.nodes["w1"].state == "failed")
        assert took < 3.0
        parts = {(d.part, d.state) for d in supervisor.detections}
        assert ("w1", "failed") in parts and ("coordinator", "degraded") in parts
        assert "worker process is gone" in cluster.nodes["w1"].error
        assert any(n.level == "error" and n.text.startswith("w1: ") for n in notices)
        # Reported once, not on every check.
        count = len(supervisor.detections)
        await supervisor.check_once()
        assert len(supervisor.detections) == count
    finally:
        await cluster.down()
        await cluster.close()
    assert llama_processes_with([f"-p {n['rpc_port']}" for n in nodes]) == []


async def test_lost_ssh_marks_unreachable_and_the_worker_keeps_running(
        tmp_path: Path, sshd_cluster) -> None:
    sshd = sshd_cluster(count=1)
    cfg = ssh_cluster_file(tmp_path, sshd, ensure_demo_model(tmp_path / "m.gguf"))
    cluster = Cluster(load_config(cfg))
    supervisor = Supervisor(cluster, interval=0.5)
    try:
        started = await cluster.start_workers()
        assert started[0].state == "ready"
        pid = started[0].pid
        sshd.stop_node("node1")
        await cluster.close()  # the connection would also die with a real network cut
        took = await _watch_until(supervisor,
                                  lambda: cluster.nodes["node1"].state == "unreachable")
        assert took < 3.0
        assert "cannot connect" in cluster.nodes["node1"].error
        assert pid is not None
        os.kill(pid, 0)  # still alive
        sshd.start_node("node1")
        await _watch_until(supervisor, lambda: cluster.nodes["node1"].state == "ready")
        assert cluster.nodes["node1"].pid == pid  # reattached, no duplicate
    finally:
        await cluster.stop_workers()
        await cluster.close()
    assert llama_processes_with([f"-H {sshd.nodes[0].host} -p 50052"]) == []
