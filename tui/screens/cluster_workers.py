"""The dashboard's cluster side: the messages the cluster and the workers send, and the workers
themselves. Each worker awaits core.operations (or a poll loop of tui/pollers.py) and posts a
message; MainScreen, a subclass, handles them: it owns the widgets and the keys."""

from __future__ import annotations

from dataclasses import dataclass

from textual import work
from textual.message import Message
from textual.screen import Screen

from core import operations
from core.cluster import Cluster
from core.operations import OperationError
from core.planning.layer_map import LayerMap
from core.status import (
    CoordinatorChanged,
    CoordinatorLoading,
    CoordinatorStatus,
    Event,
    Level,
    NodeChanged,
    NodeStatus,
    Notice,
)
from core.supervision.bottleneck import Bottleneck
from core.supervision.supervisor import Supervisor
from core.supervision.throughput import ThroughputSample
from tui import pollers
from tui.log_stream import follow_forever
from tui.model import Dashboard

LOG_HISTORY = 200  # lines of a log shown in the pane when its stream opens


class ClusterWorkers(Screen[None]):
    """A screen driving the cluster: `follow_cluster` subscribes to the cluster's events and
    starts the polls."""

    # ---- messages: what the cluster and the workers tell the screen ----------------------------

    @dataclass
    class NodeUpdated(Message):
        status: NodeStatus

        def can_replace(self, message: Message) -> bool:
            """A newer state of a node replaces one not drawn yet: one redraw, not many."""
            return isinstance(message, ClusterWorkers.NodeUpdated) \
                and message.status.name == self.status.name

    @dataclass
    class CoordinatorUpdated(Message):
        status: CoordinatorStatus

        def can_replace(self, message: Message) -> bool:
            return isinstance(message, ClusterWorkers.CoordinatorUpdated)

    @dataclass
    class LoadingUpdated(Message):
        loading: CoordinatorLoading

        def can_replace(self, message: Message) -> bool:
            return isinstance(message, ClusterWorkers.LoadingUpdated)

    @dataclass
    class NoticeReceived(Message):
        notice: Notice

    @dataclass
    class LayerMapUpdated(Message):
        layer_map: LayerMap | None
        error: str = ""

        def can_replace(self, message: Message) -> bool:
            return isinstance(message, ClusterWorkers.LayerMapUpdated) and not message.error

    @dataclass
    class ThroughputUpdated(Message):
        sample: ThroughputSample | None
        error: str = ""

    @dataclass
    class BottleneckUpdated(Message):
        found: Bottleneck | None

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
    class Refreshed(Message):
        """A refresh round finished; `error` is empty when it worked."""

        error: str = ""

    @dataclass
    class ActionProblems(Message):
        """An action failed; one sentence per part."""

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

    # ---- life cycle ---------------------------------------------------------------------------

    def __init__(self, cluster: Cluster, supervisor: Supervisor, model: Dashboard, *,
                 live: bool = True, id: str | None = None) -> None:  # noqa: A002
        """`live` False: no polls and no log streams, only the messages posted to the screen
        are shown (snapshots, the benchmark)."""
        super().__init__(id=id)
        self.cluster = cluster
        self.supervisor = supervisor
        self.model = model
        self.live = live

    def follow_cluster(self) -> None:
        self.cluster.subscribe(self._on_cluster_event)
        if self.live:
            self.poll()
            self.poll_metrics()
            self.poll_bottleneck()
            self.poll_resources()

    def _on_cluster_event(self, event: Event) -> None:
        """The cluster's sink: called on our loop; turned into messages, never drawn here."""
        if isinstance(event, NodeChanged):
            self.post_message(self.NodeUpdated(event.status))
        elif isinstance(event, CoordinatorChanged):
            self.post_message(self.CoordinatorUpdated(event.status))
        elif isinstance(event, CoordinatorLoading):
            self.post_message(self.LoadingUpdated(event))
        elif isinstance(event, Notice):
            self.post_message(self.NoticeReceived(event))

    def _gone(self) -> bool:
        """Messages still queued when the app shuts down find the widgets already gone."""
        return not self.app.is_running or not self.is_mounted

    # ---- workers: await the core, post a message ----------------------------------------------

    @work(exclusive=True, group="poll", exit_on_error=False)
    async def poll(self) -> None:
        await pollers.refresh_forever(
            lambda: pollers.refresh_round(self.cluster, self.supervisor, self.model.busy_keys),
            lambda error: self.post_message(self.Refreshed(error)))

    @work(exclusive=True, group="resources", exit_on_error=False)
    async def poll_resources(self) -> None:
        await pollers.resources_forever(
            self.cluster, lambda *found: self.post_message(self.ResourcesUpdated(*found)))

    @work(exclusive=True, group="metrics", exit_on_error=False)
    async def poll_metrics(self) -> None:
        await pollers.metrics_forever(
            self.cluster,
            lambda found, error: self.post_message(self.LayerMapUpdated(found, error)),
            lambda sample, error: self.post_message(self.ThroughputUpdated(sample, error)),
            self.model.idle_throughput_note)

    @work(exclusive=True, group="bottleneck", exit_on_error=False)
    async def poll_bottleneck(self) -> None:
        await pollers.bottleneck_forever(
            self.cluster, lambda found: self.post_message(self.BottleneckUpdated(found)))

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
        await operations.start_node(self.cluster, name)

    @work(group="node-action", exit_on_error=False)
    async def stop_node(self, name: str) -> None:
        await operations.stop_node(self.cluster, name)

    @work(group="node-action", exit_on_error=False)
    async def restart_node(self, name: str) -> None:
        await operations.restart_node(self.cluster, name)

    @work(group="coordinator-action", exit_on_error=False)
    async def start_coordinator(self) -> None:
        await operations.start_coordinator(self.cluster)

    @work(group="coordinator-action", exit_on_error=False)
    async def stop_coordinator(self) -> None:
        await operations.stop_coordinator(self.cluster)

    @work(group="cluster-action", exit_on_error=False)
    async def cluster_up(self) -> None:
        """As `torbiz-tui up`: the preflight, the plan, then only the plan's workers and the
        coordinator placing exactly the plan."""
        try:
            await operations.up(self.cluster)
        except OperationError as exc:
            refused = [f"the {exc.stage} refused: nothing was started"] \
                if exc.started_nothing else []
            self.post_message(self.ActionProblems([*exc.problems, *refused]))

    @work(group="cluster-action", exit_on_error=False)
    async def cluster_rebalance(self) -> None:
        """As `torbiz-tui rebalance`: plan over every node (one back after a fault too) and
        restart the coordinator over it."""
        try:
            await operations.rebalance(self.cluster)
        except OperationError as exc:
            self.post_message(self.ActionProblems(exc.problems))

    @work(group="cluster-action", exit_on_error=False)
    async def cluster_down(self) -> None:
        try:
            await operations.down(self.cluster)
        except OperationError as exc:
            self.post_message(self.ActionProblems(exc.problems))

    @work(group="cluster-action", exit_on_error=False)
    async def stop_then_quit(self) -> None:
        try:
            await operations.down(self.cluster)
        except OperationError as exc:  # the dashboard stays, showing what is still running
            self.post_message(self.ActionProblems(exc.problems))
            return
        self.post_message(self.StoppedForQuit())

    @work(group="generate", exclusive=True, exit_on_error=False)
    async def smoke_generate(self) -> None:
        try:
            found = await operations.generate(self.cluster)
        except OperationError as exc:
            self.cluster.notice(f"generation failed: {exc}", Level.ERROR)
            return
        self.cluster.notice(f"generated {found.tokens} tokens in {found.seconds:.2f} s "
                            f"({found.tokens_per_s:.1f} tok/s): {found.text.strip()[:80]!r}")

    @work(group="plan", exclusive=True, exit_on_error=False)
    async def plan_preview(self) -> None:
        try:
            text, refused = (await operations.plan_preview(self.cluster)).text, False
        except OperationError as exc:
            text, refused = str(exc), True
        self.post_message(self.PlanReady(text, refused))
