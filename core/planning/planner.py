"""Which layers go where: contiguous block ranges per node, in --rpc order, so that no node holds
more than its budget; or a refusal that says how much is missing and where.

How llama.cpp places what the plan decides (llama_model::load_tensors, this version):
- every block's weights and its KV cache go to the block's device;
- the output head (output norm + matrix, or a second copy of token_embd when tied) goes to the
  device of the last block when -ngl covers all blocks + 1;
- token_embd (the input layer) always stays on the coordinator's CPU;
- with -ngl smaller than blocks + 1, the FIRST blocks stay on the coordinator's CPU, so the
  coordinator's own share (when it has one) is always the first range.
`load_log.tensor_split_for` turns the plan's block counts into the exact -ngl/-ts.

Feasibility, precisely: with the nodes in --rpc order (the coordinator first, then the order
given), a plan exists when the blocks can be cut into consecutive ranges, one per node, some
possibly empty, such that every node's blocks (weights + KV at the padded context), plus the
output head for the node holding the last block, plus the token embedding for the
coordinator, plus (on the coordinator, when its CPU repacks) the repacked copy of its
matrices, fit its budget. Blocks are whole, so a sum of budgets larger than the model does
not always fit; the planner refuses exactly when no such cut exists.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

from core.planning.model_info import ModelInfo, describe_bytes
from core.planning.repack import CpuRepack

POLICIES = ("pack", "spread")
KV_CELL_PAD = 256  # llama.cpp rounds the context (the KV cells) up to a multiple of this


@dataclass(frozen=True)
class NodeBudget:
    name: str
    available_bytes: int  # measured free memory (RAM or VRAM) on that node
    reserve_bytes: int  # kept free
    max_bytes: int | None = None  # per-node cap (max_memory_gb)
    weight: float = 1.0  # relative speed: faster nodes get layers first (pack) or more (spread)
    is_coordinator: bool = False  # the coordinator's own CPU: holds token_embd and first blocks
    # The coordinator's CPU: which matrices it keeps a second, repacked copy of (None: none).
    repack: CpuRepack | None = None

    @property
    def budget_bytes(self) -> int:
        """What the plan may put here: free minus reserve, capped, never below 0."""
        budget = self.available_bytes - self.reserve_bytes
        if self.max_bytes is not None:
            budget = min(budget, self.max_bytes)
        return max(0, budget)


@dataclass(frozen=True)
class Assignment:
    node: str
    first_layer: int
    n_layers: int
    weight_bytes: int  # blocks, plus the output head and/or token embedding when held here,
    # plus repacked_bytes
    kv_bytes: int
    holds_output: bool = False
    on_coordinator: bool = False  # blocks on the coordinator's CPU (no --rpc device)
    repacked_bytes: int = 0  # the coordinator CPU's repacked copy of these matrices

    @property
    def last_layer(self) -> int:
        return self.first_layer + self.n_layers - 1

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes


@dataclass(frozen=True)
class Plan:
    policy: str
    assignments: tuple[Assignment, ...]  # --rpc order, contiguous, covering every block
    unused: tuple[str, ...]  # nodes given no blocks, in the order given
    n_layers: int = 0
    context: int = 0  # KV cells per block: the requested context, padded as llama.cpp does
    cache_type: str = "f16"

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(a.node for a in self.assignments)

    def assignment(self, node: str) -> Assignment | None:
        return next((a for a in self.assignments if a.node == node), None)

    def tensor_split(self, order: Sequence[str]) -> list[float]:
        """Blocks per node in `order` (0 for a node without blocks): the proportions of
        llama-server's -ts. Passed raw, llama.cpp would shift a block because it splits
        blocks + 1 units (the output is one): for exact placement give these counts, for the
        RPC devices only, to load_log.tensor_split_for (which gives -ngl and -ts)."""
        known = {a.node: a.n_layers for a in self.assignments}
        unknown = [name for name in order if name not in known and name not in self.unused]
        if unknown:
            raise ValueError(f"not in this plan: {', '.join(unknown)}")
        return [float(known.get(name, 0)) for name in order]

    def rpc_spans(self) -> tuple[tuple[str, int, int], ...]:
        """(node, first block, blocks) of the --rpc workers, in order: what
        Cluster.start_coordinator places; blocks before the first span stay on the
        coordinator's CPU."""
        return tuple((a.node, a.first_layer, a.n_layers) for a in self.assignments
                     if not a.on_coordinator)


class PlanRefused(Exception):
    """The model does not fit: how much is missing and which nodes are full, as a sentence."""

    def __init__(self, message: str, missing_bytes: int, full_nodes: tuple[str, ...],
                 needed_bytes: int = 0, capacity_bytes: int = 0) -> None:
        super().__init__(message)
        self.missing_bytes = missing_bytes
        self.full_nodes = full_nodes
        self.needed_bytes = needed_bytes
        self.capacity_bytes = capacity_bytes


def kv_cells(context: int) -> int:
    return -(-context // KV_CELL_PAD) * KV_CELL_PAD


def layer_costs(model: ModelInfo, context: int, cache_type: str = "f16") -> list[int]:
    """Bytes each block takes on its node: its tensors plus its KV cache at `context`."""
    cells = kv_cells(context)
    return [model.layer_bytes[i] + cells * model.kv_bytes_per_token_per_layer(cache_type, i)
            for i in range(model.n_layers)]


class _Blocks:
    """Prefix sums of block costs, and how far a node of a given budget reaches."""

    def __init__(self, costs: Sequence[int], output_bytes: int) -> None:
        self.n = len(costs)
        self.output = output_bytes
        self.prefix = [0]
        for cost in costs:
            self.prefix.append(self.prefix[-1] + cost)

    def cost(self, first: int, end: int) -> int:
        """Bytes of blocks first..end-1, with the output head when end is the last block."""
        return self.prefix[end] - self.prefix[first] + (self.output if end == self.n else 0)

    def reach(self, budget: int, start: int) -> int:
        """The furthest end a node with `budget` reaches from block `start` (start itself
        when it cannot take one more block); reaching the end means holding the output too."""
        if start >= self.n or self.cost(start, self.n) <= budget:
            return self.n
        end = bisect.bisect_right(self.prefix, self.prefix[start] + budget) - 1
        return min(end, self.n - 1)

    def earliest_start(self, budget: int, end: int) -> int:
        """The earliest block a node with `budget` can start at and still hold up to `end`
        (end itself when it cannot take the block before)."""
        if end == self.n:
            start = bisect.bisect_left(self.prefix, self.prefix[self.n] + self.output - budget)
            return start if start <= self.n - 1 else self.n
        return bisect.bisect_left(self.prefix, self.prefix[end] - budget)


def _fewest_nodes(blocks: Sequence[_Blocks], budgets: Sequence[int], forced: set[int],
                  excluded: set[int], n: int) -> int | None:
    """The fewest nodes (in this order, each a possibly empty range; `blocks[i]` is the
    blocks' cost on node i) that hold all `n` blocks, counting every node in `forced` and none
    in `excluded`; None when impossible. A forced node may get no block here: a caller asking
    for the global minimum never sees that."""
    size = len(budgets)
    # furthest[c]: the furthest prefix of blocks c counted nodes reach; -1: unreachable.
    furthest = [0] + [-1] * size
    for index, budget in enumerate(budgets):
        if index in excluded:
            continue
        step = [-1] * (size + 1) if index in forced else list(furthest)
        for count in range(1, size + 1):
            if furthest[count - 1] >= 0:
                step[count] = max(step[count],
                                  blocks[index].reach(budget, furthest[count - 1]))
        furthest = step
    return next((c for c, end in enumerate(furthest) if end == n), None)


def _fill(blocks: Sequence[_Blocks], budgets: Sequence[int],
          targets: Sequence[float] | None) -> list[int]:
    """Blocks per node, in order (`blocks[j]`: their cost on node j). targets None: each node
    takes all it can (greedy). Else each node takes as close to its share (by target weight,
    of the blocks still unplaced) as keeps the rest placeable on the nodes after it."""
    size = len(budgets)
    n = blocks[0].n
    # earliest[j]: the earliest block from which nodes j.. can hold everything to the end.
    earliest = [n] * (size + 1)
    for j in range(size - 1, -1, -1):
        earliest[j] = blocks[j].earliest_start(budgets[j], earliest[j + 1])
    counts = []
    start = 0
    ideal = 0.0  # where this node's range would start in an unrounded proportional split
    for j, budget in enumerate(budgets):
        most = blocks[j].reach(budget, start) - start
        least = max(0, earliest[j + 1] - start)
        if targets is None:
            take = most
        else:
            rest = sum(targets[j:])
            ideal_end = ideal + (n - ideal) * targets[j] / rest if rest > 0 else ideal
            # Rounding the cumulative end keeps every node within one block of its share.
            want = math.floor(ideal_end + 0.5) - start
            take = min(max(want, least), most)
            ideal = ideal_end if take == want else float(start + take)
        counts.append(take)
        start += take
    if start != n:
        raise AssertionError("fill called on an infeasible layout")
    return counts


def plan_layers(model: ModelInfo, nodes: Sequence[NodeBudget], *, context: int,
                cache_type: str = "f16", policy: str = "pack") -> Plan:
    """Assign every block to one node. `pack`: the fewest nodes that hold the model, the
    fastest (then the coordinator's own device, which costs no RPC hop, then the roomiest,
    then the first given) preferred, each filled in --rpc order as far as it goes.
    `spread`: every node with a budget, blocks in proportion to weight, capped by budget,
    what a node cannot take going to the ones after it. Raises PlanRefused
    when no contiguous assignment exists (see the module docstring) and ValueError for
    inconsistent arguments."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r} (known: {', '.join(POLICIES)})")
    if context < 1:
        raise ValueError("context must be at least 1 token")
    if model.n_layers < 1:
        raise ValueError(f"{model.path}: a model without blocks cannot be planned")
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise ValueError(f"node names must be unique: {', '.join(names)}")
    if any(not n.weight > 0 or not math.isfinite(n.weight) for n in nodes):
        raise ValueError("every node's weight must be a positive number")
    coordinators = [n for n in nodes if n.is_coordinator]
    if len(coordinators) > 1:
        raise ValueError("at most one node can be the coordinator's own device")
    # llama.cpp keeps the first blocks on the coordinator's CPU: its range comes first.
    ordered = coordinators + [n for n in nodes if not n.is_coordinator]
    costs = layer_costs(model, context, cache_type)
    worker = _Blocks(costs, model.output_bytes)
    blocks = [_coordinator_blocks(model, costs, n.repack) if n.is_coordinator else worker
              for n in ordered]
    # token_embd is input, always on the coordinator's CPU; a worker never holds it.
    embedding = model.embedding_bytes if coordinators else 0
    _check_coordinator(model, coordinators, embedding)
    budgets = [max(0, n.budget_bytes - (embedding if n.is_coordinator else 0)) for n in ordered]
    if _fewest_nodes(blocks, budgets, set(), set(), model.n_layers) is None:
        raise _refusal(ordered, budgets, blocks, worker, embedding, kv_cells(context))

    if policy == "pack":
        chosen = _pack_choice(blocks, ordered, budgets)
        counts = [0] * len(ordered)
        picked = _fill([blocks[i] for i in chosen], [budgets[i] for i in chosen], None)
        for index, count in zip(chosen, picked, strict=True):
            counts[index] = count
    else:
        # A node without budget gets no share, only what nothing else can take (free blocks).
        counts = _fill(blocks, budgets, [n.weight if b > 0 else 0.0
                                         for n, b in zip(ordered, budgets, strict=True)])
    return _plan(model, ordered, counts, policy, context, cache_type, embedding,
                 [n.name for n in nodes])


def _coordinator_blocks(model: ModelInfo, costs: Sequence[int],
                        repack: CpuRepack | None) -> _Blocks:
    """The blocks' cost on the coordinator's CPU: with the repacked copy it keeps of their
    matrices (and of the output head's) when it repacks."""
    if repack is None or not repack.repacks or not model.layer_matrices:
        return _Blocks(costs, model.output_bytes)
    return _Blocks([cost + repack.repacked_bytes(matrices)
                    for cost, matrices in zip(costs, model.layer_matrices, strict=True)],
                   model.output_bytes + repack.repacked_bytes(model.output_matrices))


def _pack_choice(blocks: Sequence[_Blocks], ordered: Sequence[NodeBudget],
                 budgets: Sequence[int]) -> list[int]:
    """Indices (in --rpc order) of the fewest nodes that hold the model; among equally few,
    the best by (weight, coordinator first, budget, position) compared node by node from the
    best down. The coordinator's own device wins a tie of weights although its budget lost
    the token embedding: its blocks cost no RPC hop."""
    n = blocks[0].n
    fewest = _fewest_nodes(blocks, budgets, set(), set(), n)
    assert fewest is not None
    ranking = sorted(range(len(ordered)), key=lambda i: (
        -ordered[i].weight, not ordered[i].is_coordinator, -budgets[i], i))
    forced: set[int] = set()
    excluded: set[int] = set()
    for index in ranking:
        if len(forced) < fewest:
            trial = _fewest_nodes(blocks, budgets, forced | {index}, excluded, n)
            if trial is not None and trial <= fewest:
                forced.add(index)
                continue
        excluded.add(index)
    return sorted(forced)


def _plan(model: ModelInfo, ordered: Sequence[NodeBudget], counts: Sequence[int], policy: str,
          context: int, cache_type: str, embedding: int, given: Sequence[str]) -> Plan:
    assignments = []
    first = 0
    last_holder = max(i for i, c in enumerate(counts) if c > 0)
    cells = kv_cells(context)
    for index, (node, count) in enumerate(zip(ordered, counts, strict=True)):
        if count == 0:
            continue
        holds_output = index == last_holder
        weight = sum(model.layer_bytes[first:first + count])
        weight += model.output_bytes if holds_output else 0
        weight += embedding if node.is_coordinator else 0
        repacked = 0
        if node.is_coordinator and node.repack is not None and model.layer_matrices:
            repacked = sum(node.repack.repacked_bytes(m)
                           for m in model.layer_matrices[first:first + count])
            if holds_output:
                repacked += node.repack.repacked_bytes(model.output_matrices)
        assignments.append(Assignment(
            node=node.name, first_layer=first, n_layers=count, weight_bytes=weight + repacked,
            kv_bytes=model.kv_bytes(count, cells, cache_type, first_layer=first),
            holds_output=holds_output, on_coordinator=node.is_coordinator,
            repacked_bytes=repacked))
        first += count
    used = {a.node for a in assignments}
    return Plan(policy=policy, assignments=tuple(assignments),
                unused=tuple(name for name in given if name not in used),
                n_layers=model.n_layers, context=cells, cache_type=cache_type)


def _check_coordinator(model: ModelInfo, coordinators: Sequence[NodeBudget],
                       embedding: int) -> None:
    for node in coordinators:
        if node.budget_bytes < embedding:
            short = embedding - node.budget_bytes
            raise PlanRefused(
                f"the coordinator {node.name} keeps the token embedding "
                f"({describe_bytes(embedding)}) in its own memory but can give only "
                f"{describe_bytes(node.budget_bytes)}: {describe_bytes(short, True)} missing "
                f"there; free memory on it or lower its reserve", short, (node.name,),
                embedding, node.budget_bytes)


def _refusal(ordered: Sequence[NodeBudget], budgets: Sequence[int],
             node_blocks: Sequence[_Blocks], blocks: _Blocks, embedding: int,
             cells: int) -> PlanRefused:
    """The sentence for a model that does not fit: what it needs (`blocks`: on workers), what
    the nodes hold, and what a worker added last would need (whole blocks from where the
    greedy fill stopped)."""
    placed = 0
    for budget, on_node in zip(budgets, node_blocks, strict=True):
        placed = on_node.reach(budget, placed)
    missing = blocks.cost(placed, blocks.n)
    needed = blocks.cost(0, blocks.n) + embedding
    capacity = sum(n.budget_bytes for n in ordered)
    full = tuple(n.name for n, b in zip(ordered, budgets, strict=True) if b > 0)
    empty = [n.name for n, b in zip(ordered, budgets, strict=True) if b == 0]
    rest = (f"block {placed}" if placed == blocks.n - 1
            else f"blocks {placed}-{blocks.n - 1}") + " and the output head"
    if not ordered:
        where = "no node is configured"
    else:
        where = "full: " + (", ".join(full) or "none")
        if empty:
            where += "; nothing free on " + ", ".join(empty)
    needs = f"the model needs {describe_bytes(needed)} at context {cells}"
    if needed > capacity:
        head = f"{needs} but the nodes can hold {describe_bytes(capacity)}"
    else:
        head = (f"{needs} and the nodes hold {describe_bytes(capacity)} in all, but not in "
                "whole blocks")
    message = (f"{head}: {describe_bytes(missing, True)} missing for {rest} ({where}); "
               "add a node, lower context, or raise max_memory_gb")
    return PlanRefused(message, missing, full, needed, capacity)
