"""Preflight: every check `up` needs to pass, per node, each failure a sentence with its fix."""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass

from . import detached
from .backends import llama_rpc
from .cluster import Cluster
from .config import NodeConfig
from .coordinator import CoordinatorError, coordinator_api_key, find_coordinator_binary
from .probe import NodeProbe, probe_node
from .transport import TransportError

CLOCK_TOLERANCE_S = 2.0  # Petals refuses peers more than a few seconds apart

OK, WARN, FAIL = "ok", "warning", "failed"


@dataclass(frozen=True)
class Check:
    part: str  # a node name or "coordinator"
    name: str  # "ssh", "binary", "clock", "port", "bind", "memory", ...
    level: str  # ok | warning | failed
    message: str


@dataclass(frozen=True)
class DoctorReport:
    checks: tuple[Check, ...]
    probes: dict[str, NodeProbe]

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.level == FAIL]

    def to_json(self) -> dict[str, object]:
        return {"ok": not self.failed,
                "checks": [c.__dict__ for c in self.checks],
                "nodes": {name: {"cores": p.cores, "ram_total_bytes": p.ram_total_bytes,
                                 "ram_available_bytes": p.ram_available_bytes,
                                 "gpus": [g.__dict__ for g in p.gpus],
                                 "clock_offset_s": round(p.clock_offset_s, 3),
                                 "worker_binary": p.worker_binary, "errors": list(p.errors)}
                          for name, p in self.probes.items()}}


def _bind_check(node: NodeConfig) -> Check:
    bind = llama_rpc.bind_address(node)
    if bind == "127.0.0.1":
        return Check(node.name, "bind", OK, "worker listens on the node's loopback only")
    if bind == "0.0.0.0":
        return Check(node.name, "bind", WARN,
                     "worker would listen on every address (0.0.0.0) and the llama.cpp RPC "
                     "protocol has no authentication: set rpc_bind = \"loopback\" (SSH tunnel) "
                     "or an address on a trusted network")
    if ipaddress.IPv4Address(bind).is_global:
        return Check(node.name, "bind", WARN,
                     f"worker would listen on the public address {bind} with no "
                     "authentication: set rpc_bind = \"loopback\"")
    return Check(node.name, "bind", OK, f"worker listens on {bind}")


async def _node_checks(cluster: Cluster, node: NodeConfig,
                       reference_offset: float) -> tuple[list[Check], NodeProbe | None]:
    checks = [_bind_check(node)]
    transport = cluster.transport(node.name)
    try:
        probe = await probe_node(transport)
    except TransportError as exc:
        checks.append(Check(node.name, "ssh", FAIL, exc.reason))
        return checks, None
    where = "this machine" if transport.is_local else "reachable, host key verified"
    checks.append(Check(node.name, "ssh", OK, f"{where} ({probe.os} {probe.arch}, "
                                             f"{probe.cores} cores)"))
    checks.extend(Check(node.name, "probe", WARN, e) for e in probe.errors)
    if probe.worker_binary:
        checks.append(Check(node.name, "binary", OK, probe.worker_binary))
    else:
        checks.append(Check(node.name, "binary", FAIL, llama_rpc.explain_resolve_error(
            node, "notexec" if node.rpc_server else "missing")))
    offset = probe.clock_offset_s - reference_offset
    if abs(offset) > CLOCK_TOLERANCE_S:
        checks.append(Check(node.name, "clock", FAIL,
                            f"clock is {offset:+.1f} s off this machine's: enable NTP there "
                            "(timedatectl set-ntp true, or chrony)"))
    else:
        checks.append(Check(node.name, "clock", OK, f"{offset:+.3f} s"))
    proc = await detached.status(transport, cluster.node_state_dir(node),
                                 llama_rpc.listen_address(node))
    if proc.state == "running":
        checks.append(Check(node.name, "port", OK, f"our worker runs there (pid {proc.pid})"))
    elif proc.port == "listening":
        checks.append(Check(node.name, "port", FAIL,
                            f"port {node.rpc_port} is taken by a program this cluster did not "
                            "start: stop it or set another rpc_port"))
    else:
        checks.append(Check(node.name, "port", OK, f"port {node.rpc_port} is free"))
    return checks, probe


async def run_doctor(cluster: Cluster) -> DoctorReport:
    config = cluster.config
    checks: list[Check] = []
    try:
        checks.append(Check("coordinator", "binary", OK, find_coordinator_binary(config)))
    except CoordinatorError as exc:
        checks.append(Check("coordinator", "binary", FAIL, str(exc)))
    try:
        key = coordinator_api_key(config)
        checks.append(Check("coordinator", "api-key", OK,
                            f"API key from ${config.coordinator.api_key_env}" if key else
                            f"no API key; the API listens on {config.coordinator.host} only"))
    except CoordinatorError as exc:
        checks.append(Check("coordinator", "api-key", FAIL, str(exc)))
    if config.model.gguf is None or not config.model.gguf.is_file():
        checks.append(Check("coordinator", "model", FAIL,
                            f"model file {config.model.gguf} not found: fix [model] gguf"))
    else:
        checks.append(Check("coordinator", "model", OK, str(config.model.gguf)))
    results = await asyncio.gather(*(_node_checks(cluster, n, 0.0) for n in config.nodes))
    probes: dict[str, NodeProbe] = {}
    for node, (node_checks, probe) in zip(config.nodes, results, strict=True):
        checks.extend(node_checks)
        if probe is not None:
            probes[node.name] = probe
    return DoctorReport(tuple(checks), probes)
