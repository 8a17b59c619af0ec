"""The dashboard's model: what the screen shows, in plain Python (no Textual).

One joined record per node (its status, device and free memory from the probe, layers from the
layer map, tokens/s from the throughput, our own "probing" and "stopping"), the coordinator,
its loading progress, the plan preview, the event log, and what each key may do now and why
not. The cluster's events and the polls' results update it; widgets only draw it."""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from enum import Enum

from core.engines.base import Capabilities
from core.planning.layer_map import LayerMap
from core.reach.probe import NodeProbe
from core.status import (
    FAILED,
    READY,
    STARTING,
    STOPPED,
    CoordinatorLoading,
    CoordinatorStatus,
    Level,
    NodeStatus,
    Notice,
)
from core.status_text import status_cells
from core.supervision.bottleneck import Bottleneck
from core.supervision.throughput import ThroughputSample
from tui.text import sanitize

# States of ours, shown while the core has not spoken yet or is busy on a part.
PROBING = "probing"  # until the first refresh says what the part really is
STOPPING = "stopping"  # while a stop is in flight (the core reports only the outcome)

COORDINATOR = "coordinator"  # busy key for a coordinator action
WHOLE_CLUSTER = "*"  # busy key for up/down
CHANGES_CLUSTER = frozenset({"start_node", "stop_node", "restart_node", "start_coordinator",
                             "stop_coordinator", "up", "down", "rebalance", "warm_cache"})
NEEDS_NODE = frozenset({"start_node", "stop_node", "restart_node", "logs"})
# The keys whose state (shown, greyed, hidden) changes with the cluster.
KEYED_ACTIONS = tuple(sorted(CHANGES_CLUSTER | NEEDS_NODE | {"generate"}))
TOAST_SECONDS = {Level.ERROR: 15.0, Level.WARNING: 8.0, Level.INFO: 4.0}


def describe_resources(found: NodeProbe) -> tuple[str, str]:
    """(device, free memory) cells: the GPUs' names and free VRAM, else CPU and free RAM."""
    if found.gpus:
        names = sorted({gpu.name.removeprefix("NVIDIA ").removeprefix("AMD ")
                        for gpu in found.gpus})
        device = f"{len(found.gpus)}x {names[0]}" if len(found.gpus) > 1 and len(names) == 1 \
            else "+".join(names)
        free = sum(gpu.free_bytes for gpu in found.gpus)
    else:
        device = f"CPU {found.cores}c" if found.cores else "CPU"
        free = found.ram_available_bytes
    return device, (f"{free / 2**30:.1f} GiB" if free else "-")


@dataclass(frozen=True)
class NodeRow:
    """One node as the table shows it: the core's status joined with the polls' cells."""

    status: NodeStatus
    state: str  # the status's state, or PROBING / STOPPING
    device: str = "-"
    free: str = "-"
    layers: str = "-"
    share: str = "-"  # its share of each token's time: "62% c55 l7", "◀" on the slowest

    @property
    def name(self) -> str:
        return self.status.name


def node_cells(row: NodeRow, now: float | None = None) -> dict[str, str]:
    """The table's cells for `row`."""
    cells = status_cells(row.status, now)
    cells.update(state=cells["state"] if row.state == row.status.state else sanitize(row.state),
                 device=sanitize(row.device),
                 free=sanitize(row.free), layers=row.layers,
                 share=row.share if row.status.state == READY else "-")
    return cells


@dataclass(frozen=True)
class CoordinatorRow:
    status: CoordinatorStatus
    state: str  # the status's state, or PROBING / STOPPING

    @property
    def url(self) -> str:
        return self.status.url

    @property
    def pid(self) -> int | None:
        return self.status.pid

    @property
    def error(self) -> str:
        return self.status.error


@dataclass(frozen=True)
class Serving:
    """How the bar names the serving side when the engine has no coordinator."""

    title: str  # "Petals swarm"
    name: str  # the swarm's name ("" when the engine does not say)
    label: str  # "swarm"


@dataclass(frozen=True)
class PlanPreview:
    text: str
    refused: bool


class Key(Enum):
    ENABLED = "enabled"
    GREYED = "greyed"  # shown, but makes no sense right now
    HIDDEN = "hidden"  # read-only mode, or the other binding on the same key applies


@dataclass(frozen=True)
class KeyCheck:
    key: Key
    reason: str = ""  # why not, for anything but ENABLED


OK = KeyCheck(Key.ENABLED)


def _greyed(reason: str) -> KeyCheck:
    return KeyCheck(Key.GREYED, reason)


@dataclass(frozen=True)
class NoticeView:
    """How one notice is shown: its event-log line, a toast (or none), a note by its node."""

    line: str
    text: str  # sanitized
    toast: Level | None
    node_note: str | None


@dataclass
class Changed:
    """What an update changed, so the screen redraws only that."""

    nodes: list[NodeRow] = field(default_factory=list)
    coordinator: bool = False


class Dashboard:
    """The whole screen's state. Updates return what they changed; questions (`check`,
    `running_summary`) read only what the operator sees."""

    def __init__(self, capabilities: Capabilities,
                 nodes: Iterable[NodeStatus], coordinator: CoordinatorStatus, *,
                 read_only: bool = False, engine_title: str = "", serving_name: str = "",
                 event_lines: int = 5_000, clock: Callable[[], str] | None = None,
                 standbys: Iterable[str] = ()) -> None:
        self.capabilities = capabilities
        self.standbys = frozenset(standbys)  # left out of the plan on purpose: no rebalance
        self.read_only = read_only
        self.engine_title = engine_title
        label = capabilities.coordinator_label
        self.serving = None if capabilities.has_coordinator else \
            Serving(f"{engine_title} {label}".strip(), serving_name, label)
        self.clock = clock or (lambda: time.strftime("%H:%M:%S"))
        self.nodes: dict[str, NodeRow] = {s.name: NodeRow(s, PROBING) for s in nodes}
        self.coordinator = CoordinatorRow(coordinator, PROBING)
        self.loading: CoordinatorLoading | None = None
        self.layer_map: LayerMap | None = None
        self.throughput: ThroughputSample | None = None
        self.throughput_note = ""
        self.bottleneck: Bottleneck | None = None  # where each token's time goes
        self.plan: PlanPreview | None = None
        self.stale = False
        self.event_log: deque[str] = deque(maxlen=event_lines)
        self._busy: Counter[str] = Counter()
        self._recent_errors: deque[str] = deque(maxlen=64)

    # ---- updates from the core's events -------------------------------------------------------

    def node_changed(self, status: NodeStatus) -> NodeRow:
        return self._set(replace(self.nodes[status.name], status=status,
                                 state=str(status.state)))

    def coordinator_changed(self, status: CoordinatorStatus) -> CoordinatorRow:
        self.coordinator = CoordinatorRow(status, str(status.state))
        if status.state != STARTING:
            self.loading = None
        return self.coordinator

    def coordinator_loading(self, event: CoordinatorLoading) -> None:
        self.loading = event

    @property
    def loading_shown(self) -> bool:
        return self.loading is not None or self.coordinator.state == STARTING

    def record(self, level: Level | str, text: str) -> str:
        """One line of the event log."""
        line = f"{self.clock()} {str(level):<7} {sanitize(text)}"
        self.event_log.append(line)
        return line

    def notice(self, notice: Notice) -> NoticeView:
        level = Level(notice.level)
        text = sanitize(notice.text)
        line = self.record(level, notice.text)
        note = None if notice.node is None else f"-- {self.clock()} {level!s}: {text} --"
        toast: Level | None = level
        if level == Level.INFO and notice.node is None and self.loading is not None:
            toast = None  # the loading row shows progress; a toast every 5 s would be noise
        if level == Level.ERROR:
            self._recent_errors.append(notice.text)
        return NoticeView(line, text, toast, note)

    def unsaid(self, problems: Iterable[str]) -> list[str]:
        """The problems no error notice has said already."""
        return [p for p in problems if p not in self._recent_errors]

    # ---- updates from the polls --------------------------------------------------------------

    def refreshed(self, error: str) -> tuple[Changed, bool]:
        """A refresh round ended: nodes whose state did not change sent no event, so what the
        core knows now replaces "probing". True with the change when it just went stale."""
        changed = Changed()
        busy = self.busy_keys
        for name, row in self.nodes.items():
            if row.state == PROBING and name not in busy:
                changed.nodes.append(self.node_changed(row.status))
        if self.coordinator.state == PROBING and COORDINATOR not in busy:
            self.coordinator_changed(self.coordinator.status)
            changed.coordinator = True
        went_stale = bool(error) and not self.stale
        self.stale = bool(error)
        return changed, went_stale

    def resources(self, name: str, device: str, free: str) -> NodeRow:
        return self._set(replace(self.nodes[name], device=device, free=free))

    def layer_map_changed(self, layer_map: LayerMap | None) -> list[NodeRow]:
        self.layer_map = layer_map
        held = {span.node: span for span in layer_map.spans} if layer_map else {}
        changed = []
        for name, row in self.nodes.items():
            span = held.get(name)
            layers = "-" if span is None or not span.count else \
                f"{span.first}-{span.last}" if span.count > 1 else str(span.first)
            if layers != row.layers:
                changed.append(self._set(replace(row, layers=layers)))
        return changed

    def throughput_changed(self, sample: ThroughputSample | None, note: str = "") -> None:
        self.throughput, self.throughput_note = sample, note

    def bottleneck_changed(self, found: Bottleneck | None) -> list[NodeRow]:
        """Each row's share of a token's time (the TOKEN TIME cells)."""
        self.bottleneck = found
        changed = []
        for name, row in self.nodes.items():
            share = found.cell(name) if found is not None else "-"
            if share != row.share:
                changed.append(self._set(replace(row, share=share)))
        return changed

    def idle_throughput_note(self, state: str) -> str:
        """What the throughput panel says when there is no sample to show."""
        if self.capabilities.has_throughput:
            return f"coordinator {state}"
        return f"{self.engine_title or 'this engine'}: `torbiz-tui generate` gives tok/s"

    def planned(self, text: str, refused: bool) -> PlanPreview:
        self.plan = PlanPreview(text, refused)
        return self.plan

    def _set(self, row: NodeRow) -> NodeRow:
        self.nodes[row.name] = row
        return row

    # ---- actions under way -------------------------------------------------------------------

    @property
    def busy_keys(self) -> set[str]:
        return {key for key, count in self._busy.items() if count}

    def _covered(self, key: str) -> tuple[list[str], bool]:
        nodes = [name for name in self.nodes if key in (name, WHOLE_CLUSTER)]
        return nodes, key in (COORDINATOR, WHOLE_CLUSTER)

    def begin(self, key: str, *, stopping: bool = False) -> Changed:
        """An action on `key` (a node, COORDINATOR or WHOLE_CLUSTER) started; a stop shows
        "stopping" at once (the core reports only its outcome)."""
        self._busy[key] += 1
        changed = Changed()
        if not stopping:
            return changed
        nodes, coordinator = self._covered(key)
        for name in nodes:
            if self.nodes[name].status.state != STOPPED:
                changed.nodes.append(self._set(replace(self.nodes[name], state=STOPPING)))
        if coordinator and self.coordinator.state != STOPPED:
            self.coordinator = replace(self.coordinator, state=STOPPING)
            changed.coordinator = True
        return changed

    def end(self, key: str) -> Changed:
        """The action on `key` ended: our "stopping" goes; what the core knows now stays."""
        self._busy[key] -= 1
        if self._busy[key] <= 0:
            del self._busy[key]
        changed = Changed()
        nodes, coordinator = self._covered(key)
        for name in nodes:
            if self.nodes[name].state == STOPPING:
                changed.nodes.append(self.node_changed(self.nodes[name].status))
        if coordinator and self.coordinator.state == STOPPING:
            self.coordinator_changed(self.coordinator.status)
            changed.coordinator = True
        return changed

    # ---- what the keys may do -----------------------------------------------------------------

    def check(self, action: str, selected: str | None) -> KeyCheck:
        """May `action` run now on the `selected` node, and if not, why."""
        caps = self.capabilities
        if action in CHANGES_CLUSTER and self.read_only:
            return KeyCheck(Key.HIDDEN, "read-only mode")
        if action == "generate":
            return self._check_generate()
        if action not in CHANGES_CLUSTER | NEEDS_NODE:
            return OK
        busy = self.busy_keys
        if action in ("start_coordinator", "stop_coordinator"):
            if not caps.has_coordinator:
                return KeyCheck(Key.HIDDEN, f"a {caps.coordinator_label} has no coordinator")
            shown = self.coordinator.state
            if (action == "start_coordinator") != (shown in (STOPPED, FAILED)) \
                    and shown != PROBING:
                return KeyCheck(Key.HIDDEN, "the other action on this key applies")
            if busy & {COORDINATOR, WHOLE_CLUSTER}:
                return _greyed("the coordinator is being changed")
            return _greyed("the coordinator's state is not known yet") if shown == PROBING \
                else OK
        if action == "rebalance":
            if not caps.has_coordinator:
                return KeyCheck(Key.HIDDEN, f"a {caps.coordinator_label} places blocks itself")
            idle = [row.name for row in self.nodes.values()
                    if row.status.state == READY and row.layers in ("-", "")
                    and row.name not in self.standbys]
            if self.coordinator.state != READY or not idle:
                # Offered only when it helps: a ready worker the running coordinator leaves out
                # (one back after a fault).
                return KeyCheck(Key.HIDDEN, "every ready worker is in the plan")
        if action in ("up", "down", "rebalance"):
            return _greyed("another action is under way") if busy else OK
        if selected is None or selected not in self.nodes:
            return _greyed("no node selected")
        if action == "logs":
            return OK
        if busy & {selected, WHOLE_CLUSTER}:
            return _greyed(f"{selected} is being changed")
        state = self.nodes[selected].state
        if state == PROBING:
            return _greyed(f"{selected}'s state is not known yet")
        if action == "start_node":
            return _greyed(f"{selected} is {state}") if state in (READY, STARTING) else OK
        return _greyed(f"{selected} is stopped") if state == STOPPED else OK

    def _check_generate(self) -> KeyCheck:
        if not self.capabilities.has_coordinator:
            ready = any(row.status.state == READY for row in self.nodes.values())
            return OK if ready else _greyed(f"no {self.capabilities.worker_label} is ready")
        state = self.coordinator.state
        return OK if state == READY else _greyed(f"the coordinator is {state}")

    def can(self, action: str, selected: str | None = None) -> bool:
        return self.check(action, selected).key == Key.ENABLED

    def why_not(self, action: str, selected: str | None = None) -> str:
        return self.check(action, selected).reason

    # ---- questions the dialogs ask -------------------------------------------------------------

    def running_summary(self) -> str:
        """What may still run, in words; "" when everything is known to be stopped."""
        live = [name for name, row in self.nodes.items() if row.state != STOPPED]
        parts = []
        if live:
            parts.append(f"{len(live)} of {len(self.nodes)} workers not stopped")
        if self.coordinator.state != STOPPED:
            parts.append(f"coordinator {self.coordinator.state}")
        return ", ".join(parts)

    def coordinator_in_use(self) -> bool:
        """The coordinator runs (or loads) over the workers: a worker restart breaks it."""
        return self.coordinator.state in (READY, STARTING)
