"""The main screen: the dashboard. It owns the cluster's polls and actions (its workers, in
ClusterWorkers, await core.operations and post a message); its handlers update the model
(tui/model.py) and redraw what changed; its keys ask the model what they may do."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.notifications import SeverityLevel
from textual.widgets import Footer, Header
from textual.worker import Worker, WorkerState

from core.cluster import Cluster
from core.status import Level
from core.supervision.supervisor import Supervisor
from tui.commands import DashboardCommands, PaletteCommand
from tui.keys import MAIN_BINDINGS, HelpSection, bindings_by_action, help_sections
from tui.log_stream import ClusterLogs, LogSource
from tui.model import (
    COORDINATOR,
    KEYED_ACTIONS,
    TOAST_SECONDS,
    WHOLE_CLUSTER,
    Changed,
    Dashboard,
    Key,
)
from tui.screens.cluster_workers import LOG_HISTORY, ClusterWorkers
from tui.screens.dialogs import ConfirmScreen, QuitChoice, QuitScreen
from tui.screens.help import HelpScreen
from tui.screens.logs import LogsScreen
from tui.screens.plan import PlanScreen
from tui.screens.warm_action import WarmAction
from tui.text import sanitize
from tui.widgets.coordinator_bar import CoordinatorBar
from tui.widgets.layer_map import LayerMapView
from tui.widgets.load_progress import LoadProgress
from tui.widgets.log_pane import LogPane
from tui.widgets.node_filter import NodeFilter
from tui.widgets.node_table import NodeTable
from tui.widgets.status_line import StatusLine
from tui.widgets.throughput_panel import ThroughputPanel

SEVERITY: dict[Level, SeverityLevel] = {Level.ERROR: "error", Level.WARNING: "warning",
                                        Level.INFO: "information"}


class MainScreen(WarmAction):
    """Header, status line, node table (+ filter), coordinator row, the panels row for the
    layer map and throughput, the selected node's log, footer."""

    BINDINGS = MAIN_BINDINGS
    COMMANDS = {DashboardCommands}

    # ---- life cycle ---------------------------------------------------------------------------

    def __init__(self, cluster: Cluster, supervisor: Supervisor, model: Dashboard, *,
                 live: bool = True, log_lines: int) -> None:
        super().__init__(cluster, supervisor, model, live=live, id="main")
        self.log_lines = log_lines
        self.log_sources = ClusterLogs(cluster, model.event_log, live=live)
        self._busy: dict[Worker[None], str] = {}
        self._keys: tuple[bool | None, ...] = ()
        self.status_line = StatusLine()
        self.table = NodeTable()
        self.node_filter = NodeFilter()
        self.bar = CoordinatorBar()
        self.bar.serving = model.serving
        self.progress = LoadProgress()
        self.layer_map = LayerMapView(list(model.nodes), id="layer-map")
        self.throughput = ThroughputPanel(id="throughput")
        self.pane = LogPane(log_lines)

    def compose(self) -> ComposeResult:
        yield Header()
        yield self.status_line
        yield self.table
        yield self.node_filter
        yield self.warm_panel
        with Horizontal(id="coordinator-row"):
            yield self.bar
            yield self.progress
        with Horizontal(id="panels"):
            yield self.layer_map
            yield self.throughput
        yield self.pane
        yield Footer()

    def on_mount(self) -> None:
        for row in self.model.nodes.values():
            self.table.show_row(row)
        self.bar.status = self.model.coordinator
        self.table.focus()
        self.follow_cluster()

    # ---- message handlers: the model changes, then what it changed is drawn ---------------------

    def _draw(self, changed: Changed) -> None:
        for row in changed.nodes:
            self.table.show_row(row)
        if changed.coordinator:
            self._draw_coordinator()

    def _draw_coordinator(self) -> None:
        self.bar.status = self.model.coordinator
        loading = self.model.loading
        if not self.model.loading_shown:
            self.progress.stop()
            return
        self.progress.start()
        if loading is not None:
            self.progress.show_detail(f"loading the model · {loading.seconds:.0f} s")
            self.progress.show_fraction(loading.fraction)

    def _add_event(self, line: str) -> None:
        """Open event-log screens get a new line of the event log at once."""
        for screen in self.app.screen_stack:
            if isinstance(screen, LogsScreen):
                screen.add_event(line)

    def tell(self, text: str, level: Level = Level.ERROR) -> None:
        """A notification that also goes to the event log."""
        self._add_event(self.model.record(level, text))
        self.notify(sanitize(text), severity=SEVERITY[level], timeout=TOAST_SECONDS[level],
                    markup=False)

    @on(ClusterWorkers.NodeUpdated)
    def _node_updated(self, message: ClusterWorkers.NodeUpdated) -> None:
        if self._gone():
            return
        row = self.model.node_changed(message.status)
        self.table.show_row(row)
        if row.name == self.table.selected:  # the keys depend on no other node
            self._refresh_keys()

    @on(ClusterWorkers.CoordinatorUpdated)
    def _coordinator_updated(self, message: ClusterWorkers.CoordinatorUpdated) -> None:
        if self._gone():
            return
        self.model.coordinator_changed(message.status)
        self._draw_coordinator()
        self._refresh_keys()

    @on(ClusterWorkers.LoadingUpdated)
    def _loading_updated(self, message: ClusterWorkers.LoadingUpdated) -> None:
        if not self._gone():
            self.model.coordinator_loading(message.loading)
            self._draw_coordinator()

    @on(ClusterWorkers.NoticeReceived)
    def _notice(self, message: ClusterWorkers.NoticeReceived) -> None:
        if self._gone():
            return
        view = self.model.notice(message.notice)
        self._add_event(view.line)
        if view.node_note is not None and message.notice.node is not None:
            self.pane.add_note(message.notice.node, view.node_note)  # kept by the node's log
        if view.toast is not None:
            self.notify(view.text, severity=SEVERITY[view.toast], timeout=TOAST_SECONDS[view.toast],
                        markup=False)

    @on(ClusterWorkers.LayerMapUpdated)
    def _layer_map_updated(self, message: ClusterWorkers.LayerMapUpdated) -> None:
        if self._gone():
            return
        if message.error:
            self._add_event(self.model.record(Level.WARNING, message.error))
        self._draw(Changed(self.model.layer_map_changed(message.layer_map)))
        self.layer_map.show_map(message.layer_map)

    @on(ClusterWorkers.ThroughputUpdated)
    def _throughput_updated(self, message: ClusterWorkers.ThroughputUpdated) -> None:
        if self._gone():
            return
        self.model.throughput_changed(message.sample, message.error)
        self.throughput.show_sample(message.sample, message.error)

    @on(ClusterWorkers.BottleneckUpdated)
    def _bottleneck_updated(self, message: ClusterWorkers.BottleneckUpdated) -> None:
        if self._gone():
            return
        self._draw(Changed(self.model.bottleneck_changed(message.found)))
        self.layer_map.show_bottleneck(message.found)

    @on(ClusterWorkers.ResourcesUpdated)
    def _resources_updated(self, message: ClusterWorkers.ResourcesUpdated) -> None:
        if not self._gone():
            self.table.show_row(self.model.resources(message.node, message.device,
                                                     message.free))

    @on(ClusterWorkers.PlanReady)
    def _plan_ready(self, message: ClusterWorkers.PlanReady) -> None:
        def answered(up: bool | None) -> None:
            if up and self.model.can("up"):
                self.action_up()

        if not self._gone():
            plan = self.model.planned(message.text, message.refused)
            self.app.push_screen(PlanScreen(plan.text, refused=plan.refused,
                                            read_only=self.model.read_only), answered)

    @on(ClusterWorkers.ActionProblems)
    def _action_problems(self, message: ClusterWorkers.ActionProblems) -> None:
        if not self._gone():
            for problem in self.model.unsaid(message.problems):  # the core may have said it
                self.tell(problem)

    @on(ClusterWorkers.StoppedForQuit)
    def _stopped_for_quit(self) -> None:
        self.app.exit(0)

    @on(ClusterWorkers.Refreshed)
    def _refreshed(self, message: ClusterWorkers.Refreshed) -> None:
        if self._gone():
            return
        changed, went_stale = self.model.refreshed(message.error)
        self._draw(changed)
        mode = "read-only" if self.model.read_only else ""
        self.app.sub_title = " · ".join(filter(None, [mode, "stale" if self.model.stale
                                                      else ""]))
        if went_stale:
            self.tell(f"refresh failed, retrying: {message.error}", Level.WARNING)
        self.status_line.show_stale(self.model.stale)
        self._refresh_keys()

    @on(NodeTable.NodeSelected)
    def _node_selected(self, message: NodeTable.NodeSelected) -> None:
        if self._gone():
            return
        node = self.cluster.config.node(message.name)
        self.pane.follow(node.name, f"log · {node.name} · {node.endpoint}")
        if self.live:
            self.pane.add_note(node.name, f"-- {node.name}: the worker log's last {LOG_HISTORY} "
                                          "lines, then new lines as they come --")
            self.follow_log(node.name)
        self._refresh_keys()

    @on(NodeTable.NodeOpened)
    def _node_opened(self, message: NodeTable.NodeOpened) -> None:
        self._open_logs(LogSource("node", message.name))

    @on(NodeTable.CountsChanged)
    def _counts_changed(self, message: NodeTable.CountsChanged) -> None:
        if not self._gone():
            self.status_line.show_counts(message.counts, message.shown, message.total)

    @on(NodeFilter.FilterChanged)
    def _filter_changed(self, message: NodeFilter.FilterChanged) -> None:
        self.table.set_filter(message.text)
        self.status_line.show_filter(message.text)
        self._refresh_keys()

    @on(NodeFilter.FilterDone)
    def _filter_done(self) -> None:
        if not self.node_filter.value:
            self.node_filter.close()
        self.table.focus()

    @on(ClusterWorkers.LogLines)
    def _log_lines(self, message: ClusterWorkers.LogLines) -> None:
        if not self._gone():
            self.pane.add_lines(message.source, message.lines)

    @on(ClusterWorkers.LogNote)
    def _log_note(self, message: ClusterWorkers.LogNote) -> None:
        if not self._gone():
            self.pane.add_note(message.source, message.text)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if self._gone():
            return
        if event.state not in (WorkerState.SUCCESS, WorkerState.ERROR, WorkerState.CANCELLED):
            return
        if event.state == WorkerState.ERROR:
            self.tell(f"{event.worker.name} failed: {event.worker.error}")
        key = self._busy.pop(event.worker, None)
        if key is not None:
            self._draw(self.model.end(key))
            self._refresh_keys()

    # ---- keys ---------------------------------------------------------------------------------

    def _selected(self) -> str | None:
        return self.table.selected if self.is_mounted else None

    def _run(self, key: str, worker: Worker[None], *, stopping: bool = False) -> None:
        """`worker` acts on `key` (a node, COORDINATOR or WHOLE_CLUSTER): its keys grey out."""
        self._busy[worker] = key
        self._draw(self.model.begin(key, stopping=stopping))
        self._refresh_keys()

    def _refresh_keys(self) -> None:
        """Redraw the footer only when a key's state changed: a redraw rebuilds every key, and
        most node updates change none."""
        if self._gone():
            return
        keys = tuple(self.check_action(action, ()) for action in KEYED_ACTIONS)
        if keys != self._keys:
            self._keys = keys
            self.refresh_bindings()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """False hides a key (read-only mode), None greys it out (makes no sense right now)."""
        if self._gone():
            return True
        if action == "warm_cache":
            return self.warm_key()
        found = self.model.check(action, self._selected()).key
        return True if found == Key.ENABLED else None if found == Key.GREYED else False

    def action_move(self, step: int) -> None:
        if step > 0:
            self.table.action_cursor_down()
        else:
            self.table.action_cursor_up()

    def _confirm(self, question: str, then: Callable[[], None]) -> None:
        self.app.push_screen(ConfirmScreen(question), lambda yes: then() if yes else None)

    def action_start_node(self) -> None:
        name = self._selected()
        if name is not None:
            self._run(name, self.start_node(name))

    def action_stop_node(self) -> None:
        name = self._selected()
        if name is not None:
            endpoint = self.cluster.config.node(name).endpoint
            self._confirm(f"Stop the worker on {name} ({endpoint})?",
                          lambda: self._run(name, self.stop_node(name), stopping=True))

    def action_restart_node(self) -> None:
        name = self._selected()
        if name is None:
            return

        def restart() -> None:
            self._run(name, self.restart_node(name), stopping=True)

        if not self.model.coordinator_in_use():
            restart()
            return
        endpoint = self.cluster.config.node(name).endpoint
        self._confirm(f"Restart the worker on {name} ({endpoint})? The coordinator "
                      f"({self.model.coordinator.url}) uses it and aborts on its next request "
                      "once the worker goes away: restart the coordinator afterwards.", restart)

    def action_start_coordinator(self) -> None:
        self._run(COORDINATOR, self.start_coordinator())

    def action_stop_coordinator(self) -> None:
        self._confirm(f"Stop the coordinator ({self.model.coordinator.url})? Requests in flight "
                      "are cut off.",
                      lambda: self._run(COORDINATOR, self.stop_coordinator(), stopping=True))

    def action_generate(self) -> None:
        self.notify("generating 16 tokens through the cluster ...", timeout=3)
        self.smoke_generate()

    def action_plan(self) -> None:
        self.notify("planning: reading the model and every node's free memory ...", timeout=3)
        self.plan_preview()

    def action_up(self) -> None:
        self._run(WHOLE_CLUSTER, self.cluster_up())

    def action_rebalance(self) -> None:
        self._run(WHOLE_CLUSTER, self.cluster_rebalance())

    def action_down(self) -> None:
        config = self.cluster.config
        self._confirm(f"Take cluster {config.name} down: the coordinator and all "
                      f"{len(config.nodes)} workers?",
                      lambda: self._run(WHOLE_CLUSTER, self.cluster_down(), stopping=True))

    def _open_logs(self, source: LogSource) -> None:
        screen = self.app.screen
        if isinstance(screen, LogsScreen):
            screen.show_source(source)
            return
        self.app.push_screen(LogsScreen(source, self._selected(), self.log_lines,
                                        self.log_sources))

    def action_logs(self) -> None:
        name = self._selected()
        if name is not None:
            self._open_logs(LogSource("node", name))

    def action_event_log(self) -> None:
        self._open_logs(LogSource("events"))

    def action_coordinator_log(self) -> None:
        self._open_logs(LogSource("coordinator"))

    def action_filter(self) -> None:
        self.node_filter.open()

    def clear_filter(self) -> None:
        self.node_filter.value = ""
        self.node_filter.close()
        self.table.set_filter("")
        self.status_line.show_filter("")

    def jump_to(self, name: str) -> None:
        """Select `name` in the table, clearing a filter that hides it."""
        if not self.table.select(name):
            self.clear_filter()
            self.table.select(name)
        self.table.focus()

    def action_help(self) -> None:
        self.app.push_screen(HelpScreen(f"torbiz · {self.cluster.config.name} · keys and "
                                        "commands", self.help_sections()))

    def action_quit(self) -> None:
        """Ask whether to leave the cluster running (the default) or stop it; nothing to ask
        when nothing runs, or in read-only mode."""
        running = self.model.running_summary()
        if self.model.read_only or not running:
            self.app.exit(0)
            return

        def answered(choice: QuitChoice | None) -> None:
            if choice == "leave":
                self.app.exit(0)
            elif choice == "stop":
                self._run(WHOLE_CLUSTER, self.stop_then_quit(), stopping=True)

        self.app.push_screen(QuitScreen(self.cluster.config.name, running), answered)

    # ---- palette and help ---------------------------------------------------------------------

    def palette_commands(self) -> list[PaletteCommand]:
        """What the palette offers now: the actions that make sense (read-only mode hides the
        ones that change the cluster), the logs, and a jump to every node."""
        commands: list[PaletteCommand] = []
        for action, (keys, binding) in bindings_by_action(self.BINDINGS,
                                                          self.app.get_key_display).items():
            name = action.partition("(")[0]
            if name == "move" or self.check_action(name, ()) is not True:
                continue
            commands.append(PaletteCommand(
                binding.tooltip or binding.description, f"key: {' / '.join(keys)}",
                partial(self.run_action, action)))
        commands.append(PaletteCommand("The coordinator's log, full screen",
                                       "also key 2 on the logs screen",
                                       self.action_coordinator_log))
        if self.table.filter_text:
            commands.append(PaletteCommand("Clear the node filter", "", self.clear_filter))
        for node in self.cluster.config.nodes:
            name = node.name
            commands.append(PaletteCommand(
                f"Jump to node {name}", f"{node.endpoint} · {self.model.nodes[name].state}",
                partial(self.jump_to, name)))
        return commands

    def help_sections(self) -> list[HelpSection]:
        return help_sections(self.app.get_key_display, read_only=self.model.read_only,
                             logs=LogsScreen.BINDINGS, node_filter=NodeFilter.BINDINGS)
