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
    CoordinatorLoading,
    CoordinatorStatus,
    NodeStatus,
    Notice,
)
from tests.cluster_files import toml_text
from tests.test_tui_pilot import wait_until
from tui.app import TorbizApp, make_app
from tui.screens.logs import LogsScreen
from tui.screens.main import MainScreen
from tui.widgets.coordinator_bar import CoordinatorBar
from tui.widgets.load_progress import LoadProgress
from tui.widgets.log_pane import LogPane
from tui.widgets.log_view import LogView
from tui.widgets.node_table import SPINNER, NodeTable
from tui.widgets.status_line import StatusLine

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
         error: str = "") -> MainScreen.NodeUpdated:
    n = config.node(name)
    return MainScreen.NodeUpdated(NodeStatus(n.name, n.host, n.backend, state, pid, n.endpoint,
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
            app.main.post_message(node(config, name, state))
        # The status line redraws on the shared redraw clock (tui/redraw.py), not at once.
        await wait_until(pilot, lambda: "2 ready  ·  1 starting  ·  1 failed" in status_text(app),
                         "the counts")
        app.main.post_message(node(config, "cpu-d", UNREACHABLE, error="no SSH answer"))
        app.main.post_message(node(config, "cpu-c", STOPPED))
        await wait_until(pilot, lambda: "1 unreachable" in status_text(app), "the new counts")
        text = status_text(app)
        assert "0 starting" in text and "0 failed" in text
        assert "1 unreachable" in text and "1 stopped" in text


async def test_spinner_turns_on_starting_rows_only(config: ClusterConfig) -> None:
    app = make_app(config, live=False)
    app.animation_level = "full"
    async with app.run_test(size=SIZE) as pilot:
        app.main.post_message(node(config, "gpu-a", STARTING))
        app.main.post_message(node(config, "gpu-b", READY))
        await pilot.pause()
        table = app.main.query_one(NodeTable)
        frames = set()
        for _ in range(6):
            frames.add(table.get_cell("gpu-a", "state").plain[0])
            await pilot.pause(0.15)
        assert len(frames) > 1 and frames <= set(SPINNER)
        assert table.get_cell("gpu-b", "state").plain == "● ready"
        app.main.post_message(node(config, "gpu-a", READY))
        await pilot.pause(0.3)
        assert table.get_cell("gpu-a", "state").plain == "● ready"


async def test_load_progress_shows_while_the_coordinator_starts(config: ClusterConfig) -> None:
    app = make_app(config, live=False)
    async with app.run_test(size=SIZE) as pilot:
        progress = app.main.query_one(LoadProgress)
        await pilot.pause()
        assert not progress.display or not progress.has_class("-loading")
        app.main.post_message(MainScreen.CoordinatorUpdated(
            CoordinatorStatus(STARTING, "http://127.0.0.1:8181", 4242)))
        await pilot.pause()
        assert progress.has_class("-loading")
        # The core's typed event while llama-server loads; its notice goes to the event log.
        app.main.post_message(MainScreen.LoadingUpdated(CoordinatorLoading(15.2, None, 503)))
        app.main.post_message(MainScreen.NoticeReceived(Notice(
            "coordinator loading the model (15 s, /health says 503)")))
        await pilot.pause()
        assert "15 s" in str(progress.query_one("#load-label").render())
        assert app.event_log[-1].endswith("coordinator loading the model (15 s, /health says "
                                          "503)")
        # A fraction from the core (the load log's stage) makes the bar determinate.
        app.main.post_message(MainScreen.LoadingUpdated(CoordinatorLoading(20.0, 0.5, 503)))
        await pilot.pause()
        assert progress.query_one("#load-bar").percentage == 0.5  # type: ignore[attr-defined]
        app.main.post_message(MainScreen.CoordinatorUpdated(
            CoordinatorStatus(READY, "http://127.0.0.1:8181", 4242)))
        await pilot.pause()
        assert not progress.has_class("-loading")


async def test_a_flood_of_log_lines_is_bounded_and_follows(config: ClusterConfig) -> None:
    app = make_app(config, live=False, log_lines=1_000)
    async with app.run_test(size=SIZE) as pilot:
        app.main.post_message(node(config, "gpu-a", READY, 101))
        await pilot.pause()
        pane = app.main.query_one(LogPane)
        assert pane.source == "gpu-a"
        for batch in range(20):
            app.main.post_message(MainScreen.LogLines("gpu-a",
                                                      [f"{batch}:{i}" for i in range(500)]))
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
        app.main.post_message(MainScreen.NoticeReceived(Notice("gpu-a: worker ready",
                                                               node="gpu-a")))
        await pilot.pause()
        await pilot.press("e")
        await pilot.pause()
        assert isinstance(app.screen, LogsScreen)
        view = app.screen.query_one(LogView)
        assert view.plain_lines() == ["12:00:00 info    gpu-a: worker ready"]
        app.main.post_message(MainScreen.NoticeReceived(Notice("cpu-d: boom", "error", "cpu-d")))
        await pilot.pause()
        assert view.plain_lines()[-1] == "12:00:00 error   cpu-d: boom"


async def test_layer_map_and_throughput_panels_show_what_they_are_fed(
        config: ClusterConfig) -> None:
    from core.planning.layer_map import llama_map
    from core.status import LayerShare
    from core.supervision.throughput import SlotProgress, ThroughputSample
    from tui.widgets.layer_map import CELL, LayerMapView
    from tui.widgets.throughput_panel import ThroughputPanel

    app = make_app(config, live=False)
    async with app.run_test(size=SIZE) as pilot:
        view = app.main.query_one(LayerMapView)
        assert "no model placed yet" in str(view.render())
        shares = [LayerShare("gpu-a", "10.0.0.1:50052", 2, 3, 3, 12 << 20),
                  LayerShare("gpu-b", "10.0.0.2:50052", 5, 3, 2, 8 << 20)]
        app.main.post_message(MainScreen.LayerMapUpdated(llama_map(shares, blocks=8)))
        await pilot.pause()
        text = view.render_map(view.map)  # type: ignore[arg-type]
        plain = text.plain
        assert plain.splitlines()[0] == "8 blocks, as loaded by llama-server"
        assert plain.splitlines()[1] == CELL * 8
        assert "coordinator (CPU)" in plain and "0-2" in plain  # 8 - 3 - 2 = 3 there
        assert "12.0 MiB" in plain and "= plan" in plain
        assert "≠ planned 3 blocks, loaded 2" in plain
        # Each node's cells carry its own colour, the coordinator's grey.
        colours = {str(span.style) for span in text.spans if span.start >= len("8 blocks")}
        assert {view.colour("gpu-a"), view.colour("gpu-b"), "grey62"} <= colours

        panel = app.main.query_one(ThroughputPanel)
        for rate in (5.0, 12.5):
            app.main.post_message(MainScreen.ThroughputUpdated(ThroughputSample(
                at=0.0, gen_tps=rate, prompt_tps=40.0, requests_processing=1,
                requests_deferred=2, decoded_total=10, prompt_tokens_total=30, slots_decoding=1,
                slots=(SlotProgress(0, 7, True, 33, 15, 20, 20, rate),), running_tps=rate)))
        await pilot.pause()
        assert list(panel.generation)[-2:] == [5.0, 12.5]
        shown = " ".join(str(w.render()) for w in panel.query("Static"))
        assert "12.5 tok/s" in shown and "1 processing · 2 queued" in shown
        assert "slot 0: 33 tokens (15 left)" in shown
        app.main.post_message(MainScreen.ThroughputUpdated(None, "coordinator stopped"))
        await pilot.pause()
        assert "coordinator stopped" in str(panel.query_one("#requests").render())


def test_uptime_shows_whole_minutes_hours_and_days() -> None:
    from core.status_text import uptime

    assert uptime(None) == "-"
    assert [uptime(1000.0, now) for now in (1000.0, 1059.0, 1060.0, 1000.0 + 3599,
                                            1000.0 + 3600 + 5 * 60, 1000.0 + 2 * 86400 + 4 * 3600)
            ] == ["<1m", "<1m", "1m", "59m", "1h05", "2d04h"]


def test_resource_cells_name_gpus_from_the_probe_never_from_words() -> None:
    from core.reach.probe import Gpu, NodeProbe
    from tui.model import describe_resources

    def probe(gpus: tuple[Gpu, ...] = ()) -> NodeProbe:
        return NodeProbe("n", "Linux", "x86_64", 8, 32 << 30, 20 << 30, gpus, 0.0, 0.01,
                         None, None, ())

    assert describe_resources(probe()) == ("CPU 8c", "20.0 GiB")
    two = tuple(Gpu(i, "NVIDIA GeForce RTX 3090", "nvidia", 24 << 30, 23 << 30)
                for i in range(2))
    assert describe_resources(probe(two)) == ("2x GeForce RTX 3090", "46.0 GiB")


async def test_extra_cells_survive_status_changes_and_feed_the_filter(
        config: ClusterConfig) -> None:
    from core.planning.layer_map import LOADED, LayerMap, MapSpan
    from core.supervision.bottleneck import Bottleneck, PartShare

    app = make_app(config, live=False)
    async with app.run_test(size=SIZE) as pilot:
        table = app.main.query_one(NodeTable)
        app.main.post_message(node(config, "gpu-a", READY, pid=41))
        # The cells the node's status does not carry: the probe's, the map's, the share's.
        app.main.post_message(MainScreen.ResourcesUpdated("gpu-a", "RTX 4090", "20.5 GiB"))
        app.main.post_message(MainScreen.LayerMapUpdated(
            LayerMap(4, (MapSpan("gpu-a", 0, 4),), source=LOADED)))
        app.main.post_message(MainScreen.BottleneckUpdated(Bottleneck(0.1, "running", (
            PartShare("coordinator", None, 0.01, 0.0, 0.1),
            PartShare("gpu-a", 4, 0.06, 0.03, 0.9)))))
        await pilot.pause()
        assert table.get_cell("gpu-a", "device").plain == "RTX 4090"
        assert table.get_cell("gpu-a", "share").plain == "90% c60 l30 ◀"
        app.main.post_message(node(config, "gpu-a", FAILED, pid=41, error="worker died"))
        await pilot.pause()
        assert table.get_cell("gpu-a", "layers").plain == "0-3"  # kept across the change
        assert table.get_cell("gpu-a", "share").plain == "-"  # not serving: no share
        table.set_filter("4090")
        assert table.rows == ["gpu-a"]


async def test_an_engine_without_a_coordinator_names_its_swarm_and_hides_c(
        tmp_path: Path) -> None:
    """A Petals cluster: the bar names the swarm, `c` is not offered, `g` waits for a ready
    server, the throughput panel says where tokens/s come from; asked of the engine's
    capabilities, never of its name."""
    nodes = [{"name": name, "host": f"10.0.0.{i + 1}", "transport": "ssh", "backend": "petals"}
             for i, name in enumerate(["node1", "node2"])]
    path = tmp_path / "cluster.toml"
    path.write_text(toml_text({"name": "swarm", "state_dir": str(tmp_path / "state")}, nodes,
                              model={"hf": str(tmp_path / "model")},
                              petals={"dht_prefix": "tbzpetals"}))
    config = load_config(path)
    app = make_app(config, live=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert "Petals swarm" in str(app.main.query_one(CoordinatorBar).render())
        app.main.post_message(MainScreen.ThroughputUpdated(None, app.main.model
                                                           .idle_throughput_note("stopped")))
        app.main.post_message(MainScreen.Refreshed())
        await pilot.pause()
        assert "Petals: `torbiz-tui generate` gives tok/s" in str(
            app.main.query_one("#requests").render())
        assert app.main.check_action("start_coordinator", ()) is False
        assert app.main.check_action("stop_coordinator", ()) is False
        assert app.main.check_action("generate", ()) is None
        app.main.post_message(node(config, "node2", READY, pid=7))
        await pilot.pause()
        assert app.main.check_action("generate", ()) is True


async def test_the_bar_never_says_ready_over_a_reload(config: ClusterConfig) -> None:
    """The bar shows what the coordinator's endpoint answers: ready, then loading with its
    seconds while /health says 503, not responding when nothing answers, ready again."""
    from core.status import NOT_RESPONDING

    app = make_app(config, live=False)
    url = "http://127.0.0.1:8181"
    async with app.run_test(size=SIZE) as pilot:
        bar = app.main.query_one(CoordinatorBar)

        def shown() -> str:
            return str(bar.render())

        app.main.post_message(MainScreen.CoordinatorUpdated(CoordinatorStatus(READY, url, 7)))
        await wait_until(pilot, lambda: "coordinator ready" in shown(), "ready")
        app.main.post_message(MainScreen.CoordinatorUpdated(
            CoordinatorStatus(STARTING, url, 8, loading_s=12.4)))
        await wait_until(pilot, lambda: "loading 12 s" in shown(), "loading")
        assert "ready" not in shown()
        app.main.post_message(MainScreen.CoordinatorUpdated(
            CoordinatorStatus(NOT_RESPONDING, url, 8, "no answer within 2 s")))
        await wait_until(pilot, lambda: "not responding" in shown(), "not responding")
        assert "ready" not in shown() and "no answer within 2 s" in shown()
        app.main.post_message(MainScreen.CoordinatorUpdated(CoordinatorStatus(READY, url, 8)))
        await wait_until(pilot, lambda: "coordinator ready" in shown(), "ready")


async def test_the_layer_map_marks_cold_blocks(config: ClusterConfig) -> None:
    """Blocks whose weights their node's cache lacks are drawn apart and named: the next load
    sends them over the network."""
    from dataclasses import replace

    from core.planning.layer_map import llama_map
    from core.status import LayerShare
    from tui.widgets.layer_map import CELL, COLD, LayerMapView

    app = make_app(config, live=False)
    async with app.run_test(size=SIZE) as pilot:
        view = app.main.query_one(LayerMapView)
        shares = [LayerShare("gpu-a", "10.0.0.1:50052", 0, 4, 4, 12 << 20),
                  LayerShare("gpu-b", "10.0.0.2:50052", 4, 4, 4, 8 << 20)]
        warm = llama_map(shares, blocks=8)
        app.main.post_message(MainScreen.LayerMapUpdated(replace(warm, cold=(4, 5))))
        await pilot.pause()
        plain = view.render_map(view.map).plain  # type: ignore[arg-type]
        assert plain.splitlines()[1] == CELL * 4 + COLD * 2 + CELL * 2
        assert "cold: blocks 4, 5 not in their node's cache" in plain
        app.main.post_message(MainScreen.LayerMapUpdated(warm))
        await pilot.pause()
        plain = view.render_map(view.map).plain  # type: ignore[arg-type]
        assert COLD not in plain and "cold" not in plain
