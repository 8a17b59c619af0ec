"""The dashboard driven by Pilot against real parts: a real Cluster, real ggml-rpc-server workers
on this machine (transport = "local"), real pidfiles and logs. Nothing is faked."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import Footer
from textual.worker import WorkerState

from core.cluster import Cluster
from core.config import ClusterConfig, load_config
from core.demo_model import ensure_demo_model
from core.engines.llama_rpc.build import find_cached_binary
from core.status import READY, STOPPED, NodeStatus
from tests.cluster_files import llama_processes_with, processes_under, ssh_cluster_file, toml_text
from tui.app import ConfirmScreen, QuitScreen, TorbizApp, make_app
from tui.screens.main import MainScreen
from tui.widgets.coordinator_bar import CoordinatorBar
from tui.widgets.log_pane import MAX_LINES, LogPane
from tui.widgets.node_table import NodeTable

pytestmark = pytest.mark.integration

SIZE = (140, 40)
PORT_RANGE = range(51300, 51400)


def free_ports(count: int) -> list[int]:
    """Ports in PORT_RANGE nothing listens on now (other test runs may share the machine)."""
    ports = []
    for port in PORT_RANGE:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    pytest.skip(f"no {count} free ports in {PORT_RANGE.start}-{PORT_RANGE.stop - 1}")


async def _local_cluster(tmp_path: Path, gguf: Path) -> AsyncIterator[ClusterConfig]:
    """Two local nodes; afterwards everything is stopped and nothing may be left running."""
    binary = find_cached_binary("ggml-rpc-server")
    if binary is None:
        pytest.skip("ggml-rpc-server not built: run `torbiz-tui build-llama`")
    *rpc_ports, coordinator_port = free_ports(3)
    nodes = [{"name": name, "host": "127.0.0.1", "transport": "local", "rpc_port": port,
              "threads": 1, "rpc_server": str(binary)}
             for name, port in zip(("alpha", "beta"), rpc_ports, strict=True)]
    path = tmp_path / "cluster.toml"
    path.write_text(toml_text(
        {"name": "pilot", "state_dir": str(tmp_path / "state")}, nodes,
        model={"gguf": str(gguf), "context": 512},
        # Every worker takes blocks (pack would keep the tiny model on the coordinator alone).
        plan={"policy": "spread", "coordinator_layers": False},
        coordinator={"host": "127.0.0.1", "port": coordinator_port}))
    config = load_config(path)
    markers = [f"-p {port}" for port in rpc_ports] + [f"--port {coordinator_port}"]
    try:
        yield config
    finally:
        cleanup = Cluster(config)
        try:
            await cleanup.stop_coordinator()
            await cleanup.stop_workers()
        finally:
            await cleanup.close()
        assert llama_processes_with(markers) == []
        assert processes_under(str(tmp_path / "state")) == []  # no log follower left either


@pytest.fixture
async def local_cluster(tmp_path: Path) -> AsyncIterator[ClusterConfig]:
    """Workers only: the model file does not exist, so the coordinator cannot start."""
    async for config in _local_cluster(tmp_path, tmp_path / "absent.gguf"):
        yield config


@pytest.fixture
async def model_cluster(tmp_path: Path) -> AsyncIterator[ClusterConfig]:
    """Workers and a coordinator serving the tiny random-weight demo model."""
    if find_cached_binary("llama-server") is None:
        pytest.skip("llama-server not built: run `torbiz-tui build-llama`")
    async for config in _local_cluster(tmp_path, ensure_demo_model(tmp_path / "demo.gguf")):
        yield config


async def wait_until(pilot: Pilot[Any], predicate: Callable[[], bool], what: str,
                     timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g} s for {what}")
        await pilot.pause(0.1)


def table(app: TorbizApp) -> NodeTable:
    return app.main.query_one(NodeTable)


def refreshed(app: TorbizApp) -> Callable[[], bool]:
    """The first refresh replaced the placeholder states."""
    return lambda: all(table(app).state_of(n.name) not in (None, "probing")
                       for n in app.config.nodes)


def pane(app: TorbizApp) -> LogPane:
    return app.main.query_one(LogPane)


def coordinator_state(app: TorbizApp) -> str:
    return app.main.query_one(CoordinatorBar).status.state


def footer_actions(app: TorbizApp) -> set[str]:
    footer = app.screen.query_one(Footer)
    return {key.action for key in footer.query("FooterKey")}  # type: ignore[attr-defined]


def log_text(app: TorbizApp) -> str:
    return "\n".join(app.main.query_one(LogPane).plain_lines())


def worker_pids(config: ClusterConfig, name: str) -> list[int]:
    port = config.node(name).rpc_port
    return [p.pid for p in llama_processes_with([f"-p {port}"])]


async def test_start_then_stop_the_selected_node(local_cluster: ClusterConfig) -> None:
    app = make_app(local_cluster)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, refreshed(app), "the first refresh")
        assert table(app).selected == "alpha"
        assert table(app).state_of("alpha") == STOPPED
        assert app.main.query_one(CoordinatorBar).status.state == STOPPED
        await wait_until(pilot, lambda: {"start_node", "stop_node", "start_coordinator", "up",
                                         "down", "quit"} <= footer_actions(app), "the footer")

        await pilot.press("s")
        await wait_until(pilot, lambda: table(app).state_of("alpha") == READY
                         and app.cluster.nodes["alpha"].state == READY, "alpha ready")
        pid = app.cluster.nodes["alpha"].pid
        assert pid in worker_pids(local_cluster, "alpha")
        assert table(app).state_of("beta") == STOPPED
        # The real worker's own log streams into the pane.
        await wait_until(pilot, lambda: "Starting RPC server" in log_text(app),
                         "the worker's banner in the log pane")
        assert app.main.query_one(LogPane).source == "alpha"

        await pilot.press("x")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")  # the answer no stops nothing
        await pilot.pause(0.5)
        assert not isinstance(app.screen, ConfirmScreen)
        assert worker_pids(local_cluster, "alpha") == [pid]

        await pilot.press("x")
        await pilot.pause()
        await pilot.press("y")
        await wait_until(pilot, lambda: table(app).state_of("alpha") == STOPPED
                         and app.cluster.nodes["alpha"].state == STOPPED, "alpha stopped")
        assert worker_pids(local_cluster, "alpha") == []


async def test_read_only_hides_and_ignores_actions(local_cluster: ClusterConfig) -> None:
    app = make_app(local_cluster, read_only=True)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, refreshed(app), "the first refresh")
        await wait_until(pilot, lambda: "quit" in footer_actions(app), "the footer")
        actions = footer_actions(app)
        assert not actions & {"start_node", "stop_node", "start_coordinator",
                              "stop_coordinator", "up", "down"}
        assert "read-only" in app.sub_title

        for key in ("s", "u", "c"):
            await pilot.press(key)
        await pilot.pause(3.0)  # longer than a start takes and than one refresh interval
        assert table(app).state_of("alpha") == STOPPED
        assert app.cluster.nodes["alpha"].state == STOPPED
        assert worker_pids(local_cluster, "alpha") == []
        await pilot.press("d")
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmScreen)


async def test_selection_switches_the_log_stream(local_cluster: ClusterConfig) -> None:
    app = make_app(local_cluster)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, refreshed(app), "the first refresh")
        await pilot.press("s")
        await wait_until(pilot, lambda: "Starting RPC server" in log_text(app), "alpha's log")

        await pilot.press("j")
        await wait_until(pilot, lambda: pane(app).source == "beta", "beta selected")
        assert table(app).selected == "beta"
        assert "beta" in str(app.main.query_one(LogPane).border_title)
        assert "Starting RPC server" not in log_text(app)  # alpha's lines went with it
        await pilot.pause(1.0)
        running = [w for w in app.workers
                   if w.group == "log" and w.state in (WorkerState.PENDING, WorkerState.RUNNING)]
        assert [w.description for w in running] == ["follow_log('beta')"]

        await pilot.press("s")  # beta's worker, started from its row, logs into the pane
        await wait_until(pilot, lambda: table(app).state_of("beta") == READY, "beta ready")
        beta_endpoint = local_cluster.node("beta").endpoint
        await wait_until(pilot, lambda: f"endpoint       : {beta_endpoint}" in log_text(app),
                         "beta's banner")

        await pilot.press("k")
        await wait_until(pilot, lambda: pane(app).source == "alpha", "alpha again")
        await wait_until(pilot, lambda: "Starting RPC server" in log_text(app), "alpha's log")


async def test_failures_become_error_notifications(local_cluster: ClusterConfig) -> None:
    app = make_app(local_cluster)
    seen: list[tuple[str, str]] = []
    notify = app.notify

    def record(message: str, **kwargs: Any) -> None:
        seen.append((kwargs.get("severity", "information"), message))
        notify(message, **kwargs)

    app.notify = record  # type: ignore[method-assign]
    port = local_cluster.node("alpha").rpc_port
    with socket.socket() as squatter:  # a program this cluster did not start holds the port
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, refreshed(app), "the first refresh")
            await pilot.press("s")
            await wait_until(pilot, lambda: any(s == "error" and "already in use" in m
                                                for s, m in seen), "the port error")
            assert worker_pids(local_cluster, "alpha") == []
            assert "already in use" in log_text(app)  # kept next to the node's log too

            await pilot.press("c")  # the model file does not exist
            await wait_until(pilot, lambda: any(s == "error" and "not found" in m
                                                for s, m in seen), "the model error")


async def test_quit_leaves_the_worker_running_and_a_new_dashboard_reattaches(
        local_cluster: ClusterConfig) -> None:
    app = make_app(local_cluster)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, refreshed(app), "the first refresh")
        await pilot.press("s")
        await wait_until(pilot, lambda: table(app).state_of("alpha") == READY, "alpha ready")
        pid = app.cluster.nodes["alpha"].pid
        await pilot.press("q")
        await pilot.pause()
        assert isinstance(app.screen, QuitScreen)
        await pilot.press("enter")  # the default: leave it running
        await wait_until(pilot, lambda: not app.is_running, "the dashboard closed")
    assert app.return_code == 0
    assert worker_pids(local_cluster, "alpha") == [pid]

    again = make_app(local_cluster)
    async with again.run_test(size=SIZE) as pilot:
        await wait_until(pilot, refreshed(again), "the first refresh")
        assert table(again).state_of("alpha") == READY
        assert again.cluster.nodes["alpha"].pid == pid


async def test_remote_text_is_inert_and_the_log_is_bounded(local_cluster: ClusterConfig) -> None:
    """What a node sends (log lines, error sentences) can neither style nor steer the screen."""
    hostile = "\x1b]0;owned\x07\x1b[31m[bold red]boom[/] [@click=app.quit]x[/]\x1b[0m\rover"
    app = make_app(local_cluster)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, refreshed(app), "the first refresh")
        await wait_until(pilot, lambda: pane(app).source == "alpha", "alpha's log")
        lines = [f"line {i}" for i in range(MAX_LINES + 1_000)] + [hostile]
        app.main.post_message(MainScreen.LogLines("alpha", lines))
        app.main.post_message(MainScreen.LogLines("beta", ["not the selected node"]))
        status = app.cluster.nodes["alpha"]
        app.main.post_message(MainScreen.NodeUpdated(NodeStatus(
            status.name, status.host, status.backend, "failed", None, status.endpoint, hostile)))
        await wait_until(pilot, lambda: table(app).state_of("alpha") == "failed", "the event")

        assert pane(app).line_count == MAX_LINES
        inert = "[bold red]boom[/] [@click=app.quit]x[/] over"
        assert pane(app).plain_lines()[-1] == inert
        assert "not the selected node" not in log_text(app)
        cell = table(app).get_cell("alpha", "error")
        assert cell.plain == inert
        assert app.is_running  # the [@click=app.quit] was text, not an action


async def test_up_coordinator_toggle_and_down(model_cluster: ClusterConfig) -> None:
    app = make_app(model_cluster)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, refreshed(app), "the first refresh")
        await pilot.press("u")
        await wait_until(pilot, lambda: coordinator_state(app) == READY,
                         f"the coordinator ready ({app.cluster.coordinator})", timeout=120)
        assert [table(app).state_of(n.name) for n in model_cluster.nodes] == [READY, READY]
        await wait_until(pilot, lambda: "stop_coordinator" in footer_actions(app) and
                         "start_coordinator" not in footer_actions(app), "c to mean stop")

        await pilot.press("c")  # running: c stops it, after asking
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await wait_until(pilot, lambda: coordinator_state(app) == STOPPED,
                         "the coordinator stopped", timeout=30)
        assert table(app).state_of("alpha") == READY  # the workers stay

        await pilot.press("d")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await wait_until(pilot, lambda: all(table(app).state_of(n.name) == STOPPED
                                            for n in model_cluster.nodes), "all stopped",
                         timeout=30)
        assert llama_processes_with([f"-p {n.rpc_port}" for n in model_cluster.nodes]) == []


async def test_start_and_stop_a_node_over_real_ssh(tmp_path: Path, sshd_cluster: Any) -> None:
    """The same keys against OpenSSH nodes: the worker, its pidfile and its log live behind SSH."""
    if find_cached_binary("ggml-rpc-server") is None:
        pytest.skip("ggml-rpc-server not built: run `torbiz-tui build-llama`")
    sshd = sshd_cluster(count=2)
    config = load_config(ssh_cluster_file(tmp_path, sshd, tmp_path / "absent.gguf",
                                          name="pilot"))
    markers = [f"-H {n.host} -p {n.rpc_port}" for n in config.nodes]
    first = config.nodes[0]
    app = make_app(config)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, refreshed(app), "the first refresh over SSH")
            assert table(app).state_of(first.name) == STOPPED
            await pilot.press("s")
            await wait_until(pilot, lambda: table(app).state_of(first.name) == READY
                             and app.cluster.nodes[first.name].state == READY,
                             f"{first.name} ready ({app.cluster.nodes[first.name]})", timeout=30)
            assert len(llama_processes_with(markers[:1])) == 1
            await wait_until(pilot, lambda: f"endpoint       : {first.endpoint}"
                             in log_text(app), "the worker's banner streamed over SSH")
            await pilot.press("x")
            await pilot.pause()
            await pilot.press("y")
            await wait_until(pilot, lambda: table(app).state_of(first.name) == STOPPED,
                             f"{first.name} stopped", timeout=30)
            assert llama_processes_with(markers) == []
    finally:
        cleanup = Cluster(config)
        try:
            await cleanup.stop_workers()
        finally:
            await cleanup.close()
    assert llama_processes_with(markers) == []
    # The log follower ran on the node under sshd; closing the channel must end it.
    deadline = time.monotonic() + 10
    while processes_under(str(tmp_path / "state")) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert processes_under(str(tmp_path / "state")) == []
