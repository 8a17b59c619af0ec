"""The dashboard's shell: builds the cluster, its supervisor and the dashboard model, and installs
the main screen, which owns the polls, the actions and the keys (tui/screens/main.py)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from textual.app import App
from textual.screen import Screen

from core.cluster import Cluster
from core.config import ClusterConfig
from core.supervision.supervisor import Supervisor
from tui.commands import PaletteCommand
from tui.keys import PALETTE_BINDING
from tui.model import CHANGES_CLUSTER, Dashboard, describe_resources
from tui.pollers import REFRESH_INTERVAL
from tui.screens.dialogs import ConfirmScreen, QuitScreen
from tui.screens.main import MainScreen
from tui.widgets.log_pane import MAX_LINES


def _clock() -> str:
    return time.strftime("%H:%M:%S")


class TorbizApp(App[int]):
    CSS_PATH = "app.tcss"
    COMMAND_PALETTE_BINDING = "colon"  # the footer shows it at its right end
    BINDINGS = [PALETTE_BINDING]

    def __init__(self, config: ClusterConfig, read_only: bool = False, *, live: bool = True,
                 log_lines: int = MAX_LINES, clock: Callable[[], str] = _clock) -> None:
        """`live` False: no polling and no log streams, only the messages posted to the main
        screen are shown (snapshots, the benchmark)."""
        super().__init__()
        self.config = config
        self.read_only = read_only
        self.live = live
        self.log_lines = log_lines
        self.cluster = Cluster(config)
        self.supervisor = Supervisor(self.cluster, interval=REFRESH_INTERVAL,
                                     recover=False if read_only else None)
        engine = self.cluster.engine
        self.model = Dashboard(
            self.cluster.capabilities, self.cluster.nodes.values(),
            self.cluster.coordinator, read_only=read_only,
            engine_title=engine.name.capitalize(),
            serving_name=engine.serving_name, standbys=config.plan.standby,
            event_lines=log_lines, clock=clock)
        self.main = MainScreen(self.cluster, self.supervisor, self.model, live=live,
                               log_lines=log_lines)
        self.title = f"torbiz · {config.name}"
        self.sub_title = "read-only" if read_only else ""

    @property
    def event_log(self) -> deque[str]:
        return self.model.event_log

    def get_default_screen(self) -> Screen[None]:
        return self.main

    async def action_quit(self) -> None:
        """ctrl+q asks as `q` does."""
        if self.main.is_mounted:
            self.main.action_quit()
        else:
            self.exit(0)

    async def on_unmount(self) -> None:
        # The cluster keeps running: only our connections to it close.
        await self.supervisor.stop_recovery()
        await self.cluster.close()


def make_app(config: ClusterConfig, read_only: bool = False, *, live: bool = True,
             log_lines: int = MAX_LINES, clock: Callable[[], str] = _clock) -> TorbizApp:
    """The one way to build the dashboard: the CLI, the web server and the tests share it."""
    return TorbizApp(config, read_only=read_only, live=live, log_lines=log_lines, clock=clock)


def run_dashboard(config: ClusterConfig, read_only: bool = False,
                  log_lines: int = MAX_LINES) -> int:
    make_app(config, read_only=read_only, log_lines=log_lines).run()
    return 0


__all__ = ["CHANGES_CLUSTER", "ConfirmScreen", "MainScreen", "PaletteCommand", "QuitScreen",
           "TorbizApp", "describe_resources", "make_app", "run_dashboard"]
