"""What a recovery reads before it decides: each remaining worker's probe (its free memory now)
and the caches of the ready nodes the plan left out (how much of each lost worker's blocks they
hold). All of it is read-only and bounded by the nodes' status deadlines, so the recovery starts
it at once, while it still confirms the fault, and a node that does not answer is left out
(never waited on)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from core.config import ClusterConfig, NodeConfig
from core.engines.base import Span
from core.planning.placement import PlacementError, read_model
from core.reach.probe import NodeProbe, probe_node
from core.reach.transport import TransportError
from core.status import NOT_RESPONDING, READY

if TYPE_CHECKING:
    from core.reach.probe import WorkerLookup
    from core.reach.transport import Transport
    from core.status import CoordinatorStatus, LayerShare, Level, NodeStatus


class RecoveryHost(Protocol):
    """The cluster as a recovery sees it: its statuses and the operations it may call."""

    config: ClusterConfig
    nodes: dict[str, NodeStatus]
    coordinator: CoordinatorStatus

    def transport(self, name: str) -> Transport: ...

    def notice(self, text: str, level: Level | str = ..., node: str | None = None,
               extra: dict[str, Any] | None = None) -> None: ...

    async def probe_node(self, name: str) -> NodeStatus: ...

    async def refresh_coordinator(self) -> CoordinatorStatus: ...

    async def stop_coordinator(self) -> CoordinatorStatus: ...

    async def start_coordinator(self, *, timeout: float = ...,
                                spans: Sequence[Span] | None = None) -> CoordinatorStatus: ...


class RecoveringEngine(Protocol):
    """What the recovery needs of the llama.cpp engine."""

    def nodes(self) -> list[NodeConfig]: ...

    def worker_lookup(self, node: NodeConfig, is_local: bool) -> WorkerLookup | None: ...

    async def layer_shares(self) -> tuple[LayerShare, ...]: ...

    async def standby_warmth(self, name: str, span: tuple[int, int]) -> float | None: ...


@dataclass(frozen=True)
class Survey:
    """The remaining workers' probes (those that answered in time) and, per (lost worker,
    spare node), the share of the lost worker's cacheable bytes in the spare's cache."""

    lost: tuple[str, ...]
    running: bool  # the coordinator ran: what it held on a worker counts as free
    probes: dict[str, NodeProbe]
    shares: dict[tuple[str, str], float | None]


def coordinator_running(host: RecoveryHost) -> bool:
    return host.coordinator.state in (READY, NOT_RESPONDING)


async def survey(host: RecoveryHost, engine: RecoveringEngine, lost: Sequence[str],
                 previous: dict[str, tuple[int, int]]) -> Survey:
    """Probe the ready workers that remain and read the spare nodes' caches, all at once."""
    remaining = [n for n in engine.nodes()
                 if n.name not in lost and host.nodes[n.name].state == READY]
    running = coordinator_running(host)
    spares = [n for n in remaining if n.name not in previous]
    pairs = [(name, node) for name in lost if previous.get(name, (0, 0))[1] > 0
             for node in spares]

    async def share(name: str, node: NodeConfig) -> float | None:
        try:
            return await asyncio.wait_for(engine.standby_warmth(node.name, previous[name]),
                                          2 * node.ssh.status_timeout)
        except (TimeoutError, asyncio.TimeoutError, TransportError):
            return None  # cannot tell in time: counted as cold

    probes, shares, _ = await asyncio.gather(
        probe_remaining(host, engine, remaining, running),
        asyncio.gather(*(share(name, node) for name, node in pairs)),
        _model_read(host.config))  # the plan after the survey reads it again, remembered
    return Survey(tuple(lost), running, probes,
                  {(name, node.name): s for (name, node), s in zip(pairs, shares, strict=True)})


async def probe_remaining(host: RecoveryHost, engine: RecoveringEngine,
                          remaining: list[NodeConfig], running: bool) -> dict[str, NodeProbe]:
    """Each remaining node's probe, within a deadline (one that does not answer is left
    out). A worker serving the running coordinator frees what it holds when that
    coordinator stops: count it as free."""

    async def one(node: NodeConfig) -> NodeProbe:
        transport = host.transport(node.name)
        return await asyncio.wait_for(
            probe_node(transport, worker=engine.worker_lookup(node, transport.is_local)),
            2 * node.ssh.status_timeout)

    results, shares = await asyncio.gather(
        asyncio.gather(*(one(n) for n in remaining), return_exceptions=True),
        engine.layer_shares() if running else _no_shares())
    held = {s.node: s.model_bytes + s.kv_bytes + s.compute_bytes for s in shares}
    probes: dict[str, NodeProbe] = {}
    for node, result in zip(remaining, results, strict=True):
        if isinstance(result, (TransportError, asyncio.TimeoutError, TimeoutError)):
            continue  # it just became unreachable or silent: plan without it
        if isinstance(result, BaseException):
            raise result
        if not result.gpus:
            result = replace(result, ram_available_bytes=result.ram_available_bytes
                             + held.get(node.name, 0))
        probes[node.name] = result
    return probes


async def _no_shares() -> tuple[LayerShare, ...]:
    return ()


async def _model_read(config: ClusterConfig) -> None:
    with contextlib.suppress(PlacementError):
        await read_model(config)  # a model that cannot be read is the plan's to say
