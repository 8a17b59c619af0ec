"""What core says about the workers' weight caches (rpc-server's `-c` tensor cache): which of
the model's cacheable tensors each node holds, what a load would still send, pre-warm progress
and prune results. Engines fill these in; the CLI and the dashboard print them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from core.units import format_age, format_bytes


@dataclass(frozen=True)
class PartWarmth:
    part: str  # "block 3", "output"
    warm_bytes: int
    cacheable_bytes: int
    block: int | None = None  # the block's index; None for the input and output tensors

    @property
    def cold(self) -> bool:
        return self.warm_bytes < self.cacheable_bytes


@dataclass(frozen=True)
class LinkRate:
    """The measured rate of the link a load uses (this machine to the worker's RPC port)."""

    bytes_per_second: float
    measured_at: float  # time.time()
    sent_bytes: int
    seconds: float

    def describe(self, now: float | None = None) -> str:
        """`23.7 MiB/s (measured 5 min ago)`."""
        age = format_age((now if now is not None else time.time()) - self.measured_at)
        return f"{format_bytes(self.bytes_per_second)}/s (measured {age})"


@dataclass(frozen=True)
class NodeWarmth:
    name: str
    planned: tuple[int, int] | None  # (first block, count) when the plan uses the node
    reachable: bool
    error: str | None  # a sentence when the cache could not be read
    cache_dir: str
    cached_files: int  # files of the model in the cache, name and size right
    cache_bytes: int  # every tensor file in the cache (any model)
    foreign_bytes: int  # files of no configured model
    wrong_files: int  # files named by the model's hashes but of the wrong size
    warm_bytes: int  # of the planned span's cacheable tensors, already there
    cacheable_bytes: int  # the planned span's tensors above the hash threshold
    small_bytes: int  # the span's tensors at or below it: always sent
    free_bytes: int | None
    parts: tuple[PartWarmth, ...] = ()
    standby: bool = False  # [plan] standby: `planned` is the blocks it would take over
    link: LinkRate | None = None  # None: not measured (torbiz-tui calibrate)

    @property
    def send_bytes(self) -> int:
        """What a load would still send to this node."""
        return self.cacheable_bytes - self.warm_bytes + self.small_bytes

    @property
    def load_seconds(self) -> float | None:
        """What sending `send_bytes` takes at the measured link rate; None when unknown."""
        if self.link is None or self.link.bytes_per_second <= 0:
            return None
        return self.send_bytes / self.link.bytes_per_second

    @property
    def warm_share(self) -> float:
        return self.warm_bytes / self.cacheable_bytes if self.cacheable_bytes else 1.0


@dataclass(frozen=True)
class WarmthReport:
    model: str
    model_bytes: int
    cacheable_share: float  # of the model's bytes, in tensors above the threshold
    nodes: tuple[NodeWarmth, ...]


def cold_blocks(report: WarmthReport) -> tuple[int, ...]:
    """Blocks some of whose cacheable tensors are missing from the cache of the node the plan
    gives them to: a load sends their weights over the network."""
    return tuple(sorted({part.block for node in report.nodes if node.planned is not None
                         for part in node.parts if part.block is not None and part.cold}))


@dataclass(frozen=True)
class WarmProgress:
    node: str
    done_bytes: int
    total_bytes: int
    elapsed_s: float
    source: str  # "node copy" or "push"
    finished: bool = False
    error: str | None = None

    @property
    def rate(self) -> float:
        return self.done_bytes / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        if self.finished or self.rate <= 0:
            return None
        return (self.total_bytes - self.done_bytes) / self.rate


@dataclass(frozen=True)
class WarmResult:
    node: str
    source: str
    written: int  # files
    written_bytes: int
    skipped: int  # already warm
    elapsed_s: float
    moved_aside: tuple[str, ...] = ()  # sentences
    error: str | None = None
    evicted: tuple[tuple[str, int], ...] = ()  # (file, bytes) evicted for cache_limit_gb


@dataclass(frozen=True)
class PruneResult:
    node: str
    evicted: tuple[tuple[str, int], ...]  # (file, bytes), oldest first
    kept_bytes: int
    limit_bytes: int | None
    dry_run: bool
    error: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
