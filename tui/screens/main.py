"""The main screen: what the dashboard shows; the app owns the keys and the cluster."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Header

from tui.widgets.coordinator_bar import CoordinatorBar
from tui.widgets.layer_map import LayerMapView
from tui.widgets.load_progress import LoadProgress
from tui.widgets.log_pane import LogPane
from tui.widgets.node_filter import NodeFilter
from tui.widgets.node_table import NodeTable
from tui.widgets.status_line import StatusLine
from tui.widgets.throughput_panel import ThroughputPanel


class MainScreen(Screen[None]):
    """Header, status line, node table (+ filter), coordinator row, the panels row for the
    layer map and throughput, the selected node's log, footer."""

    class Ready(Message):
        """The widgets are mounted: the app may fill them and start polling."""

    def __init__(self, log_lines: int, node_order: list[str]) -> None:
        super().__init__(id="main")
        self.log_lines = log_lines
        self.node_order = node_order

    def compose(self) -> ComposeResult:
        yield Header()
        yield StatusLine()
        yield NodeTable()
        yield NodeFilter()
        with Horizontal(id="coordinator-row"):
            yield CoordinatorBar()
            yield LoadProgress()
        with Horizontal(id="panels"):
            yield LayerMapView(self.node_order, id="layer-map")
            yield ThroughputPanel(id="throughput")
        yield LogPane(self.log_lines)
        yield Footer()

    def on_mount(self) -> None:
        self.post_message(self.Ready())
