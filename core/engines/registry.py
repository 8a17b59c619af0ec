"""The one place that maps a cluster file's `backend` to its engine."""

from __future__ import annotations

from core.config import ClusterConfig
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
