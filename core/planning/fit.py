"""From calibration runs to the performance model's inputs (core/planning/perf.py). Pure.

A calibration run is one llama-server load timed on a few requests: `blocks` of the model's
last blocks on one node's worker, the rest on this machine's CPU (the coordinator); blocks 0 is
every block on this CPU. Its time per generated token, and per prompt, is linear in `blocks`:

    T(k) = B + k * s + l

B: every block on this CPU (the coordinator's fixed work per token: the output layer, sampling,
the server loop, plus n times its per-block time), s: the node's time per block minus this
CPU's, l: the worker's link and RPC cost per token (the round trip, the activations, the graph
the coordinator sends and the worker rebuilds). Each node is timed at several block counts,
its runs interleaved with runs of every block on this CPU (B paired in time, so a machine
that slows down for a minute slows both sides): the line through its runs (Theil-Sen, robust to
one odd run) gives s and B + l, its paired runs give B, and l is the difference.

A plan's token time is then B + sum(k_i * s_i + l_i) over its workers, whatever share of the
blocks the coordinator keeps. Splitting B into a fixed part and n times a per-block part only
changes the shares `plan` prints, never a prediction: the split follows the weight bytes (the
output layer's share is the fixed part's)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from core.planning.perf import (
    DEFAULT_ROUND_TRIPS,
    LinkSpeed,
    ModelShape,
    NodeSpeed,
    link_seconds,
)


@dataclass(frozen=True)
class Run:
    blocks: int  # on the node's worker; 0: every block on this CPU
    token_seconds: float  # per generated token
    prompt_seconds: float | None = None  # the whole prompt (NodeRuns.prompt_tokens)


@dataclass(frozen=True)
class NodeRuns:
    """One node's calibration: its runs and its paired all-on-this-CPU runs, and the link."""

    node: str
    runs: tuple[Run, ...]
    rtt_seconds: float = 0.0
    bytes_per_second: float = 0.0
    prompt_tokens: int = 0


@dataclass(frozen=True)
class Line:
    slope: float
    intercept: float


def fit_line(points: Sequence[tuple[float, float]]) -> Line:
    """Theil-Sen: the median of the slopes between every two points at different x, and the
    median intercept under it. One x only: slope 0 through the median. No points: ValueError."""
    if not points:
        raise ValueError("no points to fit")
    slopes = [(y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(points)
              for x2, y2 in points[i + 1:] if x2 != x1]
    slope = statistics.median(slopes) if slopes else 0.0
    return Line(slope, statistics.median(y - slope * x for x, y in points))


@dataclass(frozen=True)
class Derived:
    """One worker against this CPU, per generated token and per prompt."""

    node: str
    per_block: float  # s: its seconds per block minus this CPU's
    link: float  # l: its link and RPC seconds per token
    base: float  # B from its paired runs
    prompt_per_block: float | None = None
    prompt_link: float | None = None
    prompt_base: float | None = None


def derive(found: NodeRuns) -> Derived:
    """s and l of one worker from its runs (ValueError without runs on both sides). With one
    block count only, s and l cannot be told apart: l is taken as its round trip."""
    worker = [r for r in found.runs if r.blocks > 0]
    paired = [r for r in found.runs if r.blocks == 0]
    if not worker or not paired:
        raise ValueError(f"{found.node}: needs runs with blocks on the worker and without")
    base = statistics.median(r.token_seconds for r in paired)
    per_block, link = _split([(r.blocks, r.token_seconds) for r in worker], base,
                             DEFAULT_ROUND_TRIPS * found.rtt_seconds)
    prompt = [(r.blocks, r.prompt_seconds) for r in worker if r.prompt_seconds is not None]
    prompt_paired = [r.prompt_seconds for r in paired if r.prompt_seconds is not None]
    if not prompt or not prompt_paired:
        return Derived(found.node, per_block, link, base)
    prompt_base = statistics.median(prompt_paired)
    p_block, p_link = _split(prompt, prompt_base, found.rtt_seconds)
    return Derived(found.node, per_block, link, base, p_block, p_link, prompt_base)


NOISY = 0.25  # runs further than this from their line (relative) make a calibration noisy


def disagreement(found: NodeRuns) -> float:
    """How far the worker's runs (the median at each block count) lie from the line through
    them, as the largest share of the line's value: 0 for a clean calibration; above NOISY,
    something else loaded this machine or the node while it ran. A line falling faster than
    this CPU's whole time counts too (its share)."""
    worker = [(r.blocks, r.token_seconds) for r in found.runs if r.blocks > 0]
    counts = sorted({k for k, _ in worker})
    if len(counts) < 3:
        return 0.0
    line = fit_line([(float(k), t) for k, t in worker])
    worst = 0.0
    for k in counts:
        at = statistics.median(t for kk, t in worker if kk == k)
        expected = line.intercept + line.slope * k
        if expected > 0:
            worst = max(worst, abs(at - expected) / expected)
    # Blocks on the worker can at most save this CPU's time for them (all of B): a line that
    # falls faster says the runs are not comparable.
    paired = [r.token_seconds for r in found.runs if r.blocks == 0]
    saved = -line.slope * counts[-1]
    if paired and saved > statistics.median(paired) > 0:
        worst = max(worst, saved / statistics.median(paired))
    return worst


def _split(points: Sequence[tuple[int, float]], base: float, floor: float) -> tuple[float, float]:
    """(s, l): the line's slope, and its intercept above `base`, at least `floor` (the round
    trips: the link cannot cost less than the network's part of it)."""
    if len({k for k, _ in points}) < 2:
        k = points[0][0]
        link = max(floor, 0.0)
        return (statistics.median(t for _, t in points) - base - link) / k, link
    line = fit_line([(float(k), t) for k, t in points])
    return line.slope, max(floor, line.intercept - base)


def model_inputs(local: NodeRuns, workers: Sequence[NodeRuns], shape: ModelShape,
                 output_share: float) -> tuple[dict[str, NodeSpeed], dict[str, LinkSpeed]]:
    """The perf model's speeds (the coordinator's under `local.node`) and links. B is the median
    of every all-on-this-CPU run (the coordinator's own and each worker's paired ones).
    `output_share`: the output layer's share of the weight bytes (see the module's note)."""
    derived: dict[str, Derived] = {}
    for found in workers:
        try:
            derived[found.node] = derive(found)
        except ValueError:
            continue
    everything = [local, *(w for w in workers if w.node in derived)]
    paired = [r for w in everything for r in w.runs if r.blocks == 0]
    if not paired:
        return {}, {}
    base = statistics.median(r.token_seconds for r in paired)
    prompts = [r.prompt_seconds for r in paired if r.prompt_seconds is not None]
    prompt_base = statistics.median(prompts) if prompts else None
    n = shape.n_blocks
    own = base * (1 - output_share) / n
    prompt_own = prompt_base * (1 - output_share) / n if prompt_base is not None else None
    speeds = {local.node: NodeSpeed(
        local.node, own, base * output_share,
        prompt_own, prompt_base * output_share if prompt_base is not None else None,
        local.prompt_tokens or None)}
    links: dict[str, LinkSpeed] = {}
    for found in workers:
        if found.node not in derived:
            continue
        d = derived[found.node]
        per_block = max(own + d.per_block, own * 0.05)
        prompt_block = None
        if prompt_own is not None and d.prompt_per_block is not None:
            prompt_block = max(prompt_own + d.prompt_per_block, prompt_own * 0.05)
        speeds[found.node] = NodeSpeed(found.node, per_block, 0.0, prompt_block, None,
                                       found.prompt_tokens or None)
        link = LinkSpeed(found.node, found.rtt_seconds, found.bytes_per_second)
        links[found.node] = LinkSpeed(found.node, found.rtt_seconds, found.bytes_per_second,
                                      max(0.0, d.link - link_seconds(link, shape)),
                                      d.prompt_link)
    return speeds, links
