"""The one place that maps a cluster file's `backend` to its engine."""

from __future__ import annotations

from core.config import ClusterConfig, NodeConfig
from core.engines.base import Engine, EngineContext
from core.engines.llama_rpc.engine import LlamaRpcEngine
from core.engines.petals.engine import PetalsEngine

ENGINES: dict[str, type[Engine]] = {LlamaRpcEngine.name: LlamaRpcEngine,
                                    PetalsEngine.name: PetalsEngine}


def engine_class(config: ClusterConfig) -> type[Engine]:
    """A cluster runs one engine: the backend of its nodes (the config refuses a mix)."""
    backend = config.nodes[0].backend if config.nodes else LlamaRpcEngine.name
    return ENGINES.get(backend, LlamaRpcEngine)


def make_engine(ctx: EngineContext) -> Engine:
    return engine_class(ctx.config)(ctx)


def exposure_warnings(config: ClusterConfig) -> list[str]:
    """What the cluster opens beyond loopback, one sentence per endpoint."""
    return engine_class(config).exposure(config)


def node_exposure(node: NodeConfig) -> str | None:
    """The sentence for one node's server (the dashboard's `s`), or None."""
    return ENGINES.get(node.backend, LlamaRpcEngine).node_exposure(node)
