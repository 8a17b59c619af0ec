"""Load and validate the cluster file (TOML); every error names the file, the table and the key."""

from __future__ import annotations

import ipaddress
import math
import os
import re
import sys
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from core.peer_address import valid_multiaddr

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

BACKENDS = ("llama-rpc", "petals")
TRANSPORTS = ("ssh", "local")
DEFAULT_RPC_PORT = 50052
DEFAULT_COORDINATOR_PORT = 8080
DEFAULT_STATE_DIR = "~/.torbiz"

# Patterns are used with fullmatch and end in \Z: `$` would also match before a final newline.
# Names become directory names on nodes: keep them boring.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")
# A DNS name (labels of letters, digits, hyphens), never starting with "-" (ssh option injection).
_HOSTNAME_RE = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?\Z"
)


class ConfigError(Exception):
    """A problem in the cluster file, phrased for the operator."""

    def __init__(self, path: Path | str, where: str, message: str) -> None:
        self.path = str(path)
        self.where = where
        self.message = message
        location = f"{self.path}: [{where}]" if where else self.path
        super().__init__(f"{location}: {message}")


@dataclass(frozen=True)
class SshOptions:
    user: str | None = None
    identity_file: str | None = None
    known_hosts: str = "~/.ssh/known_hosts"
    config_file: str | None = "~/.ssh/config"
    # A frozen or cut-off node is noticed within about 4 s (keepalive 1 s x 3), and one that
    # accepts TCP but never sends the SSH banner within connect_timeout.
    connect_timeout: float = 5.0
    keepalive_interval: float = 1.0
    keepalive_count_max: int = 3
    status_timeout: float = 3.0  # deadline of one status check; past it: `not responding`


@dataclass(frozen=True)
class ModelConfig:
    gguf: Path | None = None
    context: int = 4096
    hf: Path | None = None  # a transformers model directory: what Petals nodes serve


PETALS_DTYPES = ("float32", "bfloat16")  # CPU-safe: Petals refuses float16 on CPU


@dataclass(frozen=True)
class PetalsConfig:
    """The private swarm of the cluster's backend = "petals" nodes."""

    dht_prefix: str = ""  # "" derives it from the cluster name
    torch_dtype: str = "float32"
    num_handlers: int = 2  # each handler process costs memory; Petals' default is 8
    throughput: float = 1.0  # a fixed number skips Petals' speedtest (which goes online)
    attn_cache_tokens: int = 8192  # Petals' own default for non-multi-query models
    initial_peers: tuple[str, ...] = ()  # join an existing swarm instead of starting one
    python: str | None = None  # this machine's Petals python (DHT monitor, generation)


@dataclass(frozen=True)
class CoordinatorConfig:
    binary: str | None = None
    host: str = "127.0.0.1"
    port: int = DEFAULT_COORDINATOR_PORT
    extra_args: tuple[str, ...] = ()
    api_key_env: str = "TORBIZ_API_KEY"  # the key itself never lives in the config file
    threads: int | None = None  # llama-server -t (its CPU threads); None: llama.cpp's default


@dataclass(frozen=True)
class PlanConfig:
    policy: str = "pack"  # "pack": fewest nodes, fastest first; "spread": every node
    reserve_gb: float | None = None  # kept free on every node; None: the planner's default
    cache_type: str = "f16"  # KV cache type (llama-server --cache-type-k/-v)
    coordinator_layers: bool = True  # may the coordinator's own CPU hold layers (pack)
    prewarm: bool = False  # `up` fills the workers' tensor caches first (cache warm)
    standby: tuple[str, ...] = ()  # nodes left out of the plan, warmed to replace a lost one


@dataclass(frozen=True)
class NodeConfig:
    name: str
    host: str
    ssh_port: int = 22
    transport: str = "ssh"
    backend: str = "llama-rpc"
    rpc_server: str | None = None
    rpc_host: str = ""
    rpc_port: int = DEFAULT_RPC_PORT
    rpc_bind: str = "auto"  # "auto" | "loopback" | "any" | an IPv4 address
    threads: int | None = None
    cache: bool = True
    reserve_gb: float | None = None  # overrides [plan] reserve_gb
    max_memory_gb: float | None = None  # never plan more than this here
    weight: float = 1.0  # relative speed: higher gets layers first (pack) or more (spread)
    python: str | None = None  # Petals nodes: the venv's python (default: scripts/petals-env.sh's)
    model_path: str | None = None  # the node's own copy of [model] gguf (default: the same path)
    cache_limit_gb: float | None = None  # rpc-server's tensor cache on this node, at most
    ssh: SshOptions = field(default_factory=SshOptions)

    @property
    def endpoint(self) -> str:
        """The host:port the coordinator connects to."""
        host = self.rpc_host or self.host
        if ":" in host:  # IPv6 literal
            return f"[{host}]:{self.rpc_port}"
        return f"{host}:{self.rpc_port}"

    @property
    def ipv4(self) -> str | None:
        """rpc_host (else host) when it is an IPv4 literal: what a server can bind to."""
        host = self.rpc_host or self.host
        try:
            return host if isinstance(ipaddress.ip_address(host), ipaddress.IPv4Address) else None
        except ValueError:
            return None


@dataclass(frozen=True)
class ClusterConfig:
    name: str
    state_dir: str
    model: ModelConfig
    coordinator: CoordinatorConfig
    nodes: tuple[NodeConfig, ...]
    ssh: SshOptions = field(default_factory=SshOptions)
    plan: PlanConfig = field(default_factory=PlanConfig)
    source: Path | None = None
    recover: bool = True  # restart the coordinator over the remaining workers after a fault
    petals: PetalsConfig = field(default_factory=PetalsConfig)

    def node(self, name: str) -> NodeConfig:
        for node in self.nodes:
            if node.name == name:
                return node
        known = ", ".join(n.name for n in self.nodes) or "none"
        raise KeyError(f"no node named {name!r} in cluster {self.name!r} (nodes: {known})")


# ---- schema -------------------------------------------------------------------------------

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
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list"}


def _expect_table(path: Path, where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(path, where, f"must be a table, got {type(value).__name__}")
    return value


# TOML integers are 64-bit; tomllib reads any size, and float(10**400) raises.
_INT_RANGE = (-(1 << 63), (1 << 63) - 1)
# Text that would rewrite a terminal line or reorder what the operator reads.
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067"
                           "\u2068\u2069")


def _has_control(text: str) -> bool:
    return any(unicodedata.category(c) == "Cc" or c in _BIDI_CONTROLS for c in text)


def _check_value(path: Path, where: str, key: str, value: Any) -> None:
    """No value carries control characters (NUL, newline, escape, bidi overrides) or an
    integer outside TOML's 64-bit range, lists included."""
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, str) and _has_control(item):
            raise ConfigError(path, where, f"key {key!r} contains a control character (a NUL, "
                                           f"newline, escape or bidi override): {item!r}")
        if (isinstance(item, int) and not isinstance(item, bool)
                and not _INT_RANGE[0] <= item <= _INT_RANGE[1]):
            raise ConfigError(path, where, f"key {key!r} is too large a number (TOML integers "
                                           f"are 64-bit), got {str(item)[:20]}...")


def _check_keys(path: Path, where: str, table: dict[str, Any],
                schema: dict[str, tuple[type, ...]]) -> None:
    for key, value in table.items():
        if key not in schema:
            allowed = ", ".join(sorted(schema))
            raise ConfigError(path, where, f"unknown key {key!r} (allowed: {allowed})")
        types = schema[key]
        # bool is an int in Python; never accept true where a number is meant.
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok:
            wanted = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
            raise ConfigError(path, where, f"key {key!r} must be {wanted}, got {value!r}")
        _check_value(path, where, key, value)


def _check_port(path: Path, where: str, key: str, value: int) -> int:
    if not 1 <= value <= 65535:
        raise ConfigError(path, where, f"key {key!r} must be a port between 1 and 65535, "
                                       f"got {value}")
    return value


def is_valid_host(host: str) -> bool:
    """A hostname or an IP literal; nothing a shell or ssh could read as syntax or an option."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(_HOSTNAME_RE.fullmatch(host))


def _check_host(path: Path, where: str, key: str, value: str) -> str:
    if not is_valid_host(value):
        raise ConfigError(path, where, f"key {key!r} must be a host name or IP address, "
                                       f"got {value!r}")
    return value


def _check_name(path: Path, where: str, key: str, value: str) -> str:
    if not _NAME_RE.fullmatch(value):
        raise ConfigError(path, where, f"key {key!r} must be 1-63 letters, digits, '.', '_' or "
                                       f"'-' starting with a letter or digit, got {value!r}")
    return value


# Upper bounds that no real cluster reaches; they keep absurd numbers out of command lines.
_LIMITS = {"threads": 4096, "context": 1 << 24, "keepalive_count_max": 1000,
           "connect_timeout": 3600, "keepalive_interval": 3600, "max_memory_gb": 1 << 20,
           "reserve_gb": 1 << 20, "weight": 1e6}


def _check_positive(path: Path, where: str, key: str, value: float, *,
                    allow_zero: bool = False) -> None:
    limit = _LIMITS.get(key, float("inf"))
    low_ok = value >= 0 if allow_zero else value > 0
    if not (math.isfinite(value) and low_ok and value <= limit):
        bound = "0 or more" if allow_zero else "greater than 0"
        raise ConfigError(path, where, f"key {key!r} must be a number {bound} and at most "
                                       f"{limit:g}, got {value}")


def _check_path(path: Path, where: str, key: str, value: str, *, local: bool) -> str:
    """A non-empty path. `~/` is the home of the user who runs it (here, or on the node);
    `~user/` only on this machine (`local`) and for a user it knows: a node's shell is never
    asked to expand it."""
    if not value:
        raise ConfigError(path, where, f"key {key!r} must be a non-empty path")
    if value.startswith("~") and value != "~" and not value.startswith("~/"):
        user = value[1:].split("/", 1)[0]
        if not local:
            raise ConfigError(path, where, f"key {key!r} starts with ~{user}: only ~/ (the "
                                           "login user's home) is understood on a node; write "
                                           f"the full path, got {value!r}")
        if os.path.expanduser(value) == value:
            raise ConfigError(path, where, f"key {key!r} names the home of user {user!r}, who "
                                           f"is not known on this machine, got {value!r}")
    return value


def _local_file(path: Path, where: str, key: str, value: str) -> Path:
    """A path on this machine, with ~ expanded and relative paths taken from the config's
    directory."""
    expanded = Path(_check_path(path, where, key, value, local=True)).expanduser()
    return expanded if expanded.is_absolute() else (path.parent / expanded).resolve()


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
            _check_path(path, where, key, values[key], local=True)
    for key in ("connect_timeout", "keepalive_interval", "keepalive_count_max",
                "status_timeout"):
        if key in values:
            _check_positive(path, where, key, values[key])
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
    _check_keys(path, "plan", table, _PLAN_KEYS)
    policy = table.get("policy", "pack")
    if policy not in POLICIES:
        raise ConfigError(path, "plan", f"key 'policy' must be one of {', '.join(POLICIES)}, "
                                        f"got {policy!r}")
    cache_type = table.get("cache_type", "f16")
    if cache_type not in CACHE_TYPES:
        raise ConfigError(path, "plan", f"key 'cache_type' must be one of "
                                        f"{', '.join(CACHE_TYPES)}, got {cache_type!r}")
    reserve = table.get("reserve_gb")
    if reserve is not None:
        _check_positive(path, "plan", "reserve_gb", reserve, allow_zero=True)
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
    _check_keys(path, "petals", table, _PETALS_KEYS)
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
        _check_path(path, "petals", "python", python, local=True)
    return PetalsConfig(dht_prefix=prefix, torch_dtype=dtype,
                        num_handlers=table.get("num_handlers", 2), throughput=throughput,
                        attn_cache_tokens=table.get("attn_cache_tokens", 8192),
                        initial_peers=tuple(peers), python=python)


def _node(path: Path, index: int, table: dict[str, Any], ssh: SshOptions) -> NodeConfig:
    where = f"nodes[{index}]"
    raw_name = table.get("name")
    if isinstance(raw_name, str) and _NAME_RE.fullmatch(raw_name):
        where = f"nodes[{index}] ({raw_name})"
    _check_keys(path, where, table, _NODE_KEYS)
    for key in ("name", "host"):
        if key not in table:
            raise ConfigError(path, where, f"missing required key {key!r}")
    name = _check_name(path, where, "name", table["name"])
    host = _check_host(path, where, "host", table["host"])
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
        _check_host(path, where, "rpc_host", rpc_host)
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
        _check_positive(path, where, "threads", threads)
    for key in ("max_memory_gb", "weight"):
        if key in table:
            _check_positive(path, where, key, table[key])
    if "reserve_gb" in table:
        _check_positive(path, where, "reserve_gb", table["reserve_gb"], allow_zero=True)
    rpc_server = table.get("rpc_server")
    if rpc_server is not None:
        _check_path(path, where, "rpc_server", rpc_server, local=transport == "local")
    python = table.get("python")
    if python is not None:
        _check_path(path, where, "python", python, local=transport == "local")
    ssh_options = _ssh_options(path, where, table, ssh)
    _check_listen(path, where, backend, transport, rpc_bind, rpc_host or host)
    return NodeConfig(
        name=name,
        host=host,
        ssh_port=_check_port(path, where, "ssh_port", table.get("ssh_port", 22)),
        transport=transport,
        backend=backend,
        rpc_server=rpc_server,
        rpc_host=rpc_host,
        rpc_port=_check_port(path, where, "rpc_port", table.get("rpc_port", DEFAULT_RPC_PORT)),
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
    cluster = _expect_table(path, "cluster", data.get("cluster", {}))
    _check_keys(path, "cluster", cluster, _CLUSTER_KEYS)
    name = _check_name(path, "cluster", "name", cluster.get("name", "default"))
    state_dir = _check_path(path, "cluster", "state_dir",
                            cluster.get("state_dir", DEFAULT_STATE_DIR), local=False)

    ssh_table = _expect_table(path, "ssh", data.get("ssh", {}))
    _check_keys(path, "ssh", ssh_table, _SSH_KEYS)
    ssh = _ssh_options(path, "ssh", ssh_table, SshOptions())

    model_table = _expect_table(path, "model", data.get("model", {}))
    _check_keys(path, "model", model_table, _MODEL_KEYS)
    gguf = model_table.get("gguf")
    gguf_path = None if gguf is None else _local_file(path, "model", "gguf", gguf)
    context = model_table.get("context", 4096)
    _check_positive(path, "model", "context", context)
    hf = model_table.get("hf")
    hf_path = None if hf is None else _local_file(path, "model", "hf", hf)
    model = ModelConfig(gguf=gguf_path, context=context, hf=hf_path)

    coord_table = _expect_table(path, "coordinator", data.get("coordinator", {}))
    _check_keys(path, "coordinator", coord_table, _COORDINATOR_KEYS)
    extra = coord_table.get("extra_args", [])
    if not all(isinstance(a, str) for a in extra):
        raise ConfigError(path, "coordinator", "key 'extra_args' must be a list of strings")
    for arg in extra:
        managed = managed_coordinator_option(arg)
        if managed:
            raise ConfigError(path, "coordinator", managed)
    binary = coord_table.get("binary")
    if binary is not None:
        _check_path(path, "coordinator", "binary", binary, local=True)
    coordinator_threads = coord_table.get("threads")
    if coordinator_threads is not None:
        _check_positive(path, "coordinator", "threads", coordinator_threads)
    coordinator = CoordinatorConfig(
        binary=binary,
        host=_check_host(path, "coordinator", "host", coord_table.get("host", "127.0.0.1")),
        port=_check_port(path, "coordinator", "port",
                         coord_table.get("port", DEFAULT_COORDINATOR_PORT)),
        extra_args=tuple(extra),
        api_key_env=_check_env_name(path, coord_table.get("api_key_env", "TORBIZ_API_KEY")),
        threads=coordinator_threads,
    )

    plan = _plan(path, _expect_table(path, "plan", data.get("plan", {})))
    petals = _petals(path, _expect_table(path, "petals", data.get("petals", {})))

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
        node = _node(path, index, _expect_table(path, f"nodes[{index}]", raw), ssh)
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
