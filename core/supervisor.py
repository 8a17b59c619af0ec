"""Watch a running cluster: notice a dead worker or coordinator within a few seconds and say why.

One check in flight at a time, at most one per `interval` seconds.
A worker is checked on its node (process alive, port listening); SSH trouble only marks the
node unreachable (losing SSH never stops a worker). The coordinator is checked by its process
and /health. llama-server keeps answering /health 200 after an idle worker died and aborts on
the next request, so a lost worker is reported at once, naming the node and its log's last
words.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from .cluster import Cluster
from .status import FAILED, READY, UNREACHABLE, NodeStatus


@dataclass(frozen=True)
class Detection:
    """Something that went wrong, found by one check."""

    part: str  # a node name or "coordinator"
    state: str
    reason: str
    at: float  # time.monotonic() of the check that found it


class Supervisor:
    def __init__(self, cluster: Cluster, *, interval: float = 1.0) -> None:
        self.cluster = cluster
        self.interval = interval
        self.detections: list[Detection] = []
        self._known_bad: set[str] = set()

    async def check_once(self) -> list[Detection]:
        """One pass over every worker and the coordinator; returns what newly went wrong."""
        cluster = self.cluster
        before = dict(cluster.nodes)
        coordinator_before = cluster.coordinator
        nodes, coordinator = await asyncio.gather(cluster.refresh_nodes(),
                                                  cluster.refresh_coordinator())
        now = time.monotonic()
        found: list[Detection] = []
        for status in nodes:
            if self._went_bad(before.get(status.name), status):
                found.append(Detection(status.name, status.state, status.error, now))
        if coordinator_before.state == READY and coordinator.state == FAILED \
                and "coordinator" not in self._known_bad:
            found.append(Detection("coordinator", coordinator.state, coordinator.error, now))
        self._known_bad = {n.name for n in nodes if n.state in (FAILED, UNREACHABLE)}
        if coordinator.state == FAILED:
            self._known_bad.add("coordinator")
        lost = [d for d in found if d.part != "coordinator" and d.state == FAILED]
        if lost and coordinator.state == READY:
            names = ", ".join(d.part for d in lost)
            cluster_notice = (f"coordinator lost worker {names}: its next request would abort "
                              "llama-server")
            found.append(Detection("coordinator", "degraded", cluster_notice, now))
        for detection in found:
            level = "warning" if detection.state == UNREACHABLE else "error"
            cluster.notice(f"{detection.part}: {detection.reason}", level,
                            None if detection.part == "coordinator" else detection.part)
        self.detections.extend(found)
        del self.detections[:-1000]
        return found

    def _went_bad(self, before: NodeStatus | None, after: NodeStatus) -> bool:
        if after.state not in (FAILED, UNREACHABLE) or after.name in self._known_bad:
            return False
        return before is None or before.state != after.state or after.state == FAILED

    async def run(self) -> None:
        """Check forever (until cancelled), never two checks at once."""
        while True:
            started = time.monotonic()
            await self.check_once()
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))
