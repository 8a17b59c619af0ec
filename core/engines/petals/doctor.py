"""The doctor's Petals checks: this machine's Petals python and model directory; on each node
the bind address, its Petals environment, its clock (peers refuse each other a few seconds
apart), the model directory at the same path, the server port; the same version everywhere."""

from __future__ import annotations

import asyncio
import ipaddress
import os

from core.checks import FAIL, OK, Check
from core.config import ClusterConfig, NodeConfig
from core.engines.base import EngineContext, port_taken
from core.engines.petals import commands as petals_backend
from core.engines.petals.local import local_python
from core.reach import detached
from core.reach.shell import path_word

CLOCK_TOLERANCE_S = 2.0  # Petals refuses peers more than a few seconds apart
PETALS_CLOCK_FIX = "sync it with NTP (e.g. chronyc makestep, or timedatectl set-ntp true)"


def bind_check(node: NodeConfig) -> Check:
    try:
        host, port = petals_backend.listen_address(node)
    except ValueError as exc:
        return Check(node.name, "bind", FAIL, str(exc))
    if ipaddress.IPv4Address(host).is_global:
        return Check(node.name, "bind", "warning", f"the Petals server would listen on the "
                                                   f"public address {host}:{port}: anyone can "
                                                   "join or use the swarm")
    return Check(node.name, "bind", OK, f"the Petals server listens on {host}:{port}")


async def local_checks(config: ClusterConfig) -> list[Check]:
    """This machine runs the DHT monitor and the generation client in a Petals python."""
    checks: list[Check] = []
    python = local_python(config)
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
    return checks


async def node_checks(ctx: EngineContext, node: NodeConfig, info: petals_backend.PetalsNodeInfo,
                      offset: float) -> list[Check]:
    checks = []
    if abs(offset) > CLOCK_TOLERANCE_S:
        checks.append(Check(node.name, "clock", FAIL,
                            f"{node.name}'s clock is {offset:+.1f} s off this machine's, and "
                            "Petals peers refuse each other beyond a few seconds: "
                            + PETALS_CLOCK_FIX))
    else:
        checks.append(Check(node.name, "clock", OK, f"{offset:+.3f} s"))
    if info.error:
        checks.append(Check(node.name, "petals", FAIL, info.error))
    else:
        checks.append(Check(node.name, "petals", OK,
                            f"python {info.python}, petals {info.petals}, torch {info.torch}, "
                            f"hivemind {info.hivemind} ({petals_backend.node_python(node)})"))
    transport = ctx.transport(node.name)
    model = ctx.config.model.hf
    if model is not None:
        found = await transport.run(f"test -f {path_word(str(model / 'config.json'))} && "
                                    "echo TORBIZ-MODEL")
        if "TORBIZ-MODEL" in found.stdout:
            checks.append(Check(node.name, "model", OK, str(model)))
        else:
            checks.append(Check(node.name, "model", FAIL,
                                f"no {model}/config.json there: the model directory must be at "
                                "the same path on every Petals node ([model] hf)"))
    proc = await detached.status(transport, ctx.node_state_dir(node),
                                 petals_backend.listen_address(node))
    host, port = petals_backend.listen_address(node)
    if proc.state == "running":
        checks.append(Check(node.name, "port", OK, f"our server runs there (pid {proc.pid})"))
    elif proc.port == "listening":
        checks.append(Check(node.name, "port", FAIL, port_taken(host, port, "rpc_port")))
    else:
        checks.append(Check(node.name, "port", OK, f"port {port} is free"))
    return checks


def same_petals_version(checks: list[Check]) -> list[Check]:
    versions = {c.part: c.message.split("petals ", 1)[1].split(",", 1)[0]
                for c in checks
                if c.name == "petals" and c.level == OK and c.part != "this machine"}
    if len(set(versions.values())) > 1:
        listed = ", ".join(f"{name} {version}" for name, version in sorted(versions.items()))
        return [Check("swarm", "petals", FAIL, f"the nodes run different Petals versions "
                                               f"({listed}): install the same one everywhere "
                                               "(scripts/petals-env.sh)")]
    if versions:
        return [Check("swarm", "petals", OK, f"every node runs petals "
                                             f"{next(iter(versions.values()))}")]
    return []
