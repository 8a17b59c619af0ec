"""Where each token's time goes while the cluster runs: per node, its compute and its link, as
a share of the measured time per token; the largest is the bottleneck.

Everything here is measured, none of it predicted:
- the time per token: the coordinator's own decode rate (the running requests', else the
  last request's), per request;
- the coordinator's decode loop, sampled while requests run (llama_rpc/wait_sampler.py): the
  share of samples it computes itself, and per worker the share it waits on that worker's
  socket (the worker's compute and its link together);
- each worker's compute: the CPU time its main thread used (the thread that computes, thread 0
  of every graph, and sleeps on its socket in between) per second of that busy time; the rest
  of the wait on it is its link (round trips, bytes, anything in between).

Pure: callers hand in the samples; no IO, no clocks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from core.planning.layer_map import COORDINATOR  # the coordinator's part: its llama-server

RUNNING, LAST = "running", "last request"


@dataclass(frozen=True)
class PartShare:
    node: str  # a worker, or COORDINATOR
    blocks: int | None
    compute_s: float  # per token
    link_s: float  # per token (0 for the coordinator): the wait on it beyond its compute
    share: float  # of the token's time, compute and link together

    @property
    def seconds(self) -> float:
        return self.compute_s + self.link_s


@dataclass(frozen=True)
class Bottleneck:
    token_s: float  # measured time per token, per request
    rate_from: str  # RUNNING or LAST
    parts: tuple[PartShare, ...]
    unmeasured: tuple[str, ...] = ()  # workers with no CPU figure: their wait counts as link
    age_s: float = 0.0  # since the CPU figures were taken (0: this poll)

    @property
    def slowest(self) -> PartShare | None:
        return max(self.parts, key=lambda p: p.seconds, default=None)

    def cell(self, node: str) -> str:
        """The node table's cell: "62% c55 l7" (share, compute %, link %), "◀" on the slowest."""
        part = next((p for p in self.parts if p.node == node), None)
        if part is None:
            return "-"
        if node in self.unmeasured:
            text = f"{part.share:.0%} c? l?"
        else:
            text = (f"{part.share:.0%} c{100 * part.compute_s / self.token_s:.0f} "
                    f"l{100 * part.link_s / self.token_s:.0f}")
        slowest = self.slowest
        return text + (" ◀" if slowest is not None and slowest.node == node else "")

    def split_text(self, part: PartShare) -> str:
        """ "compute 3%, link 93%" of the token's time."""
        return (f"compute {part.compute_s / self.token_s:.0%}, "
                f"link {part.link_s / self.token_s:.0%}")

    def part_text(self, node: str) -> str:
        """The layer map's words: "96% of a token (compute 3%, link 93%) ◀" ("" if not a part)."""
        part = next((p for p in self.parts if p.node == node), None)
        if part is None:
            return ""
        slowest = self.slowest
        mark = " ◀" if slowest is not None and slowest.node == node else ""
        return f"{part.share:.0%} of a token ({self.split_text(part)}){mark}"

    def sentence(self) -> str:
        """ "slowest: node3, 62% of each 41.0 ms token (compute 55%, link 7%)" """
        part = self.slowest
        if part is None:
            return ""
        return (f"slowest: {part.node}, {part.share:.0%} of each {self.token_s * 1000:.1f} ms "
                f"token ({self.split_text(part)})")

    def lines(self) -> list[str]:
        """The headless `status`'s lines: the token's time, then one line per part."""
        when = "now" if self.age_s < 2 else f"measured {self.age_s:.0f} s ago"
        out = [f"each token: {self.token_s * 1000:.1f} ms ({when}); where it goes:"]
        slowest = self.slowest
        for part in self.parts:
            if part.node in self.unmeasured:
                split_text = "compute and link not told apart: its CPU could not be read"
            else:
                split_text = self.split_text(part)
            mark = "  <- slowest" if slowest is not None and part.node == slowest.node else ""
            out.append(f"  {part.node}: {part.share:.0%} ({split_text}){mark}")
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], age_s: float) -> Bottleneck | None:
        """What to_json wrote (None: not that shape)."""
        try:
            parts = tuple(PartShare(**part) for part in data["nodes"])
            return cls(float(data["token_seconds"]), str(data["rate_from"]), parts,
                       tuple(str(n) for n in data.get("unmeasured", ())), max(0.0, age_s))
        except (KeyError, TypeError, ValueError):
            return None

    def to_json(self) -> dict[str, Any]:
        slowest = self.slowest
        return {"token_seconds": self.token_s, "rate_from": self.rate_from,
                "slowest": slowest.node if slowest else None, "age_s": round(self.age_s, 1),
                "unmeasured": list(self.unmeasured),
                "nodes": [asdict(part) for part in self.parts]}


def token_seconds(running_tps: float, slots_decoding: int,
                  last_tps: float | None) -> tuple[float, str] | None:
    """One request's time per token: the running rate shared by the slots decoding together
    (llama.cpp decodes them in one batch per step), else the last request's rate."""
    if running_tps > 0:
        return max(1, slots_decoding) / running_tps, RUNNING
    if last_tps:
        return 1.0 / last_tps, LAST
    return None


def split(token: tuple[float, str], workers: Sequence[tuple[str, int | None]],
          waits: Mapping[str, float], coordinator: float, busy: float,
          cpu: Mapping[str, float | None]) -> Bottleneck:
    """`workers`: (node, blocks) of the workers holding blocks, in order; `waits`: per worker
    the share of the decode loop's busy samples spent waiting on it, `coordinator` the share
    it ran; `busy`: the share of the sampled seconds that were busy (decoding at all); `cpu`:
    each worker's main-thread CPU seconds per second over about the same seconds."""
    token_s, rate_from = token
    shares = [PartShare(COORDINATOR, None, coordinator * token_s, 0.0, coordinator)]
    unmeasured = []
    for node, blocks in workers:
        waited = waits.get(node, 0.0)
        rate = cpu.get(node)
        if rate is None or busy <= 0:
            unmeasured.append(node)
            compute = 0.0
        else:
            compute = min(waited, max(0.0, rate) / busy)
        shares.append(PartShare(node, blocks, compute * token_s, (waited - compute) * token_s,
                                waited))
    return Bottleneck(token_s, rate_from, tuple(shares), tuple(unmeasured))
