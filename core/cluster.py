"""The cluster: ties the config, the transports and the engine together and emits events.

Both the headless commands and the dashboard drive it (through core/operations.py); it never
prints. It picks the engine once from the config and lends it a narrow context: transports,
state directories, the last known status and a way to report."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

from core.config import ClusterConfig, NodeConfig
from core.engines.base import Capabilities, Engine, EngineError, Span
from core.engines.registry import make_engine
from core.planning.layer_map import LayerMap
from core.reach import detached
from core.reach.transport import (
    SILENT_KINDS,
    LocalTransport,
    Transport,
    TransportError,
    make_transport,
)
from core.status import (
    ClusterStatus,
    CoordinatorChanged,
    CoordinatorStatus,
    Event,
    Level,
    NodeChanged,
    NodeState,
    NodeStatus,
    Notice,
)

T = TypeVar("T")
EventSink = Callable[[Event], None]

WORKER_READY_TIMEOUT = 30.0
COORDINATOR_READY_TIMEOUT = 600.0

__all__ = ["COORDINATOR_READY_TIMEOUT", "WORKER_READY_TIMEOUT", "Cluster", "ClusterError",
           "Span"]


class ClusterError(Exception):
    """An operation failed; `problems` holds one sentence per node or part."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class Cluster:
    def __init__(self, config: ClusterConfig, *, max_parallel: int = 16) -> None:
        self.config = config
        self._sinks: list[EventSink] = []
        self._transports: dict[str, Transport] = {}
        self._locks: dict[str, asyncio.Lock] = {n.name: asyncio.Lock() for n in config.nodes}
        self._coordinator_lock = asyncio.Lock()
        self._fanout = asyncio.Semaphore(max_parallel)
        self.nodes: dict[str, NodeStatus] = {
            n.name: NodeStatus(n.name, n.host, n.backend, NodeState.STOPPED, None, n.endpoint)
            for n in config.nodes
        }
        self.engine: Engine = make_engine(self)
        self.coordinator = CoordinatorStatus(NodeState.STOPPED,
                                             self.engine.coordinator_url())

    @property
    def capabilities(self) -> Capabilities:
        return self.engine.capabilities

    # ---- events and the engine's context -----------------------------------------------------

    def subscribe(self, sink: EventSink) -> None:
        self._sinks.append(sink)

    def emit(self, event: Event) -> None:
        for sink in list(self._sinks):
            sink(event)

    def notice(self, text: str, level: Level | str = Level.INFO, node: str | None = None,
               extra: dict[str, Any] | None = None) -> None:
        """Tell every subscriber something for the operator's event log."""
        self.emit(Notice(text, Level(level), node, extra or {}))

    def report(self, status: NodeStatus) -> NodeStatus:
        if self.nodes.get(status.name) != status:
            self.nodes[status.name] = status
            self.emit(NodeChanged(status))
        return status

    def report_coordinator(self, status: CoordinatorStatus) -> CoordinatorStatus:
        if self.coordinator != status:
            self.coordinator = status
            self.emit(CoordinatorChanged(status))
        return status

    def last_status(self, name: str) -> NodeStatus:
        return self.nodes[name]

    def node_state_dir(self, node: NodeConfig) -> str:
        return f"{self.config.state_dir.rstrip('/')}/{self.config.name}/{node.name}"

    def transport(self, name: str) -> Transport:
        if name not in self._transports:
            self._transports[name] = make_transport(self.config.node(name))
        return self._transports[name]

    def _unreachable(self, node: NodeConfig, reason: str) -> NodeStatus:
        return self.report(NodeStatus(node.name, node.host, node.backend, NodeState.UNREACHABLE,
                                      None, node.endpoint, reason))

    def _not_responding(self, node: NodeConfig, reason: str) -> NodeStatus:
        previous = self.nodes.get(node.name)
        return self.report(NodeStatus(node.name, node.host, node.backend,
                                      NodeState.NOT_RESPONDING,
                                      previous.pid if previous else None, node.endpoint, reason,
                                      previous.started_at if previous else None))

    async def _gather(self, items: Iterable[T],
                      fn: Callable[[T], Awaitable[NodeStatus]]) -> list[NodeStatus]:
        async def limited(item: T) -> NodeStatus:
            async with self._fanout:
                return await fn(item)

        return list(await asyncio.gather(*(limited(i) for i in items)))

    async def close(self) -> None:
        await self.engine.close()
        transports, self._transports = self._transports, {}
        await asyncio.gather(*(t.close() for t in transports.values()), return_exceptions=True)

    # ---- nodes -----------------------------------------------------------------------------

    async def probe_node(self, name: str) -> NodeStatus:
        """Find the node's worker from its pidfile: works from a fresh process."""
        node = self.config.node(name)
        if self._locks[name].locked():
            return self.nodes[name]  # a start or stop is under way: it will say how it ended
        try:
            # The engine puts [ssh] status_timeout on each round trip to the node (a Petals
            # node's probe also reads the swarm's DHT here, which is no round trip to it).
            return await self.engine.probe_node(node)
        except TransportError as exc:
            if exc.kind in SILENT_KINDS:
                return self._not_responding(node, exc.reason)
            return self._unreachable(node, exc.reason)

    async def refresh_nodes(self) -> list[NodeStatus]:
        return await self._gather([n.name for n in self.config.nodes], self.probe_node)

    async def status(self, *, detail: bool = False) -> ClusterStatus:
        """Nodes and coordinator; with detail, also what the engine knows of the layers and
        the throughput."""
        nodes, coordinator = await asyncio.gather(self.refresh_nodes(), self.refresh_coordinator())
        base = ClusterStatus(self.config.name, tuple(nodes), coordinator)
        return await self.engine.status_detail(base) if detail else base

    async def layer_map(self) -> LayerMap:
        return await self.engine.layer_map()

    async def start_node(self, name: str, *, timeout: float = WORKER_READY_TIMEOUT) -> NodeStatus:
        node = self.config.node(name)
        async with self._locks[name]:
            self.report(NodeStatus(node.name, node.host, node.backend, NodeState.STARTING, None,
                                   node.endpoint))
            try:
                status = await self.engine.start_node(node, timeout)
            except TransportError as exc:
                status = self._unreachable(node, exc.reason)
        label = self.capabilities.worker_label
        if status.state != NodeState.READY:
            self.notice(f"{name}: {status.error}", Level.ERROR, name)
        else:
            self.notice(f"{name}: {label} ready on {node.endpoint} (pid {status.pid})", node=name)
        return status

    async def stop_node(self, name: str) -> NodeStatus:
        node = self.config.node(name)
        async with self._locks[name]:
            try:
                status = await self.engine.stop_node(node)
            except TransportError as exc:
                self.notice(f"{name}: cannot stop: {exc.reason}", Level.ERROR, name)
                return self._unreachable(node, exc.reason)
        if status.state == NodeState.FAILED:
            self.notice(f"{name}: {status.error}", Level.ERROR, name)
        else:
            self.notice(f"{name}: {self.capabilities.worker_label} stopped", node=name)
        return status

    async def start_workers(self, names: Iterable[str] | None = None) -> list[NodeStatus]:
        chosen = list(names) if names is not None else [n.name for n in self.engine.nodes()]
        return await self._gather(chosen, self.start_node)

    async def stop_workers(self) -> list[NodeStatus]:
        return await self._gather([n.name for n in self.config.nodes], self.stop_node)

    async def follow_log(self, name: str, lines: int = 200, *,
                         raw: bool = False) -> AsyncIterator[str]:
        node = self.config.node(name)
        script = detached.follow_script(self.node_state_dir(node), lines)
        async for line in self.transport(name).stream_lines(script, raw=raw):
            yield line

    # ---- the serving side ------------------------------------------------------------------

    async def refresh_coordinator(self) -> CoordinatorStatus:
        if self._coordinator_lock.locked():
            return self.coordinator
        status = await self.engine.refresh_coordinator()
        if status.state == NodeState.STOPPED and self.coordinator.state == NodeState.FAILED \
                and self.coordinator.pid is None:
            return self.coordinator  # a start refused before launch keeps its reason
        return self.report_coordinator(status)

    async def start_coordinator(self, *, timeout: float = COORDINATOR_READY_TIMEOUT,
                                spans: Sequence[Span] | None = None) -> CoordinatorStatus:
        """Launch the coordinator over the ready workers; `spans` (node, first block, blocks)
        place exactly that."""
        async with self._coordinator_lock:
            try:
                status = await self.engine.start_coordinator(spans, timeout)
            except EngineError as exc:
                status = self.report_coordinator(CoordinatorStatus(
                    NodeState.FAILED, self.engine.coordinator_url(), None, str(exc)))
        if status.state == NodeState.READY:
            self.notice(f"coordinator ready at {status.url} (pid {status.pid})")
        else:
            self.notice(f"coordinator: {status.error}", Level.ERROR)
        return status

    async def stop_coordinator(self) -> CoordinatorStatus:
        async with self._coordinator_lock:
            return await self.engine.stop_coordinator()

    async def follow_coordinator_log(self, lines: int = 200, *,
                                     raw: bool = False) -> AsyncIterator[str]:
        state_dir = self.engine.coordinator_log_dir()
        if state_dir is None:
            raise EngineError(f"a {self.capabilities.coordinator_label} has no log of its own")
        script = detached.follow_script(state_dir, lines)
        local = LocalTransport(NodeConfig(name="coordinator", host="127.0.0.1",
                                          transport="local"))
        async for line in local.stream_lines(script, raw=raw):
            yield line

    # ---- whole cluster ---------------------------------------------------------------------

    async def down(self) -> ClusterStatus:
        coordinator = await self.stop_coordinator()
        nodes = await self.stop_workers()
        problems = [f"{n.name}: {n.error}" for n in nodes if n.state != NodeState.STOPPED]
        if coordinator.state != NodeState.STOPPED:
            problems.insert(0, f"coordinator: {coordinator.error}")
        if problems:
            raise ClusterError(problems)
        return ClusterStatus(self.config.name, tuple(nodes), coordinator)
