"""Which node holds which block: one map for the dashboard's layer-map widget and `status`.

For llama.cpp the map comes from what the coordinator really loaded (its load log gives each
worker's layer count; llama.cpp places the first blocks on the coordinator's own CPU and the
rest on the --rpc workers in order), and falls back to the plan while nothing is loaded yet.
For Petals it comes from the swarm's DHT (the spans each node's server announces).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from core.status import LayerShare

COORDINATOR = "coordinator"  # the span the coordinator's own CPU holds

PLAN = "plan"  # nothing loaded yet: what the plan will place
LOADED = "loaded"  # what llama-server's load log says it placed
SWARM = "swarm"  # what the Petals DHT says is served


@dataclass(frozen=True)
class MapSpan:
    node: str
    first: int
    count: int
    planned_first: int | None = None
    planned_count: int | None = None
    model_bytes: int = 0  # loaded there (llama.cpp), or predicted (Petals); 0 when unknown
    mismatch: str = ""  # a sentence when what was loaded differs from the plan
    state: str = ""  # Petals: the server's DHT state when it is not ONLINE (OFFLINE, dead, ...)
    measured_bytes: int = 0  # Petals: PSS of the server's processes now (model_bytes: predicted)

    @property
    def last(self) -> int:
        return self.first + self.count - 1


@dataclass(frozen=True)
class LayerMap:
    blocks: int  # how many blocks the model has (0: not known yet)
    spans: tuple[MapSpan, ...] = ()
    unserved: tuple[int, ...] = ()  # blocks nobody holds (Petals: no live ONLINE server)
    source: str = PLAN
    cold: tuple[int, ...] = ()  # blocks whose weights are not in their node's cache (yet)

    def owner(self, block: int) -> str | None:
        for span in self.spans:
            if span.first <= block <= span.last:
                return span.node
        return None

    @property
    def mismatches(self) -> tuple[MapSpan, ...]:
        return tuple(span for span in self.spans if span.mismatch)


def _planned_end(shares: Sequence[LayerShare]) -> int:
    return max((s.planned_first + s.planned_layers for s in shares
                if s.planned_first is not None and s.planned_layers is not None), default=0)


def llama_map(shares: Sequence[LayerShare], blocks: int | None = None) -> LayerMap:
    """The map of a llama.cpp cluster from Cluster.layer_shares() (in --rpc order).

    `blocks`: the model's block count when known (the load log's `offloaded N/M` gives M - 1);
    else the end of the last planned span."""
    total = blocks if blocks else _planned_end(shares)
    loaded = any(s.layers is not None for s in shares)
    spans: list[MapSpan] = []
    if loaded:
        on_workers = sum(s.layers or 0 for s in shares)
        if total < on_workers:
            total = on_workers
        at = total - on_workers
        if at > 0:
            spans.append(MapSpan(COORDINATOR, 0, at, 0, _coordinator_planned(shares)))
        for share in shares:
            count = share.layers or 0
            mismatch = ""
            if share.planned_layers is not None and count != share.planned_layers:
                mismatch = f"planned {_blocks(share.planned_layers)}, loaded {count}"
            if count or mismatch:
                spans.append(MapSpan(share.node, at, count, share.planned_first,
                                     share.planned_layers, share.model_bytes, mismatch))
            at += count
        return LayerMap(total, tuple(s for s in spans if s.count or s.mismatch), source=LOADED)
    planned = sorted((s for s in shares if s.planned_first is not None and s.planned_layers),
                     key=lambda s: s.planned_first or 0)
    first_worker = planned[0].planned_first if planned else total
    if planned and first_worker:
        spans.append(MapSpan(COORDINATOR, 0, first_worker or 0, 0, first_worker))
    for share in planned:
        assert share.planned_first is not None and share.planned_layers is not None
        spans.append(MapSpan(share.node, share.planned_first, share.planned_layers,
                             share.planned_first, share.planned_layers))
    return LayerMap(total, tuple(spans), source=PLAN)


def _coordinator_planned(shares: Sequence[LayerShare]) -> int | None:
    firsts = [s.planned_first for s in shares if s.planned_first is not None and s.planned_layers]
    return min(firsts) if firsts else None


def _blocks(count: int) -> str:
    return f"{count} block{'s' if count != 1 else ''}"


def petals_map(shares: Sequence[LayerShare], blocks: int,
               unserved: Sequence[int] = ()) -> LayerMap:
    """The map of a Petals swarm: each node's announced span (first_layer, layers), or its
    planned span while the DHT has nothing from it yet."""
    spans: list[MapSpan] = []
    for share in shares:
        first, count = share.first_layer, share.layers
        if first is None or not count:
            continue
        mismatch = ""
        if share.planned_first is not None and (first, count) != (share.planned_first,
                                                                  share.planned_layers):
            mismatch = (f"planned blocks {share.planned_first}-"
                        f"{share.planned_first + (share.planned_layers or 0) - 1}, "
                        f"serves {first}-{first + count - 1}")
        spans.append(MapSpan(share.node, first, count, share.planned_first,
                             share.planned_layers, share.predicted_bytes, mismatch,
                             "" if share.state == "ONLINE" else share.state,
                             share.measured_bytes))
    spans.sort(key=lambda s: s.first)
    return LayerMap(blocks, tuple(spans), tuple(unserved), source=SWARM)
