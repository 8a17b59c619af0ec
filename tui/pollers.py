"""The dashboard's polls as plain loops: each awaits the core and hands what it found to a
callback. The main screen runs each as one exclusive worker, so never two of a kind are in
flight, and each loop sleeps only after its round ended."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

from core import operations
from core.cluster import Cluster
from core.planning.layer_map import PLAN, LayerMap
from core.status import READY, STARTING
from core.supervision.bottleneck import Bottleneck
from core.supervision.supervisor import Supervisor
from core.supervision.throughput import ThroughputSample
from tui.model import COORDINATOR, WHOLE_CLUSTER, describe_resources

REFRESH_INTERVAL = 1.0  # seconds between the end of one refresh and the start of the next
REFRESH_MAX_BACKOFF = 30.0
PROBE_PARALLEL = 16  # as the Cluster's own fan-out
METRICS_INTERVAL = 1.0  # seconds between throughput polls (one in flight)
RESOURCES_INTERVAL = 30.0  # seconds between resource probes (device, free memory)
WARMTH_INTERVAL = 15.0  # seconds between reads of the workers' weight caches (cold blocks)
BOTTLENECK_INTERVAL = 1.0  # seconds between the end of one measurement and the next
MAP_INTERVAL_LOADED = 15.0  # once llama-server has placed the model (else the engine's own)


async def refresh_forever(refresh_round: Callable[[], Awaitable[None]],
                          report: Callable[[str], object]) -> None:
    """Refresh now, then again REFRESH_INTERVAL after each round ends; `report` gets "" or
    the error of each round (a failed poll shows "stale", it never stops the dashboard)."""
    delay = REFRESH_INTERVAL
    while True:
        try:
            await refresh_round()
            report("")
            delay = REFRESH_INTERVAL
        except Exception as exc:
            report(str(exc) or exc.__class__.__name__)
            delay = min(delay * 2, REFRESH_MAX_BACKOFF)
        await asyncio.sleep(delay)


async def refresh_round(cluster: Cluster, supervisor: Supervisor, busy: set[str]) -> None:
    """One round: the supervisor's check when nothing is under way, else every part no action
    is changing."""
    if not busy:
        # The supervisor's check: a dead worker or coordinator is a notice within a second
        # or two, and (recovery on, not read-only) the coordinator is re-planned and
        # restarted over the workers left, as `torbiz-tui watch` does.
        await supervisor.tick()
        return
    # A probe racing a start would report the node stopped until its pidfile exists:
    # leave the parts being changed to the action changing them.
    if WHOLE_CLUSTER in busy:
        return
    limit = asyncio.Semaphore(PROBE_PARALLEL)

    async def probe(name: str) -> None:
        async with limit:
            await cluster.probe_node(name)

    await asyncio.gather(*(probe(n.name) for n in cluster.config.nodes if n.name not in busy))
    if COORDINATOR not in busy:
        await cluster.refresh_coordinator()


async def resources_forever(cluster: Cluster, deliver: Callable[[str, str, str], object]) -> None:
    """Each node's device and free memory (one probe per node, all in parallel), every
    RESOURCES_INTERVAL; a node that cannot be probed shows "-" (its status row says why)."""
    limit = asyncio.Semaphore(PROBE_PARALLEL)

    async def one(name: str) -> None:
        async with limit:
            try:
                found = await operations.probe_one(cluster, name, timeout=20)
            except Exception:
                deliver(name, "-", "-")
                return
        deliver(name, *describe_resources(found))

    while True:
        await asyncio.gather(*(one(n.name) for n in cluster.config.nodes))
        await asyncio.sleep(RESOURCES_INTERVAL)


async def metrics_forever(cluster: Cluster,
                          deliver_map: Callable[[LayerMap | None, str], object],
                          deliver_sample: Callable[[ThroughputSample | None, str], object],
                          idle_note: Callable[[str], str]) -> None:
    """The layer map and the throughput, one poll of each in flight: throughput every
    METRICS_INTERVAL while the coordinator serves; the map at the engine's pace while the
    coordinator loads (its log fills in) or a swarm serves, rarely once a model is loaded.
    `idle_note(state)` says why there is no throughput."""
    caps = cluster.capabilities
    next_map = 0.0
    next_warmth = 0.0
    cold: tuple[int, ...] = ()  # the caches' answer, kept between their (rarer) reads
    shown_idle = False
    while True:
        state = cluster.coordinator.state
        now = time.monotonic()
        if now >= next_map:
            layer_map, error = None, ""
            if state in (STARTING, READY) or not caps.has_coordinator:
                try:
                    layer_map = await cluster.layer_map()
                except Exception as exc:  # the map is a view: never stop the app for it
                    error = f"layer map: {exc}"
            if layer_map is not None and caps.has_weight_cache:
                if now >= next_warmth:
                    cold = await operations.cold_blocks(cluster, layer_map)
                    next_warmth = now + WARMTH_INTERVAL
                layer_map = replace(layer_map, cold=cold)
            deliver_map(layer_map, error)
            loaded = layer_map is not None and layer_map.source != PLAN
            next_map = now + (MAP_INTERVAL_LOADED if caps.has_coordinator and state == READY
                              and loaded else caps.map_interval_s)
        if caps.has_throughput and state == READY:
            shown_idle = False
            try:
                sample = await operations.throughput(cluster)
                deliver_sample(sample, "" if sample is not None else "no answer from /metrics")
            except Exception as exc:
                deliver_sample(None, f"throughput: {exc}")
        elif not shown_idle:
            shown_idle = True
            deliver_sample(None, idle_note(state))
        await asyncio.sleep(METRICS_INTERVAL)


async def bottleneck_forever(cluster: Cluster,
                             deliver: Callable[[Bottleneck | None], object]) -> None:
    """Where each token's time goes: measured while requests run (each measurement samples
    for about a second, so it has a loop of its own and never slows the throughput poll), the
    last figures while idle, nothing while the coordinator does not serve."""
    while True:
        found = None
        if cluster.capabilities.has_throughput and cluster.coordinator.state == READY:
            try:
                found = await operations.bottleneck(cluster)
            except Exception:  # a view: the rates still show without it
                found = None
        deliver(found)
        await asyncio.sleep(BOTTLENECK_INTERVAL)
