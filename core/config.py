"""Load and validate the cluster file (TOML); every error names the file, the table and the key."""

from __future__ import annotations

import ipaddress
import math
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from core.config_checks import (
    NAME_RE,
    check_host,
    check_keys,
    check_name,
    check_path,
    check_port,
    check_positive,
    expect_table,
    is_valid_host,
    local_file,
)
from core.config_model import (  # re-exported: the loader's result types
    BACKENDS,
    DEFAULT_COORDINATOR_PORT,
    DEFAULT_RPC_PORT,
    DEFAULT_STATE_DIR,
    PETALS_DTYPES,
    TRANSPORTS,
    ClusterConfig,
    ConfigError,
    CoordinatorConfig,
    ModelConfig,
    NodeConfig,
    PetalsConfig,
    PlanConfig,
    SshOptions,
)
from core.peer_address import valid_multiaddr

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib




_SSH_KEYS: dict[str, tuple[type, ...]] = {
    "user": (str,),
    "identity_file": (str,),
    "known_hosts": (str,),
    "config_file": (str,),
    "connect_timeout": (int, float),
    "keepalive_interval": (int, float),
    "keepalive_count_max": (int,),
    "status_timeout": (int, float),
}
_CLUSTER_KEYS: dict[str, tuple[type, ...]] = {"name": (str,), "state_dir": (str,),
                                              "recover": (bool,)}
_MODEL_KEYS: dict[str, tuple[type, ...]] = {"gguf": (str,), "context": (int,), "hf": (str,)}
_PETALS_KEYS: dict[str, tuple[type, ...]] = {
    "dht_prefix": (str,),
    "torch_dtype": (str,),
    "num_handlers": (int,),
    "throughput": (int, float),
    "attn_cache_tokens": (int,),
    "initial_peers": (list,),
    "python": (str,),
}
_COORDINATOR_KEYS: dict[str, tuple[type, ...]] = {
    "binary": (str,),
    "host": (str,),
    "port": (int,),
    "extra_args": (list,),
    "api_key_env": (str,),
    "threads": (int,),
}
_NODE_KEYS: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "host": (str,),
    "ssh_port": (int,),
    "transport": (str,),
    "backend": (str,),
    "rpc_server": (str,),
    "rpc_host": (str,),
    "rpc_port": (int,),
    "rpc_bind": (str,),
    "threads": (int,),
    "cache": (bool,),
    "reserve_gb": (int, float),
    "max_memory_gb": (int, float),
    "weight": (int, float),
    "python": (str,),
    "model_path": (str,),
    "cache_limit_gb": (int, float),
    **_SSH_KEYS,
}
_PLAN_KEYS: dict[str, tuple[type, ...]] = {
    "policy": (str,),
    "reserve_gb": (int, float),
    "cache_type": (str,),
    "coordinator_layers": (bool,),
    "prewarm": (bool,),
    "standby": (list,),
}

POLICIES = ("pack", "spread", "fastest")  # fastest: by measured speed (core/planning/fastest.py)
CACHE_TYPES = ("f16", "f32", "q8_0", "q4_0")
_TOP_KEYS = {"cluster", "ssh", "model", "coordinator", "plan", "nodes", "petals"}
def _ssh_options(path: Path, where: str, table: dict[str, Any], base: SshOptions) -> SshOptions:
    values = {k: table[k] for k in _SSH_KEYS if k in table}
    if values.get("config_file") == "":
        values["config_file"] = None  # "" switches ~/.ssh/config off
    if values.get("known_hosts") == "":
        raise ConfigError(path, where, "key 'known_hosts' must be a file: host keys are always "
                                       "verified against it (an empty one fails every connection)")
    if values.get("identity_file") == "":
        raise ConfigError(path, where, "key 'identity_file' must be a private key's path (leave "
                                       "it out to use ssh-agent and the default keys)")
    for key in ("identity_file", "known_hosts", "config_file"):
        if values.get(key) is not None:
            check_path(path, where, key, values[key], local=True)
    for key in ("connect_timeout", "keepalive_interval", "keepalive_count_max",
                "status_timeout"):
        if key in values:
            check_positive(path, where, key, values[key])
    if "status_timeout" in values:
        values["status_timeout"] = float(values["status_timeout"])
    if "connect_timeout" in values:
        values["connect_timeout"] = float(values["connect_timeout"])
    if "keepalive_interval" in values:
        values["keepalive_interval"] = float(values["keepalive_interval"])
    return replace(base, **values)


def _check_env_name(path: Path, name: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", name):
        raise ConfigError(path, "coordinator", "key 'api_key_env' must name an environment "
                                               f"variable (letters, digits, _), got {name!r}")
    return name


def _float_or_none(value: float | None) -> float | None:
    return None if value is None else float(value)


def _plan(path: Path, table: dict[str, Any]) -> PlanConfig:
    check_keys(path, "plan", table, _PLAN_KEYS)
    policy = table.get("policy", PlanConfig.policy)
    if policy not in POLICIES:
        raise ConfigError(path, "plan", f"key 'policy' must be one of {', '.join(POLICIES)}, "
                                        f"got {policy!r}")
    cache_type = table.get("cache_type", "f16")
    if cache_type not in CACHE_TYPES:
        raise ConfigError(path, "plan", f"key 'cache_type' must be one of "
                                        f"{', '.join(CACHE_TYPES)}, got {cache_type!r}")
    reserve = table.get("reserve_gb")
    if reserve is not None:
        check_positive(path, "plan", "reserve_gb", reserve, allow_zero=True)
    return PlanConfig(policy=policy, reserve_gb=_float_or_none(reserve), cache_type=cache_type,
                      coordinator_layers=table.get("coordinator_layers", True),
                      prewarm=table.get("prewarm", False),
                      standby=_standby(path, table.get("standby", [])))


def _standby(path: Path, names: list[Any]) -> tuple[str, ...]:
    if not all(isinstance(n, str) for n in names):
        raise ConfigError(path, "plan", "key 'standby' must be a list of node names")
    return tuple(names)


_DHT_PREFIX_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}\Z")


def _petals(path: Path, table: dict[str, Any]) -> PetalsConfig:
    check_keys(path, "petals", table, _PETALS_KEYS)
    prefix = table.get("dht_prefix", "")
    if prefix and not _DHT_PREFIX_RE.fullmatch(prefix):
        raise ConfigError(path, "petals", "key 'dht_prefix' must be 1-63 letters, digits, '_' or "
                                          f"'-', got {prefix!r}")
    dtype = table.get("torch_dtype", "float32")
    if dtype not in PETALS_DTYPES:
        raise ConfigError(path, "petals", f"key 'torch_dtype' must be one of "
                                          f"{', '.join(PETALS_DTYPES)}, got {dtype!r}")
    for key, low, high in (("num_handlers", 1, 64), ("attn_cache_tokens", 1, 1 << 22)):
        value = table.get(key)
        if value is not None and not low <= value <= high:
            raise ConfigError(path, "petals", f"key {key!r} must be between {low} and {high}, "
                                              f"got {value}")
    throughput = float(table.get("throughput", 1.0))
    if not (math.isfinite(throughput) and throughput > 0):
        raise ConfigError(path, "petals", f"key 'throughput' must be a number greater than 0, "
                                          f"got {throughput}")
    peers = table.get("initial_peers", [])
    for peer in peers:
        if not isinstance(peer, str) or not valid_multiaddr(peer):
            raise ConfigError(path, "petals", "key 'initial_peers' must list multiaddrs like "
                                              f"/ip4/10.0.0.5/tcp/31337/p2p/Qm..., got {peer!r}")
    python = table.get("python") or None
    if python is not None:
        check_path(path, "petals", "python", python, local=True)
    return PetalsConfig(dht_prefix=prefix, torch_dtype=dtype,
                        num_handlers=table.get("num_handlers", 2), throughput=throughput,
                        attn_cache_tokens=table.get("attn_cache_tokens", 8192),
                        initial_peers=tuple(peers), python=python)


def _node(path: Path, index: int, table: dict[str, Any], ssh: SshOptions) -> NodeConfig:
    where = f"nodes[{index}]"
    raw_name = table.get("name")
    if isinstance(raw_name, str) and NAME_RE.fullmatch(raw_name):
        where = f"nodes[{index}] ({raw_name})"
    check_keys(path, where, table, _NODE_KEYS)
    for key in ("name", "host"):
        if key not in table:
            raise ConfigError(path, where, f"missing required key {key!r}")
    name = check_name(path, where, "name", table["name"])
    host = check_host(path, where, "host", table["host"])
    transport = table.get("transport", "ssh")
    if transport not in TRANSPORTS:
        raise ConfigError(path, where, f"key 'transport' must be one of {', '.join(TRANSPORTS)}, "
                                       f"got {transport!r}")
    backend = table.get("backend", "llama-rpc")
    if backend not in BACKENDS:
        raise ConfigError(path, where, f"key 'backend' must be one of {', '.join(BACKENDS)}, "
                                       f"got {backend!r}")
    rpc_host = table.get("rpc_host", "")
    if rpc_host:
        check_host(path, where, "rpc_host", rpc_host)
    rpc_bind = table.get("rpc_bind", "auto")
    if rpc_bind not in ("auto", "loopback", "any"):
        try:
            ipaddress.IPv4Address(rpc_bind)
        except ValueError:
            raise ConfigError(path, where, "key 'rpc_bind' must be auto, loopback, any or an "
                                           f"IPv4 address, got {rpc_bind!r}") from None
    if rpc_bind == "loopback" and transport == "local":
        raise ConfigError(path, where, "rpc_bind = loopback tunnels over SSH: it needs "
                                       "transport = ssh (a local worker is on loopback already)")
    threads = table.get("threads")
    if threads is not None:
        check_positive(path, where, "threads", threads)
    for key in ("max_memory_gb", "weight"):
        if key in table:
            check_positive(path, where, key, table[key])
    if "reserve_gb" in table:
        check_positive(path, where, "reserve_gb", table["reserve_gb"], allow_zero=True)
    rpc_server = table.get("rpc_server")
    if rpc_server is not None:
        check_path(path, where, "rpc_server", rpc_server, local=transport == "local")
    python = table.get("python")
    if python is not None:
        check_path(path, where, "python", python, local=transport == "local")
    ssh_options = _ssh_options(path, where, table, ssh)
    _check_listen(path, where, backend, transport, rpc_bind, rpc_host or host)
    return NodeConfig(
        name=name,
        host=host,
        ssh_port=check_port(path, where, "ssh_port", table.get("ssh_port", 22)),
        transport=transport,
        backend=backend,
        rpc_server=rpc_server,
        rpc_host=rpc_host,
        rpc_port=check_port(path, where, "rpc_port", table.get("rpc_port", DEFAULT_RPC_PORT)),
        rpc_bind=rpc_bind,
        threads=threads,
        cache=table.get("cache", True),
        reserve_gb=_float_or_none(table.get("reserve_gb")),
        max_memory_gb=_float_or_none(table.get("max_memory_gb")),
        weight=float(table.get("weight", 1.0)),
        python=python,
        model_path=table.get("model_path"),
        cache_limit_gb=_float_or_none(table.get("cache_limit_gb")),
        ssh=ssh_options,
    )


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def _check_listen(path: Path, where: str, backend: str, transport: str, rpc_bind: str,
                  address: str) -> None:
    """A server listens on one IPv4 address: the node's own, or every interface only when
    rpc_bind says so (the llama.cpp RPC protocol has no authentication)."""
    if _is_ipv4(address):
        return
    if backend == "petals":
        raise ConfigError(path, where, "a Petals node needs an IPv4 address in host or rpc_host "
                                       "(the swarm announces it to its peers), got "
                                       f"{address!r}")
    if transport == "ssh" and rpc_bind == "auto":
        raise ConfigError(path, where, f"host {address!r} is not an IPv4 address, and rpc-server "
                                       "listens on one address or on all of them: set rpc_host "
                                       "to this node's IPv4 address on the network the "
                                       "coordinator uses, rpc_bind = \"loopback\" to reach it "
                                       "through an SSH tunnel, or rpc_bind = \"any\" to listen "
                                       "on every interface (no authentication: trusted "
                                       "networks only)")


# llama-server options torbiz sets itself (a later copy on its command line would win), and the
# setting that controls each instead. `--x_y` is read as `--x-y` by llama.cpp.
_MANAGED_OPTIONS: dict[str, str] = {
    **dict.fromkeys(("--host",), "[coordinator] host"),
    **dict.fromkeys(("--port",), "[coordinator] port"),
    **dict.fromkeys(("-m", "--model", "-mu", "--model-url", "-hf", "-hfr", "--hf-repo", "-hff",
                     "--hf-file", "-dr", "--docker-repo"), "[model] gguf"),
    **dict.fromkeys(("-c", "--ctx-size"), "[model] context"),
    **dict.fromkeys(("--rpc",), "the [[nodes]] tables"),
    **dict.fromkeys(("--api-key", "--api-key-file"),
                    "[coordinator] api_key_env (the environment variable holding the key)"),
    **dict.fromkeys(("-ngl", "--gpu-layers", "--n-gpu-layers", "-ts", "--tensor-split", "-fit",
                     "--fit", "-sm", "--split-mode"), "the plan ([plan] and the nodes' budgets)"),
    **dict.fromkeys(("--metrics", "--slots", "--no-slots"),
                    "nothing: torbiz always turns it on (its monitoring reads /metrics and "
                    "/slots)"),
    **dict.fromkeys(("--log-file", "-lv", "--verbosity", "--log-verbosity", "--log-disable",
                     "-v", "--verbose", "--log-verbose"),
                    "nothing: torbiz sets llama-server's log (the layer map reads it, and more "
                    "verbose levels print secrets)"),
}


def managed_coordinator_option(arg: str) -> str | None:
    """A sentence when `arg` (one llama-server argument) is an option torbiz manages, with
    the setting to use instead; None for anything else."""
    if not arg.startswith("-"):
        return None
    name = arg.split("=", 1)[0]
    if name.startswith("--"):
        name = name.replace("_", "-")
    instead = _MANAGED_OPTIONS.get(name)
    if instead is None:
        return None
    return (f"key 'extra_args' sets {arg.split('=', 1)[0]}, which torbiz manages: use "
            f"{instead}")


def parse_config(data: dict[str, Any], path: Path) -> ClusterConfig:
    """Validate an already-parsed TOML document; `path` is used in messages and to resolve paths."""
    for key in data:
        if key not in _TOP_KEYS:
            raise ConfigError(path, "", f"unknown table {key!r} "
                                        f"(allowed: {', '.join(sorted(_TOP_KEYS))})")
    cluster = expect_table(path, "cluster", data.get("cluster", {}))
    check_keys(path, "cluster", cluster, _CLUSTER_KEYS)
    name = check_name(path, "cluster", "name", cluster.get("name", "default"))
    state_dir = check_path(path, "cluster", "state_dir",
                            cluster.get("state_dir", DEFAULT_STATE_DIR), local=False)

    ssh_table = expect_table(path, "ssh", data.get("ssh", {}))
    check_keys(path, "ssh", ssh_table, _SSH_KEYS)
    ssh = _ssh_options(path, "ssh", ssh_table, SshOptions())

    model_table = expect_table(path, "model", data.get("model", {}))
    check_keys(path, "model", model_table, _MODEL_KEYS)
    gguf = model_table.get("gguf")
    gguf_path = None if gguf is None else local_file(path, "model", "gguf", gguf)
    context = model_table.get("context", 4096)
    check_positive(path, "model", "context", context)
    hf = model_table.get("hf")
    hf_path = None if hf is None else local_file(path, "model", "hf", hf)
    model = ModelConfig(gguf=gguf_path, context=context, hf=hf_path)

    coord_table = expect_table(path, "coordinator", data.get("coordinator", {}))
    check_keys(path, "coordinator", coord_table, _COORDINATOR_KEYS)
    extra = coord_table.get("extra_args", [])
    if not all(isinstance(a, str) for a in extra):
        raise ConfigError(path, "coordinator", "key 'extra_args' must be a list of strings")
    for arg in extra:
        managed = managed_coordinator_option(arg)
        if managed:
            raise ConfigError(path, "coordinator", managed)
    binary = coord_table.get("binary")
    if binary is not None:
        check_path(path, "coordinator", "binary", binary, local=True)
    coordinator_threads = coord_table.get("threads")
    if coordinator_threads is not None:
        check_positive(path, "coordinator", "threads", coordinator_threads)
    coordinator = CoordinatorConfig(
        binary=binary,
        host=check_host(path, "coordinator", "host", coord_table.get("host", "127.0.0.1")),
        port=check_port(path, "coordinator", "port",
                         coord_table.get("port", DEFAULT_COORDINATOR_PORT)),
        extra_args=tuple(extra),
        api_key_env=_check_env_name(path, coord_table.get("api_key_env", "TORBIZ_API_KEY")),
        threads=coordinator_threads,
    )

    plan = _plan(path, expect_table(path, "plan", data.get("plan", {})))
    petals = _petals(path, expect_table(path, "petals", data.get("petals", {})))

    raw_nodes = data.get("nodes", [])
    if not isinstance(raw_nodes, list):
        raise ConfigError(path, "nodes", "must be an array of tables: write each node as "
                                         "[[nodes]]")
    if not raw_nodes:
        raise ConfigError(path, "nodes", "no nodes: add at least one [[nodes]] table")
    nodes = []
    names: dict[str, int] = {}
    endpoints: dict[tuple[str, int], str] = {}
    for index, raw in enumerate(raw_nodes):
        node = _node(path, index, expect_table(path, f"nodes[{index}]", raw), ssh)
        if node.name in names:
            raise ConfigError(path, f"nodes[{index}] ({node.name})",
                              f"duplicate node name {node.name!r} (also nodes[{names[node.name]}])")
        names[node.name] = index
        # Two workers on one host and port would fight for the socket.
        endpoint = (node.rpc_host or node.host, node.rpc_port)
        if endpoint in endpoints:
            raise ConfigError(path, f"nodes[{index}] ({node.name})",
                              f"duplicate endpoint {node.endpoint}: node {endpoints[endpoint]!r} "
                              "already uses it; give one of them another rpc_port")
        endpoints[endpoint] = node.name
        nodes.append(node)
    if len({n.backend for n in nodes}) > 1:
        raise ConfigError(path, "nodes", "mixes llama-rpc and petals nodes: a cluster is one "
                                         "backend (use one cluster file per backend)")
    unknown = [n for n in plan.standby if n not in {node.name for node in nodes}]
    if unknown:
        raise ConfigError(path, "plan", f"key 'standby' names {', '.join(unknown)}, not a node "
                                        "of this cluster")
    return ClusterConfig(name=name, state_dir=state_dir, model=model, coordinator=coordinator,
                         nodes=tuple(nodes), ssh=ssh, plan=plan, source=path, petals=petals,
                         recover=cluster.get("recover", True))


def load_config(path: Path | str) -> ClusterConfig:
    path = Path(path).expanduser()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(path, "", "file not found; pass -c PATH or set $TORBIZ_CONFIG") from None
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(path, "", "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", f"invalid TOML: {exc}") from None
    return parse_config(data, path.resolve())


__all__ = [
    "BACKENDS",
    "ClusterConfig",
    "ConfigError",
    "CoordinatorConfig",
    "DEFAULT_COORDINATOR_PORT",
    "DEFAULT_RPC_PORT",
    "DEFAULT_STATE_DIR",
    "ModelConfig",
    "NodeConfig",
    "PETALS_DTYPES",
    "PetalsConfig",
    "PlanConfig",
    "SshOptions",
    "TRANSPORTS",
    "is_valid_host",
    "load_config",
    "managed_coordinator_option",
    "parse_config",
]
