"""The llama.cpp coordinator: `llama-server --rpc ...` started detached on this machine."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import httpx

from core.config import ClusterConfig, NodeConfig, managed_coordinator_option
from core.engines.llama_rpc.build import COORDINATOR_NAME, find_cached_binary
from core.reach import detached
from core.reach.transport import LocalTransport
from core.status import FAILED, NOT_RESPONDING, READY, STARTING, STOPPED, CoordinatorStatus
from core.supervision.load_log import tensor_split_for

COORDINATOR_DIR = "_coordinator"  # node names start with a letter or digit, so never collide


class CoordinatorError(Exception):
    pass


def coordinator_url(config: ClusterConfig) -> str:
    host = config.coordinator.host
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.coordinator.port}"


def coordinator_state_dir(config: ClusterConfig) -> str:
    return f"{config.state_dir.rstrip('/')}/{config.name}/{COORDINATOR_DIR}"


def local_transport(env: dict[str, str] | None = None) -> LocalTransport:
    return LocalTransport(NodeConfig(name="coordinator", host="127.0.0.1", transport="local"),
                          env)


def listens_on_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def api_exposure(config: ClusterConfig) -> str | None:
    """A sentence when the coordinator's API listens beyond this machine's loopback."""
    host = config.coordinator.host
    if listens_on_loopback(host):
        return None
    where = "every interface of this machine" if host in ("0.0.0.0", "::") else host
    return (f"the coordinator's API listens on {where}, port {config.coordinator.port}, in "
            f"plain HTTP: the API key in ${config.coordinator.api_key_env} guards it, but "
            "prompts, answers and the key cross the network unencrypted; [coordinator] host = "
            "\"127.0.0.1\" keeps it on this machine")


# Printable ASCII but space, '"' and ',': llama-server reads its keys as one CSV row (a comma
# splits a key in two, a quote starts quoting) and an HTTP header carries the key as is.
_KEY_TEXT = re.compile(r"[!#-+\--~]+\Z")


def check_api_key(name: str, key: str) -> None:
    """Refuse a key llama-server or an HTTP header would read as something else."""
    if "," in key:
        raise CoordinatorError(
            f"the API key in ${name} contains a comma: llama-server splits its keys at commas "
            "and would accept each part alone; choose a key without commas (e.g. `openssl "
            "rand -hex 32`)")
    if not _KEY_TEXT.match(key):
        raise CoordinatorError(
            f"the API key in ${name} contains a space, a double quote, a control or a non-ASCII "
            "character, which llama-server or an HTTP header would read otherwise: choose one "
            "of letters, digits and punctuation (e.g. `openssl rand -hex 32`)")


def coordinator_env(config: ClusterConfig) -> dict[str, str] | None:
    """llama-server's environment: the API key (never on a command line), given twice. With
    one key llama-server logs its last four characters at -lv 4 (`api_keys: ****WXYZ`), and
    torbiz needs -lv 4 for the load log; with two it logs `2 keys loaded`."""
    key = coordinator_api_key(config)
    return {"LLAMA_API_KEY": f"{key},{key}"} if key else None


def coordinator_api_key(config: ClusterConfig) -> str | None:
    """The API key from the environment; required when the API leaves this machine."""
    name = config.coordinator.api_key_env
    key = os.environ.get(name) or None
    if key is not None:
        check_api_key(name, key)
    if key is None and not listens_on_loopback(config.coordinator.host):
        raise CoordinatorError(
            f"the coordinator would listen on {config.coordinator.host} with no API key: "
            f"export {name}=<a long random secret> before starting it (never put the key in "
            "the config file), or set [coordinator] host = \"127.0.0.1\"")
    return key


def auth_headers(config: ClusterConfig) -> dict[str, str]:
    key = os.environ.get(config.coordinator.api_key_env)
    return {"Authorization": f"Bearer {key}"} if key else {}


def find_coordinator_binary(config: ClusterConfig) -> str:
    configured = config.coordinator.binary
    if configured:
        path = Path(configured).expanduser()
        if not (path.is_file() and path.stat().st_mode & 0o111):
            raise CoordinatorError(f"coordinator binary {path} is not an executable file: fix "
                                   "[coordinator] binary in the config")
        return str(path)
    found = shutil.which(COORDINATOR_NAME) or find_cached_binary(COORDINATOR_NAME)
    if not found:
        raise CoordinatorError("llama-server not found on this machine: run `torbiz-tui "
                               "build-llama`, or set [coordinator] binary in the config")
    return str(found)


def coordinator_argv(config: ClusterConfig, binary: str, endpoints: Sequence[str],
                     extra: Sequence[str] = (), layers: Sequence[int] | None = None) -> list[str]:
    """llama-server's command line. With `layers` (blocks per endpoint, in order), it places
    exactly those: -ngl/-ts from tensor_split_for and --fit off; blocks left over stay on this
    machine's CPU (the first ones). Without, llama.cpp splits by the free memory workers
    report (-ngl 99). Options torbiz manages (--host, --api-key, -ngl ...) are refused in
    `extra` and [coordinator] extra_args: a later copy would win over torbiz's own."""
    if config.model.gguf is None:
        raise CoordinatorError("no model: set [model] gguf in the config")
    for arg in (*extra, *config.coordinator.extra_args):
        managed = managed_coordinator_option(arg)
        if managed:
            raise CoordinatorError(f"[coordinator] {managed}")
    argv = [
        binary,
        "-m", str(config.model.gguf),
        "-c", str(config.model.context),
        "--host", config.coordinator.host,
        "--port", str(config.coordinator.port),
        *placement_args(layers),
        "--metrics",
        "--slots",
        "-lv", "4",  # device and buffer lines in the log: the layer map comes from them
    ]
    if config.coordinator.threads is not None:
        argv += ["-t", str(config.coordinator.threads)]
    if endpoints:
        argv += ["--rpc", ",".join(endpoints)]
    argv += list(extra)
    argv += list(config.coordinator.extra_args)
    return argv


def placement_args(layers: Sequence[int] | None) -> list[str]:
    if layers is None:
        return ["-ngl", "99"]
    if not layers:  # the plan keeps every block on this machine's CPU: no worker, no split
        return ["-ngl", "0", "--fit", "off"]
    ngl, split = tensor_split_for(layers)
    return ["-ngl", str(ngl), "-ts", ",".join(str(w) for w in split), "--fit", "off"]


REFUSED = ("ConnectError",)  # nothing listens (yet): it is still starting


async def health(url: str, timeout: float = 2.0) -> tuple[int | None, str]:
    """(HTTP status, body) of GET /health, or (None, reason) when nothing answers."""
    try:
        async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
            response = await client.get(f"{url}/health")
            return response.status_code, response.text[:500]
    except httpx.HTTPError as exc:
        return None, exc.__class__.__name__


async def coordinator_status(config: ClusterConfig) -> CoordinatorStatus:
    url = coordinator_url(config)
    proc = await detached.status(local_transport(), coordinator_state_dir(config))
    if proc.state == "none":
        return CoordinatorStatus(STOPPED, url)
    if proc.state == "dead":
        tail = await detached.log_tail(local_transport(), coordinator_state_dir(config), 30)
        return CoordinatorStatus(FAILED, url, proc.pid, explain_coordinator_log(tail))
    code, why = await health(url)
    return status_from_health(url, proc.pid, code, why, proc.elapsed_s)


def status_from_health(url: str, pid: int | None, code: int | None, why: str,
                       elapsed_s: float | None) -> CoordinatorStatus:
    """What its endpoint answers is its state: `ready` only on 200; `starting` (loading, with
    the seconds) on 503 or while its port is not open yet; `not responding` when a connection
    is accepted but no answer comes."""
    if code == 200:
        return CoordinatorStatus(READY, url, pid)
    if code is None and why not in REFUSED:
        return CoordinatorStatus(NOT_RESPONDING, url, pid,
                                 f"its /health did not answer ({why}): llama-server is stuck, "
                                 "likely on a worker that stopped answering")
    if code not in (None, 503):
        return CoordinatorStatus(STARTING, url, pid, f"its /health answered HTTP {code}",
                                 loading_s=elapsed_s)
    return CoordinatorStatus(STARTING, url, pid, loading_s=elapsed_s)


def explain_coordinator_log(lines: list[str]) -> str:
    text = "\n".join(lines)
    if "couldn't bind" in text or "Address already in use" in text:
        return "its HTTP port is already in use: set [coordinator] port"
    if "failed to load model" in text or "error loading model" in text:
        hits = [ln for ln in lines if "error" in ln.lower() or "failed" in ln.lower()]
        return "failed to load the model: " + (hits[0][:200] if hits else "see its log")
    if "RPC server version mismatch" in text:
        return "a worker speaks another RPC protocol version: build workers and coordinator " \
               "from the same llama.cpp"
    meaningful = [ln for ln in lines if ln.strip() and not ln.startswith("torbiz-start")]
    return ("exited: " + meaningful[-1][:200]) if meaningful else "exited without a message"
