"""The operations an operator asks for, the one place the CLI and the dashboard both call:
doctor, plan, up, down, status, generate, and the per-node start / stop / restart.

Each returns a typed result or raises OperationError with one sentence per problem; nothing
here prints. What differs between engines is asked of the engine's capabilities."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from core import weight_cache
from core.checks import DoctorReport
from core.cluster import Cluster, ClusterError
from core.config import NodeConfig
from core.doctor import run_doctor
from core.engines.base import EngineError, Generation, PlanView, Span
from core.planning.layer_map import LayerMap
from core.reach import detached
from core.reach.probe import NodeProbe, probe_node, probe_nodes
from core.reach.transport import LocalTransport, TransportError
from core.status import ClusterStatus, CoordinatorStatus, Level, NodeState, NodeStatus
from core.supervision.bottleneck import Bottleneck
from core.supervision.throughput import ThroughputSample
from core.weight_cache import PruneResult, WarmProgress, WarmResult, WarmthReport
from core.weight_cache_view import plan_json, plan_lines

SMOKE_PROMPT = "The capital of France is"


class OperationError(ClusterError):
    """An operation refused or failed: `problems` one sentence each; `stage` says where
    ("preflight", "plan", "start", "generate", ...); `started_nothing` when nothing changed."""

    def __init__(self, problems: list[str], stage: str = "",
                 started_nothing: bool = False) -> None:
        super().__init__(problems)
        self.stage = stage
        self.started_nothing = started_nothing


@dataclass(frozen=True)
class UpResult:
    status: ClusterStatus
    plan: PlanView | None  # None: started with --force, llama.cpp splits by free memory
    warnings: tuple[str, ...]

    @property
    def nodes(self) -> tuple[NodeStatus, ...]:
        return self.status.nodes

    @property
    def coordinator(self) -> CoordinatorStatus:
        return self.status.coordinator


# ---- probes -----------------------------------------------------------------------------------

async def probe(cluster: Cluster, names: Iterable[str] | None = None) -> dict[str, NodeProbe]:
    """Each node's probe (cores, memory, GPUs, clock, the worker binary), in parallel;
    OperationError naming the first node that cannot be reached."""
    engine = cluster.engine
    chosen = [cluster.config.node(n) for n in names] if names is not None else engine.nodes()
    transports = {n.name: cluster.transport(n.name) for n in chosen}
    lookups = {n.name: engine.worker_lookup(n, transports[n.name].is_local) for n in chosen}
    try:
        return await probe_nodes(transports, lookups)
    except TransportError as exc:
        raise OperationError([str(exc)], "probe") from None


async def probe_one(cluster: Cluster, name: str, *, timeout: float = 20.0) -> NodeProbe:
    """One node's probe (TransportError when it cannot be reached)."""
    node = cluster.config.node(name)
    transport = cluster.transport(name)
    return await probe_node(transport, timeout=timeout,
                            worker=cluster.engine.worker_lookup(node, transport.is_local))


# ---- doctor and plan ----------------------------------------------------------------------------

async def doctor(cluster: Cluster) -> DoctorReport:
    return await run_doctor(cluster, cluster.engine)


async def plan(cluster: Cluster, probes: dict[str, NodeProbe] | None = None) -> PlanView:
    """The plan as it would be made now, starting nothing."""
    found = probes if probes is not None else await probe(cluster)
    try:
        return await cluster.engine.plan(found)
    except EngineError as exc:
        raise OperationError([str(exc)], "plan", started_nothing=True) from None


async def plan_preview(cluster: Cluster) -> PlanView:
    """The plan as `plan` and the dashboard's `p` show it: with the workers' weight caches
    (what a load would still send to each node, the nodes the plan leaves out too) where the
    engine keeps one. A cache that cannot be read leaves the plan as it is, with a sentence."""
    planned = await plan(cluster)
    speed, speed_json = cluster.engine.speed_lines(planned)
    if speed:
        planned = replace(planned, text=planned.text + "\n\n" + "\n".join(speed),
                          json={**planned.json, **speed_json})
    if not cluster.capabilities.has_weight_cache:
        return planned
    try:
        report, _ = await cache_report(cluster, spans=planned.spans)
    except OperationError as exc:
        lines = [f"weight caches: not read ({'; '.join(exc.problems)})"]
        return replace(planned, text=planned.text + "\n" + "\n".join(lines))
    lines = ["", "weight caches (what a load would still send to each node):",
             *plan_lines(report)]
    data = {**planned.json, "cache": plan_json(report)}
    return replace(planned, text=planned.text + "\n" + "\n".join(lines), json=data)


async def preflight_and_plan(cluster: Cluster) -> PlanView:
    """The doctor's checks, then the plan; OperationError (nothing started) when either
    refuses."""
    report = await doctor(cluster)
    if report.failed:
        raise OperationError([f"{c.part}: {c.message}" for c in report.failed], "preflight",
                             started_nothing=True)
    return await plan(cluster, report.probes)


# ---- up and down --------------------------------------------------------------------------------

async def up(cluster: Cluster, *, force: bool = False, planned: PlanView | None = None,
             spans: Sequence[Span] | None = None) -> UpResult:
    """Preflight and plan (or the plan given), then only the plan's workers, then the serving
    side placed exactly as planned. With `force` the preflight is skipped and, where the engine
    can start workers without a plan, so is the plan (llama.cpp then splits by free memory)."""
    caps = cluster.capabilities
    if spans is not None:  # a placement decided elsewhere (a test, a benchmark, a recovery)
        planned = PlanView("", {"spans": [list(s) for s in spans]}, tuple(spans),
                           "plan: " + ", ".join(f"{n} blocks {f}-{f + c - 1}"
                                                for n, f, c in spans if c))
    if planned is not None:
        chosen: PlanView | None = planned
    elif force:
        chosen = await plan(cluster) if caps.node_start_needs_plan else None
    else:
        chosen = await preflight_and_plan(cluster)
    warnings = tuple(cluster.engine.warnings())
    for warning in warnings:
        cluster.notice(warning, Level.WARNING)
    if chosen is not None:
        cluster.notice(chosen.summary)
        try:
            workers = await cluster.engine.up(chosen)
        except EngineError as exc:
            raise OperationError([str(exc)], "start") from None
    else:
        workers = await cluster.start_workers()
    failed = [w for w in workers if w.state != NodeState.READY]
    if failed:
        raise OperationError([f"{w.name}: {w.error}" for w in failed], "start")
    coordinator = cluster.coordinator
    if caps.has_coordinator:
        coordinator = await cluster.start_coordinator(
            spans=chosen.spans if chosen is not None else None)
        if coordinator.state != NodeState.READY:
            raise OperationError([f"coordinator: {coordinator.error}"], "coordinator")
    status = ClusterStatus(cluster.config.name, tuple(cluster.nodes.values()), coordinator)
    return UpResult(status, chosen, warnings)


async def down(cluster: Cluster) -> ClusterStatus:
    """Stop the serving side, then every worker; OperationError names what did not stop."""
    try:
        return await cluster.down()
    except ClusterError as exc:
        raise OperationError(exc.problems, "stop") from None


def running_workers(cluster: Cluster) -> list[str]:
    return [n.name for n in cluster.nodes.values() if n.state == NodeState.READY]


# ---- status -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class StatusReport:
    status: ClusterStatus
    recovery: dict[str, Any] | None  # the last recovery recorded on this machine

    @property
    def healthy(self) -> bool:
        status = self.status
        nodes_ready = all(n.state == NodeState.READY for n in status.nodes)
        if status.blocks or status.unserved:
            return nodes_ready and not status.unserved
        if self.serving_side_expected:
            return nodes_ready and status.coordinator.state == NodeState.READY
        return nodes_ready

    serving_side_expected: bool = True

    def to_json(self) -> dict[str, Any]:
        return {**self.status.to_json(), "recovery": self.recovery}


async def status(cluster: Cluster, *, detail: bool = False) -> StatusReport:
    found = await cluster.status(detail=detail)
    return StatusReport(found, cluster.engine.last_recovery(),
                        cluster.capabilities.has_coordinator)


# ---- nodes and the coordinator one at a time ---------------------------------------------

async def start_node(cluster: Cluster, name: str) -> NodeStatus:
    exposed = cluster.engine.node_exposure(cluster.config.node(name))
    if exposed:
        cluster.notice(exposed, Level.WARNING, name)
    return await cluster.start_node(name)


async def stop_node(cluster: Cluster, name: str) -> NodeStatus:
    return await cluster.stop_node(name)


async def restart_node(cluster: Cluster, name: str) -> NodeStatus:
    stopped = await cluster.stop_node(name)
    if stopped.state != NodeState.STOPPED:
        return stopped
    return await cluster.start_node(name)


async def start_coordinator(cluster: Cluster) -> CoordinatorStatus:
    """The coordinator by itself: placed as planned when the plan's workers are all ready,
    else llama.cpp's own split over the ready workers (said in the event log)."""
    try:
        planned = await plan(cluster)
    except OperationError as exc:
        cluster.notice(f"coordinator without a plan: {'; '.join(exc.problems)}", Level.WARNING)
        return await cluster.start_coordinator()
    not_ready = [name for name, _, count in planned.spans
                 if count and cluster.nodes[name].state != NodeState.READY]
    if not_ready:
        cluster.notice(f"coordinator without the plan: {', '.join(not_ready)} not ready "
                       "(llama.cpp splits by the workers' free memory)", Level.WARNING)
        return await cluster.start_coordinator()
    return await cluster.start_coordinator(spans=planned.spans)


async def stop_coordinator(cluster: Cluster) -> CoordinatorStatus:
    return await cluster.stop_coordinator()


async def cold_blocks(cluster: Cluster, layer_map: LayerMap) -> tuple[int, ...]:
    """The map's blocks whose weights their node's cache does not hold (a load would send
    them); () where the engine keeps no cache or the caches cannot be read now."""
    if not cluster.capabilities.has_weight_cache or not layer_map.blocks:
        return ()
    spans = [(s.node, s.first, s.count) for s in layer_map.spans
             if s.count > 0 and s.node in {n.name for n in cluster.config.nodes}]
    if not spans:
        return ()
    try:
        report, _ = await cache_report(cluster, spans=spans)
    except OperationError:
        return ()
    return weight_cache.cold_blocks(report)


# ---- live figures -----------------------------------------------------------------------------

async def throughput(cluster: Cluster) -> ThroughputSample | None:
    """A live sample of the serving side's rates (None when the engine has none)."""
    return await cluster.engine.throughput()


async def bottleneck(cluster: Cluster) -> Bottleneck | None:
    """Per node, its share of each token's time (compute vs link), the slowest first in line;
    the last figures while idle; None when the engine cannot tell or nothing ran yet."""
    return await cluster.engine.bottleneck(cluster.coordinator.pid)


async def predicted_tps(cluster: Cluster) -> float | None:
    """The speed model's generation tok/s for the running plan, from the calibration cache."""
    return await cluster.engine.predicted_tps()


# ---- generate -----------------------------------------------------------------------------------

async def generate(cluster: Cluster, prompt: str = SMOKE_PROMPT, tokens: int = 16,
                   timeout: float = 120.0) -> Generation:
    """A short generation through the running cluster; OperationError with a sentence."""
    try:
        return await cluster.engine.generate(prompt, tokens, timeout)
    except EngineError as exc:
        raise OperationError([str(exc)], "generate") from None


# ---- logs -----------------------------------------------------------------------------------

COORDINATOR_PART = "coordinator"  # the name `logs` takes for the coordinator's own log


def _coordinator_dir(cluster: Cluster) -> str:
    state_dir = cluster.engine.coordinator_log_dir()
    if state_dir is None:
        raise OperationError([f"a {cluster.capabilities.coordinator_label} has no log of its "
                              "own: name a node"], "logs")
    return state_dir


async def log_tail(cluster: Cluster, part: str, lines: int, *, raw: bool = False) -> list[str]:
    """The last `lines` lines of a node's worker log, or of the coordinator's; terminal-safe
    unless `raw` (for a pipe)."""
    if part == COORDINATOR_PART:
        local = LocalTransport(NodeConfig(name="coordinator", host="127.0.0.1",
                                          transport="local"))
        return await detached.log_tail(local, _coordinator_dir(cluster), lines, raw=raw)
    node = cluster.config.node(part)
    return await detached.log_tail(cluster.transport(part), cluster.node_state_dir(node), lines,
                                   raw=raw)


def follow_log(cluster: Cluster, part: str, lines: int, *,
               raw: bool = False) -> AsyncIterator[str]:
    """Its history, then every new line, until the caller stops iterating."""
    if part == COORDINATOR_PART:
        _coordinator_dir(cluster)
        return cluster.follow_coordinator_log(lines, raw=raw)
    cluster.config.node(part)
    return cluster.follow_log(part, lines, raw=raw)


# ---- provisioning -----------------------------------------------------------------------------

async def provision_petals(cluster: Cluster, name: str,
                           progress: Callable[[str], None]) -> tuple[str, str]:
    """Build the Petals environment on a node (the recipe run there); (venv, versions)."""
    from core.engines.petals.engine import PetalsEngine
    from core.engines.petals.provision import ProvisionError, provision_petals

    node = cluster.config.node(name)
    try:
        venv = await provision_petals(cluster.transport(name), node, progress)
        info = await PetalsEngine(cluster).node_info(node)
    except (ProvisionError, TransportError) as exc:
        raise OperationError([str(exc)], "provision") from None
    if info.error:
        raise OperationError([f"{name}: built {venv}, but {info.error}"], "provision")
    return venv, f"python {info.python}, petals {info.petals}, torch {info.torch}"


# ---- binaries ---------------------------------------------------------------------------------

def build_llama(*, portable: bool, progress: Callable[[str], None]) -> str:
    """Build rpc-server and llama-server into the cache; the directory, or OperationError."""
    from core.engines.llama_rpc.build import LlamaBuildError
    from core.engines.llama_rpc.build import build_llama as build

    try:
        return str(build(portable=portable, progress=progress))
    except LlamaBuildError as exc:
        raise OperationError([str(exc)], "build") from None


# ---- rebalance ----------------------------------------------------------------------------------

async def rebalance(cluster: Cluster) -> UpResult:
    """Plan again over every node (one that came back after a fault is not used until now),
    then restart the serving side over that plan; workers already running are kept. The
    requests in flight while the coordinator restarts fail (the clients retry)."""
    if not cluster.capabilities.has_coordinator:
        raise OperationError([f"a {cluster.capabilities.coordinator_label} places its blocks "
                              "itself: nothing to rebalance"], "plan", started_nothing=True)
    planned = await plan(cluster)
    cluster.notice("rebalancing: restarting the coordinator over " + planned.summary)
    stopped = await cluster.stop_coordinator()
    if stopped.state != NodeState.STOPPED:
        raise OperationError([f"coordinator: could not stop it: {stopped.error}"], "stop")
    return await up(cluster, planned=planned)


# ---- the weight cache -------------------------------------------------------------------------

async def _cache_spans(cluster: Cluster) -> tuple[tuple[Span, ...] | None, str | None]:
    """The plan's spans, or None and why (a node down: the caches are still listed)."""
    try:
        return (await plan(cluster)).spans, None
    except OperationError as exc:
        return None, "; ".join(exc.problems)


def _needs_weight_cache(cluster: Cluster) -> None:
    if not cluster.capabilities.has_weight_cache:
        raise OperationError([f"the {cluster.engine.name} engine keeps no weight cache"],
                             "cache", started_nothing=True)


async def cache_report(cluster: Cluster, spans: Sequence[Span] | None = None
                       ) -> tuple[WarmthReport, str | None]:
    """Per node (used by the plan or not), which of the model's cacheable tensors its cache
    holds and what a load would still send; and why there is no plan, when there is none."""
    _needs_weight_cache(cluster)
    why = None
    if spans is None:
        spans, why = await _cache_spans(cluster)
    try:
        return await cluster.engine.weight_cache(spans), why
    except EngineError as exc:
        raise OperationError([str(exc)], "cache", started_nothing=True) from None


async def cache_warm(cluster: Cluster, names: Sequence[str] | None = None, *,
                     verify: bool = False, progress: Callable[[WarmProgress], None] | None = None,
                     spans: Sequence[Span] | None = None) -> list[WarmResult]:
    """Fill each planned node's cache with its span's tensors, all nodes in parallel."""
    _needs_weight_cache(cluster)
    for name in names or ():
        cluster.config.node(name)  # KeyError names the known nodes
    if spans is None:
        spans, why = await _cache_spans(cluster)
        if spans is None:
            raise OperationError([f"no plan to warm for: {why}"], "plan", started_nothing=True)
    try:
        return await cluster.engine.warm_cache(spans, names, verify, progress or (lambda p: None))
    except EngineError as exc:
        raise OperationError([str(exc)], "cache") from None


async def cache_verify(cluster: Cluster, names: Sequence[str] | None = None) -> list[str]:
    _needs_weight_cache(cluster)
    try:
        return await cluster.engine.verify_cache(names)
    except EngineError as exc:
        raise OperationError([str(exc)], "cache") from None


async def cache_prune(cluster: Cluster, *, dry_run: bool = False) -> list[PruneResult]:
    _needs_weight_cache(cluster)
    try:
        return await cluster.engine.prune_cache(dry_run)
    except EngineError as exc:
        raise OperationError([str(exc)], "cache") from None


# ---- calibration ---------------------------------------------------------------------------------

async def calibrate(cluster: Cluster, names: Sequence[str] | None = None, *, force: bool = False,
                    progress: Callable[[str], None] = lambda line: None) -> list[str]:
    """Measure each node's speed for this model and its link (or read the cache): a sentence
    per part. Workers not running are started; refused while a coordinator holds them."""
    if not cluster.capabilities.can_calibrate:
        raise OperationError(["this engine's nodes cannot be calibrated"], "calibrate",
                             started_nothing=True)
    coordinator = await cluster.refresh_coordinator()
    if coordinator.state in (NodeState.READY, NodeState.STARTING, NodeState.NOT_RESPONDING):
        raise OperationError([
            f"the coordinator is {coordinator.state} and holds every worker (rpc-server serves "
            "one client at a time): torbiz-tui down, calibrate, then up"], "calibrate",
            started_nothing=True)
    chosen = list(names) if names else [n.name for n in cluster.engine.nodes()]
    for name in chosen:
        cluster.config.node(name)  # KeyError names an unknown node
    statuses = {s.name: s for s in await cluster.refresh_nodes() if s.name in chosen}
    stopped = [n for n in chosen if statuses.get(n) is not None
               and statuses[n].state in (NodeState.STOPPED, NodeState.FAILED)]
    for status in await cluster.start_workers(stopped) if stopped else []:
        statuses[status.name] = status
    try:
        probes = await probe(cluster, chosen)
    except OperationError:
        probes = {}
    return await cluster.engine.calibrate(chosen, force, progress, statuses, probes)
