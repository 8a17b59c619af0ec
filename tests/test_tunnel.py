"""rpc_bind = "loopback": workers listen on their node's 127.0.0.1 only and the coordinator
reaches them through SSH tunnels that outlive the command that opened them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from core.config import load_config
from core.demo_model import ensure_demo_model
from core.engines.llama_rpc.build import find_cached_binary
from tests.cluster_files import free_port, llama_processes_with, processes_under, ssh_cluster_file

pytestmark = pytest.mark.integration


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tui.cli", *args], capture_output=True,
                          text=True, timeout=300, check=False)


def test_loopback_workers_through_ssh_tunnels(tmp_path: Path, sshd_cluster) -> None:
    if not (find_cached_binary("ggml-rpc-server") and find_cached_binary("llama-server")):
        pytest.skip("llama.cpp binaries not built: run `torbiz-tui build-llama`")
    sshd = sshd_cluster(count=2)
    # The test nodes share one network namespace, so their loopback ports must differ.
    ports = {n.name: free_port() for n in sshd.nodes}
    cfg = ssh_cluster_file(tmp_path, sshd, ensure_demo_model(tmp_path / "m.gguf"),
                           node_overrides={n: {"rpc_bind": "loopback", "rpc_port": p}
                                           for n, p in ports.items()})
    config = load_config(cfg)
    state = str(tmp_path / "state")
    try:
        up = cli("-c", str(cfg), "up")
        assert up.returncode == 0, up.stderr
        workers = llama_processes_with([f"-p {p}" for p in ports.values()])
        assert len(workers) == 2
        for proc in workers:
            args = proc.cmdline()
            assert args[args.index("-H") + 1] == "127.0.0.1"
        coordinator = llama_processes_with([f"--port {config.coordinator.port}"])
        assert len(coordinator) == 1
        rpc = coordinator[0].cmdline()
        endpoints = rpc[rpc.index("--rpc") + 1].split(",")
        assert all(e.startswith("127.0.0.1:") for e in endpoints)
        assert not {int(e.rsplit(":", 1)[1]) for e in endpoints} & set(ports.values())
        tunnels = [p for p in processes_under(state) if "core.reach.tunnel" in p.cmdline()]
        assert len(tunnels) == 2
        reply = httpx.post(f"http://127.0.0.1:{config.coordinator.port}/v1/chat/completions",
                           timeout=120, json={"messages": [{"role": "user", "content": "hi"}],
                                              "max_tokens": 6})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] > 0
    finally:
        down = cli("-c", str(cfg), "down")
    assert down.returncode == 0, down.stderr
    assert llama_processes_with([f"-p {p}" for p in ports.values()]) == []
    assert [p for p in processes_under(state) if "core.reach.tunnel" in p.cmdline()] == []
