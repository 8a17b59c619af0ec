"""From the model file and each node's measured memory to a plan: the budgets the planner
works with, and the plan `up` follows."""

from __future__ import annotations

import asyncio
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from core.config import ClusterConfig, NodeConfig
from core.planning.fastest import FASTEST, plan_fastest
from core.planning.model_info import ModelInfo, ModelInfoError, read_gguf_info
from core.planning.perf import LinkSpeed, NodeSpeed
from core.planning.planner import NodeBudget, Plan, PlanRefused, plan_layers
from core.planning.repack import NO_REPACK, CpuRepack, cpu_repack, parse_cpuinfo_flags
from core.reach.probe import NodeProbe
from core.units import format_bytes, table_lines

GIB = 1 << 30
DEFAULT_RAM_RESERVE_GB = 1.0  # the OS, sshd and the worker process itself
DEFAULT_VRAM_RESERVE_GB = 0.5  # the driver's own allocations and compute buffers
COORDINATOR = "coordinator"  # the coordinator's own CPU, as a planner node


class PlacementError(Exception):
    pass


@dataclass(frozen=True)
class Placement:
    model: ModelInfo
    budgets: tuple[NodeBudget, ...]
    devices: dict[str, str]  # node -> "CPU" or the GPU names the budget came from
    plan: Plan
    notes: tuple[str, ...] = ()  # the fastest policy: why nodes were left out, or its fallback


def _reserve_gb(config: ClusterConfig, node: NodeConfig | None, gpu: bool) -> float:
    if node is not None and node.reserve_gb is not None:
        return node.reserve_gb
    if config.plan.reserve_gb is not None:
        return config.plan.reserve_gb
    return DEFAULT_VRAM_RESERVE_GB if gpu else DEFAULT_RAM_RESERVE_GB


def node_budget(config: ClusterConfig, node: NodeConfig, probe: NodeProbe) -> tuple[NodeBudget,
                                                                                     str]:
    """A worker uses its GPUs when it has any (rpc-server prefers them), else its RAM."""
    gpu = bool(probe.gpus)
    available = probe.gpu_free_bytes if gpu else probe.ram_available_bytes
    device = ", ".join(g.name for g in probe.gpus) if gpu else "CPU"
    return NodeBudget(
        name=node.name,
        available_bytes=available,
        reserve_bytes=int(_reserve_gb(config, node, gpu) * GIB),
        max_bytes=int(node.max_memory_gb * GIB) if node.max_memory_gb is not None else None,
        weight=node.weight,
    ), device


def coordinator_budget(config: ClusterConfig) -> NodeBudget:
    return NodeBudget(name=COORDINATOR, available_bytes=psutil.virtual_memory().available,
                      reserve_bytes=int(_reserve_gb(config, None, False) * GIB),
                      is_coordinator=True,
                      repack=local_cpu_repack(config.coordinator.extra_args))


_NO_REPACK_FLAGS = ("-nr", "--no-repack", "--no_repack")
CPUINFO = Path("/proc/cpuinfo")


def local_cpu_repack(extra_args: Sequence[str] = (), cpuinfo: Path = CPUINFO) -> CpuRepack:
    """What this machine's CPU (llama-server runs here) keeps a repacked copy of, from its
    feature flags; nothing when llama-server is told --no-repack."""
    if any(arg in _NO_REPACK_FLAGS for arg in extra_args):
        return NO_REPACK
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        text = ""
    return cpu_repack(parse_cpuinfo_flags(text), platform.machine())


_models: dict[tuple[str, int, int, int], ModelInfo] = {}  # the file's identity -> its facts


def _read_gguf_once(path: Path) -> ModelInfo:
    """read_gguf_info, remembered while the file is unchanged (it parses the whole header,
    vocabulary included: 0.3 s for a small model, which a recovery should not wait on)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _models:
        if len(_models) >= 8:
            _models.clear()
        _models[key] = read_gguf_info(path)
    return _models[key]


async def read_model(config: ClusterConfig) -> ModelInfo:
    if config.model.gguf is None:
        raise PlacementError("no model: set [model] gguf in the config")
    try:
        return await asyncio.to_thread(_read_gguf_once, Path(config.model.gguf))
    except ModelInfoError as exc:
        raise PlacementError(str(exc)) from None
    except OSError as exc:
        raise PlacementError(f"cannot read the model {config.model.gguf}: "
                             f"{exc.strerror or exc}") from None


async def make_placement(config: ClusterConfig, probes: dict[str, NodeProbe],
                         speeds: Mapping[str, NodeSpeed] | None = None,
                         links: Mapping[str, LinkSpeed] | None = None) -> Placement:
    """Plan the cluster's nodes from their probes (the llama.cpp RPC engine's planner; a cluster
    is one backend, checked when the file is loaded); raises PlacementError or PlanRefused.
    The fastest policy places by `speeds` and `links` (the calibration)."""
    model = await read_model(config)
    budgets: list[NodeBudget] = []
    devices: dict[str, str] = {}
    if config.plan.coordinator_layers:
        budgets.append(coordinator_budget(config))
        devices[COORDINATOR] = "CPU"
    for node in config.nodes:
        probe = probes.get(node.name)
        if probe is None:
            raise PlacementError(f"{node.name}: not probed (unreachable?): cannot plan without "
                                 "its free memory")
        budget, device = node_budget(config, node, probe)
        budgets.append(budget)
        devices[node.name] = device
    if config.plan.policy == FASTEST:
        fastest = plan_fastest(model, budgets, speeds or {}, links or {},
                               context=config.model.context, cache_type=config.plan.cache_type)
        return Placement(model, tuple(budgets), devices, fastest.plan, fastest.notes)
    plan = plan_layers(model, budgets, context=config.model.context,
                       cache_type=config.plan.cache_type, policy=config.plan.policy)
    return Placement(model, tuple(budgets), devices, plan)


def format_placement(placement: Placement) -> str:
    """The per-node memory table and the plan, for `torbiz-tui plan`."""
    plan = placement.plan
    rows = [("NODE", "DEVICE", "FREE", "RESERVE", "BUDGET", "BLOCKS", "WEIGHTS", "KV", "TOTAL")]
    for budget in placement.budgets:
        share = plan.assignment(budget.name)
        blocks = (f"{share.first_layer}-{share.last_layer} ({share.n_layers})"
                  if share and share.n_layers else "-")
        rows.append((budget.name, placement.devices.get(budget.name, "?"),
                     format_bytes(budget.available_bytes), format_bytes(budget.reserve_bytes),
                     format_bytes(budget.budget_bytes), blocks,
                     format_bytes(share.weight_bytes) if share else "-",
                     format_bytes(share.kv_bytes) if share else "-",
                     format_bytes(share.total_bytes) if share else "-"))
    lines = table_lines(rows)
    model = placement.model
    lines.append("")
    lines.append(f"model {model.name or model.path}: {model.n_layers} blocks, "
                 f"{format_bytes(model.total_bytes)} of weights; context {plan.context}, "
                 f"KV cache {plan.cache_type}; policy {plan.policy}")
    repacked = sum(a.repacked_bytes for a in plan.assignments)
    if repacked:
        lines.append(f"this machine's CPU keeps a repacked copy of its blocks' matrices "
                     f"({format_bytes(repacked)}, counted in WEIGHTS); [coordinator] extra_args = "
                     "[\"--no-repack\"] saves it, at some speed")
    if plan.unused:
        lines.append(f"not used: {', '.join(plan.unused)}")
    lines.extend(placement.notes)
    return "\n".join(lines)


__all__ = ["Placement", "PlacementError", "PlanRefused", "format_placement", "make_placement"]
