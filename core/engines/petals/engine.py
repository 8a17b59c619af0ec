"""The Petals engine: run_server processes on the nodes forming a private swarm; the DHT,
read by a monitor in this machine's Petals venv, says which node serves which block."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import replace

from core.checks import Check
from core.config import NodeConfig
from core.engines.base import (
    Capabilities,
    Engine,
    EngineContext,
    EngineError,
    Generation,
    PlanView,
    port_taken,
)
from core.engines.petals import client, doctor
from core.engines.petals import commands as backend
from core.engines.petals.dht import SwarmView, block_map, node_share
from core.engines.petals.local import petals_nodes
from core.engines.petals.placement import (
    PetalsPlacement,
    format_petals_placement,
    make_petals_placement,
)
from core.engines.petals.swarm_file import read_swarm, record_plan, update_swarm
from core.planning.layer_map import LayerMap, petals_map
from core.planning.planner import PlanRefused
from core.reach import detached
from core.reach.probe import NodeProbe, WorkerLookup
from core.reach.shell import path_word
from core.reach.transport import TransportError
from core.status import (
    FAILED,
    READY,
    STARTING,
    STOPPED,
    BlockInfo,
    ClusterStatus,
    LayerShare,
    NodeStatus,
    rounded_ms,
)

READY_TIMEOUT = float(os.environ.get("TORBIZ_PETALS_READY_TIMEOUT", "180"))
STOP_GRACE = 10.0  # SIGINT to the main pid, then KILL the group and its recorded descendants

# PSS (kB) of every process in the server's group, from the node's /proc (0 when not running);
# the pidfile's first word is the pid (the rest is its start-time record).
_MEMORY = r"""
p=; [ -L __DIR__/pid ] || read -r p _ 2>/dev/null < __DIR__/pid
case $p in ''|*[!0-9]*) echo "TORBIZ-PSS 0"; exit 0;; esac
t=0
for q in $(ps -eo pid=,pgid= 2>/dev/null | awk -v g="$p" '$2 == g {print $1}'); do
  v=$(awk '/^Pss:/ {print $2}' /proc/$q/smaps_rollup 2>/dev/null); t=$((t + ${v:-0}))
done
echo "TORBIZ-PSS $t"
"""




class PetalsEngine(Engine):
    name = "petals"
    capabilities = Capabilities(
        has_coordinator=False, can_recover=False, has_throughput=False,
        node_start_needs_plan=True, coordinator_label="swarm", worker_label="server",
        map_interval_s=5.0)

    def __init__(self, ctx: EngineContext) -> None:
        super().__init__(ctx)
        self.view = SwarmView(ctx.config)

    def nodes(self) -> list[NodeConfig]:
        return petals_nodes(self.config)

    @property
    def serving_name(self) -> str:
        return backend.dht_prefix(self.config)

    def worker_lookup(self, node: NodeConfig, is_local: bool) -> WorkerLookup | None:
        return None  # the node's Petals python is checked by the doctor (node_info)

    async def probe_node(self, node: NodeConfig) -> NodeStatus:
        """The node's state from its pidfile and, while its server runs, from the DHT: ready only
        when every block of its span is ONLINE there and the server answers a ping."""
        transport = self.ctx.transport(node.name)
        state_dir = self.ctx.node_state_dir(node)
        asked = time.monotonic()
        proc = await self.on_node(node, detached.status(transport, state_dir,
                                                        backend.listen_address(node)))
        started, probe_ms = self.started_at(node.name, proc), rounded_ms(time.monotonic() - asked)
        if proc.state == "dead":
            tail = await self.on_node(node, detached.log_tail(transport, state_dir, 40))
            return self.status(node, FAILED, proc.pid, backend.explain_server_log(tail))
        if proc.state == "unverified":  # a pidfile that proves nothing: never "stopped"
            return self.status(node, FAILED, proc.pid, proc.error)
        if proc.state != "running":
            previous = self.ctx.last_status(node.name)
            if previous.state == FAILED and previous.pid is None:
                return previous
            return self.status(node, STOPPED)
        if proc.port != "listening":
            return self.status(node, STARTING, proc.pid, started_at=started, probe_ms=probe_ms)
        swarm, snapshot = await self.view.view()
        blocks, _ = block_map(self.config, swarm, snapshot)
        share = node_share(self.config, swarm, blocks, node)
        if share.state == "ONLINE" and share.layers:
            return self.status(node, READY, proc.pid, started_at=started, probe_ms=probe_ms)
        if share.state == "dead":
            return self.status(node, STARTING, proc.pid,
                                   "its process runs but its server does not answer pings",
                                   started_at=started, probe_ms=probe_ms)
        if snapshot is None and self.view.error:
            return self.status(node, STARTING, proc.pid, "its server runs, but the swarm's DHT "
                                   f"cannot be read from here: {self.view.error}",
                                   started_at=started, probe_ms=probe_ms)
        return self.status(node, STARTING, proc.pid, started_at=started, probe_ms=probe_ms)


    async def _prepare(self, node: NodeConfig) -> backend.PetalsNodeInfo:
        transport = self.ctx.transport(node.name)
        result = await transport.run(backend.prepare_script(node, self.ctx.node_state_dir(node)),
                                     timeout=120)
        return backend.parse_prepare(node, result.stdout, result.stderr)


    async def node_info(self, node: NodeConfig) -> backend.PetalsNodeInfo:
        """Versions of the node's Petals environment (no identity file is made)."""
        transport = self.ctx.transport(node.name)
        result = await transport.run(backend.prepare_script(node, None), timeout=120)
        return backend.parse_prepare(node, result.stdout, result.stderr)


    async def start_node(self, node: NodeConfig, timeout: float) -> NodeStatus:
        """Start the node's Petals server on its planned blocks (from the swarm file `up` wrote),
        joining the swarm's running servers, or making a new swarm when none runs; wait until the
        DHT shows every block of its span ONLINE."""
        config = self.config
        swarm = read_swarm(config)
        span = swarm.get("plan", {}).get(node.name)
        if not span:
            return self.status(node, FAILED, None, "no blocks planned for this node: run "
                                   "`torbiz-tui up` (it plans the blocks) first")
        info = await self._prepare(node)
        if info.error or not info.peer_id:
            return self.status(node, FAILED, None, info.error or "no peer id from the node")
        maddr = backend.multiaddr(node, info.peer_id)
        swarm = update_swarm(config, peer_ids={node.name: info.peer_id}, maddrs={node.name: maddr})
        running = [swarm["maddrs"][n.name] for n in petals_nodes(config)
                   if n.name != node.name and n.name in swarm.get("maddrs", {})
                   and self.ctx.last_status(n.name).state in (READY, STARTING)]
        transport = self.ctx.transport(node.name)
        state_dir = self.ctx.node_state_dir(node)
        model_dir = str(swarm.get("model", config.model.hf))
        try:
            args = backend.server_args(config, node, state_dir, model_dir,
                                       (int(span[0]), int(span[0]) + int(span[1])), running,
                                       gpu=bool(swarm.get("gpu", {}).get(node.name)))
        except ValueError as exc:  # a peer address in the swarm file that is no multiaddr
            return self.status(node, FAILED, None, str(exc))
        proc = await detached.spawn(transport, state_dir, args, env=backend.SERVER_ENV,
                                    resolve=backend.resolve_python_sh(node),
                                    listen=backend.listen_address(node))
        host, port = backend.listen_address(node)
        if proc.state == "taken":
            return self.status(node, FAILED, None, port_taken(host, port, "rpc_port"))
        if proc.state == "dead":
            tail = await detached.log_tail(transport, state_dir, 40)
            return self.status(node, FAILED, proc.pid, backend.explain_server_log(tail))
        if proc.state != "running":
            error = backend.missing_python_hint(node) if proc.error == "nopython" else proc.error
            return self.status(node, FAILED, None, error)
        self.status(node, STARTING, proc.pid)
        return await self._wait_online(node, proc.pid, max(timeout, READY_TIMEOUT))


    async def _wait_online(self, node: NodeConfig, pid: int | None,
                          timeout: float) -> NodeStatus:
        transport = self.ctx.transport(node.name)
        state_dir = self.ctx.node_state_dir(node)
        deadline = time.monotonic() + timeout
        swarm = read_swarm(self.config)
        span = swarm.get("plan", {}).get(node.name, [0, 0])
        while time.monotonic() < deadline:
            proc = await detached.status(transport, state_dir, backend.listen_address(node))
            if proc.state != "running":
                tail = await detached.log_tail(transport, state_dir, 40)
                return self.status(node, FAILED, pid, backend.explain_server_log(tail))
            if proc.port == "listening":
                swarm, snapshot = await self.view.view( wait=5.0, fresh=True)
                blocks, _ = block_map(self.config, swarm, snapshot)
                share = node_share(self.config, swarm, blocks, node)
                if share.state == "ONLINE" and share.first_layer == span[0] \
                        and share.layers == span[1]:
                    return self.status(node, READY, pid)
            else:
                await asyncio.sleep(0.5)
        return self.status(node, FAILED, pid,
                               f"the server runs (pid {pid}) but its blocks are not ONLINE in the "
                               f"swarm after {timeout:g} s; see `torbiz-tui logs {node.name}`")


    async def _up(self, placement: PetalsPlacement) -> list[NodeStatus]:
        """Record the plan, start the first server (a new swarm unless [petals] initial_peers names
        one), then the others joining it, in parallel."""
        record_plan(self.config, placement)
        names = [name for name, _, _ in placement.spans()]
        if not names:
            return []
        first = await self.ctx.start_node(names[0], timeout=READY_TIMEOUT)
        if first.state != READY:
            return [first]
        rest = await asyncio.gather(*(self.ctx.start_node(n, timeout=READY_TIMEOUT)
                                      for n in names[1:]))
        return [first, *rest]


    async def _detail(self) -> tuple[tuple[LayerShare, ...], tuple[BlockInfo, ...],
                                         tuple[int, ...]]:
        """The block map for `status --json`: a fresh DHT poll (with pings). When no server of
        this cluster runs, the swarm file alone answers at once: every block unserved, and the
        DHT monitor is stopped instead of retrying to join a swarm that is not there."""
        nodes = petals_nodes(self.config)
        if not any(self.ctx.last_status(n.name).state in (READY, STARTING) for n in nodes):
            await self.view.close()
            swarm = read_swarm(self.config)
            blocks, unserved = block_map(self.config, swarm, None)
            return (tuple(node_share(self.config, swarm, blocks, n) for n in nodes), blocks,
                    unserved)
        (swarm, snapshot), *measured = await asyncio.gather(
            self.view.view(wait=30.0, fresh=True), *(self.node_memory(n) for n in nodes))
        blocks, unserved = block_map(self.config, swarm, snapshot)
        shares = tuple(replace(node_share(self.config, swarm, blocks, n), measured_bytes=m)
                       for n, m in zip(nodes, measured, strict=True))
        return shares, blocks, unserved


    async def node_memory(self, node: NodeConfig) -> int:
        """What the node's server takes now (PSS of its process group), for the dashboard's
        predicted-vs-measured column; 0 when it does not run or the node cannot tell."""
        script = _MEMORY.replace("__DIR__", path_word(self.ctx.node_state_dir(node)))
        try:
            result = await self.ctx.transport(node.name).run(script, timeout=15)
        except TransportError:
            return 0
        for line in result.stdout.splitlines():
            if line.startswith("TORBIZ-PSS "):
                value = line.split()[1]
                return int(value) * 1024 if value.isdigit() else 0
        return 0


    async def _stop_server(self, node: NodeConfig) -> detached.ProcessState:
        """SIGINT to the main pid (Petals announces its blocks offline and exits in ~3 s), then
        KILL the group and every recorded descendant (torch_shm_manager leaves the group)."""
        return await detached.stop(self.ctx.transport(node.name), self.ctx.node_state_dir(node),
                                   signal="INT", grace=STOP_GRACE, tree=True)

    async def stop_node(self, node: NodeConfig) -> NodeStatus:
        result = await self._stop_server(node)
        if result.error:
            return self.status(node, FAILED, result.pid, result.error)
        return self.status(node, STOPPED)

    # ---- plan and up ------------------------------------------------------------------------

    async def plan(self, probes: dict[str, NodeProbe]) -> PlanView:
        try:
            placement = await make_petals_placement(self.config, probes)
        except PlanRefused as exc:
            raise EngineError(str(exc)) from exc
        spans = tuple(placement.spans())
        summary = f"plan ({placement.plan.policy}): " + ", ".join(
            f"{name} blocks {first}:{first + count}" for name, first, count in spans)
        return PlanView(format_petals_placement(placement), placement.to_json(), spans,
                        summary, placement)

    async def up(self, plan: PlanView) -> list[NodeStatus]:
        if not isinstance(plan.detail, PetalsPlacement):
            raise EngineError("a Petals swarm starts from a Petals plan")
        return await self._up(plan.detail)

    async def layer_map(self) -> LayerMap:
        shares, blocks, unserved = await self._detail()
        return petals_map(shares, len(blocks), unserved)

    async def status_detail(self, base: ClusterStatus) -> ClusterStatus:
        shares, blocks, unserved = await self._detail()
        return replace(base, layers=shares, blocks=blocks, unserved=unserved)

    async def generate(self, prompt: str, tokens: int, timeout: float) -> Generation:
        answer = await client.generate(self.config, prompt, tokens, timeout=timeout)
        produced = answer.get("tokens", [])
        count = len(produced) if isinstance(produced, list) else int(produced or 0)
        return Generation(str(answer.get("text", "")), count, float(answer.get("seconds", 0.0)))

    # ---- doctor -----------------------------------------------------------------------------

    async def cluster_checks(self) -> list[Check]:
        return await doctor.local_checks(self.config)

    async def node_checks(self, node: NodeConfig, probe: NodeProbe,
                          clock_offset_s: float) -> list[Check]:
        info = await self.node_info(node)
        return await doctor.node_checks(self.ctx, node, info, clock_offset_s)

    def bind_check(self, node: NodeConfig) -> Check:
        return doctor.bind_check(node)

    @staticmethod
    def node_exposure(node: NodeConfig) -> str | None:
        return backend.server_exposure(node)

    def summarize_checks(self, checks: list[Check]) -> list[Check]:
        return doctor.same_petals_version(checks)

    async def close(self) -> None:
        await self.view.close()
