"""The planner against a brute-force oracle (hypothesis), a Llama-2-70B-shaped model on four
nodes, refusals as sentences, and its byte accounting against a real llama-server load log."""

from __future__ import annotations

import itertools
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.demo_model import write_demo_model
from core.engines.llama_rpc.build import find_cached_binary
from core.planning.model_info import ModelInfo, describe_bytes, read_gguf_info
from core.planning.placement import local_cpu_repack
from core.planning.planner import (
    NodeBudget,
    Plan,
    PlanRefused,
    kv_cells,
    layer_costs,
    plan_layers,
)
from core.planning.repack import NO_REPACK, cpu_repack
from core.supervision.load_log import (
    HOST,
    MIB,
    LoadReport,
    llama_layer_split,
    parse_load_log,
    tensor_split_for,
)
from tests.cluster_files import free_port, start_test_workers, stop_all, wait_for_load
from tests.test_model_info import LLAMA2_70B_Q4K_BLOCK, llama2_70b_q4k

GIB = 1 << 30
LOAD_LOGS = Path(__file__).parent / "data" / "load_logs"
PRINTED = 0.0051 * MIB  # llama.cpp prints MiB with two decimals (3.375 shows as 3.38)
# The CPU of the host that recorded the amx_* logs, as /proc/cpuinfo names its features.
AMX_HOST = cpu_repack({"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8"},
                      "x86_64")


def make_model(layer_bytes: Sequence[int], output: int = 0, embedding: int = 0,
               kv_heads: int = 0, head_dim: int = 1) -> ModelInfo:
    return ModelInfo(
        path="m.gguf", architecture="llama", name="m", n_layers=len(layer_bytes),
        layer_bytes=tuple(layer_bytes), embedding_bytes=embedding, output_bytes=output,
        output_tied=False, context_length=4096, n_embd=head_dim, n_head=1, n_head_kv=kv_heads,
        head_dim_k=head_dim, head_dim_v=head_dim)


def node(name: str, budget: int, **kw: object) -> NodeBudget:
    return NodeBudget(name, available_bytes=budget, reserve_bytes=0, **kw)  # type: ignore[arg-type]


# ---- the oracle -----------------------------------------------------------------------------


def rpc_order(nodes: Sequence[NodeBudget]) -> list[NodeBudget]:
    return [n for n in nodes if n.is_coordinator] + [n for n in nodes if not n.is_coordinator]


def block_cost(model: ModelInfo, layer: int, context: int) -> int:
    """Written out again from the formula, not taken from the planner."""
    cells = -(-context // 256) * 256
    heads = model.n_head_kv
    return model.layer_bytes[layer] + cells * (heads * model.head_dim_k
                                               + heads * model.head_dim_v) * 2


def valid_layouts(model: ModelInfo, nodes: Sequence[NodeBudget],
                  context: int) -> list[tuple[int, ...]]:
    """Every way to cut the blocks into consecutive ranges, one per node in --rpc order, that
    fits every node's budget."""
    order = rpc_order(nodes)
    embedding = model.embedding_bytes if any(n.is_coordinator for n in order) else 0
    if any(n.is_coordinator and n.budget_bytes < embedding for n in order):
        return []
    costs = [block_cost(model, i, context) for i in range(model.n_layers)]
    found = []
    for counts in itertools.product(range(model.n_layers + 1), repeat=len(order)):
        if sum(counts) != model.n_layers:
            continue
        last = max(i for i, c in enumerate(counts) if c)
        first, fits = 0, True
        for index, (n, count) in enumerate(zip(order, counts, strict=True)):
            load = sum(costs[first:first + count])
            load += model.output_bytes if index == last else 0
            load += embedding if n.is_coordinator else 0
            fits = fits and load <= n.budget_bytes
            first += count
        if fits:
            found.append(counts)
    return found


def best_pack_set(model: ModelInfo, nodes: Sequence[NodeBudget],
                  layouts: list[tuple[int, ...]]) -> set[str]:
    """Among the layouts with the fewest nodes, the node set that is best when compared node by
    node in the order (weight, the coordinator's own device, room, position)."""
    order = rpc_order(nodes)
    embedding = model.embedding_bytes if any(n.is_coordinator for n in order) else 0

    def room(n: NodeBudget) -> int:
        return n.budget_bytes - (embedding if n.is_coordinator else 0)

    ranking = sorted(range(len(order)), key=lambda i: (
        -order[i].weight, not order[i].is_coordinator, -room(order[i]), i))
    rank = {index: position for position, index in enumerate(ranking)}
    fewest = min(sum(1 for c in counts if c) for counts in layouts)
    candidates = [sorted(rank[i] for i, c in enumerate(counts) if c) for counts in layouts
                  if sum(1 for c in counts if c) == fewest]
    return {order[ranking[r]].name for r in min(candidates)}


def check_plan(plan: Plan, model: ModelInfo, nodes: Sequence[NodeBudget], context: int) -> None:
    by_name = {n.name: n for n in nodes}
    order = [n.name for n in rpc_order(nodes)]
    assert [a.node for a in plan.assignments] == [n for n in order if n in plan.nodes]
    embedding = model.embedding_bytes if any(n.is_coordinator for n in nodes) else 0
    first = 0
    for index, a in enumerate(plan.assignments):
        assert a.first_layer == first and a.n_layers >= 1  # contiguous, every block once
        first += a.n_layers
        holds_output = index == len(plan.assignments) - 1
        assert a.holds_output == holds_output
        n = by_name[a.node]
        assert a.on_coordinator == n.is_coordinator
        weight = sum(model.layer_bytes[a.first_layer:a.last_layer + 1])
        weight += model.output_bytes if holds_output else 0
        weight += embedding if n.is_coordinator else 0
        assert a.weight_bytes == weight
        assert a.total_bytes == weight + sum(
            block_cost(model, i, context) - model.layer_bytes[i]
            for i in range(a.first_layer, a.last_layer + 1))
        assert a.total_bytes <= n.budget_bytes  # never over budget
    assert first == model.n_layers
    assert plan.unused == tuple(n.name for n in nodes if n.name not in plan.nodes)
    split = plan.tensor_split([n.name for n in nodes])
    assert sum(split) == model.n_layers
    assert split == [float(a.n_layers) if (a := plan.assignment(n.name)) else 0.0
                     for n in nodes]
    assert [s[0] for s in plan.rpc_spans()] == [a.node for a in plan.assignments
                                                if not a.on_coordinator]


@st.composite
def cases(draw: st.DrawFn) -> tuple[ModelInfo, list[NodeBudget], int]:
    n_layers = draw(st.integers(1, 6))
    kv_heads = draw(st.sampled_from([0, 0, 1]))
    model = make_model(draw(st.lists(st.integers(0, 3000), min_size=n_layers,
                                     max_size=n_layers)),
                       output=draw(st.integers(0, 2000)), embedding=draw(st.integers(0, 2000)),
                       kv_heads=kv_heads)
    count = draw(st.integers(1, 4))
    coordinator = draw(st.one_of(st.none(), st.integers(0, count - 1)))
    nodes = [NodeBudget(f"n{i}", available_bytes=draw(st.integers(0, 12000)),
                        reserve_bytes=draw(st.integers(0, 1000)),
                        max_bytes=draw(st.one_of(st.none(), st.integers(0, 12000))),
                        weight=draw(st.sampled_from([1.0, 2.0, 3.0])),
                        is_coordinator=i == coordinator)
             for i in range(count)]
    context = draw(st.sampled_from([1, 256, 300]))
    return model, nodes, context


@pytest.mark.parametrize("policy", ["pack", "spread"])
@settings(max_examples=500, deadline=None)
@given(case=cases())
def test_plan_matches_brute_force(policy: str, case: tuple[ModelInfo, list[NodeBudget], int]
                                  ) -> None:
    model, nodes, context = case
    layouts = valid_layouts(model, nodes, context)
    try:
        plan = plan_layers(model, nodes, context=context, policy=policy)
    except PlanRefused as refused:
        assert not layouts, f"refused, but {layouts[0]} fits: {refused}"
        assert refused.missing_bytes > 0 and str(refused)
        if "token embedding" in str(refused):
            return
        # What is missing is exactly what one more node, last in --rpc order, must hold.
        for budget, fits in ((refused.missing_bytes, True), (refused.missing_bytes - 1, False)):
            grown = [*nodes, node("extra", budget)]
            assert bool(valid_layouts(model, grown, context)) == fits
        plan_layers(model, [*nodes, node("extra", refused.missing_bytes)], context=context,
                    policy=policy)
        return
    assert layouts, "planned, but the oracle finds no layout"
    check_plan(plan, model, nodes, context)
    fewest = min(sum(1 for c in counts if c) for counts in layouts)
    if policy == "pack":
        assert len(plan.assignments) == fewest
        assert set(plan.nodes) == best_pack_set(model, nodes, layouts)
    else:
        assert len(plan.assignments) >= fewest


@settings(max_examples=200, deadline=None)
@given(blocks=st.integers(1, 40), weights=st.lists(st.sampled_from([1.0, 2.0, 5.0]),
                                                      min_size=1, max_size=6))
def test_spread_with_room_follows_the_weights(blocks: int, weights: list[float]) -> None:
    model = make_model([100] * blocks, output=50)
    nodes = [node(f"n{i}", 10**9, weight=w) for i, w in enumerate(weights)]
    plan = plan_layers(model, nodes, context=512, policy="spread")
    check_plan(plan, model, nodes, 512)
    counts = plan.tensor_split([n.name for n in nodes])
    for n, count in zip(nodes, counts, strict=True):
        share = blocks * n.weight / sum(weights)
        assert abs(count - share) <= 1, (counts, weights)
    if len(set(weights)) == 1:
        assert max(counts) - min(counts) <= 1


# ---- examples -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama70b(tmp_path_factory: pytest.TempPathFactory) -> ModelInfo:
    return read_gguf_info(llama2_70b_q4k(tmp_path_factory.mktemp("m") / "70b.gguf"))


def four_nodes(**caps: int) -> list[NodeBudget]:
    """Three GPUs (24, 48, 24 GiB) and a CPU node with 64 GiB; GPUs three times as fast."""
    gpu = {"reserve_bytes": GIB, "weight": 3.0}
    return [
        NodeBudget("gpu-a", 24 * GIB, max_bytes=caps.get("gpu-a"), **gpu),  # type: ignore[arg-type]
        NodeBudget("gpu-b", 48 * GIB, max_bytes=caps.get("gpu-b"), **gpu),  # type: ignore[arg-type]
        NodeBudget("gpu-c", 24 * GIB, max_bytes=caps.get("gpu-c"), **gpu),  # type: ignore[arg-type]
        NodeBudget("cpu-d", 64 * GIB, reserve_bytes=4 * GIB, max_bytes=caps.get("cpu-d")),
    ]


def test_70b_on_four_nodes(llama70b: ModelInfo) -> None:
    names = ["gpu-a", "gpu-b", "gpu-c", "cpu-d"]
    block = LLAMA2_70B_Q4K_BLOCK + 4096 * 4096  # weights + f16 KV at 4096 tokens
    assert layer_costs(llama70b, 4096) == [block] * 80

    # pack: the 48 GiB GPU holds all 37.4 GiB alone; every hop would cost tokens/s.
    nodes = four_nodes()
    plan = plan_layers(llama70b, nodes, context=4096)
    check_plan(plan, llama70b, nodes, 4096)
    assert plan.tensor_split(names) == [0, 80, 0, 0]
    assert plan.unused == ("gpu-a", "gpu-c", "cpu-d")
    assert plan.assignments[0].total_bytes == 80 * block + llama70b.output_bytes

    # Capped at 30 GiB it no longer does, and the fewest nodes win over speed: the CPU alone.
    nodes = four_nodes(**{"gpu-b": 30 * GIB})
    assert plan_layers(llama70b, nodes, context=4096).nodes == ("cpu-d",)
    # With the CPU capped too: two GPUs, the roomiest first, filled in --rpc order.
    nodes = four_nodes(**{"gpu-b": 30 * GIB, "cpu-d": 16 * GIB})
    plan = plan_layers(llama70b, nodes, context=4096)
    check_plan(plan, llama70b, nodes, 4096)
    on_a = 23 * GIB // block  # gpu-a, first in --rpc order, takes all it can
    assert on_a == 49
    assert plan.tensor_split(names) == [49, 31, 0, 0]
    assert [(a.node, a.first_layer, a.last_layer) for a in plan.assignments] == [
        ("gpu-a", 0, 48), ("gpu-b", 49, 79)]
    # What llama-server gets places exactly that (llama.cpp's own split rule, modelled).
    ngl, ts = tensor_split_for([count for _, _, count in plan.rpc_spans()])
    assert (ngl, ts) == (81, (49, 32))
    assert llama_layer_split(80, ts, ngl) == (0, (49, 31), 1)

    # spread: every node, by weight 3:3:3:1.
    plan = plan_layers(llama70b, four_nodes(), context=4096, policy="spread")
    check_plan(plan, llama70b, four_nodes(), 4096)
    assert plan.tensor_split(names) == [24, 24, 24, 8]


def test_refusal_says_how_much_is_missing_and_where(llama70b: ModelInfo) -> None:
    nodes = [
        NodeBudget("gpu-a", 24 * GIB, GIB, weight=3.0),
        NodeBudget("gpu-b", 16 * GIB, GIB, weight=3.0),
        NodeBudget("gpu-c", GIB // 2, GIB, weight=3.0),  # busy: less free than its reserve
        NodeBudget("cpu-d", 64 * GIB, 4 * GIB, max_bytes=2 * GIB),
    ]
    with pytest.raises(PlanRefused) as caught:
        plan_layers(llama70b, nodes, context=16384)
    refused = caught.value
    block = LLAMA2_70B_Q4K_BLOCK + 4096 * 16384
    assert refused.needed_bytes == 80 * block + llama70b.output_bytes
    assert refused.capacity_bytes == 40 * GIB
    fits = [23 * GIB // block, 15 * GIB // block, 0, 2 * GIB // block]
    assert fits == [45, 29, 0, 3]
    assert refused.missing_bytes == (80 - sum(fits)) * block + llama70b.output_bytes
    assert refused.full_nodes == ("gpu-a", "gpu-b", "cpu-d")
    assert str(refused) == (
        "the model needs 41.1 GiB at context 16384 but the nodes can hold 40.0 GiB: 1.8 GiB "
        "missing for blocks 77-79 and the output head (full: gpu-a, gpu-b, cpu-d; nothing free "
        "on gpu-c); add a node, lower context, or raise max_memory_gb")
    # More than 41.1 - 40.0: blocks are whole, and 1.8 GiB is what a node added last needs.
    assert describe_bytes(refused.missing_bytes, round_up=True) == "1.8 GiB"
    # Lower context is a real way out.
    check_plan(plan_layers(llama70b, nodes, context=4096), llama70b, nodes, 4096)


def test_fits_by_sum_but_not_in_whole_blocks() -> None:
    model = make_model([2, 2, 2])
    with pytest.raises(PlanRefused) as c:
        plan_layers(model, [node("a", 3), node("b", 3)], context=1)
    assert str(c.value).startswith("the model needs 6 B at context 256 and the nodes hold 6 B "
                                   "in all, but not in whole blocks: 2 B missing for block 2 ")
    assert c.value.missing_bytes == 2  # block 2 fits nowhere
    plan = plan_layers(model, [node("a", 4), node("b", 3)], context=1)
    assert plan.tensor_split(["a", "b"]) == [2, 1]


def test_no_nodes_is_a_refusal_too() -> None:
    with pytest.raises(PlanRefused, match="no node is configured"):
        plan_layers(make_model([5]), [], context=1)


def test_pack_prefers_fast_then_roomy_then_first() -> None:
    model = make_model([10] * 4)
    slow_big, fast = node("slow", 1000), node("fast", 100, weight=2.0)
    assert plan_layers(model, [slow_big, fast], context=1).nodes == ("fast",)
    assert plan_layers(model, [node("x", 100), node("y", 200)], context=1).nodes == ("y",)
    assert plan_layers(model, [node("x", 100), node("y", 100)], context=1).nodes == ("x",)
    # The fewest nodes beat speed: one slow node rather than two fast ones.
    halves = [node("f1", 25, weight=2.0), node("f2", 25, weight=2.0), node("s", 40)]
    assert plan_layers(model, halves, context=1).nodes == ("s",)


def test_pack_prefers_the_coordinator_on_a_tie_of_weights() -> None:
    """Blocks on the coordinator's own CPU cost no RPC hop: it wins a tie of weights even though
    its budget lost the token embedding (here it has the same free memory as the worker, as
    on a shared machine, and less room once the embedding is taken)."""
    model = make_model([10] * 4, output=5, embedding=30)
    same_box = [node("w1", 1000), node("here", 1000, is_coordinator=True), node("w2", 1000)]
    plan = plan_layers(model, same_box, context=1)
    check_plan(plan, model, same_box, 1)
    assert plan.nodes == ("here",) and plan.rpc_spans() == ()
    assert plan.unused == ("w1", "w2")
    # Much roomier workers do not change that; only a faster one does.
    roomy = [node("w1", 10**6), node("here", 100, is_coordinator=True)]
    assert plan_layers(model, roomy, context=1).nodes == ("here",)
    fast = [node("w1", 1000, weight=2.0), node("here", 1000, is_coordinator=True)]
    assert plan_layers(model, fast, context=1).nodes == ("w1",)
    # When it cannot hold the model alone, the fewest nodes still come first.
    small = [node("w1", 1000), node("here", 60, is_coordinator=True)]
    assert plan_layers(model, small, context=1).nodes == ("w1",)
    # spread is unchanged: every node with a budget.
    assert plan_layers(model, same_box, context=1, policy="spread").nodes == ("here", "w1", "w2")


def test_coordinator_holds_the_first_blocks_and_the_embedding() -> None:
    model = make_model([10] * 5, output=7, embedding=30)
    nodes = [node("w1", 37), node("here", 51, is_coordinator=True)]
    plan = plan_layers(model, nodes, context=1)
    check_plan(plan, model, nodes, 1)
    # Listed last, the coordinator's CPU still takes the first range: llama.cpp keeps the
    # first n_layer + 1 - ngl blocks there.
    assert [(a.node, a.first_layer, a.n_layers, a.weight_bytes) for a in plan.assignments] == [
        ("here", 0, 2, 20 + 30), ("w1", 2, 3, 30 + 7)]
    assert plan.rpc_spans() == (("w1", 2, 3),)
    ngl, ts = tensor_split_for([3])
    assert llama_layer_split(5, ts, ngl) == (2, (3,), 0)

    with pytest.raises(PlanRefused, match="the coordinator here keeps the token embedding") as c:
        plan_layers(model, [node("w1", 100), node("here", 20, is_coordinator=True)], context=1)
    assert c.value.missing_bytes == 10 and c.value.full_nodes == ("here",)


def test_context_is_padded_like_llama_cpp() -> None:
    model = make_model([0, 0], kv_heads=2, head_dim=64)
    plan = plan_layers(model, [node("a", 10**9)], context=100)
    assert plan.context == kv_cells(100) == 256
    assert plan.assignments[0].kv_bytes == 2 * 256 * (2 * 64 * 2) * 2


def test_bad_arguments_are_value_errors() -> None:
    model, a = make_model([1]), node("a", 10)
    for kwargs, message in [
        ({"policy": "fast"}, "unknown policy 'fast'"),
        ({"context": 0}, "context must be at least 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            plan_layers(model, [a], **{"context": 1, **kwargs})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unique"):
        plan_layers(model, [a, a], context=1)
    with pytest.raises(ValueError, match="weight must be a positive"):
        plan_layers(model, [node("z", 10, weight=0.0)], context=1)
    with pytest.raises(ValueError, match="at most one node"):
        plan_layers(model, [node("c1", 10, is_coordinator=True),
                            node("c2", 10, is_coordinator=True)], context=1)
    with pytest.raises(ValueError, match="not in this plan: nope"):
        plan_layers(model, [a], context=1).tensor_split(["a", "nope"])


def test_planned_bytes_match_what_llama_server_loaded(tmp_path: Path) -> None:
    """The demo model planned as the captured run placed it (-ngl 7 -ts 2,5 at 512 cells: two
    blocks on the coordinator's CPU, 2 and 4 on the workers): the planner's bytes per node are
    the buffer sizes llama-server logged (to the 0.01 MiB it prints)."""
    model = read_gguf_info(write_demo_model(tmp_path / "demo.gguf"))
    per_block = model.layer_bytes[0] + model.kv_bytes(1, 512)
    w1, w2 = "127.0.0.1:51301", "127.0.0.1:51302"
    nodes = [node(w1, 2 * per_block), node(w2, 4 * per_block + model.output_bytes),
             node("here", 2 * per_block + model.embedding_bytes, is_coordinator=True)]
    plan = plan_layers(model, nodes, context=512)
    assert tensor_split_for([c for _, _, c in plan.rpc_spans()]) == (7, (2, 5))
    report = parse_load_log((LOAD_LOGS / "rpc2_ngl7_ts25_nofit.log").read_text().splitlines())
    for a in plan.assignments:
        device = report.device(HOST if a.on_coordinator else a.node)
        assert device is not None and device.layers == a.n_layers
        assert abs(device.model_bytes - a.weight_bytes) <= 0.005 * MIB, a
        assert abs(device.kv_bytes - a.kv_bytes) <= 0.005 * MIB, a


def assert_loaded_as_planned(plan: Plan, report: LoadReport) -> None:
    """Blocks, KV and weights per device as planned. On the coordinator's CPU the repacked
    copy (AMX, CPU_REPACK) is as planned too, and the mapped file within the plan: llama.cpp
    maps the file range from the first to the last tensor it keeps unpacked, so repacked
    matrices at either end of the range are not mapped (without repacking it is exact)."""
    for a in plan.assignments:
        device = report.device(HOST if a.on_coordinator else a.node)
        assert device is not None and device.layers == a.n_layers, report
        assert abs(device.kv_bytes - a.kv_bytes) <= PRINTED, (a, device)
        assert abs(device.repacked_bytes - a.repacked_bytes) <= PRINTED, (a, device)
        mapped = device.model_bytes - device.repacked_bytes
        planned = a.weight_bytes - a.repacked_bytes
        if a.repacked_bytes:
            assert mapped <= planned + PRINTED, (a, device)
        else:
            assert abs(mapped - planned) <= PRINTED, (a, device)


def test_planned_bytes_match_an_amx_cpus_load_log(tmp_path: Path) -> None:
    """The logs from an Intel CPU with AMX: its llama-server keeps an AMX copy of every matrix
    it holds (F16 too) beside the mapped file. A planner told that CPU repacks gives the
    coordinator the copy's bytes; told it does not, it plans less than that CPU used."""
    model = read_gguf_info(write_demo_model(tmp_path / "demo.gguf"))
    per_block = model.layer_bytes[0] + model.kv_bytes(1, 512)
    copy = AMX_HOST.repacked_bytes(model.layer_matrices[0])
    assert copy == model.layer_bytes[0] - 2 * 256 * 4  # every matrix, not the two f32 norms
    w1, w2 = "127.0.0.1:51111", "127.0.0.1:51112"
    here = node("here", 3 * (per_block + copy) + model.embedding_bytes, is_coordinator=True,
                repack=AMX_HOST)
    nodes = [node(w1, 2 * per_block), node(w2, 3 * per_block + model.output_bytes), here]
    plan = plan_layers(model, nodes, context=512)
    assert [(a.node, a.n_layers) for a in plan.assignments] == [("here", 3), (w1, 2), (w2, 3)]
    assert llama_layer_split(8, (1, 2), 6) == (3, (2, 3), 1)  # how that log was run
    assert plan.assignments[0].repacked_bytes == 3 * copy
    assert_loaded_as_planned(plan, parse_load_log(
        (LOAD_LOGS / "amx_rpc2_ngl6_ts12_nofit.log").read_text().splitlines()))

    alone = plan_layers(model, [node("here", GIB, is_coordinator=True, repack=AMX_HOST)],
                        context=512)
    assert alone.assignments[0].holds_output  # and the output matrix is repacked as well
    report = parse_load_log((LOAD_LOGS / "amx_cpu_only.log").read_text().splitlines())
    assert_loaded_as_planned(alone, report)
    cpu = report.device(HOST)
    assert cpu is not None
    unaware = plan_layers(model, [node("here", GIB, is_coordinator=True)], context=512)
    assert cpu.model_bytes > unaware.assignments[0].weight_bytes + 8 * MIB


def test_a_repacking_coordinator_takes_fewer_blocks(tmp_path: Path) -> None:
    """Its budget holds two blocks as they are on disk, one with its repacked copy (spread
    would give it four)."""
    model = read_gguf_info(write_demo_model(tmp_path / "demo.gguf"))
    per_block = model.layer_bytes[0] + model.kv_bytes(1, 512)
    budget = 2 * per_block + model.embedding_bytes
    for repack, blocks in ((None, 2), (NO_REPACK, 2), (cpu_repack({"avx2"}, "x86_64"), 2),
                           (AMX_HOST, 1)):
        plan = plan_layers(model, [node("here", budget, is_coordinator=True, repack=repack),
                                   node("w", GIB)], context=512, policy="spread")
        share = plan.assignment("here")
        assert share is not None and share.n_layers == blocks, repack
        assert share.total_bytes <= budget
    # Workers never repack: the same rule on a worker changes nothing.
    plain = plan_layers(model, [node("w", GIB)], context=512)
    flagged = plan_layers(model, [node("w", GIB, repack=AMX_HOST)], context=512)
    assert plain == flagged


@pytest.mark.integration
@pytest.mark.parametrize("dtype", ["f16", "q4_0"])
def test_real_llama_server_loads_the_plan_byte_for_byte(tmp_path: Path, dtype: str) -> None:
    """Two real workers and llama-server started with the plan (-ngl/-ts from its spans,
    --fit off) and a q8_0 KV cache: blocks, weights and KV per device are the planned ones.
    The coordinator's CPU repacks what this machine's CPU repacks (here: Q4_0 with AVX2 into
    CPU_REPACK, F16 not at all; an AMX CPU: both), and the plan counts that copy."""
    rpc, server = find_cached_binary("ggml-rpc-server"), find_cached_binary("llama-server")
    if not (rpc and server):
        pytest.skip("llama.cpp binaries not built: run `torbiz-tui build-llama`")
    model = read_gguf_info(write_demo_model(tmp_path / "m.gguf", n_layer=7, n_head_kv=1,
                                            dtype=dtype))
    repack = local_cpu_repack()
    per_block = model.layer_bytes[0] + model.kv_bytes(1, 512, "q8_0")
    ports = [free_port(), free_port()]
    eps = [f"127.0.0.1:{p}" for p in ports]
    nodes = [node(eps[0], 2 * per_block), node(eps[1], 4 * per_block + model.output_bytes),
             node("here", per_block + model.embedding_bytes
                  + repack.repacked_bytes(model.layer_matrices[0]), is_coordinator=True,
                  repack=repack)]
    plan = plan_layers(model, nodes, context=500, cache_type="q8_0")
    assert plan.tensor_split(["here", *eps]) == [1, 2, 4]
    ngl, ts = tensor_split_for([count for _, _, count in plan.rpc_spans()])
    procs: list[subprocess.Popen[bytes]] = []
    log_path = tmp_path / "coordinator.log"
    try:
        procs += start_test_workers(rpc, ports)
        with log_path.open("wb") as log:
            coordinator = subprocess.Popen(
                [str(server), "-m", str(model.path), "--rpc", ",".join(eps), "-ngl", str(ngl),
                 "-ts", ",".join(map(str, ts)), "--fit", "off", "-lv", "4", "-c", "500",
                 "-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on", "--host", "127.0.0.1",
                 "--port", str(free_port())], stdout=log, stderr=subprocess.STDOUT)
            procs.append(coordinator)
            report = wait_for_load(coordinator, log_path)
        assert report.finished, log_path.read_text(errors="replace")[-2000:]
        assert plan.context == 512  # llama.cpp pads -c 500 to 512 cells as well
        assert_loaded_as_planned(plan, report)
    finally:
        stop_all(procs)
