"""The Petals block budget: each node's free memory through the same planner as llama.cpp
layers, with blocks at Petals' own size plus the attention cache."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Any

from core.config import ClusterConfig, NodeConfig
from core.engines.petals.local import PetalsError, petals_nodes
from core.planning.fastest import FASTEST
from core.planning.model_info import ModelInfo, ModelInfoError, read_hf_info
from core.planning.planner import NodeBudget, Plan, plan_layers
from core.reach.probe import NodeProbe
from core.units import GIB, MIB, format_bytes, table_lines

PETALS_EPS = 0.01  # petals.server.block_utils.get_block_size: ~1% for tensor metadata
# A CPU server's process before any block: Python, torch, hivemind, its DHT process and two
# p2pd daemons, plus one process per connection handler (bench/petals_budget.py measures these).
PROCESS_BASE_BYTES = 400 * MIB
HANDLER_BYTES = 80 * MIB
DEFAULT_RESERVE_GB = 1.0


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
    # Petals servers cannot be calibrated: `fastest` (the default) places them by memory.
    policy = "pack" if config.plan.policy == FASTEST else config.plan.policy
    plan = plan_layers(model, budgets, context=config.petals.attn_cache_tokens,
                       cache_type=cache_type(config.petals.torch_dtype), policy=policy)
    return PetalsPlacement(model, tuple(budgets), devices, plan, overhead,
                           config.petals.attn_cache_tokens)



def format_petals_placement(placement: PetalsPlacement) -> str:
    """The per-node table for `torbiz-tui plan` on a Petals cluster."""
    rows = [("NODE", "DEVICE", "FREE", "RESERVE", "BUDGET", "BLOCKS", "WEIGHTS", "CACHE",
             "PREDICTED")]
    for budget in placement.budgets:
        share = placement.plan.assignment(budget.name)
        used = share is not None and share.n_layers > 0
        rows.append((budget.name, placement.devices.get(budget.name, "?"),
                     format_bytes(budget.available_bytes), format_bytes(budget.reserve_bytes),
                     format_bytes(budget.budget_bytes),
                     f"{share.first_layer}:{share.first_layer + share.n_layers} "
                     f"({share.n_layers})" if share and used else "-",
                     format_bytes(share.weight_bytes) if share and used else "-",
                     format_bytes(share.kv_bytes) if share and used else "-",
                     format_bytes(placement.predicted_bytes(budget.name)) if used else "-"))
    lines = table_lines(rows)
    model = placement.model
    lines.append("")
    lines.append(f"model {model.path}: {model.n_layers} blocks of "
                 f"{format_bytes(max(model.layer_bytes))} (Petals' size, {model.sizes_from}); "
                 f"attention cache {placement.cache_tokens} tokens; the reserve includes "
                 f"{format_bytes(placement.process_bytes)} for the server process on CPU nodes; "
                 f"policy {placement.plan.policy}")
    if placement.plan.unused:
        lines.append(f"not used: {', '.join(placement.plan.unused)}")
    return "\n".join(lines)

