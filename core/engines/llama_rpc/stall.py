"""A decode stalled on a silent worker, seen from the coordinator.

llama-server answers /health and /slots while its decode loop waits on a worker that does not
answer: a busy slot's `n_decoded` (or, while it reads its prompt, `n_prompt_tokens_processed`)
simply stops moving. Its node may still answer SSH, so the status check alone says `ready`. A
stall past STALL_S is the cue to look, two ways at once:

- each ready worker's node is asked whether its process runs: one that is stopped (ps state T,
  SIGSTOPped or deep in a debugger) is the worker the request waits on;
- llama-server's decode thread is sampled from /proc for SILENT_SAMPLE_S (wait_sampler.py):
  when it sits in a call on ONE worker's connection in (nearly) every sample, that worker holds
  the request up though its process runs (deadlocked, stuck in a loop, or its link swallows
  the traffic). A decode whose steps are slow but keep coming is never blamed: the slot's
  progress moving starts the clock over, a slot whose steps were already slow must stall for
  SLOW_STEP_FACTOR times its slowest step, and one that has made no step yet in its request
  (a prompt batch can take long on a CPU node) SILENT_FIRST_STEP_S, before the sampler is
  asked.

Either is `not responding`, with the request named, and stays so while its process stays
stopped, or (a running one) while its RPC port does not answer a HELLO. Without the right to
read /proc/PID/task/TID/syscall (another user, ptrace_scope), only the stopped case is found.

llama.cpp's rpc-server serves one client at a time, so a worker cannot be asked over RPC
while the coordinator holds its connection: the node answers instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from core.config import NodeConfig
from core.engines.llama_rpc import rpc as llama_rpc
from core.engines.llama_rpc import wait_sampler
from core.reach.shell import quote_argv
from core.reach.transport import Transport
from core.status import NodeStatus

STALL_S = 2.0  # a busy slot whose progress has not moved for this long is looked into
STALL_ASK_S = 1.0  # deadline of asking a node whether its worker runs
NOT_RUNNING = ("T", "t")  # ps STAT: stopped by a signal, or by a tracer
SILENT_SAMPLE_S = 0.5  # the decode thread is sampled this long per look
SILENT_SHARE = 0.95  # of the samples, in a call on one worker's connection: that worker
SLOW_STEP_FACTOR = 2.0  # a slot with slow steps must stall this many times its slowest one
# Before a slot's first step (reading a prompt batch) one call on a worker can legitimately
# take long (a big batch on a CPU node): the sampler waits this long before it may blame.
SILENT_FIRST_STEP_S = 15.0

Address = tuple[str, int]


@dataclass(frozen=True)
class StalledSlot:
    slot: int
    task: int | None
    n_decoded: int
    stalled_s: float
    slowest_step_s: float = 0.0  # its slowest whole step in this task (0: none seen yet)

    def sentence(self) -> str:
        what = f"request {self.task}" if self.task is not None else "a request"
        return (f"{what} (slot {self.slot}) has decoded nothing for {self.stalled_s:.0f} s "
                f"(stuck at {self.n_decoded} tokens)")


class StallWatch:
    """Per busy slot, since when its progress has not moved, and its slowest whole step so far
    (between two moves seen: the first move after a slot is first seen ends a partial step)."""

    def __init__(self, stall_s: float = STALL_S) -> None:
        self.stall_s = stall_s
        # slot -> (progress, since, since a move, slowest whole step of this task)
        self._seen: dict[int, tuple[tuple[Any, ...], float, bool, float]] = {}

    def update(self, slots: list[dict[str, Any]], now: float) -> list[StalledSlot]:
        """The busy slots stalled for stall_s or more, from one parsed /slots read."""
        stalled = []
        busy = {s["id"]: s for s in slots if s["processing"]}
        for slot_id in list(self._seen):
            if slot_id not in busy:
                del self._seen[slot_id]
        for slot_id, slot in busy.items():
            progress = (slot["task"], slot["n_decoded"], slot["n_prompt_processed"])
            previous = self._seen.get(slot_id)
            if previous is None or previous[0][0] != progress[0]:
                self._seen[slot_id] = (progress, now, False, 0.0)
                continue
            seen, since, moved, slowest = previous
            if seen != progress:
                self._seen[slot_id] = (progress, now, True,
                                       max(slowest, now - since) if moved else slowest)
                continue
            if now - since >= self.stall_s:
                stalled.append(StalledSlot(slot_id, slot["task"], slot["n_decoded"],
                                           now - since, slowest))
        return stalled

    def reset(self) -> None:
        self._seen.clear()


async def process_stopped(transport: Transport, pid: int, timeout: float) -> str | None:
    """The process's ps STAT when it is stopped (does not run), else None (running, sleeping,
    or gone: the status check tells those)."""
    result = await transport.run(quote_argv(["ps", "-o", "stat=", "-p", str(int(pid))]),
                                 timeout=timeout)
    stat = result.stdout.strip()
    return stat if stat[:1] in NOT_RUNNING else None


def silent_address(profile: wait_sampler.WaitProfile | None) -> tuple[Address, int, int] | None:
    """(the worker address, its samples, all samples) when the decode thread sat in a call on
    that one worker's connection in SILENT_SHARE of the samples or more."""
    if profile is None:
        return None
    total = profile.busy + profile.other
    for address, count in profile.waiting.items():
        if total and count >= SILENT_SHARE * total:
            return address, count, total
    return None


@dataclass(frozen=True)
class Blame:
    pid: int  # the worker blamed (another pid on the node is another worker)
    reason: str
    stopped: bool  # its process was stopped; else it runs but does not answer
    endpoint: str  # where the coordinator reaches it (a running one is asked a HELLO there)


class StallDetector:
    """Finds the worker a stalled request waits on, and keeps it `not responding` while it
    stays so."""

    def __init__(self) -> None:
        self.watch = StallWatch()
        self.blamed: dict[str, Blame] = {}
        self._decode: tuple[int, int] | None = None  # (coordinator pid, its decode thread)

    async def look(self, slots: list[dict[str, Any]], coordinator_pid: int | None,
                   suspects: Sequence[tuple[NodeConfig, NodeStatus]],
                   endpoints: dict[str, str],
                   transport: Callable[[str], Transport]) -> dict[str, Blame]:
        """The workers newly blamed for a stalled request (node -> blame). `suspects`: the ready
        workers with a pid; `endpoints`: node -> "host:port" the coordinator uses."""
        stalled = self.watch.update(slots, time.monotonic())
        if not stalled:
            return {}
        suspects = [(n, st) for n, st in suspects if n.name not in self.blamed]
        if not suspects:
            return {}

        async def ask(node: NodeConfig, pid: int) -> str | None:
            try:
                return await asyncio.wait_for(process_stopped(
                    transport(node.name), pid, STALL_ASK_S), STALL_ASK_S)
            except Exception:  # a node that does not answer is the status check's to report
                return None

        slot = stalled[0]
        floor = SILENT_FIRST_STEP_S if slot.slowest_step_s == 0 else STALL_S
        sampled = coordinator_pid is not None and slot.stalled_s >= max(
            floor, SLOW_STEP_FACTOR * slot.slowest_step_s)
        stats, silent = await asyncio.gather(
            asyncio.gather(*(ask(n, st.pid or 0) for n, st in suspects)),
            self._silent(coordinator_pid, suspects, endpoints) if sampled
            else asyncio.sleep(0, None))
        found: dict[str, Blame] = {}
        for (node, status), stat in zip(suspects, stats, strict=True):
            if stat is not None:
                found[node.name] = Blame(status.pid or 0, (
                    f"its worker (pid {status.pid}) is stopped (ps state {stat}) while "
                    f"{slot.sentence()}: it holds the request up; resume it (kill -CONT "
                    f"{status.pid}) or restart it"), True, endpoints.get(node.name, node.endpoint))
        if not found and silent is not None:
            (node, status), address, count, total = silent
            found[node.name] = Blame(status.pid or 0, (
                f"its worker (pid {status.pid}) runs but does not answer: {slot.sentence()}, "
                f"and llama-server has waited on this worker's connection ({address[0]}:"
                f"{address[1]}) in {count} of {total} samples over the last "
                f"{SILENT_SAMPLE_S:g} s; deadlocked, looping, or its link drops the traffic: "
                "restart it"), False, endpoints.get(node.name, node.endpoint))
        self.blamed.update(found)
        return found

    async def _silent(self, pid: int | None, suspects: Sequence[tuple[NodeConfig, NodeStatus]],
                      endpoints: dict[str, str]
                      ) -> tuple[tuple[NodeConfig, NodeStatus], Address, int, int] | None:
        """The one suspect llama-server's decode thread sits waiting on, sampled."""
        owner: dict[Address, tuple[NodeConfig, NodeStatus]] = {}
        for node, status in suspects:
            endpoint = endpoints.get(node.name, node.endpoint)
            for address in await asyncio.to_thread(wait_sampler.endpoint_addresses, endpoint):
                owner[address] = (node, status)
        if pid is None or not owner:
            return None
        # Every worker of the plan is asked for: the thread may wait on one not suspected.
        workers = set(owner)
        for endpoint in endpoints.values():
            workers |= await asyncio.to_thread(wait_sampler.endpoint_addresses, endpoint)
        tid = self._decode[1] if self._decode is not None and self._decode[0] == pid else None
        profile = await asyncio.to_thread(wait_sampler.sample, pid, SILENT_SAMPLE_S, workers,
                                          tid=tid)
        self._decode = (pid, profile.tid) if profile is not None else None
        found = silent_address(profile)
        if found is None or found[0] not in owner:
            return None
        return owner[found[0]], *found

    async def kept(self, node: NodeConfig, transport: Transport, pid: int) -> str | None:
        """The reason while the worker blamed is still the same process and still stopped,
        or (a running one) its RPC port still does not answer a HELLO; else None (cleared)."""
        blame = self.blamed.get(node.name)
        if blame is None:
            return None
        if blame.pid == pid:
            if blame.stopped:
                if await process_stopped(transport, pid, node.ssh.status_timeout) is not None:
                    return blame.reason
            else:
                host, _, port = blame.endpoint.rpartition(":")
                with contextlib.suppress(llama_rpc.HelloError, ValueError):
                    await llama_rpc.hello(host.strip("[]"), int(port), timeout=STALL_ASK_S)
                    self.blamed.pop(node.name, None)
                    return None
                return blame.reason
        self.blamed.pop(node.name, None)
        return None
