"""torbiz's own figures as Prometheus text (`torbiz-tui metrics`): node state, RTT, measured
tokens/s, planned vs loaded blocks, the last recovery, and the speed model's prediction when a
plan carries one.

A refresh loop gathers one status round at a time (never one per scrape: a scraper polling
every second must not stack SSH probes); every scrape renders the latest round, with its age,
through prometheus_client's own exposition code."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from core.status import ClusterStatus, NodeState

MAX_REQUEST_BYTES = 8192


@dataclass(frozen=True)
class Figures:
    """One status round, as the exporter shows it."""

    status: ClusterStatus
    recovery: dict[str, Any] | None
    at: float  # time.monotonic() when the round ended
    predicted_tps: float | None = None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class ClusterCollector(Collector):
    """The latest Figures as metric families (prometheus_client calls collect() per scrape)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.figures: Figures | None = None
        self.error = ""
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        figures = self.figures
        if figures is None:
            yield GaugeMetricFamily("torbiz_exporter_status_ok",
                                    "1 when the last status round succeeded", value=0.0)
            return
        yield GaugeMetricFamily("torbiz_exporter_status_ok",
                                "1 when the last status round succeeded",
                                value=0.0 if self.error else 1.0)
        yield GaugeMetricFamily("torbiz_status_age_seconds", "age of the figures shown",
                                value=max(0.0, self._clock() - figures.at))
        yield from self._nodes(figures.status)
        yield from self._coordinator(figures)
        yield from self._recovery(figures.recovery)

    @staticmethod
    def _nodes(status: ClusterStatus) -> Iterable[Metric]:
        ready = GaugeMetricFamily("torbiz_node_ready", "1 when the node's worker is ready",
                                  labels=["cluster", "node", "backend"])
        state = GaugeMetricFamily("torbiz_node_state", "1 for the node's current state",
                                  labels=["cluster", "node", "state"])
        rtt = GaugeMetricFamily("torbiz_node_rtt_seconds",
                                "the last status round trip to the node",
                                labels=["cluster", "node"])
        for node in status.nodes:
            ready.add_metric([status.name, node.name, node.backend],
                             1.0 if node.state == NodeState.READY else 0.0)
            state.add_metric([status.name, node.name, str(node.state)], 1.0)
            if node.probe_ms is not None:
                rtt.add_metric([status.name, node.name], node.probe_ms / 1000)
        planned = GaugeMetricFamily("torbiz_blocks_planned", "blocks the plan gave the node",
                                    labels=["cluster", "node"])
        loaded = GaugeMetricFamily("torbiz_blocks_loaded",
                                   "blocks the coordinator loaded on the node",
                                   labels=["cluster", "node"])
        for share in status.layers:
            if share.planned_layers is not None:
                planned.add_metric([status.name, share.node], float(share.planned_layers))
            if share.layers is not None:
                loaded.add_metric([status.name, share.node], float(share.layers))
        return (ready, state, rtt, planned, loaded)

    @staticmethod
    def _coordinator(figures: Figures) -> Iterable[Metric]:
        status = figures.status
        coordinator = GaugeMetricFamily("torbiz_coordinator_ready",
                                        "1 when the coordinator answers", labels=["cluster"])
        coordinator.add_metric([status.name],
                               1.0 if status.coordinator.state == NodeState.READY else 0.0)
        out: list[Metric] = [coordinator]
        sample = status.throughput or {}
        running = _number(sample.get("running_tps")) or 0.0
        last = _number(sample.get("last_tps"))
        rates = [
            ("torbiz_generation_tokens_per_second",
             "decode rate: the running requests', else the last request's",
             running if running > 0 else last),
            ("torbiz_generation_running_tokens_per_second",
             "decode rate of the requests running now (0 when idle)",
             running if sample else None),
            ("torbiz_last_request_tokens_per_second",
             "decode rate of the last finished request(s), llama-server's own timing", last),
            ("torbiz_requests_processing", "requests the coordinator is serving",
             _number(sample.get("requests_processing"))),
            ("torbiz_predicted_tokens_per_second",
             "the speed model's prediction for the running plan", figures.predicted_tps),
        ]
        for name, text, value in rates:
            if value is not None:
                family = GaugeMetricFamily(name, text, labels=["cluster"])
                family.add_metric([status.name], value)
                out.append(family)
        neck = status.bottleneck
        if neck and isinstance(neck.get("nodes"), list):
            share = GaugeMetricFamily("torbiz_node_token_time_share",
                                      "the node's measured share of each token's time",
                                      labels=["cluster", "node"])
            seconds = GaugeMetricFamily("torbiz_node_token_seconds",
                                        "measured seconds of each token on the node, by part",
                                        labels=["cluster", "node", "part"])
            for part in neck["nodes"]:
                node = str(part.get("node", ""))
                for value, family, extra in ((part.get("share"), share, []),
                                             (part.get("compute_s"), seconds, ["compute"]),
                                             (part.get("link_s"), seconds, ["link"])):
                    number = _number(value)
                    if number is not None:
                        family.add_metric([status.name, node, *extra], number)
            token = _number(neck.get("token_seconds"))
            if token:
                family = GaugeMetricFamily("torbiz_token_seconds",
                                           "measured time per token (per request)",
                                           labels=["cluster"])
                family.add_metric([status.name], token)
                out.append(family)
            out += [share, seconds]
        return out

    @staticmethod
    def _recovery(record: dict[str, Any] | None) -> Iterable[Metric]:
        if not record:
            return ()
        at = _number(record.get("at"))
        out: list[Metric] = []
        if at is not None:
            family = GaugeMetricFamily("torbiz_last_recovery_timestamp_seconds",
                                       "when the last recovery ended (unix time)",
                                       labels=["outcome"])
            family.add_metric([str(record.get("outcome", ""))[:32]], at)
            out.append(family)
        after = _number(record.get("recovered_after"))
        if after is not None:
            out.append(GaugeMetricFamily("torbiz_last_recovery_seconds",
                                         "fault detection to /health 200 in the last recovery",
                                         value=after))
        return out


class MetricsServer:
    """Serves GET /metrics on host:port; `gather()` gives a new round every `interval`."""

    def __init__(self, gather: Callable[[], Awaitable[Figures]], *, host: str = "127.0.0.1",
                 port: int = 9464, interval: float = 5.0) -> None:
        self.host, self.port, self.interval = host, port, max(0.2, interval)
        self.collector = ClusterCollector()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self._gather = gather

    def page(self) -> bytes:
        return generate_latest(self.registry)

    async def refresh(self) -> None:
        try:
            self.collector.figures = await self._gather()
            self.collector.error = ""
        except Exception as exc:  # an exporter keeps serving the last round, marked stale
            self.collector.error = f"{exc.__class__.__name__}: {exc}"[:300]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            parts = head[:MAX_REQUEST_BYTES].split(b" ", 2)
            path = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b""
            if parts[0] == b"GET" and path == b"/metrics":
                body, status, kind = self.page(), "200 OK", CONTENT_TYPE_LATEST
            else:
                body, status, kind = b"torbiz metrics: GET /metrics\n", "404 Not Found", \
                    "text/plain"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: "
                         f"{len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
                ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def serve(self, started: Callable[[str], None] | None = None) -> None:
        """Until cancelled: the first round, then the server, then a round every interval."""
        await self.refresh()
        server = await asyncio.start_server(self._handle, self.host, self.port,
                                            limit=MAX_REQUEST_BYTES)
        async with server:
            if started is not None:
                started(f"http://{self.host}:{self.port}/metrics")
            while True:
                await asyncio.sleep(self.interval)
                await self.refresh()
