"""What a cluster opens to the network: one sentence per endpoint that listens beyond this
machine's or its node's loopback, for every place a cluster starts (`up`, the dashboard's `u`
and `s`) to show before it starts anything."""

from __future__ import annotations

from core.config import ClusterConfig, NodeConfig
from core.engines.llama_rpc.coordinator import api_exposure
from core.engines.llama_rpc.rpc import worker_exposure
from core.engines.petals.commands import server_exposure


def exposure_warnings(config: ClusterConfig) -> list[str]:
    """One sentence per exposed endpoint: workers on a non-loopback address or every
    interface, the coordinator's API off loopback, Petals servers announced to the swarm."""
    warnings: list[str] = []
    rpc_nodes = [n for n in config.nodes if n.backend == "llama-rpc"]
    if rpc_nodes:
        api = api_exposure(config)
        if api:
            warnings.append(api)
    for node in config.nodes:
        sentence = node_exposure(node)
        if sentence:
            warnings.append(sentence)
    return warnings


def node_exposure(node: NodeConfig) -> str | None:
    """The sentence for one node's server (starting one node: the dashboard's `s`), or None
    when it listens on loopback only."""
    return worker_exposure(node) if node.backend == "llama-rpc" else server_exposure(node)
