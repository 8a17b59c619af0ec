"""What `up` does before it starts anything, shared by the CLI and the dashboard: the preflight
(doctor), then the plan from the model and each node's probed memory."""

from __future__ import annotations

from core.cluster import Cluster, ClusterError
from core.config import NodeConfig
from core.doctor import run_doctor
from core.engines.petals import swarm as petals_swarm
from core.planning.placement import (
    Placement,
    PlacementError,
    PlanRefused,
    format_placement,
    make_placement,
)
from core.reach.probe import NodeProbe, probe_nodes
from core.reach.transport import TransportError


async def probe_for_plan(cluster: Cluster, nodes: list[NodeConfig]) -> dict[str, NodeProbe]:
    """Each node's probe; PlacementError naming the first node that cannot be read."""
    try:
        return await probe_nodes({n.name: cluster.transport(n.name) for n in nodes})
    except TransportError as exc:
        raise PlacementError(str(exc)) from None


async def plan_now(cluster: Cluster) -> Placement:
    """The llama.cpp plan as it would be made now, starting nothing (PlacementError,
    PlanRefused)."""
    nodes = [n for n in cluster.config.nodes if n.backend == "llama-rpc"]
    return await make_placement(cluster.config, await probe_for_plan(cluster, nodes))


async def plan_text(cluster: Cluster) -> str:
    """The plan of either kind of cluster as the `plan` command prints it (PlacementError,
    PlanRefused, PetalsError)."""
    if petals_swarm.is_petals_cluster(cluster.config):
        probes = await probe_for_plan(cluster, petals_swarm.petals_nodes(cluster.config))
        placement = await petals_swarm.make_petals_placement(cluster.config, probes)
        return petals_swarm.format_petals_placement(placement)
    return format_placement(await plan_now(cluster))


class NothingStarted(ClusterError):
    """`up` refused before starting anything: `stage` is "preflight" or "plan", `problems` one
    sentence each."""

    def __init__(self, stage: str, problems: list[str]) -> None:
        super().__init__(problems)
        self.stage = stage


async def preflight_and_plan(cluster: Cluster) -> Placement | None:
    """The doctor's checks, then the plan; NothingStarted when either refuses. None for a
    Petals cluster, whose `Cluster.up` plans the blocks itself."""
    report = await run_doctor(cluster)
    if report.failed:
        raise NothingStarted("preflight", [f"{c.part}: {c.message}" for c in report.failed])
    if petals_swarm.is_petals_cluster(cluster.config):
        return None
    try:
        return await make_placement(cluster.config, report.probes)
    except (PlacementError, PlanRefused) as exc:
        raise NothingStarted("plan", [str(exc)]) from None
