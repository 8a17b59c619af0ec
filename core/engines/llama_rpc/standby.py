"""Warm standbys: nodes named in `[plan] standby` are left out of the plan, their workers run
idle, `cache warm` (and `[plan] prewarm`) fills their caches with the blocks of the nodes they
would replace, and a recovery hands a lost worker's blocks to the standby whose cache holds the
most of them (a warm one loads from its own disk instead of the coordinator's link).

A standby may replace any planned worker: it is warmed with every block the workers hold (the
union of their spans), as far as its cache limit and disk allow."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from core.config import ClusterConfig
from core.engines.base import Span
from core.planning.placement import node_budget, read_model
from core.planning.planner import layer_costs
from core.reach.probe import NodeProbe


def standby_names(config: ClusterConfig) -> tuple[str, ...]:
    return tuple(config.plan.standby)


def without_standbys(config: ClusterConfig) -> ClusterConfig:
    """The cluster as the planner sees it at `up`: standbys are left out."""
    names = set(standby_names(config))
    if not names:
        return config
    return replace(config, nodes=tuple(n for n in config.nodes if n.name not in names))


def workers_span(spans: Sequence[Span]) -> tuple[int, int] | None:
    """The blocks the planned workers hold, as one span (first, count)."""
    used = [(first, count) for _, first, count in spans if count > 0]
    if not used:
        return None
    first = min(f for f, _ in used)
    return first, max(f + c for f, c in used) - first


def with_standbys(config: ClusterConfig, spans: Sequence[Span]) -> list[Span]:
    """The plan's spans plus each standby's warm span (every block the workers hold)."""
    out = list(spans)
    union = workers_span(spans)
    planned = {name for name, _, count in spans if count > 0}
    if union is not None:
        out += [(name, union[0], union[1]) for name in standby_names(config)
                if name not in planned]
    return out


@dataclass(frozen=True)
class Handover:
    """A lost worker's blocks handed whole to a standby."""

    lost: str
    standby: str
    span: tuple[int, int]
    warm_share: float  # of the span's cacheable bytes, in the standby's cache


async def fitting(config: ClusterConfig, name: str, probe: NodeProbe,
                  span: tuple[int, int]) -> bool:
    """Whether the node's memory budget holds that span (weights, KV, compute)."""
    model = await read_model(config)
    budget, _ = node_budget(config, config.node(name), probe)
    costs = layer_costs(model, config.model.context, config.plan.cache_type)
    first, count = span
    need = sum(costs[first:first + count]) + (model.output_bytes
                                               if first + count == model.n_layers else 0)
    return need <= budget.budget_bytes


def handed_over(previous: dict[str, tuple[int, int]], handovers: Sequence[Handover]) -> \
        tuple[Span, ...]:
    """The previous spans with each lost worker's name replaced by its standby's."""
    to = {h.lost: h.standby for h in handovers}
    return tuple(sorted(((to.get(name, name), first, count)
                         for name, (first, count) in previous.items() if count > 0),
                        key=lambda s: s[1]))


def handover_sentence(handovers: Sequence[Handover], took: float) -> str:
    parts = []
    for h in handovers:
        where = ("from its warm cache" if h.warm_share >= 0.999 else
                 f"from a cold cache ({h.warm_share:.0%} of blocks "
                 f"{h.span[0]}-{h.span[0] + h.span[1] - 1} cached)")
        parts.append(f"onto {h.standby} {where}")
    return f"recovered {' and '.join(parts)} in {took:.1f} s"
