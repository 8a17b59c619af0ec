"""The doctor's llama.cpp checks: this machine's llama-server, the API key and the model; on
each node the worker binary, the clock, the port, the bind address and the RPC protocol."""

from __future__ import annotations

import ipaddress

from core.checks import FAIL, OK, WARN, Check
from core.config import ClusterConfig, NodeConfig
from core.engines.base import EngineContext, EngineError
from core.engines.llama_rpc import cache_ops, rpc_version, warm
from core.engines.llama_rpc import rpc as llama_rpc
from core.engines.llama_rpc.coordinator import (
    CoordinatorError,
    coordinator_api_key,
    find_coordinator_binary,
)
from core.engines.llama_rpc.rpc import RpcVersion
from core.reach import detached
from core.reach.probe import NodeProbe
from core.reach.transport import TransportError

CLOCK_TOLERANCE_S = 2.0


def bind_check(node: NodeConfig) -> Check:
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


async def coordinator_checks(config: ClusterConfig) -> list[Check]:
    checks: list[Check] = []
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
    return checks


async def _expected_version(config: ClusterConfig) -> RpcVersion | None:
    try:
        return await rpc_version.coordinator_version(find_coordinator_binary(config))
    except CoordinatorError:
        return None


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


def port_check(node: NodeConfig, proc: detached.ProcessState, what: str) -> Check:
    if proc.state == "running":
        return Check(node.name, "port", OK, f"our {what} runs there (pid {proc.pid})")
    if proc.port == "listening":
        return Check(node.name, "port", FAIL, f"port {node.rpc_port} is taken by a program this "
                                              "cluster did not start: stop it or set another "
                                              "rpc_port")
    return Check(node.name, "port", OK, f"port {node.rpc_port} is free")


async def node_checks(ctx: EngineContext, node: NodeConfig, probe: NodeProbe,
                      offset: float) -> list[Check]:
    checks: list[Check] = []
    if probe.worker_binary:
        checks.append(Check(node.name, "binary", OK, probe.worker_binary))
    else:
        checks.append(Check(node.name, "binary", FAIL, llama_rpc.explain_resolve_error(
            node, "notexec" if node.rpc_server else "missing")))
    if abs(offset) > CLOCK_TOLERANCE_S:
        checks.append(Check(node.name, "clock", FAIL,
                            f"clock is {offset:+.1f} s off this machine's: enable NTP there "
                            "(timedatectl set-ntp true, or chrony)"))
    else:
        checks.append(Check(node.name, "clock", OK, f"{offset:+.3f} s"))
    proc = await detached.status(ctx.transport(node.name), ctx.node_state_dir(node),
                                 llama_rpc.listen_address(node))
    checks.append(port_check(node, proc, "worker"))
    if proc.state == "running" and proc.port == "listening":
        checks.append(await _protocol_check(node, await _expected_version(ctx.config)))
    cache = await cache_check(ctx, node)
    if cache is not None:
        checks.append(cache)
    return checks


async def cache_check(ctx: EngineContext, node: NodeConfig) -> Check | None:
    """The size check the worker's start runs, read-only: cache files of the model whose size
    is not their tensor's (a truncated one is loaded silently, an oversized one crashes the
    worker). Nothing is moved here; `cache warm` moves them aside and refills."""
    if not node.cache or ctx.config.model.gguf is None or not ctx.config.model.gguf.is_file():
        return None
    state_dir = ctx.node_state_dir(node)
    try:
        manifest = await cache_ops.manifest_of(ctx)
        listing = await warm.list_cache(ctx.transport(node.name), state_dir)
    except EngineError as exc:
        return Check(node.name, "cache", WARN, f"cannot check its weight cache: {exc}")
    except TransportError:
        return None  # the node's other checks say it cannot be reached
    bad = warm.wrong_sizes(manifest, listing)
    if bad:
        return Check(node.name, "cache", WARN,
                     f"{len(bad)} cache file(s) of the model have the wrong size ("
                     + "; ".join(bad[h] for h in sorted(bad)[:3])
                     + ("; ..." if len(bad) > 3 else "")
                     + f") in {warm.cache_dir(state_dir)}: run `torbiz-tui cache warm "
                     f"{node.name}` (moves them aside and refills; the next start would "
                     "move them aside too)")
    wanted = manifest.by_hash()
    good = sum(1 for h, size in listing.files.items() if h in wanted and wanted[h].size == size)
    return Check(node.name, "cache", OK, f"{good} tensor(s) of the model cached, sizes right"
                 if listing.exists else "no weight cache yet (`torbiz-tui cache warm` fills it)")
