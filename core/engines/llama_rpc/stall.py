"""A decode stalled on a silent worker, seen from the coordinator.

llama-server answers /health and /slots while its decode loop waits on a worker that does not
answer (SIGSTOPped, deep in swap): a busy slot's `n_decoded` (or, while it reads its prompt,
`n_prompt_tokens_processed`) simply stops moving. Its node may still answer SSH, so the status
check alone says `ready`. A stall past STALL_S is the cue to ask each worker's node whether its
process runs: one that is stopped (ps state T) is the worker the request waits on, and is
`not responding` for as long as it stays stopped. The threshold only decides when to ask;
a worker is never blamed for a slow decode, only for a process that does not run.

llama.cpp's rpc-server serves one client at a time, so a worker cannot be asked over RPC
while the coordinator holds its connection: the node answers instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.reach.shell import quote_argv
from core.reach.transport import Transport

STALL_S = 2.0  # a busy slot whose progress has not moved for this long is looked into
STALL_ASK_S = 1.0  # deadline of asking a node whether its worker runs
NOT_RUNNING = ("T", "t")  # ps STAT: stopped by a signal, or by a tracer


@dataclass(frozen=True)
class StalledSlot:
    slot: int
    task: int | None
    n_decoded: int
    stalled_s: float

    def sentence(self) -> str:
        what = f"request {self.task}" if self.task is not None else "a request"
        return (f"{what} (slot {self.slot}) has decoded nothing for {self.stalled_s:.0f} s "
                f"(stuck at {self.n_decoded} tokens)")


class StallWatch:
    """Per busy slot, since when its progress has not moved."""

    def __init__(self, stall_s: float = STALL_S) -> None:
        self.stall_s = stall_s
        self._seen: dict[int, tuple[tuple[Any, ...], float]] = {}  # slot -> (progress, since)

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
            if previous is None or previous[0] != progress:
                self._seen[slot_id] = (progress, now)
                continue
            if now - previous[1] >= self.stall_s:
                stalled.append(StalledSlot(slot_id, slot["task"], slot["n_decoded"],
                                           now - previous[1]))
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
