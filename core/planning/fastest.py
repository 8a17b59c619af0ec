"""`[plan] policy = "fastest"`: the nodes, order and ranges that maximise the predicted
generation tokens/s (core/planning/perf.py, from calibration) within every memory budget.

A token's time is the sum over the plan's nodes of their compute for their blocks and their
link, so the order of the workers does not change it; what does is which nodes take part (each
one adds its link) and how many blocks each holds (a faster node should hold as many as its
budget allows). For every subset of the nodes (up to EVERY_SUBSET nodes; beyond, the best n
for every n) the blocks go fastest node first, each taking all its budget holds (the
coordinator's CPU first, as llama.cpp requires); the subset with the best prediction wins, a
larger one only when more than TIE faster (ties go to fewer nodes). A node without a
calibration makes the policy fall back to `pack` (by memory), with a sentence saying so."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from core.planning.layer_map import COORDINATOR
from core.planning.model_info import ModelInfo
from core.planning.perf import (
    DEFAULT_ROUND_TRIPS,
    LinkSpeed,
    ModelShape,
    NodeSpeed,
    Prediction,
    link_cost,
    link_seconds,
    predict,
)
from core.planning.planner import (
    NodeBudget,
    Plan,
    _Blocks,
    _coordinator_blocks,
    _fewest_nodes,
    _fill,
    _plan,
    layer_costs,
    plan_layers,
)

FASTEST = "fastest"
TIE = 0.02  # a plan with more nodes must be this much faster to win
EVERY_SUBSET = 12  # up to this many nodes every subset is tried (4,095); beyond, the best-first


@dataclass(frozen=True)
class FastestPlan:
    plan: Plan
    prediction: Prediction | None
    notes: tuple[str, ...]  # why nodes were left out or kept; a fallback's reason


def plan_fastest(model: ModelInfo, nodes: Sequence[NodeBudget], speeds: Mapping[str, NodeSpeed],
                 links: Mapping[str, LinkSpeed], *, context: int, cache_type: str = "f16",
                 round_trips: float = DEFAULT_ROUND_TRIPS) -> FastestPlan:
    """Raises PlanRefused (from the memory planner) when the model fits nowhere."""
    shape = ModelShape(model.n_layers, model.n_embd)
    missing = [n.name for n in nodes if n.name not in speeds
               or (not n.is_coordinator and n.name not in links)]
    if missing or COORDINATOR not in speeds:
        memory = plan_layers(model, nodes, context=context, cache_type=cache_type,
                             policy="pack")
        named = missing or [COORDINATOR]
        return FastestPlan(memory, None, (
            f"fastest: {', '.join(named)} not calibrated (torbiz-tui calibrate"
            f"{''.join(' ' + m for m in missing)}): placed by memory (pack)",))
    # Refuses, with the memory planner's sentence, when nothing fits.
    plan_layers(model, nodes, context=context, cache_type=cache_type, policy="pack")
    costs = layer_costs(model, context, cache_type)
    worker = _Blocks(costs, model.output_bytes)
    embedding = model.embedding_bytes if any(n.is_coordinator for n in nodes) else 0

    def candidate(subset: Sequence[NodeBudget]) -> tuple[Plan, Prediction] | None:
        coordinator = [n for n in subset if n.is_coordinator]
        workers = sorted((n for n in subset if not n.is_coordinator),
                         key=lambda n: speeds[n.name].block_seconds)
        ordered = coordinator + workers
        blocks = [_coordinator_blocks(model, costs, n.repack) if n.is_coordinator else worker
                  for n in ordered]
        budgets = [max(0, n.budget_bytes - (embedding if n.is_coordinator else 0))
                   for n in ordered]
        if _fewest_nodes(blocks, budgets, set(), set(), model.n_layers) is None:
            return None
        counts = _fill(blocks, budgets, None)
        if any(c == 0 for c in counts):
            return None  # a smaller subset holds the same plan
        plan = _plan(model, ordered, counts, FASTEST, context, cache_type,
                     embedding if coordinator else 0, [n.name for n in nodes])
        found = predict([(a.node, a.n_layers) for a in plan.assignments], speeds, links,
                        shape, round_trips=round_trips, coordinator=COORDINATOR)
        return plan, found

    results: dict[frozenset[str], tuple[Plan, Prediction]] = {}
    for subset in _subsets(nodes, speeds, links, shape, round_trips):
        found = candidate(subset)
        if found is not None:
            results[frozenset(n.name for n in subset)] = found
    best_key = None
    for key, (_, rate) in sorted(results.items(), key=lambda item: len(item[0])):
        if best_key is None or rate.tokens_per_s > \
                results[best_key][1].tokens_per_s * (1 + TIE):
            best_key = key
    assert best_key is not None  # plan_layers found a plan, so some subset holds it
    best, prediction = results[best_key]
    notes: list[str] = []
    for node in nodes:
        if node.name in best_key:
            continue
        with_it = [f for k, (_, f) in results.items() if node.name in k]
        link = links.get(node.name)
        if not with_it:
            notes.append(f"{node.name}: left out (no plan with it fits its budget)")
            continue
        fastest_with = max(f.tokens_per_s for f in with_it)
        why = (link_cost(node.name, link, shape, prediction.token_seconds, round_trips)
               if link is not None else f"{node.name}: slower")
        notes.append(f"{why}; left out: the best plan with it makes {fastest_with:.1f} tok/s, "
                     f"without {prediction.tokens_per_s:.1f}")
    for part in prediction.nodes:
        needed = not any(part.node not in k for k in results)
        if needed and part.link_seconds > 0:
            notes.append(f"{part.node}: kept, the model does not fit without it; it costs "
                         f"{part.share:.0%} of each token (link {part.link_seconds * 1000:.1f} "
                         f"ms, compute {part.compute_seconds * 1000:.1f} ms)")
    return FastestPlan(best, prediction, tuple(notes))



def _subsets(nodes: Sequence[NodeBudget], speeds: Mapping[str, NodeSpeed],
             links: Mapping[str, LinkSpeed], shape: ModelShape, round_trips: float
             ) -> Iterator[Sequence[NodeBudget]]:
    """Every subset of up to EVERY_SUBSET nodes; for more, the coordinator (when planned) with
    the n best workers for every n (best: least link and per-block time), so 64 nodes are 64
    candidates, not 2^64."""
    if len(nodes) <= EVERY_SUBSET:
        for size in range(1, len(nodes) + 1):
            yield from itertools.combinations(nodes, size)
        return
    coordinator = [n for n in nodes if n.is_coordinator]
    workers = sorted((n for n in nodes if not n.is_coordinator), key=lambda n: (
        link_seconds(links[n.name], shape, round_trips) + speeds[n.name].block_seconds))
    for size in range(1, len(workers) + 1):
        yield workers[:size]
        if coordinator:
            yield [*coordinator, *workers[:size]]
    if coordinator:
        yield coordinator
