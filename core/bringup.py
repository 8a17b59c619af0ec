"""What `up` does before it starts anything, shared by the CLI and the dashboard: the preflight
(doctor), then the plan from the model and each node's probed memory."""

from __future__ import annotations

import asyncio

from .cluster import Cluster, ClusterError
from .doctor import run_doctor
from .placement import Placement, PlacementError, PlanRefused, make_placement
from .probe import NodeProbe, probe_node
from .transport import TransportError


async def probe_rpc_nodes(cluster: Cluster) -> dict[str, NodeProbe]:
    """Every llama-rpc node's probe; PlacementError naming the first node that cannot be read."""
    nodes = [n for n in cluster.config.nodes if n.backend == "llama-rpc"]
    results = await asyncio.gather(*(probe_node(cluster.transport(n.name)) for n in nodes),
                                   return_exceptions=True)
    probes: dict[str, NodeProbe] = {}
    for node, result in zip(nodes, results, strict=True):
        if isinstance(result, TransportError):
            raise PlacementError(f"{node.name}: {result.reason}")
        if isinstance(result, BaseException):
            raise result
        probes[node.name] = result
    return probes


async def plan_now(cluster: Cluster) -> Placement:
    """The plan as it would be made now, starting nothing (PlacementError, PlanRefused)."""
    return await make_placement(cluster.config, await probe_rpc_nodes(cluster))


class NothingStarted(ClusterError):
    """`up` refused before starting anything: `stage` is "preflight" or "plan", `problems` one
    sentence each."""

    def __init__(self, stage: str, problems: list[str]) -> None:
        super().__init__(problems)
        self.stage = stage


async def preflight_and_plan(cluster: Cluster) -> Placement:
    """The doctor's checks, then the plan; NothingStarted when either refuses."""
    report = await run_doctor(cluster)
    if report.failed:
        raise NothingStarted("preflight", [f"{c.part}: {c.message}" for c in report.failed])
    try:
        return await make_placement(cluster.config, report.probes)
    except (PlacementError, PlanRefused) as exc:
        raise NothingStarted("plan", [str(exc)]) from None
