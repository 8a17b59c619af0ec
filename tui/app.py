"""The dashboard: renders the Cluster's events and asks the Cluster to act; never talks to nodes.

Workers await the core and post a message; widgets change only in message handlers.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from textual import on, work
from textual.app import App
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen
from textual.worker import Worker, WorkerState

from core.bringup import NothingStarted, plan_now, plan_text, preflight_and_plan
from core.cluster import Cluster, ClusterError
from core.config import ClusterConfig, NodeConfig
from core.engines.petals.commands import dht_prefix
from core.engines.petals.swarm import PetalsError, is_petals_cluster
from core.planning.layer_map import LayerMap
from core.planning.placement import PlacementError, PlanRefused
from core.reach.probe import NodeProbe, probe_node
from core.smoke import SmokeError, smoke_generate
from core.status import (
    FAILED,
    READY,
    STARTING,
    STOPPED,
    CoordinatorChanged,
    CoordinatorStatus,
    Event,
    NodeChanged,
    NodeStatus,
    Notice,
)
from core.supervision.supervisor import Supervisor
from core.supervision.throughput import ThroughputSample
from tui.commands import DashboardCommands
from tui.log_stream import follow_forever
from tui.screens.dialogs import ConfirmScreen, QuitScreen
from tui.screens.help import HelpScreen, HelpSection
from tui.screens.logs import LogSource, LogsScreen
from tui.screens.main import MainScreen
from tui.screens.plan import PlanScreen
from tui.text import sanitize
from tui.widgets.coordinator_bar import CoordinatorBar
from tui.widgets.layer_map import LayerMapView
from tui.widgets.load_progress import LoadProgress
from tui.widgets.log_pane import MAX_LINES, LogPane
from tui.widgets.node_filter import NodeFilter
from tui.widgets.node_table import PROBING, STOPPING, NodeTable
from tui.widgets.status_line import StatusLine
from tui.widgets.throughput_panel import ThroughputPanel

REFRESH_INTERVAL = 1.0  # seconds between the end of one refresh and the start of the next
REFRESH_MAX_BACKOFF = 30.0
PROBE_PARALLEL = 16  # as the Cluster's own fan-out
METRICS_INTERVAL = 1.0  # seconds between throughput polls (one in flight)
RESOURCES_INTERVAL = 30.0  # seconds between resource probes (device, free memory)
MAP_INTERVAL = 2.0  # layer map while the coordinator loads or nothing is loaded
MAP_INTERVAL_LOADED = 15.0  # once llama-server has placed the model
MAP_INTERVAL_SWARM = 5.0  # a Petals swarm's map: a fresh DHT poll and each server's PSS
LOG_HISTORY = 200  # lines of a log shown in the pane when its stream opens

CHANGES_CLUSTER = frozenset({"start_node", "stop_node", "restart_node", "start_coordinator",
                             "stop_coordinator", "up", "down"})
NEEDS_NODE = frozenset({"start_node", "stop_node", "restart_node", "logs"})
# The keys whose state (shown, greyed, hidden) changes with the cluster.
KEYED_ACTIONS = tuple(sorted(CHANGES_CLUSTER | NEEDS_NODE | {"generate"}))
COORDINATOR = "coordinator"  # busy key for a coordinator action
WHOLE_CLUSTER = "*"  # busy key for up/down
# The core says this every 5 s while llama-server loads; the progress row shows it instead.
LOADING = re.compile(r"^coordinator loading the model \((?P<seconds>\d+) s")


@dataclass(frozen=True)
class PaletteCommand:
    title: str
    help: str
    run: Callable[[], object]


def describe_resources(found: NodeProbe) -> tuple[str, str]:
    """(device, free memory) cells: the GPUs' names and free VRAM, else CPU and free RAM."""
    if found.gpus:
        names = sorted({gpu.name.removeprefix("NVIDIA ").removeprefix("AMD ")
                        for gpu in found.gpus})
        device = f"{len(found.gpus)}x {names[0]}" if len(found.gpus) > 1 and len(names) == 1 \
            else "+".join(names)
        free = sum(gpu.free_bytes for gpu in found.gpus)
    else:
        device = f"CPU {found.cores}c" if found.cores else "CPU"
        free = found.ram_available_bytes
    return device, (f"{free / 2**30:.1f} GiB" if free else "-")


def _clock() -> str:
    return time.strftime("%H:%M:%S")


class TorbizApp(App[int]):
    CSS_PATH = "app.tcss"
    COMMANDS = App.COMMANDS | {DashboardCommands}
    COMMAND_PALETTE_BINDING = "colon"  # the footer shows it at its right end
    BINDINGS = [
        Binding("j", "move(1)", "Next node", show=False, tooltip="Select the next node"),
        Binding("k", "move(-1)", "Previous node", show=False,
                tooltip="Select the previous node"),
        Binding("s", "start_node", "Start", tooltip="Start the selected node's worker"),
        Binding("x", "stop_node", "Stop", tooltip="Stop the selected node's worker (asks first)"),
        Binding("r", "restart_node", "Restart",
                tooltip="Restart the selected node's worker (asks first while the coordinator "
                        "uses it)"),
        Binding("l,enter", "logs", "Logs",
                tooltip="The selected node's log, full screen"),
        Binding("e", "event_log", "Events", tooltip="The dashboard's event log, full screen"),
        # One key, two actions: check_action shows the one that fits the coordinator's state.
        Binding("c", "start_coordinator", "Start coord.",
                tooltip="Start the coordinator (llama-server) over the ready workers"),
        Binding("c", "stop_coordinator", "Stop coord.",
                tooltip="Stop the coordinator (asks first)"),
        Binding("p", "plan", "Plan", tooltip="Preview the plan: which blocks go on which node, "
                                             "from the model and each node's free memory"),
        Binding("u", "up", "Up", tooltip="Bring the whole cluster up as planned: preflight, "
                                         "workers, then the coordinator"),
        Binding("d", "down", "Down", tooltip="Take the whole cluster down (asks first)"),
        Binding("g", "generate", "Generate",
                tooltip="A short generation through the cluster: does it answer, how fast"),
        Binding("slash", "filter", "Filter", tooltip="Filter the nodes by name, host, state, "
                                                     "error ..."),
        Binding("question_mark", "help", "Help", tooltip="This help: every key and command"),
        Binding("q", "quit", "Quit",
                tooltip="Quit; asks whether to leave the cluster running (the default) or "
                        "stop it"),
        Binding("colon,ctrl+p", "command_palette", "Commands", show=False,
                tooltip="The command palette: every action, jump to node NAME, logs"),
    ]

    # ---- messages: what the Cluster and the workers tell the screen ------------------------

    @dataclass
    class NodeUpdated(Message):
        status: NodeStatus

        def can_replace(self, message: Message) -> bool:
            """A newer state of a node replaces one not drawn yet: one redraw, not many."""
            return isinstance(message, TorbizApp.NodeUpdated) \
                and message.status.name == self.status.name

    @dataclass
    class CoordinatorUpdated(Message):
        status: CoordinatorStatus

        def can_replace(self, message: Message) -> bool:
            return isinstance(message, TorbizApp.CoordinatorUpdated)

    @dataclass
    class LayerMapUpdated(Message):
        layer_map: LayerMap | None

        def can_replace(self, message: Message) -> bool:
            return isinstance(message, TorbizApp.LayerMapUpdated)

    @dataclass
    class ThroughputUpdated(Message):
        sample: ThroughputSample | None
        error: str = ""

    @dataclass
    class ResourcesUpdated(Message):
        node: str
        device: str
        free: str

    @dataclass
    class PlanReady(Message):
        text: str
        refused: bool

    @dataclass
    class NoticeReceived(Message):
        notice: Notice

    @dataclass
    class Refreshed(Message):
        """A refresh round finished; `error` is empty when it worked."""

        error: str = ""

    @dataclass
    class ActionProblems(Message):
        """up/down failed; one sentence per part."""

        problems: list[str]

    @dataclass
    class LogLines(Message):
        source: str
        lines: list[str]

    @dataclass
    class LogNote(Message):
        source: str
        text: str

    @dataclass
    class StoppedForQuit(Message):
        """The operator chose "stop the cluster" when quitting, and it stopped."""

    # ---- life cycle -------------------------------------------------------------------------

    def __init__(self, config: ClusterConfig, read_only: bool = False, *, live: bool = True,
                 log_lines: int = MAX_LINES, clock: Callable[[], str] = _clock) -> None:
        """`live` False: no polling and no log streams, only the messages posted to the app
        are shown (snapshots, the benchmark)."""
        super().__init__()
        self.config = config
        self.read_only = read_only
        self.live = live
        self.log_lines = log_lines
        self.clock = clock
        self.cluster = Cluster(config)
        self.cluster.subscribe(self._on_cluster_event)
        self.supervisor = Supervisor(self.cluster, interval=REFRESH_INTERVAL,
                                     recover=False if read_only else None)
        self.event_log: deque[str] = deque(maxlen=log_lines)
        self._busy: dict[Worker[None], str] = {}
        self._recent_errors: deque[str] = deque(maxlen=64)
        self._stale = False
        self._keys: tuple[bool | None, ...] = ()
        self._holding: set[str] = set()  # nodes the layer map shows holding blocks
        self.swarm = is_petals_cluster(config)  # Petals: no coordinator, the DHT's block map
        self._main: MainScreen | None = None
        self.title = f"torbiz · {config.name}"
        self.sub_title = self._mode()

    def get_default_screen(self) -> Screen[None]:
        self._main = MainScreen(self.log_lines, [n.name for n in self.config.nodes])
        return self._main

    @property
    def main(self) -> MainScreen:
        """The dashboard screen, wherever the screen stack is (its widgets live on)."""
        assert self._main is not None
        return self._main

    @on(MainScreen.Ready)
    def _main_ready(self) -> None:
        table = self.main.query_one(NodeTable)
        for status in self.cluster.nodes.values():
            table.show_node(replace(status, state=PROBING))
        bar = self.main.query_one(CoordinatorBar)
        if self.swarm:
            bar.swarm = dht_prefix(self.config)
        bar.status = replace(self.cluster.coordinator, state=PROBING)
        table.focus()
        if self.live:
            self.poll()
            self.poll_metrics()
            self.poll_resources()

    async def on_unmount(self) -> None:
        # The cluster keeps running: only our connections to it close.
        await self.supervisor.stop_recovery()
        await self.cluster.close()

    def _on_cluster_event(self, event: Event) -> None:
        """The Cluster's sink: called on our loop; turned into messages, never drawn here."""
        if isinstance(event, NodeChanged):
            self.post_message(self.NodeUpdated(event.status))
        elif isinstance(event, CoordinatorChanged):
            self.post_message(self.CoordinatorUpdated(event.status))
        elif isinstance(event, Notice):
            self.post_message(self.NoticeReceived(event))

    def _mode(self) -> str:
        return "read-only" if self.read_only else ""

    # ---- workers: await the core, post a message ---------------------------------------------

    @work(exclusive=True, group="poll", exit_on_error=False)
    async def poll(self) -> None:
        """Refresh now, then again REFRESH_INTERVAL after each round ends: never two in flight."""
        delay = REFRESH_INTERVAL
        while True:
            try:
                await self._refresh_round()
                self.post_message(self.Refreshed())
                delay = REFRESH_INTERVAL
            except Exception as exc:  # a poll that fails shows "stale", it never stops the app
                self.post_message(self.Refreshed(str(exc) or exc.__class__.__name__))
                delay = min(delay * 2, REFRESH_MAX_BACKOFF)
            await asyncio.sleep(delay)

    async def _refresh_round(self) -> None:
        busy = set(self._busy.values())
        if not busy:
            # The supervisor's check: a dead worker or coordinator is a notice within a second
            # or two, and (recovery on, not read-only) the coordinator is re-planned and
            # restarted over the workers left, as `torbiz-tui watch` does.
            await self.supervisor.tick()
            return
        # A probe racing a start would report the node stopped until its pidfile exists:
        # leave the parts being changed to the action changing them.
        if WHOLE_CLUSTER in busy:
            return
        limit = asyncio.Semaphore(PROBE_PARALLEL)

        async def probe(name: str) -> None:
            async with limit:
                await self.cluster.probe_node(name)

        await asyncio.gather(*(probe(n.name) for n in self.config.nodes if n.name not in busy))
        if COORDINATOR not in busy:
            await self.cluster.refresh_coordinator()

    @work(exclusive=True, group="resources", exit_on_error=False)
    async def poll_resources(self) -> None:
        """Each node's device and free memory (one probe round trip per node, all in
        parallel), every RESOURCES_INTERVAL; a node that cannot be probed shows "-"."""
        limit = asyncio.Semaphore(PROBE_PARALLEL)

        async def one(node: NodeConfig) -> None:
            async with limit:
                try:
                    found = await probe_node(self.cluster.transport(node.name), timeout=20)
                except Exception:  # unreachable: its status row says why
                    self.post_message(self.ResourcesUpdated(node.name, "-", "-"))
                    return
            self.post_message(self.ResourcesUpdated(node.name, *describe_resources(found)))

        while True:
            await asyncio.gather(*(one(n) for n in self.config.nodes))
            await asyncio.sleep(RESOURCES_INTERVAL)

    @work(exclusive=True, group="metrics", exit_on_error=False)
    async def poll_metrics(self) -> None:
        """The layer map and the throughput, one poll of each in flight: throughput every
        METRICS_INTERVAL while the coordinator serves; the map often while the coordinator
        loads (its log fills in), rarely once it is loaded."""
        next_map = 0.0
        shown_idle = False
        while True:
            state = self.cluster.coordinator.state
            swarm = self.swarm
            now = time.monotonic()
            if now >= next_map:
                layer_map = None
                if state in (STARTING, READY) or swarm:
                    try:
                        layer_map = await self.cluster.layer_map()
                    except Exception as exc:  # the map is a view: never stop the app for it
                        self._record("warning", f"layer map: {exc}")
                self.post_message(self.LayerMapUpdated(layer_map))
                loaded = layer_map is not None and layer_map.source != "plan"
                next_map = now + (MAP_INTERVAL_SWARM if swarm
                                  else MAP_INTERVAL_LOADED if state == READY and loaded
                                  else MAP_INTERVAL)
            if state == READY:
                shown_idle = False
                try:
                    sample = await self.cluster.poll_throughput()
                    self.post_message(self.ThroughputUpdated(
                        sample, "" if sample is not None else "no answer from /metrics"))
                except Exception as exc:
                    self.post_message(self.ThroughputUpdated(None, f"throughput: {exc}"))
            elif not shown_idle:
                shown_idle = True
                self.post_message(self.ThroughputUpdated(
                    None, "Petals: `torbiz-tui petals-generate` gives tok/s"
                    if swarm else f"coordinator {state}"))
            await asyncio.sleep(METRICS_INTERVAL)

    @work(exclusive=True, group="log", exit_on_error=False)
    async def follow_log(self, name: str) -> None:
        """Stream `name`'s log into the pane; replaced (cancelled) when the selection changes."""
        await follow_forever(lambda history: self.cluster.follow_log(name, history), LOG_HISTORY,
                             lambda lines: self.post_message(self.LogLines(name, lines)),
                             lambda note: self.post_message(self.LogNote(name, note)))

    # Actions are never exclusive: cancelling a start half-way would leave a half-started node.
    # While one runs, check_action greys its key out instead.
    @work(group="node-action", exit_on_error=False)
    async def start_node(self, name: str) -> None:
        await self.cluster.start_node(name)

    @work(group="node-action", exit_on_error=False)
    async def stop_node(self, name: str) -> None:
        await self.cluster.stop_node(name)

    @work(group="node-action", exit_on_error=False)
    async def restart_node(self, name: str) -> None:
        stopped = await self.cluster.stop_node(name)
        if stopped.state == STOPPED:  # a stop that failed said why; starting would hide it
            await self.cluster.start_node(name)

    @work(group="coordinator-action", exit_on_error=False)
    async def start_coordinator(self) -> None:
        """Over the ready workers: placed as planned when every worker of the plan is ready,
        else by llama.cpp's own split (and the event log says why)."""
        spans = None
        try:
            placement = await plan_now(self.cluster)
            planned = placement.plan.rpc_spans()
            not_ready = [name for name, _, count in planned
                         if count and self.cluster.nodes[name].state != READY]
            if not_ready:
                self.cluster.notice(f"coordinator without the plan: {', '.join(not_ready)} "
                                    "not ready (llama.cpp splits by the workers' free memory)",
                                    "warning")
            else:
                spans = planned
        except (PlacementError, PlanRefused) as exc:
            self.cluster.notice(f"coordinator without a plan: {exc}", "warning")
        await self.cluster.start_coordinator(spans=spans)

    @work(group="coordinator-action", exit_on_error=False)
    async def stop_coordinator(self) -> None:
        await self.cluster.stop_coordinator()

    @work(group="cluster-action", exit_on_error=False)
    async def cluster_up(self) -> None:
        """As `torbiz-tui up`: the preflight, the plan, then only the plan's workers and the
        coordinator placing exactly the plan."""
        try:
            placement = await preflight_and_plan(self.cluster)
            if placement is None:  # a Petals swarm: Cluster.up plans its blocks
                await self.cluster.up()
                return
            self.cluster.notice(f"plan ({self.config.plan.policy}): " + ", ".join(
                f"{name} blocks {first}-{first + count - 1}"
                for name, first, count in placement.plan.rpc_spans()))
            await self.cluster.up(placement.plan.rpc_spans())
        except NothingStarted as exc:
            self.post_message(self.ActionProblems(
                [*exc.problems, f"the {exc.stage} refused: nothing was started"]))
        except ClusterError as exc:
            self.post_message(self.ActionProblems(exc.problems))

    @work(group="generate", exclusive=True, exit_on_error=False)
    async def smoke_generate(self) -> None:
        try:
            result = await smoke_generate(self.config)
        except SmokeError as exc:
            self.cluster.notice(f"generation failed: {exc}", "error")
            return
        self.cluster.notice(f"generated {result.tokens} tokens in {result.seconds:.2f} s "
                            f"({result.tokens_per_s:.1f} tok/s): {result.text.strip()[:80]!r}")

    @work(group="plan", exclusive=True, exit_on_error=False)
    async def plan_preview(self) -> None:
        try:
            text, refused = await plan_text(self.cluster), False
        except (PlacementError, PlanRefused, PetalsError) as exc:
            text, refused = str(exc), True
        self.post_message(self.PlanReady(text, refused))

    @work(group="cluster-action", exit_on_error=False)
    async def cluster_down(self) -> None:
        try:
            await self.cluster.down()
        except ClusterError as exc:
            self.post_message(self.ActionProblems(exc.problems))

    @work(group="cluster-action", exit_on_error=False)
    async def stop_then_quit(self) -> None:
        try:
            await self.cluster.down()
        except ClusterError as exc:  # the dashboard stays, showing what is still running
            self.post_message(self.ActionProblems(exc.problems))
            return
        self.post_message(self.StoppedForQuit())

    # ---- message handlers: the only place widgets change ------------------------------------

    def _shutting_down(self) -> bool:
        """Messages still queued when the app shuts down find the widgets already gone."""
        return not self.is_running or self._main is None or not self._main.is_mounted

    def _record(self, level: str, text: str) -> None:
        """One line of the event log; open event-log screens get it at once."""
        line = f"{self.clock()} {level:<7} {sanitize(text)}"
        self.event_log.append(line)
        for screen in self.screen_stack:
            if isinstance(screen, LogsScreen):
                screen.add_event(line)

    def _tell(self, text: str, severity: str = "error") -> None:
        """A notification that also goes to the event log."""
        self._record(severity, text)
        timeout = {"error": 15, "warning": 8}.get(severity, 4)
        self.notify(sanitize(text), severity=severity,  # type: ignore[arg-type]
                    timeout=timeout, markup=False)

    @on(NodeUpdated)
    def _node_updated(self, message: NodeUpdated) -> None:
        if self._shutting_down():
            return
        table = self.main.query_one(NodeTable)
        table.show_node(message.status)
        if message.status.name == table.selected:  # the keys depend on no other node
            self._refresh_keys()

    @on(CoordinatorUpdated)
    def _coordinator_updated(self, message: CoordinatorUpdated) -> None:
        if self._shutting_down():
            return
        self.main.query_one(CoordinatorBar).status = message.status
        self._show_loading(message.status.state)
        self._refresh_keys()

    def _show_loading(self, state: str) -> None:
        progress = self.main.query_one(LoadProgress)
        if state == STARTING:
            progress.start()
        else:
            progress.stop()

    @on(LayerMapUpdated)
    def _layer_map_updated(self, message: LayerMapUpdated) -> None:
        if self._shutting_down():
            return
        layer_map = message.layer_map
        self.main.query_one(LayerMapView).show_map(layer_map)
        table = self.main.query_one(NodeTable)
        held = {span.node: span for span in layer_map.spans} if layer_map else {}
        self._holding = set(held)
        for node in self.config.nodes:
            span = held.get(node.name)
            table.show_extra(node.name, layers="-" if span is None or not span.count else
                             f"{span.first}-{span.last}" if span.count > 1 else str(span.first))

    @on(ThroughputUpdated)
    def _throughput_updated(self, message: ThroughputUpdated) -> None:
        if self._shutting_down():
            return
        self.main.query_one(ThroughputPanel).show_sample(message.sample, message.error)
        # Every worker holding layers takes part in every token (llama.cpp runs the blocks
        # in turn): each one's rate is the coordinator's.
        rate = f"{message.sample.gen_tps:.1f}" if message.sample is not None else "-"
        table = self.main.query_one(NodeTable)
        for node in self.config.nodes:
            if node.backend == "llama-rpc":
                table.show_extra(node.name, tps=rate if node.name in self._holding else "-")

    @on(ResourcesUpdated)
    def _resources_updated(self, message: ResourcesUpdated) -> None:
        if not self._shutting_down():
            self.main.query_one(NodeTable).show_extra(message.node, device=message.device,
                                                      free=message.free)

    @on(PlanReady)
    def _plan_ready(self, message: PlanReady) -> None:
        def answered(up: bool | None) -> None:
            if up and self.check_action("up", ()):
                self.action_up()

        if not self._shutting_down():
            self.push_screen(PlanScreen(message.text, refused=message.refused,
                                        read_only=self.read_only), answered)

    @on(NoticeReceived)
    def _notice(self, message: NoticeReceived) -> None:
        if self._shutting_down():
            return
        notice = message.notice
        text = sanitize(notice.text)
        self._record(notice.level, notice.text)
        if notice.node is not None:  # kept next to the node's log, after the toast is gone
            self.main.query_one(LogPane).add_note(
                notice.node, f"-- {self.clock()} {notice.level}: {text} --")
        loading = LOADING.match(text)
        if loading and notice.level == "info":
            progress = self.main.query_one(LoadProgress)
            progress.start()
            progress.show_detail(f"loading the model · {loading['seconds']} s")
            fraction = notice.extra.get("load_progress")
            if isinstance(fraction, (int, float)):
                progress.show_fraction(float(fraction))
            return  # shown in the progress row; a toast every 5 s would only be noise
        if notice.level == "error":
            self._recent_errors.append(notice.text)
            self.notify(text, severity="error", timeout=15, markup=False)
        elif notice.level == "warning":
            self.notify(text, severity="warning", timeout=8, markup=False)
        else:
            self.notify(text, timeout=4, markup=False)

    @on(ActionProblems)
    def _action_problems(self, message: ActionProblems) -> None:
        if self._shutting_down():
            return
        for problem in message.problems:
            if problem not in self._recent_errors:  # the Cluster may have said it already
                self._tell(problem)

    @on(StoppedForQuit)
    def _stopped_for_quit(self) -> None:
        self.exit(0)

    @on(Refreshed)
    def _refreshed(self, message: Refreshed) -> None:
        if self._shutting_down():
            return
        # Nodes whose state did not change sent no event: show what the Cluster now knows.
        table = self.main.query_one(NodeTable)
        busy = set(self._busy.values())
        for status in self.cluster.nodes.values():
            if table.state_of(status.name) == PROBING and status.name not in busy:
                table.show_node(status)
        bar = self.main.query_one(CoordinatorBar)
        if bar.status.state == PROBING and COORDINATOR not in busy:
            bar.status = self.cluster.coordinator
            self._show_loading(bar.status.state)
        if message.error:
            self.sub_title = " · ".join(filter(None, [self._mode(), "stale"]))
            if not self._stale:
                self._tell(f"refresh failed, retrying: {message.error}", "warning")
        else:
            self.sub_title = self._mode()
        self._stale = bool(message.error)
        self.main.query_one(StatusLine).show_stale(self._stale)
        self._refresh_keys()

    @on(NodeTable.NodeSelected)
    def _node_selected(self, message: NodeTable.NodeSelected) -> None:
        if self._shutting_down():
            return
        node = self.config.node(message.name)
        pane = self.main.query_one(LogPane)
        pane.follow(node.name, f"log · {node.name} · {node.endpoint}")
        if self.live:
            pane.add_note(node.name, f"-- {node.name}: the worker log's last {LOG_HISTORY} "
                                     "lines, then new lines as they come --")
            self.follow_log(node.name)
        self._refresh_keys()

    @on(NodeTable.NodeOpened)
    def _node_opened(self, message: NodeTable.NodeOpened) -> None:
        self._open_logs(LogSource("node", message.name))

    @on(NodeTable.CountsChanged)
    def _counts_changed(self, message: NodeTable.CountsChanged) -> None:
        if self._shutting_down():
            return
        self.main.query_one(StatusLine).show_counts(message.counts, message.shown,
                                                    message.total)

    @on(NodeFilter.FilterChanged)
    def _filter_changed(self, message: NodeFilter.FilterChanged) -> None:
        self.main.query_one(NodeTable).set_filter(message.text)
        self.main.query_one(StatusLine).show_filter(message.text)
        self._refresh_keys()

    @on(NodeFilter.FilterDone)
    def _filter_done(self) -> None:
        node_filter = self.main.query_one(NodeFilter)
        if not node_filter.value:
            node_filter.close()
        self.main.query_one(NodeTable).focus()

    @on(LogLines)
    def _log_lines(self, message: LogLines) -> None:
        if self._shutting_down():
            return
        self.main.query_one(LogPane).add_lines(message.source, message.lines)

    @on(LogNote)
    def _log_note(self, message: LogNote) -> None:
        if self._shutting_down():
            return
        self.main.query_one(LogPane).add_note(message.source, message.text)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if self._shutting_down():
            return
        if event.state not in (WorkerState.SUCCESS, WorkerState.ERROR, WorkerState.CANCELLED):
            return
        if event.state == WorkerState.ERROR:
            self._tell(f"{event.worker.name} failed: {event.worker.error}")
        key = self._busy.pop(event.worker, None)
        if key is None:
            return
        # Our own "stopping" goes; what the Cluster knows now stays (it may not have changed).
        table = self.main.query_one(NodeTable)
        for status in self.cluster.nodes.values():
            if key in (status.name, WHOLE_CLUSTER) and table.state_of(status.name) == STOPPING:
                table.show_node(status)
        bar = self.main.query_one(CoordinatorBar)
        if key in (COORDINATOR, WHOLE_CLUSTER) and bar.status.state == STOPPING:
            bar.status = self.cluster.coordinator
        self._refresh_keys()

    # ---- actions --------------------------------------------------------------------------

    def _selected(self) -> str | None:
        if self._main is None or not self._main.is_mounted:
            return None
        return self.main.query_one(NodeTable).selected

    def _shown_state(self, name: str) -> str | None:
        return self.main.query_one(NodeTable).state_of(name)

    def _mark_busy(self, worker: Worker[None], key: str) -> None:
        self._busy[worker] = key
        self._refresh_keys()

    def _refresh_keys(self) -> None:
        """Redraw the footer only when a key's state changed: a redraw rebuilds every key, and
        most node updates change none."""
        if self._shutting_down():
            return
        keys = tuple(self.check_action(action, ()) for action in KEYED_ACTIONS)
        if keys != self._keys:
            self._keys = keys
            self.refresh_bindings()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """False hides a key (read-only mode), None greys it out (makes no sense right now)."""
        if self._shutting_down():
            return True
        if action in CHANGES_CLUSTER and self.read_only:
            return False
        if action == "generate":
            if self.swarm:
                return True if any(n.state == READY for n in self.cluster.nodes.values()) \
                    else None
            return True if self.main.query_one(CoordinatorBar).status.state == READY else None
        if action not in CHANGES_CLUSTER | NEEDS_NODE:
            return True
        busy = set(self._busy.values())
        coordinator = self.main.query_one(CoordinatorBar).status.state
        if action in ("start_coordinator", "stop_coordinator"):
            if self.swarm:  # a Petals swarm has no coordinator
                return False
            stopped = coordinator in (STOPPED, FAILED)
            if (action == "start_coordinator") != stopped and coordinator != PROBING:
                return False  # the other binding on this key applies
            return None if busy & {COORDINATOR, WHOLE_CLUSTER} or coordinator == PROBING \
                else True
        if action in ("up", "down"):
            return None if busy else True
        name = self._selected()
        if name is None:
            return None
        if action == "logs":
            return True
        if busy & {name, WHOLE_CLUSTER}:
            return None
        state = self._shown_state(name)
        if action == "start_node":
            return None if state in (READY, STARTING, PROBING) else True
        return None if state in (STOPPED, PROBING) else True  # stop, restart

    def _show_stopping(self, key: str) -> None:
        """The core reports only a stop's outcome; say at once that one is under way."""
        table = self.main.query_one(NodeTable)
        for status in self.cluster.nodes.values():
            if key in (status.name, WHOLE_CLUSTER) and status.state != STOPPED:
                table.show_node(replace(status, state=STOPPING))
        bar = self.main.query_one(CoordinatorBar)
        if key in (COORDINATOR, WHOLE_CLUSTER) and bar.status.state != STOPPED:
            bar.status = replace(bar.status, state=STOPPING)

    def action_move(self, step: int) -> None:
        table = self.main.query_one(NodeTable)
        if step > 0:
            table.action_cursor_down()
        else:
            table.action_cursor_up()

    def action_start_node(self) -> None:
        name = self._selected()
        if name is not None:
            self._mark_busy(self.start_node(name), name)

    def action_stop_node(self) -> None:
        name = self._selected()
        if name is None:
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self._mark_busy(self.stop_node(name), name)
                self._show_stopping(name)

        node = self.config.node(name)
        self.push_screen(ConfirmScreen(f"Stop the worker on {name} ({node.endpoint})?"),
                         answered)

    def action_restart_node(self) -> None:
        name = self._selected()
        if name is None:
            return

        def restart() -> None:
            self._mark_busy(self.restart_node(name), name)
            self._show_stopping(name)

        coordinator = self.main.query_one(CoordinatorBar).status
        if coordinator.state not in (READY, STARTING):
            restart()
            return
        node = self.config.node(name)
        self.push_screen(ConfirmScreen(
            f"Restart the worker on {name} ({node.endpoint})? The coordinator "
            f"({coordinator.url}) uses it and aborts on its next request once the worker "
            "goes away: restart the coordinator afterwards."),
            lambda yes: restart() if yes else None)

    def action_start_coordinator(self) -> None:
        self._mark_busy(self.start_coordinator(), COORDINATOR)

    def action_stop_coordinator(self) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self._mark_busy(self.stop_coordinator(), COORDINATOR)
                self._show_stopping(COORDINATOR)

        url = self.main.query_one(CoordinatorBar).status.url
        self.push_screen(ConfirmScreen(f"Stop the coordinator ({url})? Requests in flight "
                                       "are cut off."), answered)

    def action_generate(self) -> None:
        self.notify("generating 16 tokens through the cluster ...", timeout=3)
        self.smoke_generate()

    def action_plan(self) -> None:
        self.notify("planning: reading the model and every node's free memory ...",
                    timeout=3)
        self.plan_preview()

    def action_up(self) -> None:
        self._mark_busy(self.cluster_up(), WHOLE_CLUSTER)

    def action_down(self) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self._mark_busy(self.cluster_down(), WHOLE_CLUSTER)
                self._show_stopping(WHOLE_CLUSTER)

        self.push_screen(ConfirmScreen(f"Take cluster {self.config.name} down: the coordinator "
                                       f"and all {len(self.config.nodes)} workers?"), answered)

    def _open_logs(self, source: LogSource) -> None:
        if isinstance(self.screen, LogsScreen):
            self.screen.show_source(source)
            return
        self.push_screen(LogsScreen(source, self._selected(), self.log_lines))

    def action_logs(self) -> None:
        name = self._selected()
        if name is not None:
            self._open_logs(LogSource("node", name))

    def action_event_log(self) -> None:
        self._open_logs(LogSource("events"))

    def action_coordinator_log(self) -> None:
        self._open_logs(LogSource("coordinator"))

    def action_filter(self) -> None:
        self.main.query_one(NodeFilter).open()

    def clear_filter(self) -> None:
        node_filter = self.main.query_one(NodeFilter)
        node_filter.value = ""
        node_filter.close()
        self.main.query_one(NodeTable).set_filter("")
        self.main.query_one(StatusLine).show_filter("")

    def jump_to(self, name: str) -> None:
        """Select `name` in the table, clearing a filter that hides it."""
        table = self.main.query_one(NodeTable)
        if not table.select(name):
            self.clear_filter()
            table.select(name)
        table.focus()

    def action_help(self) -> None:
        self.push_screen(HelpScreen(f"torbiz · {self.config.name} · keys and commands",
                                    self.help_sections()))

    async def action_quit(self) -> None:
        """Ask whether to leave the cluster running (the default) or stop it; nothing to ask
        when nothing runs, or in read-only mode."""
        running = self._running_summary()
        if self.read_only or not running:
            self.exit(0)
            return

        def answered(choice: str | None) -> None:
            if choice == "leave":
                self.exit(0)
            elif choice == "stop":
                self._mark_busy(self.stop_then_quit(), WHOLE_CLUSTER)
                self._show_stopping(WHOLE_CLUSTER)

        self.push_screen(QuitScreen(self.config.name, running), answered)

    def _running_summary(self) -> str:
        """What may still run, in words; "" when everything is known to be stopped."""
        table = self.main.query_one(NodeTable)
        live = [n.name for n in self.config.nodes if table.state_of(n.name) != STOPPED]
        coordinator = self.main.query_one(CoordinatorBar).status.state
        parts = []
        if live:
            parts.append(f"{len(live)} of {len(self.config.nodes)} workers not stopped")
        if coordinator != STOPPED:
            parts.append(f"coordinator {coordinator}")
        return ", ".join(parts)

    # ---- palette and help -------------------------------------------------------------------

    def _bindings_by_action(self) -> dict[str, tuple[list[str], Binding]]:
        """Every key of every App binding, grouped by action, in BINDINGS order."""
        grouped: dict[str, tuple[list[str], Binding]] = {}
        for binding in self.BINDINGS:
            assert isinstance(binding, Binding)
            keys = [self.get_key_display(Binding(k.strip(), binding.action))
                    for k in binding.key.split(",")]
            if binding.action in grouped:
                grouped[binding.action][0].extend(k for k in keys
                                                  if k not in grouped[binding.action][0])
            else:
                grouped[binding.action] = (keys, binding)
        return grouped

    def palette_commands(self) -> list[PaletteCommand]:
        """What the palette offers now: the actions that make sense (read-only mode hides the
        ones that change the cluster), the logs, and a jump to every node."""
        commands: list[PaletteCommand] = []
        for action, (keys, binding) in self._bindings_by_action().items():
            name = action.partition("(")[0]
            if name in ("command_palette", "move") or self.check_action(name, ()) is not True:
                continue
            commands.append(PaletteCommand(
                binding.tooltip or binding.description, f"key: {' / '.join(keys)}",
                lambda action=action: self.run_action(action)))  # type: ignore[misc]
        commands.append(PaletteCommand("The coordinator's log, full screen",
                                       "also key 2 on the logs screen",
                                       self.action_coordinator_log))
        if self.main.query_one(NodeTable).filter_text:
            commands.append(PaletteCommand("Clear the node filter", "", self.clear_filter))
        for node in self.config.nodes:
            name = node.name
            commands.append(PaletteCommand(f"Jump to node {name}",
                                           f"{node.endpoint} · {self._shown_state(name)}",
                                           lambda name=name: self.jump_to(name)))  # type: ignore[misc]
        return commands

    def help_sections(self) -> list[HelpSection]:
        main: list[tuple[str, str]] = [("↑ / ↓", "Select a node; its log streams in the pane")]
        for action, (keys, binding) in self._bindings_by_action().items():
            if self.read_only and action in CHANGES_CLUSTER:
                continue
            main.append((" / ".join(keys), binding.tooltip or binding.description))
        if self.read_only:
            main.append(("", "Read-only mode: the keys that change the cluster are hidden"))

        def rows(bindings: Iterable[object]) -> list[tuple[str, str]]:
            found = []
            for binding in bindings:
                assert isinstance(binding, Binding)
                keys = [self.get_key_display(Binding(k.strip(), binding.action))
                        for k in binding.key.split(",")]
                found.append((" / ".join(keys), binding.tooltip or binding.description))
            return found

        logs = rows(LogsScreen.BINDINGS) + [
            ("↑ ↓ pgup pgdn home", "Scroll; scrolling up stops following"),
            ("end", "Back to the newest line, following again"),
        ]
        node_filter = [("type", "Filter as you type"),
                       ("enter", "Keep the filter, back to the table")] + rows(NodeFilter.BINDINGS)
        palette = [(": then type", "Every action above that makes sense now, plus:")] + [
            ("", "Jump to node NAME"), ("", "The coordinator's log, full screen"),
            ("", "Clear the node filter"), ("", "Theme, screenshot, keys (Textual's own)")]
        questions = [("y / n", "Confirm or refuse a stop (escape is no)"),
                     ("l / s / esc", "Quit: leave the cluster running (enter) / stop it first "
                                     "/ stay")]
        return [("Dashboard", main), ("Filter (/)", node_filter), ("Logs screen (l, e)", logs),
                ("Command palette (:)", palette), ("Questions", questions),
                ("Headless", [("torbiz-tui --help", "up, down, status, logs, watch, doctor: the "
                                                    "same actions for scripts")])]


def make_app(config: ClusterConfig, read_only: bool = False, *, live: bool = True,
             log_lines: int = MAX_LINES, clock: Callable[[], str] = _clock) -> TorbizApp:
    """The one way to build the dashboard: the CLI, the web server and the tests share it."""
    return TorbizApp(config, read_only=read_only, live=live, log_lines=log_lines, clock=clock)


def run_dashboard(config: ClusterConfig, read_only: bool = False,
                  log_lines: int = MAX_LINES) -> int:
    make_app(config, read_only=read_only, log_lines=log_lines).run()
    return 0


__all__ = ["ConfirmScreen", "PaletteCommand", "QuitScreen", "TorbizApp", "make_app",
           "run_dashboard"]
