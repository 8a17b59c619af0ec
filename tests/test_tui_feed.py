"""The dashboard's widgets under a synthetic feed: the app's own messages carrying NodeStatus,
CoordinatorStatus and Notice values, no cluster behind them (live=False starts no IO)."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import ClusterConfig, load_config
from core.status import (
    FAILED,
    READY,
    STARTING,
    STOPPED,
    UNREACHABLE,
    CoordinatorStatus,
    NodeStatus,
    Notice,
)
from tui.app import TorbizApp, make_app
from tui.screens.logs import LogsScreen
from tui.widgets.load_progress import LoadProgress
from tui.widgets.log_pane import LogPane
from tui.widgets.log_view import LogView
from tui.widgets.node_table import SPINNER, NodeTable
from tui.widgets.status_line import StatusLine

from .cluster_files import toml_text

SIZE = (140, 40)


def synthetic_config(tmp_path: Path, names: list[str]) -> ClusterConfig:
    nodes = [{"name": name, "host": f"10.0.0.{i + 1}", "rpc_port": 50052, "transport": "ssh"}
             for i, name in enumerate(names)]
    path = tmp_path / "cluster.toml"
    path.write_text(toml_text({"name": "feed", "state_dir": str(tmp_path / "state")}, nodes,
                              model={"gguf": str(tmp_path / "none.gguf")},
                              coordinator={"host": "127.0.0.1", "port": 8181}))
    return load_config(path)


def node(config: ClusterConfig, name: str, state: str, pid: int | None = None,
         error: str = "") -> TorbizApp.NodeUpdated:
    n = config.node(name)
    return TorbizApp.NodeUpdated(NodeStatus(n.name, n.host, n.backend, state, pid, n.endpoint,
                                            error))


def status_text(app: TorbizApp) -> str:
    return str(app.main.query_one(StatusLine).render())


@pytest.fixture
def config(tmp_path: Path) -> ClusterConfig:
    return synthetic_config(tmp_path, ["gpu-a", "gpu-b", "cpu-c", "cpu-d"])


async def test_status_line_counts_states(config: ClusterConfig) -> None:
    app = make_app(config, live=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert "4 nodes" in status_text(app)
        for name, state in (("gpu-a", READY), ("gpu-b", READY), ("cpu-c", STARTING),
                            ("cpu-d", FAILED)):
            app.post_message(node(config, name, state))
        await pilot.pause()
        assert "2 ready  ·  1 starting  ·  1 failed" in status_text(app)
        app.post_message(node(config, "cpu-d", UNREACHABLE, error="no SSH answer"))
        app.post_message(node(config, "cpu-c", STOPPED))
        await pilot.pause()
        text = status_text(app)
        assert "0 starting" in text and "0 failed" in text
        assert "1 unreachable" in text and "1 stopped" in text


async def test_spinner_turns_on_starting_rows_only(config: ClusterConfig) -> None:
    app = make_app(config, live=False)
    app.animation_level = "full"
    async with app.run_test(size=SIZE) as pilot:
        app.post_message(node(config, "gpu-a", STARTING))
        app.post_message(node(config, "gpu-b", READY))
        await pilot.pause()
        table = app.main.query_one(NodeTable)
        frames = set()
        for _ in range(6):
            frames.add(table.get_cell("gpu-a", "state").plain[0])
            await pilot.pause(0.15)
        assert len(frames) > 1 and frames <= set(SPINNER)
        assert table.get_cell("gpu-b", "state").plain == "● ready"
        app.post_message(node(config, "gpu-a", READY))
        await pilot.pause(0.3)
        assert table.get_cell("gpu-a", "state").plain == "● ready"


async def test_load_progress_shows_while_the_coordinator_starts(config: ClusterConfig) -> None:
    app = make_app(config, live=False)
    async with app.run_test(size=SIZE) as pilot:
        progress = app.main.query_one(LoadProgress)
        await pilot.pause()
        assert not progress.display or not progress.has_class("-loading")
        app.post_message(TorbizApp.CoordinatorUpdated(
            CoordinatorStatus(STARTING, "http://127.0.0.1:8181", 4242)))
        await pilot.pause()
        assert progress.has_class("-loading")
        app.post_message(TorbizApp.NoticeReceived(Notice(
            "coordinator loading the model (15 s, /health says 503)")))
        await pilot.pause()
        assert "15 s" in str(progress.query_one("#load-label").render())
        assert app.event_log[-1].endswith("coordinator loading the model (15 s, /health says "
                                          "503)")
        # A fraction from the core (issue 3) makes the bar determinate.
        app.post_message(TorbizApp.NoticeReceived(Notice(
            "coordinator loading the model (20 s, /health says 503)",
            extra={"load_progress": 0.5})))
        await pilot.pause()
        assert progress.query_one("#load-bar").percentage == 0.5  # type: ignore[attr-defined]
        app.post_message(TorbizApp.CoordinatorUpdated(
            CoordinatorStatus(READY, "http://127.0.0.1:8181", 4242)))
        await pilot.pause()
        assert not progress.has_class("-loading")


async def test_a_flood_of_log_lines_is_bounded_and_follows(config: ClusterConfig) -> None:
    app = make_app(config, live=False, log_lines=1_000)
    async with app.run_test(size=SIZE) as pilot:
        app.post_message(node(config, "gpu-a", READY, 101))
        await pilot.pause()
        pane = app.main.query_one(LogPane)
        assert pane.source == "gpu-a"
        for batch in range(20):
            app.post_message(TorbizApp.LogLines("gpu-a", [f"{batch}:{i}" for i in range(500)]))
        await pilot.pause()
        assert pane.line_count == 1_000
        assert pane.plain_lines()[-1] == "19:499"
        assert pane.scroll_y == pane.max_scroll_y  # following the newest line


async def test_log_view_search_wrap_and_trim() -> None:
    """The log view alone: search positions, wrap rows, and matches trimmed away."""
    from textual.app import App, ComposeResult

    class One(App[None]):
        def compose(self) -> ComposeResult:
            yield LogView(max_lines=50)

    app = One()
    async with app.run_test(size=(40, 10)) as pilot:
        view = app.query_one(LogView)
        view.append([f"line {i} " + ("x" * 70 if i % 10 == 0 else "") for i in range(60)])
        await pilot.pause()
        assert view.line_count == 50 and view.plain_lines()[0].startswith("line 10 ")
        assert view.set_search("LINE 2") == (1, 10)  # lines 20-29, any case
        assert view.set_search("line 2 ") == (0, 0)  # line 2 itself was trimmed away
        # The search starts from the top of the view (line 20 is centred there by now).
        assert view.set_search("x" * 10) == (2, 5)
        assert view.next_match(forward=False) == (1, 5)
        assert view.next_match(forward=False) == (5, 5)  # wraps around
        assert view.next_match() == (1, 5)
        assert not view.following
        width = view.virtual_size.width
        view.wrap = True
        await pilot.pause()
        assert view.virtual_size.width <= 40 < width
        assert view.virtual_size.height > view.line_count  # long lines take several rows
        view.append(["new"])
        assert view.plain_lines()[-1] == "new"
        view.action_scroll_end()
        assert view.following


async def test_event_log_screen_gets_new_notices(config: ClusterConfig) -> None:
    app = make_app(config, live=False, clock=lambda: "12:00:00")
    async with app.run_test(size=SIZE) as pilot:
        app.post_message(TorbizApp.NoticeReceived(Notice("gpu-a: worker ready", node="gpu-a")))
        await pilot.pause()
        await pilot.press("e")
        await pilot.pause()
        assert isinstance(app.screen, LogsScreen)
        view = app.screen.query_one(LogView)
        assert view.plain_lines() == ["12:00:00 info    gpu-a: worker ready"]
        app.post_message(TorbizApp.NoticeReceived(Notice("cpu-d: boom", "error", "cpu-d")))
        await pilot.pause()
        assert view.plain_lines()[-1] == "12:00:00 error   cpu-d: boom"
