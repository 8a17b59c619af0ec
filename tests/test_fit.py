"""Fitting calibration runs (core/planning/fit.py) on hand-made runs: the line, what each node
costs against this CPU, and predictions that add up to what was timed."""

from __future__ import annotations

import pytest

from core.planning.fastest import plan_fastest
from core.planning.fit import NodeRuns, Run, derive, fit_line, model_inputs
from core.planning.perf import LinkSpeed, ModelShape, NodeSpeed, predict, predict_prompt
from tests.test_planner import make_model, node

SHAPE = ModelShape(n_blocks=8, n_embd=1024)
B, S, L = 0.012, 0.0005, 0.002  # all on this CPU, a node's extra per block, its link


def test_the_line_ignores_one_odd_point() -> None:
    line = fit_line([(1, 3.0), (2, 5.0), (3, 7.0), (4, 9.0), (2, 50.0)])
    assert line.slope == pytest.approx(2.0) and line.intercept == pytest.approx(1.0)
    flat = fit_line([(3, 1.0), (3, 2.0), (3, 9.0)])
    assert flat.slope == 0 and flat.intercept == 2.0
    with pytest.raises(ValueError):
        fit_line([])


def runs(per_block: float, link: float, noise: tuple[float, ...] = (0.0,) * 8) -> NodeRuns:
    counts = (0, 1, 4, 8, 8, 4, 1, 0)
    timed = tuple(Run(k, B + (k * per_block + link if k else 0) + e,
                      0.5 + (k * 10 * per_block + link if k else 0))
                  for k, e in zip(counts, noise, strict=True))
    return NodeRuns("a", timed, rtt_seconds=0.0005, prompt_tokens=64)


def test_a_node_against_this_cpu_slope_and_link() -> None:
    d = derive(runs(S, L))
    assert d.per_block == pytest.approx(S) and d.link == pytest.approx(L)
    assert d.base == pytest.approx(B)
    assert d.prompt_per_block == pytest.approx(10 * S) and d.prompt_link == pytest.approx(L)
    noisy = derive(runs(S, L, (0.0, 0.0, 0.004, 0.0, 0.0, 0.0, 0.0, 0.0)))  # one slow run
    assert noisy.per_block == pytest.approx(S, abs=1e-4) and noisy.link == pytest.approx(L,
                                                                                        abs=5e-4)


def test_the_link_is_never_below_its_round_trip_and_one_count_takes_it_as_the_link() -> None:
    assert derive(runs(S, 0.0)).link == pytest.approx(0.0005)
    one = NodeRuns("a", (Run(0, B), Run(3, B + 3 * S + 0.0005)), rtt_seconds=0.0005)
    d = derive(one)
    assert d.link == pytest.approx(0.0005) and d.per_block == pytest.approx(S)
    with pytest.raises(ValueError):
        derive(NodeRuns("a", (Run(3, B),)))


def test_predictions_add_up_to_the_timed_runs() -> None:
    local = NodeRuns("coordinator", (Run(0, B, 0.5), Run(0, B, 0.5)), prompt_tokens=64)
    node_b = NodeRuns("b", tuple(Run(k, B + (k * 2 * S + 0.020 if k else 0),
                                     0.5 + (k * 0.01 + 0.021 if k else 0))
                                 for k in (0, 1, 4, 8)), rtt_seconds=0.020, prompt_tokens=64)
    speeds, links = model_inputs(local, [runs(S, L), node_b], SHAPE, output_share=0.1)
    assert speeds["coordinator"].fixed_seconds == pytest.approx(0.1 * B)
    alone = predict([("a", 8)], speeds, links, SHAPE, coordinator="coordinator")
    assert alone.token_seconds == pytest.approx(B + 8 * S + L)  # the run with 8 blocks on a
    both = predict([("a", 5), ("b", 3)], speeds, links, SHAPE, coordinator="coordinator")
    assert both.token_seconds == pytest.approx(B + 5 * S + L + 3 * 2 * S + 0.020)
    assert links["b"].overhead_seconds == pytest.approx(0.0, abs=1e-9)
    shared = predict([("coordinator", 2), ("a", 6)], speeds, links, SHAPE,
                     coordinator="coordinator")
    assert shared.token_seconds == pytest.approx(B + 6 * S + L)
    prompt = predict_prompt([("a", 5), ("b", 3)], speeds, links, coordinator="coordinator")
    assert prompt.token_seconds == pytest.approx(0.5 + 5 * 10 * S + L + 3 * 0.01 + 0.021)
    assert prompt.tokens == 64


def test_fastest_leaves_the_slow_link_out_and_scales_past_every_subset() -> None:
    model = make_model([100] * 8, output=10)
    nodes = [node("near1", 600), node("near2", 600), node("far", 2000)]
    speeds = {"coordinator": NodeSpeed("coordinator", 0.0015, 0.001),
              **{n.name: NodeSpeed(n.name, 0.0015) for n in nodes}}
    links = {"near1": LinkSpeed("near1", 0.0001, 0, 0.001),
             "near2": LinkSpeed("near2", 0.0001, 0, 0.001), "far": LinkSpeed("far", 0.020, 0)}
    found = plan_fastest(model, nodes, speeds, links, context=1)
    assert sorted(a.node for a in found.plan.assignments if a.n_layers) == ["near1", "near2"]
    assert found.prediction is not None and found.prediction.nodes[0].node == "coordinator"
    assert any(note.startswith("far: 20 ms link would cost") for note in found.notes)
    many = [node(f"n{i}", 250) for i in range(40)]  # 2^40 subsets would never finish
    speeds.update({n.name: NodeSpeed(n.name, 0.0015 + i * 1e-5) for i, n in enumerate(many)})
    links.update({n.name: LinkSpeed(n.name, 0.0001 * (i + 1), 0) for i, n in enumerate(many)})
    best = plan_fastest(model, many, speeds, links, context=1)
    assert [a.node for a in best.plan.assignments if a.n_layers] == ["n0", "n1", "n2", "n3"]


def test_a_calibration_whose_runs_disagree_is_called_noisy() -> None:
    from core.planning.fit import NOISY, disagreement

    def runs(times: dict[int, float], base: float = 0.0026) -> NodeRuns:
        return NodeRuns("n", (Run(0, base), Run(0, base),
                              *(Run(k, t) for k, t in times.items() for _ in range(2))))

    clean = runs({1: 0.0036, 4: 0.0040, 8: 0.0046})
    assert disagreement(clean) < 0.05
    spiked = runs({1: 0.0036, 4: 0.0124, 8: 0.0034})  # one block count under another load
    assert disagreement(spiked) > NOISY
    falling = runs({1: 0.1217, 4: 0.0744, 8: 0.0434})  # saves more than this CPU's whole time
    assert disagreement(falling) > NOISY
    assert disagreement(runs({1: 0.004, 8: 0.005})) == 0.0  # two counts: nothing to tell
