"""The cluster: ties config, transports, workers and the coordinator together and emits events.

Both the headless commands and the dashboard drive this object; it never prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import httpx

from core.config import ClusterConfig, NodeConfig
from core.engines.llama_rpc import rpc as llama_rpc
from core.engines.llama_rpc import rpc_version
from core.engines.llama_rpc.coordinator import (
    CoordinatorError,
    auth_headers,
    coordinator_api_key,
    coordinator_argv,
    coordinator_state_dir,
    coordinator_status,
    coordinator_url,
    explain_coordinator_log,
    find_coordinator_binary,
    health,
    local_transport,
)
from core.engines.petals import swarm as petals_swarm
from core.planning.layer_map import LayerMap, llama_map, petals_map
from core.planning.planner import PlanRefused
from core.reach import detached, tunnel
from core.reach.transport import Transport, TransportError, make_transport
from core.state_file import read_json, write_json
from core.status import (
    FAILED,
    READY,
    STARTING,
    STOPPED,
    UNREACHABLE,
    ClusterStatus,
    CoordinatorChanged,
    CoordinatorStatus,
    Event,
    LayerShare,
    NodeChanged,
    NodeStatus,
    Notice,
    rounded_ms,
)
from core.supervision.load_log import LoadReport, parse_load_log
from core.supervision.throughput import ThroughputMonitor, ThroughputSample

T = TypeVar("T")
EventSink = Callable[[Event], None]

WORKER_READY_TIMEOUT = 30.0
COORDINATOR_READY_TIMEOUT = 600.0


def tunnel_state_dir(config: ClusterConfig, node: NodeConfig) -> str:
    # "_" cannot start a node name, so this never collides with a node's directory.
    return f"{config.state_dir.rstrip('/')}/{config.name}/_tunnel.{node.name}"


Span = tuple[str, int, int]  # (node, first block, number of blocks)


def _check_spans(spans: Sequence[Span]) -> None:
    expected = spans[0][1] if spans else 0
    for name, first, count in spans:
        if first != expected or count < 0:
            raise CoordinatorError(f"the plan's ranges are not contiguous at {name} "
                                   f"(block {first}, expected {expected})")
        expected += count


PLACEMENT_FILE = "placement.json"  # beside the coordinator's pidfile: which worker is where


def _local_path(path: str) -> Path:
    return Path(path).expanduser()


def _parse_coordinator_log(path: Path, max_bytes: int = 64 << 20) -> LoadReport:
    try:
        with open(path, "rb") as log:
            log.seek(0, 2)
            log.seek(max(0, log.tell() - max_bytes))
            data = log.read()
    except OSError:
        return LoadReport()
    start = data.rfind(b"torbiz-start")
    return parse_load_log(data[max(0, start):].splitlines())


async def _ready(value: str) -> str:
    return value


class ClusterError(Exception):
    """An operation failed; `problems` holds one sentence per node or part."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class Cluster:
    def __init__(self, config: ClusterConfig, *, max_parallel: int = 16) -> None:
        self.config = config
        self._sinks: list[EventSink] = []
        self._transports: dict[str, Transport] = {}
        self._locks: dict[str, asyncio.Lock] = {n.name: asyncio.Lock() for n in config.nodes}
        self._coordinator_lock = asyncio.Lock()
        self._fanout = asyncio.Semaphore(max_parallel)
        self.nodes: dict[str, NodeStatus] = {
            n.name: NodeStatus(n.name, n.host, n.backend, STOPPED, None, n.endpoint)
            for n in config.nodes
        }
        self.coordinator = CoordinatorStatus(STOPPED, coordinator_url(config))
        self._throughput: ThroughputMonitor | None = None
        self._http: httpx.AsyncClient | None = None

    # ---- events ----------------------------------------------------------------------------

    def subscribe(self, sink: EventSink) -> None:
        self._sinks.append(sink)

    def _emit(self, event: Event) -> None:
        for sink in list(self._sinks):
            sink(event)

    def notice(self, text: str, level: str = "info", node: str | None = None,
               extra: dict[str, Any] | None = None) -> None:
        """Tell every subscriber something for the operator's event log."""
        self._emit(Notice(text, level, node, extra or {}))

    def _set_node(self, status: NodeStatus) -> NodeStatus:
        if self.nodes.get(status.name) != status:
            self.nodes[status.name] = status
            self._emit(NodeChanged(status))
        return status

    def _set_coordinator(self, status: CoordinatorStatus) -> CoordinatorStatus:
        if self.coordinator != status:
            self.coordinator = status
            self._emit(CoordinatorChanged(status))
        return status

    # ---- plumbing --------------------------------------------------------------------------

    def node_state_dir(self, node: NodeConfig) -> str:
        return f"{self.config.state_dir.rstrip('/')}/{self.config.name}/{node.name}"

    def transport(self, name: str) -> Transport:
        if name not in self._transports:
            self._transports[name] = make_transport(self.config.node(name))
        return self._transports[name]

    async def _gather(self, items: Iterable[T],
                      fn: Callable[[T], Awaitable[NodeStatus]]) -> list[NodeStatus]:
        async def limited(item: T) -> NodeStatus:
            async with self._fanout:
                return await fn(item)

        return list(await asyncio.gather(*(limited(i) for i in items)))

    def _status(self, node: NodeConfig, state: str, pid: int | None = None,
                error: str = "", *, started_at: float | None = None,
                probe_ms: int | None = None) -> NodeStatus:
        return self._set_node(NodeStatus(node.name, node.host, node.backend, state, pid,
                                         node.endpoint, error, started_at, probe_ms))

    def _started_at(self, name: str, proc: detached.ProcessState) -> float | None:
        """The process's start on our clock; kept from the last probe when it agrees within
        2 s (ps counts whole seconds), so an unchanged worker stays an unchanged status."""
        if proc.elapsed_s is None:
            return None
        started = float(round(time.time() - proc.elapsed_s))
        previous = self.nodes[name]
        if previous.pid == proc.pid and previous.started_at is not None \
                and abs(previous.started_at - started) <= 2:
            return previous.started_at
        return started

    @staticmethod
    def _rpc_address(node: NodeConfig) -> tuple[str, int]:
        return node.rpc_host or node.host, node.rpc_port

    async def _listening(self, node: NodeConfig, proc: detached.ProcessState) -> bool:
        """The node says whether its worker listens; only a node that cannot tell (no /proc)
        is probed over the network."""
        if proc.port != "unknown":
            return proc.port == "listening"
        return await llama_rpc.port_open(*self._rpc_address(node))

    async def close(self) -> None:
        await petals_swarm.close_watch(self)
        if self._throughput is not None:
            await self._throughput.aclose()
            self._throughput = None
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        transports, self._transports = self._transports, {}
        await asyncio.gather(*(t.close() for t in transports.values()), return_exceptions=True)

    # ---- nodes -----------------------------------------------------------------------------

    async def probe_node(self, name: str) -> NodeStatus:
        """Find the node's worker from its pidfile: works from a fresh process."""
        node = self.config.node(name)
        if self._locks[name].locked():
            return self.nodes[name]  # a start or stop is under way: it will say how it ended
        try:
            if node.backend == "petals":  # its state follows the swarm's DHT
                return await petals_swarm.probe_state(self, node)
            asked = time.monotonic()
            proc = await detached.status(self.transport(name), self.node_state_dir(node),
                                         llama_rpc.listen_address(node))
            probe_ms = rounded_ms(time.monotonic() - asked)
            if proc.state == "running":
                ready = await self._listening(node, proc)
                return self._status(node, READY if ready else STARTING, proc.pid,
                                    started_at=self._started_at(name, proc), probe_ms=probe_ms)
            if proc.state == "dead":
                tail = await detached.log_tail(self.transport(name), self.node_state_dir(node))
                return self._status(node, FAILED, proc.pid,
                                    llama_rpc.explain_worker_log(tail))
            previous = self.nodes[name]
            if previous.state == FAILED and previous.pid is None:
                return previous  # a start that failed before spawning keeps its reason
            return self._status(node, STOPPED)
        except TransportError as exc:
            return self._status(node, UNREACHABLE, None, exc.reason)

    async def refresh_nodes(self) -> list[NodeStatus]:
        return await self._gather([n.name for n in self.config.nodes], self.probe_node)

    async def status(self, *, detail: bool = False) -> ClusterStatus:
        """Nodes and coordinator; with detail, also the layer shares and a throughput sample."""
        nodes, coordinator = await asyncio.gather(self.refresh_nodes(), self.refresh_coordinator())
        if detail and petals_swarm.is_petals_cluster(self.config):
            shares, blocks, unserved = await petals_swarm.status_detail(self)
            return ClusterStatus(self.config.name, tuple(nodes), coordinator, shares,
                                 blocks=blocks, unserved=unserved)
        if not detail or coordinator.state == STOPPED:
            return ClusterStatus(self.config.name, tuple(nodes), coordinator)
        layers, sample = await asyncio.gather(self.layer_shares(), self.poll_throughput())
        return ClusterStatus(self.config.name, tuple(nodes), coordinator, layers,
                             asdict(sample) if sample is not None else None)

    # ---- what the coordinator really did -----------------------------------------------------

    def _placement_file(self) -> Path:
        return _local_path(coordinator_state_dir(self.config)) / PLACEMENT_FILE

    def _coordinator_log(self) -> Path:
        return _local_path(coordinator_state_dir(self.config)) / detached.LOG_NAME

    async def load_report(self) -> LoadReport:
        """The coordinator's latest load, parsed from its own log file (read from the last
        start, not a tail: request lines would push the load block out of any tail)."""
        return await asyncio.to_thread(_parse_coordinator_log, self._coordinator_log())

    async def layer_shares(self) -> tuple[LayerShare, ...]:
        return (await self._shares_and_report())[0]

    async def layer_map(self) -> LayerMap:
        """Which node holds which block now: what llama-server loaded, else the plan."""
        if petals_swarm.is_petals_cluster(self.config):
            shares, swarm_blocks, unserved = await petals_swarm.status_detail(self)
            return petals_map(shares, len(swarm_blocks), unserved)
        shares, report = await self._shares_and_report()
        return llama_map(shares, report.offloaded[1] - 1 if report.offloaded else None)

    async def _shares_and_report(self) -> tuple[tuple[LayerShare, ...], LoadReport]:
        placement, report = await asyncio.gather(
            asyncio.to_thread(read_json, self._placement_file()), self.load_report())
        endpoints: dict[str, str] = placement.get("endpoints", {}) if placement else {}
        planned: dict[str, list[int]] = placement.get("plan", {}) if placement else {}
        shares = []
        for node in self._rpc_nodes():
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

    async def poll_throughput(self) -> ThroughputSample | None:
        if self._throughput is None:
            self._http = httpx.AsyncClient(timeout=5.0, trust_env=False,
                                           headers=auth_headers(self.config))
            self._throughput = ThroughputMonitor(coordinator_url(self.config), client=self._http)
        return await self._throughput.poll()

    async def start_node(self, name: str, *, timeout: float = WORKER_READY_TIMEOUT) -> NodeStatus:
        node = self.config.node(name)
        async with self._locks[name]:
            self._status(node, STARTING)
            try:
                status = await self._start_worker(node, timeout)
            except TransportError as exc:
                status = self._status(node, UNREACHABLE, None, exc.reason)
        if status.state != READY:
            self.notice(f"{name}: {status.error}", "error", name)
        else:
            self.notice(f"{name}: worker ready on {node.endpoint} (pid {status.pid})", node=name)
        return status

    async def _start_worker(self, node: NodeConfig, timeout: float) -> NodeStatus:
        if node.backend == "petals":
            return await petals_swarm.start_server(self, node, timeout)
        if node.backend != "llama-rpc":
            return self._status(node, FAILED, None,
                                f"backend {node.backend!r} cannot be started by this version yet")
        transport = self.transport(node.name)
        state_dir = self.node_state_dir(node)
        host, port = self._rpc_address(node)
        resolve = (llama_rpc.local_resolve_sh(node) if transport.is_local
                   else llama_rpc.resolve_binary_sh(node))
        # One round trip: reuse a live worker, or check the port, find the binary, start it
        # and wait briefly for it to listen.
        proc = await detached.spawn(transport, state_dir, llama_rpc.rpc_server_args(node),
                                    env={"LLAMA_CACHE": "cache"}, resolve=resolve,
                                    listen=llama_rpc.listen_address(node))
        if proc.state == "taken":
            return self._status(node, FAILED, None,
                                f"port {port} on {host} is already in use by a program this "
                                "cluster did not start: stop it or set another rpc_port")
        if proc.state == "dead":
            tail = await detached.log_tail(transport, state_dir)
            return self._status(node, FAILED, proc.pid, llama_rpc.explain_worker_log(tail))
        if proc.state != "running":
            error = proc.error
            if error in ("missing", "notexec"):
                error = llama_rpc.explain_resolve_error(node, error)
            return self._status(node, FAILED, None, error)
        if await self._listening(node, proc):
            return self._status(node, READY, proc.pid)
        self._status(node, STARTING, proc.pid)
        return await self._wait_worker_ready(node, proc.pid, timeout)

    async def _wait_worker_ready(self, node: NodeConfig, pid: int | None,
                                 timeout: float) -> NodeStatus:
        """Ready means the port accepts connections; rpc-server's exit code proves nothing."""
        transport = self.transport(node.name)
        state_dir = self.node_state_dir(node)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = await detached.status(transport, state_dir, llama_rpc.listen_address(node))
            if proc.state != "running":
                tail = await detached.log_tail(transport, state_dir)
                return self._status(node, FAILED, pid, llama_rpc.explain_worker_log(tail))
            if await self._listening(node, proc):
                return self._status(node, READY, pid)
            await asyncio.sleep(0.25)
        host, port = self._rpc_address(node)
        return self._status(node, FAILED, pid,
                            f"worker runs (pid {pid}) but does not listen on {host}:{port} after "
                            f"{timeout:g} s; see `torbiz-tui logs {node.name}`")

    async def stop_node(self, name: str) -> NodeStatus:
        node = self.config.node(name)
        async with self._locks[name]:
            try:
                result = await (petals_swarm.stop_server(self, node)
                                if node.backend == "petals" else
                                detached.stop(self.transport(name), self.node_state_dir(node)))
            except TransportError as exc:
                self.notice(f"{name}: cannot stop: {exc.reason}", "error", name)
                return self._status(node, UNREACHABLE, None, exc.reason)
            if result.error:
                status = self._status(node, FAILED, result.pid, result.error)
                self.notice(f"{name}: {result.error}", "error", name)
                return status
        self.notice(f"{name}: worker stopped", node=name)
        return self._status(node, STOPPED)

    async def start_workers(self, names: Iterable[str] | None = None) -> list[NodeStatus]:
        chosen = list(names) if names is not None else [n.name for n in self.config.nodes]
        return await self._gather(chosen, self.start_node)

    async def stop_workers(self) -> list[NodeStatus]:
        return await self._gather([n.name for n in self.config.nodes], self.stop_node)

    async def follow_log(self, name: str, lines: int = 200) -> AsyncIterator[str]:
        node = self.config.node(name)
        script = detached.follow_script(self.node_state_dir(node), lines)
        async for line in self.transport(name).stream_lines(script):
            yield line

    # ---- coordinator -----------------------------------------------------------------------

    async def refresh_coordinator(self) -> CoordinatorStatus:
        if self._coordinator_lock.locked():
            return self.coordinator
        status = await coordinator_status(self.config)
        if status.state == STOPPED and self.coordinator.state == FAILED \
                and self.coordinator.pid is None:
            return self.coordinator  # a start refused before launch keeps its reason
        return self._set_coordinator(status)

    def _rpc_nodes(self) -> list[NodeConfig]:
        return [n for n in self.config.nodes if n.backend == "llama-rpc"]

    async def start_coordinator(self, *, timeout: float = COORDINATOR_READY_TIMEOUT,
                                spans: Sequence[Span] | None = None) -> CoordinatorStatus:
        """Launch llama-server over the ready workers. `spans` (node, first block, blocks), in
        --rpc order and contiguous, place exactly that; nodes not named are left out."""
        async with self._coordinator_lock:
            try:
                status = await self._start_coordinator(timeout, spans)
            except (CoordinatorError, ClusterError) as exc:
                status = self._set_coordinator(
                    CoordinatorStatus(FAILED, coordinator_url(self.config), None, str(exc)))
        if status.state == READY:
            self.notice(f"coordinator ready at {status.url} (pid {status.pid})")
        else:
            self.notice(f"coordinator: {status.error}", "error")
        return status

    async def _start_coordinator(self, timeout: float,
                                 spans: Sequence[Span] | None) -> CoordinatorStatus:
        config = self.config
        url = coordinator_url(config)
        current = self._set_coordinator(await coordinator_status(config))
        if current.state in (READY, STARTING):
            return await self._wait_coordinator_ready(current.pid, timeout)
        if config.model.gguf is None or not config.model.gguf.is_file():
            raise CoordinatorError(f"model file {config.model.gguf} not found: fix [model] gguf "
                                   f"in {config.source}")
        binary = find_coordinator_binary(config)
        key = coordinator_api_key(config)
        if spans is None:
            workers, layers = self._rpc_nodes(), None
        else:
            _check_spans(spans)
            workers = [config.node(name) for name, _, count in spans if count > 0]
            layers = [count for _, _, count in spans if count > 0]
        endpoints = await self._coordinator_endpoints(workers)
        await self._check_workers_answer(workers, endpoints, binary)
        if await llama_rpc.port_open(config.coordinator.host if config.coordinator.host not in
                                     ("0.0.0.0", "::") else "127.0.0.1", config.coordinator.port):
            raise CoordinatorError(f"port {config.coordinator.port} is already in use on this "
                                   "machine: stop that program or set [coordinator] port")
        argv = coordinator_argv(config, binary, endpoints, layers=layers)
        await asyncio.to_thread(write_json, self._placement_file(), {
            "endpoints": dict(zip((n.name for n in workers), endpoints, strict=True)),
            "plan": {name: [first, count] for name, first, count in spans or ()}})
        # The key travels in the environment (LLAMA_API_KEY), never on a command line.
        proc = await detached.spawn(local_transport({"LLAMA_API_KEY": key} if key else None),
                                    coordinator_state_dir(config), argv)
        if proc.state != "running":
            raise CoordinatorError(proc.error)
        self._set_coordinator(CoordinatorStatus(STARTING, url, proc.pid))
        self.notice(f"coordinator starting (pid {proc.pid}) with {len(workers)} workers")
        return await self._wait_coordinator_ready(proc.pid, timeout)

    async def _coordinator_endpoints(self, workers: list[NodeConfig]) -> list[str]:
        """Where the coordinator reaches each worker: its endpoint, or for rpc_bind = "loopback"
        the local end of an SSH tunnel (started here, detached, when not running yet)."""
        results = await asyncio.gather(*(self._tunnel_endpoint(n) if n.rpc_bind == "loopback"
                                         else _ready(n.endpoint) for n in workers),
                                       return_exceptions=True)
        problems = [f"{n.name}: {r}" for n, r in zip(workers, results, strict=True)
                    if isinstance(r, BaseException)]
        if problems:
            raise ClusterError(problems)
        return [str(r) for r in results]

    async def _tunnel_endpoint(self, node: NodeConfig) -> str:
        if self.config.source is None:
            raise CoordinatorError("an SSH tunnel needs the cluster file on disk")
        state_dir = tunnel_state_dir(self.config, node)
        port_file = _local_path(state_dir) / tunnel.PORT_FILE
        argv = [sys.executable, "-m", "core.reach.tunnel", "--config", str(self.config.source),
                "--node", node.name, "--port-file", str(port_file)]
        proc = await detached.spawn(local_transport(), state_dir, argv)
        if proc.state != "running":
            raise CoordinatorError(f"cannot start the SSH tunnel: {proc.error}")
        deadline = time.monotonic() + node.ssh.connect_timeout + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                return f"127.0.0.1:{int(port_file.read_text())}"
            if (await detached.status(local_transport(), state_dir)).state != "running":
                break
            await asyncio.sleep(0.1)
        tail = await detached.log_tail(local_transport(), state_dir, 5)
        await detached.stop(local_transport(), state_dir)
        raise CoordinatorError("the SSH tunnel did not open: " + (tail[-1] if tail else "no log"))

    async def _stop_tunnels(self) -> None:
        await asyncio.gather(*(detached.stop(local_transport(), tunnel_state_dir(self.config, n))
                               for n in self._rpc_nodes() if n.rpc_bind == "loopback"))

    async def _check_workers_answer(self, workers: list[NodeConfig], endpoints: list[str],
                                    binary: str) -> None:
        """Every worker must answer an RPC HELLO now, in a protocol the coordinator's build
        accepts. One that is serving another client never answers: a second coordinator would
        hang on it without a word."""
        where = dict(zip((n.name for n in workers), endpoints, strict=True))
        expected = await rpc_version.coordinator_version(binary)

        async def probe(node: NodeConfig) -> str:
            host, _, port = where[node.name].rpartition(":")
            try:
                version = await llama_rpc.hello(host.strip("[]"), int(port))
                if expected is not None and not rpc_version.compatible(expected, version):
                    return rpc_version.mismatch_sentence(node.name, expected, version)
                return ""
            except llama_rpc.HelloError as exc:
                if str(exc) == "busy":
                    return (f"worker {node.name} ({node.endpoint}) is already serving another "
                            "coordinator; a worker serves one client at a time, so a second one "
                            "would hang. Stop the other coordinator first")
                if str(exc).startswith("cannot connect"):
                    return (f"worker {node.name} is not running ({node.endpoint} refuses "
                            "connections): start it first")
                return f"worker {node.name} ({node.endpoint}) did not answer the RPC HELLO: {exc}"

        problems = [p for p in await asyncio.gather(*(probe(n) for n in workers)) if p]
        if problems:
            raise ClusterError(problems)

    async def _wait_coordinator_ready(self, pid: int | None, timeout: float) -> CoordinatorStatus:
        url = coordinator_url(self.config)
        state_dir = coordinator_state_dir(self.config)
        started = time.monotonic()
        deadline = started + timeout
        next_note = started + 5
        while time.monotonic() < deadline:
            code, _ = await health(url, timeout=1.0)
            if code == 200:
                return self._set_coordinator(CoordinatorStatus(READY, url, pid))
            if time.monotonic() >= next_note:
                waited = time.monotonic() - started
                self.notice(f"coordinator loading the model ({waited:.0f} s, /health says "
                             f"{code or 'nothing yet'})")
                next_note += 5
            proc = await detached.status(local_transport(), state_dir)
            if proc.state != "running":
                tail = await detached.log_tail(local_transport(), state_dir, 40)
                return self._set_coordinator(
                    CoordinatorStatus(FAILED, url, pid, explain_coordinator_log(tail)))
            await asyncio.sleep(0.25)
        return self._set_coordinator(CoordinatorStatus(
            FAILED, url, pid, f"not healthy after {timeout:g} s; see its log "
                              f"(torbiz-tui logs coordinator)"))

    async def stop_coordinator(self) -> CoordinatorStatus:
        async with self._coordinator_lock:
            result = await detached.stop(local_transport(), coordinator_state_dir(self.config))
            url = coordinator_url(self.config)
            if result.error:
                self.notice(f"coordinator: {result.error}", "error")
                return self._set_coordinator(CoordinatorStatus(FAILED, url, result.pid,
                                                               result.error))
            if result.pid:
                self.notice("coordinator stopped")
            await self._stop_tunnels()
            return self._set_coordinator(CoordinatorStatus(STOPPED, url))

    async def follow_coordinator_log(self, lines: int = 200) -> AsyncIterator[str]:
        script = detached.follow_script(coordinator_state_dir(self.config), lines)
        async for line in local_transport().stream_lines(script):
            yield line

    # ---- whole cluster ---------------------------------------------------------------------

    async def up(self, spans: Sequence[Span] | None = None) -> ClusterStatus:
        """Workers in parallel, then the coordinator; ClusterError names every failed part.
        With a plan's `spans`, only its workers start and it is placed exactly.
        A Petals cluster plans its blocks itself and has no coordinator."""
        if petals_swarm.is_petals_cluster(self.config):
            return await self._up_petals()
        names = ([name for name, _, count in spans if count > 0] if spans is not None
                 else [n.name for n in self._rpc_nodes()])
        workers = await self.start_workers(names)
        failed = [w for w in workers if w.state != READY]
        if failed:
            raise ClusterError([f"{w.name}: {w.error}" for w in failed])
        coordinator = await self.start_coordinator(spans=spans)
        if coordinator.state != READY:
            raise ClusterError([f"coordinator: {coordinator.error}"])
        return ClusterStatus(self.config.name, tuple(self.nodes.values()), coordinator)

    async def _up_petals(self) -> ClusterStatus:
        try:
            _, servers = await petals_swarm.plan_and_up(self)
        except (petals_swarm.PetalsError, PlanRefused, TransportError) as exc:
            raise ClusterError([str(exc)]) from None
        failed = [s for s in servers if s.state != READY]
        if failed:
            raise ClusterError([f"{s.name}: {s.error}" for s in failed])
        return ClusterStatus(self.config.name, tuple(self.nodes.values()), self.coordinator)

    async def down(self) -> ClusterStatus:
        coordinator = await self.stop_coordinator()
        nodes = await self.stop_workers()
        problems = [f"{n.name}: {n.error}" for n in nodes if n.state not in (STOPPED,)]
        if coordinator.state != STOPPED:
            problems.insert(0, f"coordinator: {coordinator.error}")
        if problems:
            raise ClusterError(problems)
        return ClusterStatus(self.config.name, tuple(nodes), coordinator)

