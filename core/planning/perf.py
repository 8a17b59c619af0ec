"""The performance model: predicted generation and prompt-processing tokens/s of a plan, from
measured node and link speeds and the model's shape. Pure: no IO, no clocks.

llama.cpp over RPC runs the blocks in turn, one node after the other, for every token (in a
single request's decode no two nodes compute at once): a token's time is the coordinator's
fixed work (output layer, sampling, the server loop), plus each node's compute for its blocks,
plus, for each worker, the round trips the coordinator makes to it, the activations it sends
over the link and the RPC's own cost (the graph sent and rebuilt). So the slowest node does not
set the pace alone: every node and every link adds its own part, and each part's share of the
token's time says where the time goes (the bottleneck is the largest part). A prompt is the
same sum for the whole prompt in one batch (one round trip per worker, the activations of
every prompt token).

Inputs are measurements (core/planning/fit.py turns calibration runs through the real engine
into them), never guesses; a node or link without one is left out of the prediction and named
in `unknown`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
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
    """A node's measured compute for this model: seconds per block per generated token and, for
    the coordinator, the fixed seconds every token costs it whatever it holds (the output
    layer, sampling, the server loop). The same for a whole prompt of `prompt_tokens` tokens
    when that was measured."""

    node: str
    block_seconds: float
    fixed_seconds: float = 0.0
    prompt_block_seconds: float | None = None
    prompt_fixed_seconds: float | None = None
    prompt_tokens: int | None = None


@dataclass(frozen=True)
class LinkSpeed:
    """The link between the coordinator's machine and a node's worker port: the network's
    round trip and rate, the RPC's own cost per token beyond them (`overhead_seconds`: the
    graph sent and rebuilt, measured), and a whole prompt's link cost when measured."""

    node: str
    rtt_seconds: float
    bytes_per_second: float
    overhead_seconds: float = 0.0
    prompt_seconds: float | None = None


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
    token_seconds: float  # generation: one token's time; prompt processing: the prompt's
    nodes: tuple[NodeTime, ...]
    unknown: tuple[str, ...] = ()  # nodes without a measurement: the prediction leaves them out
    tokens: int = 1  # tokens in token_seconds (a prompt's length for prompt processing)

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
    """One token's time on one worker's link: its round trips, the activations in and out, and
    the RPC's own overhead."""
    transfer = 2 * shape.activation_bytes / link.bytes_per_second if link.bytes_per_second > 0 \
        else 0.0
    return round_trips * link.rtt_seconds + transfer + link.overhead_seconds


def predict(spans: Iterable[tuple[str, int]], speeds: Mapping[str, NodeSpeed],
            links: Mapping[str, LinkSpeed], shape: ModelShape, *,
            round_trips: float = DEFAULT_ROUND_TRIPS, coordinator: str | None = None
            ) -> Prediction:
    """Generation. `spans`: (node, blocks) in the plan's order; `coordinator`: the node whose
    blocks run in the coordinator's own process (no link) and whose fixed part every token
    pays, whether it holds blocks or not."""
    def compute(speed: NodeSpeed, blocks: int) -> float | None:
        fixed = speed.fixed_seconds if speed.node == coordinator else 0.0
        return blocks * speed.block_seconds + fixed

    return _predict(spans, speeds, links, coordinator, compute,
                    lambda link: link_seconds(link, shape, round_trips), 1)


def predict_prompt(spans: Iterable[tuple[str, int]], speeds: Mapping[str, NodeSpeed],
                   links: Mapping[str, LinkSpeed], *, coordinator: str | None = None
                   ) -> Prediction:
    """Prompt processing of a prompt as long as the calibration's (the coordinator's
    `prompt_tokens`): its tokens/s. No prediction (tokens_per_s 0) when a part has no prompt
    measurement."""
    def compute(speed: NodeSpeed, blocks: int) -> float | None:
        if speed.prompt_block_seconds is None:
            return None
        fixed = (speed.prompt_fixed_seconds or 0.0) if speed.node == coordinator else 0.0
        return blocks * speed.prompt_block_seconds + fixed

    own = speeds.get(coordinator) if coordinator else None
    tokens = own.prompt_tokens if own is not None and own.prompt_tokens else 0
    found = _predict(spans, speeds, links, coordinator, compute,
                     lambda link: link.prompt_seconds, max(tokens, 1))
    return found if tokens else Prediction(0.0, 0.0, found.nodes, found.unknown or
                                           ((coordinator or "the coordinator"),))


def _predict(spans: Iterable[tuple[str, int]], speeds: Mapping[str, NodeSpeed],
             links: Mapping[str, LinkSpeed], coordinator: str | None,
             compute: Callable[[NodeSpeed, int], float | None],
             wire: Callable[[LinkSpeed], float | None], tokens: int) -> Prediction:
    given = [(node, blocks) for node, blocks in spans if blocks > 0]
    if coordinator is not None and all(node != coordinator for node, _ in given):
        given.insert(0, (coordinator, 0))  # its fixed part: every token pays it
    parts: list[NodeTime] = []
    unknown: list[str] = []
    for node, blocks in given:
        speed = speeds.get(node)
        link = links.get(node)
        own = compute(speed, blocks) if speed is not None else None
        cost = 0.0 if node == coordinator else wire(link) if link is not None else None
        if own is None or cost is None:
            unknown.append(node)
            continue
        parts.append(NodeTime(node, blocks, own, cost))
    total = sum(part.seconds for part in parts)
    if total <= 0 or unknown:
        return Prediction(0.0, 0.0, tuple(parts), tuple(unknown), tokens)
    shared = tuple(NodeTime(p.node, p.blocks, p.compute_seconds, p.link_seconds,
                            p.seconds / total) for p in parts)
    return Prediction(tokens / total, total, shared, (), tokens)


def link_cost(node: str, link: LinkSpeed, shape: ModelShape, token_seconds: float,
              round_trips: float = DEFAULT_ROUND_TRIPS) -> str:
    """Why a node was left out: "delta: 20 ms link would cost 38% of each token"."""
    wire = link_seconds(link, shape, round_trips)
    share = wire / (token_seconds + wire) if token_seconds + wire > 0 else 1.0
    return (f"{node}: {link.rtt_seconds * 1000:.0f} ms link would cost {share:.0%} of each "
            "token")
