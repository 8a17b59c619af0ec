"""What the core tells its callers: frozen snapshots of nodes and the coordinator, and events."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

STOPPED = "stopped"
STARTING = "starting"
READY = "ready"
FAILED = "failed"
UNREACHABLE = "unreachable"
STATES = (STOPPED, STARTING, READY, FAILED, UNREACHABLE)


@dataclass(frozen=True)
class NodeStatus:
    name: str
    host: str
    backend: str
    state: str = STOPPED
    pid: int | None = None
    endpoint: str = ""
    error: str = ""


@dataclass(frozen=True)
class CoordinatorStatus:
    state: str = STOPPED
    url: str = ""
    pid: int | None = None
    error: str = ""


@dataclass(frozen=True)
class ClusterStatus:
    name: str
    nodes: tuple[NodeStatus, ...]
    coordinator: CoordinatorStatus

    def to_json(self) -> dict[str, Any]:
        return {
            "cluster": self.name,
            "nodes": [asdict(n) for n in self.nodes],
            "coordinator": asdict(self.coordinator),
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
    level: str = "info"
    node: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


Event = NodeChanged | CoordinatorChanged | Notice
