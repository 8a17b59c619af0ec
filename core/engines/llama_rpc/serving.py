"""llama-server as the coordinator on this machine: start it over ready workers (placed exactly
as a plan says), wait for /health, stop it, and the SSH tunnels that reach loopback workers."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from core.config import ClusterConfig, NodeConfig
from core.engines.base import EngineContext, EngineError, Span
from core.engines.llama_rpc import rpc as llama_rpc
from core.engines.llama_rpc import rpc_version
from core.engines.llama_rpc.coordinator import (
    CoordinatorError,
    coordinator_argv,
    coordinator_env,
    coordinator_state_dir,
    coordinator_status,
    coordinator_url,
    explain_coordinator_log,
    find_coordinator_binary,
    health,
    local_transport,
)
from core.local_log import since_last_start
from core.reach import detached, tunnel
from core.state_file import write_json
from core.status import CoordinatorLoading, CoordinatorStatus, Level, NodeState
from core.supervision.load_log import load_progress

PLACEMENT_FILE = "placement.json"  # beside the coordinator's pidfile: which worker is where
LOADING_NOTE_EVERY = 5.0  # seconds between "still loading" lines in the event log


def tunnel_state_dir(config: ClusterConfig, node: NodeConfig) -> str:
    # "_" cannot start a node name, so this never collides with a node's directory.
    return f"{config.state_dir.rstrip('/')}/{config.name}/_tunnel.{node.name}"


def tunnel_port_file(config: ClusterConfig, node: NodeConfig) -> Path:
    return Path(tunnel_state_dir(config, node)).expanduser() / tunnel.PORT_FILE


def placement_file(config: ClusterConfig) -> Path:
    return Path(coordinator_state_dir(config)).expanduser() / PLACEMENT_FILE


def coordinator_log(config: ClusterConfig) -> Path:
    return Path(coordinator_state_dir(config)).expanduser() / detached.LOG_NAME


def check_spans(spans: Sequence[Span]) -> None:
    expected = spans[0][1] if spans else 0
    for name, first, count in spans:
        if first != expected or count < 0:
            raise CoordinatorError(f"the plan's ranges are not contiguous at {name} "
                                   f"(block {first}, expected {expected})")
        expected += count


async def _ready(value: str) -> str:
    return value


class CoordinatorRunner:
    """Starts and stops llama-server for one cluster; reports through the engine's context."""

    def __init__(self, ctx: EngineContext, rpc_nodes: list[NodeConfig]) -> None:
        self.ctx = ctx
        self.rpc_nodes = rpc_nodes

    @property
    def config(self) -> ClusterConfig:
        return self.ctx.config

    async def start(self, spans: Sequence[Span] | None, timeout: float) -> CoordinatorStatus:
        """Launch llama-server over the ready workers. `spans` (node, first block, blocks), in
        --rpc order and contiguous, place exactly that; nodes not named are left out."""
        config = self.config
        url = coordinator_url(config)
        current = self.ctx.report_coordinator(await self.status())
        if current.state in (NodeState.READY, NodeState.STARTING):
            return await self.wait_ready(current.pid, timeout)
        if config.model.gguf is None or not config.model.gguf.is_file():
            raise CoordinatorError(f"model file {config.model.gguf} not found: fix [model] gguf "
                                   f"in {config.source}")
        binary = find_coordinator_binary(config)
        env = coordinator_env(config)  # refuses a key llama-server would misread
        if spans is None:
            workers, layers = self.rpc_nodes, None
        else:
            check_spans(spans)
            workers = [config.node(name) for name, _, count in spans if count > 0]
            layers = [count for _, _, count in spans if count > 0]
        endpoints = await self.endpoints(workers)
        await self.check_workers_answer(workers, endpoints, binary)
        host = config.coordinator.host
        if await llama_rpc.port_open("127.0.0.1" if host in ("0.0.0.0", "::") else host,
                                     config.coordinator.port):
            raise CoordinatorError(f"port {config.coordinator.port} is already in use on this "
                                   "machine: stop that program or set [coordinator] port")
        argv = coordinator_argv(config, binary, endpoints, layers=layers)
        await asyncio.to_thread(write_json, placement_file(config), {
            "endpoints": dict(zip((n.name for n in workers), endpoints, strict=True)),
            "plan": {name: [first, count] for name, first, count in spans or ()}})
        # The key travels in the environment (LLAMA_API_KEY), never on a command line.
        proc = await detached.spawn(local_transport(env), coordinator_state_dir(config), argv)
        if proc.state != "running":
            raise CoordinatorError(proc.error)
        self.ctx.report_coordinator(CoordinatorStatus(NodeState.STARTING, url, proc.pid))
        self.ctx.notice(f"coordinator starting (pid {proc.pid}) with {len(workers)} workers")
        return await self.wait_ready(proc.pid, timeout)

    async def status(self) -> CoordinatorStatus:
        return await coordinator_status(self.config)

    async def endpoints(self, workers: list[NodeConfig]) -> list[str]:
        """Where the coordinator reaches each worker: its endpoint, or for rpc_bind = "loopback"
        the local end of an SSH tunnel (started here, detached, when not running yet)."""
        results = await asyncio.gather(*(self._tunnel_endpoint(n) if n.rpc_bind == "loopback"
                                         else _ready(n.endpoint) for n in workers),
                                       return_exceptions=True)
        problems = [f"{n.name}: {r}" for n, r in zip(workers, results, strict=True)
                    if isinstance(r, BaseException)]
        if problems:
            raise EngineError("; ".join(problems), problems)
        return [str(r) for r in results]

    async def _tunnel_endpoint(self, node: NodeConfig) -> str:
        if self.config.source is None:
            raise CoordinatorError("an SSH tunnel needs the cluster file on disk")
        state_dir = tunnel_state_dir(self.config, node)
        port_file = tunnel_port_file(self.config, node)
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

    async def stop_tunnels(self) -> None:
        await asyncio.gather(*(detached.stop(local_transport(), tunnel_state_dir(self.config, n))
                               for n in self.rpc_nodes if n.rpc_bind == "loopback"))

    async def check_workers_answer(self, workers: list[NodeConfig], endpoints: list[str],
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
            raise EngineError("; ".join(problems), problems)

    async def wait_ready(self, pid: int | None, timeout: float) -> CoordinatorStatus:
        """Poll /health until 200; while it loads, a typed CoordinatorLoading event with the
        seconds and the load log's stage, and a line in the event log every few seconds."""
        config = self.config
        url = coordinator_url(config)
        state_dir = coordinator_state_dir(config)
        started = time.monotonic()
        deadline = started + timeout
        next_note = started + LOADING_NOTE_EVERY
        while time.monotonic() < deadline:
            code, _ = await health(url, timeout=1.0)
            if code == 200:
                return self.ctx.report_coordinator(CoordinatorStatus(NodeState.READY, url, pid))
            waited = time.monotonic() - started
            self.ctx.report_coordinator(CoordinatorStatus(NodeState.STARTING, url, pid,
                                                          loading_s=round(waited)))
            fraction = await asyncio.to_thread(_log_progress, coordinator_log(config))
            self.ctx.emit(CoordinatorLoading(waited, fraction, code))
            if time.monotonic() >= next_note:
                self.ctx.notice(f"coordinator loading the model ({waited:.0f} s, /health says "
                                f"{code or 'nothing yet'})")
                next_note += LOADING_NOTE_EVERY
            proc = await detached.status(local_transport(), state_dir)
            if proc.state != "running":
                tail = await detached.log_tail(local_transport(), state_dir, 40)
                return self.ctx.report_coordinator(
                    CoordinatorStatus(NodeState.FAILED, url, pid, explain_coordinator_log(tail)))
            await asyncio.sleep(0.25)
        return self.ctx.report_coordinator(CoordinatorStatus(
            NodeState.FAILED, url, pid, f"not healthy after {timeout:g} s; see its log "
                                        f"(torbiz-tui logs coordinator)"))

    async def stop(self) -> CoordinatorStatus:
        url = coordinator_url(self.config)
        # Said first: from its TERM on it serves nothing, and the status checks wait on our lock.
        self.ctx.report_coordinator(CoordinatorStatus(NodeState.STOPPED, url,
                                                      error="being stopped"))
        result = await detached.stop(local_transport(), coordinator_state_dir(self.config))
        if result.error:
            self.ctx.notice(f"coordinator: {result.error}", Level.ERROR)
            return self.ctx.report_coordinator(
                CoordinatorStatus(NodeState.FAILED, url, result.pid, result.error))
        if result.pid:
            self.ctx.notice("coordinator stopped")
        await self.stop_tunnels()
        return self.ctx.report_coordinator(CoordinatorStatus(NodeState.STOPPED, url))


def _log_progress(path: Path, max_bytes: int = 4 << 20) -> float | None:
    """The load log's stage as a fraction, from the last start marker on (a bounded tail)."""
    text = since_last_start(path, max_bytes).decode(errors="replace")
    return load_progress(text.splitlines())
