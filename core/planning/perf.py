"""The performance model: predicted generation tokens/s of a plan, from measured node and link
speeds and the model's shape. Pure: no IO, no clocks.

llama.cpp over RPC runs the blocks in turn, one node after the other, for every token: a
token's time is the sum of each node's compute for its blocks plus, for each worker, the round
trips the coordinator makes to it and the activations it sends over the link. So the slowest
node does not set the pace alone: every node and every link adds its own part, and each part's
share of the token's time says where the time goes (the bottleneck is the largest part).

Inputs are measurements (core/planning: a node's seconds per block per token through the real
engine on its device; a link's round trip and transfer rate), never guesses; a node or link
without one is left out of the prediction and named in `unknown`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# Round trips llama.cpp makes to each worker per generated token, measured (bench/round_trips.py):
# one rpc-server on this machine holding every block of a demo model, reached through
# tests/latency_relay.py adding D ms each way; llama-server's own time per token was 1.9, 11.9,
# 21.7 and 41.0 ms at D = 0, 5, 10 and 20 ms: a slope of 0.98 round trips (least squares).
# This llama.cpp's RPC client pipelines: SET_TENSOR (the activations in) and GRAPH_COMPUTE are
# sent without waiting; only GET_TENSOR (the result out) waits for its reply.
DEFAULT_ROUND_TRIPS = 1.0
ACTIVATION_BYTES_PER_VALUE = 4  # llama.cpp hands f32 activations between backends


@dataclass(frozen=True)
class NodeSpeed:
    """A node's measured compute for this model: seconds per block per generated token, and
    per block per prompt token when measured."""

    node: str
    block_seconds: float
    prompt_block_seconds: float | None = None


@dataclass(frozen=True)
class LinkSpeed:
    """The link between the coordinator's machine and a node's worker port."""

    node: str
    rtt_seconds: float
    bytes_per_second: float


@dataclass(frozen=True)
class ModelShape:
    n_blocks: int
    n_embd: int

    @property
    def activation_bytes(self) -> int:
        """Bytes of one token's hidden state crossing a link."""
        return self.n_embd * ACTIVATION_BYTES_PER_VALUE


@dataclass(frozen=True)
class NodeTime:
    node: str
    blocks: int
    compute_seconds: float  # per token
    link_seconds: float  # per token (0 for the coordinator's own blocks)
    share: float = 0.0  # of the token's time, compute and link together

    @property
    def seconds(self) -> float:
        return self.compute_seconds + self.link_seconds


@dataclass(frozen=True)
class Prediction:
    tokens_per_s: float  # 0 when nothing could be predicted
    token_seconds: float
    nodes: tuple[NodeTime, ...]
    unknown: tuple[str, ...] = ()  # nodes without a measurement: the prediction leaves them out

    @property
    def bottleneck(self) -> NodeTime | None:
        return max(self.nodes, key=lambda part: part.seconds, default=None)

    def describe(self) -> str:
        """One line per plan: "predicted 41.2 tok/s; alpha 62% (compute 55%, link 7%) ..."."""
        if not self.tokens_per_s:
            return "no prediction: " + (", ".join(self.unknown) or "no nodes") + \
                " not measured"
        parts = []
        for part in self.nodes:
            compute = part.compute_seconds / self.token_seconds
            link = part.link_seconds / self.token_seconds
            parts.append(f"{part.node} {part.share:.0%} (compute {compute:.0%}, link {link:.0%})")
        text = f"predicted {self.tokens_per_s:.1f} tok/s; " + ", ".join(parts)
        if self.unknown:
            text += f"; not measured: {', '.join(self.unknown)}"
        return text


def link_seconds(link: LinkSpeed, shape: ModelShape,
                 round_trips: float = DEFAULT_ROUND_TRIPS) -> float:
    """One token's time on one worker's link: its round trips and the activations, in and out."""
    transfer = 2 * shape.activation_bytes / link.bytes_per_second if link.bytes_per_second > 0 \
        else 0.0
    return round_trips * link.rtt_seconds + transfer


def predict(spans: Iterable[tuple[str, int]], speeds: Mapping[str, NodeSpeed],
            links: Mapping[str, LinkSpeed], shape: ModelShape, *,
            round_trips: float = DEFAULT_ROUND_TRIPS, local: Iterable[str] = ()) -> Prediction:
    """`spans`: (node, blocks) in the plan's order; `local`: nodes whose blocks run in the
    coordinator's own process (no link)."""
    in_process = set(local)
    parts: list[NodeTime] = []
    unknown: list[str] = []
    for node, blocks in spans:
        if blocks <= 0:
            continue
        speed = speeds.get(node)
        link = links.get(node)
        if speed is None or (node not in in_process and link is None):
            unknown.append(node)
            continue
        wire = 0.0 if node in in_process or link is None else link_seconds(link, shape,
                                                                          round_trips)
        parts.append(NodeTime(node, blocks, blocks * speed.block_seconds, wire))
    total = sum(part.seconds for part in parts)
    if total <= 0 or unknown:
        return Prediction(0.0, 0.0, tuple(parts), tuple(unknown))
    shared = tuple(NodeTime(p.node, p.blocks, p.compute_seconds, p.link_seconds,
                            p.seconds / total) for p in parts)
    return Prediction(1.0 / total, total, shared, ())


def link_cost(node: str, link: LinkSpeed, shape: ModelShape, token_seconds: float,
              round_trips: float = DEFAULT_ROUND_TRIPS) -> str:
    """Why a node was left out: "delta: 20 ms link would cost 38% of each token"."""
    wire = link_seconds(link, shape, round_trips)
    share = wire / (token_seconds + wire) if token_seconds + wire > 0 else 1.0
    return (f"{node}: {link.rtt_seconds * 1000:.0f} ms link would cost {share:.0%} of each "
            "token")
