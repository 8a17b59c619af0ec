"""Preflight: every check `up` needs to pass, per node, each failure a sentence with its fix."""

from __future__ import annotations

import asyncio
import ipaddress
import os
from dataclasses import dataclass

from core.cluster import Cluster
from core.config import NodeConfig
from core.engines.llama_rpc import rpc as llama_rpc
from core.engines.llama_rpc import rpc_version
from core.engines.llama_rpc.coordinator import (
    CoordinatorError,
    coordinator_api_key,
    find_coordinator_binary,
)
from core.engines.llama_rpc.rpc import RpcVersion
from core.engines.petals import commands as petals_backend
from core.engines.petals import swarm as petals_swarm
from core.reach import detached
from core.reach.probe import NodeProbe, probe_node
from core.reach.shell import path_word
from core.reach.transport import Transport, TransportError

CLOCK_TOLERANCE_S = 2.0  # Petals refuses peers more than a few seconds apart
PETALS_CLOCK_FIX = "sync it with NTP (e.g. chronyc makestep, or timedatectl set-ntp true)"

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


def _petals_bind_check(node: NodeConfig) -> Check:
    try:
        host, port = petals_backend.listen_address(node)
    except ValueError as exc:
        return Check(node.name, "bind", FAIL, str(exc))
    if ipaddress.IPv4Address(host).is_global:
        return Check(node.name, "bind", WARN, f"the Petals server would listen on the public "
                                              f"address {host}:{port}: anyone can join or use "
                                              "the swarm")
    return Check(node.name, "bind", OK, f"the Petals server listens on {host}:{port}")


async def _petals_node_checks(cluster: Cluster, node: NodeConfig, transport: Transport,
                              probe: NodeProbe, offset: float) -> list[Check]:
    checks = []
    if abs(offset) > CLOCK_TOLERANCE_S:
        checks.append(Check(node.name, "clock", FAIL,
                            f"{node.name}'s clock is {offset:+.1f} s off this machine's, and "
                            "Petals peers refuse each other beyond a few seconds: "
                            + PETALS_CLOCK_FIX))
    else:
        checks.append(Check(node.name, "clock", OK, f"{offset:+.3f} s"))
    info = await petals_swarm.node_info(cluster, node)
    if info.error:
        checks.append(Check(node.name, "petals", FAIL, info.error))
    else:
        checks.append(Check(node.name, "petals", OK,
                            f"python {info.python}, petals {info.petals}, torch {info.torch}, "
                            f"hivemind {info.hivemind} ({petals_backend.node_python(node)})"))
    model = cluster.config.model.hf
    if model is not None:
        found = await transport.run(f"test -f {path_word(str(model / 'config.json'))} && "
                                    "echo TORBIZ-MODEL")
        if "TORBIZ-MODEL" in found.stdout:
            checks.append(Check(node.name, "model", OK, str(model)))
        else:
            checks.append(Check(node.name, "model", FAIL,
                                f"no {model}/config.json there: the model directory must be at "
                                "the same path on every Petals node ([model] hf)"))
    proc = await detached.status(transport, cluster.node_state_dir(node),
                                 petals_backend.listen_address(node))
    checks.append(_port_check(node, proc, "server"))
    return checks


def _same_petals_version(checks: list[Check]) -> list[Check]:
    versions = {c.part: c.message.split("petals ", 1)[1].split(",", 1)[0]
                for c in checks if c.name == "petals" and c.level == OK}
    if len(set(versions.values())) > 1:
        listed = ", ".join(f"{name} {version}" for name, version in sorted(versions.items()))
        return [Check("swarm", "petals", FAIL, f"the nodes run different Petals versions "
                                               f"({listed}): install the same one everywhere "
                                               "(scripts/petals-env.sh)")]
    if versions:
        return [Check("swarm", "petals", OK, f"every node runs petals "
                                             f"{next(iter(versions.values()))}")]
    return []


async def _protocol_check(node: NodeConfig, expected: RpcVersion | None) -> Check:
    """A running worker's RPC protocol from a real HELLO, against the coordinator's build.
    Only a worker no coordinator holds answers; one behind an SSH tunnel is checked when the
    coordinator starts (through the tunnel)."""
    if llama_rpc.bind_address(node) == "127.0.0.1" and node.transport != "local":
        return Check(node.name, "protocol", OK, "behind an SSH tunnel: its HELLO is checked "
                                                "when the coordinator starts")
    host, _, port = node.endpoint.rpartition(":")  # where the coordinator reaches it
    try:
        version = await llama_rpc.hello(host.strip("[]"), int(port))
    except llama_rpc.HelloError as exc:
        if str(exc) == "busy":
            return Check(node.name, "protocol", OK, "serving a coordinator now (a worker "
                                                    "answers one client at a time)")
        return Check(node.name, "protocol", FAIL, f"the worker did not answer an RPC HELLO "
                                                  f"({exc}): restart it (r)")
    if expected is None:
        return Check(node.name, "protocol", WARN, f"RPC protocol {version}; the coordinator's "
                                                  "build could not be told")
    if not rpc_version.compatible(expected, version):
        return Check(node.name, "protocol", FAIL,
                     rpc_version.mismatch_sentence(node.name, expected, version))
    return Check(node.name, "protocol", OK, f"RPC protocol {version} (coordinator {expected})")


async def _node_checks(cluster: Cluster, node: NodeConfig, reference_offset: float,
                       expected: RpcVersion | None = None
                       ) -> tuple[list[Check], NodeProbe | None]:
    if node.backend == "petals":
        checks = [_petals_bind_check(node)]
        if checks[0].level == FAIL:
            return checks, None
    else:
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
    if node.backend == "petals":
        checks += await _petals_node_checks(cluster, node, transport, probe,
                                            probe.clock_offset_s - reference_offset)
        return checks, probe
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
    checks.append(_port_check(node, proc, "worker"))
    if proc.state == "running" and proc.port == "listening":
        checks.append(await _protocol_check(node, expected))
    return checks, probe


def _port_check(node: NodeConfig, proc: detached.ProcessState, what: str) -> Check:
    if proc.state == "running":
        return Check(node.name, "port", OK, f"our {what} runs there (pid {proc.pid})")
    if proc.port == "listening":
        return Check(node.name, "port", FAIL, f"port {node.rpc_port} is taken by a program this "
                                              "cluster did not start: stop it or set another "
                                              "rpc_port")
    return Check(node.name, "port", OK, f"port {node.rpc_port} is free")


async def run_doctor(cluster: Cluster) -> DoctorReport:
    config = cluster.config
    checks: list[Check] = []
    if all(n.backend == "petals" for n in config.nodes):
        return await _run_petals_doctor(cluster)
    expected: RpcVersion | None = None
    try:
        binary = find_coordinator_binary(config)
        checks.append(Check("coordinator", "binary", OK, binary))
        expected = await rpc_version.coordinator_version(binary)
        checks.append(Check("coordinator", "protocol", OK, f"RPC protocol {expected}")
                      if expected else
                      Check("coordinator", "protocol", WARN, "cannot tell the RPC protocol of "
                            f"{binary} (no ggml-rpc.h nor rpc-server beside it): workers of "
                            "another llama.cpp build would fail only inside llama-server"))
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
    results = await asyncio.gather(*(_node_checks(cluster, n, 0.0, expected)
                                     for n in config.nodes))
    probes: dict[str, NodeProbe] = {}
    for node, (node_checks, probe) in zip(config.nodes, results, strict=True):
        checks.extend(node_checks)
        if probe is not None:
            probes[node.name] = probe
    return DoctorReport(tuple(checks), probes)


async def _run_petals_doctor(cluster: Cluster) -> DoctorReport:
    """A Petals cluster has no coordinator: this machine needs a Petals python (DHT monitor,
    generation client) and the model directory; every node its Petals environment, a clock
    within a few seconds of this machine's, and the same Petals version as the others."""
    config = cluster.config
    checks: list[Check] = []
    python = petals_swarm.local_python(config)
    if await asyncio.to_thread(os.path.isfile, python):
        checks.append(Check("this machine", "petals", OK, python))
    else:
        checks.append(Check("this machine", "petals", FAIL,
                            f"no Petals python at {python} (the DHT monitor and the client run "
                            "there): build it with scripts/petals-env.sh or set [petals] python"))
    model = config.model.hf
    if model is None or not await asyncio.to_thread((model / "config.json").is_file):
        checks.append(Check("this machine", "model", FAIL,
                            f"no model directory with a config.json at {model}: set [model] hf"))
    else:
        checks.append(Check("this machine", "model", OK, str(model)))
    results = await asyncio.gather(*(_node_checks(cluster, n, 0.0) for n in config.nodes))
    probes: dict[str, NodeProbe] = {}
    node_checks: list[Check] = []
    for node, (found, probe) in zip(config.nodes, results, strict=True):
        node_checks.extend(found)
        if probe is not None:
            probes[node.name] = probe
    checks += node_checks + _same_petals_version(node_checks)
    return DoctorReport(tuple(checks), probes)
