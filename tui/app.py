"""The dashboard: renders the Cluster's events and asks the Cluster to act; never talks to nodes.

Workers await the core and post a message; widgets change only in message handlers.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, replace

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Header, Label
from textual.worker import Worker, WorkerState

from core.cluster import Cluster, ClusterError
from core.config import ClusterConfig
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

from .text import sanitize
from .widgets.coordinator_bar import CoordinatorBar
from .widgets.log_pane import LogPane
from .widgets.node_table import PROBING, STOPPING, NodeTable

REFRESH_INTERVAL = 2.0  # seconds between the end of one refresh and the start of the next
REFRESH_MAX_BACKOFF = 30.0
PROBE_PARALLEL = 16  # as the Cluster's own fan-out
LOG_HISTORY = 200  # lines of a log shown when its stream opens
LOG_QUEUE = 2_000  # lines read ahead of the screen; the stream waits when it is full
LOG_BATCH = 500  # most lines in one message
LOG_COALESCE = 0.05  # seconds: at most 20 log redraws a second

CHANGES_CLUSTER = frozenset(
    {"start_node", "stop_node", "start_coordinator", "stop_coordinator", "up", "down"})
COORDINATOR = "coordinator"  # busy key for a coordinator action
WHOLE_CLUSTER = "*"  # busy key for up/down


class ConfirmScreen(ModalScreen[bool]):
    """Asks before anything that stops work; `n`, escape and enter on No all say no."""

    BINDINGS = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(Text(self.question), id="question")
            with Horizontal(id="buttons"):
                yield Button("Yes (y)", id="yes", variant="error")
                yield Button("No (n)", id="no", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)


class TorbizApp(App[int]):
    CSS_PATH = "app.tcss"
    BINDINGS = [
        Binding("j", "move(1)", "Next node", show=False),
        Binding("k", "move(-1)", "Previous node", show=False),
        Binding("s", "start_node", "Start node"),
        Binding("x", "stop_node", "Stop node"),
        # One key, two actions: check_action shows the one that fits the coordinator's state.
        Binding("c", "start_coordinator", "Start coordinator"),
        Binding("c", "stop_coordinator", "Stop coordinator"),
        Binding("u", "up", "Cluster up"),
        Binding("d", "down", "Cluster down"),
        Binding("q", "quit", "Quit"),
    ]

    # ---- messages: what the Cluster and the workers tell the screen ------------------------

    @dataclass
    class NodeUpdated(Message):
        status: NodeStatus

    @dataclass
    class CoordinatorUpdated(Message):
        status: CoordinatorStatus

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

    # ---- life cycle -------------------------------------------------------------------------

    def __init__(self, config: ClusterConfig, read_only: bool = False) -> None:
        super().__init__()
        self.config = config
        self.read_only = read_only
        self.cluster = Cluster(config)
        self.cluster.subscribe(self._on_cluster_event)
        self._busy: dict[Worker[None], str] = {}
        self._recent_errors: deque[str] = deque(maxlen=64)
        self._stale = False
        self.title = f"torbiz · {config.name}"
        self.sub_title = self._mode()

    def compose(self) -> ComposeResult:
        yield Header()
        yield NodeTable()
        yield CoordinatorBar()
        yield LogPane()
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(NodeTable)
        for status in self.cluster.nodes.values():
            table.show_node(replace(status, state=PROBING))
        self.query_one(CoordinatorBar).status = replace(self.cluster.coordinator, state=PROBING)
        table.focus()
        self.poll()

    async def on_unmount(self) -> None:
        # The cluster keeps running: only our connections to it close.
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
            await asyncio.gather(self.cluster.refresh_nodes(), self.cluster.refresh_coordinator())
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

    @work(exclusive=True, group="log", exit_on_error=False)
    async def follow_log(self, name: str) -> None:
        """Stream `name`'s log into the pane; replaced (cancelled) when the selection changes."""
        backoff = REFRESH_INTERVAL
        history = LOG_HISTORY
        while True:
            try:
                await self._stream_log(name, history)
                reason = "the log stream ended"
            except Exception as exc:  # shown to the operator, then retried
                reason = f"the log stream failed: {exc}"
            self.post_message(self.LogNote(name, f"-- {reason}; retrying in {backoff:g} s --"))
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, REFRESH_MAX_BACKOFF)
            history = 0  # the lines already shown stay; only new ones come

    async def _stream_log(self, name: str, history: int) -> None:
        """Read lines ahead into a bounded queue; post them in batches, not one per line."""
        queue: asyncio.Queue[str | BaseException | None] = asyncio.Queue(LOG_QUEUE)

        async def pump() -> None:
            try:
                async for line in self.cluster.follow_log(name, history):
                    await queue.put(line)
            except Exception as exc:  # handed to the reader below
                await queue.put(exc)
            else:
                await queue.put(None)

        reader = asyncio.create_task(pump())
        try:
            while True:
                batch: list[str] = []
                item = await queue.get()
                while isinstance(item, str):
                    batch.append(item)
                    if queue.empty() or len(batch) >= LOG_BATCH:
                        break
                    item = queue.get_nowait()
                if batch:
                    self.post_message(self.LogLines(name, batch))
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    return
                await asyncio.sleep(LOG_COALESCE)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    # Actions are never exclusive: cancelling a start half-way would leave a half-started node.
    # While one runs, check_action greys its key out instead.
    @work(group="node-action", exit_on_error=False)
    async def start_node(self, name: str) -> None:
        await self.cluster.start_node(name)

    @work(group="node-action", exit_on_error=False)
    async def stop_node(self, name: str) -> None:
        await self.cluster.stop_node(name)

    @work(group="coordinator-action", exit_on_error=False)
    async def start_coordinator(self) -> None:
        await self.cluster.start_coordinator()

    @work(group="coordinator-action", exit_on_error=False)
    async def stop_coordinator(self) -> None:
        await self.cluster.stop_coordinator()

    @work(group="cluster-action", exit_on_error=False)
    async def cluster_up(self) -> None:
        try:
            await self.cluster.up()
        except ClusterError as exc:
            self.post_message(self.ActionProblems(exc.problems))

    @work(group="cluster-action", exit_on_error=False)
    async def cluster_down(self) -> None:
        try:
            await self.cluster.down()
        except ClusterError as exc:
            self.post_message(self.ActionProblems(exc.problems))

    # ---- message handlers: the only place widgets change ------------------------------------

    def _shutting_down(self) -> bool:
        """Messages still queued when the app shuts down find the widgets already gone."""
        return not self.is_running

    @on(NodeUpdated)
    def _node_updated(self, message: NodeUpdated) -> None:
        if self._shutting_down():
            return
        self.query_one(NodeTable).show_node(message.status)
        self.refresh_bindings()

    @on(CoordinatorUpdated)
    def _coordinator_updated(self, message: CoordinatorUpdated) -> None:
        if self._shutting_down():
            return
        self.query_one(CoordinatorBar).status = message.status
        self.refresh_bindings()

    @on(NoticeReceived)
    def _notice(self, message: NoticeReceived) -> None:
        if self._shutting_down():
            return
        notice = message.notice
        text = sanitize(notice.text)
        if notice.node is not None:  # kept next to the node's log, after the toast is gone
            stamp = time.strftime("%H:%M:%S")
            self.query_one(LogPane).add_note(notice.node, f"-- {stamp} {notice.level}: {text} --")
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
                self.notify(sanitize(problem), severity="error", timeout=15, markup=False)

    @on(Refreshed)
    def _refreshed(self, message: Refreshed) -> None:
        if self._shutting_down():
            return
        # Nodes whose state did not change sent no event: show what the Cluster now knows.
        table = self.query_one(NodeTable)
        busy = set(self._busy.values())
        for status in self.cluster.nodes.values():
            if table.state_of(status.name) == PROBING and status.name not in busy:
                table.show_node(status)
        bar = self.query_one(CoordinatorBar)
        if bar.status.state == PROBING and COORDINATOR not in busy:
            bar.status = self.cluster.coordinator
        if message.error:
            self.sub_title = " · ".join(filter(None, [self._mode(), "stale"]))
            if not self._stale:
                self.notify(f"refresh failed, retrying: {sanitize(message.error)}",
                            severity="warning", markup=False)
        else:
            self.sub_title = self._mode()
        self._stale = bool(message.error)
        self.refresh_bindings()

    @on(NodeTable.NodeSelected)
    def _node_selected(self, message: NodeTable.NodeSelected) -> None:
        if self._shutting_down():
            return
        node = self.config.node(message.name)
        pane = self.query_one(LogPane)
        pane.follow(node.name, f"log · {node.name} · {node.endpoint}")
        pane.add_note(node.name, f"-- {node.name}: the worker log's last {LOG_HISTORY} lines, "
                                 "then new lines as they come --")
        self.follow_log(node.name)
        self.refresh_bindings()

    @on(LogLines)
    def _log_lines(self, message: LogLines) -> None:
        if self._shutting_down():
            return
        self.query_one(LogPane).add_lines(message.source, message.lines)

    @on(LogNote)
    def _log_note(self, message: LogNote) -> None:
        if self._shutting_down():
            return
        self.query_one(LogPane).add_note(message.source, message.text)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if self._shutting_down():
            return
        if event.state not in (WorkerState.SUCCESS, WorkerState.ERROR, WorkerState.CANCELLED):
            return
        if event.state == WorkerState.ERROR:
            error = event.worker.error
            self.notify(sanitize(f"{event.worker.name} failed: {error}"), severity="error",
                        timeout=15, markup=False)
        key = self._busy.pop(event.worker, None)
        if key is None:
            return
        # Our own "stopping" goes; what the Cluster knows now stays (it may not have changed).
        table = self.query_one(NodeTable)
        for status in self.cluster.nodes.values():
            if key in (status.name, WHOLE_CLUSTER) and table.state_of(status.name) == STOPPING:
                table.show_node(status)
        bar = self.query_one(CoordinatorBar)
        if key in (COORDINATOR, WHOLE_CLUSTER) and bar.status.state == STOPPING:
            bar.status = self.cluster.coordinator
        self.refresh_bindings()

    # ---- actions --------------------------------------------------------------------------

    def _selected(self) -> str | None:
        return self.query_one(NodeTable).selected

    def _shown_state(self, name: str) -> str | None:
        return self.query_one(NodeTable).state_of(name)

    def _mark_busy(self, worker: Worker[None], key: str) -> None:
        self._busy[worker] = key
        self.refresh_bindings()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """False hides a key (read-only mode), None greys it out (makes no sense right now)."""
        if action not in CHANGES_CLUSTER or self._shutting_down():
            return True
        if self.read_only:
            return False
        busy = set(self._busy.values())
        coordinator = self.query_one(CoordinatorBar).status.state
        if action in ("start_coordinator", "stop_coordinator"):
            stopped = coordinator in (STOPPED, FAILED)
            if (action == "start_coordinator") != stopped and coordinator != PROBING:
                return False  # the other binding on this key applies
            return None if busy & {COORDINATOR, WHOLE_CLUSTER} or coordinator == PROBING \
                else True
        if action in ("up", "down"):
            return None if busy else True
        name = self._selected()
        if name is None or busy & {name, WHOLE_CLUSTER}:
            return None
        state = self._shown_state(name)
        if action == "start_node":
            return None if state in (READY, STARTING, PROBING) else True
        return None if state in (STOPPED, PROBING) else True

    def _show_stopping(self, key: str) -> None:
        """The core reports only a stop's outcome; say at once that one is under way."""
        table = self.query_one(NodeTable)
        for status in self.cluster.nodes.values():
            if key in (status.name, WHOLE_CLUSTER) and status.state != STOPPED:
                table.show_node(replace(status, state=STOPPING))
        bar = self.query_one(CoordinatorBar)
        if key in (COORDINATOR, WHOLE_CLUSTER) and bar.status.state != STOPPED:
            bar.status = replace(bar.status, state=STOPPING)

    def action_move(self, step: int) -> None:
        table = self.query_one(NodeTable)
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

    def action_start_coordinator(self) -> None:
        self._mark_busy(self.start_coordinator(), COORDINATOR)

    def action_stop_coordinator(self) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self._mark_busy(self.stop_coordinator(), COORDINATOR)
                self._show_stopping(COORDINATOR)

        url = self.query_one(CoordinatorBar).status.url
        self.push_screen(ConfirmScreen(f"Stop the coordinator ({url})? Requests in flight "
                                       "are cut off."), answered)

    def action_up(self) -> None:
        self._mark_busy(self.cluster_up(), WHOLE_CLUSTER)

    def action_down(self) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self._mark_busy(self.cluster_down(), WHOLE_CLUSTER)
                self._show_stopping(WHOLE_CLUSTER)

        self.push_screen(ConfirmScreen(f"Take cluster {self.config.name} down: the coordinator "
                                       f"and all {len(self.config.nodes)} workers?"), answered)


def make_app(config: ClusterConfig, read_only: bool = False) -> TorbizApp:
    """The one way to build the dashboard: the CLI and the tests share it."""
    return TorbizApp(config, read_only=read_only)


def run_dashboard(config: ClusterConfig, read_only: bool = False) -> int:
    make_app(config, read_only=read_only).run()
    return 0


__all__ = ["ConfirmScreen", "TorbizApp", "make_app", "run_dashboard"]
