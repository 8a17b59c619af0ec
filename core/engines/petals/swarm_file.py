"""The swarm file on this machine: the plan, each node's peer id and multiaddr, the DHT prefix.
`up` writes it; every later command (from any shell) reads it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.config import ClusterConfig
from core.engines.petals import commands as backend
from core.engines.petals.placement import PetalsPlacement
from core.peer_address import valid_multiaddr
from core.state_file import read_json, write_json

SWARM_FILE = "swarm.json"


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
    return [p for p in peers if isinstance(p, str) and valid_multiaddr(p)]  # file is data

