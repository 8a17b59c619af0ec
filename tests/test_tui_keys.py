"""The dashboard's keys driven by Pilot against real parts: real ggml-rpc-server workers on this
machine (transport = "local") or behind real OpenSSH daemons, real pidfiles and logs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from textual.command import CommandList, CommandPalette
from textual.widgets import Footer, Input

from core.cluster import Cluster
from core.config import ClusterConfig, load_config
from core.engines.llama_rpc.build import find_cached_binary
from core.status import READY, STOPPED
from tests import test_tui_pilot as parts
from tests.cluster_files import llama_processes_with, processes_under, ssh_cluster_file
from tui.app import CHANGES_CLUSTER, ConfirmScreen, QuitScreen, TorbizApp, make_app
from tui.screens.help import HelpScreen
from tui.screens.logs import LogsScreen
from tui.screens.main import MainScreen
from tui.widgets.log_view import LogView
from tui.widgets.node_filter import NodeFilter
from tui.widgets.status_line import StatusLine

pytestmark = pytest.mark.integration

SIZE = parts.SIZE
table = parts.table
wait_until = parts.wait_until
refreshed = parts.refreshed
worker_pids = parts.worker_pids
model_cluster = parts.model_cluster
footer_actions = parts.footer_actions


@pytest.fixture
async def local_cluster(tmp_path: Path) -> AsyncIterator[ClusterConfig]:
    """Two local workers (alpha, beta); the coordinator's model does not exist."""
    async for config in parts._local_cluster(tmp_path, tmp_path / "absent.gguf"):
        yield config


def logs_view(app: TorbizApp) -> LogView:
    assert isinstance(app.screen, LogsScreen)
    return app.screen.query_one(LogView)


def logs_text(app: TorbizApp) -> str:
    return "\n".join(logs_view(app).plain_lines())


def screen_text(app: TorbizApp) -> str:
    """What the terminal shows now, as text."""
    return "\n".join(line.text for line in app.screen._compositor.render_strips())


def palette_prompts(app: TorbizApp) -> list[str]:
    options = app.screen.query_one(CommandList).options
    return [str(option.hit.text) for option in options]  # type: ignore[attr-defined]


async def start_alpha(pilot: Any, app: TorbizApp) -> int:
    await wait_until(pilot, refreshed(app), "the first refresh")
    await pilot.press("s")
    await wait_until(pilot, lambda: table(app).state_of("alpha") == READY
                     and app.cluster.nodes["alpha"].state == READY, "alpha ready")
    pid = app.cluster.nodes["alpha"].pid
    assert pid is not None
    return pid


async def test_restart_replaces_the_worker(local_cluster: ClusterConfig) -> None:
    app = make_app(local_cluster)
    async with app.run_test(size=SIZE) as pilot:
        old = await start_alpha(pilot, app)
        assert worker_pids(local_cluster, "alpha") == [old]
        await pilot.press("r")  # no coordinator runs: nothing to ask
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmScreen)
        await wait_until(pilot, lambda: app.cluster.nodes["alpha"].state == READY
                         and app.cluster.nodes["alpha"].pid not in (None, old)
                         and table(app).state_of("alpha") == READY, "a new alpha worker")
        new = app.cluster.nodes["alpha"].pid
        assert worker_pids(local_cluster, "alpha") == [new]
        assert "alpha: worker stopped" in "\n".join(app.event_log)
        await wait_until(pilot, lambda: "restart_node" in footer_actions(app), "r again")


async def test_restart_and_stop_are_greyed_on_a_stopped_node(
        local_cluster: ClusterConfig) -> None:
    app = make_app(local_cluster)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, refreshed(app), "the first refresh")
        await wait_until(pilot, lambda: "quit" in footer_actions(app), "the footer")
        footer = app.screen.query_one(Footer)

        def greyed() -> set[str]:
            return {key.action for key in footer.query("FooterKey")  # type: ignore[attr-defined]
                    if key.has_class("-disabled")}

        # The footer re-reads check_action after the first refresh's redraw, not with it.
        await wait_until(pilot, lambda: "start_node" not in greyed(), "start to be offered")
        assert {"restart_node", "stop_node"} <= greyed()
        await pilot.press("r")
        await pilot.pause(1.0)
        assert worker_pids(local_cluster, "alpha") == []


async def test_logs_screen_follow_search_wrap_and_sources(
        local_cluster: ClusterConfig) -> None:
    app = make_app(local_cluster)
    async with app.run_test(size=SIZE) as pilot:
        await start_alpha(pilot, app)
        await pilot.press("l")
        await wait_until(pilot, lambda: isinstance(app.screen, LogsScreen), "the logs screen")
        await wait_until(pilot, lambda: "Starting RPC server" in logs_text(app),
                         "alpha's worker log, full screen")
        view = logs_view(app)
        assert view.following
        assert "worker log · alpha" in screen_text(app)
        # The main screen's keys do not apply here: `s` is not "start".
        assert "start_node" not in footer_actions(app)

        await pilot.press("f")
        assert not view.following
        assert "follow off" in screen_text(app)
        await pilot.press("f")
        assert view.following

        await pilot.press("slash")
        assert isinstance(app.focused, Input)
        await pilot.press(*"ENDPOINT", "enter")  # any case
        await pilot.pause()
        assert view.search_term == "endpoint"
        assert view.match_position() == (1, 1)
        assert not view.following  # a match is being read
        assert "1/1" in screen_text(app)
        await pilot.press("n")
        assert view.match_position() == (1, 1)  # wraps around to the only match
        await pilot.press("slash", "ctrl+a", "ctrl+k", *"no such text", "enter")
        await pilot.pause()
        assert view.match_position() == (0, 0)
        assert "no match" in screen_text(app)

        await pilot.press("w")
        assert view.wrap
        await pilot.press("w")
        assert not view.wrap

        await pilot.press("3")  # the event log: every notice of this session
        await wait_until(pilot, lambda: "alpha: worker ready" in logs_text(app), "events")
        await pilot.press("2")  # the coordinator never ran: its log has nothing yet
        await pilot.pause(0.5)
        assert "coordinator log" in screen_text(app)
        await pilot.press("1")
        await wait_until(pilot, lambda: "Starting RPC server" in logs_text(app), "alpha again")

        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, LogsScreen)
        await pilot.press("e")  # the event log straight from the dashboard
        await wait_until(pilot, lambda: isinstance(app.screen, LogsScreen)
                         and "alpha: worker ready" in logs_text(app), "the event log")
        await pilot.press("escape")


async def test_filter_narrows_the_table_and_escape_clears_it(
        local_cluster: ClusterConfig) -> None:
    app = make_app(local_cluster)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, refreshed(app), "the first refresh")
        await pilot.press("slash")
        assert isinstance(app.focused, NodeFilter)
        await pilot.press(*"bet")
        await pilot.pause()
        assert table(app).row_count == 1
        assert table(app).selected == "beta"
        assert "filter “bet”: 1 of 2 shown" in str(app.main.query_one(StatusLine).render())
        await pilot.press("enter")  # keeps the filter, back to the table
        assert app.focused is table(app)
        assert table(app).row_count == 1

        await pilot.press("s")  # the keys act on what the filter shows
        await wait_until(pilot, lambda: table(app).state_of("beta") == READY, "beta ready")
        assert worker_pids(local_cluster, "alpha") == []

        await pilot.press("slash", "ctrl+a", "ctrl+k", *"ready")  # states filter too
        await pilot.pause()
        assert table(app).row_count == 1
        await pilot.press("escape")
        await pilot.pause()
        assert table(app).row_count == 2
        assert table(app).filter_text == ""
        assert table(app).rows == ["alpha", "beta"]  # in their first order again


async def test_help_lists_every_key(local_cluster: ClusterConfig) -> None:
    app = make_app(local_cluster)
    async with app.run_test(size=(140, 80)) as pilot:
        await wait_until(pilot, refreshed(app), "the first refresh")
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        shown = screen_text(app)
        for binding in [*MainScreen.BINDINGS, *TorbizApp.BINDINGS, *LogsScreen.BINDINGS]:
            assert binding.tooltip.split()[0] in shown  # type: ignore[union-attr]
        for rows in (rows for _, rows in app.main.help_sections()):
            for _, what in rows:
                assert what[:30] in shown, what
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, HelpScreen)


async def test_palette_jumps_to_a_node_even_when_filtered_out(
        local_cluster: ClusterConfig) -> None:
    app = make_app(local_cluster)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, refreshed(app), "the first refresh")
        await pilot.press("slash", *"alpha", "enter")
        assert table(app).row_count == 1
        await pilot.press("colon")
        await pilot.pause()
        assert isinstance(app.screen, CommandPalette)
        await pilot.press(*"jump to node beta")
        await wait_until(pilot, lambda: "Jump to node beta" in palette_prompts(app),
                         "the jump command")
        await pilot.press("down", "enter")
        await wait_until(pilot, lambda: table(app).selected == "beta", "beta selected")
        assert table(app).row_count == 2  # the filter that hid beta went
        assert app.main.query_one("LogPane").source == "beta"  # type: ignore[attr-defined]

        await pilot.press("colon")  # the same actions as the keys
        await pilot.pause()
        await pilot.press(*"start the selected")
        await wait_until(pilot, lambda: "Start the selected node's worker"
                         in palette_prompts(app), "the start command")
        await pilot.press("down", "enter")
        await wait_until(pilot, lambda: table(app).state_of("beta") == READY, "beta ready")


async def test_read_only_hides_actions_in_the_palette_and_help(
        local_cluster: ClusterConfig) -> None:
    app = make_app(local_cluster, read_only=True)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, refreshed(app), "the first refresh")
        titles = [command.title for command in app.main.palette_commands()]
        assert "Jump to node beta" in titles
        changing = {b.tooltip for b in MainScreen.BINDINGS if b.action in CHANGES_CLUSTER}
        assert not changing & set(titles)
        await pilot.press("colon")
        await pilot.pause()
        await pilot.press(*"start")
        await pilot.pause(0.5)
        assert not any("Start" in prompt for prompt in palette_prompts(app))
        await pilot.press("escape")
        await pilot.press("r")  # hidden keys do nothing either
        await pilot.press("question_mark")
        await pilot.pause()
        shown = screen_text(app)
        assert "Read-only mode" in shown
        assert "Restart the selected" not in shown
        await pilot.press("escape", "q")  # read-only: nothing to ask, nothing stopped
        await wait_until(pilot, lambda: not app.is_running, "the dashboard closed")
        assert worker_pids(local_cluster, "alpha") == []


async def test_quit_can_stop_the_cluster(local_cluster: ClusterConfig) -> None:
    app = make_app(local_cluster)
    async with app.run_test(size=SIZE) as pilot:
        pid = await start_alpha(pilot, app)
        await pilot.press("q")
        await pilot.pause()
        assert isinstance(app.screen, QuitScreen)
        assert "1 of 2 workers not stopped" in screen_text(app)
        await pilot.press("escape")  # stay
        await pilot.pause()
        assert app.is_running and not isinstance(app.screen, QuitScreen)
        await pilot.press("q", "s")  # stop it, then quit
        await wait_until(pilot, lambda: not app.is_running, "the dashboard closed", timeout=30)
    assert app.return_code == 0
    assert worker_pids(local_cluster, "alpha") == []
    assert pid not in [p.pid for p in llama_processes_with(["ggml-rpc-server"])]


async def test_quit_asks_nothing_when_nothing_runs(local_cluster: ClusterConfig) -> None:
    app = make_app(local_cluster)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, refreshed(app), "the first refresh")
        await wait_until(pilot, lambda: app.main.query_one("CoordinatorBar").status.state
                         == STOPPED, "the coordinator known")  # type: ignore[attr-defined]
        await pilot.press("q")
        await wait_until(pilot, lambda: not app.is_running, "the dashboard closed")


async def test_restart_and_logs_over_real_ssh(tmp_path: Path, sshd_cluster: Any) -> None:
    """Restart and the full-screen log against OpenSSH nodes: the log streams from the file
    on the node, so the old worker's lines and the new one's are both there."""
    if find_cached_binary("ggml-rpc-server") is None:
        pytest.skip("ggml-rpc-server not built: run `torbiz-tui build-llama`")
    sshd = sshd_cluster(count=2)
    config = load_config(ssh_cluster_file(tmp_path, sshd, tmp_path / "absent.gguf",
                                          name="keys"))
    first = config.nodes[0]
    markers = [f"-H {n.host} -p {n.rpc_port}" for n in config.nodes]
    app = make_app(config)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, refreshed(app), "the first refresh over SSH")
            await pilot.press("s")
            await wait_until(pilot, lambda: app.cluster.nodes[first.name].state == READY,
                             f"{first.name} ready", timeout=30)
            old = app.cluster.nodes[first.name].pid
            await pilot.press("r")
            await wait_until(pilot, lambda: app.cluster.nodes[first.name].state == READY
                             and app.cluster.nodes[first.name].pid not in (None, old)
                             and table(app).state_of(first.name) == READY,
                             "the restarted worker", timeout=30)
            assert len(llama_processes_with(markers[:1])) == 1
            await pilot.press("l")
            await wait_until(pilot, lambda: isinstance(app.screen, LogsScreen)
                             and logs_text(app).count("Starting RPC server") >= 2,
                             "both workers' banners, streamed over SSH", timeout=30)
            await pilot.press("slash", *"endpoint", "enter")
            await pilot.pause()
            assert logs_view(app).match_position()[1] >= 2
            await pilot.press("escape")
    finally:
        cleanup = Cluster(config)
        try:
            await cleanup.stop_workers()
        finally:
            await cleanup.close()
    assert llama_processes_with(markers) == []
    deadline = time.monotonic() + 10
    while processes_under(str(tmp_path / "state")) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert processes_under(str(tmp_path / "state")) == []


async def test_up_refused_by_the_preflight_starts_nothing(local_cluster: ClusterConfig) -> None:
    """The model file is missing: `u` runs the same preflight as `torbiz-tui up`, says why,
    and no worker starts."""
    app = make_app(local_cluster)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, refreshed(app), "the first refresh")
        await pilot.press("u")
        await wait_until(pilot, lambda: any("nothing was started" in line
                                            for line in app.event_log), "the refusal")
        text = "\n".join(app.event_log)
        assert "absent.gguf" in text  # the reason names the missing model
        await pilot.pause(1.0)
        assert all(worker_pids(local_cluster, n.name) == [] for n in local_cluster.nodes)
        assert [table(app).state_of(n.name) for n in local_cluster.nodes] == [STOPPED] * 2


async def test_plan_preview_shows_the_plan_and_starts_nothing(
        model_cluster: ClusterConfig) -> None:
    from tui.screens.plan import PlanScreen

    app = make_app(model_cluster)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, refreshed(app), "the first refresh")
        await pilot.press("p")
        await wait_until(pilot, lambda: isinstance(app.screen, PlanScreen), "the plan screen",
                         timeout=60)  # probes every node and reads the model: slow when loaded
        await pilot.pause()
        shown = screen_text(app)
        assert "plan (nothing started)" in shown, shown
        assert "alpha" in shown and "beta" in shown and "8 blocks" in shown, shown
        await pilot.press("escape")
        await wait_until(pilot, lambda: not isinstance(app.screen, PlanScreen), "closed")
        assert all(worker_pids(model_cluster, n.name) == [] for n in model_cluster.nodes)


async def test_dashboard_notices_a_killed_worker_and_recovers(
        model_cluster: ClusterConfig) -> None:
    """kill -9 of a worker the coordinator uses: the dashboard says so within seconds and,
    the other worker holding the tiny model alone, restarts the coordinator over it."""
    import os
    import signal

    app = make_app(model_cluster)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, refreshed(app), "the first refresh")
        await pilot.press("u")
        await wait_until(pilot, lambda: app.cluster.coordinator.state == READY,
                         "the coordinator ready", timeout=120)
        old = app.cluster.coordinator.pid
        (victim,) = worker_pids(model_cluster, "beta")
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        await wait_until(pilot, lambda: table(app).state_of("beta") == "failed",
                         "beta shown failed", timeout=10)
        assert time.monotonic() - killed < 5
        await wait_until(pilot, lambda: any("coordinator recovered in" in line
                                            for line in app.event_log), "the recovery",
                         timeout=90)
        await wait_until(pilot, lambda: app.cluster.coordinator.state == READY
                         and app.cluster.coordinator.pid != old, "the new coordinator")
        assert any("without beta" in line for line in app.event_log)
        assert worker_pids(model_cluster, "alpha") != []


async def test_g_generates_through_the_cluster(model_cluster: ClusterConfig) -> None:
    app = make_app(model_cluster)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, refreshed(app), "the first refresh")
        assert app.main.check_action("generate", ()) is None  # greyed: nothing serves yet
        await pilot.press("u")
        await wait_until(pilot, lambda: app.cluster.coordinator.state == READY
                         and app.main.check_action("generate", ()) is True, "the coordinator",
                         timeout=120)
        await pilot.press("g")
        await wait_until(pilot, lambda: any("generated " in line for line in app.event_log),
                         "the generation", timeout=60)
        line = next(line for line in app.event_log if "generated " in line)
        assert "generated 16 tokens in " in line and "tok/s" in line, line
