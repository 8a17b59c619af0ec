"""The performance model on hand-made measurements: sums, shares, the bottleneck, unknowns."""

from __future__ import annotations

import pytest

from core.planning.perf import (
    LinkSpeed,
    ModelShape,
    NodeSpeed,
    link_cost,
    link_seconds,
    predict,
)

SHAPE = ModelShape(n_blocks=24, n_embd=2048)  # 8 KiB of activations per token


def test_a_token_is_every_nodes_compute_plus_every_workers_link() -> None:
    speeds = {"a": NodeSpeed("a", 0.001), "b": NodeSpeed("b", 0.002)}
    links = {"a": LinkSpeed("a", 0.0005, 1e9), "b": LinkSpeed("b", 0.020, 12.5e6)}
    found = predict([("a", 12), ("b", 12)], speeds, links, SHAPE, round_trips=3)
    wire_b = 3 * 0.020 + 2 * 8192 / 12.5e6
    assert found.token_seconds == pytest.approx(0.012 + 0.024 + 3 * 0.0005 + 16384 / 1e9
                                                + wire_b)
    assert found.tokens_per_s == pytest.approx(1 / found.token_seconds)
    assert sum(part.share for part in found.nodes) == pytest.approx(1.0)
    assert found.bottleneck is not None and found.bottleneck.node == "b"
    assert "b " in found.describe() and "link" in found.describe()


def test_dropping_the_slow_link_is_faster_when_the_blocks_fit_elsewhere() -> None:
    speeds = {n: NodeSpeed(n, 0.001) for n in "abc"}
    links = {"a": LinkSpeed("a", 0.0002, 1e9), "b": LinkSpeed("b", 0.0002, 1e9),
             "c": LinkSpeed("c", 0.020, 1e9)}
    three = predict([("a", 8), ("b", 8), ("c", 8)], speeds, links, SHAPE)
    two = predict([("a", 12), ("b", 12)], speeds, links, SHAPE)
    assert two.tokens_per_s > 1.5 * three.tokens_per_s
    sentence = link_cost("c", links["c"], SHAPE, two.token_seconds)
    assert sentence.startswith("c: 20 ms link would cost ") and "% of each token" in sentence


def test_the_coordinators_own_blocks_cross_no_link_and_unknowns_are_named() -> None:
    speeds = {"here": NodeSpeed("here", 0.001)}
    found = predict([("here", 24)], speeds, {}, SHAPE, local=["here"])
    assert found.token_seconds == pytest.approx(0.024) and found.nodes[0].link_seconds == 0
    missing = predict([("here", 12), ("x", 12)], speeds, {}, SHAPE, local=["here"])
    assert missing.tokens_per_s == 0 and missing.unknown == ("x",)
    assert missing.describe() == "no prediction: x not measured"
    assert link_seconds(LinkSpeed("z", 0.001, 0), SHAPE, round_trips=2) == pytest.approx(0.002)
