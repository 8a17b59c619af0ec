"""core/layer_map.py: the map of who holds which block, from the plan, the load log, the DHT."""

from __future__ import annotations

from core.planning.layer_map import COORDINATOR, LOADED, PLAN, SWARM, llama_map, petals_map
from core.status import LayerShare


def share(node: str, first: int | None, planned: int | None, loaded: int | None = None,
          model_bytes: int = 0) -> LayerShare:
    return LayerShare(node, f"127.0.0.1:{5000 + len(node)}", first, planned, loaded, model_bytes)


def test_plan_only_puts_the_blocks_before_the_first_worker_on_the_coordinator() -> None:
    layer_map = llama_map([share("a", 2, 3), share("b", 5, 3)])
    assert layer_map.source == PLAN and layer_map.blocks == 8
    assert [(s.node, s.first, s.count) for s in layer_map.spans] == [
        (COORDINATOR, 0, 2), ("a", 2, 3), ("b", 5, 3)]
    assert [layer_map.owner(b) for b in range(8)] == [COORDINATOR] * 2 + ["a"] * 3 + ["b"] * 3
    assert layer_map.owner(8) is None and not layer_map.mismatches


def test_loaded_counts_place_blocks_in_rpc_order_after_the_coordinator() -> None:
    # The load log says 8 blocks (offloaded 9/9 -> 8 + output); workers hold 1 and 5.
    layer_map = llama_map([share("w0", 2, 1, 1, 3 << 20), share("w1", 3, 5, 5, 15 << 20)],
                          blocks=8)
    assert layer_map.source == LOADED
    assert [(s.node, s.first, s.count, s.model_bytes) for s in layer_map.spans] == [
        (COORDINATOR, 0, 2, 0), ("w0", 2, 1, 3 << 20), ("w1", 3, 5, 15 << 20)]
    assert not layer_map.mismatches


def test_a_worker_that_loaded_other_than_planned_is_flagged() -> None:
    layer_map = llama_map([share("a", 0, 4, 3), share("b", 4, 4, 5)], blocks=8)
    assert [(s.node, s.mismatch) for s in layer_map.mismatches] == [
        ("a", "planned 4 blocks, loaded 3"), ("b", "planned 4 blocks, loaded 5")]
    assert [(s.first, s.count) for s in layer_map.spans] == [(0, 3), (3, 5)]


def test_a_planned_worker_that_loaded_nothing_still_shows_its_mismatch() -> None:
    layer_map = llama_map([share("a", 0, 4, 0), share("b", 4, 4, 8)], blocks=8)
    assert [(s.node, s.count, s.mismatch) for s in layer_map.spans] == [
        ("a", 0, "planned 4 blocks, loaded 0"), ("b", 8, "planned 4 blocks, loaded 8")]


def test_no_plan_and_nothing_loaded_is_an_empty_map() -> None:
    layer_map = llama_map([share("a", None, None)])
    assert layer_map.blocks == 0 and layer_map.spans == ()


def test_petals_spans_follow_the_swarm_and_mark_unserved_blocks() -> None:
    shares = [LayerShare("p1", "", 0, 4, first_layer=0, layers=4, state="ONLINE"),
              LayerShare("p2", "", 4, 4, first_layer=None, layers=None, state="OFFLINE")]
    layer_map = petals_map(shares, 8, unserved=(4, 5, 6, 7))
    assert layer_map.source == SWARM and layer_map.blocks == 8
    assert [(s.node, s.first, s.count) for s in layer_map.spans] == [("p1", 0, 4)]
    assert layer_map.spans[0].state == ""  # ONLINE: nothing to say
    assert layer_map.unserved == (4, 5, 6, 7) and layer_map.owner(5) is None


def test_petals_span_other_than_planned_is_flagged() -> None:
    shares = [LayerShare("p1", "", 0, 4, first_layer=2, layers=4, state="ONLINE")]
    (span,) = petals_map(shares, 8).spans
    assert span.mismatch == "planned blocks 0-3, serves 2-5"


def test_a_server_still_announced_but_dead_keeps_its_span_with_its_state() -> None:
    """A killed server's DHT records outlive it for minutes: its span stays, marked dead, and
    its blocks count as unserved."""
    shares = [LayerShare("p1", "", 0, 2, first_layer=0, layers=2, state="ONLINE"),
              LayerShare("p2", "", 2, 2, first_layer=2, layers=2, state="dead")]
    layer_map = petals_map(shares, 4, unserved=(2, 3))
    assert [(s.node, s.state) for s in layer_map.spans] == [("p1", ""), ("p2", "dead")]


def test_petals_spans_carry_predicted_and_measured_memory() -> None:
    shares = [LayerShare("p1", "", 0, 2, first_layer=0, layers=2, state="ONLINE",
                         predicted_bytes=560 << 20, measured_bytes=534 << 20)]
    (span,) = petals_map(shares, 2).spans
    assert (span.model_bytes, span.measured_bytes) == (560 << 20, 534 << 20)
