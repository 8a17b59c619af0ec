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
    predict_prompt,
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
    speeds = {"here": NodeSpeed("here", 0.001, fixed_seconds=0.002)}
    found = predict([("here", 24)], speeds, {}, SHAPE, coordinator="here")
    assert found.token_seconds == pytest.approx(0.026) and found.nodes[0].link_seconds == 0
    missing = predict([("here", 12), ("x", 12)], speeds, {}, SHAPE, coordinator="here")
    assert missing.tokens_per_s == 0 and missing.unknown == ("x",)
    assert missing.describe() == "no prediction: x not measured"
    assert link_seconds(LinkSpeed("z", 0.001, 0), SHAPE, round_trips=2) == pytest.approx(0.002)
    assert link_seconds(LinkSpeed("z", 0.001, 0, overhead_seconds=0.0005), SHAPE) == \
        pytest.approx(0.0015)


def test_the_coordinators_fixed_part_counts_when_it_holds_no_block() -> None:
    speeds = {"here": NodeSpeed("here", 0.001, fixed_seconds=0.003),
              "a": NodeSpeed("a", 0.002)}
    links = {"a": LinkSpeed("a", 0.001, 0)}
    found = predict([("a", 24)], speeds, links, SHAPE, coordinator="here")
    assert found.token_seconds == pytest.approx(0.003 + 0.048 + 0.001)
    assert [(p.node, p.blocks) for p in found.nodes] == [("here", 0), ("a", 24)]
    assert predict([("a", 24)], {"a": speeds["a"]}, links, SHAPE,
                   coordinator="here").unknown == ("here",)


def test_prompt_processing_is_the_same_sum_for_a_whole_prompt() -> None:
    speeds = {"here": NodeSpeed("here", 0.001, 0.002, 0.010, 0.004, prompt_tokens=64),
              "a": NodeSpeed("a", 0.002, 0.0, 0.020, None, 64)}
    links = {"a": LinkSpeed("a", 0.001, 0, prompt_seconds=0.006)}
    found = predict_prompt([("here", 4), ("a", 20)], speeds, links, coordinator="here")
    seconds = 0.004 + 4 * 0.010 + 20 * 0.020 + 0.006
    assert found.token_seconds == pytest.approx(seconds) and found.tokens == 64
    assert found.tokens_per_s == pytest.approx(64 / seconds)
    unmeasured = {"here": speeds["here"], "a": NodeSpeed("a", 0.002)}
    assert predict_prompt([("a", 24)], unmeasured, links, coordinator="here").tokens_per_s == 0
