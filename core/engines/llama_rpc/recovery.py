"""Recover a running cluster from a lost worker or a crashed coordinator.

When a worker the coordinator uses is gone (its process died, or its node is unreachable and
its RPC port no longer answers) or the coordinator itself crashed, re-plan over the workers
that are still ready and restart llama-server over them. The workers keep a tensor cache
(`rpc-server -c`), so the restart re-sends only what they do not hold yet. When the rest
cannot hold the model, nothing is restarted: the cluster stays degraded and the planner's
sentence says how much memory is missing.

One recovery at a time, also across processes (a dashboard and `torbiz-tui watch` may both
supervise one cluster): a lock file beside the coordinator's pidfile. Nodes or a coordinator
stopped by the operator are `stopped`, never `failed`, so they never trigger one.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from core.config import ClusterConfig
from core.engines.base import Span
from core.engines.llama_rpc import rpc as llama_rpc
from core.engines.llama_rpc import standby
from core.engines.llama_rpc.coordinator import coordinator_state_dir, local_transport
from core.engines.llama_rpc.recovery_survey import (
    RecoveringEngine,
    RecoveryHost,
    Survey,
    coordinator_running,
    survey,
)
from core.engines.llama_rpc.serving import PLACEMENT_FILE
from core.planning.placement import (
    COORDINATOR,
    Placement,
    PlacementError,
    PlanRefused,
    make_placement,
)
from core.planning.planner import layer_costs
from core.reach import detached
from core.reach.probe import NodeProbe
from core.state_file import read_json, write_json
from core.status import FAILED, NOT_RESPONDING, READY, STOPPED, UNREACHABLE
from core.supervision.recovery_record import (
    DEGRADED,
    FAILED_RECOVERY,
    RECOVERED,
    RECOVERY_FILE,
    RecoveryResult,
)

LOCK_FILE = "recovery.lock"
CONFIRM_DELAY = 0.3  # a stop by another process removes the pidfile just after the group died
ENDPOINT_RECHECK = 5.0  # seconds between port checks of a worker whose node is unreachable
HELLO_DEADLINE = 2.0  # a remaining worker that does not answer its HELLO in this is left out
KILL_GRACE = 0.5  # llama-server blocked on a silent worker ignores TERM: KILL soon

class _HasConfig(Protocol):
    @property
    def config(self) -> ClusterConfig: ...


def _state_dir(cluster: _HasConfig) -> Path:
    return Path(coordinator_state_dir(cluster.config)).expanduser()


def last_recovery(cluster: _HasConfig) -> dict[str, Any] | None:
    """The last recovery recorded for this cluster on this machine, or None."""
    return read_json(_state_dir(cluster) / RECOVERY_FILE)


class Recoverer:
    """Decides when a recovery is needed and runs it. `detected_at` (time.monotonic()) is
    when the supervisor noticed the fault; recovery times are measured from it."""

    def __init__(self, cluster: RecoveryHost, engine: RecoveringEngine) -> None:
        self.cluster = cluster
        self.engine = engine
        self.results: list[RecoveryResult] = []
        self._attempted: set[tuple[int | None, frozenset[str]]] = set()
        self._endpoint_checked: dict[str, tuple[float, bool]] = {}  # node -> (when, answers)
        self._need_since: float | None = None
        self._served: int | None = None  # pid of the last coordinator seen ready
        self._handovers: list[standby.Handover] = []  # the running recovery's, onto standbys
        self._steps: list[tuple[str, float]] = []  # the running recovery's, from detection
        self._since = 0.0

    def _step(self, name: str) -> None:
        self._steps.append((name, time.monotonic() - self._since))

    def saw_ready(self, pid: int | None) -> None:
        """The supervisor saw this coordinator serve: if it fails now, it is ours to recover."""
        self._served = pid

    # ---- what is lost ----------------------------------------------------------------------

    def in_plan(self, name: str) -> bool:
        """Whether the coordinator was started over this node's worker."""
        return name in self._used_workers()

    def _used_workers(self) -> list[str]:
        """The workers the coordinator was started over (placement.json), in --rpc order."""
        placement = read_json(_state_dir(self.cluster) / PLACEMENT_FILE) or {}
        endpoints = placement.get("endpoints")
        if isinstance(endpoints, dict):
            return [str(name) for name in endpoints]
        return [n.name for n in self.engine.nodes()]

    def _used_endpoints(self) -> dict[str, str]:
        placement = read_json(_state_dir(self.cluster) / PLACEMENT_FILE) or {}
        endpoints = placement.get("endpoints")
        return {str(k): str(v) for k, v in endpoints.items()} if isinstance(endpoints,
                                                                            dict) else {}

    async def _worker_lost(self, name: str) -> bool:
        status = self.cluster.nodes.get(name)
        if status is None:
            return False
        if status.state in (FAILED, NOT_RESPONDING):
            return True  # a silent worker stalls every request: never wait for it
        if status.state != UNREACHABLE:
            self._endpoint_checked.pop(name, None)
            return False
        # SSH is gone; the worker may still serve the coordinator (a restarted sshd). Ask its
        # port, as the coordinator reaches it, but not on every check.
        now = time.monotonic()
        checked = self._endpoint_checked.get(name)
        if checked is not None and now - checked[0] < ENDPOINT_RECHECK:
            return not checked[1]
        endpoint = self._used_endpoints().get(name, self.cluster.config.node(name).endpoint)
        host, _, port = endpoint.rpartition(":")
        answers = await llama_rpc.port_open(host.strip("[]"), int(port), timeout=2.0)
        self._endpoint_checked[name] = (now, answers)
        return not answers

    async def lost_workers(self) -> list[str]:
        used = self._used_workers()
        lost = await asyncio.gather(*(self._worker_lost(n) for n in used))
        return [name for name, gone in zip(used, lost, strict=True) if gone]

    async def needed(self) -> tuple[int | None, frozenset[str]] | None:
        """(coordinator pid, lost workers) when a recovery is due, else None."""
        coordinator = self.cluster.coordinator
        if coordinator.state == READY:
            self._served = coordinator.pid
        elif coordinator.state == NOT_RESPONDING and coordinator.pid == self._served:
            pass  # it served, and is now stuck (on a silent worker?): the workers tell
        elif coordinator.state != FAILED or coordinator.pid != self._served:
            # Stopped by the operator, starting, or failed before it ever served (whoever
            # started it reports that): nothing to recover.
            return None
        if any(self.cluster.nodes[n].state == STOPPED for n in self._used_workers()
               if n in self.cluster.nodes):
            return None  # the operator stopped a worker it uses: theirs to decide, not ours
        lost = frozenset(await self.lost_workers())
        if coordinator.state == READY and not lost:
            return None
        return coordinator.pid, lost

    # ---- the recovery ----------------------------------------------------------------------

    async def maybe_recover(self, detected_at: float | None = None) -> RecoveryResult | None:
        """Recover when needed and not tried yet for the same fault; None when nothing ran."""
        need = await self.needed()
        if need is None:
            self._need_since = None
            return None
        if self._need_since is None:
            self._need_since = detected_at if detected_at is not None else time.monotonic()
        since = self._need_since
        if need in self._attempted:
            return None
        self._since, self._steps = since, []
        # What the recovery reads (probes, caches) is read-only: begun now, it runs while the
        # fault is confirmed instead of after.
        early = asyncio.create_task(survey(self.cluster, self.engine, sorted(need[1]),
                                           self._previous_spans()))
        try:
            with self._lock() as locked:
                if not locked:
                    return None  # another process is recovering this cluster
                # Confirm: another process stopping a part removes its pidfile a moment after
                # the process died (that is `stopped`, not a fault), and another process may
                # have just finished a recovery (the coordinator is asked again).
                await asyncio.sleep(CONFIRM_DELAY)
                await asyncio.gather(self.cluster.refresh_coordinator(),
                                     *(self.cluster.probe_node(n) for n in need[1]))
                need = await self.needed()
                if need is None or need in self._attempted:
                    return None
                self._attempted.add(need)
                self._step("confirmed")
                result = await self._recover(sorted(need[1]), since, early)
                self._attempted.add((self.cluster.coordinator.pid, need[1]))
        finally:
            early.cancel()
            await asyncio.gather(early, return_exceptions=True)
        self._need_since = None
        self.results.append(result)
        del self.results[:-100]
        await asyncio.to_thread(self._record, result)
        return result

    @contextlib.contextmanager
    def _lock(self) -> Iterator[bool]:
        path = _state_dir(self.cluster) / LOCK_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _record(self, result: RecoveryResult) -> None:
        with contextlib.suppress(OSError):
            write_json(_state_dir(self.cluster) / RECOVERY_FILE, result.to_json())

    async def _recover(self, lost: list[str], since: float,
                       early: asyncio.Task[Survey]) -> RecoveryResult:
        cluster = self.cluster
        self._handovers = []
        running = coordinator_running(cluster)
        what = (f"coordinator lost worker{'s' if len(lost) > 1 else ''} {', '.join(lost)}"
                if lost else "the coordinator exited")
        cluster.notice(f"recovering: {what}; re-planning over the workers still ready",
                       "warning")
        try:
            seen = await early
            if seen.lost != tuple(lost) or seen.running != running:  # it changed meanwhile
                seen = await survey(cluster, self.engine, lost, self._previous_spans())
            probes = seen.probes
            self._step("surveyed")
            self._handovers = await self._standby_handovers(lost, seen)
            spans = (standby.handed_over(self._previous_spans(), self._handovers)
                     if self._handovers else await self._plan(probes))
            self._step("planned")
        except PlanRefused as exc:
            head = (f"cannot recover without {', '.join(lost)}" if lost
                    else "cannot restart the coordinator")
            return self._end(DEGRADED, lost, (), since, f"{head}: {exc}; "
                             + ("the coordinator stays degraded (its next request would abort "
                                "it)" if running else "the coordinator stays down"),
                             missing=exc.missing_bytes)
        except PlacementError as exc:
            return self._end(DEGRADED, lost, (), since, f"cannot re-plan: {exc}")
        if lost:
            # llama-server waits on a silent worker forever and ignores TERM meanwhile, and on
            # TERM after a dead worker it aborts (ggml_abort, 0.4-1 s): KILL it, which ends the
            # streams in flight at once (the clients retry; they would be lost either way).
            await detached.stop(local_transport(), coordinator_state_dir(cluster.config),
                                signal="KILL", grace=KILL_GRACE)
        if cluster.coordinator.state in (READY, FAILED, NOT_RESPONDING) or lost:
            # A crashed coordinator still has a pidfile: stop() clears it (and kills leftovers).
            stopped = await cluster.stop_coordinator()
            if stopped.state != "stopped":
                return self._end(FAILED_RECOVERY, lost, spans, since,
                                 f"could not stop the coordinator: {stopped.error}")
        self._step("stopped")
        # Every worker it will use must answer now; one that does not is left out, not waited on.
        mute = await self._silent_workers(spans)
        self._step("hello")
        if mute:
            cluster.notice(f"recovering: worker{'s' if len(mute) > 1 else ''} "
                           f"{', '.join(mute)} did not answer within {HELLO_DEADLINE:g} s: "
                           "left out", "warning")
            lost = sorted({*lost, *mute})
            try:
                spans = await self._plan({n: p for n, p in probes.items() if n not in mute})
            except (PlanRefused, PlacementError) as exc:
                return self._end(DEGRADED, lost, (), since, f"cannot re-plan without "
                                 f"{', '.join(mute)}: {exc}; the coordinator stays down")
        status = await cluster.start_coordinator(spans=spans)
        self._step("started")
        if status.state != READY:
            return self._end(FAILED_RECOVERY, lost, spans, since,
                             f"the coordinator did not restart: {status.error}")
        return self._end(RECOVERED, lost, spans, since, "")

    def _previous_spans(self) -> dict[str, tuple[int, int]]:
        placement = read_json(_state_dir(self.cluster) / PLACEMENT_FILE) or {}
        plan = placement.get("plan")
        try:
            return {str(k): (int(v[0]), int(v[1])) for k, v in plan.items()} \
                if isinstance(plan, dict) else {}
        except (TypeError, ValueError, IndexError):
            return {}

    async def _standby_handovers(self, lost: list[str],
                                 seen: Survey) -> list[standby.Handover]:
        """Each lost worker's blocks handed whole to a ready node the plan left out: the one
        whose cache holds most of them (a configured standby, or any fully warm node), when
        its memory holds them. Empty when a lost worker has no such node: re-plan instead."""
        previous = self._previous_spans()
        config = self.cluster.config
        probes = seen.probes
        spare = [n for n in probes if n not in previous and n not in lost]
        if not lost or not spare or any(n not in previous for n in lost):
            return []
        handovers: list[standby.Handover] = []
        for name in lost:
            span = previous[name]
            if span[1] == 0:
                continue
            shares = [seen.shares.get((name, n)) for n in spare]
            ranked = sorted(zip(spare, shares, strict=True), key=lambda c: -(c[1] or 0.0))
            for node, share in ranked:
                if node not in config.plan.standby and (share or 0.0) < 0.999:
                    continue
                try:
                    fits = await standby.fitting(config, node, probes[node], span)
                except PlacementError:
                    fits = False
                if fits:
                    handovers.append(standby.Handover(name, node, span, share or 0.0))
                    spare.remove(node)
                    break
            else:
                return []
        return handovers

    async def _silent_workers(self, spans: tuple[Span, ...]) -> list[str]:
        """The workers in `spans` that do not answer an RPC HELLO within HELLO_DEADLINE."""
        endpoints = self._used_endpoints()
        names = [name for name, _, count in spans if count > 0]

        async def answers(name: str) -> bool:
            node = self.cluster.config.node(name)
            if node.rpc_bind == "loopback":
                return True  # reached through a tunnel the coordinator's start opens
            host, _, port = endpoints.get(name, node.endpoint).rpartition(":")
            try:
                await llama_rpc.hello(host.strip("[]"), int(port), timeout=HELLO_DEADLINE)
            except llama_rpc.HelloError:
                return False
            return True

        answered = await asyncio.gather(*(answers(n) for n in names))
        return [n for n, ok in zip(names, answered, strict=True) if not ok]

    async def _plan(self, probes: dict[str, NodeProbe]) -> tuple[Span, ...]:
        """Spans over the probed nodes, from their free memory."""
        cluster = self.cluster
        usable = [n for n in self.engine.nodes() if n.name in probes]
        config = replace(cluster.config, nodes=tuple(usable))
        placement = await make_placement(config, probes)
        previous = read_json(_state_dir(cluster) / PLACEMENT_FILE) or {}
        kept = sticky_spans(placement, previous.get("plan"), cluster.config.model.context)
        return kept if kept is not None else tuple(placement.plan.rpc_spans())

    def _end(self, outcome: str, lost: list[str], spans: tuple[Span, ...], since: float,
             reason: str, missing: int = 0) -> RecoveryResult:
        took = time.monotonic() - since
        workers = tuple(name for name, _, count in spans if count > 0)
        if outcome == RECOVERED:
            placed = ", ".join(f"{first}-{first + count - 1} on {name}"
                               for name, first, count in spans if count > 0)
            where = (f"over {', '.join(workers)} (blocks {placed})" if workers
                     else "with every block on this machine's CPU")
            reason = (f"coordinator recovered in {took:.1f} s: restarted {where}"
                      + (f", without {', '.join(lost)}" if lost else ""))
            handovers = [h for h in self._handovers if h.standby in workers]
            if handovers:
                reason = (f"{standby.handover_sentence(handovers, took)}: restarted {where}, "
                          f"without {', '.join(lost)}")
        result = RecoveryResult(outcome, tuple(lost), workers, spans,
                                took if outcome == RECOVERED else None, reason, time.time(),
                                missing, tuple(self._steps))
        level = {RECOVERED: "info", DEGRADED: "error"}.get(outcome, "error")
        self.cluster.notice(reason if outcome == RECOVERED else f"recovery {outcome}: {reason}",
                            level, extra={"recovery": result.to_json()})
        return result


def sticky_spans(placement: Placement, previous: Any, context: int) -> tuple[Span, ...] | None:
    """The previous spans with each lost node's range handed to a neighbouring survivor, when
    every node's budget (from `placement`) allows it; None otherwise. The survivors keep the
    blocks they hold, so their warm caches serve them and only the lost ranges cross the
    network (a fresh plan may shift every range). With nothing lost: the previous spans."""
    if not isinstance(previous, dict) or not previous:
        return None
    try:
        old = sorted(((str(name), int(span[0]), int(span[1])) for name, span in
                      previous.items()), key=lambda s: s[1])
    except (TypeError, ValueError, IndexError):
        return None
    model, plan = placement.model, placement.plan
    n = model.n_layers
    old = [s for s in old if s[2] > 0]
    if not old or old[-1][1] + old[-1][2] != n or any(
            a[1] + a[2] != b[1] for a, b in zip(old, old[1:], strict=False)):
        return None
    coordinator_share = plan.assignment(COORDINATOR)
    if (coordinator_share.n_layers if coordinator_share else 0) != old[0][1]:
        return None  # the coordinator's own blocks changed: let the fresh plan decide
    budgets = {b.name: b.budget_bytes for b in placement.budgets}
    alive = [s for s in old if s[0] in budgets]
    if not alive:
        return None
    costs = layer_costs(model, context, plan.cache_type)

    def fits(spans: list[Span]) -> bool:
        return all(sum(costs[first:first + count]) + (model.output_bytes
                                                       if first + count == n else 0)
                   <= budgets[name] for name, first, count in spans)

    candidates: list[list[Span]] = []
    for lean in ("left", "right"):
        spans: list[Span] = []
        waiting: int | None = None  # first block of lost ranges the next survivor takes
        for name, first, count in old:
            if name not in budgets:
                if spans and lean == "left":
                    prev = spans[-1]
                    spans[-1] = (prev[0], prev[1], prev[2] + count)
                elif waiting is None:
                    waiting = first
            elif waiting is not None:
                spans.append((name, waiting, first + count - waiting))
                waiting = None
            else:
                spans.append((name, first, count))
        if waiting is not None:  # lost at the end: the last survivor takes it
            prev = spans[-1]
            spans[-1] = (prev[0], prev[1], n - prev[1])
        candidates.append(spans)
    feasible = [c for c in candidates if fits(c)]
    if not feasible:
        return None
    best = min(feasible, key=lambda c: max(
        (sum(costs[f:f + k]) / budgets[name] if budgets[name] else float("inf"))
        for name, f, k in c))
    return tuple(best)
