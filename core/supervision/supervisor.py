"""Watch a running cluster: notice a dead worker or coordinator within a few seconds and say why.

One check in flight at a time, at most one per `interval` seconds.
A worker is checked on its node (process alive, port listening); SSH trouble only marks the
node unreachable (losing SSH never stops a worker). The coordinator is checked by its process
and /health. llama-server keeps answering /health 200 after an idle worker died and aborts on
the next request, so a lost worker is reported at once, naming the node and its log's last
words.

With recovery on (`[cluster] recover`, the default), `run` also hands every fault to
the engine's recoverer: the coordinator is restarted over the workers still ready, one
recovery at a
time, while checks go on. An unreachable node is retried with backoff (0.5 s doubling to 8 s),
so a dead sshd is not hammered but a returning one is noticed within seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from core.cluster import Cluster
from core.status import FAILED, NOT_RESPONDING, READY, UNREACHABLE, Level, NodeStatus
from core.supervision.recovery_record import RecoveryResult


class Recoverer(Protocol):
    """What an engine that can recover hands the supervisor (Engine.recoverer)."""

    def saw_ready(self, pid: int | None) -> None: ...

    async def maybe_recover(self, detected_at: float | None = None) -> RecoveryResult | None: ...

    def in_plan(self, name: str) -> bool: ...

BAD = (FAILED, UNREACHABLE, NOT_RESPONDING)
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 8.0


@dataclass(frozen=True)
class Detection:
    """Something that went wrong, found by one check."""

    part: str  # a node name or "coordinator"
    state: str
    reason: str
    at: float  # time.monotonic() of the check that found it


Report = Callable[["Detection | RecoveryResult"], None]


class Supervisor:
    def __init__(self, cluster: Cluster, *, interval: float = 1.0,
                 recover: bool | None = None) -> None:
        self.cluster = cluster
        self.interval = interval
        self.detections: list[Detection] = []
        self._known_bad: set[str] = set()
        self._passes = 0  # checks done: the first sees what was bad before supervision began
        enabled = cluster.config.recover if recover is None else recover
        self.recoverer: Recoverer | None = (cluster.engine.recoverer(cluster)
                                            if enabled and cluster.capabilities.can_recover
                                            else None)
        self._recovery: asyncio.Task[RecoveryResult | None] | None = None
        self._first_seen: float | None = None  # the first detection no recovery has seen yet
        self._retry_at: dict[str, float] = {}  # unreachable node -> next SSH attempt
        self._backoff: dict[str, float] = {}
        self._restarts: set[asyncio.Task[NodeStatus]] = set()

    async def _refresh_nodes(self) -> list[NodeStatus]:
        """Every node, except unreachable ones whose backoff has not run out (they keep their
        status until the next attempt)."""
        now = time.monotonic()
        due = [n.name for n in self.cluster.config.nodes
               if self._retry_at.get(n.name, 0.0) <= now]
        await asyncio.gather(*(self.cluster.probe_node(name) for name in due))
        for name in due:
            if self.cluster.nodes[name].state in (UNREACHABLE, NOT_RESPONDING):
                delay = min(BACKOFF_MAX, self._backoff.get(name, BACKOFF_FIRST / 2) * 2)
                self._backoff[name] = delay
                self._retry_at[name] = time.monotonic() + delay
            else:
                self._backoff.pop(name, None)
                self._retry_at.pop(name, None)
        return [self.cluster.nodes[n.name] for n in self.cluster.config.nodes]

    async def check_once(self) -> list[Detection]:
        """One pass over every worker and the coordinator; returns what newly went wrong."""
        cluster = self.cluster
        before = dict(cluster.nodes)
        coordinator_before = cluster.coordinator
        nodes, coordinator, stalled = await asyncio.gather(
            self._refresh_nodes(), cluster.refresh_coordinator(), self._stalled_workers())
        if stalled:
            nodes = [cluster.nodes[n.name] for n in cluster.config.nodes]
        now = time.monotonic()
        if self.recoverer is not None:
            for seen in (coordinator_before, coordinator):
                if seen.state == READY:
                    self.recoverer.saw_ready(seen.pid)
        self._welcome_back(before, nodes)
        found: list[Detection] = []
        for status in nodes:
            if self._went_bad(before.get(status.name), status):
                found.append(Detection(status.name, status.state, status.error, now))
        if coordinator_before.state == READY and coordinator.state == FAILED \
                and "coordinator" not in self._known_bad:
            found.append(Detection("coordinator", coordinator.state, coordinator.error, now))
        self._known_bad = {n.name for n in nodes if n.state in BAD}
        if coordinator.state == FAILED:
            self._known_bad.add("coordinator")
        lost = [d for d in found if d.part != "coordinator" and d.state == FAILED]
        if lost and coordinator.state == READY:
            names = ", ".join(d.part for d in lost)
            cluster_notice = (f"coordinator lost worker {names}: its next request would abort "
                              "llama-server")
            found.append(Detection("coordinator", "degraded", cluster_notice, now))
        for detection in found:
            level = "warning" if detection.state in (UNREACHABLE, NOT_RESPONDING) else "error"
            cluster.notice(f"{detection.part}: {detection.reason}", level,
                            None if detection.part == "coordinator" else detection.part)
        self.detections.extend(found)
        del self.detections[:-1000]
        self._passes += 1
        return found

    async def _stalled_workers(self) -> dict[str, str]:
        """Workers a stalled request waits on (the engine's answer), while the coordinator
        serves; asked beside the status checks, never after them."""
        if self.cluster.coordinator.state != READY:
            return {}
        return await self.cluster.engine.stalled_workers(self.cluster.coordinator.pid)

    def _welcome_back(self, before: dict[str, NodeStatus], nodes: list[NodeStatus]) -> None:
        """A node back after hanging or losing its link: its worker is reattached (same pid),
        or restarted when it died meanwhile; it is not pulled back into the plan by itself
        (that restarts the coordinator): the operator is told how."""
        for status in nodes:
            seen = before.get(status.name)
            if seen is None or seen.state not in (NOT_RESPONDING, UNREACHABLE):
                continue
            if status.state == FAILED and self.recoverer is not None:
                self.cluster.notice(f"{status.name} is back but its worker died meanwhile: "
                                    "restarting it", Level.WARNING, status.name)
                task = asyncio.create_task(self.cluster.start_node(status.name))
                self._restarts.add(task)
                task.add_done_callback(self._restarts.discard)
            elif status.state == READY and self.recoverer is not None \
                    and not self.recoverer.in_plan(status.name):
                self.cluster.notice(
                    f"{status.name} is back (worker pid {status.pid}): `b` rebalance onto it "
                    "(torbiz-tui rebalance), which restarts the coordinator", Level.INFO,
                    status.name, extra={"back": status.name})

    def _went_bad(self, before: NodeStatus | None, after: NodeStatus) -> bool:
        if after.state not in BAD or after.name in self._known_bad:
            return False
        if before is None or before.state != after.state or after.state == FAILED:
            return True
        # Bad before this pass began but not at our last one: another caller (a recovery's
        # probe, the dashboard) saw it first. It is still news to whoever watches.
        return self._passes > 0

    @property
    def recovering(self) -> bool:
        return self._recovery is not None and not self._recovery.done()

    async def run(self, report: Report | None = None) -> None:
        """Check forever (until cancelled), never two checks at once; with recovery on, start
        a recovery when one is due and none runs. `report` gets every detection and every
        recovery's result."""
        try:
            while True:
                started = time.monotonic()
                await self.tick(report)
                await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))
        finally:
            await self.stop_recovery()

    async def tick(self, report: Report | None = None) -> list[Detection]:
        """One check, then (recovery on, none running) a recovery started in the background
        when one is due: the step `run` repeats, for callers with a loop of their own (the
        dashboard)."""
        found = await self.check_once()
        for detection in found:
            if report is not None:
                report(detection)
        if found and self._first_seen is None:
            self._first_seen = min(d.at for d in found)
        if self.recoverer is not None and not self.recovering:
            self._recovery = asyncio.create_task(
                self._recover(self.recoverer, self._first_seen, report))
            self._first_seen = None
        return found

    async def stop_recovery(self) -> None:
        """Cancel a recovery under way (the caller is going away)."""
        if self._recovery is not None and not self._recovery.done():
            self._recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recovery

    async def _recover(self, recoverer: Recoverer, detected_at: float | None,
                       report: Report | None) -> RecoveryResult | None:
        try:
            result = await recoverer.maybe_recover(detected_at)
        except Exception as exc:  # a recovery bug must never stop the supervision
            self.cluster.notice(f"recovery failed unexpectedly: {exc!r}", Level.ERROR)
            return None
        if result is not None and report is not None:
            report(result)
        return result
