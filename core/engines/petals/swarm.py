"""The private Petals swarm of a cluster's `backend = "petals"` nodes: the block budget (through
the same planner as llama.cpp layers), the start order (the first server makes a new swarm, the
others join it), the DHT watch that gives the block map and the nodes' states, and generation
through the swarm.

The dashboard's interpreter never imports torch, hivemind or petals: the DHT monitor and the
generation client are scripts in core/petals_side run by a Petals venv's python on this machine,
answering in JSON lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from core.config import ClusterConfig, NodeConfig
from core.engines.petals import commands as backend
from core.planning.model_info import ModelInfo, ModelInfoError, read_hf_info
from core.planning.placement import table_lines
from core.planning.planner import NodeBudget, Plan, plan_layers
from core.reach import detached
from core.reach.probe import NodeProbe
from core.reach.shell import path_word
from core.reach.transport import TransportError
from core.state_file import read_json, write_json
from core.status import (
    FAILED,
    READY,
    STARTING,
    STOPPED,
    BlockInfo,
    BlockServer,
    LayerShare,
    NodeStatus,
    rounded_ms,
)

if TYPE_CHECKING:
    from core.cluster import Cluster

GIB = 1 << 30
MIB = 1 << 20
PETALS_EPS = 0.01  # petals.server.block_utils.get_block_size: ~1% for tensor metadata
# A CPU server's process before any block: Python, torch, hivemind, its DHT process and two
# p2pd daemons, plus one process per connection handler (bench/petals_budget.py measures these).
PROCESS_BASE_BYTES = 400 * MIB
HANDLER_BYTES = 80 * MIB
DEFAULT_RESERVE_GB = 1.0
# Spawn to every block ONLINE: loading a large model's blocks can take minutes.
READY_TIMEOUT = float(os.environ.get("TORBIZ_PETALS_READY_TIMEOUT", "180"))
STOP_GRACE = 10.0  # SIGINT to the main pid, then KILL the group and its recorded descendants
SIDE = Path(__file__).resolve().parent / "side"
SWARM_FILE = "swarm.json"


class PetalsError(Exception):
    """A swarm operation that cannot go on, phrased for the operator."""


# ---- the environment on this machine ---------------------------------------------------------

def local_python(config: ClusterConfig) -> str:
    """This machine's Petals python (monitor, generation): [petals] python, then
    $TORBIZ_PETALS_VENV/bin/python, then the venv scripts/petals-env.sh builds."""
    if config.petals.python:
        return str(Path(config.petals.python).expanduser())
    venv = os.environ.get("TORBIZ_PETALS_VENV") or "~/.cache/torbiz/petals-venv"
    return str(Path(venv).expanduser() / "bin" / "python")


def _check_python(python: str) -> None:
    if not Path(python).is_file():
        raise PetalsError(f"no Petals python on this machine at {python}: build it with "
                          "scripts/petals-env.sh (or set [petals] python)")


def _open_log(path: Path) -> Any:
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "ab")  # noqa: SIM115 - handed to the child, closed right after the spawn


def petals_nodes(config: ClusterConfig) -> list[NodeConfig]:
    return [n for n in config.nodes if n.backend == "petals"]


def is_petals_cluster(config: ClusterConfig) -> bool:
    return bool(petals_nodes(config))


def side_env() -> dict[str, str]:
    return {**os.environ, **backend.SERVER_ENV}


# ---- the block budget ---------------------------------------------------------------------------

def petals_block_bytes(params: int, bytes_per_param: int) -> int:
    """Petals' own arithmetic for one block in memory (get_block_size, no quantization)."""
    return round(params * bytes_per_param * (1 + PETALS_EPS))


def petals_model(config: ClusterConfig) -> ModelInfo:
    """The model as a Petals server holds it: blocks only (the client keeps the embeddings and
    the head), each sized as Petals sizes it, at the swarm's dtype."""
    if config.model.hf is None:
        raise PetalsError("no model for the Petals nodes: set [model] hf to the model directory "
                          "(config.json and safetensors; the same path on every node)")
    try:
        info = read_hf_info(config.model.hf, config.petals.torch_dtype)
    except ModelInfoError as exc:
        raise PetalsError(str(exc)) from None
    return replace(info, layer_bytes=tuple(round(b * (1 + PETALS_EPS)) for b in info.layer_bytes),
                   embedding_bytes=0, output_bytes=0)


def cache_type(dtype: str) -> str:
    """The planner's KV cache type for a Petals dtype (its attention cache is in that dtype)."""
    return {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}[dtype]


def process_bytes(config: ClusterConfig) -> int:
    return PROCESS_BASE_BYTES + HANDLER_BYTES * config.petals.num_handlers


@dataclass(frozen=True)
class PetalsPlacement:
    model: ModelInfo
    budgets: tuple[NodeBudget, ...]
    devices: dict[str, str]
    plan: Plan
    process_bytes: int  # per CPU node, counted in its reserve
    cache_tokens: int

    def spans(self) -> list[tuple[str, int, int]]:
        """(node, first block, blocks) of every node that serves something, in block order."""
        return [(a.node, a.first_layer, a.n_layers) for a in self.plan.assignments
                if a.n_layers > 0]

    def predicted_bytes(self, node: str) -> int:
        """What the node's server should take: process, blocks and a full attention cache."""
        share = self.plan.assignment(node)
        if share is None or share.n_layers == 0:
            return 0
        gpu = self.devices.get(node, "CPU") != "CPU"
        return share.total_bytes + (0 if gpu else self.process_bytes)

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model.path, "blocks": self.model.n_layers,
                "block_bytes": list(self.model.layer_bytes),
                "cache_tokens": self.cache_tokens, "process_bytes": self.process_bytes,
                "nodes": [{"node": b.name, "device": self.devices.get(b.name, "?"),
                           "available_bytes": b.available_bytes,
                           "reserve_bytes": b.reserve_bytes, "budget_bytes": b.budget_bytes,
                           "first_block": (a.first_layer if (a := self.plan.assignment(b.name))
                                           and a.n_layers else None),
                           "blocks": a.n_layers if a else 0,
                           "block_indices": (f"{a.first_layer}:{a.first_layer + a.n_layers}"
                                             if a and a.n_layers else None),
                           "weight_bytes": a.weight_bytes if a else 0,
                           "cache_bytes": a.kv_bytes if a else 0,
                           "predicted_bytes": self.predicted_bytes(b.name)}
                          for b in self.budgets],
                "unused": list(self.plan.unused)}


def _reserve_bytes(config: ClusterConfig, node: NodeConfig) -> int:
    reserve = node.reserve_gb if node.reserve_gb is not None else config.plan.reserve_gb
    return int((DEFAULT_RESERVE_GB if reserve is None else reserve) * GIB)


async def make_petals_placement(config: ClusterConfig,
                                probes: dict[str, NodeProbe]) -> PetalsPlacement:
    """Plan the Petals nodes: each node's free memory (VRAM on GPU nodes) minus its reserve and,
    on CPU nodes, the server process itself; blocks at Petals' size plus the attention cache of
    [petals] attn_cache_tokens. Raises PetalsError or PlanRefused."""
    model = await asyncio.to_thread(petals_model, config)
    overhead = process_bytes(config)
    budgets: list[NodeBudget] = []
    devices: dict[str, str] = {}
    for node in petals_nodes(config):
        probe = probes.get(node.name)
        if probe is None:
            raise PetalsError(f"{node.name}: not probed (unreachable?): cannot plan without its "
                              "free memory")
        gpu = bool(probe.gpus)
        devices[node.name] = ", ".join(g.name for g in probe.gpus) if gpu else "CPU"
        budgets.append(NodeBudget(
            name=node.name,
            available_bytes=probe.gpu_free_bytes if gpu else probe.ram_available_bytes,
            reserve_bytes=_reserve_bytes(config, node) + (0 if gpu else overhead),
            max_bytes=int(node.max_memory_gb * GIB) if node.max_memory_gb is not None else None,
            weight=node.weight))
    plan = plan_layers(model, budgets, context=config.petals.attn_cache_tokens,
                       cache_type=cache_type(config.petals.torch_dtype),
                       policy=config.plan.policy)
    return PetalsPlacement(model, tuple(budgets), devices, plan, overhead,
                           config.petals.attn_cache_tokens)


def _size(value: int) -> str:
    return f"{value / GIB:.2f} GiB" if value >= GIB else f"{value / MIB:.1f} MiB"


def format_petals_placement(placement: PetalsPlacement) -> str:
    """The per-node table for `torbiz-tui plan` on a Petals cluster."""
    rows = [("NODE", "DEVICE", "FREE", "RESERVE", "BUDGET", "BLOCKS", "WEIGHTS", "CACHE",
             "PREDICTED")]
    for budget in placement.budgets:
        share = placement.plan.assignment(budget.name)
        used = share is not None and share.n_layers > 0
        rows.append((budget.name, placement.devices.get(budget.name, "?"),
                     _size(budget.available_bytes), _size(budget.reserve_bytes),
                     _size(budget.budget_bytes),
                     f"{share.first_layer}:{share.first_layer + share.n_layers} "
                     f"({share.n_layers})" if share and used else "-",
                     _size(share.weight_bytes) if share and used else "-",
                     _size(share.kv_bytes) if share and used else "-",
                     _size(placement.predicted_bytes(budget.name)) if used else "-"))
    lines = table_lines(rows)
    model = placement.model
    lines.append("")
    lines.append(f"model {model.path}: {model.n_layers} blocks of "
                 f"{_size(max(model.layer_bytes))} (Petals' size, {model.sizes_from}); "
                 f"attention cache {placement.cache_tokens} tokens; the reserve includes "
                 f"{_size(placement.process_bytes)} for the server process on CPU nodes; "
                 f"policy {placement.plan.policy}")
    if placement.plan.unused:
        lines.append(f"not used: {', '.join(placement.plan.unused)}")
    return "\n".join(lines)


# ---- the swarm file: plan, peer ids, multiaddrs (on this machine) ----------------------------

def swarm_dir(config: ClusterConfig) -> Path:
    # "_" cannot start a node name, so this never collides with a node's directory.
    return Path(config.state_dir).expanduser() / config.name / "_petals"


def read_swarm(config: ClusterConfig) -> dict[str, Any]:
    return read_json(swarm_dir(config) / SWARM_FILE) or {}


def update_swarm(config: ClusterConfig, **changes: Any) -> dict[str, Any]:
    """Merge `changes` into the swarm file (dict values are merged key by key)."""
    data = read_swarm(config)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    write_json(swarm_dir(config) / SWARM_FILE, data)
    return data


def record_plan(config: ClusterConfig, placement: PetalsPlacement) -> None:
    update_swarm(config, model=str(config.model.hf), prefix=backend.dht_prefix(config),
                 n_blocks=placement.model.n_layers,
                 plan={name: [first, count] for name, first, count in placement.spans()},
                 predicted={b.name: placement.predicted_bytes(b.name)
                            for b in placement.budgets},
                 gpu={name: device != "CPU" for name, device in placement.devices.items()})


def swarm_peers(config: ClusterConfig, swarm: dict[str, Any] | None = None) -> list[str]:
    swarm = read_swarm(config) if swarm is None else swarm
    peers = list(config.petals.initial_peers)
    peers += [m for m in swarm.get("maddrs", {}).values() if m not in peers]
    return peers


# ---- the DHT monitor -------------------------------------------------------------------------

@dataclass(frozen=True)
class Snapshot:
    """One poll of the DHT: for every block, the servers announcing it."""

    at: float  # time.monotonic() when read
    blocks: tuple[tuple[dict[str, Any], ...], ...]
    error: str = ""


class DhtWatch:
    """A running dht_monitor.py (Petals venv python) and the latest snapshot it printed."""

    def __init__(self, python: str, peers: Sequence[str], prefix: str, n_blocks: int, *,
                 interval: float = 1.0, log: Path | None = None) -> None:
        self.args = [python, str(SIDE / "dht_monitor.py"), "--peers", json.dumps(list(peers)),
                     "--prefix", prefix, "--blocks", str(n_blocks), "--interval", str(interval),
                     "--startup-timeout", "3600"]
        self.peers = tuple(peers)
        self.log = log
        self.latest: Snapshot | None = None
        self.error = ""
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        _check_python(self.args[0])
        stderr: Any = asyncio.subprocess.DEVNULL
        if self.log is not None:
            stderr = _open_log(self.log)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=stderr, env=side_env(), limit=16 * MIB, start_new_session=True)
        finally:
            if stderr is not asyncio.subprocess.DEVNULL:
                stderr.close()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        while True:
            try:
                line = await self._proc.stdout.readline()
            except (ValueError, asyncio.LimitOverrunError):
                continue
            if not line:
                break
            text = line.decode(errors="replace")
            if not text.startswith(backend.JSON_MARK):
                continue
            try:
                data = json.loads(text[len(backend.JSON_MARK):])
            except ValueError:
                continue
            if "error" in data:
                self.error = str(data["error"])[:300]
            elif isinstance(data.get("blocks"), list):
                self.error = ""
                self.latest = Snapshot(time.monotonic(), tuple(
                    tuple(s for s in b.get("servers", []) if isinstance(s, dict))
                    for b in data["blocks"] if isinstance(b, dict)))
            self._changed.set()
        await self._proc.wait()
        self.error = self.error or f"the DHT monitor exited (status {self._proc.returncode})"
        self._changed.set()

    async def next_snapshot(self, timeout: float) -> Snapshot | None:
        """Wait for the next poll (or the monitor's end); None on timeout."""
        self._changed.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)
        return self.latest

    async def fresh(self, timeout: float, newer_than: float) -> Snapshot | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.running:
            if self.latest is not None and self.latest.at > newer_than:
                return self.latest
            await self.next_snapshot(max(0.05, deadline - time.monotonic()))
        return self.latest if self.latest is not None and self.latest.at > newer_than else None

    async def aclose(self) -> None:
        proc, self._proc = self._proc, None
        # torch's torch_shm_manager leaves the monitor's group (setsid): note every descendant
        # now, to KILL what outlives the group below (psutil refuses a pid reused meanwhile).
        descendants: list[psutil.Process] = []
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(psutil.Error):
                descendants = psutil.Process(proc.pid).children(recursive=True)
        if proc is not None and proc.returncode is None:
            if proc.stdin is not None:
                proc.stdin.close()  # the monitor exits when its stdin closes
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), 5)
        if proc is not None:
            # Its DHT process and p2pd are in its process group (its own session).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        for child in descendants:
            with contextlib.suppress(psutil.Error):
                child.kill()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
            self._reader = None


_watches: dict[int, DhtWatch] = {}  # id(cluster) -> its watch; closed by close_watch()
_watch_locks: dict[int, asyncio.Lock] = {}  # parallel probes of several nodes start one watch


async def cluster_watch(cluster: Cluster) -> DhtWatch | None:
    """The cluster's DHT watch, (re)started when the swarm's peers changed; None when no peer is
    known yet (nothing was ever started)."""
    config = cluster.config
    swarm = read_swarm(config)
    peers = swarm_peers(config, swarm)
    n_blocks = int(swarm.get("n_blocks") or 0)
    if not peers or n_blocks < 1:
        return None
    async with _watch_locks.setdefault(id(cluster), asyncio.Lock()):
        return await _current_watch(cluster, peers, swarm, n_blocks)


async def _current_watch(cluster: Cluster, peers: list[str], swarm: dict[str, Any],
                         n_blocks: int) -> DhtWatch:
    config = cluster.config
    watch = _watches.get(id(cluster))
    # A running client finds new servers through the DHT: restart it only when it died or
    # knows none of the swarm's peers (each start costs seconds of imports).
    if watch is not None and (not watch.running or not set(watch.peers) & set(peers)):
        await watch.aclose()
        watch = None
    if watch is None:
        watch = DhtWatch(local_python(config), peers, str(swarm.get("prefix")), n_blocks,
                         log=swarm_dir(config) / "monitor.log")
        await watch.start()
        _watches[id(cluster)] = watch
    return watch


async def close_watch(cluster: Cluster) -> None:
    watch = _watches.pop(id(cluster), None)
    _watch_locks.pop(id(cluster), None)
    _view_errors.pop(id(cluster), None)
    if watch is not None:
        await watch.aclose()


# ---- block map ----------------------------------------------------------------------------------

def block_map(config: ClusterConfig, swarm: dict[str, Any],
              snapshot: Snapshot | None) -> tuple[tuple[BlockInfo, ...], tuple[int, ...]]:
    """Every block with its servers (named by node when the peer id is one of ours), and the
    blocks that no live ONLINE server serves."""
    names = {peer: node for node, peer in swarm.get("peer_ids", {}).items()}
    n_blocks = int(swarm.get("n_blocks") or 0)
    blocks: list[BlockInfo] = []
    for index in range(n_blocks):
        servers = snapshot.blocks[index] if snapshot and index < len(snapshot.blocks) else ()
        blocks.append(BlockInfo(index, tuple(
            BlockServer(peer_id=str(s.get("peer_id", "")),
                        node=names.get(str(s.get("peer_id", "")), ""),
                        state=str(s.get("state", "")), alive=bool(s.get("alive")),
                        throughput=_float(s.get("throughput")), version=str(s.get("version") or ""))
            for s in servers)))
    return tuple(blocks), tuple(b.index for b in blocks if not b.served)


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def node_share(config: ClusterConfig, swarm: dict[str, Any], blocks: Sequence[BlockInfo],
               node: NodeConfig) -> LayerShare:
    peer = swarm.get("peer_ids", {}).get(node.name, "")
    planned = swarm.get("plan", {}).get(node.name)
    mine = [(b.index, s) for b in blocks for s in b.servers if peer and s.peer_id == peer]
    first = min((i for i, _ in mine), default=None)
    states = {("dead" if s.state != "OFFLINE" and not s.alive else s.state) for _, s in mine}
    state = ("ONLINE" if states == {"ONLINE"} else "dead" if "dead" in states
             else "JOINING" if "JOINING" in states else "OFFLINE" if states else "")
    server = mine[0][1] if mine else None
    endpoint = ":".join(map(str, backend.listen_address(node)))
    return LayerShare(node.name, endpoint,
                      planned[0] if planned else None, planned[1] if planned else None,
                      len(mine) if mine else None, first_layer=first, state=state, peer_id=peer,
                      throughput=server.throughput if server else None,
                      version=server.version if server else "",
                      predicted_bytes=int(swarm.get("predicted", {}).get(node.name, 0)))


_view_errors: dict[int, str] = {}  # id(cluster) -> why the DHT could not be read last time


def dht_error(cluster: Cluster) -> str:
    return _view_errors.get(id(cluster), "")


async def dht_view(cluster: Cluster, *, wait: float = 30.0,
                   fresh: bool = False) -> tuple[dict[str, Any], Snapshot | None]:
    """The swarm file and the latest DHT snapshot; waits up to `wait` s for a first one (or,
    with `fresh`, for one read after this call)."""
    swarm = read_swarm(cluster.config)
    try:
        watch = await cluster_watch(cluster)
    except PetalsError as exc:
        _view_errors[id(cluster)] = str(exc)
        return swarm, None
    if watch is None:
        return swarm, None
    snapshot = watch.latest
    if snapshot is None or fresh:
        snapshot = await watch.fresh(wait, time.monotonic() if fresh else -1.0)
    _view_errors[id(cluster)] = watch.error
    return swarm, snapshot


# ---- node state and start ---------------------------------------------------------------------

async def probe_state(cluster: Cluster, node: NodeConfig) -> NodeStatus:
    """The node's state from its pidfile and, while its server runs, from the DHT: ready only
    when every block of its span is ONLINE there and the server answers a ping."""
    transport = cluster.transport(node.name)
    state_dir = cluster.node_state_dir(node)
    asked = time.monotonic()
    proc = await detached.status(transport, state_dir, backend.listen_address(node))
    started, probe_ms = cluster._started_at(node.name, proc), rounded_ms(time.monotonic() - asked)
    if proc.state == "dead":
        tail = await detached.log_tail(transport, state_dir, 40)
        return cluster._status(node, FAILED, proc.pid, backend.explain_server_log(tail))
    if proc.state != "running":
        previous = cluster.nodes[node.name]
        if previous.state == FAILED and previous.pid is None:
            return previous
        return cluster._status(node, STOPPED)
    if proc.port != "listening":
        return cluster._status(node, STARTING, proc.pid, started_at=started, probe_ms=probe_ms)
    swarm, snapshot = await dht_view(cluster)
    blocks, _ = block_map(cluster.config, swarm, snapshot)
    share = node_share(cluster.config, swarm, blocks, node)
    if share.state == "ONLINE" and share.layers:
        return cluster._status(node, READY, proc.pid, started_at=started, probe_ms=probe_ms)
    if share.state == "dead":
        return cluster._status(node, STARTING, proc.pid,
                               "its process runs but its server does not answer pings",
                               started_at=started, probe_ms=probe_ms)
    if snapshot is None and dht_error(cluster):
        return cluster._status(node, STARTING, proc.pid, "its server runs, but the swarm's DHT "
                               f"cannot be read from here: {dht_error(cluster)}",
                               started_at=started, probe_ms=probe_ms)
    return cluster._status(node, STARTING, proc.pid, started_at=started, probe_ms=probe_ms)


async def _prepare(cluster: Cluster, node: NodeConfig) -> backend.PetalsNodeInfo:
    transport = cluster.transport(node.name)
    result = await transport.run(backend.prepare_script(node, cluster.node_state_dir(node)),
                                 timeout=120)
    return backend.parse_prepare(node, result.stdout, result.stderr)


async def node_info(cluster: Cluster, node: NodeConfig) -> backend.PetalsNodeInfo:
    """Versions of the node's Petals environment (no identity file is made)."""
    transport = cluster.transport(node.name)
    result = await transport.run(backend.prepare_script(node, None), timeout=120)
    return backend.parse_prepare(node, result.stdout, result.stderr)


async def start_server(cluster: Cluster, node: NodeConfig, timeout: float) -> NodeStatus:
    """Start the node's Petals server on its planned blocks (from the swarm file `up` wrote),
    joining the swarm's running servers, or making a new swarm when none runs; wait until the
    DHT shows every block of its span ONLINE."""
    config = cluster.config
    swarm = read_swarm(config)
    span = swarm.get("plan", {}).get(node.name)
    if not span:
        return cluster._status(node, FAILED, None, "no blocks planned for this node: run "
                               "`torbiz-tui up` (it plans the blocks) first")
    info = await _prepare(cluster, node)
    if info.error or not info.peer_id:
        return cluster._status(node, FAILED, None, info.error or "no peer id from the node")
    maddr = backend.multiaddr(node, info.peer_id)
    swarm = update_swarm(config, peer_ids={node.name: info.peer_id}, maddrs={node.name: maddr})
    running = [swarm["maddrs"][n.name] for n in petals_nodes(config)
               if n.name != node.name and n.name in swarm.get("maddrs", {})
               and cluster.nodes[n.name].state in (READY, STARTING)]
    transport = cluster.transport(node.name)
    state_dir = cluster.node_state_dir(node)
    args = backend.server_args(config, node, state_dir, str(swarm.get("model", config.model.hf)),
                               (int(span[0]), int(span[0]) + int(span[1])), running,
                               gpu=bool(swarm.get("gpu", {}).get(node.name)))
    proc = await detached.spawn(transport, state_dir, args, env=backend.SERVER_ENV,
                                resolve=backend.resolve_python_sh(node),
                                listen=backend.listen_address(node))
    host, port = backend.listen_address(node)
    if proc.state == "taken":
        return cluster._status(node, FAILED, None,
                               f"port {port} on {host} is already in use by a program this "
                               "cluster did not start: stop it or set another rpc_port")
    if proc.state == "dead":
        tail = await detached.log_tail(transport, state_dir, 40)
        return cluster._status(node, FAILED, proc.pid, backend.explain_server_log(tail))
    if proc.state != "running":
        error = backend.missing_python_hint(node) if proc.error == "nopython" else proc.error
        return cluster._status(node, FAILED, None, error)
    cluster._status(node, STARTING, proc.pid)
    return await wait_online(cluster, node, proc.pid, max(timeout, READY_TIMEOUT))


async def wait_online(cluster: Cluster, node: NodeConfig, pid: int | None,
                      timeout: float) -> NodeStatus:
    transport = cluster.transport(node.name)
    state_dir = cluster.node_state_dir(node)
    deadline = time.monotonic() + timeout
    swarm = read_swarm(cluster.config)
    span = swarm.get("plan", {}).get(node.name, [0, 0])
    while time.monotonic() < deadline:
        proc = await detached.status(transport, state_dir, backend.listen_address(node))
        if proc.state != "running":
            tail = await detached.log_tail(transport, state_dir, 40)
            return cluster._status(node, FAILED, pid, backend.explain_server_log(tail))
        if proc.port == "listening":
            swarm, snapshot = await dht_view(cluster, wait=5.0, fresh=True)
            blocks, _ = block_map(cluster.config, swarm, snapshot)
            share = node_share(cluster.config, swarm, blocks, node)
            if share.state == "ONLINE" and share.first_layer == span[0] \
                    and share.layers == span[1]:
                return cluster._status(node, READY, pid)
        else:
            await asyncio.sleep(0.5)
    return cluster._status(node, FAILED, pid,
                           f"the server runs (pid {pid}) but its blocks are not ONLINE in the "
                           f"swarm after {timeout:g} s; see `torbiz-tui logs {node.name}`")


async def up(cluster: Cluster, placement: PetalsPlacement) -> list[NodeStatus]:
    """Record the plan, start the first server (a new swarm unless [petals] initial_peers names
    one), then the others joining it, in parallel."""
    record_plan(cluster.config, placement)
    names = [name for name, _, _ in placement.spans()]
    if not names:
        return []
    first = await cluster.start_node(names[0], timeout=READY_TIMEOUT)
    if first.state != READY:
        return [first]
    rest = await asyncio.gather(*(cluster.start_node(n, timeout=READY_TIMEOUT)
                                  for n in names[1:]))
    return [first, *rest]


async def status_detail(cluster: Cluster) -> tuple[tuple[LayerShare, ...],
                                                   tuple[BlockInfo, ...], tuple[int, ...]]:
    """The block map for `status --json`: a fresh DHT poll (with pings)."""
    nodes = petals_nodes(cluster.config)
    (swarm, snapshot), *measured = await asyncio.gather(
        dht_view(cluster, wait=30.0, fresh=True), *(server_memory(cluster, n) for n in nodes))
    blocks, unserved = block_map(cluster.config, swarm, snapshot)
    shares = tuple(replace(node_share(cluster.config, swarm, blocks, n), measured_bytes=m)
                   for n, m in zip(nodes, measured, strict=True))
    return shares, blocks, unserved


# PSS (kB) of every process in the server's group, from the node's /proc (0 when not running).
_MEMORY = r"""
p=$(cat __DIR__/pid 2>/dev/null); case $p in ''|*[!0-9]*) echo "TORBIZ-PSS 0"; exit 0;; esac
t=0
for q in $(ps -eo pid=,pgid= 2>/dev/null | awk -v g="$p" '$2 == g {print $1}'); do
  v=$(awk '/^Pss:/ {print $2}' /proc/$q/smaps_rollup 2>/dev/null); t=$((t + ${v:-0}))
done
echo "TORBIZ-PSS $t"
"""


async def server_memory(cluster: Cluster, node: NodeConfig) -> int:
    """What the node's server takes now (PSS of its process group), for the dashboard's
    predicted-vs-measured column; 0 when it does not run or the node cannot tell."""
    script = _MEMORY.replace("__DIR__", path_word(cluster.node_state_dir(node)))
    try:
        result = await cluster.transport(node.name).run(script, timeout=15)
    except TransportError:
        return 0
    for line in result.stdout.splitlines():
        if line.startswith("TORBIZ-PSS "):
            value = line.split()[1]
            return int(value) * 1024 if value.isdigit() else 0
    return 0


async def stop_server(cluster: Cluster, node: NodeConfig) -> detached.ProcessState:
    """SIGINT to the main pid (Petals announces its blocks offline and exits in ~3 s), then
    KILL the group and every recorded descendant (torch_shm_manager leaves the group)."""
    return await detached.stop(cluster.transport(node.name), cluster.node_state_dir(node),
                               signal="INT", grace=STOP_GRACE, tree=True)


# ---- generation -------------------------------------------------------------------------------

async def generate(config: ClusterConfig, prompt: str, new_tokens: int,
                   timeout: float = 300.0) -> dict[str, Any]:
    """Greedy generation through the swarm with Petals' client (a subprocess of this machine's
    Petals python); the answer's text, tokens, seconds and tokens_per_s."""
    swarm = read_swarm(config)
    peers = swarm_peers(config, swarm)
    if not peers:
        raise PetalsError("no swarm to generate with: start it with `torbiz-tui up` first")
    python = local_python(config)
    _check_python(python)
    log = swarm_dir(config) / "generate.log"  # its stderr: Petals' client logs, the route
    stderr = _open_log(log)
    try:
        proc = await asyncio.create_subprocess_exec(
            python, str(SIDE / "generate.py"), str(swarm.get("model", config.model.hf)),
            "--peers", json.dumps(peers), "--prefix", str(swarm.get("prefix")),
            "--prompt", prompt, "-n", str(new_tokens), "--dtype", config.petals.torch_dtype,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=stderr,
            env=side_env(), start_new_session=True)
    finally:
        stderr.close()
    try:
        answer = await asyncio.wait_for(_read_answer(proc, log), timeout)
    except asyncio.TimeoutError:
        answer = None
    finally:
        # The client exits by itself once it answered; a client stuck at exit or in a request
        # must not outlive the command (its DHT process and p2pd are in its process group).
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(proc.wait(), 10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
    if answer is None:
        raise PetalsError(f"no generation within {timeout:g} s (is every block served? "
                          "`torbiz-tui status --json` shows the block map)")
    if isinstance(answer, dict) and "error" not in answer:
        return answer
    raise PetalsError(str(answer.get("error") if isinstance(answer, dict) else answer))


async def _read_answer(proc: asyncio.subprocess.Process, log: Path) -> Any:
    """The first JSON line on the client's stdout; raises PetalsError with its log's last
    line when it ends without one."""
    assert proc.stdout is not None
    while True:
        line = await proc.stdout.readline()
        if not line:
            break
        text = line.decode(errors="replace")
        if text.startswith(backend.JSON_MARK):
            return json.loads(text[len(backend.JSON_MARK):])
    await proc.wait()
    tail = (await asyncio.to_thread(_log_tail, log) or ["no output"])[-1][:300]
    raise PetalsError(f"the Petals client failed (exit {proc.returncode}): {tail} "
                      f"(log: {log})")


def _log_tail(path: Path, size: int = 8192) -> list[str]:
    try:
        with open(path, "rb") as file:
            file.seek(0, 2)
            file.seek(max(0, file.tell() - size))
            return [ln for ln in file.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return []


async def plan_and_up(cluster: Cluster) -> tuple[PetalsPlacement, list[NodeStatus]]:
    """Probe every Petals node, plan, start the swarm (what `up` does without the preflight).
    Raises PetalsError (probe, model), PlanRefused, TransportError."""
    from core.reach.probe import probe_nodes

    try:
        probes = await probe_nodes({n.name: cluster.transport(n.name)
                                    for n in petals_nodes(cluster.config)})
    except TransportError as exc:
        raise PetalsError(str(exc)) from None
    placement = await make_petals_placement(cluster.config, probes)
    return placement, await up(cluster, placement)
