"""Log streams to the screen: read ahead into a bounded queue, hand lines over in batches.

One message per batch, not per line, and at most one batch per LOG_COALESCE seconds, so a
flood of lines is a few redraws; the queue is bounded, so a stream faster than the screen
waits instead of growing memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from core.cluster import Cluster

LOG_QUEUE = 2_000  # lines read ahead of the screen; the stream waits when it is full
LOG_BATCH = 500  # most lines in one message
LOG_COALESCE = 0.05  # seconds: at most 20 log redraws a second
RETRY_START = 2.0
RETRY_MAX = 30.0


async def pump_batches(lines: AsyncIterator[str], deliver: Callable[[list[str]], object]) -> None:
    """Read `lines` until they end (or raise what the stream raised), delivering batches."""
    queue: asyncio.Queue[str | BaseException | None] = asyncio.Queue(LOG_QUEUE)

    async def pump() -> None:
        try:
            async for line in lines:
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
                deliver(batch)
            if isinstance(item, BaseException):
                raise item
            if item is None:
                return
            await asyncio.sleep(LOG_COALESCE)
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


async def follow_forever(open_stream: Callable[[int], AsyncIterator[str]], history: int,
                         deliver: Callable[[list[str]], object],
                         note: Callable[[str], object]) -> None:
    """Stream `open_stream(history)`; when it ends or fails, say so and reopen it with backoff
    (without history: the lines already shown stay). Runs until cancelled."""
    backoff = RETRY_START
    while True:
        try:
            await pump_batches(open_stream(history), deliver)
            reason = "the log stream ended"
        except Exception as exc:  # shown to the operator, then retried
            reason = f"the log stream failed: {exc}"
        note(f"-- {reason}; retrying in {backoff:g} s --")
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, RETRY_MAX)
        history = 0


SourceKind = Literal["node", "coordinator", "events"]


@dataclass(frozen=True)
class LogSource:
    kind: SourceKind
    node: str | None = None

    @property
    def key(self) -> str:
        return f"node:{self.node}" if self.kind == "node" else self.kind


class ClusterLogs:
    """What the logs screen reads: the cluster's log streams and the dashboard's event log."""

    def __init__(self, cluster: Cluster, event_log: Sequence[str], *, live: bool) -> None:
        self.cluster = cluster
        self.event_log = event_log
        self.live = live  # False: no streams (snapshots, benchmarks)

    def title(self, source: LogSource) -> str:
        if source.kind == "node" and source.node is not None:
            node = self.cluster.config.node(source.node)
            return f"worker log · {node.name} · {node.endpoint}"
        if source.kind == "coordinator":
            return f"coordinator log · {self.cluster.coordinator.url}"
        return "event log · every notice since the dashboard opened"

    def open(self, source: LogSource, history: int) -> AsyncIterator[str]:
        if source.node is not None:
            return self.cluster.follow_log(source.node, history)
        return self.cluster.follow_coordinator_log(history)
