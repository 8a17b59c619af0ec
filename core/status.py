"""What the core tells its callers: frozen snapshots of nodes and the coordinator, and events."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any


class NodeState(str, Enum):
    """A node's worker (or server) as the core last saw it; compares equal to its value."""

    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    FAILED = "failed"  # the worker died or could not start (the error says why)
    UNREACHABLE = "unreachable"  # the node refused or closed the connection
    NOT_RESPONDING = "not responding"  # connected (or TCP up) but silent: frozen, or link down

    def __str__(self) -> str:
        return self.value


class Level(str, Enum):
    """How loud a notice is in the operator's event log."""

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    def __str__(self) -> str:
        return self.value


STOPPED = NodeState.STOPPED
STARTING = NodeState.STARTING
READY = NodeState.READY
FAILED = NodeState.FAILED
UNREACHABLE = NodeState.UNREACHABLE
NOT_RESPONDING = NodeState.NOT_RESPONDING
STATES = tuple(NodeState)
CoordinatorState = NodeState  # the coordinator goes through the same states


def rounded_ms(seconds: float) -> int:
    """Milliseconds, to two significant digits: a status that changes only when the latency
    really does."""
    ms = max(1, round(seconds * 1000))
    scale = 10 ** max(0, len(str(ms)) - 2)
    return int(round(ms / scale) * scale)


@dataclass(frozen=True)
class NodeStatus:
    name: str
    host: str
    backend: str
    state: NodeState = STOPPED
    pid: int | None = None
    endpoint: str = ""
    error: str = ""
    started_at: float | None = None  # the worker's start, unix time (this machine's clock)
    probe_ms: int | None = None  # how long the last status round trip to the node took


@dataclass(frozen=True)
class CoordinatorStatus:
    state: NodeState = STOPPED
    url: str = ""
    pid: int | None = None
    error: str = ""
    loading_s: float | None = None  # starting: seconds since it started (its /health is 503)


@dataclass(frozen=True)
class LayerShare:
    """One worker's part of the model: what the plan gave it and what llama-server loaded."""

    node: str
    endpoint: str  # as the coordinator reaches it (a tunnel's local end for rpc_bind=loopback)
    planned_first: int | None = None
    planned_layers: int | None = None
    layers: int | None = None  # actual, from the coordinator's load log
    model_bytes: int = 0
    kv_bytes: int = 0
    compute_bytes: int = 0
    # Petals nodes: what the swarm's DHT says this node's server serves now.
    first_layer: int | None = None  # first block it serves (layers: how many)
    state: str = ""  # ONLINE, JOINING, OFFLINE, "dead" (announced but no answer to a ping), ""
    peer_id: str = ""
    throughput: float | None = None
    version: str = ""  # the server's Petals version
    predicted_bytes: int = 0  # the plan's memory for this node (process, blocks, cache)
    measured_bytes: int = 0  # PSS of the server's process group now (0: not running or unread)


@dataclass(frozen=True)
class BlockServer:
    """One server announcing a block in a Petals swarm's DHT."""

    peer_id: str
    node: str  # the cluster's node with that peer id, or "" for a server not in this cluster
    state: str  # ONLINE, JOINING, OFFLINE
    alive: bool  # answered a ping in this poll
    throughput: float | None = None
    version: str = ""


@dataclass(frozen=True)
class BlockInfo:
    index: int
    servers: tuple[BlockServer, ...] = ()

    @property
    def served(self) -> bool:
        return any(s.state == "ONLINE" and s.alive for s in self.servers)


@dataclass(frozen=True)
class ClusterStatus:
    name: str
    nodes: tuple[NodeStatus, ...]
    coordinator: CoordinatorStatus
    layers: tuple[LayerShare, ...] = ()
    throughput: dict[str, Any] | None = None
    blocks: tuple[BlockInfo, ...] = ()  # Petals: every block and who serves it (DHT)
    unserved: tuple[int, ...] = ()  # Petals: blocks no live ONLINE server serves
    bottleneck: dict[str, Any] | None = None  # where each token's time goes (supervision)

    def to_json(self) -> dict[str, Any]:
        return {
            "cluster": self.name,
            "nodes": [asdict(n) for n in self.nodes],
            "coordinator": asdict(self.coordinator),
            "layers": [asdict(share) for share in self.layers],
            "throughput": self.throughput,
            "blocks": [asdict(block) for block in self.blocks],
            "unserved": list(self.unserved),
            "bottleneck": self.bottleneck,
        }


@dataclass(frozen=True)
class NodeChanged:
    status: NodeStatus


@dataclass(frozen=True)
class CoordinatorChanged:
    status: CoordinatorStatus


@dataclass(frozen=True)
class Notice:
    """A line for the operator's event log; level is info, warning or error."""

    text: str
    level: Level = Level.INFO
    node: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CoordinatorLoading:
    """The coordinator is loading the model: seconds since it started, how far the load log
    has got (a coarse fraction from the stage reached, None before any loading line), and
    what its /health answered (None: nothing yet)."""

    seconds: float
    fraction: float | None = None
    health_code: int | None = None


Event = NodeChanged | CoordinatorChanged | CoordinatorLoading | Notice
