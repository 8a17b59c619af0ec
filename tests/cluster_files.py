"""Write cluster files for tests: real sshd nodes (tests.sshd_cluster) or local nodes."""

from __future__ import annotations

import socket
import struct
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import psutil

from core.supervision.load_log import LoadReport, parse_load_log


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def toml_text(cluster: dict[str, Any], nodes: Iterable[dict[str, Any]],
              **tables: dict[str, Any]) -> str:
    lines = ["[cluster]"] + [f"{k} = {_value(v)}" for k, v in cluster.items()]
    for name, table in tables.items():
        lines += ["", f"[{name}]"] + [f"{k} = {_value(v)}" for k, v in table.items()]
    for node in nodes:
        lines += ["", "[[nodes]]"] + [f"{k} = {_value(v)}" for k, v in node.items()]
    return "\n".join(lines) + "\n"


def ssh_cluster_file(tmp_path: Path, sshd: Any, model: Path, *, name: str = "t",
                     node_overrides: dict[str, dict[str, Any]] | None = None,
                     extra_nodes: Iterable[dict[str, Any]] = ()) -> Path:
    """A cluster file whose nodes are the sshd harness's nodes, logging in as root."""
    overrides = node_overrides or {}
    nodes = []
    for node in sshd.nodes:
        entry = {"name": node.name, "host": node.host, "ssh_port": node.port, "threads": 1}
        entry.update(overrides.get(node.name, {}))
        nodes.append(entry)
    nodes.extend(extra_nodes)
    text = toml_text(
        {"name": name, "state_dir": str(tmp_path / "state")},
        nodes,
        ssh={"user": "root", "identity_file": str(sshd.client_key),
             "known_hosts": str(sshd.known_hosts), "config_file": "", "connect_timeout": 5},
        model={"gguf": str(model), "context": 512},
        coordinator={"host": "127.0.0.1", "port": free_port()},
        # Every test node takes part; `pack` would put a tiny model on one node.
        plan={"policy": "spread", "coordinator_layers": False},
    )
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    return path


def processes_under(marker: str) -> list[psutil.Process]:
    """Live (non-zombie) processes whose command line mentions `marker`."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if any(marker in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def llama_processes_with(markers: Iterable[str]) -> list[psutil.Process]:
    """rpc-server / llama-server processes whose arguments contain any of `markers`."""
    wanted = list(markers)
    found = []
    for proc in psutil.process_iter(["cmdline", "status", "name"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmd = proc.info["cmdline"] or []
            if not cmd or not any(k in Path(cmd[0]).name for k in ("rpc-server", "llama-server")):
                continue
            if any(m in " ".join(cmd) for m in wanted):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Until a llama-server we started by hand answers /health with 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"llama-server for {url} exited while loading"
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url}/health did not answer 200 within {timeout:g} s")


def ssh_transport_for(sshd: Any, index: int = 0, user: str = "root") -> Any:
    """An SshTransport to one harness node, logging in as `user` (root unless a test made
    another login, see tests.sshd_cluster.login_user) with the harness's keys."""
    from core.config import NodeConfig, SshOptions
    from core.reach.transport import SshTransport

    node = sshd.nodes[index]
    return SshTransport(NodeConfig(
        name=node.name, host=node.host, ssh_port=node.port,
        ssh=SshOptions(user=user, identity_file=str(sshd.client_key),
                       known_hosts=str(sshd.known_hosts), config_file=None)))


def wait_for_load(coordinator: subprocess.Popen[bytes], log_path: Path,
                  timeout: float = 60.0) -> LoadReport:
    """llama-server's load log as parsed once it says the load finished (or it exited, or
    `timeout` passed: the report then says how far it got)."""
    deadline = time.monotonic() + timeout
    report = parse_load_log([])
    while time.monotonic() < deadline and coordinator.poll() is None:
        report = parse_load_log(log_path.read_text(errors="replace").splitlines())
        if report.finished:
            break
        time.sleep(0.2)
    return report


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """TERM the processes this test started, last first; KILL what is left after 10 s."""
    for proc in reversed(procs):
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Until a worker accepts a connection (closed with RST: never a half-read handshake)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"rpc-server on port {port} exited"
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s")


def start_test_workers(rpc: Path | str, ports: list[int]) -> list[subprocess.Popen[bytes]]:
    """One single-threaded rpc-server per port on 127.0.0.1, each listening when this returns
    (the caller stops them: stop_all)."""
    procs = [subprocess.Popen([str(rpc), "-H", "127.0.0.1", "-p", str(port), "-t", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for port in ports]
    try:
        for port, proc in zip(ports, procs, strict=True):
            wait_listening(port, proc)
    except BaseException:
        stop_all(procs)
        raise
    return procs
