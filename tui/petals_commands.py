"""Headless commands for clusters of `backend = "petals"` nodes: plan, up, the block map in
`status`, and `petals-generate`. tui/cli.py dispatches here; the work is in
core.engines.petals.swarm."""

from __future__ import annotations

import asyncio
import json
import sys

from core.cluster import Cluster
from core.config import ClusterConfig
from core.doctor import run_doctor
from core.engines.petals import swarm as petals_swarm
from core.planning.planner import PlanRefused
from core.reach.probe import NodeProbe, probe_nodes
from core.reach.transport import TransportError
from core.status import READY, ClusterStatus


async def probe_petals_nodes(cluster: Cluster) -> dict[str, NodeProbe]:
    try:
        return await probe_nodes({n.name: cluster.transport(n.name)
                                  for n in petals_swarm.petals_nodes(cluster.config)})
    except TransportError as exc:
        raise petals_swarm.PetalsError(str(exc)) from None


async def plan(config: ClusterConfig, as_json: bool) -> int:
    cluster = Cluster(config)
    try:
        placement = await petals_swarm.make_petals_placement(
            config, await probe_petals_nodes(cluster))
    except (petals_swarm.PetalsError, PlanRefused) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        await cluster.close()
    print(json.dumps(placement.to_json(), indent=2) if as_json
          else petals_swarm.format_petals_placement(placement))
    return 0


async def up(cluster: Cluster, force: bool) -> int:
    """Preflight (unless forced), plan, then the swarm: the first server, then the others."""
    config = cluster.config
    if force:
        probes = await probe_petals_nodes(cluster)
    else:
        report = await run_doctor(cluster)
        if report.failed:
            for check in report.failed:
                print(f"error: {check.part}: {check.message}", file=sys.stderr)
            print("preflight failed: nothing was started (`up --force` skips it)",
                  file=sys.stderr)
            return 1
        probes = report.probes
    try:
        placement = await petals_swarm.make_petals_placement(config, probes)
    except (petals_swarm.PetalsError, PlanRefused) as exc:
        print(f"error: {exc}", file=sys.stderr)
        print("nothing was started", file=sys.stderr)
        return 1
    print(petals_swarm.format_petals_placement(placement), file=sys.stderr, flush=True)
    nodes = await petals_swarm.up(cluster, placement)
    failed = [n for n in nodes if n.state != READY]
    if failed:
        for node in failed:
            print(f"error: {node.name}: {node.error}", file=sys.stderr)
        running = [n.name for n in cluster.nodes.values() if n.state == READY]
        if running:
            print(f"servers still running: {', '.join(running)} (`torbiz-tui down` stops them)",
                  file=sys.stderr)
        return 1
    print(f"swarm {petals_swarm.backend.dht_prefix(config)} is up: "
          + ", ".join(f"{name} blocks {first}:{first + count}"
                      for name, first, count in placement.spans()))
    return 0


def format_block_map(status: ClusterStatus) -> str:
    """One line per node (its served span and DHT state) and the unserved blocks."""
    lines = []
    for share in status.layers:
        served = (f"{share.first_layer}:{share.first_layer + (share.layers or 0)}"
                  if share.first_layer is not None else "-")
        planned = (f"{share.planned_first}:{share.planned_first + (share.planned_layers or 0)}"
                   if share.planned_first is not None else "-")
        lines.append(f"  {share.node:<12} blocks {served:<9} (planned {planned})  "
                     f"{share.state or 'not in the DHT'}")
    unserved = ", ".join(map(str, status.unserved)) or "none"
    return "\n".join(["block map (DHT):", *lines, f"  unserved blocks: {unserved}"])


async def generate(config: ClusterConfig, prompt: str, new_tokens: int) -> int:
    try:
        answer = await petals_swarm.generate(config, prompt, new_tokens)
    except petals_swarm.PetalsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(answer.get("text", ""))
    print(f"{len(answer.get('tokens', []))} tokens in {answer.get('seconds')} s: "
          f"{answer.get('tokens_per_s')} tokens/s (client start "
          f"{answer.get('client_start_s')} s)", file=sys.stderr)
    return 0


async def status(config: ClusterConfig, as_json: bool) -> int:
    """Nodes (their state follows the DHT) and the block map; exit 0 only when every node is
    ready and every block is served."""
    from tui.cli import format_status

    cluster = Cluster(config)
    try:
        found = await cluster.status(detail=True)
    finally:
        await cluster.close()
    if as_json:
        print(json.dumps(found.to_json(), indent=2))
    else:
        print(format_status(found))
        print(format_block_map(found))
    healthy = all(n.state == READY for n in found.nodes) and not found.unserved
    return 0 if healthy else 3


def run(command: str, config: ClusterConfig, json_out: bool, force: bool) -> int:
    """`plan`, `up` and `status` of a Petals cluster (`down`, `logs`, `doctor` are shared)."""
    if command == "plan":
        return asyncio.run(plan(config, json_out))
    if command == "status":
        return asyncio.run(status(config, json_out))
    return asyncio.run(_up(config, force))


async def _up(config: ClusterConfig, force: bool) -> int:
    from tui.cli import _print_event

    cluster = Cluster(config)
    cluster.subscribe(_print_event)
    try:
        return await up(cluster, force)
    except (petals_swarm.PetalsError, TransportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        await cluster.close()


async def provision(config: ClusterConfig, name: str, petals: bool) -> int:
    """Build the Petals environment on a node (scripts/petals-env.sh run there)."""
    from core.engines.petals.provision import ProvisionError, provision_petals

    if not petals:
        print("error: say what to provision: --petals (the only environment so far)",
              file=sys.stderr)
        return 2
    node = config.node(name)
    cluster = Cluster(config)
    try:
        venv = await provision_petals(cluster.transport(name), node,
                                      lambda line: print(line, flush=True))
        info = await petals_swarm.node_info(cluster, node)
    except (ProvisionError, TransportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        await cluster.close()
    if info.error:
        print(f"error: {name}: built {venv}, but {info.error}", file=sys.stderr)
        return 1
    print(f"{name}: Petals environment ready in {venv}: python {info.python}, petals "
          f"{info.petals}, torch {info.torch}")
    return 0
