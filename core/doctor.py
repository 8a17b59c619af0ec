"""The preflight: every check an operator would run by hand before starting a cluster.

What is checked here is the same for every engine (where each worker would listen, that the
node answers over SSH with its host key verified, what its probe saw); the engine adds its own
(binaries, clock, ports, protocol) through its doctor methods."""

from __future__ import annotations

import asyncio

from core.checks import FAIL, OK, WARN, Check, DoctorReport
from core.config import NodeConfig
from core.engines.base import Engine, EngineContext
from core.reach.probe import NodeProbe, probe_node
from core.reach.transport import TransportError


async def _node_checks(ctx: EngineContext, engine: Engine,
                       node: NodeConfig) -> tuple[list[Check], NodeProbe | None]:
    checks = [engine.bind_check(node)]
    if checks[0].level == FAIL:
        return checks, None
    transport = ctx.transport(node.name)
    try:
        probe = await probe_node(transport, worker=engine.worker_lookup(node, transport.is_local))
    except TransportError as exc:
        checks.append(Check(node.name, "ssh", FAIL, exc.reason))
        return checks, None
    where = "this machine" if transport.is_local else "reachable, host key verified"
    checks.append(Check(node.name, "ssh", OK, f"{where} ({probe.os} {probe.arch}, "
                                             f"{probe.cores} cores)"))
    checks.extend(Check(node.name, "probe", WARN, e) for e in probe.errors)
    checks += await engine.node_checks(node, probe, probe.clock_offset_s)
    return checks, probe


async def run_doctor(ctx: EngineContext, engine: Engine) -> DoctorReport:
    checks = await engine.cluster_checks()
    nodes = engine.nodes()
    results = await asyncio.gather(*(_node_checks(ctx, engine, n) for n in nodes))
    probes: dict[str, NodeProbe] = {}
    node_checks: list[Check] = []
    for node, (found, probe) in zip(nodes, results, strict=True):
        node_checks.extend(found)
        if probe is not None:
            probes[node.name] = probe
    checks += node_checks + engine.summarize_checks(node_checks)
    return DoctorReport(tuple(checks), probes)
