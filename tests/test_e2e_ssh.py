"""End to end over real SSH: sshd nodes -> `torbiz-tui up` -> generated tokens -> status from a
fresh process -> `down` -> nothing left. And the failures an operator really hits."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from core.config import load_config
from core.engines.llama_rpc.build import find_cached_binary
from tests.cluster_files import llama_processes_with, ssh_cluster_file

pytestmark = pytest.mark.integration


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tui.cli", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from core.demo_model import ensure_demo_model

    return ensure_demo_model(tmp_path_factory.mktemp("model") / "demo.gguf")


@pytest.fixture(autouse=True)
def _binaries() -> None:
    if not (find_cached_binary("ggml-rpc-server") and find_cached_binary("llama-server")):
        pytest.skip("llama.cpp binaries not built: run `torbiz-tui build-llama`")


def _endpoint_markers(config_path: Path) -> list[str]:
    config = load_config(config_path)
    marks = [f"-p {n.rpc_port}" for n in config.nodes]
    return [f"-H {n.rpc_host or n.host} {m}" for n, m in zip(config.nodes, marks, strict=True)] + [
        f"--port {config.coordinator.port}"]


def test_up_generate_status_down(tmp_path: Path, sshd_cluster, demo_model: Path) -> None:
    sshd = sshd_cluster(count=3)
    cfg = ssh_cluster_file(tmp_path, sshd, demo_model)
    markers = _endpoint_markers(cfg)
    try:
        started = time.monotonic()
        up = cli("-c", str(cfg), "up")
        assert up.returncode == 0, up.stderr
        assert "is up" in up.stdout
        took = time.monotonic() - started

        config = load_config(cfg)
        url = f"http://127.0.0.1:{config.coordinator.port}"
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8,
            "temperature": 0})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] > 0
        generated = cli("-c", str(cfg), "generate", "-n", "8")
        assert generated.returncode == 0, generated.stderr
        assert generated.stderr.startswith("8 tokens in "), generated.stderr
        assert "tokens/s" in generated.stderr

        status = cli("-c", str(cfg), "status", "--json")
        assert status.returncode == 0, status.stdout + status.stderr
        data = json.loads(status.stdout)
        assert [n["state"] for n in data["nodes"]] == ["ready"] * 3
        assert all(n["pid"] for n in data["nodes"])
        assert {n["endpoint"] for n in data["nodes"]} == {
            f"{node.host}:50052" for node in sshd.nodes}
        assert data["coordinator"]["state"] == "ready"
        assert data["coordinator"]["url"] == url
        # What llama-server really loaded, per worker, from its own log: every block placed.
        layers = {share["node"]: share for share in data["layers"]}
        assert set(layers) == {"node1", "node2", "node3"}
        assert sum(share["layers"] for share in layers.values()) == 8  # the demo model's blocks
        assert all(share["model_bytes"] > 0 and share["kv_bytes"] > 0
                   for share in layers.values())
        assert data["throughput"]["decoded_total"] >= reply.json()["usage"]["completion_tokens"]

        # The workers really run on the nodes, detached: each log lives in its state dir.
        for node in sshd.nodes:
            log = tmp_path / "state" / "t" / node.name / "log"
            assert log.is_file() and "torbiz-start" in log.read_text()

        # A second `up` reuses everything: no duplicate processes.
        before = {p.pid for p in llama_processes_with(markers)}
        again = cli("-c", str(cfg), "up")
        assert again.returncode == 0, again.stderr
        assert {p.pid for p in llama_processes_with(markers)} == before
        assert len(before) == 4
        print(f"up took {took:.1f} s")
    finally:
        down = cli("-c", str(cfg), "down")
    assert down.returncode == 0, down.stderr
    assert llama_processes_with(markers) == []
    after = cli("-c", str(cfg), "status", "--json")
    assert {n["state"] for n in json.loads(after.stdout)["nodes"]} == {"stopped"}


def test_unreachable_node_is_named_and_others_unharmed(tmp_path: Path, sshd_cluster,
                                                        demo_model: Path) -> None:
    sshd = sshd_cluster(count=2)
    dead = {"name": "ghost", "host": "127.0.0.99", "ssh_port": 2222}
    cfg = ssh_cluster_file(tmp_path, sshd, demo_model, extra_nodes=[dead])
    markers = _endpoint_markers(cfg)
    try:
        # The preflight refuses: one line names the node and the reason, nothing starts.
        up = cli("-c", str(cfg), "up")
        assert up.returncode == 1
        errors = [ln for ln in up.stderr.splitlines() if ln.startswith("error: ")]
        assert errors == [ln for ln in errors if "ghost" in ln]
        assert any("cannot connect to 127.0.0.99:2222" in ln for ln in errors)
        assert "nothing was started" in up.stderr
        assert llama_processes_with(markers) == []
        # Forced, the reachable nodes start and the dead one is named again.
        up = cli("-c", str(cfg), "up", "--force")
        assert up.returncode == 1
        errors = [ln for ln in up.stderr.splitlines() if ln.startswith("error: ")]
        assert any("ghost" in ln and "cannot connect to 127.0.0.99:2222" in ln for ln in errors)
        status = json.loads(cli("-c", str(cfg), "status", "--json").stdout)
        states = {n["name"]: n["state"] for n in status["nodes"]}
        assert states == {"node1": "ready", "node2": "ready", "ghost": "unreachable"}
        assert status["coordinator"]["state"] == "stopped"
    finally:
        cli("-c", str(cfg), "down")
    assert llama_processes_with(markers) == []


def test_changed_host_key_is_refused_with_the_fix(tmp_path: Path, sshd_cluster,
                                                  demo_model: Path) -> None:
    sshd = sshd_cluster(count=2)
    # node2's entry in known_hosts now holds a different key: what a MITM looks like.
    other = tmp_path / "otherkey"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    fake = other.with_suffix(".pub").read_text().split()[:2]
    n2 = sshd.nodes[1]
    lines = [ln for ln in sshd.known_hosts.read_text().splitlines() if n2.host not in ln]
    lines.append(f"[{n2.host}]:{n2.port} {fake[0]} {fake[1]}")
    sshd.known_hosts.write_text("\n".join(lines) + "\n")
    cfg = ssh_cluster_file(tmp_path, sshd, demo_model)
    markers = _endpoint_markers(cfg)
    try:
        up = cli("-c", str(cfg), "up")
        assert up.returncode == 1
        line = next(ln for ln in up.stderr.splitlines() if ln.startswith("error: node2"))
        assert "HOST KEY CHANGED" in line
        assert f"ssh-keygen -f {sshd.known_hosts} -R '[{n2.host}]:{n2.port}'" in line
        assert "SHA256:" in line
        # node2 never ran anything.
        assert not (tmp_path / "state" / "t" / "node2").exists()
    finally:
        cli("-c", str(cfg), "down")
    assert llama_processes_with(markers) == []


def test_unknown_host_key_is_refused(tmp_path: Path, sshd_cluster, demo_model: Path) -> None:
    sshd = sshd_cluster(count=1)
    sshd.known_hosts.write_text("")
    cfg = ssh_cluster_file(tmp_path, sshd, demo_model)
    status = json.loads(cli("-c", str(cfg), "status", "--json").stdout)
    error = status["nodes"][0]["error"]
    assert status["nodes"][0]["state"] == "unreachable"
    assert "is not in" in error and "ssh-keyscan -p 2222" in error


def test_missing_binary_and_taken_port(tmp_path: Path, sshd_cluster, demo_model: Path) -> None:
    sshd = sshd_cluster(count=3)
    n3 = sshd.nodes[2]
    cfg = ssh_cluster_file(tmp_path, sshd, demo_model, node_overrides={
        "node1": {"rpc_server": "/nonexistent/rpc-server"}})
    markers = _endpoint_markers(cfg)
    squatter = socket.socket()
    squatter.bind((n3.host, 50052))
    squatter.listen(1)
    try:
        preflight = cli("-c", str(cfg), "up")
        assert preflight.returncode == 1
        assert "error: node1: rpc_server '/nonexistent/rpc-server' is not an executable" \
            in preflight.stderr
        assert "error: node3: port 50052 is taken by a program this cluster did not start" \
            in preflight.stderr
        assert llama_processes_with(markers) == []
        up = cli("-c", str(cfg), "up", "--force")
        assert up.returncode == 1
        errors = "\n".join(ln for ln in up.stderr.splitlines() if ln.startswith("error: "))
        assert "node1: rpc_server '/nonexistent/rpc-server' is not an executable file" in errors
        assert f"node3: port 50052 on {n3.host} is already in use" in errors
        status = json.loads(cli("-c", str(cfg), "status", "--json").stdout)
        assert {n["name"]: n["state"] for n in status["nodes"]}["node2"] == "ready"
    finally:
        squatter.close()
        cli("-c", str(cfg), "down")
    assert llama_processes_with(markers) == []
