"""The llama.cpp RPC engine: rpc-server workers on the nodes, llama-server here."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import httpx

from core.checks import Check
from core.config import ClusterConfig, NodeConfig
from core.engines.base import (
    Capabilities,
    Engine,
    EngineContext,
    EngineError,
    Generation,
    PlanView,
    Span,
    port_taken,
)
from core.engines.llama_rpc import cache_ops, doctor, generate, standby
from core.engines.llama_rpc import rpc as llama_rpc
from core.engines.llama_rpc.bottleneck_view import RunningShares
from core.engines.llama_rpc.coordinator import (
    CoordinatorError,
    api_exposure,
    auth_headers,
    coordinator_state_dir,
    coordinator_url,
)
from core.engines.llama_rpc.recovery import Recoverer, last_recovery
from core.engines.llama_rpc.recovery_survey import RecoveryHost
from core.engines.llama_rpc.serving import CoordinatorRunner, coordinator_log, placement_file
from core.engines.llama_rpc.stall import StallDetector
from core.local_log import since_last_start
from core.planning.layer_map import LayerMap, llama_map
from core.planning.perf import LinkSpeed, NodeSpeed
from core.planning.placement import (
    Placement,
    PlacementError,
    PlanRefused,
    format_placement,
    make_placement,
)
from core.reach import detached
from core.reach.probe import NodeProbe, WorkerLookup
from core.state_file import read_json
from core.status import (
    ClusterStatus,
    CoordinatorStatus,
    LayerShare,
    Level,
    NodeState,
    NodeStatus,
    rounded_ms,
)
from core.supervision.bottleneck import Bottleneck
from core.supervision.load_log import LoadReport, parse_load_log
from core.supervision.throughput import ThroughputMonitor, ThroughputSample, parse_slots
from core.weight_cache import PruneResult, WarmResult, WarmthReport


def _parse_coordinator_log(path: Path, max_bytes: int = 64 << 20) -> LoadReport:
    return parse_load_log(since_last_start(path, max_bytes).splitlines())


class LlamaRpcEngine(Engine):
    name = "llama-rpc"
    capabilities = Capabilities(
        has_coordinator=True, can_recover=True, has_throughput=True,
        node_start_needs_plan=False, coordinator_label="coordinator", worker_label="worker",
        map_interval_s=2.0, has_weight_cache=True,
        can_calibrate=True)

    def __init__(self, ctx: EngineContext) -> None:
        super().__init__(ctx)
        self.runner = CoordinatorRunner(ctx, self.nodes())
        self._throughput: ThroughputMonitor | None = None
        self._http: httpx.AsyncClient | None = None
        self._stalls = StallDetector()
        self._shares = RunningShares(self.config)

    def nodes(self) -> list[NodeConfig]:
        return [n for n in self.config.nodes if n.backend == self.name]

    def worker_lookup(self, node: NodeConfig, is_local: bool) -> WorkerLookup | None:
        return llama_rpc.worker_lookup(node, is_local)

    # ---- nodes ------------------------------------------------------------------------------

    async def _listening(self, node: NodeConfig, proc: detached.ProcessState) -> bool:
        """The node says whether its worker listens; only a node that cannot tell (no /proc)
        is probed over the network."""
        if proc.port != "unknown":
            return proc.port == "listening"
        return await llama_rpc.port_open(node.rpc_host or node.host, node.rpc_port)

    async def probe_node(self, node: NodeConfig) -> NodeStatus:
        return await self.on_node(node, self._probe(node))

    async def _probe(self, node: NodeConfig) -> NodeStatus:
        transport = self.ctx.transport(node.name)
        state_dir = self.ctx.node_state_dir(node)
        asked = time.monotonic()
        proc = await detached.status(transport, state_dir, llama_rpc.listen_address(node))
        probe_ms = rounded_ms(time.monotonic() - asked)
        if proc.state == "running" and proc.pid is not None and node.name in self._stalls.blamed:
            held = await self._stalls.kept(node, transport, proc.pid)
            if held:
                return self.status(node, NodeState.NOT_RESPONDING, proc.pid, held,
                                   started_at=self.started_at(node.name, proc),
                                   probe_ms=probe_ms)
        self._shares.node_cpu(node.name, proc.cpu_s if proc.state == "running" else None)
        if proc.state == "running":
            ready = await self._listening(node, proc)
            return self.status(node, NodeState.READY if ready else NodeState.STARTING, proc.pid,
                               started_at=self.started_at(node.name, proc), probe_ms=probe_ms)
        if proc.state == "dead":
            tail = await detached.log_tail(transport, state_dir)
            return self.status(node, NodeState.FAILED, proc.pid,
                               llama_rpc.explain_worker_log(tail))
        if proc.state == "unverified":  # a pidfile that proves nothing: never "stopped"
            return self.status(node, NodeState.FAILED, proc.pid, proc.error)
        previous = self.ctx.last_status(node.name)
        if previous.state == NodeState.FAILED and previous.pid is None:
            return previous  # a start that failed before spawning keeps its reason
        return self.status(node, NodeState.STOPPED)

    async def start_node(self, node: NodeConfig, timeout: float) -> NodeStatus:
        transport = self.ctx.transport(node.name)
        state_dir = self.ctx.node_state_dir(node)
        resolve = (llama_rpc.local_resolve_sh(node) if transport.is_local
                   else llama_rpc.resolve_binary_sh(node))
        for sentence in await cache_ops.before_start(self.ctx, node):
            self.ctx.notice(sentence, Level.WARNING, node.name)
        # One round trip: reuse a live worker, or check the port, find the binary, start it
        # and wait briefly for it to listen.
        proc = await detached.spawn(transport, state_dir, llama_rpc.rpc_server_args(node),
                                    env={"LLAMA_CACHE": "cache"}, resolve=resolve,
                                    listen=llama_rpc.listen_address(node))
        if proc.state == "taken":
            return self.status(node, NodeState.FAILED, None,
                               port_taken(node.rpc_host or node.host, node.rpc_port, "rpc_port"))
        if proc.state == "dead":
            tail = await detached.log_tail(transport, state_dir)
            return self.status(node, NodeState.FAILED, proc.pid,
                               llama_rpc.explain_worker_log(tail))
        if proc.state != "running":
            error = proc.error
            if error in ("missing", "notexec"):
                error = llama_rpc.explain_resolve_error(node, error)
            return self.status(node, NodeState.FAILED, None, error)
        if await self._listening(node, proc):
            return self.status(node, NodeState.READY, proc.pid)
        self.status(node, NodeState.STARTING, proc.pid)
        return await self._wait_listening(node, proc.pid, timeout)

    async def _wait_listening(self, node: NodeConfig, pid: int | None,
                              timeout: float) -> NodeStatus:
        """Ready means the port accepts connections; rpc-server's exit code proves nothing."""
        transport = self.ctx.transport(node.name)
        state_dir = self.ctx.node_state_dir(node)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = await detached.status(transport, state_dir, llama_rpc.listen_address(node))
            if proc.state != "running":
                tail = await detached.log_tail(transport, state_dir)
                return self.status(node, NodeState.FAILED, pid,
                                   llama_rpc.explain_worker_log(tail))
            if await self._listening(node, proc):
                return self.status(node, NodeState.READY, pid)
            await asyncio.sleep(0.25)
        host, port = node.rpc_host or node.host, node.rpc_port
        return self.status(node, NodeState.FAILED, pid,
                           f"worker runs (pid {pid}) but does not listen on {host}:{port} after "
                           f"{timeout:g} s; see `torbiz-tui logs {node.name}`")

    async def stop_node(self, node: NodeConfig) -> NodeStatus:
        result = await detached.stop(self.ctx.transport(node.name), self.ctx.node_state_dir(node))
        if result.error:
            return self.status(node, NodeState.FAILED, result.pid, result.error)
        return self.status(node, NodeState.STOPPED)

    # ---- the coordinator --------------------------------------------------------------------

    async def refresh_coordinator(self) -> CoordinatorStatus:
        return await self.runner.status()

    async def start_coordinator(self, spans: Sequence[Span] | None,
                                timeout: float) -> CoordinatorStatus:
        try:
            return await self.runner.start(spans, timeout)
        except CoordinatorError as exc:
            raise EngineError(str(exc)) from None

    async def stop_coordinator(self) -> CoordinatorStatus:
        return await self.runner.stop()

    def coordinator_url(self) -> str:
        return coordinator_url(self.config)

    def coordinator_log_dir(self) -> str | None:
        return coordinator_state_dir(self.config)

    # ---- plan and up ------------------------------------------------------------------------

    async def plan(self, probes: dict[str, NodeProbe]) -> PlanView:
        try:
            placement = await make_placement(standby.without_standbys(self.config), probes,
                                             *self._measured())
        except (PlacementError, PlanRefused) as exc:
            raise EngineError(str(exc)) from exc
        return plan_view(placement, self.config.plan.policy)

    async def up(self, plan: PlanView) -> list[NodeStatus]:
        names = [name for name, _, count in plan.spans if count > 0]
        if self.config.plan.prewarm:
            for result in await self.warm_cache(plan.spans, None, False, lambda p: None):
                if result.error:  # a cold load still works: say so and go on
                    self.ctx.notice(result.error, Level.WARNING, result.node)
                else:
                    self.ctx.notice(f"{result.node}: pre-warmed {result.written} tensors from "
                                    f"its {result.source} in {result.elapsed_s:.1f} s",
                                    node=result.node)
        names += [n for n in standby.standby_names(self.config) if n not in names]
        return await asyncio.gather(*(self.ctx.start_node(n, timeout=30.0) for n in names))

    # ---- what runs --------------------------------------------------------------------------

    async def load_report(self) -> LoadReport:
        """The coordinator's latest load, parsed from its own log file (read from the last
        start, not a tail: request lines would push the load block out of any tail)."""
        return await asyncio.to_thread(_parse_coordinator_log, coordinator_log(self.config))

    async def layer_shares(self) -> tuple[LayerShare, ...]:
        return (await self._shares_and_report())[0]

    async def _shares_and_report(self) -> tuple[tuple[LayerShare, ...], LoadReport]:
        placement, report = await asyncio.gather(
            asyncio.to_thread(read_json, placement_file(self.config)), self.load_report())
        endpoints: dict[str, str] = placement.get("endpoints", {}) if placement else {}
        planned: dict[str, list[int]] = placement.get("plan", {}) if placement else {}
        shares = []
        for node in self.nodes():
            endpoint = endpoints.get(node.name, node.endpoint)
            device = report.device(endpoint)
            span = planned.get(node.name)
            first, count = (span[0], span[1]) if span else (None, None)
            shares.append(LayerShare(
                node.name, endpoint, first, count,
                device.layers if device else None,
                device.model_bytes if device else 0,
                device.kv_bytes if device else 0,
                device.compute_bytes if device else 0))
        return tuple(shares), report

    async def layer_map(self) -> LayerMap:
        """Which node holds which block now: what llama-server loaded, else the plan."""
        shares, report = await self._shares_and_report()
        return llama_map(shares, report.offloaded[1] - 1 if report.offloaded else None)

    async def throughput(self) -> ThroughputSample | None:
        if self._throughput is None:
            self._throughput = ThroughputMonitor(coordinator_url(self.config),
                                                 client=self._client())
        return await self._throughput.poll()

    async def bottleneck(self, coordinator_pid: int | None) -> Bottleneck | None:
        """Where each token's time goes now (or last, while idle)."""
        sample = self._throughput.latest if self._throughput is not None else None

        async def probe(names: Sequence[str]) -> None:
            await asyncio.gather(*(self.probe_node(self.config.node(n)) for n in names),
                                 return_exceptions=True)

        return await self._shares.update(sample, coordinator_pid, probe)

    async def predicted_tps(self) -> float | None:
        from core.engines.llama_rpc.bottleneck_view import predicted_tps

        return await predicted_tps(self.config)

    async def status_detail(self, base: ClusterStatus) -> ClusterStatus:
        if base.coordinator.state == NodeState.STOPPED:
            return base
        layers, sample = await asyncio.gather(self.layer_shares(), self.throughput())
        if sample is not None and sample.requests_processing and not sample.running_tps:
            await asyncio.sleep(0.5)  # a one-shot look: the running rate needs a second poll
            sample = await self.throughput()
        found = await self.bottleneck(base.coordinator.pid)
        return replace(base, layers=layers,
                       throughput=asdict(sample) if sample is not None else None,
                       bottleneck=found.to_json() if found is not None else None)

    async def generate(self, prompt: str, tokens: int, timeout: float) -> Generation:
        return await generate.through_coordinator(self.config, prompt, tokens, timeout)

    # ---- doctor -----------------------------------------------------------------------------

    async def cluster_checks(self) -> list[Check]:
        return await doctor.coordinator_checks(self.config)

    async def node_checks(self, node: NodeConfig, probe: NodeProbe,
                          clock_offset_s: float) -> list[Check]:
        return await doctor.node_checks(self.ctx, node, probe, clock_offset_s)

    def bind_check(self, node: NodeConfig) -> Check:
        return doctor.bind_check(node)

    @classmethod
    def exposure(cls, config: ClusterConfig) -> list[str]:
        api = api_exposure(config)
        return ([api] if api else []) + super().exposure(config)

    @staticmethod
    def node_exposure(node: NodeConfig) -> str | None:
        return llama_rpc.worker_exposure(node)

    async def weight_cache(self, spans: Sequence[Span] | None) -> WarmthReport:
        return await cache_ops.warmth(self.ctx, self.nodes(), spans)

    async def warm_cache(self, spans: Sequence[Span], names: Sequence[str] | None,
                         verify: bool, progress: Any) -> list[WarmResult]:
        nodes = [n for n in self.nodes() if names is None or n.name in names]
        return await cache_ops.prewarm(self.ctx, nodes, spans, verify, progress)

    async def verify_cache(self, names: Sequence[str] | None) -> list[str]:
        nodes = [n for n in self.nodes() if names is None or n.name in names]
        return await cache_ops.verify_only(self.ctx, nodes)

    async def prune_cache(self, dry_run: bool) -> list[PruneResult]:
        return await cache_ops.prune(self.ctx, self.nodes(), dry_run)

    async def standby_warmth(self, name: str, span: tuple[int, int]) -> float | None:
        """The share of span's cacheable bytes the node's cache holds (None: cannot tell)."""
        return await cache_ops.warm_share(self.ctx, self.config.node(name), span)

    async def calibrate(self, names: Sequence[str], force: bool, progress: Any,
                        statuses: Any, probes: Any) -> list[str]:
        from core.engines.llama_rpc import calibrate_run

        return await calibrate_run.run(self, names, force, progress, statuses, probes)

    def _measured(self) -> tuple[dict[str, NodeSpeed], dict[str, LinkSpeed]]:
        from core.engines.llama_rpc import calibrate_run

        return calibrate_run.measured(self.config, [n.name for n in self.nodes()])

    def speed_lines(self, plan: PlanView) -> tuple[list[str], dict[str, Any]]:
        from core.engines.llama_rpc import speed_view

        return speed_view.plan_speed(self.config, plan)

    def recoverer(self, host: RecoveryHost) -> Recoverer:
        return Recoverer(host, self)

    def last_recovery(self) -> dict[str, Any] | None:
        return last_recovery(self.ctx)

    async def stalled_workers(self, coordinator_pid: int | None) -> dict[str, str]:
        """While a busy slot has not moved for STALL_S, the ready worker it waits on (its
        process stopped, or running but silent: stall.py): reported `not responding`, with the
        stalled request named, and kept so while it stays so."""
        try:
            response = await self._client().get(f"{coordinator_url(self.config)}/slots",
                                                 timeout=1.0)
            slots = parse_slots(response.json()) if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            slots = None
        suspects = [(n, self.ctx.last_status(n.name)) for n in self.nodes()]
        placement = await asyncio.to_thread(read_json, placement_file(self.config)) or {}
        endpoints = placement.get("endpoints")
        found = await self._stalls.look(
            slots or [], coordinator_pid,
            [(n, st) for n, st in suspects if st.state == NodeState.READY and st.pid],
            {str(k): str(v) for k, v in endpoints.items()} if isinstance(endpoints, dict)
            else {}, self.ctx.transport)
        for name, blame in found.items():
            status = self.ctx.last_status(name)
            self.status(self.config.node(name), NodeState.NOT_RESPONDING, status.pid,
                        blame.reason, started_at=status.started_at, probe_ms=status.probe_ms)
        return {name: blame.reason for name, blame in found.items()}

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=5.0, trust_env=False,
                                           headers=auth_headers(self.config))
        return self._http

    async def close(self) -> None:
        if self._throughput is not None:
            await self._throughput.aclose()
            self._throughput = None
        if self._http is not None:
            await self._http.aclose()
            self._http = None


def plan_view(placement: Placement, policy: str) -> PlanView:
    spans = tuple(placement.plan.rpc_spans())
    summary = f"plan ({policy}): " + ", ".join(
        f"{name} blocks {first}-{first + count - 1}" for name, first, count in spans)
    return PlanView(format_placement(placement),
                    {"plan": asdict(placement.plan),
                     "budgets": [asdict(b) for b in placement.budgets],
                     "devices": placement.devices,
                     "spans": [list(s) for s in spans]},
                    spans, summary, placement)
