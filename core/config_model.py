"""The cluster file as typed values: what core/config.py's loader returns once every key was
checked. Plain frozen dataclasses; the rules that check a file are in core/config.py."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

BACKENDS = ("llama-rpc", "petals")
TRANSPORTS = ("ssh", "local")
DEFAULT_RPC_PORT = 50052
DEFAULT_COORDINATOR_PORT = 8080
DEFAULT_STATE_DIR = "~/.torbiz"


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
    # "fastest": the best predicted tok/s once calibrated (pack until then); "pack": fewest
    # nodes, fastest first; "spread": every node
    policy: str = "fastest"
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
