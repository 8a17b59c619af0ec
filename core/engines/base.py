"""The one interface every engine implements, and the narrow handle the cluster gives it.

An engine knows how its workers start, stop and report, how it plans and brings a cluster up,
what its layer map is and how it generates. Code outside core/engines never asks an engine's
name: it reads `capabilities`. An engine never reaches into the cluster: it gets an
EngineContext (transports, state directories, the last known status, a way to report)."""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from core.checks import Check
from core.config import ClusterConfig, NodeConfig
from core.planning.layer_map import LayerMap
from core.reach.detached import ProcessState
from core.reach.probe import NodeProbe, WorkerLookup
from core.reach.transport import (
    LOST,
    NOT_RESPONDING,
    SILENT_KINDS,
    Transport,
    TransportError,
)
from core.status import (
    ClusterStatus,
    CoordinatorStatus,
    Event,
    Level,
    NodeState,
    NodeStatus,
)
from core.supervision.bottleneck import Bottleneck
from core.supervision.throughput import ThroughputSample
from core.weight_cache import PruneResult, WarmResult, WarmthReport

T = TypeVar("T")
Span = tuple[str, int, int]  # (node, first block, number of blocks)


@dataclass(frozen=True)
class Capabilities:
    """What an engine can do; the dashboard and the CLI decide from these, never from a name."""

    has_coordinator: bool  # a local process serves the API (llama-server); else the swarm does
    can_recover: bool  # restarts its coordinator over the workers left when one is lost
    has_throughput: bool  # live tokens/s from the coordinator's metrics
    node_start_needs_plan: bool  # a node can only start on blocks a cluster `up` planned
    coordinator_label: str  # what the dashboard's bar calls the serving side
    worker_label: str  # "worker" (rpc-server) or "server" (Petals)
    map_interval_s: float  # how often the layer map is worth reading while it runs
    has_weight_cache: bool = False  # workers keep weights in a cache `cache warm` can fill
    can_calibrate: bool = False  # nodes' and links' speeds can be measured (`calibrate`)


@dataclass(frozen=True)
class PlanView:
    """A plan as the operator sees it: the engine's table, its JSON, and the spans `up` places
    (node, first block, count) in the engine's order."""

    text: str
    json: dict[str, Any]
    spans: tuple[Span, ...]
    summary: str  # one line for the event log ("alpha 0-11, beta 12-23")
    detail: Any = None  # the engine's own plan object, handed back to `up` unchanged


@dataclass(frozen=True)
class Generation:
    text: str
    tokens: int
    seconds: float  # the generation's own time when the engine reports it, else wall time
    prompt_tokens: int = 0  # the prompt as processed, when the engine reports it
    prompt_seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0


def port_taken(host: str, port: int, setting: str) -> str:
    """The one sentence for a worker port held by a program the cluster did not start."""
    return (f"port {port} on {host} is already in use by a program this cluster did not "
            f"start: stop it or set another {setting}")


class EngineError(Exception):
    """An engine refused or failed; the message is a sentence for the operator, `problems`
    one sentence per node or part when there are several."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


class EngineContext(Protocol):
    """What the cluster lends an engine. Nothing else of the cluster is reachable."""

    @property
    def config(self) -> ClusterConfig: ...

    def transport(self, name: str) -> Transport: ...

    def node_state_dir(self, node: NodeConfig) -> str: ...

    def last_status(self, name: str) -> NodeStatus: ...

    def report(self, status: NodeStatus) -> NodeStatus: ...

    def report_coordinator(self, status: CoordinatorStatus) -> CoordinatorStatus: ...

    def emit(self, event: Event) -> None: ...

    def notice(self, text: str, level: Level = Level.INFO, node: str | None = None) -> None: ...

    async def start_node(self, name: str, *, timeout: float) -> NodeStatus: ...


class Engine(abc.ABC):
    """One inference engine behind the cluster. Subclasses set `name` and `capabilities`."""

    name: str
    capabilities: Capabilities

    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx

    @property
    def config(self) -> ClusterConfig:
        return self.ctx.config

    def status(self, node: NodeConfig, state: NodeState, pid: int | None = None,
               error: str = "", **extra: Any) -> NodeStatus:
        """Report a node's state through the context (it emits a change event)."""
        return self.ctx.report(NodeStatus(node.name, node.host, node.backend, state, pid,
                                          node.endpoint, error, **extra))

    def started_at(self, name: str, proc: ProcessState) -> float | None:
        """The process's start on our clock; kept from the last probe when it agrees within
        2 s (ps counts whole seconds), so an unchanged worker stays an unchanged status."""
        if proc.elapsed_s is None:
            return None
        started = float(round(time.time() - proc.elapsed_s))
        previous = self.ctx.last_status(name)
        if previous.pid == proc.pid and previous.started_at is not None \
                and abs(previous.started_at - started) <= 2:
            return previous.started_at
        return started

    async def on_node(self, node: NodeConfig, work: Awaitable[T]) -> T:
        """`work` (round trips to `node`) under its [ssh] status_timeout: a node silent past
        it is a TransportError of kind not-responding, never a wait of minutes."""
        timeout = node.ssh.status_timeout
        silent = (f"no answer to a status check within {timeout:g} s: the node is frozen "
                  "(swap, sleep), overloaded, or its link is down ([ssh] status_timeout)")
        asked = time.monotonic()
        try:
            return await asyncio.wait_for(work, timeout)
        except (asyncio.TimeoutError, TimeoutError):
            raise TransportError(node.name, silent, kind=NOT_RESPONDING) from None
        except TransportError as exc:
            was = self.ctx.last_status(node.name).state
            if exc.kind == LOST and was == NodeState.NOT_RESPONDING:
                # The connection of a node already silent closed (keepalives unanswered, a
                # cancelled command): nobody refused us, the node is still silent.
                raise TransportError(node.name, silent, kind=NOT_RESPONDING) from None
            if exc.kind not in SILENT_KINDS and time.monotonic() - asked >= timeout * 0.95:
                # The deadline cancelled the command and asyncssh answered the cancel with
                # a closed channel: the node was silent until then, nobody refused us.
                raise TransportError(node.name, silent, kind=NOT_RESPONDING) from None
            raise

    # ---- nodes ------------------------------------------------------------------------------

    def nodes(self) -> list[NodeConfig]:
        """The nodes this engine runs (every node of the cluster file, by the config's rule)."""
        return list(self.config.nodes)

    @abc.abstractmethod
    def worker_lookup(self, node: NodeConfig, is_local: bool) -> WorkerLookup | None:
        """The sh that finds the node's worker program for the probe, or None."""

    @abc.abstractmethod
    async def probe_node(self, node: NodeConfig) -> NodeStatus:
        """The node's state from its pidfile (works from a fresh process); TransportError when
        the node cannot be reached."""

    @abc.abstractmethod
    async def start_node(self, node: NodeConfig, timeout: float) -> NodeStatus:
        """Start the node's worker and wait until it serves (or failed); TransportError."""

    @abc.abstractmethod
    async def stop_node(self, node: NodeConfig) -> NodeStatus:
        """Stop the node's worker and everything it started; TransportError."""

    # ---- the serving side (engines without a coordinator answer "stopped" and do nothing) ----

    def coordinator_url(self) -> str:
        """Where clients reach the cluster's API ("" when the engine has no coordinator)."""
        return ""

    @property
    def serving_name(self) -> str:
        """What names the serving side when it is not a URL (a swarm's DHT prefix), or ""."""
        return ""

    def coordinator_log_dir(self) -> str | None:
        """The local state directory whose log is the coordinator's, or None."""
        return None

    async def throughput(self) -> ThroughputSample | None:
        """A live sample of the serving side's rates, or None when the engine has none."""
        return None

    async def bottleneck(self, coordinator_pid: int | None) -> Bottleneck | None:
        """Where each token's time goes while the cluster runs (the last figures while idle);
        None when the engine cannot tell."""
        return None

    async def predicted_tps(self) -> float | None:
        """The speed model's tok/s for the running plan (None: cannot predict it)."""
        return None

    async def stalled_workers(self, coordinator_pid: int | None) -> dict[str, str]:
        """Workers holding up a request the serving side has stopped decoding (node -> the
        sentence), reported `not responding` even while their node answers; none by default."""
        return {}

    def recoverer(self, host: Any) -> Any:
        """What restarts the serving side after a lost worker (capabilities.can_recover), or
        None. `host` is the cluster, as supervision sees it."""
        return None

    def last_recovery(self) -> dict[str, Any] | None:
        """The last recovery recorded on this machine (a RecoveryResult's JSON), or None."""
        return None

    async def refresh_coordinator(self) -> CoordinatorStatus:
        return CoordinatorStatus(NodeState.STOPPED)

    async def start_coordinator(self, spans: Sequence[Span] | None,
                                timeout: float) -> CoordinatorStatus:
        raise EngineError(f"a {self.name} cluster has no coordinator to start")

    async def stop_coordinator(self) -> CoordinatorStatus:
        return CoordinatorStatus(NodeState.STOPPED)

    # ---- the whole cluster ----------------------------------------------------------------

    @abc.abstractmethod
    async def plan(self, probes: dict[str, NodeProbe]) -> PlanView:
        """The plan from each node's probe; EngineError when it cannot be made."""

    @abc.abstractmethod
    async def up(self, plan: PlanView) -> list[NodeStatus]:
        """Start what the plan places and whatever serves it; the nodes' final statuses."""

    @abc.abstractmethod
    async def layer_map(self) -> LayerMap:
        """Which node holds which block now."""

    @abc.abstractmethod
    async def status_detail(self, base: ClusterStatus) -> ClusterStatus:
        """`base` with the engine's detail: layer shares, throughput, block map."""

    @abc.abstractmethod
    async def generate(self, prompt: str, tokens: int, timeout: float) -> Generation:
        """A short generation through the running cluster; EngineError with a sentence."""

    @abc.abstractmethod
    async def cluster_checks(self) -> list[Check]:
        """The doctor's checks of this machine's part (binaries, model, keys)."""

    @abc.abstractmethod
    async def node_checks(self, node: NodeConfig, probe: NodeProbe,
                          clock_offset_s: float) -> list[Check]:
        """The doctor's checks of one reachable node (binary, clock, port, protocol)."""

    def bind_check(self, node: NodeConfig) -> Check:
        """Where the node's worker would listen, as a doctor check (before any connection)."""
        return Check(node.name, "bind", "ok", "")

    def summarize_checks(self, checks: list[Check]) -> list[Check]:
        """Checks across nodes (e.g. the same version everywhere); none by default."""
        return []

    @classmethod
    def exposure(cls, config: ClusterConfig) -> list[str]:
        """One sentence per endpoint this engine would open beyond loopback, to show wherever
        the cluster starts."""
        return [s for s in map(cls.node_exposure, config.nodes) if s]

    @staticmethod
    def node_exposure(node: NodeConfig) -> str | None:
        """The sentence for one node's listening socket, or None when it stays on loopback."""
        return None

    def warnings(self) -> list[str]:
        """Sentences to show wherever the cluster starts (an exposed port, say)."""
        return self.exposure(self.config)

    async def node_memory(self, node: NodeConfig) -> int:
        """What the node's worker takes now, in bytes (0: unknown)."""
        return 0

    # ---- the weight cache (engines with has_weight_cache) ---------------------------------

    async def weight_cache(self, spans: Sequence[Span] | None) -> WarmthReport:
        """Per node, which of the model's cacheable tensors its cache holds."""
        raise EngineError(f"the {self.name} engine keeps no weight cache")

    async def warm_cache(self, spans: Sequence[Span], names: Sequence[str] | None,
                         verify: bool, progress: Any) -> list[WarmResult]:
        """Fill the nodes' caches with their spans' tensors; `progress(WarmProgress)`."""
        raise EngineError(f"the {self.name} engine keeps no weight cache")

    async def verify_cache(self, names: Sequence[str] | None) -> list[str]:
        """Re-hash the cache files on the nodes; a sentence per file moved aside."""
        raise EngineError(f"the {self.name} engine keeps no weight cache")

    async def prune_cache(self, dry_run: bool) -> list[PruneResult]:
        raise EngineError(f"the {self.name} engine keeps no weight cache")

    # ---- calibration (engines with can_calibrate) -----------------------------------------

    async def calibrate(self, names: Sequence[str], force: bool, progress: Any,
                        statuses: Any, probes: Any) -> list[str]:
        """Measure (or read from the cache) each node's speed and link: a sentence each."""
        raise EngineError(f"the {self.name} engine cannot measure its nodes' speed")

    def speed_lines(self, plan: PlanView) -> tuple[list[str], dict[str, Any]]:
        """The plan's predicted speed, per node its share of each token (text, JSON)."""
        return [], {}

    async def close(self) -> None:  # noqa: B027 - most engines hold nothing to release
        """Release what the engine holds (monitors, HTTP clients)."""
