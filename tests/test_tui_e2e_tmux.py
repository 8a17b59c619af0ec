"""The real `torbiz-tui` in a real terminal (tmux, 140x40), driven by keys the way an operator
would, against real workers on this machine; the assertions read what tmux shows.

The tmux server runs on a private socket and only it is killed afterwards."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.cluster import Cluster
from core.config import ClusterConfig, load_config
from core.engines.llama_rpc.build import find_cached_binary
from core.status import READY
from tests.cluster_files import llama_processes_with, processes_under, toml_text
from tests.test_tui_pilot import free_ports

pytestmark = pytest.mark.integration

COLUMNS, ROWS = 140, 40


class Tmux:
    def __init__(self, socket: str) -> None:
        self.socket = socket

    def run(self, *args: str) -> str:
        # No COLUMNS/LINES from the test run: the program must see the pane's own size.
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "TMUX")}
        return subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", *args], env=env,
                              check=True, capture_output=True, text=True, timeout=10).stdout

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "e2e")

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", "e2e", *keys)

    def open_dashboard(self, cluster_file: Path) -> None:
        """The real torbiz-tui on `cluster_file` in a 140x40 pane; "torbiz-tui exited with N"
        shows when it ends."""
        entry = Path(sys.executable).with_name("torbiz-tui")
        command = [str(entry)] if entry.exists() else [sys.executable, "-m", "tui.cli"]
        # The dashboard starts on Enter, once the pane has its final size: a resize that lands
        # while it starts up could be missed, and the screen drawn at 80x24.
        shell = ("read go; " + " ".join(command) + f" -c {cluster_file}; "
                 "echo \"torbiz-tui exited with $?\"; sleep 600")
        self.run("new-session", "-d", "-s", "e2e", "-x", str(COLUMNS), "-y", str(ROWS),
                 "-e", "TERM=xterm-256color", "sh", "-c", shell)
        size = self.run("display-message", "-p", "-t", "e2e", "#{pane_width}x#{pane_height}")
        assert size.strip() == f"{COLUMNS}x{ROWS}"
        self.keys("Enter")

    def wait_for(self, *texts: str, absent: str = "", timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            shown = self.screen()
            if all(t in shown for t in texts) and not (absent and absent in shown):
                return shown
            if time.monotonic() > deadline:
                raise AssertionError(f"waited {timeout:g} s for {texts!r}"
                                     f"{f' without {absent!r}' if absent else ''}; "
                                     f"the screen:\n{shown}")
            time.sleep(0.2)


def row(screen: str, name: str) -> str:
    """The table row of node `name` as shown."""
    return next((line for line in screen.splitlines() if f"│ {name} " in line), "")


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux not installed")
    server = Tmux(f"torbiz-e2e-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield server
    finally:
        subprocess.run(["tmux", "-L", server.socket, "kill-server"], capture_output=True,
                       timeout=10)


@pytest.fixture
def cluster_file(tmp_path: Path) -> Iterator[Path]:
    binary = find_cached_binary("ggml-rpc-server")
    if binary is None:
        pytest.skip("ggml-rpc-server not built: run `torbiz-tui build-llama`")
    *rpc_ports, coordinator_port = free_ports(3)
    nodes = [{"name": name, "host": "127.0.0.1", "transport": "local", "rpc_port": port,
              "threads": 1, "rpc_server": str(binary)}
             for name, port in zip(("alpha", "beta"), rpc_ports, strict=True)]
    path = tmp_path / "cluster.toml"
    path.write_text(toml_text(
        {"name": "e2e", "state_dir": str(tmp_path / "state")}, nodes,
        model={"gguf": str(tmp_path / "absent.gguf"), "context": 512},
        coordinator={"host": "127.0.0.1", "port": coordinator_port}))
    yield path
    config = load_config(path)

    async def stop_all(config: ClusterConfig) -> None:
        cleanup = Cluster(config)
        try:
            await cleanup.stop_workers()
        finally:
            await cleanup.close()

    asyncio.run(stop_all(config))
    assert llama_processes_with([f"-p {port}" for port in rpc_ports]) == []
    assert processes_under(str(tmp_path / "state")) == []


def test_an_operator_session_in_tmux(cluster_file: Path, tmux: Tmux) -> None:
    tmux.open_dashboard(cluster_file)

    screen = tmux.wait_for("torbiz · e2e", "2 nodes", "○ stopped", absent="probing")
    assert "○ stopped" in row(screen, "alpha") and "○ stopped" in row(screen, "beta")
    assert "coordinator stopped" in screen
    assert "s Start" in screen and "q Quit" in screen

    tmux.keys("s")  # start the selected node (alpha, the first row)
    screen = tmux.wait_for("1 ready", "Starting RPC server")
    assert "● ready" in row(screen, "alpha")
    assert "log · alpha" in screen  # its worker log streams in the pane

    tmux.keys("l")  # the full-screen log
    # The log view draws on its next redraw slot (tui/redraw.py), not in the same frame.
    screen = tmux.wait_for("worker log · alpha", "follow on", "esc Back", "Starting RPC server")
    assert "nodes ─" not in screen  # the dashboard is covered

    tmux.keys("Escape")
    screen = tmux.wait_for("╭─ nodes", "s Start", absent="esc Back")

    tmux.keys("j", "s")  # beta too, so that quitting has something to leave running
    screen = tmux.wait_for("2 ready")
    tmux.keys("k", "x")  # stop alpha: asks first
    screen = tmux.wait_for("Stop the worker on alpha")
    tmux.keys("y")
    screen = tmux.wait_for("1 ready", "1 stopped", absent="Stop the worker on")
    assert "○ stopped" in row(screen, "alpha") and "● ready" in row(screen, "beta")

    tmux.keys("q")  # asks: leave the cluster running (the default) or stop it
    screen = tmux.wait_for("Leave it running", "Stop the cluster", "1 of 2 workers not stopped")
    tmux.keys("Enter")
    tmux.wait_for("torbiz-tui exited with 0")

    # The worker the dashboard left running is still there, and the same as before.
    async def beta_state(path: Path) -> str:
        cluster = Cluster(load_config(path))
        try:
            return (await cluster.probe_node("beta")).state
        finally:
            await cluster.close()

    assert asyncio.run(beta_state(cluster_file)) == READY


def test_plan_up_layer_map_and_throughput_over_ssh(tmp_path: Path, sshd_cluster,
                                                   tmux: Tmux) -> None:
    """Three sshd nodes, the demo model: p shows the plan, u there brings the cluster up as
    planned, and during a generation the layer map shows what llama-server loaded (= plan) and
    the throughput panel a live rate; d takes everything down."""
    import threading

    import httpx

    from core.demo_model import ensure_demo_model
    from tests.cluster_files import ssh_cluster_file

    if not (find_cached_binary("ggml-rpc-server") and find_cached_binary("llama-server")):
        pytest.skip("llama.cpp not built: run `torbiz-tui build-llama`")
    sshd = sshd_cluster(count=3)
    path = ssh_cluster_file(tmp_path, sshd, ensure_demo_model(tmp_path / "demo.gguf"))
    config = load_config(path)
    tmux.open_dashboard(path)
    names = [n.name for n in config.nodes]
    streaming, done = threading.Event(), threading.Event()
    try:
        tmux.wait_for("3 nodes", "○ stopped", absent="probing")
        tmux.keys("p")
        screen = tmux.wait_for("plan (nothing started)", "8 blocks", timeout=60)
        assert all(name in screen for name in names)
        tmux.keys("u")  # from the plan screen: up with this plan
        screen = tmux.wait_for("3 ready", "coordinator ready", "as loaded by llama-server",
                               timeout=120)
        spans = [line for line in screen.splitlines() if "= plan" in line]
        assert len(spans) == 3, screen  # every worker loaded exactly its planned blocks
        assert all(any(name in line for line in spans) for name in names)

        def generate() -> None:
            """Streamed completions back to back (the context is small: each is short)."""
            while not done.is_set():
                try:
                    with httpx.stream("POST", f"http://127.0.0.1:{config.coordinator.port}"
                                      "/v1/chat/completions", timeout=120, json={
                                          "messages": [{"role": "user", "content": "hi"}],
                                          "max_tokens": 4000, "ignore_eos": True,
                                          "stream": True}) as reply:
                        for _ in reply.iter_lines():
                            streaming.set()
                except httpx.HTTPError:
                    return  # `d` below takes the coordinator down under this stream

        thread = threading.Thread(target=generate, daemon=True)
        thread.start()
        assert streaming.wait(60)
        screen = tmux.wait_for("1 processing", "tokens (", timeout=30)
        # The running rate needs two polls that saw the slot move (a second or two).
        deadline = time.monotonic() + 20
        while "tok/s" not in next(line for line in screen.splitlines() if "generation" in line) \
                and time.monotonic() < deadline:
            time.sleep(0.3)
            screen = tmux.screen()
        rate = next(line for line in screen.splitlines() if "generation" in line)
        # the running requests' rate, or (before a second poll saw them move) the last one's
        figure = re.search(r"generation\s+(?:last:\s*)?([0-9.]+) tok/s", rate)
        assert figure is not None and float(figure.group(1)) > 0, rate
        print("\n" + screen)  # the captured screen, for whoever reads the test log
        done.set()
        tmux.keys("d")
        tmux.wait_for("Take cluster")
        tmux.keys("y")
        tmux.wait_for("3 stopped", "coordinator stopped", timeout=60)
        thread.join(30)
        tmux.keys("q")
        tmux.wait_for("torbiz-tui exited with 0")
    finally:
        done.set()

        async def stop_all() -> None:
            cleanup = Cluster(config)
            try:
                await cleanup.down()
            finally:
                await cleanup.close()

        asyncio.run(stop_all())
    assert processes_under(str(tmp_path / "state")) == []
